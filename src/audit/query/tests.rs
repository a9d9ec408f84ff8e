//! The statement tracker's tests: framing, every protocol flow, outcomes and bounds.

use super::*;
use std::sync::Mutex;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(u32::try_from(body.len() + 4).unwrap()).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn tracker() -> (QueryTracker, Arc<Mutex<Vec<QueryRecord>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (
        QueryTracker::new(
            true,
            Box::new(move |r| {
                s.lock().unwrap().push(r);
                true
            }),
        ),
        seen,
    )
}

fn error(code: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr("ERROR"));
    b.push(b'C');
    b.extend(cstr(code));
    b.push(b'M');
    b.extend(cstr("boom"));
    b.push(0);
    msg(b'E', &b)
}

fn text(r: &QueryRecord) -> &str {
    match &r.statement {
        Statement::Text(t) => t,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_simple_query_byte_by_byte() {
    let (mut t, seen) = tracker();
    let q = msg(b'Q', &cstr("select * from t where secret = 'canary'"));
    for b in &q {
        t.client_bytes(std::slice::from_ref(b));
    }
    let reply = [
        msg(b'T', b"whatever"),
        msg(b'D', b"row with canary"),
        msg(b'C', &cstr("SELECT 1")),
        msg(b'Z', b"I"),
    ]
    .concat();
    for b in &reply {
        t.server_bytes(std::slice::from_ref(b));
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(text(&seen[0]), "select * from t where secret = $1");
    assert_eq!(seen[0].tag.as_deref(), Some("SELECT"));
    assert_eq!(seen[0].rows, Some(1));
    assert_eq!(seen[0].protocol, Protocol::Simple);
    assert_eq!(seen[0].outcome.as_str(), "ok");
}

#[test]
fn a_pipeline_with_an_error_in_the_middle() {
    let (mut t, seen) = tracker();
    let batch = |stmt: &str, q: &str| {
        [
            msg(b'P', &[cstr(stmt), cstr(q), vec![0, 0]].concat()),
            msg(
                b'B',
                &[
                    cstr(""),
                    cstr(stmt),
                    b"\0\0\0\x01\0\0\0\x06canary\0\0".to_vec(),
                ]
                .concat(),
            ),
            msg(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()),
        ]
        .concat()
    };
    let sent = [
        batch("s1", "insert into t values ($1)"),
        batch("s2", "select 1/0"),
        batch("s3", "insert into t values (7)"),
        msg(b'S', b""),
        batch("", "select 2"),
        msg(b'S', b""),
    ]
    .concat();
    t.client_bytes(&sent);
    let answers = [
        msg(b'1', b""),
        msg(b'2', b""),
        msg(b'C', &cstr("INSERT 0 1")),
        msg(b'1', b""),
        msg(b'2', b""),
        error("22012"),
        msg(b'Z', b"E"),
        msg(b'1', b""),
        msg(b'2', b""),
        msg(b'D', b""),
        msg(b'C', &cstr("SELECT 1")),
        msg(b'Z', b"I"),
    ]
    .concat();
    t.server_bytes(&answers);
    let seen = seen.lock().unwrap();
    let summary: Vec<(String, &str, Option<String>, Option<String>)> = seen
        .iter()
        .map(|r| {
            (
                text(r).to_owned(),
                r.outcome.as_str(),
                r.tag.clone(),
                r.sqlstate.clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "insert into t values ($1)".into(),
                "ok",
                Some("INSERT".into()),
                None
            ),
            ("select $1/$2".into(), "error", None, Some("22012".into())),
            (
                "insert into t values ($1)".into(),
                "not_executed",
                None,
                None
            ),
            ("select $1".into(), "ok", Some("SELECT".into()), None),
        ]
    );
    assert_eq!(seen[0].protocol, Protocol::Extended { name: "s1".into() });
    assert!(
        !format!("{seen:?}").contains("canary"),
        "bind values are never kept"
    );
    assert!(t.pending.is_empty());
}

#[test]
fn copy_is_its_statement_never_its_data() {
    let (mut t, seen) = tracker();
    t.client_bytes(&msg(b'Q', &cstr("copy t from stdin")));
    t.server_bytes(&msg(b'G', b"\0\0\0"));
    t.client_bytes(&[msg(b'd', b"canary\n"), msg(b'c', b"")].concat());
    t.server_bytes(&[msg(b'C', &cstr("COPY 1")), msg(b'Z', b"I")].concat());
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].copy.map(|c| c.as_str()), Some("in"));
    assert_eq!(
        (seen[0].tag.as_deref(), seen[0].rows),
        (Some("COPY"), Some(1))
    );
    assert!(!format!("{seen:?}").contains("canary"));
}

#[test]
fn an_extended_copy_in_with_a_sync_before_its_data() {
    let (mut t, seen) = tracker();
    let copy = [
        msg(
            b'P',
            &[cstr(""), cstr("copy t from stdin"), vec![0, 0]].concat(),
        ),
        msg(b'B', &[cstr(""), cstr(""), vec![0; 6]].concat()),
        msg(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()),
        msg(b'S', b""),
    ]
    .concat();
    t.client_bytes(&copy);
    t.server_bytes(&[msg(b'1', b""), msg(b'2', b""), msg(b'G', b"\0\0\0")].concat());
    t.client_bytes(&[msg(b'd', b"canary\n"), msg(b'c', b""), msg(b'S', b"")].concat());
    t.server_bytes(&[msg(b'C', &cstr("COPY 1")), msg(b'Z', b"I")].concat());
    t.client_bytes(&msg(b'Q', &cstr("select 1")));
    t.server_bytes(&[msg(b'C', &cstr("SELECT 1")), msg(b'Z', b"I")].concat());
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].copy.map(|c| c.as_str()), Some("in"));
    assert_eq!(seen[1].tag.as_deref(), Some("SELECT"));
    assert!(t.pending.is_empty());
}

