//! AWS credentials for RDS IAM tokens, the way AWS SDKs find them in the
//! environment: access keys in `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
//! (/ `AWS_SESSION_TOKEN`), else a web identity token (EKS IRSA, GitHub
//! OIDC, ...): `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN` exchanged
//! with STS `AssumeRoleWithWebIdentity` for temporary credentials, which
//! are kept until five minutes before they expire.
//!
//! The STS call is one HTTPS GET over pgbastion's verifying TLS (system
//! roots, plus `AWS_CA_BUNDLE` when set); `AWS_ENDPOINT_URL_STS` overrides
//! the regional endpoint, as in the SDKs. The response parser is pure.

use crate::sync::MutexExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::rds_iam::{uri_encode, AwsCredentials, IamError};
use crate::config::RootSources;

/// Temporary credentials are replaced once less than this is left.
const RENEW_MARGIN: Duration = Duration::from_secs(5 * 60);
/// The most of an STS answer pgbastion reads.
const MAX_RESPONSE: usize = 64 * 1024;
/// How long the STS call may take.
const STS_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom to call STS.
#[derive(Debug, Clone)]
pub struct WebIdentity {
    pub token_file: PathBuf,
    pub role_arn: String,
    pub session_name: String,
    /// `host` or `host:port`, HTTPS.
    pub endpoint: String,
    /// Extra CA bundle for the endpoint (AWS_CA_BUNDLE).
    pub ca_bundle: Option<PathBuf>,
}

impl WebIdentity {
    /// From the environment; None when no web identity is configured.
    /// `region` picks the regional STS endpoint when AWS_REGION is unset.
    pub fn from_env(region: &str) -> Option<WebIdentity> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let token_file = var("AWS_WEB_IDENTITY_TOKEN_FILE")?;
        let role_arn = var("AWS_ROLE_ARN")?;
        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| region.to_owned());
        let endpoint = var("AWS_ENDPOINT_URL_STS")
            .map(|u| {
                u.trim_start_matches("https://")
                    .trim_end_matches('/')
                    .to_owned()
            })
            .unwrap_or_else(|| format!("sts.{region}.amazonaws.com"));
        Some(WebIdentity {
            token_file: token_file.into(),
            role_arn,
            session_name: var("AWS_ROLE_SESSION_NAME").unwrap_or_else(|| "pgbastion".into()),
            endpoint,
            ca_bundle: var("AWS_CA_BUNDLE").map(PathBuf::from),
        })
    }

    /// Exchanges the token (read anew each time: it is rotated on disk)
    /// for temporary credentials and their expiry.
    ///
    /// The token file is not read with `secret_file`: the platform writes
    /// it (Kubernetes projects it with mode 0644 by default), so the 0600
    /// check would refuse every standard deployment, and it holds a
    /// short-lived signed token, not a secret the operator keeps.
    pub async fn assume(&self) -> Result<(AwsCredentials, SystemTime), IamError> {
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| {
            IamError::WebIdentity(format!(
                "reading AWS_WEB_IDENTITY_TOKEN_FILE {}: {e}",
                self.token_file.display()
            ))
        })?;
        let query = format!(
            "Action=AssumeRoleWithWebIdentity&DurationSeconds=3600&RoleArn={}&RoleSessionName={}&Version=2011-06-15&WebIdentityToken={}",
            uri_encode(&self.role_arn),
            uri_encode(&self.session_name),
            uri_encode(token.trim())
        );
        let body = tokio::time::timeout(STS_TIMEOUT, self.get(&query))
            .await
            .map_err(|_| {
                IamError::WebIdentity(format!(
                    "STS at {} did not answer within {STS_TIMEOUT:?}",
                    self.endpoint
                ))
            })??;
        parse_response(&body)
    }

    async fn get(&self, query: &str) -> Result<String, IamError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            IamError::WebIdentity(format!("STS at {}: {what}: {e}", self.endpoint))
        };
        let (host, port) = match self.endpoint.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|e| fail("bad port", &e))?),
            None => (self.endpoint.as_str(), 443u16),
        };
        let connector = crate::tls::service_connector(&RootSources {
            ca_file: self.ca_bundle.clone(),
            ca_dir: None,
            system: true,
        })
        .map_err(|e| fail("TLS setup", &e))?;
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| fail("connect", &e))?;
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| fail("host name", &e))?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| fail("TLS", &e))?;
        let request = format!(
            "GET /?{query} HTTP/1.1\r\nHost: {}\r\nAccept: application/xml\r\nConnection: close\r\n\r\n",
            self.endpoint
        );
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| fail("request", &e))?;
        let mut response = Vec::new();
        (&mut tls)
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut response)
            .await
            .map_err(|e| fail("response", &e))?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| fail("response", &"no HTTP header"))?;
        let status = head.split(' ').nth(1).unwrap_or("");
        if status != "200" {
            let message = tag(body, "Message").unwrap_or(status);
            return Err(IamError::WebIdentity(format!(
                "STS refused AssumeRoleWithWebIdentity for {}: {message}",
                self.role_arn
            )));
        }
        Ok(body.to_owned())
    }
}

