//! Cancel keys: pgbastion hands every client the server's real process ID
//! with a secret key of its own, and keeps the mapping to the upstream's
//! real key for as long as the session lives.
//!
//! Why not pass the server's key through? Because then any client could
//! cancel any session it learned the key of, by asking the server directly
//! or through pgbastion. Here a CancelRequest is honoured only if it
//! carries the process ID and a key pgbastion issued (the key compared in
//! constant time), and it is forwarded (with the real key) to the very
//! server address the session is connected to, over verified TLS. Unknown
//! keys are dropped silently, as PostgreSQL does.
//!
//! The process ID is the server's own (issue 19 item 27): clients use it
//! for `pg_terminate_backend`, `pg_stat_activity` and to recognise their
//! own NOTIFYs, and it grants nothing without the key. Two sessions on two
//! servers may share one process ID, so entries are found by process ID
//! and then by key.
//!
//! With `[cluster]` every mapping is also published for the fleet; a pooled
//! session's only names this instance, which forwards cancels relayed to
//! it (see `cluster::relay`) to the connection serving the session then.

use crate::sync::MutexExt;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use rand::RngCore;
use subtle::ConstantTimeEq;

use crate::cluster::keys::RemoteCancel;
use crate::cluster::Cluster;
use crate::limits::buckets::KeyedBuckets;
use crate::protocol::startup::CancelKey;
use crate::upstream::Upstream;

/// Key length pgbastion issues to protocol 3.2 sessions (PostgreSQL 18 uses
/// the same); 3.0 sessions get 4 bytes, all that protocol allows.
const KEY_LEN_3_2: usize = 32;
const KEY_LEN_3_0: usize = 4;

/// Where a matched cancel request must go.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub session_id: String,
    /// The upstream as the session found it (a reload since may have
    /// changed its CA bundle or address; the cancel goes where the session
    /// is, verified as the session was).
    pub upstream: Arc<Upstream>,
    /// The address the session is connected to: with several addresses
    /// behind one name, only that server knows the backend.
    pub addr: SocketAddr,
    /// The server's real key.
    pub real: CancelKey,
    /// A pooled session: the server connection serving it now (changes
    /// per transaction; None between transactions), instead of
    /// `addr`/`real`.
    pub serving: Option<Arc<crate::pool::relay::Serving>>,
}

struct Entry {
    key: Vec<u8>,
    target: CancelTarget,
}

/// Live sessions by process ID: usually one each, more when sessions on
/// different servers have the same one.
type Entries = HashMap<u32, Vec<Entry>>;

/// All live sessions' cancel keys, and the per-address rate limit.
pub struct CancelRegistry {
    entries: Mutex<Entries>,
    /// Cancel requests per client address (Unix-socket clients share one).
    limiter: Mutex<KeyedBuckets<Option<IpAddr>>>,
    /// With `[cluster]`: where each mapping is also published, so the
    /// other instances can forward cancels for this instance's sessions.
    fleet: Option<Arc<Cluster>>,
}

