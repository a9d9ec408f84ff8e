use super::*;

#[test]
fn md5_answer_and_request() {
    let msg = md5_password_message("postgres", b"password", [1, 2, 3, 4]);
    assert_eq!(
        &msg[5..msg.len() - 1],
        b"md598511ceaec347a656f032c7f2a16ef17"
    );
    let req = AuthRequest::parse(&[0, 0, 0, 5, 1, 2, 3, 4]).unwrap();
    assert_eq!(req, AuthRequest::Md5Password([1, 2, 3, 4]));
    assert_eq!(req.code(), 5);
    assert!(AuthRequest::parse(&[0, 0, 0, 5, 1, 2]).is_err());
}
use crate::auth::scram::SCRAM_SHA_256_PLUS as SCRAM_PLUS;
use proptest::prelude::*;

#[test]
fn framing() {
    let msg = build(b'Z', b"I");
    assert_eq!(frame(&msg, 100), Ok(Some((b'Z', 6))));
    assert_eq!(frame(&msg[..5], 100), Ok(None));
    assert_eq!(frame(&msg[..2], 100), Ok(None));
    assert_eq!(
        frame(&[b'Z', 0, 0, 0, 3], 100),
        Err(MessageError::BadLength(3))
    );
    assert_eq!(
        frame(&[b'Z', 0xff, 0xff, 0xff, 0xff], 100),
        Err(MessageError::TooLong {
            len: 1 << 32,
            max: 100
        })
    );
}

#[test]
fn error_response_round_trip() {
    let e = ErrorResponse::new("28000", "no")
        .with_detail("because")
        .with_hint("try again");
    let bytes = e.encode();
    let (t, total) = frame(&bytes, 1000).unwrap().unwrap();
    assert_eq!((t, total), (b'E', bytes.len()));
    let fields = ErrorFields::parse(&bytes[5..]).unwrap();
    assert_eq!(fields.code, "28000");
    assert_eq!(fields.message, "no");
    assert_eq!(fields.severity, "FATAL");
    assert!(ErrorFields::parse(b"Cabc").is_err());
    assert!(ErrorFields::parse(b"").is_err());
}

#[test]
fn authentication_requests() {
    assert_eq!(AuthRequest::parse(&[0, 0, 0, 0]), Ok(AuthRequest::Ok));
    let mut sasl = 10u32.to_be_bytes().to_vec();
    sasl.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
    assert_eq!(
        AuthRequest::parse(&sasl),
        Ok(AuthRequest::Sasl(vec![
            SCRAM_PLUS.into(),
            "SCRAM-SHA-256".into()
        ]))
    );
    assert_eq!(
        AuthRequest::parse(&[0, 0, 0, 7, 1]),
        Ok(AuthRequest::Other(7))
    );
    let rebuilt = authentication_sasl(&["SCRAM-SHA-256".into()]);
    assert_eq!(
        AuthRequest::parse(&rebuilt[5..]),
        Ok(AuthRequest::Sasl(vec!["SCRAM-SHA-256".into()]))
    );
    assert!(AuthRequest::parse(&[0, 0]).is_err());
    assert!(AuthRequest::parse(&[0, 0, 0, 10, b'a']).is_err());
    assert_eq!(
        sasl_initial_mechanism(b"SCRAM-SHA-256-PLUS\0\0\0\0\x05"),
        Ok(SCRAM_PLUS.as_bytes())
    );
    assert!(sasl_initial_mechanism(b"SCRAM").is_err());
}

#[test]
fn sasl_messages() {
    let mut none = b"SCRAM-SHA-256\0".to_vec();
    none.extend_from_slice(&(-1i32).to_be_bytes());
    assert_eq!(
        parse_sasl_initial_response(&none),
        Ok(("SCRAM-SHA-256", None))
    );
    let mut wrong_len = b"SCRAM-SHA-256\0".to_vec();
    wrong_len.extend_from_slice(&5i32.to_be_bytes());
    wrong_len.extend_from_slice(b"abc");
    assert!(parse_sasl_initial_response(&wrong_len).is_err());
    assert!(parse_sasl_initial_response(b"SCRAM\0\0\0").is_err());
    let cont = authentication_sasl_data(false, b"r=abc");
    assert_eq!(
        AuthRequest::parse(&cont[5..]),
        Ok(AuthRequest::SaslContinue(b"r=abc".to_vec()))
    );
    let fin = authentication_sasl_data(true, b"v=x");
    assert_eq!(
        AuthRequest::parse(&fin[5..]),
        Ok(AuthRequest::SaslFinal(b"v=x".to_vec()))
    );
    assert_eq!(
        AuthRequest::parse(&authentication_ok()[5..]),
        Ok(AuthRequest::Ok)
    );
    assert_eq!(auth_method_name(5), "an MD5 password");
    assert_eq!(auth_method_name(3), "a cleartext password");
}

