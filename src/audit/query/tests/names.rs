//! Issue 19 adversarial H3/H4/H5: the statement an Execute is recorded
//! with is the one the server runs: the portal's, as bound; a Parse, Bind
//! or Close the server refuses or skips changes nothing; a portal the
//! audit does not know is unknown, never another statement's text.

use super::*;

fn parse(name: &str, q: &str) -> Vec<u8> {
    msg(b'P', &[cstr(name), cstr(q), vec![0, 0]].concat())
}

fn bind(portal: &str, stmt: &str) -> Vec<u8> {
    msg(b'B', &[cstr(portal), cstr(stmt), vec![0; 6]].concat())
}

fn execute(portal: &str) -> Vec<u8> {
    msg(b'E', &[cstr(portal), vec![0, 0, 0, 0]].concat())
}

fn close(kind: u8, name: &str) -> Vec<u8> {
    msg(b'C', &[vec![kind], cstr(name)].concat())
}

fn describe(kind: u8, name: &str) -> Vec<u8> {
    msg(b'D', &[vec![kind], cstr(name)].concat())
}

fn sync() -> Vec<u8> {
    msg(b'S', b"")
}

fn ok(n: u8) -> Vec<u8> {
    msg(n, b"")
}

fn done(tag: &str) -> Vec<u8> {
    msg(b'C', &cstr(tag))
}

fn ready(status: &[u8]) -> Vec<u8> {
    msg(b'Z', status)
}

/// A transaction block is open (portals live on until it ends).
fn begin(t: &mut QueryTracker) {
    t.client_bytes(&msg(b'Q', &cstr("begin")));
    t.server_bytes(&[done("BEGIN"), ready(b"T")].concat());
}

/// H3, the unnamed statement: the portal was bound to CREATE TABLE, the
/// unnamed statement was replaced after the Bind: the server runs the
/// CREATE TABLE. Before, the audit recorded `select $1 as harmless`
/// with tag CREATE TABLE.
#[test]
fn an_execute_runs_the_statement_as_bound_unnamed() {
    let (mut t, seen) = tracker();
    t.client_bytes(
        &[
            parse("", "create table hidden_t4a(x int)"),
            bind("", ""),
            parse("", "select 1 as harmless"),
            execute(""),
            sync(),
        ]
        .concat(),
    );
    t.server_bytes(
        &[
            ok(b'1'),
            ok(b'2'),
            ok(b'1'),
            done("CREATE TABLE"),
            ready(b"I"),
        ]
        .concat(),
    );
    assert_eq!(
        summary(&seen.lock().unwrap()),
        vec![(
            "create table hidden_t4a(x int)".into(),
            "ok",
            Some("CREATE TABLE".into())
        )]
    );
    assert!(t.pending.is_empty());
}

/// H3, a named statement: a portal bound to `s1`, `s1` closed and
/// prepared again with other text, then the portal executed.
#[test]
fn an_execute_runs_the_statement_as_bound_named() {
    let (mut t, seen) = tracker();
    begin(&mut t);
    t.client_bytes(
        &[
            parse("s1", "create table hidden_t4b(x int)"),
            bind("p", "s1"),
            close(b'S', "s1"),
            parse("s1", "select 1 as harmless"),
            execute("p"),
            sync(),
        ]
        .concat(),
    );
    t.server_bytes(
        &[
            ok(b'1'),
            ok(b'2'),
            ok(b'3'),
            ok(b'1'),
            done("CREATE TABLE"),
            ready(b"T"),
        ]
        .concat(),
    );
    let seen = seen.lock().unwrap();
    assert_eq!(
        summary(&seen[1..]),
        vec![(
            "create table hidden_t4b(x int)".into(),
            "ok",
            Some("CREATE TABLE".into())
        )]
    );
    assert_eq!(seen[1].protocol, Protocol::Extended { name: "s1".into() });
}

