//! Unit tests of the configuration model: defaults, each section's
//! refusals (asserted on the words an operator reads), the key paths the
//! errors carry, flags, and warnings.

use std::path::Path;
use std::time::Duration;

use super::upstreams::split_host_port;
use super::warnings::PUBLIC_BUNDLE_MIN_CAS;
use super::*;

const MINIMAL: &str = r#"
    [tls]
    cert = "proxy.crt"
    key = "proxy.key"

    [[listener]]
    listen = "127.0.0.1:6432"

    [[upstream]]
    address = "db.example.com:5432"
    ca_file = "ca.pem"
"#;

#[test]
fn minimal_config_gets_secure_defaults() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.listeners[0].client_tls, ClientTlsMode::Require);
    assert_eq!(c.upstreams[0].server_name, "db.example.com");
    assert_eq!(c.upstreams[0].tls_negotiation, TlsNegotiation::Postgres);
    assert_eq!(c.audit.target, AuditTarget::Stdout);
}

#[test]
fn cluster_is_off_by_default_and_checked_when_set() {
    assert_eq!(Config::from_toml(MINIMAL).unwrap().cluster, None);
    let with = |lines: &str| {
        Config::from_toml(&format!(
            "{MINIMAL}\n[cluster]\nsecret_file = \"k\"\n{lines}"
        ))
    };
    let c = with("redis = \"redis://10.0.0.9:6379/0\"\ninstance = \"pgb-1\"")
        .unwrap()
        .cluster
        .unwrap();
    assert_eq!(c.instance, "pgb-1");
    assert_eq!(c.timeout, Duration::from_millis(250));
    assert_eq!(c.key_prefix, "pgbastion");
    let host = with("redis = \"redis://r:6379\"").unwrap().cluster.unwrap();
    assert!(!host.instance.is_empty(), "the host name by default");
    for (lines, says) in [
        ("redis = \"http://r:6379\"", "use redis://"),
        ("redis = \"redis://:hunter2@r:6379\"", "redis_password_file"),
        (
            "redis = \"redis://user:hunter2@r:6379\"",
            "redis_password_file",
        ),
        ("redis = \"rediss://r:6380/#insecure\"", "always verified"),
        (
            "redis = \"redis://r:6379\"\nredis_ca_file = \"ca.pem\"",
            "not rediss://",
        ),
        ("redis = \"redis://r:6379\"\ntimeout = \"0s\"", "timeout"),
        ("redis = \"redis://r:6379\"\ninstance = \"\"", "instance"),
        (
            "redis = \"redis://r:6379\"\nkey_prefix = \"a b\"",
            "key_prefix",
        ),
    ] {
        let err = with(lines).unwrap_err().to_string();
        assert!(err.contains(says), "{lines}: {err}");
        assert!(
            !err.contains("hunter2"),
            "the password is not repeated: {err}"
        );
    }
    let acl_user = with("redis = \"redis://pgbastion@r:6379/0\"").unwrap();
    assert!(acl_user.cluster.is_some(), "an ACL user name alone is fine");
}

#[test]
fn forward_settings_need_a_prefixed_name_and_known_placeholders() {
    let with = |lines: &str| Config::from_toml(&format!("{MINIMAL}\n[forward.settings]\n{lines}"));
    let c =
        with("\"pgbastion.identity\" = \"{identity}\"\n\"app.who\" = \"{source}:{client_addr}\"")
            .unwrap();
    assert_eq!(
        c.forward_settings,
        vec![
            ("app.who".to_owned(), "{source}:{client_addr}".to_owned()),
            ("pgbastion.identity".to_owned(), "{identity}".to_owned()),
        ]
    );
    for (lines, says) in [
        ("\"identity\" = \"{identity}\"", "prefix.name"),
        ("\"user\" = \"x\"", "prefix.name"),
        ("\"a.b;drop\" = \"x\"", "prefix.name"),
        ("\".b\" = \"x\"", "prefix.name"),
        ("\"1a.b\" = \"x\"", "prefix.name"),
        ("\"a.b\" = \"{password}\"", "unknown placeholder"),
    ] {
        let err = with(lines).unwrap_err().to_string();
        assert!(err.contains(says), "{lines}: {err}");
    }
}

#[test]
fn unknown_keys_are_refused() {
    let text = MINIMAL.replace("ca_file", "ca_fiel");
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(err.contains("ca_fiel"), "{err}");
}