#[test]
fn function_calls_and_replication_commands() {
    let (mut t, seen) = tracker();
    t.client_bytes(&msg(b'F', b"\0\0\x01\x02\0\0\0\x01\0\0\0\x04secr\0\0"));
    t.server_bytes(&[msg(b'V', b"\0\0\0\x01x"), msg(b'Z', b"I")].concat());
    let seen_calls = seen.lock().unwrap().clone();
    assert_eq!(seen_calls[0].protocol, Protocol::FunctionCall);
    assert!(!format!("{seen_calls:?}").contains("secr"));

    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let mut r = QueryTracker::for_session(
        true,
        true,
        Box::new(move |x| {
            s.lock().unwrap().push(x);
            true
        }),
    );
    r.client_bytes(&msg(b'Q', &cstr("START_REPLICATION SLOT s LOGICAL 0/0")));
    r.server_bytes(
        &[
            msg(b'W', b"\0\0\0"),
            msg(b'd', b"wal"),
            msg(b'C', &cstr("COPY 0")),
            msg(b'Z', b"I"),
        ]
        .concat(),
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].protocol, Protocol::Replication);
    assert_eq!(seen[0].copy.map(|c| c.as_str()), Some("both"));
    assert_eq!(text(&seen[0]), "START_REPLICATION SLOT s LOGICAL $1/$2");
}

#[test]
fn a_multi_statement_query_with_an_error() {
    let (mut t, seen) = tracker();
    t.client_bytes(&msg(b'Q', &cstr("begin; select 1/0; commit")));
    t.server_bytes(&[msg(b'C', &cstr("BEGIN")), error("22012"), msg(b'Z', b"E")].concat());
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].commands, 1);
    assert_eq!(seen[0].sqlstate.as_deref(), Some("22012"));
    assert_eq!(seen[0].outcome.as_str(), "error");
}

