//! The https listener (issue 23) against the client it exists for: Neon's
//! real `@neondatabase/serverless` driver in Node (tests/clients/serverless, one
//! scenario per run, one JSON line back), over WebSocket (its Pool and
//! Client, both pipeline modes) and SQL over HTTP (`neon()`), plus what
//! the driver never sends, with curl: CORS preflight, the size limits,
//! malformed requests and plaintext on the TLS port.
//!
//! The driver is installed by scripts/test.sh (`npm ci` in tests/clients/serverless); a
//! missing Node or driver fails these tests, never skips them.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::*;

/// How pgbastion checks the password the driver sends.
#[derive(Clone, Copy, PartialEq)]
enum Auth {
    /// `auth = "scram"` against the role's verifier, on a transaction
    /// pool (what a serverless deployment puts behind many short clients).
    ScramPooled,
    /// Passthrough: pgbastion logs in to PostgreSQL with the password.
    Passthrough,
}

/// pgbastion with one https listener (`http_keys`: lines of its
/// `[listener.http]` table) in front of the environment's PostgreSQL, the
/// role `app` and the tables the scenarios write to.
fn https_proxy(env: &Env, auth: Auth, http_keys: &str) -> Proxy {
    https_proxy_on(env, auth, http_keys, None)
}

/// The same, with sessions on `cores` runtimes of their own when given.
fn https_proxy_on(env: &Env, auth: Auth, http_keys: &str, cores: Option<usize>) -> Proxy {
    let pw_file = install_roles(env);
    env.pg
        .run_sql(
            "CREATE TABLE ws_tx (v text); CREATE TABLE http_tx (v text);\n\
             GRANT ALL ON ws_tx, http_tx TO app;",
        )
        .expect("create the scenarios' tables");
    let upstream_keys = match auth {
        Auth::ScramPooled => format!(
            "{}pool_mode = \"transaction\"\npool_size = 4\nquery_wait_timeout = \"5s\"\n",
            auth_query_keys(&pw_file)
        ),
        Auth::Passthrough => String::new(),
    };
    Proxy::start_toml_on(
        &format!(
            "{}\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"https\"\n\
         [listener.http]\n{http_keys}\n{}{upstream_keys}",
            env.tls_toml(),
            env.upstream_toml(),
        ),
        cores,
    )
}

/// Where the driver and the scenarios live.
const NODE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/serverless");

/// Runs `node run.mjs <scenario>` against the proxy with the driver's
/// `pipelineConnect` (`"password"` or `"false"`), and returns its JSON
/// line. Panics (with the scenario's error) if the scenario failed.
fn scenario(proxy: &Proxy, env: &Env, name: &str, pipeline: &str) -> serde_json::Value {
    let (report, out) = run_scenario(proxy, env, name, pipeline);
    assert!(
        out.status.success() && report.get("scenario_failed").is_none(),
        "scenario {name} (pipelineConnect {pipeline}) failed: {report:#}\nstderr: {}",
        stderr(&out)
    );
    report
}

fn run_scenario(
    proxy: &Proxy,
    env: &Env,
    name: &str,
    pipeline: &str,
) -> (serde_json::Value, Output) {
    require_node();
    let out = Command::new("timeout")
        .args(["120", "node", "run.mjs", name])
        .current_dir(NODE_DIR)
        .env("PGB_PORT", proxy.addr().port().to_string())
        .env("PGB_PASSWORD", APP_PASSWORD)
        .env("PGB_PIPELINE", pipeline)
        .env("NODE_EXTRA_CA_CERTS", &env.proxy_ca)
        .output()
        .expect("run timeout(1) and node");
    let text = stdout(&out);
    let last = text.lines().last().unwrap_or_default();
    let report = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "scenario {name}: no JSON line ({e}); status {}\nstdout: {text}\nstderr: {}",
            out.status,
            stderr(&out)
        )
    });
    (report, out)
}

/// Node and the driver must be there: the tests fail, never skip.
fn require_node() {
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is not installed: these tests run Neon's serverless driver in Node.js \
         (scripts/test.sh installs Debian's nodejs and npm)"
    );
    let driver = Path::new(NODE_DIR).join("node_modules/@neondatabase/serverless");
    assert!(
        driver.is_dir() && Path::new(NODE_DIR).join("node_modules/ws").is_dir(),
        "the driver is not installed: run `npm ci` in tests/clients/serverless (scripts/test.sh does)"
    );
}

/// The `session.start` events of sessions carried by `transport`.
fn starts(proxy: &Proxy, transport: &str) -> Vec<serde_json::Value> {
    proxy
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == "session.start" && e["transport"] == transport)
        .collect()
}

