//! A fleet of pgbastion instances sharing state through a real Redis
//! (issue 13): cancels that land on another instance than the session's,
//! Redis going away and coming back, what a Redis reader can see, and
//! limits that count across instances.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use pgbastion::config::BindAddress;
use tokio_postgres::tls::MakeTlsConnect;

/// One pgbastion of the fleet: a listener behind the balancer (PROXY v2),
/// one clients reach directly, and the admin listener.
struct Instance {
    name: String,
    proxy: Proxy,
    lb: SocketAddr,
    direct: SocketAddr,
    admin: SocketAddr,
}

impl Instance {
    fn start(env: &Env, redis_url: &str, secret: &Path, name: &str, extra: &str) -> Instance {
        Instance::start_with(
            env,
            &format!("redis = \"{redis_url}\"\n"),
            secret,
            name,
            extra,
        )
    }

    /// `redis_keys`: the `[cluster]` lines naming Redis.
    fn start_with(env: &Env, redis_keys: &str, secret: &Path, name: &str, extra: &str) -> Instance {
        let admin_port = pgbastion::dev::localpg::free_port().unwrap();
        let proxy = Proxy::start_toml(&format!(
            "{}\n[[listener]]\nname = \"direct\"\nlisten = \"127.0.0.1:0\"\nclient_tls = \"allow\"\n\
             [[listener]]\nname = \"lb\"\nlisten = \"127.0.0.1:0\"\nclient_tls = \"allow\"\n\
             proxy_protocol = \"required\"\nproxy_trusted = [\"127.0.0.1/32\"]\n{}\n{extra}\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
             [cluster]\n{redis_keys}instance = \"{name}\"\nsecret_file = \"{}\"\ntimeout = \"500ms\"\n",
            env.tls_toml(),
            env.upstream_toml(),
            secret.display()
        ));
        let tcp = |wanted: &str| {
            proxy
                .addrs
                .iter()
                .find_map(|(n, a)| match a {
                    BindAddress::Tcp(a) if n == wanted => Some(*a),
                    _ => None,
                })
                .unwrap()
        };
        Instance {
            name: name.into(),
            lb: tcp("lb"),
            direct: tcp("direct"),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            proxy,
        }
    }

    /// Waits until /metrics says the cluster is `up` (or down).
    fn wait_cluster(&self, up: bool) {
        let want = format!("pgbastion_cluster_up {}", u8::from(up));
        wait_for(
            &format!("{}: {want}", self.name),
            Duration::from_secs(15),
            || {
                http_get(self.admin, "/metrics")
                    .filter(|(_, body)| body.lines().any(|l| l == want))
                    .map(|_| ())
            },
        );
    }

    fn events(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        self.proxy.wait_audit(what, pred)
    }
}

/// The fleet's shared secret, readable by its owner only.
fn secret_file(dir: &Path) -> PathBuf {
    let path = dir.join("cluster.key");
    pgbastion::dev::certs::write_private(
        &path,
        b"c2hhcmVkIGJ5IHRoZSB3aG9sZSBmbGVldCwgMzIrIGJ5dGVz\n",
    )
    .unwrap();
    path
}

/// Which instance's audit has the session.start of `app`, and the event.
fn holder<'a>(fleet: &'a [Instance], app: &str) -> (&'a Instance, serde_json::Value) {
    wait_for(
        &format!("the session.start of {app}"),
        Duration::from_secs(10),
        || {
            fleet.iter().find_map(|i| {
                i.proxy
                    .audit_events()
                    .into_iter()
                    .find(|e| {
                        e["event"] == "session.start" && e["requested"]["application_name"] == app
                    })
                    .map(|e| (i, e))
            })
        },
    )
}

