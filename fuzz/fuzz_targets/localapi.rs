//! tailscaled's LocalAPI WhoIs answer: HTTP/1.x, then JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let peer = "100.64.0.7:51000".parse().unwrap();
    let _ = pgbastion::identity::tailscale::identity_from_response(data, peer, Some("example.com/cap/pgbastion"));
});
