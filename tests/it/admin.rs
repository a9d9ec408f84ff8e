//! The admin HTTP listener (issue 12): Prometheus metrics that a real
//! parser reads and that count what happened, and health probes that
//! follow the server's life.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// /metrics through prometheus_client's OpenMetrics parser.
fn scrape(admin: SocketAddr) -> Vec<serde_json::Value> {
    let (status, body) = http_get(admin, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    let mut child = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/parse_metrics.py"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused /metrics (the test command installs prometheus_client): {}\n{body}",
        stderr(&out)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The value of the sample `name` whose labels include `labels`.
fn value(samples: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .and_then(|s| s["value"].as_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_sessions_rejections_and_cancels() {
    let env = Env::new();
    let admin: SocketAddr = format!(
        "127.0.0.1:{}",
        pgbastion::dev::localpg::free_port().unwrap()
    )
    .parse()
    .unwrap();
    let proxy = env.proxy("require", &format!("[admin]\nlisten = \"{admin}\"\n"));
    for _ in 0..2 {
        let (client, conn) = proxy.client(&env, "").await.unwrap();
        client.simple_query("select 1").await.unwrap();
        drop(client);
        let _ = conn.await;
    }
    // A plaintext client on a TLS-only listener.
    let mut raw_client = raw(proxy.addr()).await;
    let startup = pgbastion::protocol::startup::StartupMessage::new(
        pgbastion::protocol::startup::ProtocolVersion { major: 3, minor: 0 },
        vec![("user".into(), "postgres".into())],
    );
    raw_client.write_all(startup.as_bytes()).await.unwrap();
    let (code, _) = read_error(&mut raw_client).await;
    assert_eq!(code, "28000");
    // A cancel request nobody knows.
    let mut cancel = raw(proxy.addr()).await;
    cancel
        .write_all(&[0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 1, 0, 0, 0, 2])
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = cancel.read_to_end(&mut rest).await;

    // Everything is counted once the last session's end is.
    let samples = wait_for("the counts", Duration::from_secs(10), || {
        let s = scrape(admin);
        (value(
            &s,
            "pgbastion_cancel_requests_total",
            &[("outcome", "unmatched")],
        ) == Some(1.0)
            && value(&s, "pgbastion_audit_events_written_total", &[]) == Some(6.0))
        .then_some(s)
    });
    let at = [("listener", "tcp"), ("upstream", "pg")];
    assert_eq!(
        value(
            &samples,
            "pgbastion_sessions_total",
            &[at[0], at[1], ("outcome", "client_closed")]
        ),
        Some(2.0)
    );
    assert_eq!(value(&samples, "pgbastion_sessions_active", &at), Some(0.0));
    assert_eq!(
        value(
            &samples,
            "pgbastion_rejections_total",
            &[("listener", "tcp"), ("reason", "tls_required")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &samples,
            "pgbastion_authentications_total",
            &[("mode", "passthrough"), ("result", "ok")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &samples,
            "pgbastion_upstream_connect_seconds_count",
            &[("upstream", "pg")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &samples,
            "pgbastion_upstream_tls_handshake_seconds_count",
            &[("upstream", "pg")]
        ),
        Some(2.0)
    );
    assert!(value(
        &samples,
        "pgbastion_relayed_bytes_total",
        &[("direction", "server_to_client")]
    )
    .is_some_and(|b| b > 0.0));
    assert_eq!(
        value(&samples, "pgbastion_audit_events_dropped_total", &[]),
        Some(0.0)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for cert in ["tls", "upstream_ca:pg"] {
        let t = value(
            &samples,
            "pgbastion_certificate_expiry_timestamp_seconds",
            &[("certificate", cert)],
        )
        .unwrap_or_else(|| panic!("expiry of {cert}"));
        assert!(t > now, "{cert} expires in the future");
    }
    assert_eq!(http_get(admin, "/livez").unwrap().0, 200);
    assert_eq!(http_get(admin, "/readyz").unwrap().0, 200);
    assert_eq!(http_get(admin, "/startupz").unwrap().0, 200);
    assert_eq!(http_get(admin, "/other").unwrap().0, 404);
}

/// At SIGTERM /readyz says 503 while the listeners still accept (for
/// `unready_grace`), so a balancer stops sending before they close.
#[test]
fn readyz_turns_503_at_sigterm_before_the_listeners_close() {
    let env = Env::new();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let admin_port = pgbastion::dev::localpg::free_port().unwrap();
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let cfg = env.dir.path().join("pgbastion.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n{}\n[admin]\nlisten = \"{admin}\"\nunready_grace = \"3s\"\n[audit]\nlog = \"off\"\n",
            env.tls_toml(),
            env.upstream_toml()
        ),
    )
    .unwrap();
    let mut proc = Running(config_form(&cfg, None).spawn().unwrap());
    let addr = wait_listening(port);
    wait_for("ready", Duration::from_secs(10), || {
        (http_get(admin, "/readyz")?.0 == 200).then_some(())
    });
    signal(proc.0.id(), "-TERM");
    wait_for("503", Duration::from_secs(2), || {
        (http_get(admin, "/readyz")?.0 == 503).then_some(())
    });
    assert!(
        std::net::TcpStream::connect(addr).is_ok(),
        "the listener still accepts during the grace"
    );
    assert_eq!(
        http_get(admin, "/livez").unwrap().0,
        200,
        "alive while draining"
    );
    let status = wait_for("exit", Duration::from_secs(20), || {
        proc.0.try_wait().unwrap()
    });
    assert!(status.success());
}

/// Issue 19 item 19: the admin listener had no connection cap (thousands
/// of half-sent requests held 88 MB and as many open files). Past
/// `max_connections`, a new connection takes the place of the oldest
/// half-sent one; each must send its request head within 2 s; and
/// /metrics answers again afterwards.
///
/// Issue 19 adversarial M3: a full listener used to close new connections
/// instead, so half-sent requests (renewed as they expired) made /livez
/// fail, enough for a liveness probe to restart pgbastion. With the cap
/// full of half-sent requests, a probe still answers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_caps_connections_and_ends_slow_requests() {
    let env = Env::new();
    let admin_port = pgbastion::dev::localpg::free_port().unwrap();
    let admin: SocketAddr = ([127, 0, 0, 1], admin_port).into();
    let _proxy = env.proxy(
        "allow",
        &format!("[admin]\nlisten = \"{admin}\"\nmax_connections = 4\nrequest_timeout = \"10s\"\n"),
    );
    wait_for("the admin listener", Duration::from_secs(10), || {
        http_get(admin, "/livez")
    });
    let started = std::time::Instant::now();
    let mut half_sent = Vec::new();
    for _ in 0..7 {
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        half_sent.push(s);
    }
    let probe = tokio::task::spawn_blocking(move || {
        let asked = std::time::Instant::now();
        (http_get(admin, "/livez"), asked.elapsed())
    })
    .await
    .unwrap();
    assert_eq!(
        probe.0,
        Some((200, "ok\n".to_owned())),
        "a probe answers while half-sent requests fill the cap"
    );
    assert!(probe.1 < Duration::from_secs(1), "promptly: {:?}", probe.1);
    // Closed when? None: still open after 5 s.
    let mut waits = tokio::task::JoinSet::new();
    for mut s in half_sent {
        waits.spawn(async move {
            let mut b = [0u8; 64];
            let end = tokio::time::timeout_at(
                tokio::time::Instant::from_std(started + Duration::from_secs(5)),
                s.read(&mut b),
            )
            .await;
            matches!(end, Ok(Ok(0)) | Ok(Err(_))).then(|| started.elapsed())
        });
    }
    let closed_at = waits.join_all().await;
    let prompt = closed_at
        .iter()
        .filter(|t| t.is_some_and(|t| t < Duration::from_millis(1500)))
        .count();
    assert_eq!(
        prompt, 4,
        "the 3 past the cap, and one more for the probe, make room at once: {closed_at:?}"
    );
    let at_deadline = closed_at
        .iter()
        .filter(|t| t.is_some_and(|t| t >= Duration::from_millis(1900)))
        .count();
    assert_eq!(
        at_deadline, 3,
        "the others when the 2 s for the request head (not request_timeout) are up: {closed_at:?}"
    );
    let (status, body) = http_get(admin, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(body.contains("pgbastion_"), "{body}");
}
