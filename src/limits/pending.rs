//! Connections not yet authenticated (negotiating TLS and startup, or in the
//! middle of authentication): each listener's pending slots and the permit
//! a connection holds until it is authenticated, and `LiveLimits`, the
//! connection limits a reload may change.
//!
//! A share per listener, so a flood on one listener cannot lock out another
//! (the Unix socket, say), and a cap per client address across listeners
//! (the counts are shared by every listener), so one address cannot take
//! every slot. Together with the per-message limits while authenticating,
//! this is what bounds the memory strangers can make pgbastion hold.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::keyed_slots::{KeyedPermit, KeyedSlots};
use crate::config::Limits;

/// The limits a reload may change: read at each use, stored on reload.
#[derive(Debug)]
pub(crate) struct LiveLimits {
    pub max_sessions: AtomicUsize,
    pub max_pending: AtomicUsize,
    pub max_pending_per_address: AtomicUsize,
}

impl LiveLimits {
    pub(crate) fn new(limits: &Limits) -> Self {
        LiveLimits {
            max_sessions: AtomicUsize::new(limits.max_sessions),
            max_pending: AtomicUsize::new(limits.max_pending),
            max_pending_per_address: AtomicUsize::new(limits.max_pending_per_address),
        }
    }

    pub(crate) fn store(&self, limits: &Limits) {
        self.max_sessions
            .store(limits.max_sessions, Ordering::SeqCst);
        self.max_pending.store(limits.max_pending, Ordering::SeqCst);
        self.max_pending_per_address
            .store(limits.max_pending_per_address, Ordering::SeqCst);
    }
}

/// One listener's pending slots, and the per-address counts every
/// listener shares.
pub(crate) struct PendingSlots {
    per_listener: KeyedSlots<()>,
    per_address: KeyedSlots<IpAddr>,
    limits: Arc<LiveLimits>,
}

/// One unauthenticated connection's slot, given back when dropped (once
/// the session is authenticated, or ends).
pub(crate) struct PendingPermit {
    _listener: KeyedPermit<()>,
    address: Option<KeyedPermit<IpAddr>>,
    per_address: KeyedSlots<IpAddr>,
    limits: Arc<LiveLimits>,
}

impl PendingPermit {
    /// Counts the connection against the client address a PROXY header
    /// states, from now on: one client behind a balancer must not take
    /// every pending slot of the listener (issue 19 item 25). False: that
    /// address holds its share already.
    pub(crate) fn readdress(&mut self, ip: IpAddr) -> bool {
        let max = self.limits.max_pending_per_address.load(Ordering::SeqCst);
        self.address = self.per_address.try_acquire(ip, max);
        self.address.is_some()
    }
}

/// The pending slot of a connection that may start more than one session
/// (an https listener's: each WebSocket upgrade is a session of its own),
/// with the slots to take a new one from once the first is given back.
pub(crate) struct ConnectionPending {
    held: Option<PendingPermit>,
    slots: Arc<PendingSlots>,
}

impl ConnectionPending {
    pub(crate) fn new(permit: PendingPermit, slots: Arc<PendingSlots>) -> Self {
        ConnectionPending {
            held: Some(permit),
            slots,
        }
    }

    /// The permit the connection arrived with, while it is held.
    pub(crate) fn held_mut(&mut self) -> Option<&mut PendingPermit> {
        self.held.as_mut()
    }

    /// Gives the connection's permit back: what it serves next is not a
    /// session waiting to authenticate.
    pub(crate) fn release(&mut self) {
        self.held = None;
    }

    /// A permit for a new session of the connection, from `ip`: the one it
    /// arrived with if still held, else a new one under the same limits.
    pub(crate) fn for_session(
        &mut self,
        ip: Option<IpAddr>,
    ) -> Result<PendingPermit, PendingRefusal> {
        match self.held.take() {
            Some(permit) => Ok(permit),
            None => self.slots.try_acquire(ip),
        }
    }
}

/// Why a connection got no pending slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendingRefusal {
    Listener,
    Address,
}

impl PendingRefusal {
    /// The setting that refused it, as logs name it.
    pub(crate) fn limit(self) -> &'static str {
        match self {
            PendingRefusal::Listener => "limits.max_pending",
            PendingRefusal::Address => "limits.max_pending_per_address",
        }
    }
}

