//! A private certificate authority made on the spot, for `pgbastion demo`
//! and the tests: one CA per run, so nothing trusted outside it can be
//! confused with it.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

pub use rcgen::{date_time_ymd, Error as CertError};

/// A CA that can issue server and client certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// An issued certificate and its private key, in PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Writes `<stem>.crt` and `<stem>.key` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> std::io::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem)?;
        write_private(&key, self.key_pem.as_bytes())?;
        Ok((cert, key))
    }
}

/// Writes a file that only its owner may read (private keys).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)
}

impl Ca {
    pub fn new(common_name: &str) -> Result<Ca, CertError> {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name = name(common_name);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Writes the CA certificate to `<dir>/<stem>.crt`.
    pub fn write_cert(&self, dir: &Path, stem: &str) -> std::io::Result<PathBuf> {
        let path = dir.join(format!("{stem}.crt"));
        std::fs::write(&path, self.cert_pem())?;
        Ok(path)
    }

    /// A server certificate for DNS names and/or IP addresses.
    pub fn server_cert(&self, names: &[&str]) -> Result<Issued, CertError> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name = name(names.first().map(String::as_str).unwrap_or("server"));
        self.issue(params)
    }

    /// Issues a certificate from arbitrary parameters (validity, client
    /// usage, ...), for tests that need unusual certificates.
    pub fn issue(&self, params: CertificateParams) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}
