//! The audit JSON, byte for byte: one line per kind of event and outcome,
//! captured from the code before the outcomes became enums (issue 20), so
//! a change of type never changes a name a reader of the log relies on.

use super::*;
use crate::identity::IdentitySource;

fn facts() -> SessionFacts {
    SessionFacts {
        session_id: "00000000000000ab".into(),
        listener: "public".into(),
        client: ClientAddress::tcp("192.0.2.7:50000".parse().unwrap()),
        client_tls: Some(ClientTransport::Tls(TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
            sni: Some("db.example.com".into()),
            alpn: None,
        })),
        transport: None,
        forwarded_by: None,
        requested: Some(Requested {
            user: "app".into(),
            database: "shop".into(),
            application_name: Some("psql".into()),
            protocol: "3.0".into(),
        }),
        identity: Some(Identity {
            source: IdentitySource::ClientCert,
            name: "alice".into(),
            node: None,
            tags: Vec::new(),
            cert_names: vec!["alice".into()],
            grants: Vec::new(),
        }),
        proxy: None,
        rule: Some("staff".into()),
        route: Some(RouteFacts {
            name: Some("shop".into()),
            server_name: Some("db.example.com".into()),
            endpoint: None,
            upstream: "main".into(),
            database: "shop".into(),
        }),
    }
}

fn bare_facts(transport: ClientTransport) -> SessionFacts {
    SessionFacts {
        session_id: "00000000000000cd".into(),
        listener: "public".into(),
        client: ClientAddress::unix(),
        client_tls: Some(transport),
        transport: None,
        forwarded_by: None,
        requested: None,
        identity: None,
        proxy: None,
        rule: None,
        route: None,
    }
}

fn upstream() -> UpstreamFacts {
    UpstreamFacts {
        name: "pg".into(),
        addr: "10.0.0.5:5432".into(),
        tls: TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
            sni: None,
            alpn: None,
        },
    }
}

fn leg(mechanism: &str, channel_binding: bool) -> Option<LegAuth> {
    Some(LegAuth {
        mechanism: mechanism_named(mechanism),
        channel_binding,
    })
}

fn passthrough_auth() -> AuthFacts {
    let mut a = AuthFacts::new(crate::config::AuthMode::Passthrough);
    a.outcome = AuthOutcome::Ok;
    a.client = leg("SCRAM-SHA-256", false);
    a.server = leg("SCRAM-SHA-256", false);
    a
}

fn scram_auth() -> AuthFacts {
    let mut a = AuthFacts::new(crate::config::AuthMode::Scram);
    a.outcome = AuthOutcome::Ok;
    a.client = leg("SCRAM-SHA-256-PLUS", true);
    a.server = leg("SCRAM-SHA-256-PLUS", true);
    a
}

fn identity_auth(credential: &str, mechanism: &str) -> AuthFacts {
    let mut a = AuthFacts::new(crate::config::AuthMode::Passthrough);
    a.mode = LoginMode::Identity;
    a.credential = Some(named(CredentialKind::ALL, credential));
    a.outcome = AuthOutcome::Ok;
    a.server = leg(mechanism, false);
    a
}

/// The variant an audit name stands for (the lines below were written
/// with the names, as the code before issue 20 had them).
fn named<T: Copy + std::fmt::Display>(all: &[T], name: &str) -> T {
    *all.iter()
        .find(|v| v.to_string() == name)
        .unwrap_or_else(|| panic!("no variant named {name}"))
}

fn mechanism_named(name: &str) -> Mechanism {
    [
        Mechanism::ScramSha256,
        Mechanism::ScramSha256Plus,
        Mechanism::Password,
        Mechanism::Md5,
        Mechanism::Cert,
        Mechanism::Trust,
    ]
    .into_iter()
    .find(|m| m.as_str() == name)
    .unwrap_or_else(|| panic!("no mechanism named {name}"))
}

fn line(event: &Event<'_>) -> String {
    serde_json::to_string(&TimedEvent {
        ts: "2026-01-02T03:04:05.678Z".into(),
        event,
    })
    .unwrap()
}

fn query<'a>(facts: &'a SessionFacts) -> Event<'a> {
    Event::Query {
        facts,
        statement: Some("SELECT $1"),
        unparsed: None,
        protocol: named(QueryProtocol::ALL, "simple"),
        prepared: None,
        started: "2026-01-02T03:04:05.000001Z".into(),
        duration_us: 42,
        tag: Some("SELECT"),
        rows: Some(1),
        commands: 1,
        sqlstate: None,
        copy: None,
        outcome: named(QueryOutcome::ALL, "ok"),
    }
}

