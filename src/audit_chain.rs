//! The audit log as a hash chain: every line carries `seq` (one more than
//! the line before) and `prev` (the SHA-256 of the line before as written,
//! or its HMAC-SHA-256 under `audit.chain_key_file`). Someone who edits,
//! removes or inserts a line breaks the chain at that line; with a key,
//! someone who can rewrite the file still cannot recompute the chain.
//!
//! The chain is stamped by the audit sink's writer thread, on the lines it
//! actually writes, so a line dropped under load is not a gap. It goes on
//! across reopen (log rotation: the first line of the new file links to the
//! last of the old) and across restarts (the last line of the file is read
//! at start).
//!
//! Pure: stamping and verifying work on bytes; `pgbastion audit verify`
//! does the reading.

use thiserror::Error;

use crate::auth::scram;

/// What each `prev` is computed with.
#[derive(Clone)]
pub enum Digest {
    Sha256,
    Hmac(scram::Key),
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Digest::Sha256 => "Sha256",
            Digest::Hmac(_) => "Hmac(..)",
        })
    }
}

impl Digest {
    /// From the contents of `audit.chain_key_file` (None: plain SHA-256).
    /// The key is hashed to 32 bytes, so any length works; short ones are
    /// refused where the file is read.
    pub fn from_key(key: Option<&[u8]>) -> Digest {
        match key {
            None => Digest::Sha256,
            Some(k) => Digest::Hmac(scram::sha256(k)),
        }
    }

    fn of(&self, line: &[u8]) -> scram::Key {
        match self {
            Digest::Sha256 => scram::sha256(line),
            Digest::Hmac(key) => scram::hmac(key, line),
        }
    }
}

/// Where the chain stands: the last line written.
#[derive(Debug, Clone)]
pub struct Chain {
    digest: Digest,
    seq: u64,
    prev: scram::Key,
}

impl Chain {
    /// A chain with nothing before it.
    pub fn new(digest: Digest) -> Chain {
        Chain {
            digest,
            seq: 0,
            prev: [0; scram::KEY_LEN],
        }
    }

