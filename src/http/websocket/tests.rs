//! `WsStream` against a real client (tokio-tungstenite in the client role)
//! and against raw bytes a client could send.

use std::io;

use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;

use super::{WsLimits, WsStream, MAX_WRITE};

type Client = WebSocketStream<DuplexStream>;

async fn pair(limits: WsLimits) -> (WsStream<DuplexStream>, Client) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = WsStream::new(a, limits).await;
    let client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
    (server, client)
}

fn binary(b: &[u8]) -> Message {
    Message::Binary(Bytes::copy_from_slice(b))
}

/// Splits `data` into messages of the given sizes (cycled), sends them,
/// then closes.
async fn send_split(mut client: Client, data: Vec<u8>, sizes: Vec<usize>) -> Client {
    let mut at = 0;
    for size in sizes.iter().cycle() {
        if at >= data.len() {
            break;
        }
        let end = (at + size).min(data.len());
        client.send(binary(&data[at..end])).await.unwrap();
        at = end;
    }
    client.close(None).await.unwrap();
    client
}

/// Reads everything with reads of at most `chunk` bytes.
async fn read_all(server: &mut WsStream<DuplexStream>, chunk: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0; chunk];
    loop {
        let n = server.read(&mut buf).await?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn roundtrip(data: Vec<u8>, sizes: Vec<usize>, chunk: usize) -> Vec<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (mut server, client) = pair(WsLimits::default()).await;
        let sender = tokio::spawn(send_split(client, data, sizes));
        let got = read_all(&mut server, chunk).await.unwrap();
        sender.await.unwrap();
        got
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Message boundaries mean nothing: any split reads back as the stream.
    #[test]
    fn any_split_reads_back(
        data in proptest::collection::vec(any::<u8>(), 0..20_000),
        sizes in proptest::collection::vec(1usize..3000, 1..20),
        chunk in 1usize..9000,
    ) {
        prop_assert_eq!(roundtrip(data.clone(), sizes, chunk), data);
    }
}

#[test]
fn large_messages_read_back() {
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        roundtrip(data.clone(), vec![3_000_000, 1, 70_000], 64 * 1024),
        data
    );
    assert_eq!(roundtrip(data.clone(), vec![data.len()], 8192), data);
}

#[tokio::test]
async fn writes_arrive_in_order_as_binary_messages() {
    let (mut server, mut client) = pair(WsLimits::default()).await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let expect = data.clone();
    let writer = tokio::spawn(async move {
        server.write_all(&data[..5]).await.unwrap();
        server.flush().await.unwrap();
        server.write_all(&data[5..]).await.unwrap();
        server.flush().await.unwrap();
        server.shutdown().await.unwrap();
        server
    });
    let mut got = Vec::new();
    let mut first = true;
    while let Some(msg) = client.next().await {
        match msg.unwrap() {
            Message::Binary(b) => {
                assert!(b.len() <= MAX_WRITE);
                if first {
                    assert_eq!(&b[..], &expect[..5], "one write, one message");
                    first = false;
                }
                got.extend_from_slice(&b);
            }
            Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Normal),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, expect);
    let mut server = writer.await.unwrap();
    let err = server.write(b"x").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
}

#[tokio::test]
async fn vectored_write_is_one_message() {
    let (mut server, mut client) = pair(WsLimits::default()).await;
    let bufs = [
        io::IoSlice::new(b"Q\0\0\0"),
        io::IoSlice::new(b"\x0aSELECT 1\0"),
    ];
    let n = server.write_vectored(&bufs).await.unwrap();
    assert_eq!(n, 14);
    server.flush().await.unwrap();
    let msg = client.next().await.unwrap().unwrap();
    assert_eq!(msg, binary(b"Q\0\0\0\x0aSELECT 1\0"));
}

#[tokio::test]
async fn text_message_is_invalid_data() {
    let (mut server, mut client) = pair(WsLimits::default()).await;
    client.send(binary(b"ok")).await.unwrap();
    client.send(Message::text("SELECT 1")).await.unwrap();
    let mut buf = [0; 16];
    assert_eq!(server.read(&mut buf).await.unwrap(), 2);
    let err = server.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("text"), "{err}");
}

#[tokio::test]
async fn ping_is_answered_while_the_server_only_reads() {
    let (mut server, mut client) = pair(WsLimits::default()).await;
    let reader = tokio::spawn(async move {
        let mut buf = [0; 16];
        let n = server.read(&mut buf).await.unwrap();
        buf[..n].to_vec()
    });
    client
        .send(Message::Ping(Bytes::from_static(b"hb")))
        .await
        .unwrap();
    client
        .send(Message::Pong(Bytes::from_static(b"unasked")))
        .await
        .unwrap();
    let msg = tokio::time::timeout(std::time::Duration::from_secs(5), client.next())
        .await
        .expect("pong in time")
        .unwrap()
        .unwrap();
    assert_eq!(msg, Message::Pong(Bytes::from_static(b"hb")));
    client.send(binary(b"after")).await.unwrap();
    assert_eq!(reader.await.unwrap(), b"after");
}