/// The instance that forwarded a cancel for `session_id` from Redis, and
/// its event.
fn remote_forwarder<'a>(
    fleet: &'a [Instance],
    session_id: &serde_json::Value,
) -> (&'a Instance, serde_json::Value) {
    wait_for("the forwarded cancel", Duration::from_secs(10), || {
        fleet.iter().find_map(|i| {
            i.proxy
                .audit_events()
                .into_iter()
                .find(|e| {
                    e["event"] == "session.cancel"
                        && e["outcome"] == "forwarded_remote"
                        && &e["target_session_id"] == session_id
                })
                .map(|e| (i, e))
        })
    })
}

/// Runs `select pg_sleep(30)` on `client` and, once the server runs it,
/// sends the client's CancelRequest to `to` (plaintext, or inside TLS);
/// returns how the query ended.
async fn sleep_and_cancel(
    client: &std::sync::Arc<tokio_postgres::Client>,
    direct: &tokio_postgres::Client,
    app: &str,
    to: SocketAddr,
    env: &Env,
    tls: bool,
) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error> {
    let token = client.cancel_token();
    let (query, _) = start_sleep(client, direct, app).await;
    send_cancel(&token, to, env, tls).await;
    tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("the query ends")
        .unwrap()
}

type Sleep =
    tokio::task::JoinHandle<Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>>;

/// Starts `select pg_sleep(30)` on `client` and waits until the server runs
/// it; returns the query and its server pid. A query that ends before the
/// server is seen running it fails the test with how it ended (a stray
/// cancel, a closed session), not with a 15 s timeout that says nothing.
async fn start_sleep(
    client: &std::sync::Arc<tokio_postgres::Client>,
    direct: &tokio_postgres::Client,
    app: &str,
) -> (Sleep, i32) {
    let running = client.clone();
    let mut query = tokio::spawn(async move { running.simple_query("select pg_sleep(30)").await });
    tokio::select! {
        pid = wait_active(direct, app) => (query, pid),
        ended = &mut query => panic!("{app}: pg_sleep ended before it ran: {ended:?}"),
    }
}

async fn send_cancel(token: &tokio_postgres::CancelToken, to: SocketAddr, env: &Env, tls: bool) {
    let stream = tokio::net::TcpStream::connect(to).await.unwrap();
    if tls {
        let mut make = tls_connector(&env.proxy_ca);
        let connect =
            MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(&mut make, "localhost")
                .unwrap();
        token.cancel_query_raw(stream, connect).await.unwrap();
    } else {
        token
            .cancel_query_raw(stream, tokio_postgres::NoTls)
            .await
            .unwrap();
    }
}

