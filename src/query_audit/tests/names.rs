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