#[test]
fn long_or_odd_statements_are_unparsed() {
    let (mut t, seen) = tracker();
    let long = format!("select '{}'", "x".repeat(MAX_STATEMENT));
    t.client_bytes(&msg(b'Q', &cstr(&long)));
    t.client_bytes(&msg(b'Q', &cstr("select 'a\\' , 'canary'")));
    t.server_bytes(
        &[msg(b'C', &cstr("SELECT 1")), msg(b'Z', b"I")]
            .concat()
            .repeat(2),
    );
    let seen = seen.lock().unwrap();
    assert!(matches!(
        seen[0].statement,
        Statement::Unparsed {
            why: "too long",
            ..
        }
    ));
    assert!(
        matches!(seen[1].statement, Statement::Unparsed { len: 23, .. }),
        "{:?}",
        seen[1]
    );
}

#[test]
fn held_statement_text_is_bounded() {
    let (mut t, seen) = tracker();
    let big = format!("select {}", "x, ".repeat(60_000));
    let parse = |name: &str| msg(b'P', &[cstr(name), cstr(&big), vec![0, 0]].concat());
    let run = |name: &str| {
        [
            msg(b'B', &[cstr(""), cstr(name), vec![0; 6]].concat()),
            msg(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()),
            msg(b'S', b""),
        ]
        .concat()
    };
    let fit = MAX_HELD / big.len();
    for i in 0..=fit {
        t.client_bytes(&parse(&format!("s{i}")));
    }
    t.server_bytes(&msg(b'1', b"").repeat(fit + 1));
    assert!(t.held <= MAX_HELD);
    let answer = [
        msg(b'2', b""),
        msg(b'C', &cstr("SELECT 0")),
        msg(b'Z', b"I"),
    ]
    .concat();
    t.client_bytes(&run("s0"));
    t.server_bytes(&answer);
    t.client_bytes(&run(&format!("s{fit}")));
    t.server_bytes(&answer);
    // Closing one makes room again (once the server has closed it).
    t.client_bytes(&msg(b'C', &[b"S".to_vec(), cstr("s0")].concat()));
    t.server_bytes(&msg(b'3', b""));
    t.client_bytes(&parse("again"));
    t.client_bytes(&run("again"));
    t.server_bytes(&[msg(b'1', b""), answer.clone()].concat());
    let seen = seen.lock().unwrap();
    assert!(matches!(seen[0].statement, Statement::Text(_)));
    assert!(
        matches!(
            seen[1].statement,
            Statement::Unparsed {
                why: "over the session's query audit memory bound",
                ..
            }
        ),
        "{:?}",
        seen[1].outcome
    );
    assert!(matches!(seen[2].statement, Statement::Text(_)));
}

fn summary(seen: &[QueryRecord]) -> Vec<(String, &'static str, Option<String>)> {
    seen.iter()
        .map(|r| {
            let s = match &r.statement {
                Statement::Text(t) => t.to_string(),
                other => format!("{other:?}"),
            };
            (s, r.outcome.as_str(), r.tag.clone().or(r.sqlstate.clone()))
        })
        .collect()
}

fn extended(name: &str, q: &str) -> Vec<u8> {
    [
        msg(b'P', &[cstr(name), cstr(q), vec![0, 0]].concat()),
        msg(b'B', &[cstr(""), cstr(name), vec![0; 6]].concat()),
        msg(b'D', &[b"P".to_vec(), cstr("")].concat()),
        msg(b'E', &[cstr(""), vec![0, 0, 0, 0]].concat()),
    ]
    .concat()
}

