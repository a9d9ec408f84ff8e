//! The engine driven message by message, without sockets: what the
//! server is sent and what the client sees, in order.

use super::*;
use crate::pool::prepared::server_name;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    message::build(tag, body)
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = cstr(name);
    b.extend(cstr(sql));
    b.extend([0, 0]);
    msg(b'P', &b)
}

fn parse_rest(sql: &str) -> Vec<u8> {
    let mut b = cstr(sql);
    b.extend([0, 0]);
    b
}

fn bind(stmt: &str) -> Vec<u8> {
    let mut b = cstr("");
    b.extend(cstr(stmt));
    b.extend([0, 0, 0, 0, 0, 0]);
    msg(b'B', &b)
}

fn execute() -> Vec<u8> {
    let mut b = cstr("");
    b.extend([0, 0, 0, 0]);
    msg(b'E', &b)
}

fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cstr(sql))
}

fn close_statement(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend(cstr(name));
    msg(b'C', &b)
}

fn ready(status: u8) -> Vec<u8> {
    msg(b'Z', &[status])
}

fn complete(tag: &str) -> Vec<u8> {
    msg(b'C', &cstr(tag))
}

fn error(code: &'static str) -> Vec<u8> {
    ErrorResponse::new(code, "x").encode()
}

/// The message types in a byte stream, and the names in Parse/Bind
/// messages (to see renaming).
fn tags(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut at = 0;
    while let Ok(Some((tag, len))) = message::frame(&bytes[at..], usize::MAX) {
        out.push(char::from(tag));
        at += len;
    }
    out
}

fn sqlstate(bytes: &[u8]) -> String {
    message::ErrorFields::parse(&bytes[5..]).unwrap().code
}

struct Harness {
    engine: Engine,
    conn: ConnState,
    to_server: Vec<u8>,
    to_client: Vec<u8>,
}

impl Harness {
    fn new() -> Self {
        Self::with_protected(&[])
    }

    fn with_protected(protected: &[&str]) -> Self {
        let settings = SessionSettings::default();
        let mut conn = ConnState::new(BTreeMap::new(), 2);
        conn.applied = Some(Arc::new(settings.clone()));
        Harness {
            engine: Engine::new(
                PoolMode::Transaction,
                settings,
                protected.iter().map(|s| s.to_string()).collect(),
                BTreeMap::new(),
            ),
            conn,
            to_server: Vec::new(),
            to_client: Vec::new(),
        }
    }

    fn client(&mut self, msgs: &[Vec<u8>]) -> String {
        for m in msgs {
            self.engine
                .client_message(m, &mut self.conn, &mut self.to_server, &mut self.to_client);
        }
        tags(&std::mem::take(&mut self.to_server))
    }

    fn server(&mut self, msgs: &[Vec<u8>]) -> (String, Next) {
        let mut next = Next::Continue;
        for m in msgs {
            next = self
                .engine
                .server_message(m, &mut self.conn, &mut self.to_client);
        }
        (tags(&self.to_client), next)
    }

    fn take_client(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.to_client)
    }
}

#[test]
fn a_named_statement_is_prepared_under_its_server_name() {
    let mut h = Harness::new();
    let sent = {
        h.engine.client_message(
            &parse("s1", "select 1"),
            &mut h.conn,
            &mut h.to_server,
            &mut h.to_client,
        );
        std::mem::take(&mut h.to_server)
    };
    let name = server_name(&parse_rest("select 1"));
    assert_eq!(sent, parse(&name, "select 1"));
    assert_eq!(h.client(&[bind("s1"), execute(), sync()]), "BES");
    let (seen, next) = h.server(&[
        msg(b'1', &[]),
        msg(b'2', &[]),
        complete("SELECT 1"),
        ready(b'I'),
    ]);
    assert_eq!(seen, "12CZ");
    assert_eq!(next, Next::Idle);
    assert!(h.engine.may_release());
}

#[test]
fn a_statement_the_connection_has_is_answered_by_pgbastion_in_order() {
    let mut h = Harness::new();
    h.conn
        .statements
        .insert(server_name(&parse_rest("select 1")));
    // Nothing in flight: the ParseComplete is owed at once.
    assert_eq!(h.client(&[parse("a", "select 1")]), "");
    assert_eq!(tags(&h.take_client()), "1");
    // Behind a Parse in flight: after its answer.
    assert_eq!(
        h.client(&[parse("b", "select 2"), parse("c", "select 1"), sync()]),
        "PS"
    );
    assert_eq!(tags(&h.to_client), "");
    let (seen, _) = h.server(&[msg(b'1', &[]), ready(b'I')]);
    assert_eq!(seen, "11Z");
}

