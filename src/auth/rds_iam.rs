//! Amazon RDS / Aurora IAM database authentication: the "password" is a
//! SigV4-presigned URL for the `connect` action of the `rds-db` service,
//! valid for 15 minutes, which the server checks with IAM (the role must
//! be granted `rds_iam`). The signing is the `aws-sigv4` crate's, as in
//! the AWS SDK's own auth-token helper; pgbastion only assembles the URL.
//!
//! AWS credentials come from pgbastion's environment (see `aws_sts`: access
//! keys, or a web identity token exchanged with STS), looked up at each
//! login so rotated credentials are used at once. A token is reused for
//! logins of the same user while it has more than `REUSE_MARGIN` left.

use crate::sync::MutexExt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use thiserror::Error;

/// How long a token is valid (the most RDS accepts).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// A cached token is replaced once less than this is left of it.
pub const REUSE_MARGIN: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Error)]
pub enum IamError {
    #[error(
        "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials), or AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN, in pgbastion's environment"
    )]
    NoCredentials,
    #[error("AWS web identity: {0}")]
    WebIdentity(String),
    #[error("signing the RDS IAM token failed: {0}")]
    Signing(String),
}

/// AWS credentials. The secret is never printed.
#[derive(Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl AwsCredentials {
    /// The access-key environment variables.
    pub fn from_env() -> Result<AwsCredentials, IamError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(access_key_id), Some(secret_access_key)) => Ok(AwsCredentials {
                access_key_id,
                secret_access_key,
                session_token: var("AWS_SESSION_TOKEN"),
            }),
            _ => Err(IamError::NoCredentials),
        }
    }
}

/// Where a token is for: the database's host name and port as clients of
/// RDS name them, and the database user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenTarget<'a> {
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub region: &'a str,
}

/// The auth token for `target`, signed at `now`: what boto3's
/// `generate_db_auth_token` returns for the same inputs.
pub fn auth_token(
    target: &TokenTarget<'_>,
    creds: &AwsCredentials,
    now: SystemTime,
) -> Result<String, IamError> {
    let identity = aws_credential_types::Credentials::new(
        creds.access_key_id.clone(),
        creds.secret_access_key.clone(),
        creds.session_token.clone(),
        None,
        "pgbastion",
    )
    .into();
    let mut settings = SigningSettings::default();
    settings.expires_in = Some(TOKEN_LIFETIME);
    settings.signature_location = SignatureLocation::QueryParams;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(target.region)
        .name("rds-db")
        .time(now)
        .settings(settings)
        .build()
        .map_err(|e| IamError::Signing(e.to_string()))?
        .into();
    let user: String = uri_encode(target.user);
    let url = format!(
        "https://{}:{}/?Action=connect&DBUser={user}",
        target.host, target.port
    );
    let signable = SignableRequest::new("GET", &url, std::iter::empty(), SignableBody::Bytes(&[]))
        .map_err(|e| IamError::Signing(e.to_string()))?;
    let (instructions, _) = sign(signable, &params)
        .map_err(|e| IamError::Signing(e.to_string()))?
        .into_parts();
    let mut request = http::Request::builder()
        .uri(&url)
        .body(())
        .map_err(|e| IamError::Signing(e.to_string()))?;
    instructions.apply_to_request_http1x(&mut request);
    let signed = request.uri().to_string();
    let signed = signed.strip_prefix("https://").unwrap_or(&signed);
    // The signature last, as boto3 and the other SDKs write it (the order
    // does not change what is signed; it makes tokens comparable).
    let Some((base, query)) = signed.split_once('?') else {
        return Ok(signed.to_owned());
    };
    let (signature, mut rest): (Vec<&str>, Vec<&str>) = query
        .split('&')
        .partition(|p| p.starts_with("X-Amz-Signature="));
    rest.extend(signature);
    Ok(format!("{base}?{}", rest.join("&")))
}