#[test]
fn upstream_without_roots_is_refused() {
    let text = MINIMAL.replace("ca_file = \"ca.pem\"", "");
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(err.contains("no trusted roots"), "{err}");
}

#[test]
fn require_without_certificate_is_refused() {
    let text = MINIMAL.replace(
        "[tls]\n    cert = \"proxy.crt\"\n    key = \"proxy.key\"",
        "",
    );
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(err.contains("requires client TLS"), "{err}");
}

#[test]
fn unix_listener_is_named_like_postgres() {
    let text = MINIMAL.replace(
        "listen = \"127.0.0.1:6432\"",
        "unix_dir = \"/run/pgb\"\nport = 7000",
    );
    let c = Config::from_toml(&text).unwrap();
    assert_eq!(
        c.listeners[0].bind,
        BindAddress::Unix("/run/pgb/.s.PGSQL.7000".into())
    );
    assert_eq!(c.listeners[0].client_tls, ClientTlsMode::Allow);
}

#[test]
fn host_port_forms() {
    assert_eq!(split_host_port("db:5432"), Some(("db".into(), 5432)));
    assert_eq!(split_host_port("[::1]:5432"), Some(("::1".into(), 5432)));
    assert_eq!(split_host_port("::1:5432"), None);
    assert_eq!(split_host_port("db"), None);
    assert_eq!(split_host_port(":5432"), None);
    assert_eq!(split_host_port("db:99999"), None);
}

#[test]
fn server_name_accepts_ip_and_refuses_garbage() {
    let ip = MINIMAL.replace("ca_file", "server_name = \"10.0.0.5\"\nca_file");
    assert_eq!(
        Config::from_toml(&ip).unwrap().upstreams[0].server_name,
        "10.0.0.5"
    );
    let bad = MINIMAL.replace("ca_file", "server_name = \"not a name!\"\nca_file");
    assert!(Config::from_toml(&bad).is_err());
}

#[test]
fn scram_mode_needs_a_verifier_source() {
    let scram =
        |keys: &str| Config::from_toml(&MINIMAL.replace("ca_file", &format!("{keys}\nca_file")));
    let err = scram("auth = \"scram\"").unwrap_err().to_string();
    assert!(err.contains("needs a source of SCRAM verifiers"), "{err}");
    let c = scram("auth = \"scram\"\nsecrets_file = \"users.txt\"").unwrap();
    assert_eq!(c.upstreams[0].auth_mode(), AuthMode::Scram);
    let c =
        scram("auth = \"scram\"\nauth_user = \"pgbastion\"\nauth_password_file = \"pw\"").unwrap();
    let q = c.upstreams[0].scram.clone().unwrap().auth_query.unwrap();
    assert_eq!(q.database, "postgres");
    assert_eq!(q.query, DEFAULT_AUTH_QUERY);
    let err = scram("auth = \"scram\"\nauth_user = \"pgbastion\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("go together"), "{err}");
    let err = scram("secrets_file = \"users.txt\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("are for auth = \"scram\""), "{err}");
    let err = scram("auth = \"kerberos\"").unwrap_err().to_string();
    assert!(err.contains("kerberos"), "{err}");
    assert_eq!(
        Config::from_toml(MINIMAL).unwrap().upstreams[0].auth_mode(),
        AuthMode::Passthrough
    );
}

#[test]
fn durations_are_human() {
    let text = format!("{MINIMAL}\n[timeouts]\nupstream_connect = \"2s 500ms\"\n");
    let c = Config::from_toml(&text).unwrap();
    assert_eq!(c.timeouts.upstream_connect, Duration::from_millis(2500));
}

/// `[[credential]]`, identity-login rules and the client CA warning.
mod credential_tests {
    use super::*;

    const BASE: &str = r#"
        [tls]
        cert = "proxy.crt"
        key = "proxy.key"
        [[listener]]
        name = "mtls"
        listen = "127.0.0.1:6432"
        identity = "client_cert"
        client_ca = "people.pem"
        [[listener]]
        name = "lan"
        listen = "127.0.0.1:6433"
        [[upstream]]
        name = "pg"
        address = "db.example.com:5432"
        ca_file = "ca.pem"
    "#;

    fn with(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{BASE}\n{extra}"))
    }

