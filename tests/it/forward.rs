//! The client's identity inside PostgreSQL (issue 14): `[forward] settings`
//! put custom settings in the StartupMessage, readable with
//! `current_setting()`, and a client cannot pass its own values off as
//! pgbastion's.

use crate::common::*;
use pgbastion::dev::certs::Ca;
use pgbastion::protocol::startup::{ProtocolVersion, StartupMessage};
use tokio::io::AsyncWriteExt;

const SETTINGS: &str = "[forward.settings]\n\
    \"pgbastion.identity\" = \"{identity}\"\n\
    \"pgbastion.client_addr\" = \"{client_addr}\"\n\
    \"pgbastion.session_id\" = \"{session_id}\"\n\
    \"pgbastion.via\" = \"{source}:{identity}\"\n";

/// A person with a client certificate, even one who sets
/// `pgbastion.identity` themselves (`-c` in PGOPTIONS), is seen by the
/// server as the certificate says.
#[test]
fn the_server_sees_the_certificate_identity() {
    let env = Env::new();
    let dir = env.dir.path();
    let people = Ca::new("people CA").unwrap();
    let people_ca = people.write_cert(dir, "people-ca").unwrap();
    let alice = person(&people, dir, "alice");
    let proxy = Proxy::start_toml(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nidentity = \"client_cert\"\nclient_ca = \"{}\"\n\
         cert_identity = [\"email\"]\n{}\n{SETTINGS}",
        env.tls_toml(),
        people_ca.display(),
        env.upstream_toml()
    ));
    let conninfo = format!(
        "host=localhost port={} dbname=postgres user=postgres sslmode=verify-full sslrootcert={} \
         channel_binding=disable sslcert={} sslkey={}",
        proxy.addr().port(),
        env.proxy_ca.display(),
        alice.0.display(),
        alice.1.display()
    );
    let out = std::process::Command::new("psql")
        .args(["-X", "-A", "-t", "-F", "|", "-d", &conninfo, "-c"])
        .arg(
            "select current_setting('pgbastion.identity'), current_setting('pgbastion.client_addr'), \
             current_setting('pgbastion.session_id'), current_setting('pgbastion.via')",
        )
        .env("PGPASSWORD", &env.pg.password)
        .env("PGOPTIONS", "-c pgbastion.identity=mallory@example.com")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let start = proxy.wait_audit("start", |e| e["event"] == "session.start");
    let session_id = start["session_id"].as_str().unwrap();
    assert_eq!(
        stdout(&out),
        format!("alice@example.com|127.0.0.1|{session_id}|client_cert:alice@example.com")
    );
}

/// Values the client sent as startup parameters under the same names, in
/// any spelling, are replaced, not merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_send_its_own_values() {
    let pg = pgbastion::dev::localpg::LocalPg::start(pgbastion::dev::localpg::LocalPgOptions {
        trust_users: vec!["raw".into()],
        ..Default::default()
    })
    .unwrap();
    pg.run_sql("CREATE ROLE raw LOGIN").unwrap();
    let env = Env {
        pg,
        certs: ProxyCerts::new(),
    };
    let proxy = env.proxy("allow", SETTINGS);
    let mut tcp = raw(proxy.addr()).await;
    let startup = StartupMessage::new(
        ProtocolVersion { major: 3, minor: 0 },
        vec![
            ("user".into(), "raw".into()),
            ("database".into(), "postgres".into()),
            ("pgbastion.identity".into(), "evil".into()),
            ("PGBASTION.Client_Addr".into(), "10.6.6.6".into()),
        ],
    );
    tcp.write_all(startup.as_bytes()).await.unwrap();
    loop {
        let (t, body) = read_message(&mut tcp).await.unwrap();
        assert_ne!(t, b'E', "{}", String::from_utf8_lossy(&body));
        if t == b'Z' {
            break;
        }
    }
    let query = "select current_setting('pgbastion.identity') || '|' || current_setting('pgbastion.client_addr')";
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&(u32::try_from(query.len() + 5).unwrap()).to_be_bytes());
    msg.extend_from_slice(query.as_bytes());
    msg.push(0);
    tcp.write_all(&msg).await.unwrap();
    let row = loop {
        let (t, body) = read_message(&mut tcp).await.unwrap();
        assert_ne!(t, b'E', "{}", String::from_utf8_lossy(&body));
        if t == b'D' {
            // One column: count (2), length (4), value.
            break String::from_utf8(body[6..].to_vec()).unwrap();
        }
    };
    assert_eq!(row, "127.0.0.1|127.0.0.1");
}
