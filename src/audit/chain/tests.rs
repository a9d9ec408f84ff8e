//! The hash chain's tests: stamping, verification, tampering, resumption.

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
            last_seq: Some(5),
            start: Start::First,
            cut: vec![],
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

/// A file with its first lines removed verifies link by link, but its
/// start is reported; a file that says it continues a rotated one is
/// not suspicious; an empty file is an error (issue 19 item 20).
#[test]
fn a_headless_chain_is_reported_and_an_empty_one_refused() {
    let d = Digest::Sha256;
    let (text, mut c) = chain(d.clone(), 5);
    let l = lines(&text);
    let v = check(&[&l[2..].concat()], &d).unwrap();
    assert_eq!(
        (v.start, v.first_seq, v.lines),
        (Start::Headless, Some(3), 3)
    );
    assert_eq!(check(&[&text], &d).unwrap().start, Start::First);
    // A rotation: the new file's first line says it continues.
    let marker = c.stamp(format!("{{\"event\":\"{CONTINUED}\"}}").as_bytes());
    c.written(&marker);
    let next = c.stamp(b"{\"event\":\"x\"}");
    let rotated = [marker.clone(), next].concat();
    assert_eq!(check(&[&rotated], &d).unwrap().start, Start::Continued);
    assert_eq!(check(&[&text, &rotated], &d).unwrap().start, Start::First);
    // Nothing at all.
    let e = check(&[b""], &d).unwrap_err();
    assert!(e.problem.contains("empty"), "{e}");
    assert!(check(&[b"", b"\n"], &d).is_err());
}

/// A restart after a crash cut the last line: the partial line is
/// terminated, the chain goes on from the last complete line, and the
/// `audit.resumed` line that says so lets verify skip (and report)
/// the cut line (issue 19 item 11).
#[test]
fn a_line_cut_by_a_crash_and_resumed_verifies_and_is_reported() {
    let d = Digest::from_key(Some(b"0123456789abcdef"));
    let (text, _) = chain(d.clone(), 4);
    let mut file = text[..text.len() - 7].to_vec();
    let tail = read_tail(&mut std::io::Cursor::new(&file)).unwrap();
    let partial = lines(&text)[3].len() - 7;
    assert_eq!(tail.partial, partial as u64);
    assert_eq!(
        tail.last_complete.as_deref(),
        lines(&text)[2].strip_suffix(b"\n")
    );
    file.push(b'\n');
    let cut_at = file.len() - 1 - partial;
    let mut c = Chain::resume(d.clone(), tail.last_complete.as_deref().unwrap());
    let digest = tail.partial_sha256.clone().unwrap();
    assert_eq!(digest, cut_digest(&file[cut_at..file.len() - 1]));
    for line in [
        format!(
            "{{\"event\":\"{RESUMED}\",\"{PARTIAL_BYTES}\":{partial},\"{PARTIAL_SHA256}\":\"{digest}\"}}"
        ),
        "{\"event\":\"y\"}".into(),
    ] {
        let stamped = c.stamp(line.as_bytes());
        c.written(&stamped);
        file.extend_from_slice(&stamped);
    }
    // A line of the same length put in the cut line's place later (here a
    // complete event) is a break, not a crash (adversarial L2).
    let mut forged = file.clone();
    let fake = format!(
        "{{\"user\":\"ceo\",\"x\":\"{}\"}}",
        "a".repeat(partial - 21)
    );
    assert_eq!(fake.len(), partial);
    forged[cut_at..cut_at + partial].copy_from_slice(fake.as_bytes());
    assert_eq!(check(&[&forged], &d).unwrap_err().line, 4);
    let v = check(&[&file], &d).unwrap();
    assert_eq!(v.lines, 5);
    assert_eq!(v.last_seq, Some(5));
    assert_eq!(
        v.cut,
        vec![Cut {
            file: "f0".into(),
            line: 4,
            bytes: partial
        }]
    );
    // Without the resumed line, the cut line is a break.
    let mut bare = text[..text.len() - 7].to_vec();
    bare.push(b'\n');
    bare.extend_from_slice(
        &Chain::resume(d.clone(), tail.last_complete.as_deref().unwrap()).stamp(b"{}"),
    );
    assert_eq!(check(&[&bare], &d).unwrap_err().line, 4);
}

/// The last complete line is found however long it is, and with a
/// partial line after it longer than any window (issue 19 item 12).
#[test]
fn the_tail_holds_the_whole_last_line_however_long() {
    let long = format!("{{\"x\":\"{}\"}}", "a".repeat(300 * 1024));
    let tail = |f: &[u8]| read_tail(&mut std::io::Cursor::new(f)).unwrap();
    let file = format!("{{\"a\":1}}\n{long}\n");
    assert_eq!(
        tail(file.as_bytes()),
        Tail {
            last_complete: Some(long.clone().into_bytes()),
            partial: 0,
            partial_sha256: None,
        }
    );
    let cut = format!("{{\"a\":1}}\n{long}\n{}", &long[..200 * 1024]);
    assert_eq!(
        tail(cut.as_bytes()),
        Tail {
            last_complete: Some(long.clone().into_bytes()),
            partial: 200 * 1024,
            partial_sha256: Some(cut_digest(&long.as_bytes()[..200 * 1024])),
        }
    );
    assert_eq!(tail(long.as_bytes()).last_complete, None);
    assert_eq!(tail(long.as_bytes()).partial, long.len() as u64);
    assert_eq!(
        tail(format!("{long}\n").as_bytes())
            .last_complete
            .unwrap()
            .len(),
        long.len()
    );
    assert_eq!(tail(b""), Tail::default());
    assert_eq!(
        tail(b"ab\ncd"),
        Tail {
            last_complete: Some(b"ab".to_vec()),
            partial: 2,
            partial_sha256: Some(cut_digest(b"cd")),
        }
    );
}
