//! The tamper-evident audit log (issue 14): the chain goes on across a
//! rotation and a restart, `pgbastion audit verify` passes on the untouched
//! files and names the line where one was edited or removed, and a keyed
//! chain does not verify without its key.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn verify(files: &[&Path], key: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(BIN);
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
    let port = pgbastion::localpg::free_port().unwrap();
    let audit = dir.join("audit.jsonl");
    let rotated = dir.join("audit.jsonl.1");
    let key = dir.join("chain.key");
    pgbastion::devcerts::write_private(&key, b"the operator's own chain key, kept elsewhere\n")
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
