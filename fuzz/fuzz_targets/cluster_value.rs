//! A value read from Redis for a cancel mapping: anyone who can write to
//! Redis controls it. It must open only if this fleet sealed it, and never
//! panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgbastion::cluster::keys::FleetKeys;

fuzz_target!(|data: &[u8]| {
    let keys = FleetKeys::new(&[7u8; 32], "pgbastion").expect("a 32-byte secret");
    assert!(keys.open("pgbastion:cancel:00", data).is_none());
});