/// Every line, in order.
fn lines() -> Vec<String> {
    let f = facts();
    let up = upstream();
    let mut out = Vec::new();
    let stopped = QueryAuditFacts {
        mode: "statements",
        statements: Some(3),
        stopped: Some("the server's messages could not be framed"),
    };
    let started_audit = QueryAuditFacts {
        mode: "statements",
        statements: None,
        stopped: None,
    };
    // Session start, each login mode.
    for (auth, qa) in [
        (passthrough_auth(), Some(&started_audit)),
        (scram_auth(), None),
        (identity_auth("client_cert", "cert"), None),
        (identity_auth("password", "md5"), None),
        (identity_auth("scram_secret", "SCRAM-SHA-256-PLUS"), None),
        (identity_auth("rds_iam", "password"), None),
    ] {
        out.push(line(&Event::Start {
            facts: &f,
            upstream: &up,
            auth: &auth,
            query_audit: qa,
        }));
    }
    // Session end, for every end reason of the relay and of the auth phase.
    let auth = passthrough_auth();
    for (reason, detail) in [
        ("client_closed", None),
        ("server_closed", None),
        ("client_error", Some("connection reset")),
        ("server_error", Some("broken pipe")),
        ("shutdown", None),
        ("killed", None),
        ("audit_unavailable", None),
        (
            "channel_binding_refused",
            Some("the client chose SCRAM-SHA-256-PLUS (channel binding)"),
        ),
        ("protocol_violation", Some("invalid message")),
        (
            "authentication_timeout",
            Some("authentication did not complete within 30s"),
        ),
        (
            "too_many_sessions",
            Some("authenticated, but limits.max_sessions (1) is reached"),
        ),
    ] {
        out.push(line(&Event::End {
            facts: &f,
            upstream: &up,
            auth: &auth,
            bytes_client_to_server: 100,
            bytes_server_to_client: 2000,
            duration_ms: 1234,
            end_reason: named(EndReason::ALL, reason),
            detail,
            query_audit: Some(&stopped),
        }));
    }
    let mut refused = AuthFacts::new(crate::config::AuthMode::Passthrough);
    refused.outcome = AuthOutcome::RefusedByProxy {
        sqlstate: "28000".into(),
    };
    out.push(line(&Event::End {
        facts: &f,
        upstream: &up,
        auth: &refused,
        bytes_client_to_server: 0,
        bytes_server_to_client: 0,
        duration_ms: 5,
        end_reason: EndReason::ChannelBindingRefused,
        detail: None,
        query_audit: None,
    }));
    // Rejections, with and without auth facts.
    let plain = bare_facts(ClientTransport::Plaintext);
    let failed_tls = bare_facts(ClientTransport::TlsFailed {
        error: "received fatal alert: UnknownCA".into(),
    });
    let mut auth_error = AuthFacts::new(crate::config::AuthMode::Scram);
    auth_error.outcome = AuthOutcome::Error {
        sqlstate: "28P01".into(),
    };
    auth_error.client = leg("SCRAM-SHA-256", false);
    let mut incomplete = AuthFacts::new(crate::config::AuthMode::Passthrough);
    incomplete.mode = LoginMode::Identity;
    incomplete.credential = Some(CredentialKind::RdsIam);
    for (facts, reason, sqlstate, auth) in [
        (&plain, "tls_required", Some("28000"), None),
        (&failed_tls, "client_tls_handshake_failed", None, None),
        (&plain, "bad_startup_packet", Some("08P01"), None),
        (&f, "policy_denied", Some("28000"), None),
        (&f, "auth_failed", Some("28P01"), Some(&auth_error)),
        (&f, "too_many_sessions", Some("53300"), Some(&incomplete)),
        (
            &f,
            "upstream_certificate_untrusted",
            Some("08001"),
            Some(&incomplete),
        ),
        (
            &f,
            "credential_unavailable",
            Some("28000"),
            Some(&incomplete),
        ),
    ] {
        out.push(line(&Event::Rejected {
            facts,
            reason: named(RejectReason::ALL, reason),
            sqlstate,
            message: format!("refused: {reason}"),
            duration_ms: 7,
            auth,
        }));
    }
    // Cancels.
    let cancel_facts = bare_facts(ClientTransport::Plaintext);
    for (target, instance, outcome, detail) in [
        ("00000000000000ab", None, "forwarded", None),
        ("00000000000000ab", Some("pgb-2"), "forwarded_remote", None),
        (
            "00000000000000ab",
            Some("pgb-2"),
            "relayed_to_instance",
            None,
        ),
        ("unmatched", None, "unmatched", None),
        ("unmatched", None, "cluster_unavailable", None),
        ("unmatched", None, "rate_limited", None),
        ("unmatched", None, "plaintext_refused", None),
        (
            "00000000000000ab",
            None,
            "upstream_failed",
            Some("timed out".to_owned()),
        ),
    ] {
        out.push(line(&Event::Cancel {
            facts: &cancel_facts,
            target_session_id: target,
            session_instance: instance,
            outcome: named(CancelOutcome::ALL, outcome),
            detail,
        }));
    }
    // Statements, each protocol and outcome, COPY each way.
    out.push(line(&query(&f)));
    let cases: [fn(Event<'_>) -> Event<'_>; 8] = [
        |e| match e {
            Event::Query { facts, started, .. } => Event::Query {
                facts,
                statement: Some("INSERT INTO t VALUES ($1)"),
                unparsed: None,
                protocol: named(QueryProtocol::ALL, "extended"),
                prepared: Some("s1"),
                started,
                duration_us: 7,
                tag: Some("INSERT"),
                rows: Some(1),
                commands: 1,
                sqlstate: None,
                copy: None,
                outcome: named(QueryOutcome::ALL, "ok"),
            },
            e => e,
        },
        |e| match e {
            Event::Query { facts, started, .. } => Event::Query {
                facts,
                statement: Some("COPY t FROM STDIN"),
                unparsed: None,
                protocol: named(QueryProtocol::ALL, "simple"),
                prepared: None,
                started,
                duration_us: 9,
                tag: Some("COPY"),
                rows: Some(3),
                commands: 1,
                sqlstate: None,
                copy: Some(named(CopyDirection::ALL, "in")),
                outcome: named(QueryOutcome::ALL, "ok"),
            },
            e => e,
        },
        |e| match e {
            Event::Query { facts, started, .. } => Event::Query {
                facts,
                statement: Some("COPY t TO STDOUT"),
                unparsed: None,
                protocol: named(QueryProtocol::ALL, "extended"),
                prepared: Some(""),
                started,
                duration_us: 9,
                tag: Some("COPY"),
                rows: Some(3),
                commands: 1,
                sqlstate: None,
                copy: Some(named(CopyDirection::ALL, "out")),
                outcome: named(QueryOutcome::ALL, "suspended"),
            },
            e => e,
        },
        |e| match e {
            Event::Query { facts, started, .. } => Event::Query {
                facts,
                statement: Some("START_REPLICATION SLOT s LOGICAL 0/0"),
                unparsed: None,
                protocol: named(QueryProtocol::ALL, "replication"),
                prepared: None,
                started,
                duration_us: 9,
                tag: None,
                rows: None,
                commands: 0,
                sqlstate: None,
                copy: Some(named(CopyDirection::ALL, "both")),
                outcome: named(QueryOutcome::ALL, "unanswered"),
            },
            e => e,
        },
        |e| match e {
            Event::Query { facts, started, .. } => Event::Query {
                facts,
                statement: Some("function call"),
                unparsed: None,
                protocol: named(QueryProtocol::ALL, "function_call"),
                prepared: None,
                started,
                duration_us: 9,
                tag: None,
                rows: None,
                commands: 0,
                sqlstate: Some("42883"),
                copy: None,
                outcome: named(QueryOutcome::ALL, "error"),
            },
            e => e,
        },
        |e| match e {
            Event::Query { facts, started, .. } => Event::Query {
                facts,
                statement: None,
                unparsed: Some(Unparsed {
                    len: 300000,
                    why: "too long",
                }),
                protocol: named(QueryProtocol::ALL, "extended"),
                prepared: Some("big"),
                started,
                duration_us: 9,
                tag: None,
                rows: None,
                commands: 0,
                sqlstate: None,
                copy: None,
                outcome: named(QueryOutcome::ALL, "not_executed"),
            },
            e => e,
        },
        |e| {
            match e {
            Event::Query { facts, started, .. } => Event::Query {
                facts,
                statement: None,
                unparsed: Some(Unparsed {
                    len: 0,
                    why: "unknown to the audit: prepared or declared in SQL, ended, or past its bounds",
                }),
                protocol: named(QueryProtocol::ALL, "extended"),
                prepared: Some("p"),
                started,
                duration_us: 9,
                tag: Some("SELECT"),
                rows: Some(0),
                commands: 1,
                sqlstate: None,
                copy: None,
                outcome: named(QueryOutcome::ALL, "ok"),
            },
            e => e,
        }
        },
        |e| match e {
            Event::Query { facts, started, .. } => Event::Query {
                facts,
                statement: Some("COPY t FROM STDIN"),
                unparsed: None,
                protocol: named(QueryProtocol::ALL, "simple"),
                prepared: None,
                started,
                duration_us: 9,
                tag: None,
                rows: None,
                commands: 0,
                sqlstate: Some("22P02"),
                copy: Some(named(CopyDirection::ALL, "in")),
                outcome: named(QueryOutcome::ALL, "error"),
            },
            e => e,
        },
    ];
    for case in cases {
        out.push(line(&case(query(&f))));
    }
    out.push(line(&Event::QueryAuditStopped {
        facts: &f,
        why: "more than 10000 statements waiting for answers",
    }));
    out.push(line(&Event::Suppressed {
        kind: "unmatched",
        count: 12,
        window_s: 60,
    }));
    out.push(line(&Event::Console {
        facts: &f,
        command: "SHOW SESSIONS",
        result: "ok".into(),
    }));
    out.push(line(&Event::Resumed {
        partial_line_bytes: 17,
        partial_line_sha256: "ab".repeat(32),
    }));
    out
}

const GOLDEN: &str = include_str!("golden.jsonl");

#[test]
fn audit_lines_are_unchanged() {
    let got = lines();
    let want: Vec<&str> = GOLDEN.lines().collect();
    if std::env::var_os("PGBASTION_WRITE_GOLDEN").is_some() {
        let mut text = got.join("\n");
        text.push('\n');
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/src/audit/golden.jsonl"),
            text,
        )
        .unwrap();
        return;
    }
    assert_eq!(got.len(), want.len(), "number of lines");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "line {}", i + 1);
    }
}
