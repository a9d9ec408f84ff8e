//! Who is connecting, and whether policy lets them in: client
//! certificates, tailnet identity from a LocalAPI stand-in (the one allowed
//! stand-in: tailscaled cannot run here; it serves WhoIs JSON in the shape
//! Tailscale documents), source networks, and policy reload on SIGHUP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use pgbastion::dev::certs::Ca;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Creates `app`, and the roles `app_rw` and `app_ro` with the superuser's
/// password (so one PGPASSWORD serves every test client).
async fn create_app_roles(env: &Env) {
    let direct = env.direct_client().await;
    for role in ["app_rw", "app_ro"] {
        direct
            .batch_execute(&format!(
                "create role {role} login password '{}'",
                env.pg.password
            ))
            .await
            .unwrap();
    }
    direct.batch_execute("create database app").await.unwrap();
}

/// pgbastion with one mutual-TLS listener ("mtls") for `ca`'s people,
/// naming them by `cert_identity`, and `rules`.
fn mtls_proxy(env: &Env, ca: &std::path::Path, cert_identity: &str, rules: &str) -> Proxy {
    Proxy::start_toml(&format!(
        "{tls}\n[[listener]]\nname = \"mtls\"\nlisten = \"127.0.0.1:0\"\nidentity = \"client_cert\"\n\
         client_ca = \"{ca}\"\ncert_identity = {cert_identity}\n{upstream}\n{rules}",
        tls = env.tls_toml(),
        ca = ca.display(),
        upstream = env.upstream_toml()
    ))
}