    #[test]
    fn identity_login_is_refused_where_an_address_could_match() {
        let cred = "[[credential]]\nuser = \"app\"\npassword_file = \"pw\"\n";
        let err = with(&format!(
            "[[rule]]\nname = \"all\"\nlogin = \"identity\"\n{cred}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("rule \"all\"")
                && err.contains("listener \"lan\"")
                && err.contains("not a person"),
            "{err}"
        );
        // Limited to the certificate listener, or to identities that are
        // people: accepted.
        let c = with(&format!(
            "[[rule]]\nlisteners = [\"mtls\"]\nlogin = \"identity\"\n{cred}"
        ))
        .unwrap();
        assert_eq!(c.credentials[0].source.kind().as_str(), "password");
        with(&format!(
            "[[rule]]\nsources = [\"client_cert\"]\nlogin = \"identity\"\n{cred}"
        ))
        .unwrap();
        let err = with("[[rule]]\nlisteners = [\"mtls\"]\nlogin = \"identity\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs [[credential]]"), "{err}");
        let err = with("[[rule]]\nlisteners = [\"mtls\"]\nlogin = \"magic\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("magic"), "{err}");
    }

    /// Issue 19 item 7: a tailnet identity looked up from a PROXY header
    /// that anyone in 0.0.0.0/0 may send is no identity.
    #[test]
    fn identity_and_admin_rules_refuse_a_forgeable_proxy_header() {
        let tailnet = |trusted: &str| {
            format!(
                "[[listener]]\nname = \"ts\"\nlisten = \"127.0.0.1:6434\"\nidentity = \"tailscale\"\n\
                 proxy_protocol = \"required\"\nproxy_trusted = [{trusted}]\n"
            )
        };
        let cred = "[[credential]]\nuser = \"app\"\npassword_file = \"pw\"\n";
        for rule in [
            format!("[[rule]]\nname = \"r\"\nlisteners = [\"ts\"]\nlogin = \"identity\"\n{cred}"),
            "[[rule]]\nname = \"r\"\nlisteners = [\"ts\"]\nadmin = true\n".to_owned(),
        ] {
            // Two /24s: more than 256 senders in all.
            for broad in [
                "\"0.0.0.0/0\"",
                "\"10.0.0.0/8\"",
                "\"127.0.0.1/32\", \"::/0\"",
                "\"192.0.2.0/24\", \"198.51.100.0/24\"",
            ] {
                let err = with(&format!("{}{rule}", tailnet(broad)))
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.contains("rule \"r\"")
                        && err.contains("listener \"ts\"")
                        && err.contains("PROXY header"),
                    "{broad}: {err}"
                );
            }
            // Named hosts (a balancer pair, tailscaled on this host): a choice.
            for narrow in ["\"127.0.0.0/8\"", "\"192.0.2.0/25\", \"2001:db8::1/128\""] {
                with(&format!("{}{rule}", tailnet(narrow))).unwrap();
            }
        }
        // A password login through the same listener is not refused.
        with(&format!(
            "{}[[rule]]\nlisteners = [\"ts\"]\n",
            tailnet("\"0.0.0.0/0\"")
        ))
        .unwrap();
    }

    /// Issue 19 item 7: a client CA that is a public bundle, with a rule
    /// that trusts the certificate alone, is warned about.
    #[test]
    fn a_public_client_ca_with_identity_login_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle.pem");
        let one = "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n";
        std::fs::write(&bundle, one.repeat(PUBLIC_BUNDLE_MIN_CAS)).unwrap();
        let private = dir.path().join("people.pem");
        std::fs::write(&private, one.repeat(2)).unwrap();
        let config = |ca: &Path, rule: &str| {
            Config::from_toml(&format!(
                "{}\n[[listener]]\nname = \"pub\"\nlisten = \"127.0.0.1:6435\"\n\
                 identity = \"client_cert\"\nclient_ca = \"{}\"\n{rule}",
                BASE,
                ca.display()
            ))
            .unwrap()
        };
        let admin = "[[rule]]\nname = \"ops\"\nlisteners = [\"pub\"]\nadmin = true\n";
        let warnings = config(&bundle, admin).warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("listener \"pub\"")
                && warnings[0].contains("public")
                && warnings[0].contains("rule \"ops\""),
            "{warnings:?}"
        );
        assert!(config(&private, admin).warnings().is_empty());
        let password_only = "[[rule]]\nname = \"ops\"\nlisteners = [\"pub\"]\n";
        assert!(config(&bundle, password_only).warnings().is_empty());
    }

    #[test]
    fn a_credential_has_exactly_one_kind() {
        for (body, needle) in [
            (
                "password_file = \"a\"\npassword_env = \"B\"",
                "exactly one of",
            ),
            ("", "exactly one of"),
            ("client_cert = \"c\"", "go together"),
            ("client_key = \"k\"", "go together"),
            (
                "password_file = \"a\"\nupstream = \"nope\"",
                "no upstream named \"nope\"",
            ),
            ("password = \"inline\"", "unknown field `password`"),
        ] {
            let err = with(&format!("[[credential]]\nuser = \"app\"\n{body}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{body}: {err}");
        }
        let err = with(
            "[[credential]]\nuser = \"app\"\npassword_file = \"a\"\n[[credential]]\nuser = \"app\"\npassword_env = \"B\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("two credentials for user \"app\""), "{err}");
        let c =
            with("[[credential]]\nuser = \"app\"\nrds_iam = { region = \"eu-west-1\" }\n").unwrap();
        assert_eq!(
            c.credentials[0].source,
            CredentialSource::RdsIam(RdsIamConfig {
                region: "eu-west-1".into()
            })
        );
    }
}

