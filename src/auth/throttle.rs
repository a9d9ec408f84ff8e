//! Failed-login throttling, which only a proxy that checks passwords itself
//! can do: failures are counted per client address and per user, and once
//! either runs out, logins from that address (or for that user) are refused
//! before any exchange until the bucket refills. Successful logins cost
//! nothing and are never delayed.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Limits;
use crate::ratelimit::KeyedBuckets;

/// What ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottledBy {
    Address,
    User,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Throttled {
    pub by: ThrottledBy,
    pub retry_after: Duration,
}

pub struct LoginThrottle {
    by_address: Mutex<KeyedBuckets<Option<IpAddr>>>,
    by_user: Mutex<KeyedBuckets<String>>,
}

/// Refill rate and burst per address and per user: `n` failures per
/// window, refilled at `n / window`.
fn rates(limits: &Limits) -> ((f64, f64), (f64, f64)) {
    let window = limits
        .failed_login_window
        .as_secs_f64()
        .max(f64::MIN_POSITIVE);
    let (a, u) = (
        f64::from(limits.failed_logins_per_address),
        f64::from(limits.failed_logins_per_user),
    );
    ((a / window, a), (u / window, u))
}

impl LoginThrottle {
    /// New limits (a reload); failures counted so far still count.
    pub fn configure(&self, limits: &Limits) {
        let ((ar, ab), (ur, ub)) = rates(limits);
        self.by_address
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_rate(ar, ab);
        self.by_user
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_rate(ur, ub);
    }

    pub fn new(limits: &Limits) -> LoginThrottle {
        let ((ar, ab), (ur, ub)) = rates(limits);
        LoginThrottle {
            by_address: Mutex::new(KeyedBuckets::new(ar, ab)),
            by_user: Mutex::new(KeyedBuckets::new(ur, ub)),
        }
    }

    /// Whether a login may be tried now.
    pub fn check(&self, addr: Option<IpAddr>, user: &str) -> Result<(), Throttled> {
        let now = Instant::now();
        let wait = lock(&self.by_address).wait(&addr, now);
        if !wait.is_zero() {
            return Err(Throttled {
                by: ThrottledBy::Address,
                retry_after: wait,
            });
        }
        let wait = lock(&self.by_user).wait(&user.to_owned(), now);
        if !wait.is_zero() {
            return Err(Throttled {
                by: ThrottledBy::User,
                retry_after: wait,
            });
        }
        Ok(())
    }

    /// Counts a failed login against the address and the user.
    pub fn failed(&self, addr: Option<IpAddr>, user: &str) {
        let now = Instant::now();
        lock(&self.by_address).take(&addr, now);
        lock(&self.by_user).take(&user.to_owned(), now);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(addr: u32, user: u32) -> Limits {
        Limits {
            failed_logins_per_address: addr,
            failed_logins_per_user: user,
            failed_login_window: Duration::from_secs(60),
            ..Limits::default()
        }
    }

    #[test]
    fn address_runs_out_first_and_others_are_unaffected() {
        let t = LoginThrottle::new(&limits(3, 100));
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        for _ in 0..3 {
            assert_eq!(t.check(a, "app"), Ok(()));
            t.failed(a, "app");
        }
        let e = t.check(a, "app").unwrap_err();
        assert_eq!(e.by, ThrottledBy::Address);
        assert!(
            e.retry_after > Duration::from_secs(19) && e.retry_after <= Duration::from_secs(20)
        );
        assert_eq!(t.check(b, "app"), Ok(()), "another address");
        assert!(
            t.check(a, "other").is_err(),
            "the address is throttled for every user"
        );
    }

    #[test]
    fn user_throttle_spans_addresses() {
        let t = LoginThrottle::new(&limits(100, 2));
        t.failed(Some(IpAddr::from([10, 0, 0, 1])), "app");
        t.failed(Some(IpAddr::from([10, 0, 0, 2])), "app");
        let e = t
            .check(Some(IpAddr::from([10, 0, 0, 3])), "app")
            .unwrap_err();
        assert_eq!(e.by, ThrottledBy::User);
        assert_eq!(t.check(Some(IpAddr::from([10, 0, 0, 3])), "other"), Ok(()));
    }

    /// Issue 19 item 9: 10,050 failures with distinct user names from 1000
    /// addresses (and their checks) lifted an existing lockout.
    #[test]
    fn a_flood_of_user_names_does_not_lift_a_lockout() {
        let t = LoginThrottle::new(&limits(10_000, 3));
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        for _ in 0..3 {
            t.failed(a, "postgres");
        }
        assert_eq!(t.check(a, "postgres").unwrap_err().by, ThrottledBy::User);
        for i in 0..10_050u32 {
            let from = Some(IpAddr::from((0x0a01_0000 + i % 1000).to_be_bytes()));
            let user = format!("user{i}");
            let _ = t.check(from, &user);
            t.failed(from, &user);
        }
        assert_eq!(t.check(a, "postgres").unwrap_err().by, ThrottledBy::User);
    }
}