#[tokio::test]
async fn close_is_eof_then_writes_fail() {
    let (mut server, mut client) = pair(WsLimits::default()).await;
    client.send(binary(b"last")).await.unwrap();
    client.close(None).await.unwrap();
    assert_eq!(read_all(&mut server, 3).await.unwrap(), b"last");
    let mut buf = [0; 4];
    assert_eq!(server.read(&mut buf).await.unwrap(), 0, "EOF stays EOF");
    let err = server.write(b"x").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    // The client saw the Close reply, then the end.
    match client.next().await {
        None | Some(Ok(Message::Close(_))) => {}
        other => panic!("unexpected {other:?}"),
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn client_eof_without_close_is_eof() {
    let (mut server, mut client) = pair(WsLimits::default()).await;
    client.send(binary(b"bye")).await.unwrap();
    drop(client);
    assert_eq!(read_all(&mut server, 64).await.unwrap(), b"bye");
}

#[tokio::test]
async fn over_limit_message_is_an_error() {
    let limits = WsLimits { max_message: 1024 };
    let (mut server, mut client) = pair(limits).await;
    client.send(binary(&[7; 1024])).await.unwrap();
    client.send(binary(&[7; 1025])).await.unwrap();
    let mut buf = vec![0; 4096];
    assert_eq!(server.read(&mut buf).await.unwrap(), 1024);
    let err = server.read(&mut buf).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert_eq!(
        server.read(&mut buf).await.unwrap(),
        0,
        "the connection is over"
    );
}

/// One frame as a client writes it: FIN, `opcode`, masked with a fixed
/// key when `mask` (the payload is short: under 126 bytes).
fn raw_frame(first: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    assert!(payload.len() < 126);
    let key = [1u8, 2, 3, 4];
    let mut out = vec![first, payload.len() as u8 | if mask { 0x80 } else { 0 }];
    if mask {
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

async fn read_raw(bytes: Vec<u8>) -> io::Result<Vec<u8>> {
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    let mut server = WsStream::new(a, WsLimits::default()).await;
    b.write_all(&bytes).await?;
    b.shutdown().await?;
    read_all(&mut server, 1024).await
}

#[tokio::test]
async fn fragmented_message_reads_as_its_bytes() {
    let mut raw = raw_frame(0x02, b"ab", true); // binary, not FIN
    raw.extend(raw_frame(0x89, b"p", true)); // a ping between fragments
    raw.extend(raw_frame(0x80, b"cd", true)); // continuation, FIN
    raw.extend(raw_frame(0x88, &1000u16.to_be_bytes(), true)); // close
    assert_eq!(read_raw(raw).await.unwrap(), b"abcd");
}

#[tokio::test]
async fn what_a_client_must_not_send_is_invalid_data() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked", raw_frame(0x82, b"x", false)),
        ("reserved bit", raw_frame(0xc2, b"x", true)),
        ("reserved opcode", raw_frame(0x83, b"x", true)),
        ("one-byte close", raw_frame(0x88, b"x", true)),
        (
            "close reason not UTF-8",
            raw_frame(0x88, b"\x03\xe8\xff", true),
        ),
        ("text not UTF-8", raw_frame(0x81, b"\xff", true)),
        ("lone continuation", raw_frame(0x80, b"x", true)),
        ("fragmented ping", raw_frame(0x09, b"x", true)),
    ];
    for (what, raw) in cases {
        let err = match read_raw(raw).await {
            Ok(got) => panic!("{what}: read {got:?}"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}: {err}");
    }
}

#[tokio::test]
async fn close_with_a_forbidden_code_is_still_a_close() {
    // tungstenite replies 1002 (protocol error); the stream just ends.
    let mut raw = raw_frame(0x82, b"data", true);
    raw.extend(raw_frame(0x88, &999u16.to_be_bytes(), true));
    assert_eq!(read_raw(raw).await.unwrap(), b"data");
}

#[tokio::test]
async fn truncated_frame_ends_the_stream_without_panic() {
    let mut raw = raw_frame(0x82, b"whole", true);
    raw.extend(&raw_frame(0x82, b"cut short", true)[..8]);
    assert_eq!(read_raw(raw).await.unwrap(), b"whole");
    // A 64-bit length over the limit is refused before anything is read.
    let mut huge = vec![0x82, 0xff];
    huge.extend(u64::MAX.to_be_bytes());
    huge.extend([1, 2, 3, 4]);
    let err = read_raw(huge).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
}
