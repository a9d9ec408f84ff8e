//! The tamper-evident audit log (issue 14): the chain goes on across a
//! rotation and a restart, `pgbastion audit verify` passes on the untouched
//! files and names the line where one was edited or removed, and a keyed
//! chain does not verify without its key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

fn verify(files: &[&Path], key: Option<&Path>) -> (bool, String) {
    let mut cmd = bin();
    cmd.args(["audit", "verify"]).args(files);
    if let Some(k) = key {
        cmd.arg("--key").arg(k);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

fn ends(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches("\"session.end\"")
        .count()
}

#[test]
fn the_audit_chain_survives_rotation_and_restart_and_verify_finds_edits() {
    let env = Env::new();
    let dir = env.dir.path().to_owned();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let audit = dir.join("audit.jsonl");
    let rotated = dir.join("audit.jsonl.1");
    let key = dir.join("chain.key");
    pgbastion::dev::certs::write_private(&key, b"the operator's own chain key, kept elsewhere\n")
        .unwrap();
    let cfg = dir.join("pgbastion.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n{}\n[audit]\nlog = \"{}\"\nchain_key_file = \"{}\"\n",
            env.tls_toml(),
            env.upstream_toml(),
            audit.display(),
            key.display()
        ),
    )
    .unwrap();
    let log = dir.join("pgbastion.log");
    let session = |addr| {
        let out = env.psql(&env.via_proxy(addr, "channel_binding=disable"), "select 1");
        assert!(out.status.success(), "{}", stderr(&out));
    };
    let stop = |mut proc: Running| {
        signal(proc.0.id(), "-TERM");
        proc.0.wait().unwrap();
    };

    let proc = Running(config_form(&cfg, Some(&log)).spawn().unwrap());
    let addr = wait_listening(port);
    session(addr);
    session(addr);
    wait_for("two sessions audited", Duration::from_secs(10), || {
        (ends(&audit) == 2).then_some(())
    });
    // logrotate: move the file, SIGHUP, and the next line starts a new one.
    std::fs::rename(&audit, &rotated).unwrap();
    signal(proc.0.id(), "-HUP");
    wait_for("the reopen", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("audit log reopened"))
    });
    session(addr);
    wait_for("a session in the new file", Duration::from_secs(10), || {
        (ends(&audit) == 1).then_some(())
    });
    stop(proc);
    // A restart appends to the same file and goes on with the chain.
    let proc = Running(config_form(&cfg, Some(&log)).spawn().unwrap());
    let addr = wait_listening(port);
    session(addr);
    stop(proc);
    assert_eq!(ends(&audit), 2);

    let both: [&Path; 2] = [&rotated, &audit];
    let (ok, said) = verify(&both, Some(&key));
    let lines = std::fs::read_to_string(&rotated).unwrap().lines().count()
        + std::fs::read_to_string(&audit).unwrap().lines().count();
    assert!(ok, "{said}");
    assert!(
        said.contains(&format!("OK: {lines} lines in 2 file(s), seq 1 to {lines}")),
        "{said}"
    );
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&audit)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(
        first["seq"].as_u64().unwrap() > 1,
        "the new file goes on: {first}"
    );

    // Without the key (SHA-256), the keyed chain does not verify.
    assert!(!verify(&both, None).0);
    // Files out of order do not either.
    assert!(!verify(&[&audit, &rotated], Some(&key)).0);

    // One character changed in line 2 of the rotated file.
    let text = std::fs::read_to_string(&rotated).unwrap();
    let mut l: Vec<String> = text.lines().map(str::to_owned).collect();
    let copy = |name: &str, lines: &[String]| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(
            &p,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        p
    };
    let edited = {
        let mut e = l.clone();
        e[1] = e[1].replacen("127.0.0.1", "127.0.0.2", 1);
        assert_ne!(e[1], l[1]);
        copy("edited.jsonl", &e)
    };
    let (ok, said) = verify(&[&edited, &audit], Some(&key));
    assert!(!ok);
    assert!(said.contains("edited.jsonl:2: changed"), "{said}");
    // Line 2 removed.
    l.remove(1);
    let removed = copy("removed.jsonl", &l);
    let (ok, said) = verify(&[&removed, &audit], Some(&key));
    assert!(!ok);
    assert!(said.contains("removed.jsonl:2: seq 3 follows 1"), "{said}");
}