/// Percent-encoding as SigV4 and AWS query APIs want it (RFC 3986
/// unreserved characters kept).
pub fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The last token made for one credential, reused while fresh.
#[derive(Debug, Default)]
pub struct TokenCache {
    last: Mutex<Option<Cached>>,
}

#[derive(Debug)]
struct Cached {
    made: SystemTime,
    access_key_id: String,
    token: String,
}

impl TokenCache {
    /// A token for `target`: the cached one if it was made with the same
    /// access key and has more than `REUSE_MARGIN` left at `now`, else a
    /// new one.
    pub fn token(
        &self,
        target: &TokenTarget<'_>,
        creds: &AwsCredentials,
        now: SystemTime,
    ) -> Result<String, IamError> {
        let mut last = self.last.locked();
        if let Some(c) = last.as_ref() {
            let fresh = now
                .duration_since(c.made)
                .is_ok_and(|age| age + REUSE_MARGIN < TOKEN_LIFETIME);
            if fresh && c.access_key_id == creds.access_key_id {
                return Ok(c.token.clone());
            }
        }
        let token = auth_token(target, creds, now)?;
        *last = Some(Cached {
            made: now,
            access_key_id: creds.access_key_id.clone(),
            token: token.clone(),
        });
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> AwsCredentials {
        AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    const TARGET: TokenTarget<'static> = TokenTarget {
        host: "db.example.eu-west-1.rds.amazonaws.com",
        port: 5432,
        user: "app_ro",
        region: "eu-west-1",
    };

    #[test]
    fn token_shape() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let t = auth_token(&TARGET, &creds(), at).unwrap();
        assert!(
            t.starts_with(
                "db.example.eu-west-1.rds.amazonaws.com:5432/?Action=connect&DBUser=app_ro&"
            ),
            "{t}"
        );
        for part in [
            "X-Amz-Algorithm=AWS4-HMAC-SHA256",
            "X-Amz-Credential=AKIDEXAMPLE%2F20231114%2Feu-west-1%2Frds-db%2Faws4_request",
            "X-Amz-Date=20231114T221320Z",
            "X-Amz-Expires=900",
            "X-Amz-SignedHeaders=host",
            "X-Amz-Signature=",
        ] {
            assert!(t.contains(part), "{part} in {t}");
        }
        assert!(
            !t.contains("wJalrXUtnFEMI"),
            "the secret is not in the token"
        );
        // Deterministic for the same inputs; another second, another token.
        assert_eq!(t, auth_token(&TARGET, &creds(), at).unwrap());
        assert_ne!(
            t,
            auth_token(&TARGET, &creds(), at + Duration::from_secs(1)).unwrap()
        );
    }

    #[test]
    fn tokens_are_reused_until_five_minutes_before_expiry() {
        let cache = TokenCache::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let first = cache.token(&TARGET, &creds(), t0).unwrap();
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(cache.token(&TARGET, &creds(), at(60)).unwrap(), first);
        assert_eq!(cache.token(&TARGET, &creds(), at(599)).unwrap(), first);
        let renewed = cache.token(&TARGET, &creds(), at(600)).unwrap();
        assert_ne!(renewed, first, "10 minutes old: 5 left, replaced");
        // A clock that went back, or rotated credentials: a new token.
        assert_ne!(cache.token(&TARGET, &creds(), at(10)).unwrap(), renewed);
        let mut rotated = creds();
        rotated.access_key_id = "AKIDOTHER".into();
        let t = cache.token(&TARGET, &rotated, at(11)).unwrap();
        assert!(t.contains("AKIDOTHER"), "{t}");
    }

    #[test]
    fn user_names_are_encoded() {
        assert_eq!(uri_encode("app ro@x"), "app%20ro%40x");
    }

    #[test]
    fn the_secret_is_not_printed() {
        assert!(!format!("{:?}", creds()).contains("wJalr"));
    }
}
