//! The query audit's statement normalizer: statement text is whatever a
//! client sends. It must never panic, whichever way backslashes are read,
//! and whatever it returns has no quote characters of a literal left in
//! it, and no comment start (the text it keeps is code, byte for byte).
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgbastion::audit::normalize::{normalize_with, Backslashes};

fuzz_target!(|data: &[u8]| {
    if let Ok(sql) = std::str::from_utf8(data) {
        for mode in [
            Backslashes::Unknown,
            Backslashes::Literal,
            Backslashes::Escape,
        ] {
            if let Ok(n) = normalize_with(sql, mode) {
                // Strings and dollar quotes are constants: none is left (a
                // quoted identifier may hold a quote character; skip those).
                if !sql.contains('"') {
                    assert!(!n.text.contains('\''), "{sql:?} -> {:?}", n.text);
                    assert!(
                        !n.text.contains("--") && !n.text.contains("/*"),
                        "{sql:?} -> {:?}",
                        n.text
                    );
                }
            }
        }
    }
});