/// Typed errors: each refusal names the place in the file it is about.
mod key_paths {
    use super::*;

    fn refusal(text: &str) -> ConfigError {
        Config::from_toml(text).unwrap_err()
    }

    #[test]
    fn a_listener_key_is_named_by_the_listener_and_the_key() {
        let err = refusal(&MINIMAL.replace("127.0.0.1:6432", "localhost"));
        assert_eq!(
            err.path(),
            Some(&Section::Listener("listener0".into()).key("listen"))
        );
        assert_eq!(
            err.to_string(),
            "listener \"listener0\".listen: \"localhost\" is not IP:PORT \
             (e.g. \"127.0.0.1:6432\" or \"[::]:6432\")"
        );
        let err = refusal(&MINIMAL.replace(
            "listen = \"127.0.0.1:6432\"",
            "listen = \"127.0.0.1:6432\"\nunix_dir = \"/run\"",
        ));
        assert_eq!(
            err.path(),
            Some(&Section::Listener("listener0".into()).whole()),
            "a rule across keys names the section: {err}"
        );
    }

    #[test]
    fn singleton_sections_name_the_key_at_fault() {
        for (extra, path, says) in [
            (
                "[limits]\nmax_pending = 0",
                "limits.max_pending",
                "must be at least 1",
            ),
            (
                "[limits]\nipv6_prefix = 0",
                "limits.ipv6_prefix",
                "between 1 and 128",
            ),
            (
                "[limits]\nfailed_login_window = \"0s\"",
                "limits.failed_login_window",
                "greater than zero",
            ),
            (
                "[timeouts]\ncancel = \"0s\"",
                "timeouts.cancel",
                "greater than zero",
            ),
            (
                "[admin]\nlisten = \"127.0.0.1:9090\"\nrequest_timeout = \"0s\"",
                "admin.request_timeout",
                "greater than zero",
            ),
            ("[audit]\nlog = \"\"", "audit.log", "file path"),
            (
                "[forward.settings]\n\"user\" = \"x\"",
                "forward.settings.\"user\"",
                "prefix.name",
            ),
            (
                "[forward]\napplication_name = \"{who}\"",
                "forward.application_name",
                "unknown placeholder",
            ),
        ] {
            let err = refusal(&format!("{MINIMAL}\n{extra}\n"));
            let at = err.path().map(ToString::to_string);
            assert_eq!(at.as_deref(), Some(path), "{extra}: {err}");
            assert_eq!(err.to_string(), format!("{path}: {}", reason(&err)));
            assert!(err.to_string().contains(says), "{extra}: {err}");
        }
    }

    fn reason(err: &ConfigError) -> &str {
        match err {
            ConfigError::Invalid { reason, .. } => reason,
            other => panic!("not Invalid: {other}"),
        }
    }

    #[test]
    fn upstream_credential_and_rule_paths() {
        let err = refusal(&MINIMAL.replace("ca_file", "server_name = \"no way\"\nca_file"));
        assert_eq!(
            err.path(),
            Some(&Section::Upstream("upstream0".into()).key("server_name"))
        );
        let err = refusal(&format!(
            "{MINIMAL}\n[[credential]]\nuser = \"app\"\npassword_file = \"a\"\nupstream = \"nope\"\n"
        ));
        assert_eq!(
            err.to_string(),
            "credential 1 (user \"app\").upstream: no upstream named \"nope\""
        );
        let err = refusal(&format!(
            "{MINIMAL}\n[[rule]]\nname = \"r\"\nlisteners = [\"nope\"]\n"
        ));
        assert_eq!(
            err.path(),
            Some(&Section::Rule("r".into()).key("listeners"))
        );
        let err = refusal(&format!(
            "{MINIMAL}\n[cluster]\nsecret_file = \"k\"\nredis = \"redis://r\"\ninstance = \"\"\n"
        ));
        assert_eq!(
            err.to_string(),
            "cluster.instance: must be 1 to 128 characters"
        );
    }

