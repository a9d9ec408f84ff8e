use super::*;
use proptest::prelude::*;

fn packet(code: u32, rest: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(rest);
    with_length_prefix(&body)
}

/// Issue 19 item 16: names are cut as PostgreSQL cuts them, and the
/// forwarded packet carries the cut name.
#[test]
fn overlong_user_and_database_are_truncated_on_a_char_boundary() {
    let user = format!("{}é-tail", "u".repeat(62));
    let db = "d".repeat(100);
    let mut rest = b"\0\x03\0\0".to_vec();
    for (k, v) in [
        ("user", user.as_str()),
        ("database", db.as_str()),
        ("options", &"o".repeat(80)),
    ] {
        rest.extend_from_slice(k.as_bytes());
        rest.push(0);
        rest.extend_from_slice(v.as_bytes());
        rest.push(0);
    }
    rest.push(0);
    let StartupPacket::Startup(m) = parse(&with_length_prefix(&rest)).unwrap() else {
        panic!("not a startup message");
    };
    // 62 ASCII bytes, then a 2-byte character that would end at byte 64.
    assert_eq!(m.user(), "u".repeat(62));
    assert_eq!(m.database(), "d".repeat(63));
    assert_eq!(m.param("options").map(str::len), Some(80));
    let StartupPacket::Startup(again) = parse(m.as_bytes()).unwrap() else {
        panic!("not a startup message");
    };
    assert_eq!(again, m);
    // Short names keep the client's bytes exactly.
    let short = StartupMessage::new(
        ProtocolVersion { major: 3, minor: 0 },
        vec![("user".into(), "u".repeat(63))],
    );
    assert_eq!(
        parse(short.as_bytes()).unwrap(),
        StartupPacket::Startup(short.clone())
    );
}

#[test]
fn ssl_and_gssenc_requests() {
    assert_eq!(parse(&ssl_request()), Ok(StartupPacket::SslRequest));
    assert_eq!(
        parse(&packet(GSSENC_REQUEST_CODE, &[])),
        Ok(StartupPacket::GssEncRequest)
    );
    assert_eq!(
        parse(&packet(SSL_REQUEST_CODE, &[0])),
        Err(StartupError::BadRequestLength("SSL"))
    );
}

#[test]
fn length_bounds() {
    assert_eq!(
        packet_len(7u32.to_be_bytes()),
        Err(StartupError::BadLength(7))
    );
    assert_eq!(packet_len(8u32.to_be_bytes()), Ok(8));
    assert_eq!(packet_len(10_000u32.to_be_bytes()), Ok(10_000));
    assert_eq!(
        packet_len(10_001u32.to_be_bytes()),
        Err(StartupError::BadLength(10_001))
    );
    assert_eq!(
        packet_len(u32::MAX.to_be_bytes()),
        Err(StartupError::BadLength(u64::from(u32::MAX)))
    );
    // A length that lies about the bytes that follow.
    let mut p = ssl_request().to_vec();
    p.push(0);
    assert!(matches!(parse(&p), Err(StartupError::Truncated { .. })));
    assert!(matches!(
        parse(&p[..3]),
        Err(StartupError::Truncated { .. })
    ));
}

#[test]
fn cancel_keys_of_protocol_3_0_and_3_2() {
    let short = packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2, 3, 4]);
    assert_eq!(
        parse(&short),
        Ok(StartupPacket::Cancel(CancelKey {
            process_id: 7,
            secret_key: vec![1, 2, 3, 4]
        }))
    );
    let mut long = vec![0, 0, 0, 9];
    long.extend_from_slice(&[0xab; 256]);
    assert!(matches!(
        parse(&packet(CANCEL_REQUEST_CODE, &long)),
        Ok(StartupPacket::Cancel(c)) if c.secret_key.len() == 256
    ));
    long.push(0);
    assert_eq!(
        parse(&packet(CANCEL_REQUEST_CODE, &long)),
        Err(StartupError::BadCancelKey(257))
    );
    assert_eq!(
        parse(&packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 1, 2, 3])),
        Err(StartupError::BadCancelKey(2))
    );
}