#[test]
fn a_name_taken_gets_postgresqls_own_error_and_the_batch_is_skipped() {
    let mut h = Harness::new();
    h.client(&[parse("a", "select 1"), sync()]);
    h.server(&[msg(b'1', &[]), ready(b'I')]);
    h.take_client();
    // The second Parse of "a" becomes a Bind that fails where it stands.
    assert_eq!(
        h.client(&[parse("a", "select 2"), bind("a"), execute(), sync()]),
        "BBES"
    );
    let (seen, next) = h.server(&[error("26000"), ready(b'I')]);
    assert_eq!(seen, "EZ");
    assert_eq!(sqlstate(&h.to_client), "42P05");
    assert_eq!(next, Next::Idle);
    // "a" is still the first statement.
    assert_eq!(
        h.engine.statements.get(b"a").unwrap().server_name,
        server_name(&parse_rest("select 1"))
    );
}

#[test]
fn an_error_undoes_what_the_skipped_messages_would_have_made() {
    let mut h = Harness::new();
    h.conn
        .statements
        .insert(server_name(&parse_rest("select 1")));
    // A failing Parse, then one the connection has (owed), then Sync.
    let sent = h.client(&[parse("bad", "selec 1"), parse("a", "select 1"), sync()]);
    assert_eq!(sent, "PS");
    let (seen, _) = h.server(&[error("XX000"), ready(b'I')]);
    // The owed ParseComplete is never sent: PostgreSQL would have skipped it.
    assert_eq!(seen, "EZ");
    assert!(h.engine.statements.get(b"bad").is_none());
    assert!(h.engine.statements.get(b"a").is_none());
    assert!(!h
        .conn
        .statements
        .touch(&server_name(&parse_rest("selec 1"))));
}

#[test]
fn a_missing_statement_is_prepared_again_unseen() {
    let mut h = Harness::new();
    h.client(&[parse("a", "select 1"), sync()]);
    h.server(&[msg(b'1', &[]), ready(b'I')]);
    h.take_client();
    // Another connection, which does not have it.
    h.conn = ConnState::new(BTreeMap::new(), 2);
    h.conn.applied = Some(h.engine.settings.clone());
    assert_eq!(h.client(&[bind("a"), execute(), sync()]), "PBES");
    let (seen, _) = h.server(&[
        msg(b'1', &[]),
        msg(b'2', &[]),
        complete("SELECT 1"),
        ready(b'I'),
    ]);
    assert_eq!(seen, "2CZ");
}

#[test]
fn past_the_bound_the_least_recently_used_statement_is_closed_unseen() {
    let mut h = Harness::new();
    for (name, sql) in [("a", "select 1"), ("b", "select 2")] {
        h.client(&[parse(name, sql), sync()]);
        h.server(&[msg(b'1', &[]), ready(b'I')]);
    }
    h.take_client();
    assert_eq!(h.client(&[parse("c", "select 3"), sync()]), "CPS");
    let (seen, _) = h.server(&[msg(b'3', &[]), msg(b'1', &[]), ready(b'I')]);
    assert_eq!(seen, "1Z");
    assert_eq!(h.conn.statements.len(), 2);
}

#[test]
fn close_is_answered_from_the_clients_view() {
    let mut h = Harness::new();
    h.client(&[parse("a", "select 1"), sync()]);
    h.server(&[msg(b'1', &[]), ready(b'I')]);
    h.take_client();
    assert_eq!(h.client(&[close_statement("a"), sync()]), "S");
    let (seen, _) = h.server(&[ready(b'I')]);
    assert_eq!(seen, "3Z");
    assert!(h.engine.statements.get(b"a").is_none());
    // The server keeps it for whoever prepares the same text.
    assert!(h
        .conn
        .statements
        .touch(&server_name(&parse_rest("select 1"))));
    // The name is free again.
    assert_eq!(h.client(&[parse("a", "select 2"), sync()]), "PS");
}

#[test]
fn a_connection_is_released_only_between_transactions() {
    let mut h = Harness::new();
    h.client(&[query("BEGIN")]);
    let (_, next) = h.server(&[complete("BEGIN"), ready(b'T')]);
    assert_eq!(next, Next::Continue);
    assert!(!h.engine.may_release());
    h.client(&[query("COMMIT")]);
    let (_, next) = h.server(&[complete("COMMIT"), ready(b'I')]);
    assert_eq!(next, Next::Idle);
    // Extended messages without a Sync keep it.
    h.client(&[parse("", "select 1"), bind(""), execute(), msg(b'H', &[])]);
    h.server(&[msg(b'1', &[]), msg(b'2', &[]), complete("SELECT 1")]);
    assert!(!h.engine.may_release());
    h.client(&[sync()]);
    let (_, next) = h.server(&[ready(b'I')]);
    assert_eq!(next, Next::Idle);
}

