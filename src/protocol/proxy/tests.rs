use super::*;

#[test]
fn oversized_tlvs_are_left_out_whole() {
    let src: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let dst: SocketAddr = "10.0.0.2:6432".parse().unwrap();
    let huge = vec![b'x'; 70_000];
    let big = vec![b'y'; 40_000];
    let header = encode_v2(
        Some(src),
        Some(dst),
        &[
            (tlv::UNIQUE_ID, b"session".to_vec()),
            (tlv::PGBASTION_IDENTITY, huge),
            (0xE5, big.clone()),
            (0xE6, big),
        ],
    );
    let (parsed, len) = parse(&header).unwrap().unwrap();
    assert_eq!(len, header.len(), "a well-formed header, CRC included");
    assert!(header.len() <= 16 + usize::from(u16::MAX));
    assert_eq!(parsed.source(), Some(src));
    assert_eq!(parsed.tlvs.unique_id.as_deref(), Some("session"));
}
use proptest::prelude::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn crc32c_known_value() {
    // The standard check value of CRC-32C.
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}

#[test]
fn v1_forms() {
    let h = b"PROXY TCP4 192.168.0.1 10.0.0.1 56324 443\r\nrest";
    let (p, n) = parse(h).unwrap().unwrap();
    assert_eq!(n, h.len() - 4);
    assert_eq!(p.source(), Some(sa("192.168.0.1:56324")));
    let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
    assert_eq!(
        parse(h).unwrap().unwrap().0.source(),
        Some(sa("[2001:db8::1]:1"))
    );
    let (p, _) = parse(b"PROXY UNKNOWN whatever\r\n").unwrap().unwrap();
    assert_eq!(p.addresses, Addresses::Unspec);
    assert_eq!(p.source(), None);
    for bad in [
        &b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"[..],
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    ] {
        assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
    let mut long = b"PROXY TCP4 ".to_vec();
    long.resize(V1_MAX_LEN, b'1');
    assert_eq!(parse(&long), Err(ProxyError::V1TooLong));
    assert_eq!(parse(&long[..100]), Ok(None));
}

#[test]
fn missing_header_is_recognised_early() {
    // A Postgres SSLRequest where a header should be.
    assert_eq!(
        parse(&[0, 0, 0, 8, 4, 210, 22, 47]),
        Err(ProxyError::Missing)
    );
    assert_eq!(parse(b"PRO"), Ok(None));
    assert_eq!(parse(&V2_SIGNATURE[..5]), Ok(None));
}

#[test]
fn v2_with_every_tlv_round_trips() {
    let ssl = SslInfo {
        client: tlv::CLIENT_SSL | tlv::CLIENT_CERT_CONN,
        verify: 0,
        version: Some("TLSv1.3".into()),
        cipher: Some("TLS13_AES_128_GCM_SHA256".into()),
        cn: Some("alice".into()),
        sig_alg: Some("ECDSA".into()),
        key_alg: Some("EC256".into()),
    };
    let mut aws = vec![0x01];
    aws.extend_from_slice(b"vpce-0123456789abcdef0");
    let mut azure = vec![0x01];
    azure.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    let tlvs = vec![
        (tlv::ALPN, b"postgresql".to_vec()),
        (tlv::AUTHORITY, b"db.example.com".to_vec()),
        (tlv::UNIQUE_ID, b"0123456789abcdef".to_vec()),
        (tlv::SSL, ssl_tlv(&ssl)),
        (tlv::NOOP, vec![0; 3]),
        (tlv::NETNS, b"blue".to_vec()),
        (tlv::AWS, aws),
        (tlv::AZURE, azure),
        (tlv::GCP, 42u64.to_be_bytes().to_vec()),
        (tlv::PGBASTION_IDENTITY, br#"{"name":"alice"}"#.to_vec()),
    ];
    for (s, d) in [
        ("10.1.2.3:4000", "10.9.9.9:5432"),
        ("[2001:db8::7]:1", "[2001:db8::8]:2"),
        ("10.1.2.3:4000", "[::1]:5432"),
    ] {
        let bytes = encode_v2(Some(sa(s)), Some(sa(d)), &tlvs);
        let (p, n) = parse(&bytes).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(p.version, 2);
        assert_eq!(p.command, Command::Proxy);
        let src = p.source().unwrap();
        assert_eq!(src.port(), sa(s).port());
        let t = &p.tlvs;
        assert_eq!(t.alpn.as_deref(), Some("postgresql"));
        assert_eq!(t.authority.as_deref(), Some("db.example.com"));
        assert_eq!(t.unique_id.as_deref(), Some("0123456789abcdef"));
        assert_eq!(t.ssl.as_ref(), Some(&ssl));
        assert_eq!(t.netns.as_deref(), Some("blue"));
        assert_eq!(t.aws_vpce_id.as_deref(), Some("vpce-0123456789abcdef0"));
        assert_eq!(t.azure_link_id, Some(0xdead_beef));
        assert_eq!(t.gcp_psc_id, Some(42));
        assert_eq!(t.pgbastion_identity.as_deref(), Some(r#"{"name":"alice"}"#));
        assert!(t.crc32c_verified);
    }
}

#[test]
fn v2_local_unspec_and_unix() {
    let mut local = V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x11, 0, 12]);
    local.extend_from_slice(&[1; 12]);
    let (p, _) = parse(&local).unwrap().unwrap();
    assert_eq!(p.command, Command::Local);
    assert_eq!(p.source(), None, "LOCAL: the socket's own addresses count");
    let unspec = encode_v2(None, None, &[]);
    assert_eq!(
        parse(&unspec).unwrap().unwrap().0.addresses,
        Addresses::Unspec
    );
    let mut unix = V2_SIGNATURE.to_vec();
    unix.extend_from_slice(&[0x21, 0x31]);
    unix.extend_from_slice(&216u16.to_be_bytes());
    let mut block = vec![0u8; 216];
    block[..5].copy_from_slice(b"/a/b\0");
    unix.extend_from_slice(&block);
    let (p, _) = parse(&unix).unwrap().unwrap();
    assert_eq!(
        p.addresses,
        Addresses::Unix {
            src: b"/a/b".to_vec(),
            dst: vec![]
        }
    );
}

#[test]
fn v2_refusals() {
    let good = encode_v2(
        Some(sa("1.2.3.4:5")),
        Some(sa("6.7.8.9:10")),
        &[(tlv::AUTHORITY, b"x".to_vec())],
    );
    // A CRC that does not match.
    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    assert_eq!(parse(&bad_crc), Err(ProxyError::BadChecksum));
    // A changed address breaks the CRC too.
    let mut tampered = good.clone();
    tampered[16] ^= 1;
    assert_eq!(parse(&tampered), Err(ProxyError::BadChecksum));
    // A length too short for the family.
    let mut short = V2_SIGNATURE.to_vec();
    short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
    assert_eq!(
        parse(&short),
        Err(ProxyError::V2TooShort { len: 4, need: 12 })
    );
    // A TLV that claims more than the header holds.
    let mut tlv_over = V2_SIGNATURE.to_vec();
    tlv_over.extend_from_slice(&[0x21, 0x11, 0, 15]);
    tlv_over.extend_from_slice(&[0; 12]);
    tlv_over.extend_from_slice(&[tlv::AUTHORITY, 0, 9]);
    assert!(matches!(parse(&tlv_over), Err(ProxyError::BadTlv(_))));
    let mut v3 = good.clone();
    v3[12] = 0x31;
    assert_eq!(parse(&v3), Err(ProxyError::V2BadVersionCommand(0x31)));
    let mut udp = good;
    udp[13] = 0x12;
    assert_eq!(parse(&udp), Err(ProxyError::V2BadFamily(0x12)));
}

proptest! {
    #[test]
    fn truncation_at_every_byte_asks_for_more(
        a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), p in any::<u16>(), q in any::<u16>(),
        authority in "[a-z.]{0,40}", unique in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p);
        let dst = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(b)), q);
        for bytes in [
            encode_v2(Some(src), Some(dst), &[(tlv::AUTHORITY, authority.into_bytes()), (tlv::UNIQUE_ID, unique)]),
            encode_v1(Some(src), Some(dst)),
        ] {
            for cut in 0..bytes.len() {
                prop_assert_eq!(parse(&bytes[..cut]), Ok(None), "cut at {}", cut);
            }
            let (h, n) = parse(&bytes).unwrap().unwrap();
            prop_assert_eq!(n, bytes.len());
            prop_assert_eq!(h.source(), Some(src));
        }
    }

    #[test]
    fn v6_and_v1_round_trip(a in any::<u128>(), b in any::<u128>(), p in any::<u16>(), q in any::<u16>()) {
        let src = SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), p);
        let dst = SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), q);
        prop_assert_eq!(parse(&encode_v1(Some(src), Some(dst))).unwrap().unwrap().0.source(), Some(src));
        prop_assert_eq!(parse(&encode_v2(Some(src), Some(dst), &[])).unwrap().unwrap().0.source(), Some(src));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse(&bytes);
        let mut with_sig = V2_SIGNATURE.to_vec();
        with_sig.extend_from_slice(&bytes);
        let _ = parse(&with_sig);
        let mut with_v1 = b"PROXY ".to_vec();
        with_v1.extend_from_slice(&bytes);
        let _ = parse(&with_v1);
    }
}
