//! A PgBouncer-format secrets file (an operator's file, but parsed
//! without trust all the same).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pgbastion::auth::secrets::parse_secrets_file(&String::from_utf8_lossy(data));
});