/// The WebSocket sessions' audit: at least `min` started, each carried by
/// a WebSocket and authenticated with `mechanism` in `mode`.
fn assert_websocket_audit(proxy: &Proxy, min: usize, mode: &str, mechanism: &str) {
    proxy.wait_audit("a websocket session.start", |e| {
        e["event"] == "session.start" && e["transport"] == "websocket"
    });
    let started = starts(proxy, "websocket");
    assert!(started.len() >= min, "{started:#?}");
    for e in &started {
        assert_eq!(e["listener"], "web", "{e}");
        assert_eq!(e["auth"]["mode"], mode, "{e}");
        assert_eq!(e["auth"]["result"], "ok", "{e}");
        assert_eq!(e["auth"]["client"]["mechanism"], mechanism, "{e}");
        assert_eq!(e["requested"]["user"], "app", "{e}");
    }
}

/// What `ws-queries` must have returned, whichever way it logged in.
fn assert_queries(r: &serde_json::Value) {
    assert_eq!(r["pool_one"], 1, "{r:#}");
    assert_eq!(r["pool_param"]["sum"], 42, "{r:#}");
    assert_eq!(r["pool_param"]["text"], "hé", "{r:#}");
    assert_eq!(
        r["pool_several"],
        serde_json::json!([0, 2, 4, 6, 8]),
        "{r:#}"
    );
    assert_eq!(
        r["parallel"],
        serde_json::json!([0, 1, 2, 3, 4, 5]),
        "{r:#}"
    );
    assert_eq!(r["client"]["who"]["user"], "app", "{r:#}");
    assert_eq!(r["client"]["who"]["database"], "postgres", "{r:#}");
    assert_eq!(
        r["client"]["multi"],
        serde_json::json!([{ "a": 1 }, { "b": "two" }]),
        "{r:#}"
    );
    assert_eq!(r["client"]["param"], "hello!", "{r:#}");
}

#[test]
fn websocket_pool_and_client_with_a_pipelined_password() {
    let env = Env::new();
    let proxy = https_proxy(&env, Auth::ScramPooled, "");
    assert_queries(&scenario(&proxy, &env, "ws-queries", "password"));
    // The password came pipelined with the StartupMessage and was checked
    // against the verifier.
    assert_websocket_audit(&proxy, 2, "scram", "password");
}

/// Per-core (issue 24): WebSocket sessions and SQL-over-HTTP requests
/// are carried into sessions on the cores as TCP clients are.
#[test]
fn the_https_listener_serves_both_carriers_on_a_per_core_runtime() {
    let env = Env::new();
    let proxy = https_proxy_on(&env, Auth::ScramPooled, "", Some(2));
    assert_queries(&scenario(&proxy, &env, "ws-queries", "password"));
    assert_websocket_audit(&proxy, 2, "scram", "password");
    let r = scenario(&proxy, &env, "http-types", "password");
    assert_eq!(r["row"]["int"], 7, "{r:#}");
    assert!(
        !starts(&proxy, "http").is_empty(),
        "SQL-over-HTTP sessions audited"
    );
}

#[test]
fn websocket_pool_and_client_with_scram() {
    let env = Env::new();
    let proxy = https_proxy(&env, Auth::ScramPooled, "");
    assert_queries(&scenario(&proxy, &env, "ws-queries", "false"));
    assert_websocket_audit(&proxy, 2, "scram", "SCRAM-SHA-256");
    for e in starts(&proxy, "websocket") {
        // No channel binding: the driver's SCRAM cannot see the WebSocket's TLS.
        assert_eq!(e["auth"]["client"]["channel_binding"], false, "{e}");
    }
}

#[test]
fn websocket_in_passthrough_mode_both_pipeline_modes() {
    let env = Env::new();
    let proxy = https_proxy(&env, Auth::Passthrough, "");
    assert_queries(&scenario(&proxy, &env, "ws-queries", "password"));
    assert_websocket_audit(&proxy, 2, "passthrough", "password");
    let pipelined = starts(&proxy, "websocket").len();
    assert_queries(&scenario(&proxy, &env, "ws-queries", "false"));
    let scram = proxy.wait_audit_count(
        "the SCRAM sessions' session.start",
        starts(&proxy, "websocket").len() - pipelined,
        |e| {
            e["event"] == "session.start"
                && e["transport"] == "websocket"
                && e["auth"]["client"]["mechanism"] == "SCRAM-SHA-256"
        },
    );
    assert!(scram.len() >= 2, "{scram:#?}");
    let wrong = scenario(&proxy, &env, "ws-wrong-password", "password");
    assert_eq!(wrong["client"]["code"], "28P01", "{wrong:#}");
}