#[test]
fn startup_versions_including_grease() {
    for minor in [0u16, 2, 9999] {
        let msg = StartupMessage::new(
            ProtocolVersion { major: 3, minor },
            vec![
                ("user".into(), "alice".into()),
                ("_pq_.test_option".into(), "x".into()),
            ],
        );
        match parse(msg.as_bytes()) {
            Ok(StartupPacket::Startup(m)) => {
                assert_eq!(m.version.minor, minor);
                assert_eq!(m.user(), "alice");
                assert_eq!(m.database(), "alice");
                assert_eq!(m.as_bytes(), msg.as_bytes());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        parse(&packet(2 << 16, &[0])),
        Err(StartupError::UnsupportedProtocol { major: 2, minor: 0 })
    );
    // An unknown request code in the 1234.x range is refused, not guessed.
    assert!(matches!(
        parse(&packet((1234 << 16) | 5555, &[])),
        Err(StartupError::UnsupportedProtocol { major: 1234, .. })
    ));
}

#[test]
fn with_param_replaces_or_adds() {
    let m = StartupMessage::new(
        ProtocolVersion { major: 3, minor: 0 },
        vec![
            ("user".into(), "u".into()),
            ("application_name".into(), "psql".into()),
        ],
    );
    let changed = m.with_param("application_name", "psql via x");
    assert_eq!(changed.application_name(), Some("psql via x"));
    assert_eq!(changed.user(), "u");
    assert_eq!(
        parse(changed.as_bytes()),
        Ok(StartupPacket::Startup(changed.clone()))
    );
    let added = StartupMessage::new(m.version, vec![("user".into(), "u".into())])
        .with_param("application_name", "a");
    assert_eq!(added.application_name(), Some("a"));
    // Every spelling the client used is replaced by the one value.
    let spelled = StartupMessage::new(
        m.version,
        vec![
            ("PGBastion.Identity".into(), "evil".into()),
            ("user".into(), "u".into()),
            ("pgbastion.identity".into(), "evil too".into()),
        ],
    )
    .with_param("pgbastion.identity", "alice");
    assert_eq!(
        spelled.params,
        vec![
            ("pgbastion.identity".to_owned(), "alice".to_owned()),
            ("user".to_owned(), "u".to_owned()),
        ]
    );
}

#[test]
fn malformed_parameters() {
    let v3 = 3u32 << 16;
    assert_eq!(
        parse(&packet(v3, &[])),
        Err(StartupError::MalformedParameters)
    );
    assert_eq!(
        parse(&packet(v3, b"user\0")),
        Err(StartupError::MalformedParameters)
    );
    assert_eq!(
        parse(&packet(v3, b"user\0bob")),
        Err(StartupError::MalformedParameters)
    );
    assert_eq!(parse(&packet(v3, b"\0")), Err(StartupError::MissingUser));
    assert_eq!(
        parse(&packet(v3, b"user\0a\0user\0b\0\0")),
        Err(StartupError::DuplicateParameter("user".into()))
    );
    assert_eq!(
        parse(&packet(v3, b"user\0\xff\0\0")),
        Err(StartupError::NotUtf8("user".into()))
    );
}

proptest! {
    #[test]
    fn startup_round_trip(
        minor in any::<u16>(),
        params in proptest::collection::btree_map("[a-z_.]{1,12}", "[^\u{0}]{0,20}", 0..6),
    ) {
        let mut params: Vec<(String, String)> = params.into_iter().collect();
        params.retain(|(k, _)| k != "user");
        params.push(("user".into(), "u".into()));
        let msg = StartupMessage::new(ProtocolVersion { major: 3, minor }, params);
        if msg.as_bytes().len() <= MAX_PACKET_LEN {
            prop_assert_eq!(parse(msg.as_bytes()), Ok(StartupPacket::Startup(msg)));
        }
    }

    #[test]
    fn cancel_round_trip(pid in any::<u32>(), key in proptest::collection::vec(any::<u8>(), 4..=256)) {
        let req = CancelKey { process_id: pid, secret_key: key };
        prop_assert_eq!(parse(&req.cancel_request()), Ok(StartupPacket::Cancel(req)));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = parse(&bytes);
    }

    #[test]
    fn every_truncation_is_an_error(cut in 0usize..20) {
        let msg = StartupMessage::new(
            ProtocolVersion { major: 3, minor: 0 },
            vec![("user".into(), "alice".into())],
        );
        let bytes = msg.as_bytes();
        let cut = cut.min(bytes.len() - 1);
        prop_assert!(parse(&bytes[..cut]).is_err());
    }
}
