//! The pooling commands against the fake backend of `tests`: SHOW POOLS,
//! SHOW SERVERS, SHOW CLIENTS, PAUSE (its wait and its timeout), RESUME,
//! RECONNECT, the errors naming the pooled upstreams, and their audit.

use std::time::Duration;

use super::tests::{rows, session, Fake};
use super::*;
use crate::config::PoolMode;
use crate::sync::MutexExt;

fn pool(upstream: &str, database: &str, user: &str) -> PoolRow {
    PoolRow {
        upstream: upstream.into(),
        database: database.into(),
        user: user.into(),
        mode: PoolMode::Transaction,
        size: 20,
        paused: false,
        clients: 7,
        clients_active: 3,
        clients_waiting: 2,
        servers_open: 5,
        servers_idle: 2,
        max_wait: Duration::from_micros(2_500_123),
    }
}

fn pooled() -> Fake {
    Fake {
        pooled: vec!["pg".into(), "other".into()],
        pools: vec![
            pool("pg", "db", "app"),
            PoolRow {
                mode: PoolMode::Session,
                size: 5,
                paused: true,
                clients: 0,
                clients_active: 0,
                clients_waiting: 0,
                servers_open: 1,
                servers_idle: 1,
                max_wait: Duration::ZERO,
                ..pool("other", "db2", "report")
            },
        ],
        ..Fake::default()
    }
}

#[tokio::test]
async fn show_pools() {
    let a = command("show pools", &pooled()).await.unwrap();
    assert_eq!(
        a.columns,
        [
            "upstream",
            "database",
            "user",
            "cl_total",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "sv_used",
            "maxwait",
            "maxwait_us",
            "pool_mode",
            "pool_size",
            "paused"
        ]
    );
    assert_eq!(
        rows(&a),
        [
            [
                "pg",
                "db",
                "app",
                "7",
                "3",
                "2",
                "3",
                "2",
                "0",
                "2",
                "500123",
                "transaction",
                "20",
                "false"
            ],
            [
                "other", "db2", "report", "0", "0", "0", "0", "1", "0", "0", "0", "session", "5",
                "true"
            ]
        ]
    );
    assert_eq!(a.tag, "SHOW 2");
    let none = command("SHOW POOLS", &Fake::default()).await.unwrap();
    assert_eq!((none.tag.as_str(), none.rows.len()), ("SHOW 0", 0));
}

#[tokio::test]
async fn show_servers_lists_every_connection() {
    use crate::pool::registry::{ServerRow, State};
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let row = |id, state| ServerRow {
        id,
        upstream: "pg".into(),
        database: "db".into(),
        user: "app".into(),
        addr: "127.0.0.1:5432".parse().unwrap(),
        pid: 4242,
        state,
        connected: t,
        since: t,
    };
    let fake = Fake {
        servers: vec![row(1, State::Active), row(2, State::Idle)],
        ..Fake::default()
    };
    let a = command("SHOW SERVERS;", &fake).await.unwrap();
    assert_eq!(
        a.columns,
        [
            "id",
            "upstream",
            "database",
            "user",
            "state",
            "addr",
            "pid",
            "connect_time",
            "state_since"
        ]
    );
    assert_eq!(
        rows(&a),
        [
            [
                "1",
                "pg",
                "db",
                "app",
                "active",
                "127.0.0.1:5432",
                "4242",
                "2027-01-15T08:00:00Z",
                "2027-01-15T08:00:00Z"
            ],
            [
                "2",
                "pg",
                "db",
                "app",
                "idle",
                "127.0.0.1:5432",
                "4242",
                "2027-01-15T08:00:00Z",
                "2027-01-15T08:00:00Z"
            ]
        ]
    );
    assert_eq!(a.tag, "SHOW 2");
}

#[tokio::test]
async fn show_clients_lists_the_sessions_of_pooled_upstreams() {
    let fake = Fake {
        sessions: vec![
            session("s1", "pg", true),
            session("s2", "plain", false),
            session("s3", "other", false),
        ],
        ..pooled()
    };
    let a = command("Show Clients", &fake).await.unwrap();
    assert_eq!(
        a.columns,
        ["id", "identity", "user", "database", "upstream", "state", "since"]
    );
    assert_eq!(
        rows(&a),
        [
            [
                "s1",
                "alice@example.com",
                "app",
                "db",
                "pg",
                "active",
                "2023-11-14T22:13:20Z"
            ],
            [
                "s3",
                "alice@example.com",
                "app",
                "db",
                "other",
                "idle",
                "2023-11-14T22:13:20Z"
            ]
        ]
    );
    assert_eq!(a.tag, "SHOW 2");
}

