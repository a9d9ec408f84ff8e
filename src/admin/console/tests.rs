//! The console against a backend made up here: every command's table, its
//! errors, the audit of each command, and the message loop over a duplex
//! pipe. The pooling commands' tests are in `pool_tests`, with this fake.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::admin::live::SessionInfo;
use crate::config::{AuthMode, ClientCertMode, ClientTlsMode, ListenerIdentity};
use crate::sync::MutexExt;

#[derive(Default)]
pub(super) struct Fake {
    pub sessions: Vec<SessionInfo>,
    pub cluster: Option<ClusterState>,
    pub reload: Option<Result<String, String>>,
    pub killed: Mutex<Vec<String>>,
    pub audited: Mutex<Vec<String>>,
    /// The pooled upstreams and their pools.
    pub pooled: Vec<String>,
    pub pools: Vec<PoolRow>,
    pub servers: Vec<crate::pool::registry::ServerRow>,
    /// What `server_connections` answers, one value per call (the last
    /// one repeats; none: 0).
    pub open: Mutex<Vec<usize>>,
    /// PAUSE, RESUME, RECONNECT as called: "pause pg,other".
    pub actions: Mutex<Vec<String>>,
}

impl Fake {
    fn act(&self, what: &str, upstreams: &[String]) {
        self.actions
            .locked()
            .push(format!("{what} {}", upstreams.join(",")));
    }
}

pub(super) fn session(id: &str, upstream: &str, busy: bool) -> SessionInfo {
    let progress = Arc::new(crate::relay::Progress::default());
    progress.client_to_server.store(12, Ordering::Relaxed);
    progress.server_to_client.store(345, Ordering::Relaxed);
    progress.busy.store(busy, Ordering::Relaxed);
    SessionInfo {
        id: id.into(),
        identity: "alice@example.com".into(),
        client: "192.0.2.1:5000".into(),
        user: "app".into(),
        database: "db".into(),
        upstream: upstream.into(),
        client_tls: true,
        upstream_tls: true,
        since: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        progress,
    }
}

impl ConsoleBackend for Fake {
    fn sessions(&self) -> Vec<SessionInfo> {
        self.sessions.clone()
    }
    fn upstreams(&self) -> Vec<UpstreamRow> {
        vec![
            UpstreamRow {
                name: "pg".into(),
                address: "localhost:5432".into(),
                server_name: "localhost".into(),
                auth: AuthMode::Passthrough,
            },
            UpstreamRow {
                name: "other".into(),
                address: "[::1]:5433".into(),
                server_name: "db.internal".into(),
                auth: AuthMode::Scram,
            },
        ]
    }
    fn listeners(&self) -> Vec<ListenerRow> {
        vec![
            ListenerRow {
                name: "tcp".into(),
                identity: ListenerIdentity::Network,
                client_tls: ClientTlsMode::Allow,
                upstream: "pg".into(),
            },
            ListenerRow {
                name: "mtls".into(),
                identity: ListenerIdentity::ClientCert {
                    ca_file: "/ca.pem".into(),
                    mode: ClientCertMode::Required,
                    order: vec![],
                },
                client_tls: ClientTlsMode::Require,
                upstream: "other".into(),
            },
            ListenerRow {
                name: "ts".into(),
                identity: ListenerIdentity::Tailscale,
                client_tls: ClientTlsMode::Require,
                upstream: "pg".into(),
            },
        ]
    }
    fn audit_counts(&self) -> (u64, u64) {
        (7, 1)
    }
    fn cluster(&self) -> ClusterState {
        self.cluster.clone().unwrap_or(ClusterState::Off)
    }
    fn certificate_expiries(&self) -> Vec<(String, i64)> {
        vec![("tls".into(), 2_240_611_200), ("odd".into(), -5)]
    }
    fn kill(&self, id: &str) -> bool {
        self.killed.locked().push(id.to_owned());
        self.sessions.iter().any(|s| s.id == id)
    }
    fn reload(&self) -> Result<String, String> {
        self.reload.clone().unwrap_or_else(|| Ok("reloaded".into()))
    }
    fn pooled_upstreams(&self) -> Vec<String> {
        self.pooled.clone()
    }
    fn servers(&self) -> Vec<crate::pool::registry::ServerRow> {
        self.servers.clone()
    }

    fn pools(&self) -> Vec<PoolRow> {
        self.pools.clone()
    }
    fn pause(&self, upstreams: &[String]) {
        self.act("pause", upstreams);
    }
    fn resume(&self, upstreams: &[String]) {
        self.act("resume", upstreams);
    }
    fn reconnect(&self, upstreams: &[String]) {
        self.act("reconnect", upstreams);
    }
    fn server_connections(&self, upstreams: &[String]) -> usize {
        self.act("count", upstreams);
        let mut open = self.open.locked();
        match open.len() {
            0 => 0,
            1 => open[0],
            _ => open.remove(0),
        }
    }
    fn audit(&self, event: &crate::audit::Event<'_>) {
        if let crate::audit::Event::Console {
            command, result, ..
        } = event
        {
            self.audited.locked().push(format!("{command} -> {result}"));
        }
    }
}

