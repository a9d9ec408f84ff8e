//! Cleaning a server connection a session still held when it ended, so
//! nothing of one client reaches the next (or closing it when it cannot
//! be cleaned).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{engine, Lease, ServerConn};

/// How long cleaning a connection a session left may take.
const CLEAN_TIMEOUT: Duration = Duration::from_secs(5);

/// Cleans a connection a session still held when it ended (session mode,
/// a pinned client, a transaction left open) and gives it back: ROLLBACK
/// if a transaction is open, DISCARD ALL if the client may have left
/// state on it. A connection that is mid-protocol, or whose cleaning
/// fails, is closed instead: nothing of one client ever reaches another.
pub(crate) async fn clean_and_return(mut lease: Lease, engine: &engine::Engine) {
    // A loaded library cannot be unloaded (DISCARD ALL leaves it): such a
    // connection is closed.
    let loaded = engine.pinned == Some(crate::audit::PinReason::Load);
    if !engine.nothing_in_flight() || engine.mid_protocol() || loaded {
        return;
    }
    let mut queries = Vec::new();
    if engine.status != b'I' {
        queries.push("ROLLBACK");
    }
    let discard = engine.pinned.is_some() || engine.mode == crate::config::PoolMode::Session;
    if discard {
        queries.push("DISCARD ALL");
    }
    if queries.is_empty() {
        return lease.give_back();
    }
    let conn = lease.conn();
    let cleaned = tokio::time::timeout(CLEAN_TIMEOUT, run_queries(conn, &queries)).await;
    if !matches!(cleaned, Ok(Ok(()))) {
        return;
    }
    // What the client set (or a rolled-back transaction kept) is not
    // known any more: the next client gets a full switch.
    conn.state.applied = None;
    if discard {
        conn.state.statements.clear();
        lease.pool.stats.resets.fetch_add(1, Ordering::Relaxed);
    }
    lease.give_back();
}

/// Runs simple queries of pgbastion's own; Ok when each ended in
/// ReadyForQuery without an error and the last left no transaction.
async fn run_queries(conn: &mut ServerConn, queries: &[&str]) -> Result<(), ()> {
    use tokio::io::AsyncWriteExt;
    let mut out = Vec::new();
    for q in queries {
        let mut body = q.as_bytes().to_vec();
        body.push(0);
        out.extend(crate::protocol::message::build(b'Q', &body));
    }
    conn.stream.write_all(&out).await.map_err(|_| ())?;
    conn.stream.flush().await.map_err(|_| ())?;
    let mut buf = std::mem::take(&mut conn.buf);
    let mut ready = 0;
    let mut failed = false;
    while ready < queries.len() {
        let (t, body) = crate::auth::wire::read_message(&mut conn.stream, &mut buf, 1 << 20)
            .await
            .map_err(|_| ())?;
        match t {
            b'E' => failed = true,
            b'Z' => {
                ready += 1;
                if ready == queries.len() && body.first() != Some(&b'I') {
                    failed = true;
                }
            }
            _ => {}
        }
    }
    conn.buf = buf;
    if failed || !conn.buf.is_empty() {
        return Err(());
    }
    Ok(())
}
