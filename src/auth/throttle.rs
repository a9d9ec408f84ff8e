//! Failed-login throttling, which only a proxy that checks passwords itself
//! can do: failures are counted per client address and per user, and once
//! either runs out, logins from that address (or for that user) are refused
//! before any exchange until the bucket refills. Successful logins cost
//! nothing and are never delayed.
//!
//! The per-user budget is spent by whoever guesses, so strangers could keep
//! any user locked out with a failure every few seconds from a few
//! addresses. Unless `limits.failed_logins_per_user_strict` is set, a user
//! whose budget is spent may still log in from an address with no recent
//! failure, with a correct proof only: such an address gets the exchange,
//! and a wrong proof is refused as throttled (and makes the address
//! unclean). Guessing a locked-out user's password then costs an address
//! with a clean record per guess.
//!
//! "No recent failure" means none within `failed_login_window`, the window
//! the per-user budget is counted over, not "the address's bucket has
//! refilled": that bucket refills one failure in `window / n` (6 s by
//! default), which let three addresses make fifteen guesses in 26 s against
//! a locked-out user (issue 19 adversarial M2). Per address, a locked-out
//! user's password can be guessed at most once per window.

use crate::sync::MutexExt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Limits;
use crate::limits::buckets::KeyedBuckets;

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

/// A login that may go ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginCheck {
    Open,
    /// The user's budget is spent, but the address has no recent failure:
    /// only a correct proof passes; anything else is refused as this.
    ProofOnly(Throttled),
}

/// The per-user decision once the address is known not to be throttled:
/// `user_wait` until the user has a token, `clean` if the address has its
/// whole budget.
pub fn user_admission(
    user_wait: Duration,
    clean: bool,
    strict: bool,
) -> Result<LoginCheck, Throttled> {
    if user_wait.is_zero() {
        return Ok(LoginCheck::Open);
    }
    let throttled = Throttled {
        by: ThrottledBy::User,
        retry_after: user_wait,
    };
    if clean && !strict {
        Ok(LoginCheck::ProofOnly(throttled))
    } else {
        Err(throttled)
    }
}

pub struct LoginThrottle {
    by_address: Mutex<KeyedBuckets<Option<IpAddr>>>,
    /// One token per address, refilled over a whole window: full exactly
    /// when the address's last failure is older than the window (a clean
    /// record). Its eviction rules keep every address that failed within
    /// the window; once 10,000 have, new addresses share one bucket, which
    /// fails closed (not clean).
    recent_failure: Mutex<KeyedBuckets<Option<IpAddr>>>,
    by_user: Mutex<KeyedBuckets<String>>,
    ipv6_prefix: AtomicU8,
    strict: AtomicBool,
}

