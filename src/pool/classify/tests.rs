use super::*;
use proptest::prelude::*;

fn protected() -> Vec<String> {
    vec![
        "pgbastion.identity".to_owned(),
        "application_name".to_owned(),
    ]
}

fn run(sql: &str) -> Effects {
    classify(sql, &protected())
}

fn set(name: &str, statement: &str) -> Change {
    Change::Set {
        name: name.to_owned(),
        statement: statement.to_owned(),
    }
}

fn reset(name: &str) -> Change {
    Change::Reset {
        name: name.to_owned(),
    }
}

#[test]
fn pins() {
    use PinReason::*;
    let cases: &[(&str, PinReason)] = &[
        ("LISTEN chan", Listen),
        ("listen \"Chan\"", Listen),
        // Code the server runs where pgbastion cannot look.
        ("DO $body$ BEGIN LISTEN x; END $body$", DoBlock),
        ("do language plpgsql 'begin perform 1; end'", DoBlock),
        // RESET ALL leaves role and session_authorization alone.
        ("SELECT set_config('role', 'other', false)", SetRole),
        (
            "SELECT pg_catalog.set_config('ROLE', 'other', false)",
            SetRole,
        ),
        (
            "SELECT set_config('session_authorization', 'x', false)",
            SessionAuthorization,
        ),
        ("  /* c */ LiStEn x", Listen),
        ("PREPARE q AS SELECT 1", SqlPrepare),
        ("prepare q (int) as select $1", SqlPrepare),
        ("PREPARE transaction AS SELECT 1", SqlPrepare),
        ("SELECT pg_advisory_lock(1)", AdvisoryLock),
        ("SELECT pg_advisory_lock_shared(1, 2)", AdvisoryLock),
        ("select PG_TRY_ADVISORY_LOCK(1)", AdvisoryLock),
        ("SELECT pg_try_advisory_lock_shared (1)", AdvisoryLock),
        ("SELECT pg_catalog.pg_advisory_lock(1)", AdvisoryLock),
        (
            "SELECT pg_catalog . \"pg_advisory_lock\" /* c */ (1)",
            AdvisoryLock,
        ),
        (
            "SELECT * FROM t WHERE pg_try_advisory_lock(id)",
            AdvisoryLock,
        ),
        (
            "SELECT 1; SELECT (SELECT pg_advisory_lock(7))",
            AdvisoryLock,
        ),
        ("SELECT U&\"pg\\005fadvisory_lock\"(1)", AdvisoryLock),
        ("CREATE TEMP TABLE t (a int)", TempObject),
        ("create temporary table t as select 1", TempObject),
        ("CREATE GLOBAL TEMPORARY TABLE t (a int)", TempObject),
        ("CREATE LOCAL TEMP SEQUENCE s", TempObject),
        ("CREATE TEMP VIEW v AS SELECT 1", TempObject),
        ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", TempObject),
        (
            "CREATE OR REPLACE TEMPORARY RECURSIVE VIEW v (a) AS SELECT 1",
            TempObject,
        ),
        ("CREATE TABLE pg_temp.t (a int)", TempObject),
        ("CREATE TABLE \"pg_temp\".t (a int)", TempObject),
        (
            "CREATE FUNCTION pg_temp.f() RETURNS int AS 'select 1' LANGUAGE sql",
            TempObject,
        ),
        ("CREATE TABLE PG_TEMP_3.t ()", TempObject),
        ("SELECT * INTO TEMP t FROM u", TempObject),
        ("select 1 as a into temporary table t", TempObject),
        ("SELECT 1 INTO LOCAL TEMP t", TempObject),
        ("SELECT 1 INTO pg_temp.t", TempObject),
        (
            "WITH x AS (SELECT 1) SELECT * INTO TEMP t FROM x",
            TempObject,
        ),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", HoldCursor),
        (
            "declare c binary no scroll cursor with hold for select 1",
            HoldCursor,
        ),
        ("LOAD 'auto_explain'", Load),
        ("load '$libdir/plugins/x'", Load),
        ("SET ROLE admin", SetRole),
        ("SET SESSION ROLE admin", SetRole),
        ("set role none", SetRole),
        ("SET role TO admin", SetRole),
        ("SET role = 'admin'", SetRole),
        ("SET SESSION AUTHORIZATION bob", SessionAuthorization),
        ("SET SESSION AUTHORIZATION DEFAULT", SessionAuthorization),
        ("SET session_authorization = 'bob'", SessionAuthorization),
        ("SET search_path FROM CURRENT", Unclear),
        ("SELECT 1; LISTEN a; LOAD 'x'", Listen),
    ];
    for (sql, why) in cases {
        assert_eq!(run(sql).pin, Some(*why), "{sql}");
    }
    // A computed name could be `role`: refused when settings are
    // protected (see `forbidden`), pinned when none is.
    for sql in [
        "SELECT set_config($1, 'x', false)",
        "UPDATE pg_settings SET setting = 'x' WHERE name = 'role'",
    ] {
        assert_eq!(classify(sql, &[]).pin, Some(Unclear), "{sql}");
    }
}