#[tokio::test]
async fn resume_and_reconnect_answer_at_once() {
    let fake = pooled();
    for (text, tag) in [
        ("RESUME", "RESUME"),
        ("resume 'other'", "RESUME"),
        ("RECONNECT pg", "RECONNECT"),
        ("reconnect", "RECONNECT"),
    ] {
        let a = command(text, &fake).await.unwrap();
        assert_eq!((a.tag.as_str(), a.columns.len(), a.rows.len()), (tag, 0, 0));
    }
    assert_eq!(
        *fake.actions.locked(),
        [
            "resume pg,other",
            "resume other",
            "reconnect pg",
            "reconnect pg,other"
        ]
    );
}

#[tokio::test]
async fn pause_waits_until_no_server_connection_is_open() {
    let fake = pooled();
    *fake.open.locked() = vec![3, 1, 0];
    let a = command("PAUSE pg", &fake).await.unwrap();
    assert_eq!(a.tag, "PAUSE");
    assert_eq!(
        *fake.actions.locked(),
        ["pause pg", "count pg", "count pg", "count pg"]
    );
    // Already drained: one look.
    let fake = pooled();
    let a = command("pause;", &fake).await.unwrap();
    assert_eq!(a.tag, "PAUSE");
    assert_eq!(*fake.actions.locked(), ["pause pg,other", "count pg,other"]);
}

#[tokio::test]
async fn pause_gives_up_after_its_timeout_and_stays_paused() {
    let fake = pooled();
    *fake.open.locked() = vec![2];
    let started = std::time::Instant::now();
    let e = pools::pause(
        &fake,
        None,
        Duration::from_millis(5),
        Duration::from_millis(40),
    )
    .await
    .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(40));
    assert_eq!(e.code, "55000");
    assert_eq!(
        e.message,
        "PAUSE stopped waiting after 40ms: 2 server connections of pg, other are still in use; \
         the pause stays in force (RESUME lifts it)"
    );
    let actions = fake.actions.locked().clone();
    assert_eq!(actions[0], "pause pg,other");
    assert!(actions.len() >= 3, "{actions:?}");
    assert!(!actions.iter().any(|a| a.starts_with("resume")));
    *fake.open.locked() = vec![1];
    let e = pools::pause(&fake, Some("pg"), Duration::ZERO, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        e.message
            .contains(": 1 server connection of pg is still in use;"),
        "{}",
        e.message
    );
    assert_eq!(
        (pools::PAUSE_POLL, pools::PAUSE_TIMEOUT),
        (Duration::from_millis(20), Duration::from_secs(60))
    );
}

#[tokio::test]
async fn an_unknown_or_unpooled_upstream_is_an_error_naming_the_pooled_ones() {
    let fake = pooled();
    for text in ["PAUSE nope", "RESUME nope", "RECONNECT 'nope'"] {
        let e = command(text, &fake).await.unwrap_err();
        assert_eq!(e.code, "42704", "{text}");
        assert_eq!(
            e.message,
            "no upstream \"nope\"; the pooled upstreams are pg, other"
        );
    }
    // Names are matched as written.
    let e = command("PAUSE PG", &fake).await.unwrap_err();
    assert!(e.message.starts_with("no upstream \"PG\""), "{}", e.message);
    // Configured, but without pool_mode (the fake's upstreams: pg, other).
    let plain = Fake::default();
    let e = command("RECONNECT other", &plain).await.unwrap_err();
    assert_eq!(
        e.message,
        "upstream \"other\" is not pooled; the pooled upstreams are none (no [[upstream]] sets pool_mode)"
    );
    let e = command("PAUSE", &plain).await.unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (
            "42704",
            "no upstream is pooled; the pooled upstreams are none (no [[upstream]] sets pool_mode)"
        )
    );
    assert!(fake.actions.locked().is_empty());
    assert!(plain.actions.locked().is_empty());
}

/// Each pooling command is audited with its result, as every command is.
#[tokio::test]
async fn the_pooling_commands_are_audited() {
    let fake = pooled();
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
    for text in [
        "PAUSE pg",
        "RESUME pg",
        "RECONNECT",
        "SHOW POOLS",
        "PAUSE x",
    ] {
        let mut body = text.as_bytes().to_vec();
        body.push(0);
        let out = query(&body, &fake, &facts).await;
        assert_eq!(out.last(), Some(&b'I'), "{text}: ends in ReadyForQuery");
    }
    assert_eq!(
        *fake.audited.locked(),
        [
            "PAUSE pg -> PAUSE",
            "RESUME pg -> RESUME",
            "RECONNECT -> RECONNECT",
            "SHOW POOLS -> SHOW 2",
            "PAUSE x -> error 42704: no upstream \"x\"; the pooled upstreams are pg, other"
        ]
    );
}
