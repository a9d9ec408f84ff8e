//! SCRAM messages in both roles: the first byte picks the step, the rest
//! is the peer's message. Verifier text is parsed too.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgbastion::auth::scram::{
    ClientExchange, Credential, Offer, ServerExchange, Verifier, SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS,
};

fuzz_target!(|data: &[u8]| {
    let Some((&step, msg)) = data.split_first() else {
        return;
    };
    let v = Verifier::from_password(b"pw", b"salt", 1);
    let cb = [7u8; 32];
    match step % 4 {
        // A client's first message, with and without binding offered.
        0 => {
            for (offer, mech) in [
                (Offer { binding: Some(&cb) }, SCRAM_SHA_256_PLUS),
                (Offer { binding: Some(&cb) }, SCRAM_SHA_256),
                (Offer { binding: None }, SCRAM_SHA_256),
            ] {
                let _ = ServerExchange::start(offer, mech, msg, &v.salt, 1, "srv");
            }
        }
        // A client's final message after a valid first one.
        1 => {
            let offer = Offer { binding: Some(&cb) };
            let first = b"p=tls-server-end-point,,n=,r=abc";
            if let Ok((ex, _)) =
                ServerExchange::start(offer, SCRAM_SHA_256_PLUS, first, &v.salt, 1, "srv")
            {
                let _ = ex.finish(msg, &v.stored_key, &v.server_key);
            }
        }
        // A server's first and final messages to pgbastion the client.
        2 => {
            let (ex, _) = ClientExchange::start(&[SCRAM_SHA_256.into()], None, "abc").unwrap();
            let key = [1u8; 32];
            let keys = Credential::Keys {
                client_key: &key,
                verifier: &v,
            };
            if let Ok((awaiting, _)) = ex.respond(msg, &keys) {
                let _ = awaiting.verify(msg);
            }
        }
        _ => {
            let _ = Verifier::parse(&String::from_utf8_lossy(msg));
        }
    }
});