fn cancelled(r: Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>) {
    let e = r.expect_err("the query was cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
}

/// tokio-postgres over TLS to `port`, as `postgres`. (sslmode=prefer
/// only so that its cancel token may also send a plaintext CancelRequest,
/// as PQcancel does; the session itself uses TLS.)
async fn session(env: &Env, port: u16, app: &str) -> std::sync::Arc<tokio_postgres::Client> {
    let conninfo = format!(
        "host=localhost port={port} user=postgres dbname=postgres password={} sslmode=prefer channel_binding=disable application_name={app}",
        env.pg.password
    );
    let (client, conn) = tokio_postgres::connect(&conninfo, tls_connector(&env.proxy_ca))
        .await
        .unwrap();
    tokio::spawn(conn);
    std::sync::Arc::new(client)
}

/// Three instances behind HAProxy (round robin, PROXY v2): a CancelRequest
/// that lands on another instance than the session's is looked up in
/// Redis and forwarded. Real clients through the balancer (psql's
/// plaintext cancel, libpq 18's TLS cancel), and a CancelRequest sent to
/// each of the other two instances directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_the_session_from_any_instance() {
    let env = Env::new();
    let redis = Redis::start();
    let secret = secret_file(env.dir.path());
    let fleet: Vec<Instance> = (1..=3)
        .map(|i| Instance::start(&env, &redis.url(), &secret, &format!("pgb-{i}"), ""))
        .collect();
    for i in &fleet {
        i.wait_cluster(true);
    }
    let lb_port = pgbastion::dev::localpg::free_port().unwrap();
    let servers: String = fleet
        .iter()
        .map(|i| format!("  server {} {} send-proxy-v2\n", i.name, i.lb))
        .collect();
    let _lb = Haproxy::start(
        &format!(
            "frontend fe\n  bind 127.0.0.1:{lb_port}\n  default_backend be\n\
             backend be\n  balance roundrobin\n{servers}"
        ),
        lb_port,
    );
    let direct = env.direct_client().await;

    // psql through the balancer; its Ctrl-C is a new connection, which
    // round robin sends to the next instance.
    let psql = std::process::Command::new("psql")
        .args([
            "-X",
            "-d",
            &format!(
                "host=localhost port={lb_port} user=postgres dbname=postgres sslmode=require \
                 channel_binding=disable application_name=psql-sleeper"
            ),
            "-c",
            "select pg_sleep(30)",
        ])
        .env("PGPASSWORD", &env.pg.password)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_active(&direct, "psql-sleeper").await;
    signal(psql.id(), "-INT");
    let out = tokio::task::spawn_blocking(move || psql.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        stderr(&out).contains("canceling statement due to user request"),
        "{}",
        stderr(&out)
    );
    let (held_by, start) = holder(&fleet, "psql-sleeper");
    let (forwarder, cancel) = remote_forwarder(&fleet, &start["session_id"]);
    assert_ne!(held_by.name, forwarder.name);
    assert_eq!(
        cancel["session_instance"],
        held_by.name.as_str(),
        "{cancel}"
    );
    assert_eq!(cancel["client_tls"]["mode"], "plaintext", "{cancel}");

    // libpq 18's encrypted cancel (PQcancelCreate), through the balancer.
    let password = env.pg.password.clone();
    let r = tokio::task::spawn_blocking(move || {
        libpq18(
            &format!(
                "host=localhost port={lb_port} user=postgres dbname=postgres sslmode=require \
                 channel_binding=disable application_name=libpq18-sleeper password={password}"
            ),
            "cancel",
        )
    })
    .await
    .unwrap();
    assert_eq!(r["sqlstate"], "57014", "{r}");
    assert_eq!(r["cancel_error"], serde_json::Value::Null, "{r}");
    let (held_by, start) = holder(&fleet, "libpq18-sleeper");
    let (forwarder, cancel) = remote_forwarder(&fleet, &start["session_id"]);
    assert_ne!(held_by.name, forwarder.name);
    assert_eq!(cancel["client_tls"]["mode"], "tls", "{cancel}");

    // One session, cancelled from each of the other two instances directly
    // (once in plaintext, once inside TLS).
    let client = session(&env, lb_port, "tpg-sleeper").await;
    let (held_by, start) = holder(&fleet, "tpg-sleeper");
    let others: Vec<&Instance> = fleet.iter().filter(|i| i.name != held_by.name).collect();
    assert_eq!(others.len(), 2);
    for (other, tls) in others.iter().zip([false, true]) {
        cancelled(sleep_and_cancel(&client, &direct, "tpg-sleeper", other.direct, &env, tls).await);
        other.events("the forward", |e| {
            e["outcome"] == "forwarded_remote" && e["target_session_id"] == start["session_id"]
        });
    }
    client
        .simple_query("select 1")
        .await
        .expect("the session goes on");
}