    #[test]
    fn refusals_about_the_whole_file() {
        let two = format!("{MINIMAL}\n[[upstream]]\naddress = \"b:5432\"\nname = \"upstream0\"\nca_file = \"x\"\n");
        let err = refusal(&two);
        assert!(
            matches!(&err, ConfigError::DuplicateName { section: "upstream", name } if name == "upstream0"),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "two upstreams are named \"upstream0\": names must be unique"
        );
        let err = refusal("[[upstream]]\naddress = \"db:5432\"\nsystem_roots = true\n");
        assert!(matches!(
            err,
            ConfigError::Missing {
                section: "listener"
            }
        ));
        assert_eq!(err.to_string(), "at least one [[listener]] is required");
        let err = refusal(&format!(
            "{MINIMAL}\n[[rule]]\nname = \"r\"\nmax_sessions = 0\n"
        ));
        assert!(matches!(err, ConfigError::Policy(_)), "{err}");
        assert!(err.path().is_none());
    }
}

/// `[audit]` is one section of `Config`.
#[test]
fn the_audit_section_is_one_struct() {
    let c = Config::from_toml(&format!(
        "{MINIMAL}\n[audit]\nlog = \"off\"\non_failure = \"refuse\"\nchain_key_file = \"k\"\nredact = false\n"
    ))
    .unwrap();
    assert_eq!(
        c.audit,
        AuditConfig {
            target: AuditTarget::Off,
            on_failure: AuditOnFailure::Refuse,
            chain_key: Some("k".into()),
            redact: false,
        }
    );
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.audit.on_failure, AuditOnFailure::Continue);
    assert_eq!(c.audit.chain_key, None);
    assert!(c.audit.redact, "redacted by default");
    let c =
        Config::from_toml(&format!("{MINIMAL}\n[audit]\nlog = \"/var/log/a.jsonl\"\n")).unwrap();
    assert_eq!(c.audit.target, AuditTarget::File("/var/log/a.jsonl".into()));
}

/// `pgbastion run` flags go through the same checks as a file.
#[test]
fn flags_build_the_same_model() {
    let err = Config::from_flags(Flags::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "--upstream HOST:PORT is required (or use --config FILE)"
    );
    let flags = Flags {
        upstream: Some("db:5432".into()),
        upstream_system_roots: true,
        listen: vec!["127.0.0.1:6432".into()],
        ..Flags::default()
    };
    let err = Config::from_flags(Flags {
        tls_cert: Some("c".into()),
        ..flags.clone()
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "--tls-cert and --tls-key go together");
    let err = Config::from_flags(flags.clone()).unwrap_err();
    assert!(err.to_string().contains("requires client TLS"), "{err}");
    let c = Config::from_flags(Flags {
        client_tls: Some(ClientTlsMode::Allow),
        unix_dir: Some("/run/pgb".into()),
        port: Some(7000),
        audit_on_failure: Some(AuditOnFailure::Refuse),
        admin_listen: Some("127.0.0.1:9090".parse().unwrap()),
        max_sessions: Some(7),
        ..flags
    })
    .unwrap();
    let names: Vec<_> = c.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["listener0", "unix"]);
    assert_eq!(
        c.listeners[1].bind,
        BindAddress::Unix("/run/pgb/.s.PGSQL.7000".into())
    );
    assert_eq!(c.upstreams[0].name, "upstream");
    assert_eq!(c.audit.on_failure, AuditOnFailure::Refuse);
    assert_eq!(c.limits.max_sessions, 7);
    let admin = c.admin.unwrap();
    assert_eq!(
        (admin.max_connections, admin.request_timeout),
        (256, Duration::from_secs(5))
    );
}

/// `[[upstream]]` pooling (issue 21): `pool_mode` and its keys, their
/// defaults, and each refusal with the key it names.
mod pool_tests {
    use super::*;

    const SCRAM: &str = "auth = \"scram\"\nsecrets_file = \"users.txt\"";