#[test]
fn lookalikes_do_not_pin() {
    let cases = [
        "SELECT pg_advisory_xact_lock(1)",
        "SELECT pg_try_advisory_xact_lock_shared(1)",
        "SELECT pg_advisory_unlock(1)",
        "SELECT pg_advisory_unlock_all()",
        "SELECT pg_advisory_lock",
        "SELECT \"PG_ADVISORY_LOCK\"(1)",
        "SELECT 'pg_advisory_lock(1)'",
        "SELECT $$ pg_advisory_lock(1) $$",
        "SET LOCAL ROLE admin",
        "SET LOCAL role = admin",
        "SET LOCAL SESSION AUTHORIZATION bob",
        "RESET ROLE",
        "RESET SESSION AUTHORIZATION",
        "SET ROLE TO DEFAULT",
        "PREPARE TRANSACTION 'gid'",
        "prepare transaction $$gid$$",
        "COMMIT PREPARED 'gid'",
        "EXECUTE q(1)",
        "DEALLOCATE q",
        "UNLISTEN chan",
        "UNLISTEN *",
        "SELECT 'LISTEN x'",
        "SELECT 1 -- LISTEN x",
        "SELECT 1 /* LISTEN /* nested */ x */",
        "\"listen\" x",
        "\"LISTEN\" x",
        "NOTIFY chan",
        "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
        "DECLARE c CURSOR FOR WITH hold AS (SELECT 1) SELECT * FROM hold",
        "CREATE TABLE t (a int)",
        "CREATE UNLOGGED TABLE t (a int)",
        "CREATE TABLE temp (a int)",
        "INSERT INTO temp VALUES (1)",
        "WITH x AS (SELECT 1) INSERT INTO temp SELECT * FROM x",
        "SELECT * FROM temp",
        "CREATE INDEX ON t (temp)",
        "SELECT 1 INTO t",
        "DISCARD TEMP",
        "SELECT 'load'",
        "SET LOCAL search_path FROM CURRENT",
        "",
        "   ",
        "-- only a comment",
        "/* only */ /* comments */",
        ";;;",
    ];
    for sql in cases {
        assert_eq!(run(sql).pin, None, "{sql}");
    }
}