/// psql's connection string to `proxy`'s database app as `user`, with the
/// client certificate `who`.
fn mtls_conninfo(env: &Env, proxy: &Proxy, who: &(PathBuf, PathBuf), user: &str) -> String {
    format!(
        "host=localhost port={} dbname=app user={user} sslmode=verify-full sslrootcert={} channel_binding=disable sslcert={} sslkey={}",
        proxy.addr().port(),
        env.proxy_ca.display(),
        who.0.display(),
        who.1.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_and_per_person_rules() {
    let env = Env::new();
    create_app_roles(&env).await;
    let dir = env.dir.path();
    let people = Ca::new("people CA").unwrap();
    let people_ca = people.write_cert(dir, "people-ca").unwrap();
    let alice = person(&people, dir, "alice");
    let bob = person(&people, dir, "bob");
    let mallory = person(&Ca::new("someone else's CA").unwrap(), dir, "mallory");
    let proxy = mtls_proxy(
        &env,
        &people_ca,
        r#"["email", "cn"]"#,
        "[[rule]]\nname = \"alice-rw\"\nnames = [\"alice@example.com\"]\ndatabases = [\"app\"]\nusers = [\"app_rw\"]\n\
         [[rule]]\nname = \"bob-ro\"\nnames = [\"bob@example.com\"]\ndatabases = [\"app\"]\nusers = [\"app_ro\"]\n",
    );
    let conn = |who: &(PathBuf, PathBuf), user: &str| mtls_conninfo(&env, &proxy, who, user);
    for (who, name, user, allowed) in [
        (&alice, "alice", "app_rw", true),
        (&alice, "alice", "app_ro", false),
        (&bob, "bob", "app_ro", true),
        (&bob, "bob", "app_rw", false),
    ] {
        let out = env.psql(&conn(who, user), "select current_user");
        if allowed {
            assert!(out.status.success(), "{name} as {user}: {}", stderr(&out));
            assert_eq!(stdout(&out), user);
        } else {
            let err = stderr(&out);
            assert!(!out.status.success(), "{name} as {user} must be refused");
            assert!(
                err.contains(&format!(
                    "policy does not allow certificate \"{name}@example.com\""
                )) && err.contains(&format!("as user \"{user}\""))
                    && err.contains("no rule matched"),
                "{err}"
            );
        }
    }
    let start = proxy.wait_audit("alice's session", |e| {
        e["event"] == "session.start" && e["identity"]["name"] == "alice@example.com"
    });
    assert_eq!(start["identity"]["source"], "client_cert");
    assert_eq!(start["rule"], "alice-rw");
    let names = start["identity"]["cert_names"].as_array().unwrap();
    assert!(names.contains(&serde_json::json!("alice")));
    let denied = proxy.wait_audit("bob's refusal", |e| {
        e["event"] == "session.rejected" && e["identity"]["name"] == "bob@example.com"
    });
    assert_eq!(denied["reason"], "policy_denied");
    assert_eq!(denied["sqlstate"], "28000");

    // A certificate from another CA, and no certificate: no TLS session.
    let out = env.psql(&conn(&mallory, "app_rw"), "select 1");
    assert!(!out.status.success());
    let without = format!(
        "host=localhost port={} dbname=app user=app_rw sslmode=verify-full sslrootcert={} channel_binding=disable",
        proxy.addr().port(),
        env.proxy_ca.display()
    );
    let out = env.psql(&without, "select 1");
    assert!(!out.status.success());
    proxy.wait_audit_count("two handshake failures", 2, |e| {
        e["reason"] == "client_tls_handshake_failed"
    });
}

/// Issue 19 item 6: a listener that selects only SAN emails matches rules
/// on SAN emails only. A certificate whose email is bob's but whose subject
/// CN (free text in a signing request) reads "ops@example.com" is bob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_match_only_the_names_cert_identity_selects() {
    let env = Env::new();
    create_app_roles(&env).await;
    let dir = env.dir.path();
    let people = Ca::new("people CA").unwrap();
    let people_ca = people.write_cert(dir, "people-ca").unwrap();
    let ops = person(&people, dir, "ops");
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "ops@example.com");
    p.subject_alt_names = vec![rcgen::SanType::Rfc822Name(
        "bob@example.com".try_into().unwrap(),
    )];
    let bob_as_ops = people.issue(p).unwrap().write(dir, "bob-as-ops").unwrap();
    let proxy = mtls_proxy(
        &env,
        &people_ca,
        r#"["email"]"#,
        "[[rule]]\nname = \"ops\"\nnames = [\"ops@example.com\"]\ndatabases = [\"app\"]\nusers = [\"app_rw\"]\n",
    );
    let conn = |who: &(PathBuf, PathBuf)| mtls_conninfo(&env, &proxy, who, "app_rw");
    let out = env.psql(&conn(&ops), "select current_user");
    assert!(out.status.success(), "ops: {}", stderr(&out));
    let out = env.psql(&conn(&bob_as_ops), "select current_user");
    assert!(
        !out.status.success(),
        "bob's certificate must not pass as ops"
    );
    assert!(
        stderr(&out).contains("policy does not allow certificate \"bob@example.com\""),
        "{}",
        stderr(&out)
    );
    let denied = proxy.wait_audit("bob's refusal", |e| {
        e["event"] == "session.rejected" && e["identity"]["name"] == "bob@example.com"
    });
    assert_eq!(denied["reason"], "policy_denied");
    assert_eq!(
        denied["identity"]["cert_names"],
        serde_json::json!(["bob@example.com"])
    );
}

