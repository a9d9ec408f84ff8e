//! The pool's session-state classifier: statement text is whatever a
//! client sends. It must never panic, and what it reports holds together:
//! every replayed statement is a piece of the text, no more changes than
//! statements, and nothing forbidden when nothing is protected.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgbastion::pool::classify::{classify, Change};

fuzz_target!(|data: &[u8]| {
    if let Ok(sql) = std::str::from_utf8(data) {
        let protected = ["pgbastion.identity".to_owned(), "application_name".to_owned()];
        let e = classify(sql, &protected);
        assert!(e.changes.len() <= e.statements, "{sql:?} -> {e:?}");
        for c in &e.changes {
            if let Change::Set { statement, .. } = c {
                assert!(sql.contains(statement.as_str()), "{sql:?} -> {e:?}");
            }
        }
        assert_eq!(classify(sql, &[]).forbidden, None, "{sql:?}");
    }
});