pub(super) fn rows(a: &Answer) -> Vec<Vec<&str>> {
    a.rows
        .iter()
        .map(|r| r.iter().map(String::as_str).collect())
        .collect()
}

#[tokio::test]
async fn show_sessions() {
    let fake = Fake {
        sessions: vec![session("s1", "pg", false), session("s2", "other", true)],
        ..Fake::default()
    };
    let a = command("show sessions;", &fake).await.unwrap();
    assert_eq!(a.tag, "SHOW 2");
    assert_eq!(
        a.columns,
        [
            "id",
            "identity",
            "client",
            "user",
            "database",
            "upstream",
            "client_tls",
            "upstream_tls",
            "state",
            "since",
            "bytes_in",
            "bytes_out"
        ]
    );
    assert_eq!(
        rows(&a)[0],
        [
            "s1",
            "alice@example.com",
            "192.0.2.1:5000",
            "app",
            "db",
            "pg",
            "true",
            "true",
            "idle",
            "2023-11-14T22:13:20Z",
            "12",
            "345"
        ]
    );
    assert_eq!(rows(&a)[1][8], "active");
    let none = command("SHOW SESSIONS", &Fake::default()).await.unwrap();
    assert_eq!((none.tag.as_str(), none.rows.len()), ("SHOW 0", 0));
}

#[tokio::test]
async fn show_upstreams_listeners_certificates_version() {
    let fake = Fake {
        sessions: vec![session("s1", "pg", false), session("s2", "pg", true)],
        ..Fake::default()
    };
    let a = command("SHOW UPSTREAMS", &fake).await.unwrap();
    assert_eq!(
        a.columns,
        ["name", "address", "server_name", "auth", "sessions"]
    );
    assert_eq!(
        rows(&a),
        [
            ["pg", "localhost:5432", "localhost", "passthrough", "2"],
            ["other", "[::1]:5433", "db.internal", "scram", "0"]
        ]
    );
    let a = command("SHOW LISTENERS", &fake).await.unwrap();
    assert_eq!(a.columns, ["name", "identity", "client_tls", "upstream"]);
    assert_eq!(
        rows(&a),
        [
            ["tcp", "network", "allow", "pg"],
            ["mtls", "client_cert", "require", "other"],
            ["ts", "tailscale", "require", "pg"]
        ]
    );
    assert_eq!(a.tag, "SHOW 3");
    let a = command("SHOW CERTIFICATES", &fake).await.unwrap();
    assert_eq!(a.columns, ["certificate", "expires"]);
    assert_eq!(rows(&a), [["tls", "2041-01-01T00:00:00Z"], ["odd", "-5"]]);
    let a = command("SHOW VERSION", &fake).await.unwrap();
    assert_eq!(
        rows(&a),
        [[format!("pgbastion {}", env!("CARGO_PKG_VERSION"))]]
    );
    assert_eq!(a.tag, "SHOW 1");
}

#[tokio::test]
async fn show_stats_with_and_without_a_fleet() {
    let fake = Fake {
        sessions: vec![session("s1", "pg", false)],
        ..Fake::default()
    };
    let a = command("SHOW STATS", &fake).await.unwrap();
    assert_eq!(a.columns, ["name", "value"]);
    assert_eq!(
        rows(&a),
        [
            ["sessions_active", "1"],
            ["audit_events_written", "7"],
            ["audit_events_dropped", "1"],
            ["cluster", "off"]
        ]
    );
    for (link, shown) in [(Link::Up, "up"), (Link::Down, "down")] {
        let fake = Fake {
            cluster: Some(ClusterState::On {
                link,
                instance: "node-1".into(),
                cancel_mappings: 3,
                identity_slots: 4,
            }),
            ..Fake::default()
        };
        let a = command("SHOW STATS", &fake).await.unwrap();
        assert_eq!(
            rows(&a)[3..],
            [
                ["cluster", shown],
                ["cluster_instance", "node-1"],
                ["cluster_cancel_mappings", "3"],
                ["cluster_identity_slots", "4"]
            ]
        );
        assert_eq!(a.tag, "SHOW 7");
    }
}

