//! Cancels for pooled sessions, relayed to the instance that owns them.
//!
//! A pooled client's server connection changes per transaction, so only
//! the owning instance knows where its cancel must go. An instance that
//! receives a CancelRequest for another instance's pooled session
//! PUBLISHes it, sealed with the fleet keys and bound to the channel, on
//! that instance's channel; every instance keeps one subscriber on its own
//! channel (connected once Redis is up, again after it was down or the
//! subscription broke) and hands each message that opens, once, to the
//! session layer, which forwards it exactly as a local cancel.
//!
//! Only the fleet can seal a message, and each is accepted once and only
//! while fresh: a Redis client that records a message cannot replay it to
//! cancel a later query. Messages that do not open are dropped (counted in
//! a rate-limited warning); nothing is ever sent back.

use std::collections::{HashSet, VecDeque};
use std::sync::Weak;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use ring::aead::NONCE_LEN;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::keys::{FleetKeys, RelayedCancel};
use super::{Cluster, HEALTH};

/// How far a message's send time may be from this instance's clock (the
/// fleet's clocks are assumed to agree within this): older ones are
/// refused, so a recorded message cannot cancel a later query.
const FRESH: Duration = Duration::from_secs(10);
/// Relayed cancels waiting for the session layer; past this, dropped.
const WAITING: usize = 1_024;
/// Messages remembered against replays; past this, new ones are refused
/// until old ones age out (only the fleet can seal one, so reaching it
/// takes a misbehaving instance).
const MAX_SEEN: usize = 65_536;

/// Opens relayed messages and accepts each one once, while fresh.
pub(super) struct Inbox {
    channel: String,
    /// Nonces of accepted messages, with when they arrived (Unix ms), in
    /// arrival order.
    seen: VecDeque<(u64, [u8; NONCE_LEN])>,
    seen_set: HashSet<[u8; NONCE_LEN]>,
}

/// Why a message was not accepted (for the warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// Not sealed by this fleet for this channel.
    Unsealed,
    /// Sent more than `FRESH` from now.
    Stale,
    /// Already accepted once.
    Replayed,
    /// Too many messages remembered.
    Full,
}

impl Inbox {
    pub(super) fn new(channel: String) -> Inbox {
        Inbox {
            channel,
            seen: VecDeque::new(),
            seen_set: HashSet::new(),
        }
    }

    /// The cancel in `message`, if it opens with `keys` on this channel,
    /// is fresh at `now_ms`, and was not accepted before.
    pub(super) fn accept(
        &mut self,
        keys: &FleetKeys,
        message: &[u8],
        now_ms: u64,
    ) -> Result<RelayedCancel, Refused> {
        let relayed = keys
            .open_relay(&self.channel, message)
            .ok_or(Refused::Unsealed)?;
        if relayed.sent_ms.abs_diff(now_ms) > super::ms(FRESH) {
            return Err(Refused::Stale);
        }
        // Remembered for twice the window: a replay is at most FRESH after
        // the send time, and the original arrived at most FRESH before it.
        let keep = 2 * super::ms(FRESH);
        while let Some((at, nonce)) = self.seen.front() {
            if at.saturating_add(keep) >= now_ms {
                break;
            }
            self.seen_set.remove(nonce);
            self.seen.pop_front();
        }
        let mut nonce = [0u8; NONCE_LEN];
        // Opened, so at least a nonce long.
        nonce.copy_from_slice(&message[..NONCE_LEN]);
        if self.seen_set.contains(&nonce) {
            return Err(Refused::Replayed);
        }
        if self.seen.len() >= MAX_SEEN {
            return Err(Refused::Full);
        }
        self.seen_set.insert(nonce);
        self.seen.push_back((now_ms, nonce));
        Ok(relayed)
    }
}

pub(super) fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    super::ms(since)
}

/// Starts the subscriber on this instance's channel; the receiver gets
/// every relayed cancel that opened.
pub(super) fn start(cluster: Weak<Cluster>, channel: String) -> mpsc::Receiver<RelayedCancel> {
    let (tx, rx) = mpsc::channel(WAITING);
    tokio::spawn(subscriber(cluster, channel, tx));
    rx
}

