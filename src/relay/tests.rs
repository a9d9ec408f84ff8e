//! The relay's tests: copying, ends, shutdown, KILL, the server view.

use super::*;
use tokio::io::{duplex, AsyncReadExt};
use tokio::sync::watch;

/// A shutdown signal that never fires.
fn running() -> watch::Receiver<ShutdownPhase> {
    let (tx, rx) = watch::channel(ShutdownPhase::Running);
    std::mem::forget(tx);
    rx
}

type Far = tokio::io::DuplexStream;

/// A relay between two in-memory pipes; returns the client's far end,
/// the server's far end, and the relay's task.
fn spawn_relay(
    half_close: Duration,
    shutdown: watch::Receiver<ShutdownPhase>,
) -> (Far, Far, tokio::task::JoinHandle<(RelayEnd, ByteCounts)>) {
    // Nobody will KILL these sessions: the sender is gone at once.
    spawn_killable_relay(half_close, shutdown, watch::channel(false).1)
}

fn spawn_killable_relay(
    half_close: Duration,
    mut shutdown: watch::Receiver<ShutdownPhase>,
    mut kill: watch::Receiver<bool>,
) -> (Far, Far, tokio::task::JoinHandle<(RelayEnd, ByteCounts)>) {
    let (client_far, mut client_near) = duplex(1024);
    let (mut server_near, server_far) = duplex(1024);
    let task = tokio::spawn(async move {
        relay(
            &mut client_near,
            &mut server_near,
            half_close,
            &mut shutdown,
            &mut kill,
            &Progress::default(),
            None,
        )
        .await
    });
    (client_far, server_far, task)
}

#[tokio::test]
async fn kill_ends_a_session_with_its_own_message() {
    let (kill_tx, kill) = watch::channel(false);
    let (mut client_far, _server_far, task) =
        spawn_killable_relay(Duration::from_secs(5), running(), kill);
    kill_tx.send_replace(true);
    let (end, _) = task.await.unwrap();
    assert_eq!(end, RelayEnd::Killed);
    let mut got = Vec::new();
    client_far.read_to_end(&mut got).await.unwrap();
    let fields = crate::protocol::message::ErrorFields::parse(&got[5..]).unwrap();
    assert_eq!(fields.code, "57P01");
    assert!(
        fields.message.contains("administrator"),
        "{}",
        fields.message
    );
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    crate::protocol::message::build(tag, body)
}

#[test]
fn the_server_view_knows_when_the_session_is_idle() {
    let mut stream = msg(b'D', b"row data");
    stream.extend(msg(b'C', b"SELECT 1\0"));
    stream.extend(msg(b'Z', b"I"));
    for split in 0..stream.len() {
        let mut v = ServerView::default();
        v.advance(&stream[..split]);
        v.advance(&stream[split..]);
        assert!(v.at_boundary() && v.idle(), "split at {split}");
    }
    let mut v = ServerView::default();
    v.advance(&msg(b'Z', b"T"));
    assert!(v.at_boundary() && !v.idle(), "in a transaction is not idle");
    v.advance(&msg(b'Z', b"I")[..3]);
    assert!(!v.at_boundary() && !v.idle());
    let mut v = ServerView {
        ready_idle: true,
        ..ServerView::default()
    };
    v.advance(&msg(b'N', b"notice")[..3]);
    assert!(!v.idle(), "a message under way is not idle");
}

#[tokio::test]
async fn shutdown_ends_an_idle_session_at_once_and_a_busy_one_when_idle() {
    let (tx, rx) = watch::channel(ShutdownPhase::Running);
    let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_secs(5), rx);
    // Busy: the client asked something the server has not answered.
    server_far.write_all(&msg(b'Z', b"I")).await.unwrap();
    let mut rfq = [0u8; 6];
    client_far.read_exact(&mut rfq).await.unwrap();
    client_far
        .write_all(&msg(b'Q', b"select 1\0"))
        .await
        .unwrap();
    let mut q = [0u8; 14];
    server_far.read_exact(&mut q).await.unwrap();
    tx.send_replace(ShutdownPhase::Draining);
    // The answer completes the transaction: now the session ends.
    let mut answer = msg(b'C', b"SELECT 1\0");
    answer.extend(msg(b'Z', b"I"));
    server_far.write_all(&answer).await.unwrap();
    let (end, _) = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("ends once idle")
        .unwrap();
    assert_eq!(end, RelayEnd::Shutdown);
    let mut got = Vec::new();
    client_far.read_to_end(&mut got).await.unwrap();
    assert!(got.starts_with(&answer), "the answer first");
    let fields = crate::protocol::message::ErrorFields::parse(&got[answer.len() + 5..]).unwrap();
    assert_eq!(fields.code, "57P01");
    let mut to_server = Vec::new();
    server_far.read_to_end(&mut to_server).await.unwrap();
    assert_eq!(to_server, TERMINATE, "a clean end for the server");
}