/// A LocalAPI stand-in: answers `GET /localapi/v0/whois?addr=IP:PORT` with
/// the WhoIs JSON for the peer's IP, 404 for unknown peers, and 403 when
/// the request lacks the headers tailscaled insists on.
struct LocalApi {
    socket: PathBuf,
    requests: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl LocalApi {
    async fn start(peers: HashMap<IpAddr, serde_json::Value>) -> LocalApi {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tailscaled.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let peers = peers.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = s.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                    }
                    let req = String::from_utf8(req).unwrap();
                    seen.lock().unwrap().push(req.clone());
                    let line = req.lines().next().unwrap_or_default().to_owned();
                    let addr = line
                        .strip_prefix("GET /localapi/v0/whois?addr=")
                        .and_then(|r| r.split(' ').next())
                        .map(|a| {
                            a.replace("%3A", ":")
                                .replace("%5B", "[")
                                .replace("%5D", "]")
                        });
                    let ok_headers = req.contains("\r\nHost: local-tailscaled.sock\r\n")
                        && req.contains("\r\nSec-Tailscale: localapi\r\n");
                    let (status, body) = match addr.and_then(|a| a.parse::<SocketAddr>().ok()) {
                        _ if !ok_headers => {
                            ("403 Forbidden", "missing LocalAPI headers\n".to_owned())
                        }
                        Some(a) => match peers.get(&a.ip()) {
                            Some(json) => ("200 OK", json.to_string()),
                            None => ("404 Not Found", "no match for IP:port\n".to_owned()),
                        },
                        None => ("400 Bad Request", "bad addr\n".to_owned()),
                    };
                    let resp = format!(
                        "HTTP/1.0 {status}\r\nContent-Type: application/json\r\n\r\n{body}"
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        LocalApi {
            socket,
            requests,
            _dir: dir,
        }
    }
}

fn user_node(login: &str, node: &str, cap: Option<serde_json::Value>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "Node": {"ID": 1, "StableID": "nStable1", "Name": format!("{node}.tail1234.ts.net."), "Tags": null,
                 "Addresses": ["100.64.0.1/32"], "Hostinfo": {"OS": "linux"}},
        "UserProfile": {"ID": 7, "LoginName": login, "DisplayName": login, "ProfilePicURL": ""},
    });
    if let Some(cap) = cap {
        v["CapMap"] = serde_json::json!({ "example.com/cap/pgbastion": [cap] });
    }
    v
}

