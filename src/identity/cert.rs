//! Names from a verified client certificate (rustls has already checked the
//! chain against the listener's client CA; this only reads names).

use serde::Deserialize;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::IdentityError;

/// The kinds of certificate names, in the order `cert_identity` lists
/// them to choose the identity name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertName {
    /// SAN URI, e.g. a SPIFFE id `spiffe://example.org/ns/app`.
    Uri,
    /// SAN DNS name.
    Dns,
    /// SAN email address (rfc822Name).
    Email,
    /// Subject common name.
    Cn,
}

/// The default order: the most specific kinds first.
pub const DEFAULT_ORDER: [CertName; 4] =
    [CertName::Uri, CertName::Dns, CertName::Email, CertName::Cn];

/// Returns the identity name (the first name of the first kind in `order`
/// the certificate has) and the names rules may match: every name of the
/// kinds `order` selects, in that order.
///
/// Kinds the listener did not select are left out on purpose: a subject CN
/// is free text in a certificate signing request, so a CA that vouches only
/// for the SAN email may still sign whatever CN the requester wrote. A rule
/// naming `ops@example.com` must not match a certificate whose email is
/// `bob@example.com` because its CN says `ops@example.com`.
pub fn names(der: &[u8], order: &[CertName]) -> Result<(String, Vec<String>), IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let mut found: Vec<(CertName, String)> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => found.push((CertName::Uri, (*u).to_owned())),
                GeneralName::DNSName(d) => found.push((CertName::Dns, (*d).to_owned())),
                GeneralName::RFC822Name(e) => found.push((CertName::Email, (*e).to_owned())),
                _ => {}
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            found.push((CertName::Cn, s.to_owned()));
        }
    }
    let mut selected: Vec<String> = Vec::new();
    for kind in order {
        for (_, n) in found.iter().filter(|(k, _)| k == kind) {
            if !selected.contains(n) {
                selected.push(n.clone());
            }
        }
    }
    let primary = selected
        .first()
        .cloned()
        .ok_or(IdentityError::NoCertificateName)?;
    Ok((primary, selected))
}

/// The subject common name, if any (for the PROXY protocol's SSL TLV).
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::certs::Ca;
    use rcgen::{CertificateParams, DnType, SanType};
    use rustls::pki_types::pem::PemObject;

    fn der_of(params: CertificateParams) -> Vec<u8> {
        let ca = Ca::new("test").unwrap();
        let issued = ca.issue(params).unwrap();
        rustls::pki_types::CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn order_chooses_the_identity_name() {
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "Alice Example");
        p.subject_alt_names = vec![
            SanType::Rfc822Name("alice@example.com".try_into().unwrap()),
            SanType::DnsName("alice.example.com".try_into().unwrap()),
            SanType::URI("spiffe://example.com/user/alice".try_into().unwrap()),
        ];
        let der = der_of(p);
        let (name, all) = names(&der, &DEFAULT_ORDER).unwrap();
        assert_eq!(name, "spiffe://example.com/user/alice");
        assert_eq!(all.len(), 4);
        assert!(all.contains(&"Alice Example".to_owned()));
        assert_eq!(
            names(&der, &[CertName::Email]).unwrap().0,
            "alice@example.com"
        );
        assert_eq!(
            names(&der, &[CertName::Cn, CertName::Uri]).unwrap().0,
            "Alice Example"
        );
    }

    #[test]
    fn missing_kinds_and_garbage() {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "bob");
        let der = der_of(p);
        assert!(matches!(
            names(&der, &[CertName::Uri]),
            Err(IdentityError::NoCertificateName)
        ));
        assert_eq!(names(&der, &DEFAULT_ORDER).unwrap().0, "bob");
        assert!(matches!(
            names(b"not a certificate", &DEFAULT_ORDER),
            Err(IdentityError::BadCertificate(_))
        ));
    }

    /// Issue 19 item 6: with `cert_identity = ["email"]`, a CN that reads
    /// like another user's email is not a name rules can match.
    #[test]
    fn only_selected_kinds_are_names() {
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "ops@example.com");
        p.subject_alt_names = vec![
            SanType::Rfc822Name("bob@example.com".try_into().unwrap()),
            SanType::DnsName("bob.example.com".try_into().unwrap()),
        ];
        let der = der_of(p);
        let (name, all) = names(&der, &[CertName::Email]).unwrap();
        assert_eq!(name, "bob@example.com");
        assert_eq!(all, vec!["bob@example.com".to_owned()]);
        let (_, all) = names(&der, &[CertName::Dns, CertName::Email]).unwrap();
        assert_eq!(all, vec!["bob.example.com", "bob@example.com"]);
        let (_, all) = names(&der, &DEFAULT_ORDER).unwrap();
        assert_eq!(
            all,
            vec!["bob.example.com", "bob@example.com", "ops@example.com"]
        );
    }
}