#[test]
fn changes() {
    let cases: Vec<(&str, Vec<Change>)> = vec![
        (
            "SET search_path TO a, b",
            vec![set("search_path", "SET search_path TO a, b")],
        ),
        (
            "set Search_Path = 'a'",
            vec![set("search_path", "set Search_Path = 'a'")],
        ),
        (
            "SET SESSION work_mem = '64MB';",
            vec![set("work_mem", "SET SESSION work_mem = '64MB'")],
        ),
        (
            "SET \"search_path\" = x",
            vec![set("search_path", "SET \"search_path\" = x")],
        ),
        (
            "SET \"MyApp\".\"X\" = 1",
            vec![set("myapp.x", "SET \"MyApp\".\"X\" = 1")],
        ),
        (
            "SET myapp . x TO 1",
            vec![set("myapp.x", "SET myapp . x TO 1")],
        ),
        (
            "SET TIME ZONE 'UTC'",
            vec![set("timezone", "SET TIME ZONE 'UTC'")],
        ),
        (
            "set time zone interval '+02:00' hour to minute",
            vec![set(
                "timezone",
                "set time zone interval '+02:00' hour to minute",
            )],
        ),
        ("SET TIME ZONE LOCAL", vec![reset("timezone")]),
        ("SET TIME ZONE DEFAULT", vec![reset("timezone")]),
        (
            "SET timezone = 'UTC'",
            vec![set("timezone", "SET timezone = 'UTC'")],
        ),
        (
            "SET NAMES 'UTF8'",
            vec![set("client_encoding", "SET NAMES 'UTF8'")],
        ),
        ("SET NAMES", vec![reset("client_encoding")]),
        ("SET NAMES DEFAULT", vec![reset("client_encoding")]),
        (
            "SET SCHEMA 'app'",
            vec![set("search_path", "SET SCHEMA 'app'")],
        ),
        (
            "SET XML OPTION DOCUMENT",
            vec![set("xmloption", "SET XML OPTION DOCUMENT")],
        ),
        (
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            vec![set(
                "session_characteristics",
                "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            )],
        ),
        ("SET search_path TO DEFAULT", vec![reset("search_path")]),
        ("SET search_path = default", vec![reset("search_path")]),
        (
            "SET SESSION search_path TO DEFAULT",
            vec![reset("search_path")],
        ),
        (
            "SET search_path = 'default'",
            vec![set("search_path", "SET search_path = 'default'")],
        ),
        ("RESET search_path", vec![reset("search_path")]),
        ("reset \"MyApp\".x", vec![reset("myapp.x")]),
        ("RESET TIME ZONE", vec![reset("timezone")]),
        ("RESET ALL", vec![Change::ResetAll]),
        ("discard all", vec![Change::ResetAll]),
        (
            "SET a.b = /* why */ 1 /* trailing */ ; SELECT 1; RESET c.d",
            vec![set("a.b", "SET a.b = /* why */ 1"), reset("c.d")],
        ),
        (
            "/* lead */ SET x.y = 'a;b' -- tail\n; RESET ALL; SET x.z=$$;$$",
            vec![
                set("x.y", "SET x.y = 'a;b'"),
                Change::ResetAll,
                set("x.z", "SET x.z=$$;$$"),
            ],
        ),
        ("SET session = 1", vec![set("session", "SET session = 1")]),
        ("SET LOCAL search_path = a", vec![]),
        ("SET LOCAL TIME ZONE 'UTC'", vec![]),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", vec![]),
        ("SET SESSION TRANSACTION READ ONLY", vec![]),
        ("SET TRANSACTION SNAPSHOT '0001'", vec![]),
        ("SET CONSTRAINTS ALL DEFERRED", vec![]),
        (
            "SET LOCAL SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            vec![],
        ),
        ("RESET ROLE", vec![]),
        ("RESET SESSION AUTHORIZATION", vec![]),
        ("RESET TRANSACTION ISOLATION LEVEL", vec![]),
        ("ALTER ROLE me SET search_path = a", vec![]),
        ("ALTER DATABASE d SET work_mem = '1MB'", vec![]),
        ("SELECT set_config('search_path', 'a', false)", vec![]),
        ("\"set\" search_path = a", vec![]),
        ("DISCARD PLANS", vec![]),
        ("UPDATE t SET a = 1", vec![]),
    ];
    for (sql, want) in cases {
        assert_eq!(run(sql).changes, want, "{sql}");
    }
}

#[test]
fn forbidden() {
    let cases = [
        ("SET pgbastion.identity = 'x'", "pgbastion.identity"),
        ("SET SESSION pgbastion.identity TO 'x'", "pgbastion.identity"),
        ("SET LOCAL pgbastion.identity TO 'x'", "pgbastion.identity"),
        ("SET \"PGBastion\".\"Identity\" = 'x'", "pgbastion.identity"),
        ("SET pgbastion . identity TO 'x'", "pgbastion.identity"),
        ("set PGBASTION.IDENTITY to default", "pgbastion.identity"),
        ("SET U&\"pgbastion\".U&\"\\0069dentity\" = 'x'", "pgbastion.identity"),
        ("SET U&\"pgbastion.!0069dentity\" UESCAPE '!' = 'x'", "pgbastion.identity"),
        ("RESET pgbastion.identity", "pgbastion.identity"),
        ("SET application_name = 'x'", "application_name"),
        ("SET application_name = DEFAULT", "application_name"),
        ("reset Application_Name", "application_name"),
        ("SELECT 1; SET application_name TO 'x'", "application_name"),
        ("SELECT set_config('pgbastion.identity', 'x', false)", "pgbastion.identity"),
        ("SELECT set_config('PGBastion.Identity', 'x', false)", "pgbastion.identity"),
        ("SELECT pg_catalog.set_config('application_name', 'x', true)", "application_name"),
        ("SELECT \"set_config\"('application_name', 'x', true)", "application_name"),
        ("SELECT SET_CONFIG(E'application\\_name', 'x', true)", "application_name"),
        ("SELECT set_config(E'pgbastion.\\x69dentity', 'x', true)", "set_config"),
        ("SELECT set_config($$application_name$$, 'x', true)", "application_name"),
        ("SELECT set_config($q$application_name$q$, 'x', true)", "application_name"),
        ("SELECT set_config(U&'application_name', 'x', true)", "set_config"),
        ("SELECT * FROM t WHERE (SELECT set_config('application_name', 'x', false)) = ''", "application_name"),
        ("SELECT set_config($1, 'x', false)", "set_config"),
        ("SELECT set_config('pgbastion.' || 'identity', 'x', false)", "set_config"),
        ("SELECT set_config('x'::text, 'x', false)", "set_config"),
        ("SELECT set_config(lower('X'), 'x', false)", "set_config"),
        ("SELECT set_config(('x'), 'x', false)", "set_config"),
        ("SELECT set_config(name, 'x', false) FROM t", "set_config"),
        ("SELECT set_config('a'\n'b', 'x', false)", "set_config"),
        ("UPDATE pg_settings SET setting = 'x' WHERE name = 'application_name'", "set_config"),
        ("update pg_catalog.pg_settings set setting = 'x'", "set_config"),
        (
            "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql SET pgbastion.identity = 'x' AS 'select 1'",
            "pgbastion.identity",
        ),
        ("ALTER FUNCTION f() SET application_name TO 'x'", "application_name"),
    ];
    for (sql, want) in cases {
        assert_eq!(run(sql).forbidden.as_deref(), Some(want), "{sql}");
    }
}

#[test]
fn allowed() {
    let cases = [
        "SELECT set_config('search_path', 'a', false)",
        "SELECT set_config('pgbastion.identityx', 'x', false)",
        "SELECT current_setting('pgbastion.identity')",
        "SHOW application_name",
        "SELECT 'SET application_name = 1'",
        "RESET ALL",
        "DISCARD ALL",
        "SET search_path = pgbastion.identity",
        "UPDATE t SET application_name = 'x'",
        "SELECT * FROM pg_settings",
        "ALTER ROLE me SET search_path = a",
        "SELECT set_config",
        "SET U&\"pgbastion\".\"\\0069dentity\" = 'x'",
        "-- SET application_name = 'x'",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC UPDATE t SET application_name = 1",
    ];
    for sql in cases {
        assert_eq!(run(sql).forbidden, None, "{sql}");
    }
}

#[test]
fn nothing_is_forbidden_without_a_list() {
    for sql in [
        "SET pgbastion.identity = 'x'",
        "SELECT set_config($1, 'x', false)",
        "UPDATE pg_settings SET setting = 'x'",
    ] {
        assert_eq!(classify(sql, &[]).forbidden, None, "{sql}");
    }
}

#[test]
fn statements_are_counted() {
    let cases = [
        ("", 0),
        (";", 0),
        (" ; ;; ", 0),
        ("-- c\n/* d */", 0),
        ("SELECT 1", 1),
        ("SELECT 1;", 1),
        ("SELECT 1; SELECT 2", 2),
        ("SELECT ';'; SELECT $$;$$; SELECT 1 -- ;", 3),
        ("SELECT 1; /* ; */ ; SELECT 2;", 2),
    ];
    for (sql, n) in cases {
        assert_eq!(run(sql).statements, n, "{sql}");
    }
}

#[test]
fn first_pin_and_first_forbidden_win() {
    let e = run("LOAD 'x'; LISTEN y; SET application_name = 1; RESET pgbastion.identity");
    assert_eq!(e.pin, Some(PinReason::Load));
    assert_eq!(e.forbidden.as_deref(), Some("application_name"));
    assert_eq!(e.statements, 4);
}

#[test]
fn unterminated_text_changes_nothing() {
    for sql in [
        "SET a.b = 'x",
        "LISTEN x; SELECT $$",
        "SET a.b = 1; /* ",
        "SELECT \"x",
    ] {
        let e = run(sql);
        assert_eq!(e.changes, vec![], "{sql}");
        assert_eq!(e.pin, None, "{sql}");
        assert_eq!(e.forbidden, None, "{sql}");
    }
}

#[test]
fn readings_that_disagree_merge_on_the_safe_side() {
    // standard_conforming_strings on: the SET is code; off: it is in a
    // string that does not end.
    let e = run("SELECT 'a\\'; SET application_name = 'x'; LISTEN c; -- ");
    assert_eq!(e.forbidden.as_deref(), Some("application_name"));
    assert_eq!(e.changes, vec![]);
    assert_eq!(e.pin, Some(PinReason::Unclear));

    // Both readings end: on, the SETs are code; off, they are in a string.
    let e = run("SELECT 'a\\'; SET application_name = 'x'; SET a.b = 1; --'");
    assert_eq!(e.forbidden.as_deref(), Some("application_name"));
    assert_eq!(e.changes, vec![set("a.b", "SET a.b = 1")]);
    assert_eq!(e.pin, Some(PinReason::Unclear), "{e:?}");

    // A backslash in a plain string read either way gives the same
    // effects: no pin.
    let e = run("SET a.b = 'c\\d'");
    assert_eq!(e.changes, vec![set("a.b", "SET a.b = 'c\\d'")]);
    assert_eq!(e.pin, None);
}

#[test]
fn a_backslash_after_a_multibyte_character_is_read_both_ways() {
    // In BIG5 or GBK, `é\` may be one character: the string ends at the
    // second quote and the SET is code.
    let sql = "SELECT E'é\\'; SET application_name = 'x'; --'";
    assert_eq!(run(sql).forbidden.as_deref(), Some("application_name"));
    // Read the UTF-8 way it is one string; both readings agree here.
    let e = run("SELECT E'é\\n'");
    assert_eq!((e.pin, e.forbidden), (None, None));
}

#[test]
fn a_megabyte_is_read_in_linear_time() {
    let mut sql = String::new();
    while sql.len() < 1 << 20 {
        sql.push_str("SET a.b = 'x'; SELECT pg_advisory_xact_lock(1) /* c */; ");
    }
    let started = std::time::Instant::now();
    let e = run(&sql);
    assert!(e.changes.len() > 10_000);
    assert_eq!(e.pin, None);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    // One long statement: dotted names, calls, SET clauses.
    let long = format!(
        "CREATE FUNCTION f() RETURNS int {} AS 'x'",
        "SET set.set.set = 1 ".repeat(40_000)
    );
    let started = std::time::Instant::now();
    assert_eq!(run(&long).statements, 1);
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// A small deterministic generator (xorshift), so a failure reproduces.
fn bytes(seed: u64, len: usize, alphabet: &[u8]) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            alphabet[(x % alphabet.len() as u64) as usize]
        })
        .collect()
}

#[test]
fn random_text_does_not_panic() {
    let sql_bytes = b"SETsetLISTENU&\"'$;.=(),E\\ \n-/*pg_temp_advisory_lockconfig1";
    let all: Vec<u8> = (0..=255).collect();
    for seed in 0..2000 {
        for alphabet in [&sql_bytes[..], &all[..]] {
            let b = bytes(seed, (seed % 97) as usize, alphabet);
            let sql = String::from_utf8_lossy(&b);
            let _ = run(&sql);
            let _ = classify(&sql, &[]);
        }
    }
}

proptest! {
    #[test]
    fn never_panics(sql in ".*") {
        let _ = run(&sql);
    }

    #[test]
    fn never_panics_on_sql_like_text(sql in "(SET|RESET|LISTEN|set_config|U&|\"|'|\\$|;|\\.|=|\\(|,| |E|\\\\|é|--|/\\*|\\*/|\n|a|1)*") {
        let _ = run(&sql);
    }
}