#[test]
fn a_switch_is_pipelined_and_unseen_but_for_changed_parameters() {
    let mut h = Harness::new();
    let mut settings = SessionSettings::default();
    settings
        .startup
        .insert("application_name".into(), "app".into());
    h.engine.settings = Arc::new(settings);
    h.engine.set_client_params(
        [("application_name".to_owned(), "app".to_owned())]
            .into_iter()
            .collect(),
    );
    h.conn.applied = None;
    assert!(h.engine.switch_if_needed(&mut h.conn, &mut h.to_server));
    assert_eq!(h.client(&[query("select 1")]), "QQQ");
    let (seen, _) = h.server(&[
        complete("RESET"),
        ready(b'I'),
        msg(b'T', b"\0\0"),
        msg(b'D', b"\0\0"),
        complete("SELECT 1"),
        crate::pool::server::parameter_status("application_name", "app"),
        crate::pool::server::parameter_status("TimeZone", "UTC"),
        ready(b'I'),
    ]);
    // The client had application_name already: only TimeZone is news.
    assert_eq!(seen, "S");
    let (seen, next) = h.server(&[msg(b'T', b"\0\0"), complete("SELECT 1"), ready(b'I')]);
    assert_eq!(seen, "STCZ");
    assert_eq!(next, Next::Idle);
    // Same settings now: no switch.
    assert!(!h.engine.switch_if_needed(&mut h.conn, &mut h.to_server));
}

#[test]
fn a_switch_that_fails_ends_the_session() {
    let mut h = Harness::new();
    h.conn.applied = None;
    assert!(h.engine.switch_if_needed(&mut h.conn, &mut h.to_server));
    let (_, next) = h.server(&[error("XX000")]);
    assert!(matches!(next, Next::SwitchFailed(_)), "{next:?}");
}

#[test]
fn deallocate_and_discard_are_read_whole() {
    assert_eq!(deallocate(b"DEALLOCATE ALL"), Some(Deallocate::All));
    assert_eq!(
        deallocate(b" deallocate prepare all ; "),
        Some(Deallocate::All)
    );
    assert_eq!(deallocate(b"DISCARD ALL"), Some(Deallocate::All));
    assert_eq!(
        deallocate(b"DEALLOCATE _pg3_0"),
        Some(Deallocate::Named("_pg3_0".into()))
    );
    assert_eq!(
        deallocate(b"DEALLOCATE \"MiXed\"\"q\""),
        Some(Deallocate::Named("MiXed\"q".into()))
    );
    assert_eq!(
        deallocate(b"DEALLOCATE S1"),
        Some(Deallocate::Named("s1".into()))
    );
    assert_eq!(deallocate(b"DISCARD PLANS"), None);
    assert_eq!(deallocate(b"DEALLOCATE a b"), None);
    assert_eq!(deallocate(b"SELECT 1"), None);
    assert_eq!(deallocate(b""), None);
}

fn function_call(oid: u32) -> Vec<u8> {
    let mut b = oid.to_be_bytes().to_vec();
    b.extend([0, 0, 0, 0, 0, 0]);
    msg(b'F', &b)
}

#[test]
fn a_function_call_pins_and_set_config_by_oid_is_refused_when_settings_are_forwarded() {
    let mut h = Harness::with_protected(&["pgbastion.identity"]);
    let mut settings = SessionSettings::default();
    settings
        .forwarded
        .insert("pgbastion.identity".into(), "alice".into());
    h.engine.settings = Arc::new(settings.clone());
    h.conn.applied = Some(Arc::new(settings));
    // set_config (OID 2078): a query that fails in its place instead.
    let step = h.engine.client_message(
        &function_call(2078),
        &mut h.conn,
        &mut h.to_server,
        &mut h.to_client,
    );
    assert_eq!(step, ClientStep::Done);
    assert_eq!(tags(&std::mem::take(&mut h.to_server)), "Q");
    let (seen, _) = h.server(&[error("22012"), ready(b'I')]);
    assert_eq!(seen, "EZ");
    assert_eq!(sqlstate(&h.take_client()), "42501");
    // Any other function: sent, and the client is pinned.
    let step = h.engine.client_message(
        &function_call(2880),
        &mut h.conn,
        &mut h.to_server,
        &mut h.to_client,
    );
    assert_eq!(step, ClientStep::Pinned(PinReason::FunctionCall));
    let (seen, _) = h.server(&[msg(b'V', &[0, 0, 0, 1, 1]), ready(b'I')]);
    assert_eq!(seen, "VZ");
}

