//! Who may use which database as which user: ordered rules, first match
//! wins, decided after the StartupMessage is read and before any upstream
//! connection. This is the one place access is decided.
//!
//! With no rules configured every identified client is admitted (the
//! proxy then only enforces TLS); as soon as one rule exists, a request no
//! rule matches is denied.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::identity::{Identity, IdentitySource};
use crate::protocol::proxy::Tlvs;

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// One rule. Every condition that is set must hold; an unset one holds
/// for everything.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub action: Action,
    // Who.
    pub sources: Option<Vec<IdentitySource>>,
    /// Globs on the identity name or any certificate name.
    pub names: Option<Vec<String>>,
    /// Globs on the tailnet node name.
    pub nodes: Option<Vec<String>>,
    /// The node must carry at least one of these tags (globs).
    pub tags: Option<Vec<String>>,
    /// The client address must be in one of these networks.
    pub networks: Option<Vec<IpNet>>,
    pub listeners: Option<Vec<String>>,
    /// Through a PROXY header: the AWS VPC endpoint id (globs).
    pub aws_vpce_ids: Option<Vec<String>>,
    /// Through a PROXY header: the Azure Private Link id.
    pub azure_link_ids: Option<Vec<u32>>,
    /// Through a PROXY header: the GCP Private Service Connect id.
    pub gcp_psc_ids: Option<Vec<u64>>,
    // What.
    /// The upstream the session is routed to (by its listener or a
    /// `[[route]]`).
    pub upstreams: Option<Vec<String>>,
    /// Globs on the session's endpoint (from the TLS server name or
    /// `options=endpoint=`); a session without one matches none.
    pub endpoints: Option<Vec<String>>,
    /// Globs on the requested database.
    pub databases: Option<Vec<String>>,
    /// Globs on the requested database user.
    pub users: Option<Vec<String>>,
    /// Take the allowed databases and users from the values of the peer
    /// capability named in `[tailscale] capability`; each value is an
    /// object like `{"databases": ["app"], "users": ["app_ro"]}`.
    #[serde(default)]
    pub from_grants: bool,
    /// How an admitted client logs in to the database.
    #[serde(default)]
    pub login: Login,
    /// At most this many sessions at once per identity name admitted by
    /// this rule, so one person or service cannot take every server slot.
    pub max_sessions: Option<usize>,
    /// Identities this rule admits may use the admin console (database
    /// `pgbastion`).
    #[serde(default)]
    pub admin: bool,
    /// Whether the sessions this rule admits have every statement in the
    /// audit log.
    #[serde(default)]
    pub audit_queries: AuditQueries,
}

/// Query-level audit for the sessions a rule admits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditQueries {
    /// Session events only; the relay copies bytes without looking.
    #[default]
    Off,
    /// A `query` event per statement (see `query_audit`).
    Statements,
}

/// How a client a rule admits logs in to the database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Login {
    /// The client authenticates as it would to the server (passthrough,
    /// or SCRAM terminated by pgbastion).
    #[default]
    Password,
    /// pgbastion asks the client for nothing more than its identity (as
    /// PostgreSQL's `cert` method does) and logs in to the server with a
    /// `[[credential]]` it holds for the requested user.
    Identity,
}

/// A connection asking to be let in.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub identity: &'a Identity,
    pub client_ip: Option<IpAddr>,
    pub listener: &'a str,
    pub upstream: &'a str,
    /// The endpoint routing found (None: the session names none).
    pub endpoint: Option<&'a str>,
    /// The database the client asked for.
    pub database: &'a str,
    /// The database the server is asked for, when an upstream's `database`
    /// (an alias, or `{endpoint}`) makes it another.
    pub forwarded_database: Option<&'a str>,
    pub user: &'a str,
    /// The TLVs of the connection's PROXY header, if it had one.
    pub proxy: Option<&'a Tlvs>,
}

impl Request<'_> {
    /// The database names the session has: the one asked for and, when
    /// different, the one forwarded.
    fn databases(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.database).chain(self.forwarded_database)
    }
}

/// The outcome, with the rule that decided it (None: no rule matched, or
/// no policy at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub rule: Option<String>,
    /// How the client logs in (from the deciding rule).
    pub login: Login,
    /// The deciding rule's per-identity session limit.
    pub max_sessions: Option<usize>,
    /// The deciding rule admits administrators.
    pub admin: bool,
    pub audit_queries: AuditQueries,
}

#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// A grant value from the tailnet policy file.
#[derive(Debug, Deserialize)]
struct Grant {
    #[serde(default)]
    databases: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
}