/// Redis stopped: sessions go on, local cancels work, a remote cancel
/// fails cleanly (audited as cluster_unavailable). Redis back (empty):
/// remote cancels work again, without restarting pgbastion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_survives_redis_going_away_and_recovers_by_itself() {
    let env = Env::new();
    let mut redis = Redis::start();
    let secret = secret_file(env.dir.path());
    let a = Instance::start(&env, &redis.url(), &secret, "pgb-a", "");
    let b = Instance::start(&env, &redis.url(), &secret, "pgb-b", "");
    a.wait_cluster(true);
    b.wait_cluster(true);
    let direct = env.direct_client().await;
    let client = session(&env, a.direct.port(), "held").await;
    cancelled(sleep_and_cancel(&client, &direct, "held", b.direct, &env, false).await);

    redis.stop();
    a.wait_cluster(false);
    b.wait_cluster(false);
    client
        .simple_query("select 1")
        .await
        .expect("the session goes on");
    let other = session(&env, b.direct.port(), "new-while-down").await;
    other
        .simple_query("select 1")
        .await
        .expect("new sessions get in");
    // A cancel sent to the session's own instance works as ever.
    cancelled(sleep_and_cancel(&client, &direct, "held", a.direct, &env, true).await);
    // One sent to the other instance cannot be looked up: nothing happens
    // to the query, and the client is told nothing (as PostgreSQL does).
    let token = client.cancel_token();
    let (query, pid) = start_sleep(&client, &direct, "held").await;
    send_cancel(&token, b.direct, &env, false).await;
    b.events("the failed lookup", |e| {
        e["outcome"] == "cluster_unavailable"
    });
    let still: bool = direct
        .query_one(
            "select count(*) = 1 from pg_stat_activity where pid = $1 and state = 'active'",
            &[&pid],
        )
        .await
        .unwrap()
        .get(0);
    assert!(still, "the query still runs");
    send_cancel(&token, a.direct, &env, false).await;
    cancelled(
        tokio::time::timeout(Duration::from_secs(10), query)
            .await
            .unwrap()
            .unwrap(),
    );

    // Back, and empty: the instances write their mappings again.
    redis.restart();
    a.wait_cluster(true);
    b.wait_cluster(true);
    cancelled(sleep_and_cancel(&client, &direct, "held", b.direct, &env, false).await);

    // What b's /metrics counted: two remote forwards, one failed lookup,
    // Redis latencies and the failures of the outage.
    // (The event is recorded once the cancel's connection is closed,
    // which may be just after the query ended.)
    let metrics = wait_for(
        "the second remote forward counted",
        Duration::from_secs(10),
        || {
            http_get(b.admin, "/metrics").map(|(_, m)| m).filter(|m| {
                m.contains("pgbastion_cancel_requests_total{outcome=\"forwarded_remote\"} 2")
            })
        },
    );
    for line in [
        "pgbastion_cancel_requests_total{outcome=\"forwarded_remote\"} 2",
        "pgbastion_cancel_requests_total{outcome=\"cluster_unavailable\"} 1",
        "pgbastion_cluster_up 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    for prefix in [
        "pgbastion_cluster_redis_seconds_count{op=\"cancel_lookup\"} ",
        "pgbastion_cluster_redis_failures_total{op=\"ping\"} ",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(prefix)),
            "{prefix} in:\n{metrics}"
        );
    }
}

/// A pooled session (issue 21) moves between server connections, so only
/// its instance knows where its cancel goes: a cancel sent to another
/// instance is relayed to it over Redis pub/sub, and it forwards the cancel
/// to the connection serving the transaction then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_sessions_cancel_is_relayed_to_its_instance() {
    let env = Env::new();
    let mut redis = Redis::start();
    let secret = secret_file(env.dir.path());
    let pw_file = install_roles(&env);
    let pool = format!(
        "{}pool_mode = \"transaction\"\npool_size = 2\n",
        auth_query_keys(&pw_file)
    );
    let a = Instance::start(&env, &redis.url(), &secret, "pgb-a", &pool);
    let b = Instance::start(&env, &redis.url(), &secret, "pgb-b", &pool);
    let conninfo = format!(
        "host=localhost port={} user=app password={APP_PASSWORD} dbname=postgres sslmode=require application_name=pooled",
        a.direct.port()
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tls_connector(&env.proxy_ca))
        .await
        .expect("connect through a's pool");
    tokio::spawn(connection);
    let client = std::sync::Arc::new(client);
    let direct = env.direct_client().await;
    // Once, then again after Redis restarted empty: the instances
    // subscribe again by themselves.
    for round in 0..2 {
        if round == 1 {
            redis.stop();
            a.wait_cluster(false);
            b.wait_cluster(false);
            redis.restart();
        }
        wait_subscribed(&a, &b, &redis);
        let token = client.cancel_token();
        let running = client.clone();
        let sleeping =
            tokio::spawn(async move { running.batch_execute("SELECT pg_sleep(30)").await });
        wait_for_async("the sleep to run", Duration::from_secs(10), || async {
            let n: i64 = direct
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (n == 1).then_some(())
        })
        .await;
        send_cancel(&token, b.direct, &env, true).await;
        let err = tokio::time::timeout(Duration::from_secs(5), sleeping)
            .await
            .expect("the relayed cancel ended the sleep")
            .unwrap()
            .unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    }

    let start = a.events("the pooled session", |e| {
        e["event"] == "session.start" && e["requested"]["application_name"] == "pooled"
    });
    let cancel = b.events("the relayed cancel", |e| {
        e["event"] == "session.cancel" && e["outcome"] == "relayed_to_instance"
    });
    assert_eq!(cancel["target_session_id"], start["session_id"], "{cancel}");
    assert_eq!(cancel["session_instance"], "pgb-a", "{cancel}");
}