#[tokio::test]
async fn kill_reload_and_unknown_commands() {
    let fake = Fake {
        sessions: vec![session("AbC", "pg", false)],
        reload: Some(Err("bad toml".into())),
        ..Fake::default()
    };
    let a = command("kill 'AbC'", &fake).await.unwrap();
    assert_eq!(
        a,
        Answer {
            columns: vec![],
            rows: vec![],
            tag: "KILL".into()
        }
    );
    let e = command("KILL abc", &fake).await.unwrap_err();
    assert_eq!(e.code, "42704");
    assert_eq!(
        e.message,
        "no session with id \"abc\" (SHOW SESSIONS lists them)"
    );
    assert_eq!(*fake.killed.locked(), ["AbC", "abc"]);
    let e = command("RELOAD", &fake).await.unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        ("F0000", "reload refused, nothing changed: bad toml")
    );
    let a = command("reload", &Fake::default()).await.unwrap();
    assert_eq!(a.tag, "RELOAD");
    assert_eq!(a.columns, ["reload"]);
    assert_eq!(rows(&a), [["reloaded"]]);
    let e = command(" DROP TABLE x; ", &fake).await.unwrap_err();
    assert_eq!(e.code, "42601");
    assert!(
        e.message
            .starts_with("unknown command \"DROP TABLE x\"; the console knows SHOW SESSIONS"),
        "{}",
        e.message
    );
}

/// The bytes of an answer: RowDescription (every column text), DataRows,
/// CommandComplete; a tag-only answer is CommandComplete alone.
#[test]
fn answers_on_the_wire() {
    let a = Answer {
        columns: vec!["name", "value"],
        rows: vec![vec!["a".into(), "".into()]],
        tag: "SHOW 1".into(),
    };
    let mut want = message::build(
        b'T',
        &[
            &[0u8, 2][..],
            b"name\0",
            &[
                0, 0, 0, 0, 0, 0, 0, 0, 0, 25, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0,
            ],
            b"value\0",
            &[
                0, 0, 0, 0, 0, 0, 0, 0, 0, 25, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0,
            ],
        ]
        .concat(),
    );
    want.extend(message::build(b'D', &[0, 2, 0, 0, 0, 1, b'a', 0, 0, 0, 0]));
    want.extend(message::build(b'C', b"SHOW 1\0"));
    assert_eq!(encode(&a), want);
    let kill = Answer {
        columns: vec![],
        rows: vec![],
        tag: "KILL".into(),
    };
    assert_eq!(encode(&kill), message::build(b'C', b"KILL\0"));
}

async fn read_one(io: &mut tokio::io::DuplexStream) -> (u8, Vec<u8>) {
    let t = io.read_u8().await.unwrap();
    let len = io.read_u32().await.unwrap() as usize;
    let mut body = vec![0; len - 4];
    io.read_exact(&mut body).await.unwrap();
    (t, body)
}

/// Reads messages up to and including ReadyForQuery; returns their types.
async fn until_ready(io: &mut tokio::io::DuplexStream) -> Vec<u8> {
    let mut types = Vec::new();
    loop {
        let (t, _) = read_one(io).await;
        types.push(t);
        if t == tag::READY_FOR_QUERY {
            return types;
        }
    }
}

#[tokio::test]
async fn the_message_loop() {
    let fake = Arc::new(Fake::default());
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let facts = crate::audit::SessionFacts {
        session_id: "c".into(),
        listener: "mtls".into(),
        client: crate::audit::ClientAddress::unix(),
        client_tls: None,
        transport: None,
        forwarded_by: None,
        requested: None,
        identity: None,
        proxy: None,
        rule: None,
        route: None,
    };
    let backend = fake.clone();
    let served = tokio::spawn(async move {
        let mut buf = Vec::new();
        serve(&mut server, &mut buf, &*backend, &facts).await
    });
    let greeting = until_ready(&mut client).await;
    assert_eq!(greeting[0], b'R');
    assert_eq!(greeting.iter().filter(|t| **t == b'S').count(), 6);
    client
        .write_all(&message::build(b'Q', b"SHOW VERSION\0"))
        .await
        .unwrap();
    assert_eq!(until_ready(&mut client).await, [b'T', b'D', b'C', b'Z']);
    client
        .write_all(&message::build(b'Q', b"nonsense\0"))
        .await
        .unwrap();
    assert_eq!(until_ready(&mut client).await, [b'E', b'Z']);
    // The extended protocol is refused, and the session goes on.
    client
        .write_all(&message::build(b'P', b"\0select 1\0\0\0"))
        .await
        .unwrap();
    assert_eq!(until_ready(&mut client).await, [b'E', b'Z']);
    client.write_all(&message::build(b'X', b"")).await.unwrap();
    assert_eq!(served.await.unwrap(), "client_closed");
    assert_eq!(
        *fake.audited.locked(),
        [
            "SHOW VERSION -> SHOW 1".to_owned(),
            format!(
                "nonsense -> error 42601: unknown command \"nonsense\"; the console knows {}",
                command::COMMANDS
            )
        ]
    );
}