/// The credentials and expiry in an AssumeRoleWithWebIdentity answer.
pub fn parse_response(xml: &str) -> Result<(AwsCredentials, SystemTime), IamError> {
    let missing = |t: &str| IamError::WebIdentity(format!("STS answer without {t}"));
    let creds = tag(xml, "Credentials").ok_or_else(|| missing("Credentials"))?;
    let field = |t: &'static str| tag(creds, t).map(str::to_owned).ok_or_else(|| missing(t));
    let expiration = field("Expiration")?;
    let expires = humantime::parse_rfc3339_weak(expiration.trim_end_matches('Z'))
        .map_err(|e| IamError::WebIdentity(format!("STS Expiration {expiration:?}: {e}")))?;
    Ok((
        AwsCredentials {
            access_key_id: field("AccessKeyId")?,
            secret_access_key: field("SecretAccessKey")?,
            session_token: Some(field("SessionToken")?),
        },
        expires,
    ))
}

/// The text inside the first `<name>...</name>`.
fn tag<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
    let len = xml[start..].find(&format!("</{name}>"))?;
    Some(&xml[start..start + len])
}

/// The credentials RDS IAM logins use: access keys from the environment,
/// else web identity credentials, cached until shortly before expiry.
#[derive(Debug, Default)]
pub struct CredentialChain {
    cached: Mutex<Option<(AwsCredentials, SystemTime)>>,
}

impl CredentialChain {
    pub async fn resolve(&self, region: &str) -> Result<AwsCredentials, IamError> {
        if let Ok(creds) = AwsCredentials::from_env() {
            return Ok(creds);
        }
        let Some(web) = WebIdentity::from_env(region) else {
            return Err(IamError::NoCredentials);
        };
        let now = SystemTime::now();
        if let Some((creds, expires)) = &*self.cached.locked() {
            if now + RENEW_MARGIN < *expires {
                return Ok(creds.clone());
            }
        }
        let (creds, expires) = web.assume().await?;
        *self.cached.locked() = Some((creds.clone(), expires));
        Ok(creds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const ANSWER: &str = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <Credentials>
      <AccessKeyId>ASIAEXAMPLE</AccessKeyId>
      <SecretAccessKey>secretFromSts</SecretAccessKey>
      <SessionToken>tokenFromSts</SessionToken>
      <Expiration>2026-11-23T21:00:00Z</Expiration>
    </Credentials>
  </AssumeRoleWithWebIdentityResult>
</AssumeRoleWithWebIdentityResponse>"#;

    #[test]
    fn parses_the_sts_answer() {
        let (c, exp) = parse_response(ANSWER).unwrap();
        assert_eq!(c.access_key_id, "ASIAEXAMPLE");
        assert_eq!(c.secret_access_key, "secretFromSts");
        assert_eq!(c.session_token.as_deref(), Some("tokenFromSts"));
        assert_eq!(
            humantime::format_rfc3339_seconds(exp).to_string(),
            "2026-11-23T21:00:00Z"
        );
        for broken in [
            "",
            "<Credentials></Credentials>",
            &ANSWER.replace("<Expiration>2026-11-23T21:00:00Z", "<Expiration>soon"),
        ] {
            assert!(parse_response(broken).is_err(), "{broken}");
        }
    }

    #[test]
    fn tags_and_encoding() {
        assert_eq!(tag("<a><b>x</b></a>", "b"), Some("x"));
        assert_eq!(tag("<a><b>x</a>", "b"), None);
        assert_eq!(
            uri_encode("arn:aws:iam::1:role/x"),
            "arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fx"
        );
    }
}
