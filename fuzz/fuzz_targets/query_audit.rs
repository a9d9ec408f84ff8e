//! The query audit's framing and matching: both directions' bytes come
//! from peers (a client, a server). Split arbitrarily between the two
//! directions and into chunks, it must never panic. (That bind parameter
//! values never reach a record holds by construction, and is tested in
//! the unit tests; with arbitrary bytes a "parameter" cannot be told from
//! a statement name the client chose.)
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgbastion::audit::query::QueryTracker;

fuzz_target!(|data: &[u8]| {
    let mut t = QueryTracker::new(true, Box::new(|r| {
        let _ = format!("{r:?}");
        true
    }));
    // The first byte of each chunk says which side sent it and how long
    // the chunk is.
    let mut rest = data;
    while let Some((&ctl, tail)) = rest.split_first() {
        let n = usize::from(ctl & 0x7f).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        if ctl & 0x80 == 0 {
            t.client_bytes(chunk);
        } else {
            t.server_bytes(chunk);
        }
        rest = next;
    }
});
