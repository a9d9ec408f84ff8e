//! The client's first packets: length prefix, then SSLRequest,
//! GSSENCRequest, CancelRequest or StartupMessage.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgbastion::protocol::startup;

fuzz_target!(|data: &[u8]| {
    if let Some(prefix) = data.get(..4) {
        let _ = startup::packet_len([prefix[0], prefix[1], prefix[2], prefix[3]]);
    }
    if let Ok(startup::StartupPacket::Startup(m)) = startup::parse(data) {
        // What the session reads of it.
        let _ = (m.user(), m.database(), m.application_name());
        assert!(startup::parse(m.as_bytes()).is_ok(), "what was accepted parses again");
    }
});