#[tokio::test]
async fn shutdown_now_ends_a_busy_session() {
    let (tx, rx) = watch::channel(ShutdownPhase::Running);
    let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_secs(5), rx);
    client_far
        .write_all(&msg(b'Q', b"select pg_sleep(60)\0"))
        .await
        .unwrap();
    let mut q = [0u8; 25];
    server_far.read_exact(&mut q).await.unwrap();
    tx.send_replace(ShutdownPhase::Draining);
    tx.send_replace(ShutdownPhase::Now);
    let (end, _) = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("ends at once")
        .unwrap();
    assert_eq!(end, RelayEnd::Shutdown);
    let mut got = Vec::new();
    client_far.read_to_end(&mut got).await.unwrap();
    assert_eq!(got[0], b'E');
    let mut to_server = Vec::new();
    server_far.read_to_end(&mut to_server).await.unwrap();
    assert!(
        to_server.is_empty(),
        "no Terminate in the middle of a query"
    );
}

#[tokio::test]
async fn copies_both_ways_and_ends_when_one_side_closes() {
    let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_secs(5), running());

    client_far.write_all(b"query").await.unwrap();
    let mut got = [0u8; 5];
    server_far.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"query");

    server_far.write_all(b"result!").await.unwrap();
    let mut got = [0u8; 7];
    client_far.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"result!");

    // The server goes away: the client must see EOF, even though the
    // client never closes its side.
    drop(server_far);
    let mut rest = Vec::new();
    client_far.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let (end, counts) = task.await.unwrap();
    assert_eq!(end, RelayEnd::ServerClosed);
    assert_eq!(
        counts,
        ByteCounts {
            client_to_server: 5,
            server_to_client: 7
        }
    );
}

#[tokio::test]
async fn a_half_closed_client_still_gets_the_reply() {
    let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_secs(5), running());
    client_far.write_all(b"query").await.unwrap();
    client_far.shutdown().await.unwrap();
    // The server gets the query, then the client's EOF...
    let mut got = Vec::new();
    server_far.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"query");
    // ...and its reply still reaches the client.
    server_far.write_all(b"reply").await.unwrap();
    drop(server_far);
    let mut reply = Vec::new();
    client_far.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"reply");
    let (end, counts) = task.await.unwrap();
    assert_eq!(end, RelayEnd::ClientClosed);
    assert_eq!(counts.server_to_client, 5);
}

#[tokio::test]
async fn a_half_closed_session_ends_at_the_deadline() {
    let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_millis(200), running());
    client_far.shutdown().await.unwrap();
    // The server never answers nor closes: the relay ends anyway.
    let (end, _) = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("ended by the half-close deadline")
        .unwrap();
    assert_eq!(end, RelayEnd::ClientClosed);
    let mut rest = Vec::new();
    client_far.read_to_end(&mut rest).await.unwrap();
    let mut got = Vec::new();
    server_far.read_to_end(&mut got).await.unwrap();
}

#[tokio::test]
async fn a_server_closing_after_terminate_is_the_client_ending() {
    let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_secs(5), running());
    // The client sends Terminate but its FIN has not arrived yet when
    // the server, having read the Terminate, closes.
    client_far.write_all(&TERMINATE).await.unwrap();
    let mut got = [0u8; 5];
    server_far.read_exact(&mut got).await.unwrap();
    drop(server_far);
    let (end, _) = task.await.unwrap();
    assert_eq!(end, RelayEnd::ClientClosed);
    drop(client_far);
}

#[tokio::test]
async fn large_transfer_is_complete() {
    let (mut client_far, mut server_far, task) = spawn_relay(Duration::from_secs(5), running());
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        server_far.write_all(&data).await.unwrap();
        server_far.shutdown().await.unwrap();
        server_far
    });
    let mut got = Vec::new();
    client_far.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, expected);
    let _ = writer.await.unwrap();
    let (end, counts) = task.await.unwrap();
    assert_eq!(end, RelayEnd::ServerClosed);
    assert_eq!(counts.server_to_client, 1_000_000);
}
