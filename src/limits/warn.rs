//! Log and audit lines caused by strangers, rate-limited: a flood of bad
//! connections must not become a flood of lines (13 MB of warnings in 30 s
//! was seen). Each kind of line may appear a few times per window; the rest
//! are counted, and a summary per kind is written once the window is over
//! ("1744 connections refused (bad_startup_packet) in the last 10 s").

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::MutexExt;

/// The window over which lines are counted and summarised.
pub const WINDOW: Duration = Duration::from_secs(10);

pub struct WarnLimiter {
    per_window: u32,
    kinds: Mutex<HashMap<&'static str, Counts>>,
}

#[derive(Default)]
struct Counts {
    shown: u32,
    suppressed: u64,
    since: Option<Instant>,
}

impl WarnLimiter {
    /// Allows `per_window` lines of each kind per `WINDOW`.
    pub fn new(per_window: u32) -> WarnLimiter {
        WarnLimiter {
            per_window,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this line of `kind` may be written; if not, it is counted
    /// for the next summary.
    pub fn allow(&self, kind: &'static str) -> bool {
        let mut kinds = self.kinds.locked();
        let c = kinds.entry(kind).or_default();
        let now = Instant::now();
        if c.since.is_none_or(|s| now.duration_since(s) >= WINDOW) && c.suppressed == 0 {
            c.since = Some(now);
            c.shown = 0;
        }
        if c.shown < self.per_window {
            c.shown += 1;
            true
        } else {
            c.suppressed += 1;
            false
        }
    }

    /// What was held back since the last call, per kind; the windows of
    /// those kinds start again. Called every `WINDOW`.
    pub fn take_summaries(&self) -> Vec<(&'static str, u64)> {
        let mut kinds = self.kinds.locked();
        let mut out = Vec::new();
        kinds.retain(|kind, c| {
            if c.suppressed > 0 {
                out.push((*kind, c.suppressed));
            }
            // Kinds with nothing held back and an expired window are
            // forgotten, so the map stays as small as the set of kinds.
            let keep = c.suppressed > 0 || c.since.is_some_and(|s| s.elapsed() < WINDOW);
            c.suppressed = 0;
            c.shown = 0;
            c.since = Some(Instant::now());
            keep
        });
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_per_kind_then_counted() {
        let l = WarnLimiter::new(3);
        assert_eq!((0..10).filter(|_| l.allow("bad")).count(), 3);
        assert!(l.allow("other"), "kinds are counted apart");
        assert_eq!(l.take_summaries(), vec![("bad", 7)]);
        // A new window after a summary.
        assert_eq!((0..5).filter(|_| l.allow("bad")).count(), 3);
        assert_eq!(l.take_summaries(), vec![("bad", 2)]);
        assert!(l.take_summaries().is_empty());
    }
}
