//! The cluster's background task: queued writes sent in batches, the
//! once-a-second PING that marks Redis up again (after rewriting what this
//! instance must have there), the periodic refresh, and the summaries of
//! warnings not logged one by one.

use std::sync::atomic::Ordering;
use std::sync::Weak;

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Cluster, Op, CHUNK, HEALTH, REFRESH};

/// Writes queued changes, PINGs, and refreshes, until the cluster is
/// dropped.
pub(super) async fn background(cluster: Weak<Cluster>, mut rx: mpsc::Receiver<Op>) {
    let mut health = tokio::time::interval(HEALTH);
    let mut refresh = tokio::time::interval(REFRESH);
    let mut summaries = tokio::time::interval(crate::limits::warn::WINDOW);
    summaries.tick().await;
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.tick().await;
    loop {
        tokio::select! {
            op = rx.recv() => {
                let Some(op) = op else { return };
                let Some(c) = cluster.upgrade() else { return };
                let mut batch = vec![op];
                while batch.len() < CHUNK {
                    match rx.try_recv() {
                        Ok(op) => batch.push(op),
                        Err(_) => break,
                    }
                }
                c.write(batch).await;
            }
            _ = health.tick() => {
                let Some(c) = cluster.upgrade() else { return };
                let pong = c.send_now::<String>("ping", &redis::cmd("PING")).await;
                if pong.is_ok() && !c.is_up() {
                    // Up only once everything is back in Redis, so a
                    // cancel is never looked up before its mapping is.
                    if c.rewrite_all().await.is_ok() {
                        c.up.store(true, Ordering::SeqCst);
                        c.metrics.cluster_up(true);
                        info!("Redis is available: cancels across instances and fleet-wide limits are on");
                    }
                }
            }
            _ = refresh.tick() => {
                let Some(c) = cluster.upgrade() else { return };
                if c.is_up() {
                    let _ = c.rewrite_all().await;
                }
            }
            _ = summaries.tick() => {
                // Also what lets a kind be logged again in the next window.
                let Some(c) = cluster.upgrade() else { return };
                for (kind, count) in c.warn.take_summaries() {
                    warn!(kind, count, "{count} more like the above ({kind}), not logged one by one");
                }
            }
        }
    }
}