    /// Goes on from `last`, the last complete line already in the file
    /// (without its newline). A line without `seq` (written before the
    /// chain existed, or not JSON) still links: the next line's `prev` is
    /// its digest, and `seq` starts over at 1.
    pub fn resume(digest: Digest, last: &[u8]) -> Chain {
        let seq = serde_json::from_slice::<serde_json::Value>(last)
            .ok()
            .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
            .unwrap_or(0);
        Chain {
            prev: digest.of(last),
            digest,
            seq,
        }
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// `line` (one JSON object, with or without its newline) with `seq`
    /// and `prev` put first, ending in a newline. Not yet part of the
    /// chain: call `written` once it is.
    pub fn stamp(&self, line: &[u8]) -> Vec<u8> {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let rest = body.strip_prefix(b"{").unwrap_or(body);
        let mut out = Vec::with_capacity(body.len() + 100);
        out.extend_from_slice(
            format!(
                "{{\"seq\":{},\"prev\":\"{}\"",
                self.seq + 1,
                hex::encode(self.prev)
            )
            .as_bytes(),
        );
        if rest != b"}" {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        out.push(b'\n');
        out
    }

    /// A stamped line was written: the next links to it.
    pub fn written(&mut self, stamped: &[u8]) {
        let body = stamped.strip_suffix(b"\n").unwrap_or(stamped);
        self.seq += 1;
        self.prev = self.digest.of(body);
    }
}

/// The last complete line of a file's tail (what `Chain::resume` takes).
pub fn last_line(tail: &[u8]) -> Option<&[u8]> {
    let body = tail.strip_suffix(b"\n")?;
    let start = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let line = &body[start..];
    (!line.is_empty()).then_some(line)
}

/// Where a chain breaks: the file (by position in the list), the line
/// (1-based) and what is wrong there.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{file}:{line}: {problem}")]
pub struct Broken {
    pub file: String,
    pub line: usize,
    pub problem: String,
}

/// What a verification covered.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub lines: usize,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

/// Checks `files` (name and contents) as one chain, in order: every line
/// must be a JSON object whose `seq` is one more than the line before and
/// whose `prev` is the line before's digest. The first line of the first
/// file is taken as given (nothing before it is known).
pub fn verify(files: &[(String, Vec<u8>)], digest: &Digest) -> Result<Verified, Broken> {
    let mut before: Option<(u64, scram::Key)> = None;
    let mut verified = Verified {
        lines: 0,
        first_seq: None,
        last_seq: None,
    };
    for (name, text) in files {
        let broken = |line: usize, problem: String| Broken {
            file: name.clone(),
            line,
            problem,
        };
        let complete = text.strip_suffix(b"\n").unwrap_or(text);
        if complete.is_empty() {
            continue;
        }
        let lines: Vec<&[u8]> = complete.split(|b| *b == b'\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let n = i + 1;
            if i + 1 == lines.len() && !text.ends_with(b"\n") {
                return Err(broken(
                    n,
                    "the last line is incomplete: the file was truncated".into(),
                ));
            }
            let value: serde_json::Value = serde_json::from_slice(line)
                .map_err(|_| broken(n, "not a JSON object: the line was changed or cut".into()))?;
            let seq = value
                .get("seq")
                .and_then(|s| s.as_u64())
                .ok_or_else(|| broken(n, "no seq: not an audit chain line".into()))?;
            let prev = value
                .get("prev")
                .and_then(|p| p.as_str())
                .ok_or_else(|| broken(n, "no prev: not an audit chain line".into()))?;
            if let Some((last_seq, last_digest)) = before {
                let expected = last_seq + 1;
                if seq > expected {
                    return Err(broken(
                        n,
                        format!(
                            "seq {seq} follows {last_seq}: {} line(s) before this one were removed",
                            seq - expected
                        ),
                    ));
                }
                if seq < expected {
                    return Err(broken(
                        n,
                        format!(
                            "seq {seq} follows {last_seq}: a line was inserted before this one"
                        ),
                    ));
                }
                if prev != hex::encode(last_digest) {
                    // This line's link does not match the line before:
                    // that line (or this link) was changed.
                    return Err(match n {
                        1 => broken(
                            1,
                            "prev does not match the last line of the file before: the chain was broken between the files".into(),
                        ),
                        _ => broken(
                            n - 1,
                            "changed: the next line's prev does not match it".into(),
                        ),
                    });
                }
            }
            before = Some((seq, digest.of(line)));
            verified.lines += 1;
            verified.first_seq.get_or_insert(seq);
            verified.last_seq = Some(seq);
        }
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three chained lines, as the writer makes them.
    fn chain(digest: Digest, n: usize) -> (Vec<u8>, Chain) {
        let mut c = Chain::new(digest);
        let mut out = Vec::new();
        for i in 0..n {
            let line = c.stamp(format!("{{\"ts\":\"t{i}\",\"event\":\"x\"}}\n").as_bytes());
            c.written(&line);
            out.extend_from_slice(&line);
        }
        (out, c)
    }

    fn check(files: &[&[u8]], digest: &Digest) -> Result<Verified, Broken> {
        let files: Vec<(String, Vec<u8>)> = files
            .iter()
            .enumerate()
            .map(|(i, f)| (format!("f{i}"), f.to_vec()))
            .collect();
        verify(&files, digest)
    }

    fn lines(text: &[u8]) -> Vec<Vec<u8>> {
        text.split_inclusive(|b| *b == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    }

    #[test]
    fn stamped_lines_lead_with_seq_and_prev() {
        let (text, _) = chain(Digest::Sha256, 2);
        let first = String::from_utf8(lines(&text)[0].clone()).unwrap();
        assert!(
            first.starts_with(&format!(
                "{{\"seq\":1,\"prev\":\"{}\",\"ts\":\"t0\"",
                "0".repeat(64)
            )),
            "{first}"
        );
        let c = Chain::new(Digest::Sha256);
        assert_eq!(
            c.stamp(b"{}"),
            format!("{{\"seq\":1,\"prev\":\"{}\"}}\n", "0".repeat(64)).into_bytes()
        );
    }

    #[test]
    fn an_untouched_chain_verifies_and_every_edit_is_found_at_its_line() {
        let d = Digest::Sha256;
        let (text, _) = chain(d.clone(), 5);
        assert_eq!(
            check(&[&text], &d),
            Ok(Verified {
                lines: 5,
                first_seq: Some(1),
                last_seq: Some(5)
            })
        );
        let l = lines(&text);
        // One character changed in line 3.
        let mut edited = l.clone();
        edited[2] = String::from_utf8(edited[2].clone())
            .unwrap()
            .replace("t2", "t9")
            .into_bytes();
        assert_eq!(check(&[&edited.concat()], &d).unwrap_err().line, 3);
        // Line 3 removed: found at the line that now follows line 2.
        let mut removed = l.clone();
        removed.remove(2);
        let e = check(&[&removed.concat()], &d).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.problem.contains("removed"), "{e}");
        // A line inserted after line 2, even with a correct-looking seq
        // and prev (no key: anyone can compute them).
        let mut c = Chain::resume(d.clone(), l[1].strip_suffix(b"\n").unwrap());
        let forged = c.stamp(b"{\"ts\":\"forged\"}");
        c.written(&forged);
        let mut inserted = l.clone();
        inserted.insert(2, forged);
        let e = check(&[&inserted.concat()], &d).unwrap_err();
        assert_eq!(e.line, 4, "the original line 3 now repeats a seq");
        assert!(e.problem.contains("inserted"), "{e}");
        // Cut in the middle of the last line.
        let cut = &text[..text.len() - 10];
        let e = check(&[cut], &d).unwrap_err();
        assert_eq!(e.line, 5);
        assert!(e.problem.contains("truncated"), "{e}");
    }

    #[test]
    fn the_chain_goes_on_across_files_and_restarts() {
        let d = Digest::Sha256;
        let (old, c) = chain(d.clone(), 3);
        // A restart: the chain is resumed from the file's last line.
        let mut resumed = Chain::resume(d.clone(), last_line(&old).unwrap());
        let mut new = Vec::new();
        for _ in 0..2 {
            let line = resumed.stamp(b"{\"event\":\"y\"}\n");
            resumed.written(&line);
            new.extend_from_slice(&line);
        }
        assert_eq!(check(&[&old, &new], &d).unwrap().lines, 5);
        // The same from the writer's own state (a rotation).
        let mut c = c;
        let line = c.stamp(b"{\"event\":\"z\"}");
        c.written(&line);
        assert_eq!(check(&[&old, &line], &d).unwrap().last_seq, Some(4));
        // Files out of order, or one missing in between, fail.
        assert!(check(&[&new, &old], &d).is_err());
        let (third, _) = chain(d.clone(), 2);
        let e = check(&[&old, &third], &d).unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("f1", 1), "{e}");
    }

    #[test]
    fn with_a_key_a_chain_recomputed_without_it_fails() {
        let keyed = Digest::from_key(Some(b"a key of the operator's own"));
        let (text, _) = chain(keyed.clone(), 4);
        assert!(check(&[&text], &keyed).is_ok());
        // Someone rewrote line 2 and recomputed the chain with SHA-256.
        let l = lines(&text);
        let mut c = Chain::resume(Digest::Sha256, l[0].strip_suffix(b"\n").unwrap());
        let mut forged = l[0].clone();
        for line in &l[1..4] {
            let body = String::from_utf8(line.clone()).unwrap();
            let rest = &body[body.find(",\"ts\"").unwrap() + 1..];
            let line = c.stamp(format!("{{{}", rest.replace("t1", "tX")).as_bytes());
            c.written(&line);
            forged.extend_from_slice(&line);
        }
        assert!(
            check(&[&forged], &Digest::Sha256).is_ok(),
            "a valid SHA-256 chain"
        );
        let e = check(&[&forged], &keyed).unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        // And the keyed chain does not verify without the key.
        assert!(check(&[&text], &Digest::Sha256).is_err());
    }

    #[test]
    fn last_line_of_a_tail() {
        assert_eq!(last_line(b"a\nbc\n"), Some(&b"bc"[..]));
        assert_eq!(last_line(b"bc\n"), Some(&b"bc"[..]));
        assert_eq!(last_line(b""), None);
        assert_eq!(last_line(b"a\nincomplete"), None);
    }
}
