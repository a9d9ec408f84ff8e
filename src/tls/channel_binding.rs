//! `tls-server-end-point` channel binding data (RFC 5929): a hash of the
//! server's certificate, which SCRAM-SHA-256-PLUS mixes into the proof so
//! that a proof made for one TLS server is useless at any other.
//!
//! pgbastion uses it twice per terminated session: for its own
//! certificate (what clients bind to, computed once per load in each
//! `ServerCert` of the `ServerCerts` set, and picked by the client's
//! server name exactly as the served chain is) and for the
//! database server's (what pgbastion binds to, from the certificate the
//! upstream presented on that connection).

use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

/// The channel binding data for a DER certificate, or `None` where RFC 5929
/// defines none (Ed25519, RSA-PSS, unknown algorithms) or the certificate
/// does not parse: then `-PLUS` is simply not used on that leg.
///
/// The hash is the one of the certificate's signature algorithm, except
/// that MD5 and SHA-1 are replaced by SHA-256 (RFC 5929, section 4.1), which
/// is what OpenSSL, and so PostgreSQL and libpq, compute.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    let hash = match oid.as_str() {
        // md5/sha1/sha256 WithRSAEncryption, ecdsa-with-SHA1/SHA256,
        // dsa-with-sha1/sha256.
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2"
        | "1.2.840.10040.4.3"
        | "2.16.840.1.101.3.4.3.2" => Sha256::digest(cert_der).to_vec(),
        // sha224WithRSAEncryption, ecdsa-with-SHA224.
        "1.2.840.113549.1.1.14" | "1.2.840.10045.4.3.1" => Sha224::digest(cert_der).to_vec(),
        // sha384WithRSAEncryption, ecdsa-with-SHA384.
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Sha384::digest(cert_der).to_vec(),
        // sha512WithRSAEncryption, ecdsa-with-SHA512.
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Sha512::digest(cert_der).to_vec(),
        _ => return None,
    };
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn self_signed(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).unwrap();
        let params = CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn ecdsa_p256_uses_sha256() {
        let der = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            tls_server_end_point(&der),
            Some(Sha256::digest(&der).to_vec())
        );
    }

    #[test]
    fn ecdsa_p384_uses_sha384() {
        let der = self_signed(&rcgen::PKCS_ECDSA_P384_SHA384);
        let cb = tls_server_end_point(&der).unwrap();
        assert_eq!(cb, Sha384::digest(&der).to_vec());
        assert_eq!(cb.len(), 48);
    }

    #[test]
    fn ed25519_has_no_binding() {
        assert_eq!(
            tls_server_end_point(&self_signed(&rcgen::PKCS_ED25519)),
            None
        );
    }

    #[test]
    fn garbage_has_no_binding() {
        assert_eq!(tls_server_end_point(b"not a certificate"), None);
        assert_eq!(tls_server_end_point(&[]), None);
    }
}
