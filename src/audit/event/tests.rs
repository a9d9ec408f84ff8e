//! The outcome names, unchanged and agreed on by serde and `as_str`.

use super::*;

/// Every name as the code before issue 20 wrote it (then string
/// literals), and serde agrees with `as_str`.
#[test]
fn names_are_unchanged_and_serde_agrees() {
    fn check<T: Serialize + std::fmt::Debug>(all: &[T], name: impl Fn(&T) -> String, want: &str) {
        let got: Vec<String> = all.iter().map(&name).collect();
        assert_eq!(got.join(" "), want);
        for v in all {
            assert_eq!(serde_json::to_value(v).unwrap(), name(v), "{v:?}");
        }
    }
    check(RejectReason::ALL, |v| v.as_str().into(), "bad_startup_packet tls_required pipelined_after_sslrequest unexpected_packet direct_tls_without_alpn tls_unavailable client_tls_handshake_failed client_closed client_io_error client_error client_timeout proxy_untrusted_source bad_proxy_header proxy_header_timeout too_many_sessions identity_session_limit not_admin identity_failed policy_denied audit_unavailable shutdown upstream_certificate_untrusted upstream_refused_tls upstream_unreachable upstream_timeout upstream_tls_failed upstream_io_error auth_throttled verifier_unavailable verifier_not_scram scram_protocol_violation auth_failed verifier_stale upstream_auth_unsupported upstream_auth_unproven upstream_refused upstream_login_failed authentication_timeout identity_login_without_identity no_credential credential_expired credential_unavailable credential_unsupported credential_refused pool_wait_timeout pool_unavailable pool_settings_refused pool_replication route_none route_conflict route_bad_endpoint route_endpoint_required");
    check(EndReason::ALL, |v| v.as_str().into(), "client_closed server_closed client_error server_error shutdown killed audit_unavailable channel_binding_refused protocol_violation authentication_timeout too_many_sessions");
    check(CancelOutcome::ALL, |v| v.as_str().into(), "forwarded forwarded_remote unmatched cluster_unavailable rate_limited plaintext_refused upstream_failed nothing_running relayed_to_instance");
    check(
        QueryOutcome::ALL,
        |v| v.as_str().into(),
        "ok error not_executed suspended unanswered",
    );
    check(
        QueryProtocol::ALL,
        |v| v.as_str().into(),
        "simple extended function_call replication",
    );
    check(CopyDirection::ALL, |v| v.as_str().into(), "in out both");
    check(
        CredentialKind::ALL,
        |v| v.as_str().into(),
        "password scram_secret client_cert rds_iam",
    );
    check(
        LoginMode::ALL,
        |v| v.as_str().into(),
        "passthrough scram identity",
    );
    let mechanisms = [
        Mechanism::ScramSha256,
        Mechanism::ScramSha256Plus,
        Mechanism::Password,
        Mechanism::Md5,
        Mechanism::Cert,
        Mechanism::Trust,
        Mechanism::Other("X-CUSTOM".into()),
    ];
    check(
        &mechanisms,
        |v| v.as_str().into(),
        "SCRAM-SHA-256 SCRAM-SHA-256-PLUS password md5 cert none X-CUSTOM",
    );
    for outcome in [
        AuthOutcome::Ok,
        AuthOutcome::Error {
            sqlstate: "28P01".into(),
        },
        AuthOutcome::RefusedByProxy {
            sqlstate: "28000".into(),
        },
        AuthOutcome::Incomplete,
    ] {
        assert_eq!(
            serde_json::to_value(&outcome).unwrap()["result"],
            outcome.as_str()
        );
    }
}

#[test]
fn a_named_mechanism_is_its_variant() {
    assert_eq!(Mechanism::named("SCRAM-SHA-256"), Mechanism::ScramSha256);
    assert_eq!(
        Mechanism::named("SCRAM-SHA-256-PLUS"),
        Mechanism::ScramSha256Plus
    );
    assert_eq!(Mechanism::named("md5"), Mechanism::Other("md5".into()));
}