/// Both instances up and subscribed to their relay channels (whose names
/// are as opaque as the keys).
fn wait_subscribed(a: &Instance, b: &Instance, redis: &Redis) {
    a.wait_cluster(true);
    b.wait_cluster(true);
    let mut conn = redis::Client::open(redis.url().as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    wait_for("both subscribers", Duration::from_secs(10), || {
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("pgbastion:relay:*")
            .query(&mut conn)
            .unwrap();
        (channels.len() == 2).then_some(())
    });
}

/// What a reader of Redis finds is of no use for cancelling anything:
/// neither the key pgbastion gave the client nor the server's, in raw or
/// hex form, nor the session's address, id or server pid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_no_usable_cancel_key() {
    let env = Env::new();
    let redis = Redis::start();
    let secret = secret_file(env.dir.path());
    let a = Instance::start(&env, &redis.url(), &secret, "pgb-a", "");
    a.wait_cluster(true);
    let (client, issued) = sniffed_session(a.direct, &env, "watched").await;
    let server_pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let start = a.events("start", |e| e["event"] == "session.start");
    let session_id = start["session_id"].as_str().unwrap().to_owned();

    let mut conn = redis::Client::open(redis.url().as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys: Vec<Vec<u8>> = wait_for("the mapping in Redis", Duration::from_secs(10), || {
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        (!keys.is_empty()).then_some(keys)
    });
    assert_eq!(keys.len(), 1, "one mapping for one session");
    assert!(keys[0].starts_with(b"pgbastion:cancel:"));
    let value: Vec<u8> = redis::cmd("GET").arg(&keys[0]).query(&mut conn).unwrap();
    let seen = [keys[0].clone(), value].concat();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let seen_text = String::from_utf8_lossy(&seen).to_lowercase();
    let pid = issued.process_id.to_be_bytes();
    for (what, needle) in [
        ("the issued key", issued.secret_key.clone()),
        ("the issued pid", pid.to_vec()),
        ("the server pid", server_pid.to_be_bytes().to_vec()),
    ] {
        assert!(
            !seen.windows(needle.len()).any(|w| w == needle.as_slice()),
            "{what} in Redis"
        );
        assert!(!seen_text.contains(&hex(&needle)), "{what} (hex) in Redis");
    }
    for text in [
        issued.process_id.to_string(),
        server_pid.to_string(),
        session_id,
        "127.0.0.1".to_owned(),
        env.pg.port.to_string(),
        "postgres".to_owned(),
    ] {
        assert!(!seen_text.contains(&text), "{text} in Redis: {seen_text}");
    }
    // The mapping goes when the session does.
    drop(client);
    wait_for("the mapping to be deleted", Duration::from_secs(10), || {
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        keys.is_empty().then_some(())
    });
}

/// A rule's max_sessions and the failed-login throttle count across the
/// fleet: sessions and failures on one instance count on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_login_throttling_hold_across_instances() {
    let env = Env::new();
    let pw_file = install_roles(&env);
    let redis = Redis::start();
    let secret = secret_file(env.dir.path());
    let extra = format!(
        "{}\n[[rule]]\nname = \"two-each\"\nmax_sessions = 2\n\
         [limits]\nfailed_logins_per_address = 3\nfailed_logins_per_user = 100\n",
        auth_query_keys(&pw_file)
    );
    // The upstream keys must follow the [[upstream]] header.
    let a = Instance::start(&env, &redis.url(), &secret, "pgb-a", &extra);
    let b = Instance::start(&env, &redis.url(), &secret, "pgb-b", &extra);
    a.wait_cluster(true);
    b.wait_cluster(true);
    let login = |at: SocketAddr, from: &'static str, password: &'static str| async move {
        connect_from(at, from, "app", "postgres", password, "fleet").await
    };

    let first = login(a.direct, "127.0.0.2", APP_PASSWORD).await.unwrap();
    let _second = login(b.direct, "127.0.0.2", APP_PASSWORD).await.unwrap();
    let e = login(a.direct, "127.0.0.2", APP_PASSWORD)
        .await
        .err()
        .unwrap();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "53300");
    assert!(
        db.message().contains("already has 2 sessions")
            && db.message().contains("across all instances"),
        "{}",
        db.message()
    );
    login(b.direct, "127.0.0.3", APP_PASSWORD)
        .await
        .expect("another identity gets in");
    drop(first);
    wait_for_async("the slot to come back", Duration::from_secs(10), || async {
        login(b.direct, "127.0.0.2", APP_PASSWORD).await.ok()
    })
    .await;

    // Two failures on a, one on b: the address has used its 3.
    for at in [a.direct, a.direct, b.direct] {
        let e = login(at, "127.0.0.4", "guess").await.err().unwrap();
        assert_eq!(
            e.as_db_error().map(|d| d.code().code()),
            Some("28P01"),
            "{e}"
        );
    }
    let mut conn = redis::Client::open(redis.url().as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    wait_for(
        "3 failures counted in Redis",
        Duration::from_secs(10),
        || {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("pgbastion:failed-addr:*")
                .query(&mut conn)
                .unwrap();
            let counts: Vec<u64> = keys
                .iter()
                .map(|k| redis::cmd("GET").arg(k).query(&mut conn).unwrap())
                .collect();
            counts.contains(&3).then_some(())
        },
    );
    let e = login(b.direct, "127.0.0.4", APP_PASSWORD)
        .await
        .err()
        .unwrap();
    let db = e.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28000");
    assert!(
        db.message().contains("too many failed login attempts"),
        "{}",
        db.message()
    );
    b.events("throttled", |e| e["reason"] == "auth_throttled");
}

