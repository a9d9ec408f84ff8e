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

use crate::crypto::{self, Hash, HASH_LEN};

/// What each `prev` is computed with.
#[derive(Clone)]
pub enum Digest {
    Sha256,
    Hmac(Hash),
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
            Some(k) => Digest::Hmac(crypto::sha256(k)),
        }
    }

    fn of(&self, line: &[u8]) -> Hash {
        match self {
            Digest::Sha256 => crypto::sha256(line),
            Digest::Hmac(key) => crypto::hmac(key, line),
        }
    }
}

/// Where the chain stands: the last line written.
#[derive(Debug, Clone)]
pub struct Chain {
    digest: Digest,
    seq: u64,
    prev: Hash,
}

impl Chain {
    /// A chain with nothing before it.
    pub fn new(digest: Digest) -> Chain {
        Chain {
            digest,
            seq: 0,
            prev: [0; HASH_LEN],
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

/// What the writer writes as the first line of a file it opens empty while
/// the chain already has lines (a rotation, a reload to a new file): the
/// file goes on from another one, and says so, so `verify` can tell it
/// from a file whose first lines were removed.
pub const CONTINUED: &str = "audit.continued";

/// What a restart records first when the file ended in a partial line (a
/// crash mid-write): the line after the partial one, linked to the last
/// complete line, with the partial line's length in `PARTIAL_BYTES` and
/// its SHA-256 in `PARTIAL_SHA256`.
pub const RESUMED: &str = "audit.resumed";
pub const PARTIAL_BYTES: &str = "partial_line_bytes";
pub const PARTIAL_SHA256: &str = "partial_line_sha256";

impl Chain {
    /// The seq of the last line written (0: none yet).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// The last complete line of a file's tail (what `Chain::resume` takes).
pub fn last_line(tail: &[u8]) -> Option<&[u8]> {
    let body = tail.strip_suffix(b"\n")?;
    let start = body.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let line = &body[start..];
    (!line.is_empty()).then_some(line)
}

/// The end of an existing audit file, as a restart needs it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tail {
    /// The last line that ends in a newline (without it).
    pub last_complete: Option<Vec<u8>>,
    /// Bytes after the last newline: a line cut by a crash (0: none).
    pub partial: u64,
    /// The SHA-256 (hex) of those bytes, which the restart records so that
    /// `verify` can tell the cut line the crash left from one put there
    /// later.
    pub partial_sha256: Option<String>,
}

/// The hex SHA-256 of a cut line, as `audit.resumed` records it.
pub fn cut_digest(bytes: &[u8]) -> String {
    hex::encode(crypto::sha256(bytes))
}

/// Reads the end of `file` backwards, a chunk at a time, until it has the
/// whole last complete line, however long (query events reach 256 KiB:
/// a fixed window would cut one and resume from a fragment).
pub fn read_tail<F: std::io::Read + std::io::Seek>(file: &mut F) -> std::io::Result<Tail> {
    use std::io::SeekFrom;
    const CHUNK: u64 = 64 * 1024;
    let len = file.seek(SeekFrom::End(0))?;
    // Newline positions found so far, last first; `buf` holds bytes
    // [pos, len) of the file.
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = len;
    let mut newlines: Vec<u64> = Vec::new();
    loop {
        // The last complete line lies between the last two newlines (or
        // the start of the file and the last one).
        if newlines.len() >= 2 || (pos == 0 && !newlines.is_empty()) {
            let end = newlines[0];
            let start = newlines.get(1).map_or(0, |n| n + 1);
            let line = &buf[(start - pos) as usize..(end - pos) as usize];
            let last_complete = (!line.is_empty()).then(|| line.to_vec());
            return Ok(Tail {
                last_complete,
                partial: len - end - 1,
                partial_sha256: digest_of_range(file, end + 1, len)?,
            });
        }
        if pos == 0 {
            return Ok(Tail {
                last_complete: None,
                partial: len,
                partial_sha256: digest_of_range(file, 0, len)?,
            });
        }
        let from = pos.saturating_sub(CHUNK);
        let mut chunk = vec![0; (pos - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk)?;
        for (i, b) in chunk.iter().enumerate().rev() {
            if *b == b'\n' && newlines.len() < 2 {
                newlines.push(from + i as u64);
            }
        }
        chunk.extend_from_slice(&buf);
        buf = chunk;
        pos = from;
        // Only the bytes from the second newline on are needed; drop the
        // partial tail's bytes beyond the last newline once it is known.
        if let Some(&end) = newlines.first() {
            buf.truncate((end - pos) as usize + 1);
        }
    }
}

/// The `cut_digest` of bytes `[from, to)` of `file`, read forwards a
/// chunk at a time (a cut line may be as long as the file); None when the
/// range is empty.
fn digest_of_range<F: std::io::Read + std::io::Seek>(
    file: &mut F,
    from: u64,
    to: u64,
) -> std::io::Result<Option<String>> {
    use sha2::Digest as _;
    use std::io::Read;
    if from >= to {
        return Ok(None);
    }
    file.seek(std::io::SeekFrom::Start(from))?;
    let mut hasher = sha2::Sha256::new();
    let mut rest = file.take(to - from);
    let mut chunk = vec![0; 64 * 1024];
    loop {
        match rest.read(&mut chunk)? {
            0 => break,
            n => hasher.update(&chunk[..n]),
        }
    }
    Ok(Some(hex::encode(hasher.finalize())))
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

/// How the verified chain begins.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Start {
    /// At seq 1: nothing came before it.
    First,
    /// Its first line says it goes on from a file not given (a rotation).
    Continued,
    /// At a later seq without saying why: its first lines were removed,
    /// or the files before it were not given. Suspicious.
    Headless,
}

/// A line a crash cut, which a restart terminated and recorded (an
/// `audit.resumed` line follows it, linked past it).
#[derive(Debug, PartialEq, Eq)]
pub struct Cut {
    pub file: String,
    pub line: usize,
    pub bytes: usize,
}

/// What a verification covered.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub lines: usize,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub start: Start,
    pub cut: Vec<Cut>,
}

/// Whether `line` is what a restart left when it found it cut: the next
/// line is an `audit.resumed` event that gives its length and digest (so
/// a line put in its place later, of the same length, is not skipped).
fn cut_before(line: &[u8], next: Option<&&[u8]>) -> bool {
    let Some(next) = next else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(next).is_ok_and(|v| {
        v.get("event").and_then(|e| e.as_str()) == Some(RESUMED)
            && v.get(PARTIAL_BYTES).and_then(|b| b.as_u64()) == Some(line.len() as u64)
            && v.get(PARTIAL_SHA256).and_then(|d| d.as_str()) == Some(cut_digest(line).as_str())
    })
}

/// Checks `files` (name and contents) as one chain, in order: every line
/// must be a JSON object whose `seq` is one more than the line before and
/// whose `prev` is the line before's digest. The first line of the first
/// file is taken as given (nothing before it is known), but where it is
/// not seq 1 and does not say it continues another file, `start` says so.
/// A line cut by a crash and recorded by the restart is skipped and
/// listed in `cut`. No line at all is an error: an empty log proves
/// nothing.
pub fn verify(files: &[(String, Vec<u8>)], digest: &Digest) -> Result<Verified, Broken> {
    let mut before: Option<(u64, Hash)> = None;
    let mut verified = Verified {
        lines: 0,
        first_seq: None,
        last_seq: None,
        start: Start::First,
        cut: Vec::new(),
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
            if cut_before(line, lines.get(i + 1)) {
                verified.cut.push(Cut {
                    file: name.clone(),
                    line: n,
                    bytes: line.len(),
                });
                continue;
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
            match before {
                Some((last_seq, last_digest)) => {
                    check_link(seq, prev, last_seq, &last_digest, n)
                        .map_err(|(line, problem)| broken(line, problem))?
                }
                None if seq == 1 => {}
                None if value.get("event").and_then(|e| e.as_str()) == Some(CONTINUED) => {
                    verified.start = Start::Continued;
                }
                None => verified.start = Start::Headless,
            }
            before = Some((seq, digest.of(line)));
            verified.lines += 1;
            verified.first_seq.get_or_insert(seq);
            verified.last_seq = Some(seq);
        }
    }
    if verified.lines == 0 {
        return Err(Broken {
            file: files.last().map(|f| f.0.clone()).unwrap_or_default(),
            line: 1,
            problem: "no audit lines: the file is empty (emptied, or not an audit log)".into(),
        });
    }
    Ok(verified)
}

/// Whether line `n` (`seq`, `prev`) follows the line before it; if not,
/// the line to report and what is wrong there.
fn check_link(
    seq: u64,
    prev: &str,
    last_seq: u64,
    last_digest: &Hash,
    n: usize,
) -> Result<(), (usize, String)> {
    let expected = last_seq + 1;
    if seq > expected {
        return Err((
            n,
            format!(
                "seq {seq} follows {last_seq}: {} line(s) before this one were removed",
                seq - expected
            ),
        ));
    }
    if seq < expected {
        return Err((
            n,
            format!("seq {seq} follows {last_seq}: a line was inserted before this one"),
        ));
    }
    if prev != hex::encode(last_digest) {
        // This line's link does not match the line before: that line (or
        // this link) was changed.
        return Err(match n {
            1 => (
                1,
                "prev does not match the last line of the file before: the chain was broken between the files".into(),
            ),
            _ => (n - 1, "changed: the next line's prev does not match it".into()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