/// Keeps a subscription while Redis is up, until the cluster or the
/// receiver is dropped.
async fn subscriber(cluster: Weak<Cluster>, channel: String, tx: mpsc::Sender<RelayedCancel>) {
    let mut inbox = Inbox::new(channel.clone());
    loop {
        let Some(c) = cluster.upgrade() else { return };
        if tx.is_closed() {
            return;
        }
        if !c.is_up() {
            drop(c);
            tokio::time::sleep(HEALTH).await;
            continue;
        }
        let subscribed = tokio::time::timeout(c.timeout, async {
            let mut pubsub = c.client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match subscribed {
            Ok(Ok(p)) => p,
            failed => {
                if c.warn.allow("cluster_relay_subscribe") {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {:?}", c.timeout),
                    };
                    warn!(error = %why, "cannot subscribe to this instance's relayed cancels; retrying every second");
                }
                drop(c);
                tokio::time::sleep(HEALTH).await;
                continue;
            }
        };
        info!("subscribed to relayed cancels for this instance's pooled sessions");
        drop(c);
        let why = listen(&cluster, pubsub, &mut inbox, &tx).await;
        if let Some(c) = cluster.upgrade() {
            if c.warn.allow("cluster_relay_lost") {
                warn!(
                    reason = why,
                    "the subscription to relayed cancels ended; subscribing again once Redis is up"
                );
            }
        }
    }
}

/// Reads messages until the subscription breaks, the cluster goes down, or
/// the subscription's own PING fails; says which.
async fn listen(
    cluster: &Weak<Cluster>,
    pubsub: redis::aio::PubSub,
    inbox: &mut Inbox,
    tx: &mpsc::Sender<RelayedCancel>,
) -> &'static str {
    let (mut sink, mut stream) = pubsub.split();
    let mut health = tokio::time::interval(HEALTH);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return "connection closed" };
                let Some(c) = cluster.upgrade() else { return "stopped" };
                match inbox.accept(&c.keys, msg.get_payload_bytes(), now_ms()) {
                    Ok(relayed) => match tx.try_send(relayed) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => return "stopped",
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            if c.warn.allow("cluster_relay_full") {
                                warn!("too many relayed cancels waiting; dropped");
                            }
                        }
                    },
                    Err(refused) => {
                        if c.warn.allow("cluster_relay_refused") {
                            warn!(reason = ?refused, "a relayed cancel was refused (not sealed with this fleet's secret for this instance, too old, or a replay); ignored");
                        }
                    }
                }
            }
            _ = health.tick() => {
                let Some(c) = cluster.upgrade() else { return "stopped" };
                if !c.is_up() {
                    return "Redis is unavailable";
                }
                let timeout = c.timeout;
                drop(c);
                let pong = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                if !matches!(pong, Ok(Ok(_))) {
                    return "no answer to PING";
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secret: u8) -> FleetKeys {
        FleetKeys::new(&[secret; 32], "pgbastion").unwrap()
    }

    fn relayed(sent_ms: u64) -> RelayedCancel {
        RelayedCancel {
            process_id: 77,
            secret_key: vec![5; 32],
            from: "pgb-2".into(),
            request_session: "r".into(),
            proxy_header: None,
            sent_ms,
        }
    }

    /// A message with a bad seal (another secret, another channel, one
    /// bit changed, garbage) is ignored; a good one is accepted once.
    #[test]
    fn badly_sealed_messages_are_ignored() {
        let k = keys(7);
        let channel = k.relay_channel("pgb-1");
        let mut inbox = Inbox::new(channel.clone());
        let now = 1_000_000;
        let other_secret = keys(8).seal_relay(&channel, &relayed(now));
        let other_channel = k.seal_relay(&k.relay_channel("pgb-3"), &relayed(now));
        let mut flipped = k.seal_relay(&channel, &relayed(now));
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        for bad in [
            other_secret,
            other_channel,
            flipped,
            b"cancel".to_vec(),
            vec![],
        ] {
            assert_eq!(inbox.accept(&k, &bad, now).err(), Some(Refused::Unsealed));
        }
        let good = k.seal_relay(&channel, &relayed(now));
        assert_eq!(inbox.accept(&k, &good, now + 5), Ok(relayed(now)));
    }

    /// A replayed message, or one sent too long ago (or in the future), is
    /// refused; the nonce is forgotten only after the window.
    #[test]
    fn replays_and_stale_messages_are_refused() {
        let k = keys(7);
        let channel = k.relay_channel("pgb-1");
        let mut inbox = Inbox::new(channel.clone());
        let now = 1_000_000;
        let fresh = ms_of(FRESH);
        let good = k.seal_relay(&channel, &relayed(now));
        assert!(inbox.accept(&k, &good, now).is_ok());
        assert_eq!(
            inbox.accept(&k, &good, now + 1).err(),
            Some(Refused::Replayed)
        );
        assert_eq!(
            inbox.accept(&k, &good, now + fresh).err(),
            Some(Refused::Replayed)
        );
        assert_eq!(
            inbox.accept(&k, &good, now + fresh + 1).err(),
            Some(Refused::Stale)
        );
        let old = k.seal_relay(&channel, &relayed(now - fresh - 1));
        assert_eq!(inbox.accept(&k, &old, now).err(), Some(Refused::Stale));
        let future = k.seal_relay(&channel, &relayed(now + fresh + 1));
        assert_eq!(inbox.accept(&k, &future, now).err(), Some(Refused::Stale));
        // Old nonces are pruned once past twice the window.
        let later = now + 3 * fresh;
        let next = k.seal_relay(&channel, &relayed(later));
        assert!(inbox.accept(&k, &next, later).is_ok());
        assert_eq!(inbox.seen.len(), 1);
    }

    fn ms_of(d: Duration) -> u64 {
        super::super::ms(d)
    }
}