impl PendingSlots {
    /// A listener's slots; `per_address` is shared by every listener.
    pub(crate) fn new(per_address: &KeyedSlots<IpAddr>, limits: &Arc<LiveLimits>) -> Self {
        PendingSlots {
            per_listener: KeyedSlots::default(),
            per_address: per_address.clone(),
            limits: limits.clone(),
        }
    }

    /// A slot for a connection from `ip` (None: a Unix-socket client, or
    /// one behind a PROXY header not yet read).
    pub(crate) fn try_acquire(&self, ip: Option<IpAddr>) -> Result<PendingPermit, PendingRefusal> {
        let listener = self
            .per_listener
            .try_acquire((), self.limits.max_pending.load(Ordering::SeqCst))
            .ok_or(PendingRefusal::Listener)?;
        let address = match ip {
            Some(ip) => Some(
                self.per_address
                    .try_acquire(
                        ip,
                        self.limits.max_pending_per_address.load(Ordering::SeqCst),
                    )
                    .ok_or(PendingRefusal::Address)?,
            ),
            // Unix-socket clients: the socket's permissions decide.
            None => None,
        };
        Ok(PendingPermit {
            _listener: listener,
            address,
            per_address: self.per_address.clone(),
            limits: self.limits.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_pending: usize, per_address: usize) -> Arc<LiveLimits> {
        let l = LiveLimits::new(&Limits::default());
        l.max_pending.store(max_pending, Ordering::SeqCst);
        l.max_pending_per_address
            .store(per_address, Ordering::SeqCst);
        Arc::new(l)
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn a_listener_share_and_an_address_cap_shared_by_listeners() {
        let per_address = KeyedSlots::default();
        let limits = limits(3, 2);
        let (one, two) = (
            PendingSlots::new(&per_address, &limits),
            PendingSlots::new(&per_address, &limits),
        );
        let a1 = one.try_acquire(Some(A)).unwrap();
        let _a2 = two.try_acquire(Some(A)).unwrap();
        assert_eq!(
            one.try_acquire(Some(A)).err(),
            Some(PendingRefusal::Address),
            "the cap per address counts every listener"
        );
        let _b = one.try_acquire(Some(B)).unwrap();
        let _unix = one.try_acquire(None).unwrap();
        assert_eq!(one.try_acquire(None).err(), Some(PendingRefusal::Listener));
        drop(a1);
        assert!(
            one.try_acquire(Some(A)).is_ok(),
            "a dropped permit frees both"
        );
        assert_eq!(PendingRefusal::Listener.limit(), "limits.max_pending");
    }

    /// An https connection: its first permit serves its first WebSocket;
    /// once given back, each later WebSocket session is counted anew.
    #[test]
    fn a_connection_counts_each_session_it_starts() {
        let per_address = KeyedSlots::default();
        let slots = Arc::new(PendingSlots::new(&per_address, &limits(10, 2)));
        let mut conn = ConnectionPending::new(slots.try_acquire(Some(A)).unwrap(), slots.clone());
        let _other = slots.try_acquire(Some(A)).unwrap();
        // The permit it arrived with serves the first session ...
        let first = conn.for_session(Some(A)).unwrap();
        // ... and the next must find a place of its own: A has none.
        assert_eq!(
            conn.for_session(Some(A)).err(),
            Some(PendingRefusal::Address)
        );
        drop(first);
        let _second = conn.for_session(Some(A)).unwrap();
        // A connection that gave its permit back holds no place.
        let mut idle = ConnectionPending::new(slots.try_acquire(Some(B)).unwrap(), slots.clone());
        idle.release();
        assert!(idle.held_mut().is_none());
        let _b1 = slots.try_acquire(Some(B)).unwrap();
        let _b2 = slots.try_acquire(Some(B)).unwrap();
    }

    #[test]
    fn a_proxy_header_moves_the_count_to_the_stated_address() {
        let per_address = KeyedSlots::default();
        let limits = limits(10, 1);
        let slots = PendingSlots::new(&per_address, &limits);
        let mut behind = slots.try_acquire(None).unwrap();
        assert!(behind.readdress(A));
        let mut again = slots.try_acquire(None).unwrap();
        assert!(!again.readdress(A), "A holds its share already");
        assert!(again.readdress(B));
        // A reload lowers or raises the limits for the next connection.
        limits.store(&Limits {
            max_pending: 2,
            ..Limits::default()
        });
        assert_eq!(
            slots.try_acquire(None).err(),
            Some(PendingRefusal::Listener)
        );
    }
}