#[test]
fn data_rows() {
    let mut body = 2u16.to_be_bytes().to_vec();
    body.extend_from_slice(&3i32.to_be_bytes());
    body.extend_from_slice(b"bob");
    body.extend_from_slice(&(-1i32).to_be_bytes());
    assert_eq!(parse_data_row(&body), Ok(vec![Some(&b"bob"[..]), None]));
    assert!(parse_data_row(&body[..body.len() - 1]).is_err());
    let mut long = body.clone();
    long.push(0);
    assert!(parse_data_row(&long).is_err());
    let q = extended_query("select $1", &["x"]);
    let mut at = 0;
    let mut tags = Vec::new();
    while let Some((t, len)) = frame(&q[at..], 1000).unwrap() {
        tags.push(t);
        at += len;
    }
    assert_eq!(tags, b"PBES");
    assert_eq!(at, q.len());
}

#[test]
fn backend_key_data_bounds() {
    let key = |pid, key: Vec<u8>| CancelKey {
        process_id: pid,
        secret_key: key,
    };
    for k in [
        key(42, vec![1, 2, 3, 4]),
        key(7, vec![9; 32]),
        key(7, vec![9; 256]),
    ] {
        assert_eq!(parse_backend_key_data(&backend_key_data(&k)[5..]), Ok(k));
    }
    assert!(
        parse_backend_key_data(&[0, 0, 0, 1, 2, 3, 4]).is_err(),
        "3-byte key"
    );
    assert!(parse_backend_key_data(&[0, 0, 0]).is_err());
    let mut too_long = vec![0, 0, 0, 1];
    too_long.extend_from_slice(&[0; 257]);
    assert!(parse_backend_key_data(&too_long).is_err());
    let shown = format!("{:?}", key(42, vec![1, 2, 3, 4]));
    assert!(
        !shown.contains("[1, 2, 3, 4]"),
        "Debug hides the key: {shown}"
    );
}

proptest! {
    #[test]
    fn backend_key_data_round_trip(pid in any::<u32>(), key in proptest::collection::vec(any::<u8>(), 4..=256)) {
        let k = CancelKey { process_id: pid, secret_key: key };
        let bytes = backend_key_data(&k);
        prop_assert_eq!(frame(&bytes, 1000), Ok(Some((b'K', bytes.len()))));
        prop_assert_eq!(parse_backend_key_data(&bytes[5..]), Ok(k));
    }

    #[test]
    fn build_then_frame(t in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let msg = build(t, &body);
        prop_assert_eq!(frame(&msg, 1000), Ok(Some((t, body.len() + 5))));
    }

    #[test]
    fn error_fields_round_trip(message in "[^\u{0}]{0,40}", hint in "[^\u{0}]{0,40}") {
        let encoded = ErrorResponse::new("08P01", message.clone()).with_hint(hint).encode();
        let parsed = ErrorFields::parse(&encoded[5..]).unwrap();
        prop_assert_eq!(parsed.message, message);
        prop_assert_eq!(parsed.code, "08P01");
    }

    #[test]
    fn parsers_never_panic(body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = frame(&body, 64);
        let _ = ErrorFields::parse(&body);
        let _ = AuthRequest::parse(&body);
        let _ = sasl_initial_mechanism(&body);
        let _ = parse_backend_key_data(&body);
        let _ = parse_sasl_initial_response(&body);
        let _ = parse_data_row(&body);
    }

    #[test]
    fn sasl_initial_response_round_trip(mech in "[A-Z0-9-]{1,20}", data in proptest::collection::vec(any::<u8>(), 0..100)) {
        let msg = sasl_initial_response(&mech, &data);
        prop_assert_eq!(parse_sasl_initial_response(&msg[5..]), Ok((mech.as_str(), Some(&data[..]))));
    }
}