/// A session's hold on its mapping: dropping it (the session ended) removes
/// the mapping, so a late cancel finds nothing.
pub struct Registration {
    registry: Weak<CancelRegistry>,
    process_id: u32,
    /// The key issued: which of the process ID's entries is this one.
    key: Vec<u8>,
    /// Where the mapping is in Redis (with `[cluster]`).
    published: Option<String>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(r) = self.registry.upgrade() {
            let mut entries = r.lock_entries();
            if let Some(list) = entries.get_mut(&self.process_id) {
                list.retain(|e| e.key != self.key);
                if list.is_empty() {
                    entries.remove(&self.process_id);
                }
            }
            drop(entries);
            if let (Some(fleet), Some(key)) = (&r.fleet, &self.published) {
                fleet.unpublish_cancel(key);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here can leave the maps inconsistent mid-update, so a
    // poisoned lock (a panic elsewhere) is still safe to use.
    m.locked()
}

impl CancelRegistry {
    /// New cancel rate limits (a reload).
    pub fn set_rate(&self, rate_per_sec: f64, burst: f64) {
        lock(&self.limiter).set_rate(rate_per_sec, burst);
    }

    pub fn new(rate_per_sec: f64, burst: f64, fleet: Option<Arc<Cluster>>) -> Arc<Self> {
        Arc::new(CancelRegistry {
            entries: Mutex::new(HashMap::new()),
            limiter: Mutex::new(KeyedBuckets::new(rate_per_sec, burst)),
            fleet,
        })
    }

    fn lock_entries(&self) -> MutexGuard<'_, Entries> {
        lock(&self.entries)
    }

    /// Issues pgbastion's own CancelKey for a session whose server sent
    /// `target.real`: the server's process ID, and a secret key as long as
    /// the protocol the session speaks allows: 4 bytes if the server's is 4
    /// (protocol 3.0, including a 3.2 client that the server downgraded),
    /// else 32.
    pub fn register(self: &Arc<Self>, target: CancelTarget) -> (CancelKey, Registration) {
        let key_len = if target.real.secret_key.len() == KEY_LEN_3_0 {
            KEY_LEN_3_0
        } else {
            KEY_LEN_3_2
        };
        let process_id = target.real.process_id;
        let mut rng = rand::thread_rng();
        let mut entries = self.lock_entries();
        let list = entries.entry(process_id).or_default();
        let key = loop {
            let mut key = vec![0u8; key_len];
            rng.fill_bytes(&mut key);
            // Unique among this process ID's sessions (a 4-byte key could
            // repeat), and never the server's own key.
            if key != target.real.secret_key && list.iter().all(|e| e.key != key) {
                break key;
            }
        };
        let issued = CancelKey {
            process_id,
            secret_key: key.clone(),
        };
        let published = self
            .fleet
            .as_ref()
            .map(|fleet| fleet.publish_cancel(&issued, &remote(fleet, &target)));
        list.push(Entry {
            key: key.clone(),
            target,
        });
        (
            issued,
            Registration {
                published,
                registry: Arc::downgrade(self),
                process_id,
                key,
            },
        )
    }

    /// The target of a cancel request, if it carries the process ID and a
    /// key pgbastion issued to a live session. Keys are compared in
    /// constant time, every one of the process ID's entries.
    pub fn lookup(&self, req: &CancelKey) -> Option<CancelTarget> {
        let entries = self.lock_entries();
        let mut found = None;
        for entry in entries.get(&req.process_id)? {
            let same = entry.key.len() == req.secret_key.len()
                && bool::from(entry.key.ct_eq(&req.secret_key));
            if same {
                found = Some(entry.target.clone());
            }
        }
        found
    }

    /// Whether a client address may send another cancel request now.
    pub fn allow(&self, client: Option<IpAddr>) -> bool {
        lock(&self.limiter).try_take(&client, Instant::now())
    }

    pub fn live_sessions(&self) -> usize {
        self.lock_entries().values().map(Vec::len).sum()
    }
}

/// The mapping another instance needs for `target`. A pooled session's
/// server changes per transaction: only this instance can follow it, so
/// its mapping says only that the cancel must be relayed here.
fn remote(fleet: &Cluster, target: &CancelTarget) -> RemoteCancel {
    let pooled = target.serving.is_some();
    RemoteCancel {
        session_id: target.session_id.clone(),
        instance: fleet.instance().to_owned(),
        upstream: target.upstream.config.name.clone(),
        addr: target.addr,
        process_id: target.real.process_id,
        // Never a key worth anything for a pooled session.
        secret_key: if pooled {
            Vec::new()
        } else {
            target.real.secret_key.clone()
        },
        pooled,
        endpoint: target
            .upstream
            .config
            .endpoint
            .as_ref()
            .map(|e| e.as_str().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(key_len: usize) -> CancelTarget {
        let config = crate::config::Config::from_toml(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\nclient_tls = \"allow\"\n[[upstream]]\naddress = \"localhost:5432\"\nsystem_roots = true\n",
        )
        .unwrap();
        CancelTarget {
            session_id: "s".into(),
            upstream: Arc::new(Upstream::new(config.upstreams[0].clone()).unwrap()),
            addr: "127.0.0.1:5432".parse().unwrap(),
            real: CancelKey {
                process_id: 1234,
                secret_key: vec![7; key_len],
            },
            serving: None,
        }
    }

    #[test]
    fn issued_keys_match_the_protocol_and_hide_the_real_ones() {
        let reg = CancelRegistry::new(10.0, 10.0, None);
        let (k30, _r30) = reg.register(target(4));
        assert_eq!(k30.secret_key.len(), 4);
        let (k32, _r32) = reg.register(target(32));
        assert_eq!(k32.secret_key.len(), 32);
        let (k_other, _r) = reg.register(target(100));
        assert_eq!(k_other.secret_key.len(), 32);
        for k in [&k30, &k32] {
            assert_eq!(k.process_id, 1234, "the server's own process ID");
            assert_ne!(k.secret_key, vec![7; k.secret_key.len()]);
        }
    }

    #[test]
    fn lookup_needs_the_exact_key_and_ends_with_the_session() {
        let reg = CancelRegistry::new(10.0, 10.0, None);
        let (issued, registration) = reg.register(target(4));
        let req = |key: Vec<u8>| CancelKey {
            process_id: issued.process_id,
            secret_key: key,
        };
        let found = reg
            .lookup(&req(issued.secret_key.clone()))
            .expect("issued key matches");
        assert_eq!(found.real.process_id, 1234);
        let mut wrong = issued.secret_key.clone();
        wrong[0] ^= 1;
        assert!(reg.lookup(&req(wrong)).is_none());
        let mut longer = issued.secret_key.clone();
        longer.push(0);
        assert!(reg.lookup(&req(longer)).is_none());
        assert!(reg
            .lookup(&CancelKey {
                process_id: issued.process_id ^ 1,
                secret_key: issued.secret_key.clone()
            })
            .is_none());
        drop(registration);
        assert!(reg.lookup(&req(issued.secret_key.clone())).is_none());
        assert_eq!(reg.live_sessions(), 0);
    }

    /// Two sessions on two servers with one process ID: each key finds its
    /// own session, a wrong key finds none, and one ending leaves the other.
    #[test]
    fn sessions_sharing_a_process_id_are_told_apart_by_key() {
        let reg = CancelRegistry::new(10.0, 10.0, None);
        let mut other = target(32);
        other.session_id = "t".into();
        let (a, ra) = reg.register(target(32));
        let (b, rb) = reg.register(other);
        assert_eq!(a.process_id, b.process_id);
        assert_ne!(a.secret_key, b.secret_key);
        assert_eq!(reg.lookup(&a).unwrap().session_id, "s");
        assert_eq!(reg.lookup(&b).unwrap().session_id, "t");
        let wrong = CancelKey {
            process_id: a.process_id,
            secret_key: vec![7; 32],
        };
        assert!(
            reg.lookup(&wrong).is_none(),
            "the server's own key is not ours"
        );
        assert_eq!(reg.live_sessions(), 2);
        drop(ra);
        assert!(reg.lookup(&a).is_none());
        assert_eq!(reg.lookup(&b).unwrap().session_id, "t");
        drop(rb);
        assert_eq!(reg.live_sessions(), 0);
        assert!(reg.lock_entries().is_empty());
    }
}