/// A config with the audit in `audit` chained under `key`.
fn chained_config(env: &Env, port: u16, audit: &Path, key: &Path) -> PathBuf {
    let cfg = env.dir.path().join("pgbastion.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:{port}\"\n{}\n[audit]\nlog = \"{}\"\nchain_key_file = \"{}\"\n",
            env.tls_toml(),
            env.upstream_toml(),
            audit.display(),
            key.display()
        ),
    )
    .unwrap();
    cfg
}

/// Runs pgbastion with `cfg`, one psql session through it, and stops it.
fn one_run(env: &Env, cfg: &Path, port: u16) {
    let mut proc = Running(config_form(cfg, None).spawn().unwrap());
    let addr = wait_listening(port);
    let out = env.psql(&env.via_proxy(addr, "channel_binding=disable"), "select 1");
    assert!(out.status.success(), "{}", stderr(&out));
    signal(proc.0.id(), "-TERM");
    proc.0.wait().unwrap();
}

/// Issue 19 items 11 and 12: a crash left a last line over 64 KiB followed
/// by a line cut mid-way. Before: the restart read 64 KiB, found no whole
/// line, started again at seq 1 and glued its first event onto the cut
/// one, so nothing after it verified. After: the cut line is terminated,
/// the chain goes on from the long line, an `audit.resumed` event says how
/// many bytes were cut, and verify passes (noting the cut line).
#[test]
fn a_restart_after_a_crash_cut_a_line_goes_on_from_the_last_whole_one() {
    let env = Env::new();
    let dir = env.dir.path().to_owned();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let audit = dir.join("audit.jsonl");
    let key = dir.join("chain.key");
    let key_bytes = b"a chain key of the operator's own".to_vec();
    pgbastion::dev::certs::write_private(&key, &key_bytes).unwrap();
    let cfg = chained_config(&env, port, &audit, &key);
    one_run(&env, &cfg, port);

    // What the writer would have written next: a 300 KiB event, then one
    // more, cut by the crash after 100 bytes.
    use pgbastion::audit::chain::{Chain, Digest};
    let digest = Digest::from_key(Some(&key_bytes));
    let text = std::fs::read(&audit).unwrap();
    let last = pgbastion::audit::chain::last_line(&text).unwrap();
    let mut chain = Chain::resume(digest, last);
    let big = format!(
        "{{\"ts\":\"t\",\"event\":\"query\",\"statement\":\"{}\"}}",
        "x".repeat(300 * 1024)
    );
    let big = chain.stamp(big.as_bytes());
    chain.written(&big);
    let cut = chain.stamp(b"{\"ts\":\"t\",\"event\":\"session.end\"}");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&audit)
        .unwrap();
    std::io::Write::write_all(&mut file, &big).unwrap();
    std::io::Write::write_all(&mut file, &cut[..100]).unwrap();
    drop(file);

    one_run(&env, &cfg, port);
    let (ok, said) = verify(&[&audit], Some(&key));
    assert!(ok, "{said}");
    assert!(said.contains("a line cut by a crash (100 bytes)"), "{said}");
    let text = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let resumed = lines
        .iter()
        .position(|l| l.contains("\"audit.resumed\""))
        .expect("an audit.resumed event");
    assert_eq!(lines[resumed - 1].len(), 100, "the cut line, terminated");
    let v: serde_json::Value = serde_json::from_str(lines[resumed]).unwrap();
    assert_eq!(v["partial_line_bytes"], 100);
    assert_eq!(
        v["seq"].as_u64(),
        serde_json::from_slice::<serde_json::Value>(&big).unwrap()["seq"]
            .as_u64()
            .map(|s| s + 1),
        "goes on from the long line"
    );
    assert!(lines[resumed + 1].contains("session.start"), "{text}");
}

