//! The client against a scripted fake server over `tokio::io::duplex`.

use tokio::io::{AsyncReadExt, DuplexStream};

use super::*;
use crate::protocol::startup::{self, StartupPacket};

fn params() -> StartupParams {
    StartupParams {
        user: "alice".into(),
        database: "db".into(),
        options: Some("-c search_path=x".into()),
        application_name: Some("app".into()),
    }
}

fn auth(code: u32) -> Vec<u8> {
    message::build(tag::AUTHENTICATION, &code.to_be_bytes())
}

fn ready(status: u8) -> Vec<u8> {
    message::build(tag::READY_FOR_QUERY, &[status])
}

fn row_description(cols: &[(&str, u32)]) -> Vec<u8> {
    let mut body = (cols.len() as u16).to_be_bytes().to_vec();
    for (i, (name, oid)) in cols.iter().enumerate() {
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(&16384u32.to_be_bytes());
        body.extend_from_slice(&(i as i16 + 1).to_be_bytes());
        body.extend_from_slice(&oid.to_be_bytes());
        body.extend_from_slice(&(-1i16).to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
    }
    message::build(b'T', &body)
}

fn data_row(values: &[Option<&str>]) -> Vec<u8> {
    let mut body = (values.len() as u16).to_be_bytes().to_vec();
    for v in values {
        match v {
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                body.extend_from_slice(v.as_bytes());
            }
        }
    }
    message::build(tag::DATA_ROW, &body)
}

fn command_complete(t: &str) -> Vec<u8> {
    message::build(b'C', format!("{t}\0").as_bytes())
}

fn error_response(code: &str, msg: &str) -> Vec<u8> {
    message::build(
        tag::ERROR_RESPONSE,
        format!("SERROR\0VERROR\0C{code}\0M{msg}\0P9\0\0").as_bytes(),
    )
}

/// Reads the StartupMessage and the PasswordMessage, checks them, and
/// answers a successful login.
async fn serve_login(server: &mut DuplexStream, buf: &mut Vec<u8>) {
    let mut len = [0u8; 4];
    server.read_exact(&mut len).await.unwrap();
    let n = u32::from_be_bytes(len) as usize;
    let mut packet = len.to_vec();
    packet.resize(n, 0);
    server.read_exact(&mut packet[4..]).await.unwrap();
    let StartupPacket::Startup(m) = startup::parse(&packet).unwrap() else {
        panic!("not a StartupMessage");
    };
    assert_eq!(m.user(), "alice");
    assert_eq!(m.database(), "db");
    assert_eq!(m.param("options"), Some("-c search_path=x"));
    assert_eq!(m.application_name(), Some("app"));
    assert_eq!(m.param("client_encoding"), Some("UTF8"));
    let (t, body) = wire::read_message(server, buf, 1 << 16).await.unwrap();
    assert_eq!((t, body.as_slice()), (tag::PASSWORD, &b"pw\0"[..]));
    let mut out = auth(AUTH_CLEARTEXT);
    out.extend(auth(0));
    out.extend(message::build(
        tag::PARAMETER_STATUS,
        b"server_version\x0017\0",
    ));
    out.extend(message::build(
        tag::BACKEND_KEY_DATA,
        &[0, 0, 0, 7, 1, 2, 3, 4],
    ));
    out.extend(message::build(tag::NOTICE_RESPONSE, b"SNOTICE\0Mhi\0\0"));
    out.extend(ready(b'I'));
    wire::send(server, &out).await.unwrap();
}

/// Reads frontend messages up to and including Sync (or a Query), and
/// returns their tags.
async fn read_until_sync(server: &mut DuplexStream, buf: &mut Vec<u8>) -> Vec<u8> {
    let mut tags = Vec::new();
    loop {
        let (t, _) = wire::read_message(server, buf, 1 << 20).await.unwrap();
        tags.push(t);
        if t == b'S' || t == b'Q' {
            return tags;
        }
    }
}

async fn logged_in(limits: Limits) -> (Client<DuplexStream>, DuplexStream, Vec<u8>) {
    let (client_io, mut server) = tokio::io::duplex(1 << 16);
    let mut buf = Vec::new();
    let startup = params();
    let (client, ()) = tokio::join!(
        connect(client_io, &startup, b"pw", limits),
        serve_login(&mut server, &mut buf)
    );
    (client.unwrap(), server, buf)
}

#[tokio::test]
async fn login_keeps_the_cancel_key() {
    let (client, _server, _) = logged_in(Limits::default()).await;
    let key = client.backend_key().unwrap();
    assert_eq!(key.process_id, 7);
    assert_eq!(key.secret_key, vec![1, 2, 3, 4]);
    assert_eq!(client.transaction_status(), TransactionStatus::Idle);
}