fn refusal_text(e: &tokio_postgres::Error) -> String {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse: {e}"));
    assert_eq!(db.code().code(), "28000", "{}", db.message());
    db.message().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_identity_users_tags_and_grants() {
    let env = Env::new();
    create_app_roles(&env).await;
    let mut peers = HashMap::new();
    peers.insert(
        "127.0.0.2".parse().unwrap(),
        user_node("alice@example.com", "alice-laptop", None),
    );
    peers.insert(
        "127.0.0.3".parse().unwrap(),
        serde_json::json!({
            "Node": {"Name": "ci-runner.tail1234.ts.net.", "Tags": ["tag:ci"]},
            "UserProfile": {"LoginName": "tagged-devices"},
        }),
    );
    peers.insert(
        "127.0.0.4".parse().unwrap(),
        user_node(
            "carol@example.com",
            "carol-desktop",
            Some(serde_json::json!({"databases": ["app"], "users": ["app_ro"]})),
        ),
    );
    let api = LocalApi::start(peers).await;
    let toml = format!(
        r#"{tls}
[[listener]]
name = "tailnet"
listen = "127.0.0.1:0"
client_tls = "allow"
identity = "tailscale"
{upstream}
[tailscale]
socket = "{socket}"
capability = "example.com/cap/pgbastion"
[forward]
application_name = "{{application_name}} [{{identity}} on {{node}}]"
[[rule]]
name = "alice"
names = ["alice@example.com"]
databases = ["postgres"]
users = ["postgres"]
[[rule]]
name = "ci"
tags = ["tag:ci"]
databases = ["app"]
users = ["app_rw"]
[[rule]]
name = "granted"
from_grants = true
"#,
        tls = env.tls_toml(),
        upstream = env.upstream_toml(),
        socket = api.socket.display()
    );
    let proxy = Proxy::start_toml(&toml);
    let pw = env.pg.password.as_str();
    let addr = proxy.addr();

    // A user rule.
    let alice = connect_from(addr, "127.0.0.2", "postgres", "postgres", pw, "report")
        .await
        .unwrap();
    let app: String = alice
        .query_one(
            "select application_name from pg_stat_activity where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        app, "report [alice@example.com on alice-laptop.tail1234.ts.net]",
        "identity shown to Postgres"
    );
    let e = connect_from(addr, "127.0.0.2", "app_ro", "app", pw, "x")
        .await
        .err()
        .unwrap();
    assert!(refusal_text(&e)
        .contains("tailnet user \"alice@example.com\" on node \"alice-laptop.tail1234.ts.net\""));

    // A tag rule.
    connect_from(addr, "127.0.0.3", "app_rw", "app", pw, "ci")
        .await
        .unwrap();
    let e = connect_from(addr, "127.0.0.3", "postgres", "postgres", pw, "ci")
        .await
        .err()
        .unwrap();
    assert!(
        refusal_text(&e).contains("tailnet tags \"tag:ci\" on node \"ci-runner.tail1234.ts.net\"")
    );

    // A rule whose databases and users come from the tailnet's grants.
    connect_from(addr, "127.0.0.4", "app_ro", "app", pw, "grafana")
        .await
        .unwrap();
    let e = connect_from(addr, "127.0.0.4", "app_rw", "app", pw, "grafana")
        .await
        .err()
        .unwrap();
    refusal_text(&e);
    assert_eq!(
        e.as_db_error().unwrap().detail(),
        Some("Decided by no rule matched.")
    );

    // An unknown peer is refused.
    let e = connect_from(addr, "127.0.0.5", "postgres", "postgres", pw, "x")
        .await
        .err()
        .unwrap();
    assert!(
        refusal_text(&e).contains("does not know the peer 127.0.0.5"),
        "{e}"
    );

    let start = proxy.wait_audit("alice's start", |e| {
        e["event"] == "session.start" && e["rule"] == "alice"
    });
    assert_eq!(start["identity"]["source"], "tailscale");
    assert_eq!(start["identity"]["name"], "alice@example.com");
    assert_eq!(start["identity"]["node"], "alice-laptop.tail1234.ts.net");
    let ci = proxy.wait_audit("ci's start", |e| {
        e["event"] == "session.start" && e["rule"] == "ci"
    });
    assert_eq!(ci["identity"]["tags"], serde_json::json!(["tag:ci"]));
    let unknown = proxy.wait_audit("the unknown peer", |e| e["reason"] == "identity_failed");
    assert_eq!(unknown["client"]["addr"], "127.0.0.5");
    // WhoIs asked about the exact peer address and port.
    let asked = api.requests.lock().unwrap().clone();
    assert!(
        asked
            .iter()
            .any(|r| r.starts_with("GET /localapi/v0/whois?addr=127.0.0.2%3A")),
        "{asked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localapi_down_means_refusal() {
    let env = Env::new();
    let proxy = env.proxy_with(
        "client_tls = \"allow\"\nidentity = \"tailscale\"",
        &format!(
            "[tailscale]\nsocket = \"{}\"\n",
            env.dir.path().join("no-such.sock").display()
        ),
    );
    let e = connect_from(
        proxy.addr(),
        "127.0.0.2",
        "postgres",
        "postgres",
        &env.pg.password,
        "x",
    )
    .await
    .err()
    .unwrap();
    let msg = refusal_text(&e);
    assert!(
        msg.contains("could not establish who you are") && msg.contains("unreachable"),
        "{msg}"
    );
    let ev = proxy.wait_audit("refusal", |e| e["event"] == "session.rejected");
    assert_eq!(ev["reason"], "identity_failed");
}

/// Issue 19 item 16: PostgreSQL cuts role and database names to 63 bytes,
/// so a deny rule on a 63-byte role name must also catch the same name
/// with anything appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_names_are_matched_as_the_server_truncates_them() {
    let env = Env::new();
    let role = format!("r{}", "x".repeat(62));
    assert_eq!(role.len(), 63);
    let direct = env.direct_client().await;
    direct
        .batch_execute(&format!(
            "create role {role} login password '{}'",
            env.pg.password
        ))
        .await
        .unwrap();
    let proxy = env.proxy_with(
        "client_tls = \"allow\"",
        &format!(
            "[[rule]]\nname = \"no-r\"\naction = \"deny\"\nusers = [\"{role}\"]\n\
             [[rule]]\nname = \"rest\"\n"
        ),
    );
    let pw = env.pg.password.as_str();
    for sent in [role.clone(), format!("{role}-padding")] {
        let e = connect_from(proxy.addr(), "127.0.0.1", &sent, "postgres", pw, "x")
            .await
            .err()
            .unwrap_or_else(|| panic!("{sent} must be denied"));
        let text = refusal_text(&e);
        assert!(text.ends_with(&format!("as user \"{role}\"")), "{text}");
    }
    let denied = proxy.wait_audit_count("two refusals", 2, |e| e["event"] == "session.rejected");
    for e in denied {
        assert_eq!(e["requested"]["user"], role.as_str());
        assert_eq!(e["rule"], "no-r");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_rules_by_cidr() {
    let env = Env::new();
    let proxy = env.proxy_with(
        "client_tls = \"allow\"",
        "[[rule]]\nname = \"office\"\nnetworks = [\"127.0.0.2/32\", \"10.0.0.0/8\"]\n",
    );
    let pw = env.pg.password.as_str();
    connect_from(proxy.addr(), "127.0.0.2", "postgres", "postgres", pw, "x")
        .await
        .unwrap();
    let e = connect_from(proxy.addr(), "127.0.0.3", "postgres", "postgres", pw, "x")
        .await
        .err()
        .unwrap();
    assert!(refusal_text(&e).contains("address \"127.0.0.3\""));
    let ok = proxy.wait_audit("admitted", |e| e["event"] == "session.start");
    assert_eq!(
        ok["identity"],
        serde_json::json!({"source": "network", "name": "127.0.0.2"})
    );
    assert_eq!(ok["rule"], "office");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policy() {
    let env = Env::new();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let config = env.dir.path().join("reload.toml");
    let log = env.dir.path().join("stderr.log");
    let base = format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\nclient_tls = \"allow\"\n{}\n[audit]\nlog = \"{}\"\n",
        env.tls_toml(),
        env.upstream_toml(),
        env.dir.path().join("audit.jsonl").display()
    );
    let write = |rules: &str| std::fs::write(&config, format!("{base}\n{rules}")).unwrap();
    write("[[rule]]\nname = \"v1\"\nusers = [\"postgres\"]\n");
    let proc = Running(
        bin()
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = proc.0.id();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_for("pgbastion to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(addr).ok()
    });
    let pw = env.pg.password.as_str();
    let open = connect_from(addr, "127.0.0.1", "postgres", "postgres", pw, "kept")
        .await
        .unwrap();

    let hup = |what: &'static str| {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        wait_for(what, Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.contains(what).then_some(())
        });
    };
    // A new policy that admits nobody as postgres.
    write("[[rule]]\nname = \"v2\"\nusers = [\"someone_else\"]\n");
    hup("policy and credentials reloaded");
    let e = connect_from(addr, "127.0.0.1", "postgres", "postgres", pw, "new")
        .await
        .err()
        .unwrap();
    assert!(refusal_text(&e).contains("policy does not allow"));
    open.simple_query("select 1")
        .await
        .expect("an admitted session stays open");

    // A broken file is refused; the v2 policy stays.
    write("[[rule]]\nname = \"v3\"\nusers = [\"postgres\"]\nbogus_key = 1\n");
    hup("reload refused");
    let e = connect_from(addr, "127.0.0.1", "postgres", "postgres", pw, "new")
        .await
        .err()
        .unwrap();
    refusal_text(&e);
    open.simple_query("select 1").await.unwrap();
}