/// Issue 19 item 20: before, a file whose first lines were removed, and an
/// empty file, verified. After: both fail, a rotated file that says it
/// continues another passes alone, and `--allow-partial` accepts a
/// headless chain while still saying so.
#[test]
fn verify_refuses_a_headless_chain_and_an_empty_file() {
    let env = Env::new();
    let dir = env.dir.path().to_owned();
    let port = pgbastion::dev::localpg::free_port().unwrap();
    let audit = dir.join("audit.jsonl");
    let key = dir.join("chain.key");
    pgbastion::dev::certs::write_private(&key, b"a chain key of the operator's own").unwrap();
    let cfg = chained_config(&env, port, &audit, &key);
    one_run(&env, &cfg, port);
    one_run(&env, &cfg, port);
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(verify(&[&audit], Some(&key)).0);

    let headless = dir.join("headless.jsonl");
    let rest: String = text.split_inclusive('\n').skip(2).collect();
    std::fs::write(&headless, rest).unwrap();
    let (ok, said) = verify(&[&headless], Some(&key));
    assert!(!ok, "{said}");
    assert!(
        said.contains("PARTIAL: the chain starts at seq 3, not 1"),
        "{said}"
    );
    let out = bin()
        .args(["audit", "verify", "--allow-partial", "--key"])
        .arg(&key)
        .arg(&headless)
        .output()
        .unwrap();
    let (ok, said) = (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    );
    assert!(ok, "{said}");
    assert!(said.contains("NOTE: the chain starts at seq 3"), "{said}");

    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let (ok, said) = verify(&[&empty], Some(&key));
    assert!(!ok, "{said}");
    assert!(said.contains("the file is empty"), "{said}");

    // logrotate: the new file's first line says it continues the old one.
    let rotated = dir.join("audit.jsonl.1");
    let log = dir.join("pgbastion.log");
    let mut proc = Running(config_form(&cfg, Some(&log)).spawn().unwrap());
    let addr = wait_listening(port);
    std::fs::rename(&audit, &rotated).unwrap();
    signal(proc.0.id(), "-HUP");
    wait_for("the reopen", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("audit log reopened"))
    });
    let out = env.psql(&env.via_proxy(addr, "channel_binding=disable"), "select 1");
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("a session in the new file", Duration::from_secs(10), || {
        (ends(&audit) == 1).then_some(())
    });
    signal(proc.0.id(), "-TERM");
    proc.0.wait().unwrap();
    let first = std::fs::read_to_string(&audit).unwrap();
    assert!(
        first
            .lines()
            .next()
            .unwrap()
            .contains("\"audit.continued\""),
        "{first}"
    );
    let (ok, said) = verify(&[&audit], Some(&key));
    assert!(ok, "{said}");
    assert!(said.contains("continuing a rotated file"), "{said}");
    assert!(verify(&[&rotated, &audit], Some(&key)).0);
}

/// Issue 19 item 21: before, a binary chain key (32 random bytes, not
/// UTF-8) was refused as not UTF-8. After: keys are bytes.
#[test]
fn a_binary_chain_key_is_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("chain.key");
    let mut bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
    bytes[0] = 0xff; // never valid UTF-8
    assert!(std::str::from_utf8(&bytes).is_err());
    pgbastion::dev::certs::write_private(&key, &bytes).unwrap();
    use pgbastion::audit::chain::{Chain, Digest};
    let mut chain = Chain::new(Digest::from_key(Some(&bytes)));
    let mut text = Vec::new();
    for i in 0..3 {
        let line = chain.stamp(format!("{{\"event\":\"e{i}\"}}").as_bytes());
        chain.written(&line);
        text.extend_from_slice(&line);
    }
    let audit = dir.path().join("audit.jsonl");
    std::fs::write(&audit, &text).unwrap();
    let (ok, said) = verify(&[&audit], Some(&key));
    assert!(ok, "{said}");
    assert!(said.contains("OK: 3 lines"), "{said}");
    // Another key does not verify it.
    let other = dir.path().join("other.key");
    bytes[5] ^= 1;
    pgbastion::dev::certs::write_private(&other, &bytes).unwrap();
    assert!(!verify(&[&audit], Some(&other)).0);
}