/// `rediss://` is verified like every other TLS connection pgbastion
/// makes: with the right CA the fleet is up; with another CA it never is,
/// and the failures are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_is_verified() {
    let env = Env::new();
    let ca = pgbastion::dev::certs::Ca::new("redis test CA").unwrap();
    let redis = Redis::start_tls(&ca.server_cert(&["localhost"]).unwrap());
    let ca_file = ca.write_cert(env.dir.path(), "redis-ca").unwrap();
    let secret = secret_file(env.dir.path());
    let url = format!("rediss://localhost:{}/0", redis.port);
    let good = Instance::start_with(
        &env,
        &format!(
            "redis = \"{url}\"\nredis_ca_file = \"{}\"\n",
            ca_file.display()
        ),
        &secret,
        "pgb-good",
        "",
    );
    good.wait_cluster(true);
    let wrong = Instance::start_with(
        &env,
        &format!(
            "redis = \"{url}\"\nredis_ca_file = \"{}\"\n",
            env.proxy_ca.display()
        ),
        &secret,
        "pgb-wrong",
        "",
    );
    wait_for("failed PINGs", Duration::from_secs(15), || {
        http_get(wrong.admin, "/metrics")
            .filter(|(_, b)| b.contains("pgbastion_cluster_redis_failures_total{op=\"ping\"}"))
            .map(|_| ())
    });
    wrong.wait_cluster(false);
}

