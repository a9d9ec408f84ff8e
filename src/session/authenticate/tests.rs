//! Unit tests of the auth phase over `tokio::io::duplex`: the rules
//! pgbastion enforces while the client authenticates to the server end to
//! end (passthrough), which need no PostgreSQL.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::auth::passthrough::{AuthEnd, AuthPhase, CancelContext, SessionSlot};
use crate::cancel::CancelRegistry;
use crate::limits::keyed_slots::KeyedSlots;
use crate::protocol::message;
use crate::upstream::Upstream;

fn cancel_context() -> CancelContext {
    let config = crate::config::Config::from_toml(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\nclient_tls = \"allow\"\n[[upstream]]\naddress = \"localhost:5432\"\nsystem_roots = true\n",
    )
    .unwrap();
    CancelContext {
        registry: CancelRegistry::new(10.0, 10.0, None),
        session_id: "s".into(),
        upstream: Arc::new(Upstream::new(config.upstreams[0].clone()).unwrap()),
        addr: "127.0.0.1:5432".parse().unwrap(),
    }
}

/// The auth phase's two legs: (ours to the client, the client's end),
/// (ours to the server, the server's end).
fn legs() -> ((DuplexStream, DuplexStream), (DuplexStream, DuplexStream)) {
    (tokio::io::duplex(64 * 1024), tokio::io::duplex(64 * 1024))
}

/// A SASLInitialResponse choosing `mechanism`.
fn sasl_initial(mechanism: &str, data: &[u8]) -> Vec<u8> {
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
    body.extend_from_slice(data);
    let mut out = vec![b'p'];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend(body);
    out
}

fn ready_for_query() -> Vec<u8> {
    vec![b'Z', 0, 0, 0, 5, b'I']
}

fn offer() -> Vec<u8> {
    message::authentication_sasl(&["SCRAM-SHA-256-PLUS".to_owned(), "SCRAM-SHA-256".to_owned()])
}

/// Over a plaintext client leg the server's SCRAM-SHA-256-PLUS is
/// withdrawn from the offer (libpq refuses a server that offers it
/// without TLS).
#[tokio::test]
async fn plus_is_withdrawn_from_a_plaintext_client() {
    let ((mut client_leg, mut client), (mut server_leg, mut server)) = legs();
    let mut phase = AuthPhase::new(Vec::new(), true, cancel_context());
    let running = tokio::spawn(async move {
        let r = phase.run(&mut client_leg, &mut server_leg).await;
        (r, phase)
    });
    server.write_all(&offer()).await.unwrap();
    let mut head = [0u8; 5];
    client.read_exact(&mut head).await.unwrap();
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    client.read_exact(&mut body).await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("SCRAM-SHA-256"), "{text}");
    assert!(!text.contains("PLUS"), "{text}");
    drop(client);
    let (r, _) = running.await.unwrap();
    assert!(matches!(r, Err(AuthEnd::ClientClosed)), "{r:?}");
}

/// Passthrough cannot bind the client's exchange to the server's TLS
/// channel: a client choosing -PLUS is stopped with 28000 before the
/// server sees its message.
#[tokio::test]
async fn a_client_choosing_plus_is_refused_in_passthrough() {
    let ((mut client_leg, mut client), (mut server_leg, mut server)) = legs();
    let mut phase = AuthPhase::new(Vec::new(), false, cancel_context());
    let running = tokio::spawn(async move {
        let r = phase.run(&mut client_leg, &mut server_leg).await;
        (r, phase, server_leg)
    });
    server.write_all(&offer()).await.unwrap();
    let mut offered = vec![0u8; offer().len()];
    client.read_exact(&mut offered).await.unwrap();
    assert_eq!(offered, offer(), "over TLS the offer is passed on whole");
    client
        .write_all(&sasl_initial(
            "SCRAM-SHA-256-PLUS",
            b"p=tls-server-end-point,,n=,r=abc",
        ))
        .await
        .unwrap();
    let (r, phase, server_leg) = running.await.unwrap();
    let end = r.unwrap_err();
    assert!(matches!(end, AuthEnd::ChannelBinding), "{end:?}");
    assert_eq!(end.client_error().map(|e| e.code), Some("28000"));
    assert_eq!(
        phase.mechanism.as_ref().map(|m| m.as_str()),
        Some("SCRAM-SHA-256-PLUS")
    );
    // Nothing of the client's choice reached the server.
    drop(server_leg);
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert!(got.is_empty(), "{got:?}");
}

/// Passthrough takes the session's place under `limits.max_sessions`
/// when the server says AuthenticationOk; with none left, 53300.
#[tokio::test]
async fn authentication_ok_with_no_session_place_left_is_53300() {
    let ((mut client_leg, _client), (mut server_leg, mut server)) = legs();
    let slots = KeyedSlots::default();
    let _taken = slots.try_acquire((), 1).unwrap();
    let mut phase = AuthPhase::new(Vec::new(), false, cancel_context());
    phase.session_slot = Some(SessionSlot {
        slots: slots.clone(),
        limit: 1,
        held: None,
    });
    let running = tokio::spawn(async move { phase.run(&mut client_leg, &mut server_leg).await });
    let mut ok = message::authentication_ok();
    ok.extend(ready_for_query());
    server.write_all(&ok).await.unwrap();
    let end = running.await.unwrap().unwrap_err();
    assert!(matches!(end, AuthEnd::TooManySessions(1)), "{end:?}");
    assert_eq!(end.client_error().map(|e| e.code), Some("53300"));
}

/// Trust authentication: AuthenticationOk and ReadyForQuery pass to the
/// client, the place is taken, and the phase ends at ReadyForQuery.
#[tokio::test]
async fn a_trusted_login_ends_at_ready_for_query_holding_a_place() {
    let ((mut client_leg, mut client), (mut server_leg, mut server)) = legs();
    let slots = KeyedSlots::default();
    let mut phase = AuthPhase::new(Vec::new(), false, cancel_context());
    phase.session_slot = Some(SessionSlot {
        slots: slots.clone(),
        limit: 1,
        held: None,
    });
    let mut ok = message::authentication_ok();
    ok.extend(ready_for_query());
    server.write_all(&ok).await.unwrap();
    phase.run(&mut client_leg, &mut server_leg).await.unwrap();
    assert!(phase
        .session_slot
        .as_ref()
        .is_some_and(|s| s.held.is_some()));
    assert!(slots.try_acquire((), 1).is_none(), "the place is held");
    let mut got = vec![0u8; ok.len()];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(got, ok);
}