#[test]
fn websocket_interactive_transactions() {
    let env = Env::new();
    let proxy = https_proxy(&env, Auth::ScramPooled, "");
    let r = scenario(&proxy, &env, "ws-transaction", "password");
    assert_eq!(
        r["inside"], 1,
        "the insert is visible in its transaction: {r:#}"
    );
    assert_eq!(r["after_rollback"], 0, "ROLLBACK left the row: {r:#}");
    assert_eq!(r["failed"], "22012", "{r:#}");
    assert_eq!(r["aborted"], "25P02", "{r:#}");
    assert_eq!(r["after_abort"], 3, "{r:#}");
    assert_eq!(r["other"]["committed"], 1, "COMMIT lost the row: {r:#}");
    assert_eq!(r["other"]["rolled_back"], 0, "{r:#}");
}

#[test]
fn websocket_wrong_password_is_28p01_in_both_pipeline_modes() {
    let env = Env::new();
    let proxy = https_proxy(&env, Auth::ScramPooled, "");
    for pipeline in ["password", "false"] {
        let r = scenario(&proxy, &env, "ws-wrong-password", pipeline);
        assert_eq!(
            r["client"]["code"], "28P01",
            "pipelineConnect {pipeline}: {r:#}"
        );
        assert_eq!(
            r["pool"]["code"], "28P01",
            "pipelineConnect {pipeline}: {r:#}"
        );
    }
    assert!(
        starts(&proxy, "websocket").is_empty(),
        "a wrong password started a session"
    );
    // Each refusal is in the audit, as a WebSocket session's, with the
    // mechanism the driver tried.
    let refused = proxy.wait_audit_count("4 refused websocket sessions", 4, |e| {
        e["event"] == "session.rejected" && e["transport"] == "websocket"
    });
    for e in &refused {
        assert_eq!(e["reason"], "auth_failed", "{e}");
    }
    let mechanisms: Vec<&str> = refused
        .iter()
        .filter_map(|e| e["auth"]["client"]["mechanism"].as_str())
        .collect();
    assert_eq!(
        mechanisms.iter().filter(|m| **m == "password").count(),
        2,
        "{refused:#?}"
    );
    assert_eq!(
        mechanisms.iter().filter(|m| **m == "SCRAM-SHA-256").count(),
        2,
        "{refused:#?}"
    );
}

#[test]
fn websocket_errors_carry_their_sqlstate() {
    let env = Env::new();
    let proxy = https_proxy(&env, Auth::ScramPooled, "");
    for pipeline in ["password", "false"] {
        let r = scenario(&proxy, &env, "ws-errors", pipeline);
        assert_eq!(r["client"]["division"]["code"], "22012", "{r:#}");
        assert_eq!(r["client"]["syntax"]["code"], "42601", "{r:#}");
        assert_eq!(r["client"]["missing"]["code"], "42P01", "{r:#}");
        assert_eq!(
            r["client"]["after"], 2,
            "the session did not survive its errors: {r:#}"
        );
        assert_eq!(r["pool"]["code"], "22P02", "{r:#}");
    }
}

#[test]
fn http_parameters_types_and_result_modes() {
    let env = Env::new();
    let proxy = https_proxy(&env, Auth::ScramPooled, "");
    let r = scenario(&proxy, &env, "http-types", "password");
    let row = &r["row"];
    let expected = serde_json::json!({
        "int": 7,
        "text": "text ✓ 'quoted'",
        "bool": true,
        "json_param": { "a": [1, 2], "s": "x" },
        "json": { "k": "v" },
        "ints": [1, 2, 3],
        "texts": ["a", null, "c"],
        "nothing": null,
        "null_param": null,
        "ts": "2024-02-03T04:05:06.789Z",
        "ts_param": "2025-06-07T08:09:10.123Z",
        "big": "9007199254740993",
        "num": "1.5",
        "bytes": "0102ff",
    });
    assert_eq!(row, &expected, "{r:#}");
    assert_eq!(
        r["parallel"],
        serde_json::json!([0, 1, 2, 3, 4, 5, 6, 7]),
        "{r:#}"
    );
    let full = &r["full"];
    assert_eq!(
        full["fields"],
        serde_json::json!([{ "name": "a", "type": 23 }, { "name": "b", "type": 25 }]),
        "{r:#}"
    );
    assert_eq!(full["row_count"], 3, "{r:#}");
    assert_eq!(full["command"], "SELECT", "{r:#}");
    assert_eq!(full["rows"].as_array().map(Vec::len), Some(3), "{r:#}");
    assert_eq!(r["insert"]["row_count"], 2, "{r:#}");
    assert_eq!(r["insert"]["command"], "INSERT", "{r:#}");
    assert_eq!(
        r["arrays"],
        serde_json::json!([[1, "b"], [2, "c"]]),
        "{r:#}"
    );
    assert_eq!(r["both"]["rows"], serde_json::json!([["p"]]), "{r:#}");
    assert_eq!(r["both"]["fields"], serde_json::json!(["p"]), "{r:#}");
    // Each request was a session of its own, carried by HTTP, with the
    // connection string's password checked against the verifier.
    proxy.wait_audit("an http session.start", |e| {
        e["event"] == "session.start" && e["transport"] == "http"
    });
    let started = starts(&proxy, "http");
    assert!(started.len() >= 13, "{started:#?}");
    for e in &started {
        assert_eq!(e["auth"]["mode"], "scram", "{e}");
        assert_eq!(e["auth"]["client"]["mechanism"], "password", "{e}");
        assert_eq!(e["requested"]["user"], "app", "{e}");
    }
}