/// What an address is counted as by the per-address limits: itself, or
/// for IPv6 its network of `ipv6_prefix` bits (one host usually holds a
/// whole /64, so counting single addresses would give it 2^64 budgets).
/// Addresses are canonical already (an IPv4-mapped address is IPv4).
pub fn address_key(addr: Option<IpAddr>, ipv6_prefix: u8) -> Option<IpAddr> {
    match addr? {
        IpAddr::V6(v6) => {
            let net = ipnet::Ipv6Net::new(v6, ipv6_prefix.min(128)).ok()?;
            Some(IpAddr::V6(net.network()))
        }
        v4 => Some(v4),
    }
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

/// Refill rate and burst of the clean-record table: one failure per window.
fn clean_rate(limits: &Limits) -> (f64, f64) {
    let window = limits
        .failed_login_window
        .as_secs_f64()
        .max(f64::MIN_POSITIVE);
    (1.0 / window, 1.0)
}

impl LoginThrottle {
    /// New limits (a reload); failures counted so far still count.
    pub fn configure(&self, limits: &Limits) {
        let ((ar, ab), (ur, ub)) = rates(limits);
        self.by_address.locked().set_rate(ar, ab);
        self.by_user.locked().set_rate(ur, ub);
        let (cr, cb) = clean_rate(limits);
        lock(&self.recent_failure).set_rate(cr, cb);
        self.ipv6_prefix
            .store(limits.ipv6_prefix, Ordering::Relaxed);
        self.strict
            .store(limits.failed_logins_per_user_strict, Ordering::Relaxed);
    }

    fn key(&self, addr: Option<IpAddr>) -> Option<IpAddr> {
        address_key(addr, self.ipv6_prefix.load(Ordering::Relaxed))
    }

    pub fn new(limits: &Limits) -> LoginThrottle {
        let ((ar, ab), (ur, ub)) = rates(limits);
        let (cr, cb) = clean_rate(limits);
        LoginThrottle {
            by_address: Mutex::new(KeyedBuckets::new(ar, ab)),
            recent_failure: Mutex::new(KeyedBuckets::new(cr, cb)),
            by_user: Mutex::new(KeyedBuckets::new(ur, ub)),
            ipv6_prefix: AtomicU8::new(limits.ipv6_prefix),
            strict: AtomicBool::new(limits.failed_logins_per_user_strict),
        }
    }

    /// Whether a login may be tried now, and how.
    pub fn check(&self, addr: Option<IpAddr>, user: &str) -> Result<LoginCheck, Throttled> {
        self.check_at(addr, user, Instant::now())
    }

    fn check_at(
        &self,
        addr: Option<IpAddr>,
        user: &str,
        now: Instant,
    ) -> Result<LoginCheck, Throttled> {
        let addr = self.key(addr);
        let wait = lock(&self.by_address).wait(&addr, now);
        if !wait.is_zero() {
            return Err(Throttled {
                by: ThrottledBy::Address,
                retry_after: wait,
            });
        }
        let wait = lock(&self.by_user).wait(&user.to_owned(), now);
        if wait.is_zero() {
            return Ok(LoginCheck::Open);
        }
        let clean = lock(&self.recent_failure).is_untouched(&addr, now);
        user_admission(wait, clean, self.strict.load(Ordering::Relaxed))
    }

    /// Counts a failed login against the address and the user.
    pub fn failed(&self, addr: Option<IpAddr>, user: &str) {
        self.failed_at(addr, user, Instant::now());
    }

    fn failed_at(&self, addr: Option<IpAddr>, user: &str, now: Instant) {
        let addr = self.key(addr);
        lock(&self.by_address).take(&addr, now);
        lock(&self.recent_failure).take(&addr, now);
        lock(&self.by_user).take(&user.to_owned(), now);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.locked()
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
            assert_eq!(t.check(a, "app"), Ok(LoginCheck::Open));
            t.failed(a, "app");
        }
        let e = t.check(a, "app").unwrap_err();
        assert_eq!(e.by, ThrottledBy::Address);
        assert!(
            e.retry_after > Duration::from_secs(19) && e.retry_after <= Duration::from_secs(20)
        );
        assert_eq!(t.check(b, "app"), Ok(LoginCheck::Open), "another address");
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
            .check(Some(IpAddr::from([10, 0, 0, 2])), "app")
            .unwrap_err();
        assert_eq!(e.by, ThrottledBy::User);
        assert_eq!(
            t.check(Some(IpAddr::from([10, 0, 0, 3])), "other"),
            Ok(LoginCheck::Open)
        );
    }

    /// Issue 19 item 9: 10,050 failures with distinct user names from 1000
    /// addresses (and their checks) lifted an existing lockout.
    #[test]
    fn a_flood_of_user_names_does_not_lift_a_lockout() {
        // Strict: the lockout itself is under test, not which addresses
        // a spent user budget still admits.
        let t = LoginThrottle::new(&Limits {
            failed_logins_per_user_strict: true,
            ..limits(10_000, 3)
        });
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

    /// Issue 19 item 3: one host's /64 shares one budget (configurable).
    #[test]
    fn ipv6_clients_are_counted_per_network() {
        let t = LoginThrottle::new(&limits(2, 100));
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        t.failed(ip("2001:db8:1:2::1"), "app");
        t.failed(ip("2001:db8:1:2:ffff::9"), "app");
        let e = t.check(ip("2001:db8:1:2::77"), "other").unwrap_err();
        assert_eq!(e.by, ThrottledBy::Address);
        assert_eq!(
            t.check(ip("2001:db8:1:3::1"), "other"),
            Ok(LoginCheck::Open)
        );
        let mut per_host = limits(2, 100);
        per_host.ipv6_prefix = 128;
        t.configure(&per_host);
        assert_eq!(
            t.check(ip("2001:db8:1:2::77"), "other"),
            Ok(LoginCheck::Open)
        );
        assert_eq!(address_key(ip("10.1.2.3"), 64), ip("10.1.2.3"));
        assert_eq!(address_key(ip("2001:db8::1"), 48), ip("2001:db8::"));
    }

    /// Issue 19 "also decide": strangers spending a user's budget do not
    /// lock the user out of an address with a clean record (a correct
    /// proof only); with `failed_logins_per_user_strict` they do.
    #[test]
    fn a_spent_user_budget_still_admits_a_proof_from_a_clean_address() {
        let t = LoginThrottle::new(&limits(100, 2));
        let stranger = Some(IpAddr::from([10, 0, 0, 1]));
        let owner = Some(IpAddr::from([10, 0, 0, 9]));
        t.failed(stranger, "postgres");
        t.failed(stranger, "postgres");
        assert_eq!(
            t.check(stranger, "postgres").unwrap_err().by,
            ThrottledBy::User
        );
        assert!(matches!(
            t.check(owner, "postgres"),
            Ok(LoginCheck::ProofOnly(Throttled {
                by: ThrottledBy::User,
                ..
            }))
        ));
        // A wrong proof from there spends the address's record.
        t.failed(owner, "postgres");
        assert_eq!(
            t.check(owner, "postgres").unwrap_err().by,
            ThrottledBy::User
        );
        let mut strict = limits(100, 2);
        strict.failed_logins_per_user_strict = true;
        t.configure(&strict);
        let fresh = Some(IpAddr::from([10, 0, 0, 10]));
        assert_eq!(
            t.check(fresh, "postgres").unwrap_err().by,
            ThrottledBy::User
        );
    }

    /// Issue 19 adversarial M2: with the default per-address budget (ten a
    /// minute) an address's bucket is full again 6 s after a failure, and
    /// that counted as a clean record: three addresses got fifteen guesses
    /// in 26 s against a locked-out user. Now an address is clean only once
    /// its last failure is a whole window old.
    #[test]
    fn a_locked_out_user_gets_one_guess_per_address_per_window() {
        let t = LoginThrottle::new(&limits(10, 3));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let attackers: Vec<_> = (1..=3u8)
            .map(|i| Some(IpAddr::from([10, 0, 0, i])))
            .collect();
        let spender = Some(IpAddr::from([10, 9, 9, 9]));
        // Someone keeps the user's budget spent all along.
        let keep_spent = |now: Instant| {
            while lock(&t.by_user).wait(&"app".to_owned(), now).is_zero() {
                t.failed_at(spender, "app", now);
            }
        };
        let mut guesses = 0;
        let mut last = t0;
        for s in 0..110 {
            let now = at(s);
            keep_spent(now);
            for &a in &attackers {
                match t.check_at(a, "app", now) {
                    Ok(LoginCheck::ProofOnly(_)) => {
                        guesses += 1;
                        last = now;
                        t.failed_at(a, "app", now);
                    }
                    Ok(LoginCheck::Open) => panic!("the user is locked out"),
                    Err(e) => assert_eq!(e.by, ThrottledBy::User),
                }
            }
        }
        // At second 0, and a window later, from each address.
        assert_eq!(guesses, 6, "one guess per address per window");
        let a = attackers[2];
        let almost = last + Duration::from_secs(59);
        keep_spent(almost);
        assert_eq!(
            t.check_at(a, "app", almost).unwrap_err().by,
            ThrottledBy::User
        );
        let after = last + Duration::from_millis(60_001);
        keep_spent(after);
        assert!(matches!(
            t.check_at(a, "app", after),
            Ok(LoginCheck::ProofOnly(_))
        ));
    }
}
