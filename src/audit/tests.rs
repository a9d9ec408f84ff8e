//! Shapes of audit events and facts.

use super::*;

#[test]
fn rejected_event_shape() {
    let facts = SessionFacts {
        session_id: "abc".into(),
        listener: "l".into(),
        client: ClientAddress::tcp("127.0.0.1:5000".parse().unwrap()),
        client_tls: Some(ClientTransport::Plaintext),
        transport: None,
        forwarded_by: None,
        requested: None,
        identity: None,
        proxy: None,
        rule: None,
        route: None,
    };
    let v = serde_json::to_value(Event::Rejected {
        facts: &facts,
        reason: RejectReason::TlsRequired,
        sqlstate: Some("28000"),
        message: "m".into(),
        duration_ms: 3,
        auth: None,
    })
    .unwrap();
    assert_eq!(v["event"], "session.rejected");
    assert_eq!(v["client"]["addr"], "127.0.0.1");
    assert_eq!(v["client"]["port"], 5000);
    assert_eq!(v["client_tls"]["mode"], "plaintext");
    assert_eq!(v["sqlstate"], "28000");
}

#[test]
fn auth_facts_shape() {
    let mut auth = AuthFacts::new(crate::config::AuthMode::Scram);
    auth.outcome = AuthOutcome::Ok;
    auth.client = Some(LegAuth {
        mechanism: Mechanism::ScramSha256Plus,
        channel_binding: true,
    });
    let v = serde_json::to_value(&auth).unwrap();
    assert_eq!(v["mode"], "scram");
    assert_eq!(v["result"], "ok");
    assert_eq!(v["client"]["mechanism"], "SCRAM-SHA-256-PLUS");
    assert_eq!(v["client"]["channel_binding"], true);
    assert!(v.get("server").is_none());
}