#[test]
fn http_transactions_take_their_options_and_roll_back_on_failure() {
    let env = Env::new();
    let proxy = https_proxy(&env, Auth::ScramPooled, "");
    let r = scenario(&proxy, &env, "http-transaction", "password");
    assert_eq!(r["isolation"], "serializable", "{r:#}");
    assert_eq!(r["read_only"], "on", "{r:#}");
    assert_eq!(r["read_only_write"]["name"], "NeonDbError", "{r:#}");
    assert_eq!(r["read_only_write"]["code"], "25006", "{r:#}");
    assert_eq!(
        r["committed"],
        serde_json::json!([[], [{ "v": "batch 2" }]]),
        "{r:#}"
    );
    assert_eq!(r["doomed"]["code"], "22012", "{r:#}");
    assert_eq!(
        r["function_form"],
        serde_json::json!([[{ "a": 1 }], [{ "b": "two" }]]),
        "{r:#}"
    );
    // The failed batch's insert was rolled back with it; nothing of the
    // read-only one got in; the good batch committed.
    assert_eq!(
        r["rows"],
        serde_json::json!({ "batch 1": 1, "batch 2": 1 }),
        "{r:#}"
    );
}

#[test]
fn http_errors_are_neon_db_errors_with_their_sqlstate() {
    let env = Env::new();
    let proxy = https_proxy(&env, Auth::ScramPooled, "");
    let r = scenario(&proxy, &env, "http-errors", "password");
    for (what, code) in [
        ("division", "22012"),
        ("syntax", "42601"),
        ("param", "22P02"),
        ("wrong_password", "28P01"),
    ] {
        assert_eq!(r[what]["name"], "NeonDbError", "{what}: {r:#}");
        assert_eq!(r[what]["code"], code, "{what}: {r:#}");
    }
    assert_eq!(r["after"], serde_json::json!([{ "n": 2 }]), "{r:#}");
    let refused = proxy.wait_audit("the refused http session", |e| {
        e["event"] == "session.rejected" && e["transport"] == "http"
    });
    assert_eq!(refused["reason"], "auth_failed", "{refused}");
    assert_eq!(
        refused["auth"]["client"]["mechanism"], "password",
        "{refused}"
    );
}

#[test]
fn http_in_passthrough_mode() {
    let env = Env::new();
    let proxy = https_proxy(&env, Auth::Passthrough, "");
    let r = scenario(&proxy, &env, "http-errors", "password");
    // PostgreSQL itself refused the password pgbastion logged in with.
    assert_eq!(r["wrong_password"]["code"], "28P01", "{r:#}");
    assert_eq!(r["division"]["code"], "22012", "{r:#}");
    let e = proxy.wait_audit("an http session.start", |e| {
        e["event"] == "session.start" && e["transport"] == "http"
    });
    assert_eq!(e["auth"]["mode"], "passthrough", "{e}");
    assert_eq!(e["auth"]["client"]["mechanism"], "password", "{e}");
}

/// One curl request's answer.
struct Reply {
    /// 0: no HTTP response at all.
    status: u16,
    headers: String,
    body: String,
    out: Output,
}