    fn upstream(keys: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&MINIMAL.replace("ca_file", &format!("{keys}\nca_file")))
    }

    fn pool(keys: &str) -> Option<PoolConfig> {
        upstream(keys).unwrap().upstreams[0].pool.clone()
    }

    #[test]
    fn unpooled_by_default_and_defaults_once_a_mode_is_set() {
        assert_eq!(Config::from_toml(MINIMAL).unwrap().upstreams[0].pool, None);
        assert_eq!(pool(SCRAM), None);
        let p = pool(&format!("{SCRAM}\npool_mode = \"transaction\"")).unwrap();
        assert_eq!(p, PoolConfig::default());
        assert_eq!(
            (p.size, p.min_size, p.max_server_connections),
            (20, 0, None)
        );
        assert_eq!(
            (
                p.server_idle_timeout,
                p.server_lifetime,
                p.query_wait_timeout
            ),
            (
                Duration::from_secs(600),
                Duration::from_secs(3600),
                Duration::from_secs(120)
            )
        );
        assert_eq!(p.max_prepared_statements, 200);
        let p = pool(&format!("{SCRAM}\npool_mode = \"session\"")).unwrap();
        assert_eq!((p.mode, p.mode.as_str()), (PoolMode::Session, "session"));
        // auth_query alone is a key of pgbastion's own too.
        let q = "auth = \"scram\"\nauth_user = \"pgb\"\nauth_password_file = \"pw\"";
        assert!(pool(&format!("{q}\npool_mode = \"transaction\"")).is_some());
    }

    #[test]
    fn every_key_is_read() {
        let p = pool(&format!(
            "{SCRAM}\npool_mode = \"transaction\"\npool_size = 50\nmin_pool_size = 5\n\
             max_server_connections = 30\nserver_idle_timeout = \"5m\"\n\
             server_lifetime = \"2h 30m\"\nquery_wait_timeout = \"30s\"\n\
             max_prepared_statements = 1000"
        ))
        .unwrap();
        assert_eq!(
            p,
            PoolConfig {
                mode: PoolMode::Transaction,
                size: 50,
                min_size: 5,
                // Fewer than pool_size: allowed, it caps the pools together.
                max_server_connections: Some(30),
                server_idle_timeout: Duration::from_secs(300),
                server_lifetime: Duration::from_secs(9000),
                query_wait_timeout: Duration::from_secs(30),
                max_prepared_statements: 1000,
            }
        );
        // The bounds themselves are accepted.
        let edges = pool(&format!(
            "{SCRAM}\npool_mode = \"session\"\npool_size = 10000\nmin_pool_size = 10000\n\
             max_server_connections = 1\nserver_idle_timeout = \"1s\"\nserver_lifetime = \"1s\"\n\
             query_wait_timeout = \"1s\"\nmax_prepared_statements = 1"
        ))
        .unwrap();
        assert_eq!((edges.size, edges.min_size), (10000, 10000));
    }

    #[test]
    fn each_refusal_names_its_key() {
        let pooled = format!("{SCRAM}\npool_mode = \"transaction\"");
        for (keys, key, says) in [
            (
                format!("{SCRAM}\npool_size = 5"),
                "pool_size",
                "pool_size has no effect without pool_mode = \"transaction\" or \"session\"",
            ),
            (
                "max_prepared_statements = 5".to_owned(),
                "max_prepared_statements",
                "no effect without pool_mode",
            ),
            (
                format!("{SCRAM}\nquery_wait_timeout = \"1m\""),
                "query_wait_timeout",
                "no effect without pool_mode",
            ),
            (
                "pool_mode = \"transaction\"".to_owned(),
                "pool_mode",
                "needs a key pgbastion holds",
            ),
            (
                "pool_mode = \"session\"\nauth = \"passthrough\"".to_owned(),
                "pool_mode",
                "auth_user + auth_password_file",
            ),
            (
                format!("{pooled}\nsend_proxy_protocol = \"v1\""),
                "send_proxy_protocol",
                "only its first client",
            ),
            (
                format!("{pooled}\nsend_proxy_protocol = \"v2\""),
                "send_proxy_protocol",
                "[forward.settings]",
            ),
            (
                format!("{pooled}\npool_size = 0"),
                "pool_size",
                "between 1 and 10000, not 0",
            ),
            (
                format!("{pooled}\npool_size = 10001"),
                "pool_size",
                "between 1 and 10000",
            ),
            (
                format!("{pooled}\nmin_pool_size = 21"),
                "min_pool_size",
                "more than pool_size (20)",
            ),
            (
                format!("{pooled}\npool_size = 5\nmin_pool_size = 6"),
                "min_pool_size",
                "6 is more than pool_size (5)",
            ),
            (
                format!("{pooled}\nmax_server_connections = 0"),
                "max_server_connections",
                "at least 1",
            ),
            (
                format!("{pooled}\nserver_idle_timeout = \"0s\""),
                "server_idle_timeout",
                "at least 1s, not 0s",
            ),
            (
                format!("{pooled}\nserver_lifetime = \"500ms\""),
                "server_lifetime",
                "at least 1s, not 500ms",
            ),
            (
                format!("{pooled}\nquery_wait_timeout = \"0s\""),
                "query_wait_timeout",
                "at least 1s",
            ),
            (
                format!("{pooled}\nmax_prepared_statements = 0"),
                "max_prepared_statements",
                "between 1 and 10000",
            ),
            (
                format!("{pooled}\nmax_prepared_statements = 10001"),
                "max_prepared_statements",
                "between 1 and 10000",
            ),
        ] {
            let err = upstream(&keys).unwrap_err();
            assert_eq!(
                err.path(),
                Some(&Section::Upstream("upstream0".into()).key(key)),
                "{keys}: {err}"
            );
            assert!(
                err.to_string()
                    .starts_with(&format!("upstream \"upstream0\".{key}: ")),
                "{err}"
            );
            assert!(err.to_string().contains(says), "{keys}: {err}");
        }
        let err = upstream("pool_mode = \"transaction\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("auth = \"scram\"") && err.contains("login = \"identity\""),
            "{err}"
        );
        for (keys, says) in [
            ("pool_mode = \"statement\"", "statement"),
            ("pool_size = -1", "pool_size"),
            ("server_lifetime = \"forever\"", "server_lifetime"),
            ("pool_sise = 5", "pool_sise"),
        ] {
            let err = upstream(&format!("{pooled}\n{keys}")).unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }), "{keys}: {err}");
            assert!(err.to_string().contains(says), "{keys}: {err}");
        }
    }

    #[test]
    fn the_flags_are_the_same_keys() {
        let flags = Flags {
            upstream: Some("db:5432".into()),
            upstream_system_roots: true,
            unix_dir: Some("/run/pgb".into()),
            auth: Some(AuthMode::Scram),
            secrets_file: Some("users.txt".into()),
            ..Flags::default()
        };
        let c = Config::from_flags(flags.clone()).unwrap();
        assert_eq!(c.upstreams[0].pool, None);
        let c = Config::from_flags(Flags {
            pool_mode: Some(PoolMode::Session),
            pool_size: Some(8),
            min_pool_size: Some(2),
            max_server_connections: Some(100),
            server_idle_timeout: Some(Duration::from_secs(60)),
            server_lifetime: Some(Duration::from_secs(1800)),
            query_wait_timeout: Some(Duration::from_secs(5)),
            max_prepared_statements: Some(50),
            ..flags.clone()
        })
        .unwrap();
        assert_eq!(
            c.upstreams[0].pool,
            Some(PoolConfig {
                mode: PoolMode::Session,
                size: 8,
                min_size: 2,
                max_server_connections: Some(100),
                server_idle_timeout: Duration::from_secs(60),
                server_lifetime: Duration::from_secs(1800),
                query_wait_timeout: Duration::from_secs(5),
                max_prepared_statements: 50,
            })
        );
        let at = Section::Upstream("upstream".into());
        for (wrong, key) in [
            (
                Flags {
                    pool_size: Some(8),
                    ..flags.clone()
                },
                "pool_size",
            ),
            (
                Flags {
                    pool_mode: Some(PoolMode::Transaction),
                    auth: None,
                    secrets_file: None,
                    ..flags.clone()
                },
                "pool_mode",
            ),
            (
                Flags {
                    pool_mode: Some(PoolMode::Transaction),
                    query_wait_timeout: Some(Duration::ZERO),
                    ..flags.clone()
                },
                "query_wait_timeout",
            ),
        ] {
            let err = Config::from_flags(wrong).unwrap_err();
            assert_eq!(err.path(), Some(&at.key(key)), "{err}");
        }
    }
}

