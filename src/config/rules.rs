//! `[[rule]]`: the policy's rules checked against the rest of the
//! configuration (the listeners, upstreams and credentials they name, the
//! `[tailscale]` capability grants need), the refusal of rules that would
//! log in or open the console for someone known only by an address or a
//! forgeable PROXY header, and building the `Policy`.

use super::error::{ConfigError, Section};
use super::{
    ClientCertMode, CredentialConfig, ListenerConfig, ListenerIdentity, ProxyProtocol,
    TailscaleConfig, UpstreamConfig,
};
use crate::identity::IdentitySource;
use crate::policy::{Action, Login, Policy, Rule};

/// The largest network `proxy_trusted` may name on a listener whose
/// identity comes from the PROXY header's address (256: a /24 or an IPv6
/// /120), for rules that log in without a password or open the console.
pub const MAX_TRUSTED_PROXY_ADDRESSES: u32 = 256;

/// Every listener and upstream a rule names exists, and grants have a
/// capability to come from.
pub(super) fn check_references(
    rules: &[Rule],
    listeners: &[ListenerConfig],
    upstreams: &[UpstreamConfig],
    tailscale: Option<&TailscaleConfig>,
) -> Result<(), ConfigError> {
    for r in rules {
        let at = Section::Rule(r.name.clone());
        for name in r.listeners.iter().flatten() {
            if !listeners.iter().any(|l| &l.name == name) {
                return Err(at
                    .key("listeners")
                    .invalid(format!("no listener named {name:?}")));
            }
        }
        for name in r.upstreams.iter().flatten() {
            if !upstreams.iter().any(|u| &u.name == name) {
                return Err(at
                    .key("upstreams")
                    .invalid(format!("no upstream named {name:?}")));
            }
        }
        if r.from_grants && tailscale.and_then(|t| t.capability.as_ref()).is_none() {
            return Err(at.key("from_grants").invalid(
                "needs [tailscale] capability = \"...\" (the peer capability that carries the grants)",
            ));
        }
    }
    Ok(())
}

/// Rules that log in with pgbastion's credential (`login = "identity"`)
/// or open the console (`admin = true`) trust the identity alone: they
/// must allow, must not admit a client known only by its address, and
/// must not trust a PROXY header anyone in a broad network could send.
pub(super) fn check_trusting(
    rules: &[Rule],
    listeners: &[ListenerConfig],
    credentials: &[CredentialConfig],
) -> Result<(), ConfigError> {
    for r in rules
        .iter()
        .filter(|r| r.login == Login::Identity || r.admin)
    {
        let at = Section::Rule(r.name.clone());
        let what = if r.admin {
            "admin = true"
        } else {
            "login = \"identity\""
        };
        if r.action == Action::Deny {
            return Err(at
                .whole()
                .invalid(format!("{what} only makes sense in an allow rule")));
        }
        check_not_by_address(r, &at, what, listeners)?;
        check_not_by_forgeable_header(r, &at, what, listeners)?;
        if r.login == Login::Identity && credentials.is_empty() {
            return Err(at.key("login").invalid(
                "\"identity\" needs [[credential]] sections (what pgbastion logs in with)",
            ));
        }
    }
    Ok(())
}

/// Whether rule `r` may apply to listener `l`.
fn covers(r: &Rule, l: &ListenerConfig) -> bool {
    r.listeners.as_ref().is_none_or(|ls| ls.contains(&l.name))
}

/// An address is not a person: a rule that can admit a client known only
/// by its address must not log it in without a password.
fn check_not_by_address(
    r: &Rule,
    at: &Section,
    what: &str,
    listeners: &[ListenerConfig],
) -> Result<(), ConfigError> {
    let admits_addresses = r
        .sources
        .as_ref()
        .is_none_or(|s| s.contains(&IdentitySource::Network));
    let by_address = listeners.iter().find(|l| {
        covers(r, l)
            && match &l.identity {
                ListenerIdentity::Network => true,
                ListenerIdentity::ClientCert { mode, .. } => *mode == ClientCertMode::Optional,
                ListenerIdentity::Tailscale => false,
            }
    });
    match (admits_addresses, by_address) {
        (true, Some(l)) => Err(at.whole().invalid(format!(
            "{what} could let in a client of listener {:?} known only by its \
             address (an address is not a person); limit the rule with listeners = [...] to \
             client_cert or tailscale listeners, or with sources = [\"client_cert\", \"tailscale\"]",
            l.name
        ))),
        _ => Ok(()),
    }
}

/// A tailnet identity looked up from a PROXY header that a broad network
/// may send is no identity.
fn check_not_by_forgeable_header(
    r: &Rule,
    at: &Section,
    what: &str,
    listeners: &[ListenerConfig],
) -> Result<(), ConfigError> {
    let Some(l) = listeners
        .iter()
        .filter(|l| covers(r, l))
        .find(|l| identity_forgeable_by_proxy_header(l))
    else {
        return Ok(());
    };
    let admits_tailnet = r
        .sources
        .as_ref()
        .is_none_or(|s| s.contains(&IdentitySource::Tailscale));
    if !admits_tailnet {
        return Ok(());
    }
    Err(at.whole().invalid(format!(
        "{what} could let in a client of listener {:?}, whose tailnet identity \
         is looked up from the PROXY header's address and proxy_trusted ({}) admits senders \
         beyond a few known hosts, any of which could claim a tailnet address; list only \
         the balancers' or tailscaled's own addresses (at most {} addresses in all) in \
         proxy_trusted, or limit the rule with listeners = [...]",
        l.name,
        l.proxy_trusted
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        MAX_TRUSTED_PROXY_ADDRESSES
    )))
}

/// Whether anyone in `proxy_trusted` could forge a client's identity: on a
/// tailscale listener the PROXY header's source address is what WhoIs is
/// asked about, so every trusted sender can claim to be any tailnet peer.
/// A few named hosts (the balancers, `tailscale serve` on this host) are a
/// deliberate choice; a broad network is a mistake waiting for a stranger.
fn identity_forgeable_by_proxy_header(l: &ListenerConfig) -> bool {
    // Counted over every entry: 256 networks of 256 addresses each are as
    // broad as one /16.
    let senders: u128 = l
        .proxy_trusted
        .iter()
        // Loopback is this host, however wide it is written.
        .filter(|net| !net.network().is_loopback())
        .map(|net| {
            let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
            1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
        })
        .fold(0u128, u128::saturating_add);
    matches!(l.identity, ListenerIdentity::Tailscale)
        && l.proxy_protocol == ProxyProtocol::Required
        && senders > u128::from(MAX_TRUSTED_PROXY_ADDRESSES)
}

/// The policy, with unnamed rules named (its own checks name the rule).
pub(super) fn policy(rules: Vec<Rule>) -> Result<Policy, ConfigError> {
    Policy::new(rules).map_err(ConfigError::Policy)
}