impl Reply {
    /// A response header's value (the last, case-insensitively).
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().rev().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

/// curl against the proxy's `url_path` (`https://localhost:PORT/...`,
/// or a whole URL), trusting pgbastion's CA, with `args` before the URL.
fn curl(proxy: &Proxy, env: &Env, url_path: &str, args: &[&str]) -> Reply {
    let url = if url_path.contains("://") {
        url_path.to_owned()
    } else {
        format!("https://localhost:{}{url_path}", proxy.addr().port())
    };
    let headers = env.dir.path().join("curl-headers");
    let _ = std::fs::remove_file(&headers);
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
        .arg("--cacert")
        .arg(&env.proxy_ca)
        .arg("-D")
        .arg(&headers)
        .args(args)
        .arg(&url)
        .output()
        .expect("curl must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Reply {
        status: code.trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        body: body.to_owned(),
        out,
    }
}

/// A connection string for the `Neon-Connection-String` header.
fn conn_header() -> String {
    format!("Neon-Connection-String: postgresql://app:{APP_PASSWORD}@localhost/postgres")
}

/// `POST /sql` with a JSON body.
fn post_sql(proxy: &Proxy, env: &Env, body: &str) -> Reply {
    curl(
        proxy,
        env,
        "/sql",
        &[
            "-X",
            "POST",
            "-H",
            &conn_header(),
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ],
    )
}

#[test]
fn curl_cors_limits_and_malformed_requests() {
    let env = Env::new();
    let proxy = https_proxy(
        &env,
        Auth::ScramPooled,
        "max_request_bytes = 1024\nmax_response_bytes = 4096\n",
    );

    // A browser's preflight before its POST.
    let pre = curl(
        &proxy,
        &env,
        "/sql",
        &[
            "-X",
            "OPTIONS",
            "-H",
            "Origin: https://app.example.com",
            "-H",
            "Access-Control-Request-Method: POST",
            "-H",
            "Access-Control-Request-Headers: neon-connection-string, neon-array-mode",
        ],
    );
    assert_eq!(pre.status, 204, "{}", pre.headers);
    assert_eq!(
        pre.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
    let allowed = pre
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for h in [
        "neon-connection-string",
        "neon-array-mode",
        "neon-raw-text-output",
    ] {
        assert!(allowed.contains(h), "{h} not allowed: {}", pre.headers);
    }
    assert!(
        pre.header("access-control-allow-methods")
            .unwrap_or_default()
            .contains("POST"),
        "{}",
        pre.headers
    );

    // The listener works: a small query within both limits.
    let ok = post_sql(&proxy, &env, r#"{"query":"select 1 as one","params":[]}"#);
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        ok.json()["rows"],
        serde_json::json!([{ "one": 1 }]),
        "{}",
        ok.body
    );

    // A body over max_request_bytes.
    let big = format!(
        r#"{{"query":"select $1::text","params":["{}"]}}"#,
        "x".repeat(4096)
    );
    let too_big = post_sql(&proxy, &env, &big);
    assert_eq!(too_big.status, 413, "{}", too_big.body);

    // A result over max_response_bytes: refused whole, nothing partial.
    let huge = post_sql(
        &proxy,
        &env,
        r#"{"query":"select repeat('x', 100000) as r","params":[]}"#,
    );
    assert_eq!(huge.status, 507, "{}", huge.body);
    assert!(!huge.body.contains("xxxx"), "part of the result was sent");

    // Malformed JSON: 400 with a JSON message.
    let malformed = post_sql(&proxy, &env, r#"{"query": "select 1", "#);
    assert_eq!(malformed.status, 400, "{}", malformed.body);
    assert!(
        malformed.json()["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{}",
        malformed.body
    );

    // No connection string: 400.
    let anonymous = curl(
        &proxy,
        &env,
        "/sql",
        &[
            "-X",
            "POST",
            "--data-binary",
            r#"{"query":"select 1","params":[]}"#,
        ],
    );
    assert_eq!(anonymous.status, 400, "{}", anonymous.body);
    assert!(
        anonymous.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("Neon-Connection-String")),
        "{}",
        anonymous.body
    );

    // Anything else: 404.
    let root = curl(&proxy, &env, "/", &[]);
    assert_eq!(root.status, 404, "{}", root.body);

    // Plaintext HTTP on the TLS port gets no HTTP response.
    let plain = curl(
        &proxy,
        &env,
        &format!("http://localhost:{}/sql", proxy.addr().port()),
        &[
            "-X",
            "POST",
            "-H",
            &conn_header(),
            "--data-binary",
            r#"{"query":"select 1","params":[]}"#,
        ],
    );
    assert!(
        !plain.out.status.success() && plain.status == 0,
        "plaintext HTTP was answered: {} {} {}",
        plain.status,
        plain.body,
        stderr(&plain.out)
    );
}