/// Issue 19 item 13: after an error in the extended protocol the
/// server discards everything up to Sync, a simple Query included.
/// Before, the Query took the Parse's error, the Sync's ReadyForQuery
/// was matched to the next statement, and a DROP was recorded with the
/// tag of the SELECT before it.
#[test]
fn an_extended_error_skips_to_sync_simple_queries_included() {
    let (mut t, seen) = tracker();
    t.client_bytes(
        &[
            msg(b'P', &[cstr(""), cstr("selec 1"), vec![0, 0]].concat()),
            msg(b'Q', &cstr("drop table skipped")),
            msg(b'S', b""),
        ]
        .concat(),
    );
    t.server_bytes(&[error("42601"), msg(b'Z', b"I")].concat());
    t.client_bytes(&msg(b'Q', &cstr("select 1")));
    t.server_bytes(
        &[
            msg(b'T', b"x"),
            msg(b'D', b"x"),
            msg(b'C', &cstr("SELECT 1")),
            msg(b'Z', b"I"),
        ]
        .concat(),
    );
    t.client_bytes(&msg(b'Q', &cstr("drop table t")));
    t.server_bytes(&[msg(b'C', &cstr("DROP TABLE")), msg(b'Z', b"I")].concat());
    assert_eq!(t.stopped(), None);
    assert_eq!(
        summary(&seen.lock().unwrap()),
        vec![
            ("drop table skipped".into(), "not_executed", None),
            ("select $1".into(), "ok", Some("SELECT".into())),
            ("drop table t".into(), "ok", Some("DROP TABLE".into())),
        ]
    );
    assert!(t.pending.is_empty());
}

/// Parse+Bind+Describe+Execute of a failing statement, another one and
/// a Sync, then a simple query in the same pipeline: the second is
/// skipped, the query after the Sync runs. And an error before any
/// Sync was sent: what the client sends next is skipped too, up to
/// its Sync.
#[test]
fn a_pipeline_error_before_and_after_the_sync_was_sent() {
    let (mut t, seen) = tracker();
    t.client_bytes(
        &[
            extended("", "select 1/0"),
            extended("", "insert into t values (1)"),
            msg(b'S', b""),
            msg(b'Q', &cstr("select 2")),
        ]
        .concat(),
    );
    t.server_bytes(
        &[
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'T', b"x"),
            error("22012"),
            msg(b'Z', b"E"),
            msg(b'C', &cstr("SELECT 1")),
            msg(b'Z', b"I"),
        ]
        .concat(),
    );
    // A Parse that fails, with a Flush: no Sync yet.
    t.client_bytes(
        &[
            msg(b'P', &[cstr("bad"), cstr("selec"), vec![0, 0]].concat()),
            msg(b'H', b""),
        ]
        .concat(),
    );
    t.server_bytes(&error("42601"));
    t.client_bytes(&[extended("bad", "select 3"), msg(b'Q', &cstr("select 4"))].concat());
    t.client_bytes(&[msg(b'S', b""), msg(b'Q', &cstr("select 5"))].concat());
    t.server_bytes(
        &[
            msg(b'Z', b"I"),
            msg(b'C', &cstr("SELECT 1")),
            msg(b'Z', b"I"),
        ]
        .concat(),
    );
    assert_eq!(t.stopped(), None);
    assert_eq!(
        summary(&seen.lock().unwrap()),
        vec![
            ("select $1/$2".into(), "error", Some("22012".into())),
            ("insert into t values ($1)".into(), "not_executed", None),
            ("select $1".into(), "ok", Some("SELECT".into())),
            // Discarded by the server, recorded as the client meant
            // it.
            ("select $1".into(), "not_executed", None),
            ("select $1".into(), "not_executed", None),
            ("select $1".into(), "ok", Some("SELECT".into())),
        ]
    );
    assert!(t.pending.is_empty());
}

/// Issue 19 item 13: a tracker that loses its place says so once, and
/// when told the session must not go on unaudited, marks it lost.
#[test]
fn losing_the_place_is_never_silent() {
    for go_on in [true, false] {
        let told = Arc::new(Mutex::new(Vec::new()));
        let (t, _seen) = tracker();
        let mut t = t.on_stop(Box::new({
            let told = told.clone();
            move |why| {
                told.lock().unwrap().push(why);
                go_on
            }
        }));
        // A length no protocol message has: framing is lost.
        t.client_bytes(&[b'Q', 0, 0, 0, 2]);
        t.client_bytes(&msg(b'Q', &cstr("select 1")));
        assert_eq!(
            *told.lock().unwrap(),
            vec!["the client's messages could not be framed"]
        );
        assert!(t.stopped().is_some());
        assert_eq!(t.lost(), !go_on);
    }
}