impl Policy {
    /// The rules, in order (for checks across sections, e.g. config warnings).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Checks rules for mistakes a user can fix, and names unnamed rules.
    pub fn new(mut rules: Vec<Rule>) -> Result<Policy, String> {
        for (i, r) in rules.iter_mut().enumerate() {
            if r.name.is_empty() {
                r.name = format!("rule{i}");
            }
            if r.max_sessions == Some(0) {
                return Err(format!(
                    "rule {:?}: max_sessions must be at least 1 (use action = \"deny\" to refuse)",
                    r.name
                ));
            }
            if r.from_grants && r.action == Action::Deny {
                return Err(format!(
                    "rule {:?}: from_grants only makes sense in an allow rule",
                    r.name
                ));
            }
        }
        Ok(Policy { rules })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn decide(&self, req: &Request<'_>) -> Decision {
        if self.rules.is_empty() {
            return Decision {
                allowed: true,
                rule: None,
                login: Login::Password,
                max_sessions: None,
                admin: false,
                audit_queries: AuditQueries::Off,
            };
        }
        for rule in &self.rules {
            if rule.matches(req) {
                return Decision {
                    allowed: rule.action == Action::Allow,
                    rule: Some(rule.name.clone()),
                    login: rule.login,
                    max_sessions: rule.max_sessions,
                    admin: rule.admin,
                    audit_queries: rule.audit_queries,
                };
            }
        }
        Decision {
            allowed: false,
            rule: None,
            login: Login::Password,
            max_sessions: None,
            admin: false,
            audit_queries: AuditQueries::Off,
        }
    }
}

fn any_glob(patterns: &Option<Vec<String>>, value: &str) -> bool {
    patterns
        .as_ref()
        .is_none_or(|ps| ps.iter().any(|p| glob(p, value)))
}

impl Rule {
    fn matches(&self, req: &Request<'_>) -> bool {
        let id = req.identity;
        let who = self.sources.as_ref().is_none_or(|s| s.contains(&id.source))
            && self.names.as_ref().is_none_or(|ps| {
                ps.iter()
                    .any(|p| glob(p, &id.name) || id.cert_names.iter().any(|n| glob(p, n)))
            })
            && self.nodes.as_ref().is_none_or(|ps| {
                id.node
                    .as_deref()
                    .is_some_and(|n| ps.iter().any(|p| glob(p, n)))
            })
            && self
                .tags
                .as_ref()
                .is_none_or(|ps| id.tags.iter().any(|t| ps.iter().any(|p| glob(p, t))))
            && self.networks.as_ref().is_none_or(|nets| {
                req.client_ip
                    .is_some_and(|ip| nets.iter().any(|n| n.contains(&ip)))
            })
            && self
                .listeners
                .as_ref()
                .is_none_or(|ls| ls.iter().any(|l| l == req.listener))
            && self.aws_vpce_ids.as_ref().is_none_or(|ps| {
                req.proxy
                    .and_then(|t| t.aws_vpce_id.as_deref())
                    .is_some_and(|id| ps.iter().any(|p| glob(p, id)))
            })
            && self.azure_link_ids.as_ref().is_none_or(|ids| {
                req.proxy
                    .and_then(|t| t.azure_link_id)
                    .is_some_and(|id| ids.contains(&id))
            })
            && self.gcp_psc_ids.as_ref().is_none_or(|ids| {
                req.proxy
                    .and_then(|t| t.gcp_psc_id)
                    .is_some_and(|id| ids.contains(&id))
            });
        let what = self
            .upstreams
            .as_ref()
            .is_none_or(|us| us.iter().any(|u| u == req.upstream))
            && self
                .endpoints
                .as_ref()
                .is_none_or(|ps| req.endpoint.is_some_and(|e| ps.iter().any(|p| glob(p, e))))
            && self.databases_match(req)
            && any_glob(&self.users, req.user)
            && (!self.from_grants || req.databases().all(|db| granted(&id.grants, db, req.user)));
        who && what
    }