/// H4: a Parse the server refuses (42P05: the name is taken), or skips
/// (after an earlier error, up to Sync), changes nothing; nor does a Bind
/// it refuses (42P03: the portal exists). Before, the refused Parse's
/// text was recorded for the statement the server still had.
#[test]
fn refused_or_skipped_messages_change_nothing() {
    let (mut t, seen) = tracker();
    t.client_bytes(&[parse("s", "create table hidden_t6(x int)"), sync()].concat());
    t.server_bytes(&[ok(b'1'), ready(b"I")].concat());
    t.client_bytes(&[parse("s", "select 1 as harmless"), sync()].concat());
    t.server_bytes(&[error("42P05"), ready(b"I")].concat());
    t.client_bytes(&[bind("", "s"), execute(""), sync()].concat());
    t.server_bytes(&[ok(b'2'), done("CREATE TABLE"), ready(b"I")].concat());

    // Skipped after an error: the unnamed statement stays.
    t.client_bytes(&[parse("", "drop table hidden_t6"), sync()].concat());
    t.server_bytes(&[ok(b'1'), ready(b"I")].concat());
    t.client_bytes(
        &[
            parse("bad", "selec"),
            parse("", "select 2 as harmless"),
            sync(),
        ]
        .concat(),
    );
    t.server_bytes(&[error("42601"), ready(b"I")].concat());
    t.client_bytes(&[bind("", ""), execute(""), sync()].concat());
    t.server_bytes(&[ok(b'2'), done("DROP TABLE"), ready(b"I")].concat());

    // A refused Bind: the portal keeps its statement.
    begin(&mut t);
    t.client_bytes(
        &[
            parse("a", "delete from t"),
            parse("b", "select 3 as harmless"),
            bind("p", "a"),
            sync(),
        ]
        .concat(),
    );
    t.server_bytes(&[ok(b'1'), ok(b'1'), ok(b'2'), ready(b"T")].concat());
    t.client_bytes(&[bind("p", "b"), sync(), execute("p"), sync()].concat());
    t.server_bytes(&[error("42P03"), ready(b"E")].concat());
    // In the failed transaction the server refuses to run it.
    t.server_bytes(&[error("25P02"), ready(b"E")].concat());
    let seen = seen.lock().unwrap();
    assert_eq!(
        summary(&seen),
        vec![
            (
                "create table hidden_t6(x int)".into(),
                "ok",
                Some("CREATE TABLE".into())
            ),
            (
                "drop table hidden_t6".into(),
                "ok",
                Some("DROP TABLE".into())
            ),
            ("begin".into(), "ok", Some("BEGIN".into())),
            ("delete from t".into(), "error", Some("25P02".into())),
        ]
    );
    assert!(t.pending.is_empty());
}

/// H5 (a): the server drops every portal at the end of its transaction:
/// an Execute of one after that runs nothing the audit knows (the server
/// says 34000). Before, the audit recorded the portal's old statement.
#[test]
fn portals_end_with_their_transaction() {
    let (mut t, seen) = tracker();
    t.client_bytes(
        &[
            parse("", "create table hidden_t7(x int)"),
            bind("p", ""),
            sync(),
        ]
        .concat(),
    );
    t.server_bytes(&[ok(b'1'), ok(b'2'), ready(b"I")].concat());
    t.client_bytes(&[execute("p"), sync()].concat());
    t.server_bytes(&[error("34000"), ready(b"I")].concat());
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].statement, Statement::Unknown);
    assert_eq!(
        seen[0].protocol,
        Protocol::Extended {
            name: String::new()
        }
    );
    assert_eq!(seen[0].sqlstate.as_deref(), Some("34000"));
}

/// H5 (b): a cursor DECLAREd in SQL, executed by the protocol's Execute:
/// the audit does not know its statement (it recorded the DECLARE), and
/// says so. Before, it was recorded as the unnamed statement's text.
#[test]
fn an_unknown_portal_is_unknown_never_another_statement() {
    let (mut t, seen) = tracker();
    begin(&mut t);
    t.client_bytes(&msg(
        b'Q',
        &cstr("declare cur cursor for select secret from t"),
    ));
    t.server_bytes(&[done("DECLARE CURSOR"), ready(b"T")].concat());
    t.client_bytes(
        &[
            parse("", "delete from t"),
            bind("", ""),
            execute(""),
            sync(),
        ]
        .concat(),
    );
    t.server_bytes(&[ok(b'1'), ok(b'2'), done("DELETE 0"), ready(b"T")].concat());
    t.client_bytes(&[execute("cur"), sync()].concat());
    t.server_bytes(&[msg(b'D', b"x"), done("SELECT 1"), ready(b"T")].concat());
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[3].statement, Statement::Unknown);
    assert_eq!(seen[3].tag.as_deref(), Some("SELECT"));
}

