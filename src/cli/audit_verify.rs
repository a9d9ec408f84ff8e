//! `pgbastion audit verify`: checks that audit files are one unbroken hash
//! chain (`audit::chain::verify`) and says so, or names the first line that
//! breaks it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::audit::chain::{verify, Digest, Start, Verified};

/// Verifies `files` (oldest first). Exit code 1 (with BROKEN or PARTIAL on
/// stderr) when the chain does not hold; an `Err` when a file or the key
/// cannot be read.
pub fn audit_verify(
    files: &[PathBuf],
    key: Option<&Path>,
    allow_partial: bool,
) -> Result<ExitCode> {
    let digest = match key {
        Some(path) => Digest::from_key(Some(&crate::server::read_chain_key(path)?)),
        None => Digest::Sha256,
    };
    let mut contents = Vec::new();
    for f in files {
        let text = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        contents.push((f.display().to_string(), text));
    }
    let v = match verify(&contents, &digest) {
        Ok(v) => v,
        Err(broken) => {
            eprintln!("BROKEN: {broken}");
            return Ok(ExitCode::from(1));
        }
    };
    let noted = report(&v, allow_partial);
    if noted != ExitCode::SUCCESS {
        return Ok(noted);
    }
    println!(
        "OK: {} lines in {} file(s), seq {} to {}, chained with {}",
        v.lines,
        files.len(),
        seq(v.first_seq),
        seq(v.last_seq),
        if key.is_some() {
            "HMAC-SHA-256 (key)"
        } else {
            "SHA-256"
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn seq(s: Option<u64>) -> String {
    s.map_or_else(|| "-".into(), |s| s.to_string())
}

/// Prints the notes on a chain that holds: lines cut by a crash, and how it
/// starts. Exit code 1 when it starts headless and that was not allowed.
fn report(v: &Verified, allow_partial: bool) -> ExitCode {
    for cut in &v.cut {
        println!(
            "NOTE: {}:{}: a line cut by a crash ({} bytes); the restart after it recorded audit.resumed and the chain goes on from the line before",
            cut.file, cut.line, cut.bytes
        );
    }
    let first = seq(v.first_seq);
    match v.start {
        Start::First => {}
        Start::Continued => println!(
            "NOTE: the chain starts at seq {first}, continuing a rotated file: give the older files first to check the link"
        ),
        Start::Headless => {
            let said = format!(
                "the chain starts at seq {first}, not 1, and its first line does not say it continues a rotated file: lines before it were removed, or older files were not given"
            );
            if !allow_partial {
                eprintln!("PARTIAL: {said} (--allow-partial accepts this)");
                return ExitCode::from(1);
            }
            println!("NOTE: {said}");
        }
    }
    ExitCode::SUCCESS
}