    /// `databases` against both names a session has when an upstream
    /// renames its database: an allow rule must allow both (the name the
    /// client asked for, and the one it is given), a deny rule refuses
    /// either, so neither an alias nor a template reaches a database a
    /// rule keeps people from.
    fn databases_match(&self, req: &Request<'_>) -> bool {
        match self.action {
            Action::Allow => req.databases().all(|db| any_glob(&self.databases, db)),
            Action::Deny => req.databases().any(|db| any_glob(&self.databases, db)),
        }
    }
}

/// Whether any grant value allows this database and user together.
fn granted(grants: &[serde_json::Value], database: &str, user: &str) -> bool {
    grants.iter().any(|v| {
        serde_json::from_value::<Grant>(v.clone()).is_ok_and(|g| {
            g.databases.iter().any(|p| glob(p, database)) && g.users.iter().any(|p| glob(p, user))
        })
    })
}

/// Glob matching: `*` is any run of characters, `?` exactly one; nothing
/// else is special. Linear time (no backtracking blow-up on hostile input).
pub fn glob(pattern: &str, value: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    let (mut pi, mut vi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == v[vi]) {
            pi += 1;
            vi += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, vi));
            pi += 1;
        } else if let Some((sp, sv)) = star {
            pi = sp + 1;
            vi = sv + 1;
            star = Some((sp, sv + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, v, want) in [
            ("*", "", true),
            ("*", "anything", true),
            ("app", "app", true),
            ("app", "app2", false),
            ("app*", "app_rw", true),
            ("*@example.com", "alice@example.com", true),
            ("*@example.com", "alice@example.org", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b", "xxaxxbxxc", false),
            ("tag:*", "tag:ci", true),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(glob(p, v), want, "glob({p:?}, {v:?})");
        }
        // Hostile input stays fast.
        let long = "a".repeat(5000);
        assert!(!glob("*a*a*a*a*a*a*a*b", &long));
    }

    fn id(name: &str) -> Identity {
        let mut i = Identity::network(None);
        i.name = name.into();
        i
    }

    fn req<'a>(identity: &'a Identity, db: &'a str, user: &'a str) -> Request<'a> {
        Request {
            identity,
            client_ip: Some("10.1.2.3".parse().unwrap()),
            listener: "public",
            upstream: "main",
            endpoint: None,
            database: db,
            forwarded_database: None,
            user,
            proxy: None,
        }
    }

    #[test]
    fn endpoints_limit_a_rule_to_the_sessions_of_those_tenants() {
        let policy = Policy::new(vec![Rule {
            name: "alice-t1".into(),
            names: Some(vec!["alice".into()]),
            endpoints: Some(vec!["t1".into()]),
            ..serde_json::from_str::<Rule>("{}").unwrap()
        }])
        .unwrap();
        let alice = Identity {
            name: "alice".into(),
            ..Identity::network(None)
        };
        let decide = |endpoint| {
            let mut r = req(&alice, "app", "app");
            r.endpoint = endpoint;
            policy.decide(&r).allowed
        };
        assert!(decide(Some("t1")));
        assert!(!decide(Some("t2")), "another tenant");
        assert!(!decide(None), "a session without an endpoint");
    }

    #[test]
    fn an_alias_or_template_cannot_reach_a_database_a_rule_keeps_from() {
        let policy = Policy::new(vec![
            Rule {
                name: "no-payroll".into(),
                action: Action::Deny,
                databases: Some(vec!["payroll".into()]),
                ..serde_json::from_str::<Rule>("{}").unwrap()
            },
            Rule {
                name: "t1".into(),
                databases: Some(vec!["t1".into()]),
                ..serde_json::from_str::<Rule>("{}").unwrap()
            },
        ])
        .unwrap();
        let who = Identity::network(None);
        let decide = |asked, forwarded| {
            let mut r = req(&who, asked, "app");
            r.forwarded_database = forwarded;
            policy.decide(&r)
        };
        // Asking for an alias of payroll is asking for payroll.
        let d = decide("reports", Some("payroll"));
        assert_eq!((d.allowed, d.rule.as_deref()), (false, Some("no-payroll")));
        // Named t1, given t2 by a template: the allow rule does not hold.
        assert!(!decide("t1", Some("t2")).allowed);
        assert!(decide("t1", None).allowed);
        assert!(decide("t1", Some("t1")).allowed);
    }

    fn rules(toml_text: &str) -> Policy {
        #[derive(Deserialize)]
        struct R {
            rule: Vec<Rule>,
        }
        Policy::new(toml::from_str::<R>(toml_text).unwrap().rule).unwrap()
    }

    #[test]
    fn first_match_wins_and_default_is_deny() {
        let p = rules(
            r#"
            [[rule]]
            name = "no-bob-rw"
            action = "deny"
            names = ["bob"]
            users = ["app_rw"]
            [[rule]]
            name = "app"
            names = ["alice", "bob"]
            databases = ["app"]
            users = ["app_*"]
            "#,
        );
        let (alice, bob, eve) = (id("alice"), id("bob"), id("eve"));
        let d = p.decide(&req(&alice, "app", "app_rw"));
        assert_eq!(
            d,
            Decision {
                allowed: true,
                rule: Some("app".into()),
                login: Login::Password,
                max_sessions: None,
                admin: false,
                audit_queries: AuditQueries::Off,
            }
        );
        let d = p.decide(&req(&bob, "app", "app_rw"));
        assert_eq!(
            d,
            Decision {
                allowed: false,
                rule: Some("no-bob-rw".into()),
                login: Login::Password,
                max_sessions: None,
                admin: false,
                audit_queries: AuditQueries::Off,
            }
        );
        assert!(p.decide(&req(&bob, "app", "app_ro")).allowed);
        assert_eq!(
            p.decide(&req(&eve, "app", "app_ro")),
            Decision {
                allowed: false,
                rule: None,
                login: Login::Password,
                max_sessions: None,
                admin: false,
                audit_queries: AuditQueries::Off,
            }
        );
        assert!(!p.decide(&req(&alice, "postgres", "app_rw")).allowed);
        assert!(
            Policy::default().decide(&req(&eve, "x", "y")).allowed,
            "no policy: admit"
        );
    }

    #[test]
    fn networks_tags_nodes_and_grants() {
        let p = rules(
            r#"
            [[rule]]
            name = "lan"
            networks = ["10.1.0.0/16"]
            users = ["reporting"]
            [[rule]]
            name = "ci"
            tags = ["tag:ci"]
            nodes = ["runner-*"]
            [[rule]]
            name = "grants"
            sources = ["tailscale"]
            from_grants = true
            "#,
        );
        let anyone = id("x");
        assert_eq!(
            p.decide(&req(&anyone, "db", "reporting")).rule.as_deref(),
            Some("lan")
        );
        let mut outside = req(&anyone, "db", "reporting");
        outside.client_ip = Some("10.2.0.1".parse().unwrap());
        assert!(!p.decide(&outside).allowed);

        let mut ci = id("tag:ci");
        ci.tags = vec!["tag:ci".into()];
        ci.node = Some("runner-7".into());
        assert_eq!(p.decide(&req(&ci, "db", "u")).rule.as_deref(), Some("ci"));
        ci.node = Some("laptop".into());
        assert!(!p.decide(&req(&ci, "db", "u")).allowed);

        let mut granted = id("alice@example.com");
        granted.source = IdentitySource::Tailscale;
        granted.grants = vec![
            serde_json::json!({"databases": ["app"], "users": ["app_ro"]}),
            serde_json::json!({"databases": ["metrics*"], "users": ["grafana"]}),
            serde_json::json!("malformed"),
        ];
        assert!(p.decide(&req(&granted, "app", "app_ro")).allowed);
        assert!(p.decide(&req(&granted, "metrics_eu", "grafana")).allowed);
        assert!(
            !p.decide(&req(&granted, "app", "grafana")).allowed,
            "database and user from the same grant"
        );
        assert!(!p.decide(&req(&granted, "app", "app_rw")).allowed);
    }

    #[test]
    fn proxy_tlv_conditions() {
        let p = rules("[[rule]]\nname = \"vpce\"\naws_vpce_ids = [\"vpce-0abc*\"]\n[[rule]]\nname = \"psc\"\ngcp_psc_ids = [42]\n");
        let anyone = id("x");
        assert!(
            !p.decide(&req(&anyone, "db", "u")).allowed,
            "no PROXY header: no TLVs"
        );
        let tlvs = Tlvs {
            aws_vpce_id: Some("vpce-0abc123".into()),
            ..Tlvs::default()
        };
        let mut r = req(&anyone, "db", "u");
        r.proxy = Some(&tlvs);
        assert_eq!(p.decide(&r).rule.as_deref(), Some("vpce"));
        let other = Tlvs {
            aws_vpce_id: Some("vpce-0def".into()),
            gcp_psc_id: Some(42),
            ..Tlvs::default()
        };
        r.proxy = Some(&other);
        assert_eq!(p.decide(&r).rule.as_deref(), Some("psc"));
    }

    #[test]
    fn deny_with_grants_is_refused() {
        #[derive(Deserialize)]
        struct R {
            rule: Vec<Rule>,
        }
        let r: R = toml::from_str("[[rule]]\naction = \"deny\"\nfrom_grants = true\n").unwrap();
        assert!(Policy::new(r.rule).is_err());
    }
}