/// H5, the bound: past `MAX_NAMES` portals a new one is not kept, and its
/// Execute is unknown. Before, it fell back to the unnamed statement.
#[test]
fn a_portal_past_the_bound_is_unknown() {
    let (mut t, seen) = tracker();
    begin(&mut t);
    t.client_bytes(
        &[
            parse("", "drop table important"),
            parse("s", "select 1 as harmless"),
        ]
        .concat(),
    );
    let binds: Vec<u8> = (0..MAX_NAMES)
        .flat_map(|i| bind(&format!("p{i}"), ""))
        .collect();
    t.client_bytes(&binds);
    t.client_bytes(&[bind("late", "s"), execute("late"), execute("p7"), sync()].concat());
    t.server_bytes(&[ok(b'1'), ok(b'1')].concat());
    t.server_bytes(&ok(b'2').repeat(MAX_NAMES + 1));
    t.server_bytes(&[done("SELECT 1"), done("DROP TABLE"), ready(b"T")].concat());
    let seen = seen.lock().unwrap();
    assert_eq!(seen[1].statement, Statement::Unknown);
    assert_eq!(text(&seen[2]), "drop table important");
    assert!(t.portals.len() <= MAX_NAMES);
}

/// Describe of a statement or a portal, and Close of something else,
/// change nothing; a closed portal is unknown.
#[test]
fn describe_and_close_do_not_disturb() {
    let (mut t, seen) = tracker();
    begin(&mut t);
    t.client_bytes(
        &[
            parse("s", "update t set x = 1"),
            bind("p", "s"),
            describe(b'S', "s"),
            describe(b'P', "p"),
            close(b'P', "other"),
            close(b'S', "other"),
            execute("p"),
            close(b'P', "p"),
            execute("p"),
            sync(),
        ]
        .concat(),
    );
    t.server_bytes(
        &[
            ok(b'1'),
            ok(b'2'),
            msg(b't', b"\0\0"),
            ok(b'n'),
            ok(b'n'),
            ok(b'3'),
            ok(b'3'),
            done("UPDATE 2"),
            ok(b'3'),
            error("34000"),
            ready(b"E"),
        ]
        .concat(),
    );
    assert_eq!(t.stopped(), None);
    let seen = seen.lock().unwrap();
    assert_eq!(
        summary(&seen[1..]),
        vec![
            ("update t set x = $1".into(), "ok", Some("UPDATE".into())),
            ("Unknown".into(), "error", Some("34000".into())),
        ]
    );
}

/// The memory bound's accounting: a text counts once while anything
/// holds it (a portal keeps its statement's text after the statement is
/// closed), and nothing is counted once all are gone, nor for a Parse
/// the server refused.
#[test]
fn held_text_is_counted_once_and_given_back() {
    let (mut t, _seen) = tracker();
    let q = "select 1 as harmless";
    begin(&mut t);
    t.client_bytes(
        &[
            parse("s", q),
            bind("p1", "s"),
            bind("p2", "s"),
            close(b'S', "s"),
            sync(),
        ]
        .concat(),
    );
    t.server_bytes(&[ok(b'1'), ok(b'2'), ok(b'2'), ok(b'3'), ready(b"T")].concat());
    assert_eq!(t.held, "select $1 as harmless".len());
    t.client_bytes(&[close(b'P', "p1"), sync()].concat());
    t.server_bytes(&[ok(b'3'), ready(b"T")].concat());
    assert_eq!(t.held, "select $1 as harmless".len());
    t.client_bytes(&[parse("bad", "selec"), parse("x", q), sync()].concat());
    t.server_bytes(&[error("42601"), ready(b"E")].concat());
    t.client_bytes(&msg(b'Q', &cstr("rollback")));
    t.server_bytes(&[done("ROLLBACK"), ready(b"I")].concat());
    assert_eq!(t.held, 0);
    assert!(t.portals.is_empty() && t.overlay.is_none());
}

/// Third adversarial run, F1: in LATIN1, `\xff` and `\xfe` are two names to
/// the server; a lossy conversion made them one here, and the Execute of
/// one was recorded as the other's statement. Names that are not UTF-8
/// are never kept: their Executes are unknown.
#[test]
fn names_that_are_not_utf8_are_never_confused() {
    let (mut t, seen) = tracker();
    let raw_parse = |name: u8, q: &str| msg(b'P', &[vec![name, 0], cstr(q), vec![0, 0]].concat());
    let raw_bind = |stmt: u8| msg(b'B', &[cstr(""), vec![stmt, 0], vec![0; 6]].concat());
    t.client_bytes(
        &[
            raw_parse(0xff, "select 'CANARY_REALLY_RAN'"),
            raw_parse(0xfe, "select 1 as decoy"),
            sync(),
        ]
        .concat(),
    );
    t.server_bytes(&[ok(b'1'), ok(b'1'), ready(b"I")].concat());
    t.client_bytes(&[raw_bind(0xff), execute(""), sync()].concat());
    t.server_bytes(&[ok(b'2'), done("SELECT 1"), ready(b"I")].concat());
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].statement, Statement::Unknown);
}