#[tokio::test]
async fn login_refused() {
    let (client_io, mut server) = tokio::io::duplex(1 << 16);
    let serve = async {
        let mut buf = vec![0u8; 256];
        let _ = server.read(&mut buf).await.unwrap();
        let mut out = auth(AUTH_CLEARTEXT);
        out.extend(error_response("28P01", "password authentication failed"));
        wire::send(&mut server, &out).await.unwrap();
    };
    let startup = params();
    let (r, ()) = tokio::join!(
        connect(client_io, &startup, b"pw", Limits::default()),
        serve
    );
    match r {
        Err(ClientError::Server(e)) => {
            assert_eq!(e.code, "28P01");
            assert_eq!(e.message, "password authentication failed");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn login_other_method_refused() {
    let (client_io, mut server) = tokio::io::duplex(1 << 16);
    let serve = async {
        let mut buf = vec![0u8; 256];
        let _ = server.read(&mut buf).await.unwrap();
        let md5 = message::build(tag::AUTHENTICATION, &[0, 0, 0, 5, 1, 2, 3, 4]);
        wire::send(&mut server, &md5).await.unwrap();
    };
    let startup = params();
    let (r, ()) = tokio::join!(
        connect(client_io, &startup, b"pw", Limits::default()),
        serve
    );
    assert!(matches!(r, Err(ClientError::AuthMethod(_))), "{r:?}");
}

#[tokio::test]
async fn query_with_rows() {
    let (mut client, mut server, mut buf) = logged_in(Limits::default()).await;
    let serve = async {
        let tags = read_until_sync(&mut server, &mut buf).await;
        assert_eq!(tags, b"PBDES");
        let mut out = message::build(b'1', &[]);
        out.extend(message::build(b'2', &[]));
        out.extend(row_description(&[("id", 23), ("name", 25)]));
        out.extend(data_row(&[Some("1"), Some("ann")]));
        out.extend(data_row(&[Some("2"), None]));
        out.extend(command_complete("SELECT 2"));
        out.extend(ready(b'I'));
        wire::send(&mut server, &out).await.unwrap();
    };
    let params = [Some("1".to_owned()), None];
    let (r, ()) = tokio::join!(client.query("SELECT $1, $2", &params), serve);
    let r = r.unwrap();
    assert_eq!(r.fields.len(), 2);
    assert_eq!(r.fields[1].name, "name");
    assert_eq!(r.fields[1].type_oid, 25);
    assert_eq!(r.fields[1].table_oid, 16384);
    assert_eq!(r.fields[1].column_id, 2);
    assert_eq!(r.rows[1], vec![Some("2".to_owned()), None]);
    assert_eq!(r.command_tag.as_deref(), Some("SELECT 2"));
}

#[tokio::test]
async fn error_mid_query_then_usable() {
    let (mut client, mut server, mut buf) = logged_in(Limits::default()).await;
    let serve = async {
        read_until_sync(&mut server, &mut buf).await;
        let mut out = row_description(&[("x", 23)]);
        out.extend(data_row(&[Some("1")]));
        out.extend(error_response("22012", "division by zero"));
        out.extend(ready(b'E'));
        wire::send(&mut server, &out).await.unwrap();
        let tags = read_until_sync(&mut server, &mut buf).await;
        assert_eq!(tags, b"Q");
        let mut out = command_complete("ROLLBACK");
        out.extend(ready(b'I'));
        wire::send(&mut server, &out).await.unwrap();
    };
    let run = async {
        let e = client.query("SELECT 1/0", &[]).await.unwrap_err();
        let ClientError::Server(e) = e else {
            panic!("{e:?}");
        };
        assert_eq!(e.code, "22012");
        assert_eq!(e.position.as_deref(), Some("9"));
        assert_eq!(client.transaction_status(), TransactionStatus::Failed);
        let tag = client.simple("ROLLBACK").await.unwrap();
        assert_eq!(tag.as_deref(), Some("ROLLBACK"));
        assert_eq!(client.transaction_status(), TransactionStatus::Idle);
    };
    tokio::join!(run, serve);
}

#[tokio::test]
async fn oversized_response() {
    let limits = Limits {
        max_message_bytes: 1 << 16,
        max_row_bytes: 1000,
    };
    let (mut client, mut server, mut buf) = logged_in(limits).await;
    let serve = async {
        read_until_sync(&mut server, &mut buf).await;
        let mut out = row_description(&[("x", 25)]);
        let value = "v".repeat(100);
        for _ in 0..20 {
            out.extend(data_row(&[Some(&value)]));
        }
        out.extend(command_complete("SELECT 20"));
        out.extend(ready(b'I'));
        wire::send(&mut server, &out).await.unwrap();
    };
    let (r, ()) = tokio::join!(client.query("SELECT x", &[]), serve);
    assert!(
        matches!(r, Err(ClientError::ResponseTooLarge(1000))),
        "{r:?}"
    );
    let again = client.query("SELECT 1", &[]).await;
    assert!(matches!(again, Err(ClientError::Broken)), "{again:?}");
}

/// Rows of NULLs are tiny messages but not tiny vectors: the limit
/// counts what they take in memory.
#[tokio::test]
async fn empty_values_count_what_they_hold() {
    let limits = Limits {
        max_message_bytes: 1 << 16,
        max_row_bytes: 10_000,
    };
    let (mut client, mut server, mut buf) = logged_in(limits).await;
    let serve = async {
        read_until_sync(&mut server, &mut buf).await;
        let cols: Vec<(&str, u32)> = vec![("x", 25); 10];
        let mut out = row_description(&cols);
        // 42 bytes a row on the wire (2,100 in all), ~270 in memory.
        for _ in 0..50 {
            out.extend(data_row(&[None; 10]));
        }
        out.extend(command_complete("SELECT 50"));
        out.extend(ready(b'I'));
        wire::send(&mut server, &out).await.unwrap();
    };
    let (r, ()) = tokio::join!(client.query("SELECT x", &[]), serve);
    assert!(
        matches!(r, Err(ClientError::ResponseTooLarge(10_000))),
        "{r:?}"
    );
}

/// A malformed message mid-answer leaves the stream unusable: the next
/// statement is refused rather than read out of step.
#[tokio::test]
async fn a_malformed_answer_breaks_the_client() {
    let (mut client, mut server, mut buf) = logged_in(Limits::default()).await;
    let serve = async {
        read_until_sync(&mut server, &mut buf).await;
        // A DataRow claiming a value longer than itself.
        let mut bad = vec![0, 1];
        bad.extend(1000u32.to_be_bytes());
        let mut out = row_description(&[("x", 25)]);
        out.extend(message::build(tag::DATA_ROW, &bad));
        wire::send(&mut server, &out).await.unwrap();
    };
    let (r, ()) = tokio::join!(client.query("SELECT x", &[]), serve);
    assert!(r.is_err(), "{r:?}");
    let again = client.query("SELECT 1", &[]).await;
    assert!(matches!(again, Err(ClientError::Broken)), "{again:?}");
}

#[tokio::test]
async fn oversized_message() {
    let limits = Limits {
        max_message_bytes: 200,
        max_row_bytes: 1 << 20,
    };
    let (mut client, mut server, mut buf) = logged_in(limits).await;
    let serve = async {
        read_until_sync(&mut server, &mut buf).await;
        let mut out = row_description(&[("x", 25)]);
        out.extend(data_row(&[Some(&"v".repeat(500))]));
        wire::send(&mut server, &out).await.unwrap();
    };
    let (r, ()) = tokio::join!(client.query("SELECT x", &[]), serve);
    assert!(
        matches!(r, Err(ClientError::ResponseTooLarge(200))),
        "{r:?}"
    );
}

#[tokio::test]
async fn terminate_sends_x() {
    let (client, mut server, mut buf) = logged_in(Limits::default()).await;
    client.terminate().await.unwrap();
    let (t, body) = wire::read_message(&mut server, &mut buf, 64).await.unwrap();
    assert_eq!((t, body.len()), (tag::TERMINATE, 0));
}

#[test]
fn extended_query_bytes() {
    let bytes = extended_query("SELECT $1", &[None, Some("ab".into())]).unwrap();
    // Parse: 'P', len, "", "SELECT $1\0", 0 types.
    assert_eq!(bytes[0], b'P');
    let parse_len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    let bind = &bytes[1 + parse_len..];
    assert_eq!(bind[0], b'B');
    assert_eq!(
        &bind[5..],
        &[
            0, 0, 0, 0, 0, 2, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 2, b'a', b'b', 0, 0, b'D', 0, 0, 0,
            6, b'P', 0, b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0, b'S', 0, 0, 0, 4
        ][..]
    );
    assert!(extended_query("a\0b", &[]).is_err());
    assert!(parse_row_description(&[0, 1, b'x']).is_err());
    assert!(parse_row_description(&[0, 0, 1]).is_err());
}