/// Issue 19 item 2: statements forwarded and never answered are
/// recorded when the session ends.
#[test]
fn unanswered_statements_are_recorded_at_the_end() {
    let (mut t, seen) = tracker();
    t.client_bytes(&msg(
        b'Q',
        &cstr("select pg_sleep(0.5); create table t(x int)"),
    ));
    t.client_bytes(&[extended("", "insert into t values (1)"), msg(b'S', b"")].concat());
    t.client_bytes(&msg(b'Q', &cstr("copy t from stdin")));
    t.server_bytes(
        &[
            msg(b'C', &cstr("SELECT 1")),
            msg(b'C', &cstr("CREATE TABLE")),
            msg(b'Z', b"I"),
        ]
        .concat(),
    );
    t.server_bytes(&[msg(b'1', b""), msg(b'2', b""), msg(b'n', b"")].concat());
    assert_eq!(seen.lock().unwrap().len(), 1);
    t.end_of_session();
    let seen = seen.lock().unwrap();
    assert_eq!(
        summary(&seen),
        vec![
            (
                "select pg_sleep($1); create table t(x int)".into(),
                "ok",
                Some("CREATE TABLE".into())
            ),
            ("insert into t values ($1)".into(), "unanswered", None),
            ("copy t from stdin".into(), "unanswered", None),
        ]
    );
    assert!(t.pending.is_empty());
}

/// The decision on backslashes: a statement is recorded only when both
/// readings of standard_conforming_strings agree, because the setting in
/// force is never known for certain. Before, the tracker trusted the last
/// ParameterStatus: a SET run with Flush instead of Sync (reported only at
/// the next ReadyForQuery) or a server reload changed it unseen, and
/// `'x\' , canary --'` was recorded with the canary (adversarial H1/M1).
#[test]
fn backslashes_are_read_both_ways() {
    let (mut t, seen) = tracker();
    // set standard_conforming_strings = off, run with Flush: answered
    // (CommandComplete), no ParameterStatus yet.
    t.client_bytes(
        &[
            extended("", "set standard_conforming_strings = off"),
            msg(b'H', b""),
        ]
        .concat(),
    );
    t.server_bytes(
        &[
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'n', b""),
            msg(b'C', &cstr("SET")),
        ]
        .concat(),
    );
    t.client_bytes(&msg(b'Q', &cstr("select 'x\\' , canary --'")));
    t.client_bytes(&msg(b'Q', &cstr("select 'a\\b', 'c'")));
    t.client_bytes(&msg(
        b'Q',
        &cstr("select '\\'';create table hidden(x int);--'"),
    ));
    t.end_of_session();
    let seen = seen.lock().unwrap();
    let texts: Vec<String> = summary(&seen).into_iter().map(|s| s.0).collect();
    assert!(
        !texts
            .iter()
            .any(|t| t.contains("canary") || t.contains("hidden")),
        "{texts:?}"
    );
    assert!(texts[1].contains("backslash"), "{texts:?}");
    assert_eq!(texts[2], "select $1, $2");
    assert!(texts[3].contains("backslash"), "{texts:?}");
}

#[test]
fn a_bad_length_stops_tracking() {
    let (mut t, _) = tracker();
    t.client_bytes(&[b'Q', 0, 0, 0, 2]);
    assert!(t.stopped().is_some());
}

#[test]
fn command_tags() {
    assert_eq!(
        command_tag(b"INSERT 0 5\0"),
        (Some("INSERT".into()), Some(5))
    );
    assert_eq!(command_tag(b"SELECT 3\0"), (Some("SELECT".into()), Some(3)));
    assert_eq!(
        command_tag(b"CREATE TABLE\0"),
        (Some("CREATE TABLE".into()), None)
    );
    assert_eq!(command_tag(b"\0"), (None, None));
}

mod names;