/// Third adversarial run, F2: code run on the server (DO, CALL, a
/// function-call message) may deallocate and re-prepare a name, or close
/// and reopen a portal through a refcursor of its name. Named statements
/// and portals are forgotten after it: their Executes are unknown, never
/// the text the audit had before.
#[test]
fn code_run_on_the_server_makes_names_unknown() {
    for (run, answer) in [
        (
            msg(b'Q', &cstr("do $$ begin execute 'deallocate s2'; end $$")),
            [done("DO"), ready(b"T")].concat(),
        ),
        (
            msg(b'Q', &cstr("call reprepare()")),
            [done("CALL"), ready(b"T")].concat(),
        ),
        (
            msg(b'F', [0, 0, 0x30, 0x39, 0, 0, 0, 0, 0, 0].as_slice()),
            [msg(b'V', &[0xff, 0xff, 0xff, 0xff]), ready(b"T")].concat(),
        ),
    ] {
        let (mut t, seen) = tracker();
        begin(&mut t);
        t.client_bytes(&[parse("s2", "select 1 as decoy"), bind("p1", "s2"), sync()].concat());
        t.server_bytes(&[ok(b'1'), ok(b'2'), ready(b"T")].concat());
        t.client_bytes(&run);
        t.server_bytes(&answer);
        t.client_bytes(&[bind("", "s2"), execute(""), execute("p1"), sync()].concat());
        t.server_bytes(&[ok(b'2'), done("SELECT 1"), done("SELECT 1"), ready(b"T")].concat());
        let seen = seen.lock().unwrap();
        let last: Vec<_> = seen[seen.len() - 2..]
            .iter()
            .map(|r| &r.statement)
            .collect();
        assert_eq!(last, [&Statement::Unknown, &Statement::Unknown]);
    }
}

/// Third adversarial run, F3: a COPY FROM STDIN the server ended with an
/// error, which the client never ended (it need not): the Syncs and
/// statements after it count again. Before, every later Sync was ignored
/// and statements the server ran were recorded as not executed.
#[test]
fn a_copy_the_server_ended_needs_no_copy_done() {
    let (mut t, seen) = tracker();
    t.client_bytes(&msg(b'Q', &cstr("copy t from stdin")));
    t.server_bytes(&msg(b'G', &[0, 0, 0]));
    t.client_bytes(&msg(b'd', b"bad data\n"));
    t.server_bytes(
        &[
            msg(b'E', &[b"SERROR\0C22P02\0".as_slice(), b"\0"].concat()),
            ready(b"I"),
        ]
        .concat(),
    );
    // An extended-protocol error: the server skips to the next Sync,
    // which it answers (it is out of COPY).
    t.client_bytes(&[parse("", "selec 1"), sync()].concat());
    t.server_bytes(
        &[
            msg(b'E', &[b"SERROR\0C42601\0".as_slice(), b"\0"].concat()),
            ready(b"I"),
        ]
        .concat(),
    );
    t.client_bytes(
        &[
            parse("", "select 'RUNS_1'"),
            bind("", ""),
            execute(""),
            sync(),
        ]
        .concat(),
    );
    t.server_bytes(&[ok(b'1'), ok(b'2'), done("SELECT 1"), ready(b"I")].concat());
    t.client_bytes(&msg(b'Q', &cstr("select 'RUNS_2'")));
    t.server_bytes(&[done("SELECT 1"), ready(b"I")].concat());
    let seen = seen.lock().unwrap();
    let last: Vec<_> = seen[seen.len() - 2..]
        .iter()
        .map(|r| (r.outcome.as_str(), r.tag.clone()))
        .collect();
    assert_eq!(
        last,
        [("ok", Some("SELECT".into())), ("ok", Some("SELECT".into()))]
    );
    assert_eq!(seen[0].outcome.as_str(), "error");
    assert_eq!(t.stopped(), None);
}

/// Third adversarial run, F5: tracking stops once, and says so once, even
/// when the batch that stopped it holds more messages.
#[test]
fn a_stop_is_reported_once() {
    let told = Arc::new(Mutex::new(0));
    let (t, _seen) = tracker();
    let mut t = t.on_stop(Box::new({
        let told = told.clone();
        move |_| {
            *told.lock().unwrap() += 1;
            true
        }
    }));
    t.server_bytes(&[ok(b'1'), ok(b'1'), ok(b'2')].concat());
    assert!(t.stopped().is_some());
    assert_eq!(*told.lock().unwrap(), 1);
}
