//! PROXY protocol v1 and v2 headers from a load balancer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgbastion::protocol::proxy;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, len))) = proxy::parse(data) {
        assert!(len <= data.len());
        let _ = header.source();
    }
});