/// Identity login on the tailnet: a person whose grant names a role logs
/// in as that role with no password anywhere on their machine, and the
/// audit names the person next to the shared role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailnet_people_log_in_by_identity_as_their_granted_role() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    create_app_roles(&env).await;
    let mut peers = HashMap::new();
    peers.insert(
        "127.0.0.4".parse().unwrap(),
        user_node(
            "carol@example.com",
            "carol-desktop",
            Some(serde_json::json!({"databases": ["app"], "users": ["app_ro"]})),
        ),
    );
    let api = LocalApi::start(peers).await;
    let password = env.dir.path().join("app_ro.password");
    std::fs::write(&password, format!("{}\n", env.pg.password)).unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let proxy = Proxy::start_toml(&format!(
        r#"{tls}
[[listener]]
name = "tailnet"
listen = "127.0.0.1:0"
client_tls = "allow"
identity = "tailscale"
{upstream}
[tailscale]
socket = "{socket}"
capability = "example.com/cap/pgbastion"
[[rule]]
name = "granted"
from_grants = true
login = "identity"
[[credential]]
user = "app_ro"
password_file = "{password}"
"#,
        tls = env.tls_toml(),
        upstream = env.upstream_toml(),
        socket = api.socket.display(),
        password = password.display()
    ));
    // No password: an empty one would be refused by the server if it were
    // ever asked for.
    let carol = connect_from(proxy.addr(), "127.0.0.4", "app_ro", "app", "", "psql")
        .await
        .expect("carol logs in as app_ro with no password");
    let who: String = carol
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "app_ro");
    let start = proxy.wait_audit("carol", |e| e["event"] == "session.start");
    assert_eq!(start["identity"]["name"], "carol@example.com", "{start}");
    assert_eq!(
        start["identity"]["node"], "carol-desktop.tail1234.ts.net",
        "{start}"
    );
    assert_eq!(start["requested"]["user"], "app_ro");
    assert_eq!(start["auth"]["mode"], "identity");
    assert_eq!(start["auth"]["credential"], "password");
    // Her grant does not name app_rw.
    let e = connect_from(proxy.addr(), "127.0.0.4", "app_rw", "app", "", "psql")
        .await
        .err()
        .unwrap();
    assert!(
        refusal_text(&e).contains("policy does not allow"),
        "{}",
        refusal_text(&e)
    );
}