#[test]
fn a_query_after_an_extended_error_is_skipped_like_the_server_skips_it() {
    let mut h = Harness::new();
    // Parse fails; the server ignores the Query and answers the Sync.
    assert_eq!(
        h.client(&[parse("", "selec broken"), query("select 1"), sync()]),
        "PQS"
    );
    let (seen, next) = h.server(&[error("XX000"), ready(b'I')]);
    assert_eq!(seen, "EZ");
    assert_eq!(next, Next::Idle);
    assert!(h.engine.may_release());
}

#[test]
fn in_session_refusals_are_errors_not_fatal() {
    let mut h = Harness::new();
    h.client(&[parse("a", "select 1"), sync()]);
    h.server(&[msg(b'1', &[]), ready(b'I')]);
    h.take_client();
    h.client(&[parse("a", "select 2"), sync()]);
    h.server(&[error("26000"), ready(b'I')]);
    let out = h.take_client();
    let fields = message::ErrorFields::parse(&out[5..]).unwrap();
    assert_eq!(fields.code, "42P05");
    assert!(out.windows(6).any(|w| w == b"SERROR"), "severity ERROR");
}

#[test]
fn reset_all_must_end_its_query_and_the_forwarded_values_follow_it() {
    let mut h = Harness::with_protected(&["pgbastion.identity"]);
    let mut settings = SessionSettings::default();
    settings
        .forwarded
        .insert("pgbastion.identity".into(), "alice".into());
    h.engine.settings = Arc::new(settings.clone());
    h.conn.applied = Some(Arc::new(settings));
    // Last: sent, and the forwarded values go right after it (unseen).
    assert_eq!(h.client(&[query("UNLISTEN *; RESET ALL;")]), "QQ");
    let (seen, _) = h.server(&[complete("UNLISTEN"), complete("RESET"), ready(b'I')]);
    assert_eq!(seen, "CCZ");
    let (seen, next) = h.server(&[
        msg(b'T', b"\0\0"),
        msg(b'D', b"\0\0"),
        complete("SELECT 1"),
        ready(b'I'),
    ]);
    assert_eq!(seen, "CCZ", "the re-apply is not the client's");
    assert_eq!(next, Next::Continue);
    // (RESET ALL also took the startup values: a full switch comes before
    // the next message; not what this test is about.)
    assert!(h.engine.needs_switch);
    h.engine.needs_switch = false;
    // Not last: refused where it stands.
    h.take_client();
    assert_eq!(
        h.client(&[query(
            "RESET ALL; SELECT current_setting('pgbastion.identity')"
        )]),
        "Q"
    );
    h.server(&[error("22012"), ready(b'I')]);
    assert_eq!(sqlstate(&h.take_client()), "42501");
    // In the extended protocol: refused.
    h.client(&[parse("", "RESET ALL"), sync()]);
    h.server(&[error("26000"), ready(b'I')]);
    assert_eq!(sqlstate(&h.take_client()), "42501");
}

#[test]
fn sql_that_may_drop_statements_makes_pgbastion_forget_its_own() {
    let mut h = Harness::new();
    h.client(&[parse("a", "select 1"), sync()]);
    h.server(&[msg(b'1', &[]), ready(b'I')]);
    h.client(&[query("SELECT 1; DEALLOCATE ALL")]);
    h.server(&[
        complete("SELECT 1"),
        complete("DEALLOCATE ALL"),
        ready(b'I'),
    ]);
    assert!(h.conn.statements_dirty);
    // Before the next message: pgbastion's statements go, and "a" is
    // prepared again where it is used.
    assert_eq!(h.client(&[bind("a"), execute(), sync()]), "QPBES");
    assert!(!h.conn.statements_dirty);
}

#[test]
fn reset_all_is_found_where_it_ends_a_query() {
    assert!(resets_all(b"RESET ALL"));
    assert!(resets_all(b"  reset   all ;; "));
    assert!(resets_all(
        b"SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"
    ));
    assert!(resets_all(b"DISCARD ALL"));
    assert!(!resets_all(b"RESET ALL; SELECT 1"));
    assert!(!resets_all(b"SELECT 1"));
    assert!(mentions_reset_all(b"reset all; select 1"));
    assert!(!mentions_reset_all(b"reset search_path"));
    assert!(drops_statements(b"select 1; DEALLOCATE x"));
    assert!(!drops_statements(b"select deallocated from t"));
}
