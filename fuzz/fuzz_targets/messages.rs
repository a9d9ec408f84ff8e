//! Tagged messages from either peer while a session authenticates:
//! framing, then every parser the session applies to a message body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgbastion::protocol::message;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok(Some((tag, len))) = message::frame(&data[at..], 1 << 20) {
        let body = &data[at + 5..at + len];
        let _ = tag;
        let _ = message::AuthRequest::parse(body);
        let _ = message::ErrorFields::parse(body);
        let _ = message::parse_backend_key_data(body);
        let _ = message::parse_sasl_initial_response(body);
        let _ = message::parse_data_row(body);
        at += len;
    }
});