/// A rule's max_sessions caps one identity's concurrent sessions: the
/// third gets 53300 naming the limit, another identity is unaffected, and
/// a slot comes back when a session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_limits_sessions_per_identity() {
    let env = Env::new();
    let proxy = env.proxy_with(
        "client_tls = \"allow\"",
        "[[rule]]\nname = \"two-each\"\nmax_sessions = 2\n",
    );
    let pw = env.pg.password.as_str();
    let addr = proxy.addr();
    let first = connect_from(addr, "127.0.0.2", "postgres", "postgres", pw, "a")
        .await
        .unwrap();
    let _second = connect_from(addr, "127.0.0.2", "postgres", "postgres", pw, "b")
        .await
        .unwrap();
    let e = connect_from(addr, "127.0.0.2", "postgres", "postgres", pw, "c")
        .await
        .err()
        .unwrap();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300");
    assert!(
        db.message().contains("127.0.0.2")
            && db.message().contains("already has 2 sessions")
            && db.message().contains("two-each"),
        "{}",
        db.message()
    );
    let ev = proxy.wait_audit("limit", |e| e["reason"] == "identity_session_limit");
    assert_eq!(ev["sqlstate"], "53300");
    // Another identity is unaffected.
    connect_from(addr, "127.0.0.3", "postgres", "postgres", pw, "d")
        .await
        .expect("another identity gets in");
    // A slot comes back when a session ends.
    drop(first);
    wait_for_async("a slot to come back", Duration::from_secs(10), || async {
        connect_from(addr, "127.0.0.2", "postgres", "postgres", pw, "e")
            .await
            .ok()
    })
    .await;
}