#[test]
fn tls_sni_names_are_lowercase_dns_names_or_wildcards_each_in_one_entry() {
    let with = |sni: &str| {
        Config::from_toml(&MINIMAL.replace("[[listener]]", &format!("{sni}\n[[listener]]")))
    };
    let c = with(
        r#"
        [[tls.sni]]
        names = ["Orders.Test", "billing.test"]
        cert = "orders.crt"
        key = "orders.key"
        [[tls.sni]]
        names = ["*.tenants.test"]
        cert = "tenants.crt"
        key = "tenants.key"
        "#,
    )
    .unwrap();
    let tls = c.tls.as_ref().unwrap();
    assert_eq!(
        tls.sni,
        [
            SniCertConfig {
                names: vec!["orders.test".into(), "billing.test".into()],
                cert: "orders.crt".into(),
                key: "orders.key".into(),
            },
            SniCertConfig {
                names: vec!["*.tenants.test".into()],
                cert: "tenants.crt".into(),
                key: "tenants.key".into(),
            },
        ]
    );
    let files = c.referenced_files();
    for f in ["orders.crt", "orders.key", "tenants.crt", "tenants.key"] {
        assert!(files.contains(&f.into()), "{f}");
    }
    assert!(Config::from_toml(MINIMAL)
        .unwrap()
        .tls
        .unwrap()
        .sni
        .is_empty());

    let entry =
        |names: &str| format!("[[tls.sni]]\nnames = {names}\ncert = \"a.crt\"\nkey = \"a.key\"\n");
    for (sni, index, words) in [
        (entry("[]"), 0, "lists no name"),
        (entry(r#"["a..test"]"#), 0, "not a DNS name"),
        (entry(r#"["db.test."]"#), 0, "not a DNS name"),
        (entry(r#"["*"]"#), 0, "not a DNS name"),
        (entry(r#"["a.*.test"]"#), 0, "not a DNS name"),
        (entry(r#"["*a.test"]"#), 0, "not a DNS name"),
        (entry(r#"["-a.test"]"#), 0, "not a DNS name"),
        (entry(r#"["a b.test"]"#), 0, "not a DNS name"),
        (entry(r#"["a.test", "A.test"]"#), 0, "listed twice"),
        (
            entry(r#"["a.test"]"#) + &entry(r#"["*.x.test", "A.TEST"]"#),
            1,
            "\"A.TEST\" is also in tls.sni[0]",
        ),
    ] {
        let err = with(&sni).unwrap_err();
        assert_eq!(
            err.path(),
            Some(&Section::Tls.key(format!("sni[{index}].names"))),
            "{err}"
        );
        assert!(err.to_string().contains(words), "{sni}: {err}");
    }
    // An entry needs its files.
    let err = with("[[tls.sni]]\nnames = [\"a.test\"]\ncert = \"a.crt\"\n").unwrap_err();
    assert!(err.to_string().contains("key"), "{err}");
}

#[test]
fn https_listeners_take_their_http_table_and_refuse_what_they_cannot_serve() {
    let https = |keys: &str| {
        Config::from_toml(&format!(
            r#"
            [tls]
            cert = "proxy.crt"
            key = "proxy.key"

            [[listener]]
            name = "web"
            listen = "127.0.0.1:8443"
            protocol = "https"
            {keys}

            [[upstream]]
            address = "db.example.com:5432"
            ca_file = "ca.pem"
            "#
        ))
    };
    let c = https("").unwrap();
    match &c.listeners[0].protocol {
        ListenerProtocol::Https(h) => assert_eq!(h, &HttpSettings::default()),
        other => panic!("{other:?}"),
    }
    let c = https("[listener.http]\nmax_request_bytes = 1024\nrequest_timeout = \"5s\"").unwrap();
    let ListenerProtocol::Https(h) = &c.listeners[0].protocol else {
        panic!("https")
    };
    assert_eq!(h.max_request_bytes, 1024);
    assert_eq!(h.request_timeout, Duration::from_secs(5));
    let err = https("client_tls = \"allow\"").unwrap_err().to_string();
    assert!(err.contains("always TLS"), "{err}");
    let err = https("[listener.http]\nmax_requests = 0")
        .unwrap_err()
        .to_string();
    assert!(err.contains("listener \"web\".http.max_requests"), "{err}");
    let err = https("[listener.http]\nmax_reqests = 1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_reqests"), "{err}");
    // `[listener.http]` only on https listeners.
    let err = Config::from_toml(&format!("{MINIMAL}\n[listener.http]\nmax_requests = 1"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("only for protocol = \"https\""), "{err}");
    assert_eq!(
        Config::from_toml(MINIMAL).unwrap().listeners[0].protocol,
        ListenerProtocol::Postgres
    );
}