/// Issue 19 item 10: a failure count that lost its expiry refused the user
/// for good ("try again in 0s"). Such a key throttles no one and is given
/// an expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_count_without_expiry_locks_no_one_out_and_is_repaired() {
    let env = Env::new();
    let pw_file = install_roles(&env);
    let redis = Redis::start();
    let secret = secret_file(env.dir.path());
    let a = Instance::start(
        &env,
        &redis.url(),
        &secret,
        "pgb-a",
        &auth_query_keys(&pw_file),
    );
    a.wait_cluster(true);
    let e = connect_from(a.direct, "127.0.0.6", "app", "postgres", "guess", "fail")
        .await
        .err()
        .unwrap();
    assert_eq!(e.as_db_error().map(|d| d.code().code()), Some("28P01"));
    let mut conn = redis::Client::open(redis.url().as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys = wait_for(
        "both failure counts in Redis",
        Duration::from_secs(10),
        || {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("pgbastion:failed-*")
                .query(&mut conn)
                .unwrap();
            (keys.len() == 2).then_some(keys)
        },
    );
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(k).query(&mut conn).unwrap();
        assert!(ttl > 0, "{k} has an expiry: {ttl}");
        // What the two-command race left behind: a count with no expiry.
        let () = redis::cmd("SET").arg(k).arg(1000).query(&mut conn).unwrap();
        let ttl: i64 = redis::cmd("PTTL").arg(k).query(&mut conn).unwrap();
        assert_eq!(ttl, -1);
    }
    connect_from(a.direct, "127.0.0.6", "app", "postgres", APP_PASSWORD, "in")
        .await
        .expect("a count without expiry throttles no one");
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL").arg(k).query(&mut conn).unwrap();
        assert!(ttl > 0, "{k} was given an expiry: {ttl}");
    }
}

/// Issue 19 item 22: a Redis that refused pgbastion from the start (a
/// wrong password) was never logged. Every failed attempt is (at a
/// limited rate), and so is the moment it is accepted.
#[test]
fn a_redis_that_refuses_pgbastion_from_the_start_is_logged() {
    let certs = ProxyCerts::new();
    let dir = certs.dir.path();
    let redis = Redis::start();
    let mut conn = redis::Client::open(redis.url().as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("the-right-one")
        .query(&mut conn)
        .unwrap();
    let password = dir.join("redis-password");
    pgbastion::dev::certs::write_private(&password, b"not-the-right-one\n").unwrap();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let cfg = dir.join("pgbastion.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n\
             [[upstream]]\nname = \"pg\"\naddress = \"localhost:1\"\nca_file = \"{}\"\n\
             [audit]\nlog = \"off\"\n\
             [cluster]\nredis = \"{}\"\nredis_password_file = \"{}\"\nsecret_file = \"{}\"\n",
            certs.tls_toml(),
            certs.proxy_ca.display(),
            redis.url(),
            password.display(),
            secret_file(dir).display()
        ),
    )
    .unwrap();
    let log = dir.join("pgbastion.log");
    let _proc = Running(config_form(&cfg, Some(&log)).spawn().unwrap());
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let line = wait_for("the refusal in the log", Duration::from_secs(10), || {
        read()
            .lines()
            .find(|l| l.contains("Redis is still unavailable"))
            .map(str::to_owned)
    });
    assert!(line.contains("Password authentication failed"), "{line}");
    assert!(
        !line.contains("not-the-right-one"),
        "no secret in the log: {line}"
    );
    // Rate-limited: one attempt per second, not one line per attempt.
    std::thread::sleep(Duration::from_secs(3));
    let lines = read().matches("Redis is still unavailable").count();
    assert!(lines <= 2, "{lines} lines in 3 s:\n{}", read());
    // Accepted: the transition is logged.
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("not-the-right-one")
        .query(&mut conn)
        .unwrap();
    wait_for("the recovery in the log", Duration::from_secs(10), || {
        read().contains("Redis is available").then_some(())
    });
}
