//! pgbastion logging in to a database server as a SCRAM client: for a
//! terminated session (with the ClientKey a client just proved it holds)
//! and for the auth_query role (with its password).
//!
//! The server must prove itself too: its final SCRAM message is checked,
//! so a server (or anything posing as one past TLS) that accepts any proof
//! is refused. Every login is bound to the server's certificate whenever
//! the server offers `SCRAM-SHA-256-PLUS`.

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::audit::event::{LegAuth, Mechanism};
use crate::auth::derive;
use crate::auth::scram::{self, ClientAwaitingFinal, ClientExchange, Credential, ScramError};
use crate::auth::wire::{self, WireError};
use crate::protocol::message::{self, tag, AuthRequest, ErrorFields};

/// The largest message a server sends while pgbastion logs in.
const MAX_LOGIN_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum LoginError {
    #[error("connection to the database server failed during login: {0}")]
    Wire(#[from] WireError),
    #[error("SCRAM with the database server failed: {0}")]
    Scram(#[from] ScramError),
    #[error("the database server asked for {}, which pgbastion cannot answer here", message::auth_method_name(*.0))]
    UnsupportedMethod(u32),
    /// The server refused: its ErrorResponse, kept whole so it can be
    /// passed on to the client.
    #[error("the database server refused the login: {} ({})", .fields.message, .fields.code)]
    Refused { fields: ErrorFields, raw: Vec<u8> },
    #[error("the database server sent AuthenticationOk without proving it knows the verifier")]
    NoServerProof,
    #[error("unexpected message {0:?} from the database server during login")]
    Unexpected(char),
}

/// Reads what the server sends after a StartupMessage up to its first
/// authentication request, handing NegotiateProtocolVersion and notices to
/// `pass_on` (they belong to the client). A server ErrorResponse (too many
/// clients, database starting up, ...) is returned as `Refused`.
pub async fn first_request<S, F>(
    server: &mut S,
    buf: &mut Vec<u8>,
    mut pass_on: F,
) -> Result<AuthRequest, LoginError>
where
    S: AsyncRead + Unpin + ?Sized,
    F: FnMut(Vec<u8>),
{
    loop {
        let (t, body) = wire::read_message(server, buf, MAX_LOGIN_MESSAGE).await?;
        match t {
            tag::AUTHENTICATION => return Ok(AuthRequest::parse(&body).map_err(WireError::from)?),
            tag::NEGOTIATE_PROTOCOL_VERSION | tag::NOTICE_RESPONSE => {
                pass_on(message::build(t, &body))
            }
            tag::ERROR_RESPONSE => return Err(refused(body)),
            other => return Err(LoginError::Unexpected(char::from(other))),
        }
    }
}

fn refused(body: Vec<u8>) -> LoginError {
    LoginError::Refused {
        fields: ErrorFields::parse(&body).unwrap_or_default(),
        raw: message::build(tag::ERROR_RESPONSE, &body),
    }
}

/// Answers `request` and what follows until AuthenticationOk, logging in
/// as `user`. `binding` is the server certificate's `tls-server-end-point`
/// data. Bytes after AuthenticationOk stay in `buf`.
pub async fn complete<S>(
    server: &mut S,
    buf: &mut Vec<u8>,
    user: &str,
    request: AuthRequest,
    binding: Option<Vec<u8>>,
    credential: &Credential<'_>,
) -> Result<LegAuth, LoginError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut scram = Scram::NotStarted;
    let mut leg = LegAuth {
        mechanism: Mechanism::Trust,
        channel_binding: false,
    };
    let mut request = request;
    loop {
        match (request, scram) {
            (AuthRequest::Ok, Scram::NotStarted) => return Ok(leg),
            // Started SCRAM but never saw a valid server-final.
            (AuthRequest::Ok, _) => return Err(LoginError::NoServerProof),
            (AuthRequest::Sasl(offered), Scram::NotStarted) => {
                let (ex, first) =
                    ClientExchange::start(&offered, binding.clone(), &scram::new_nonce())?;
                leg = LegAuth {
                    mechanism: Mechanism::named(ex.mechanism),
                    channel_binding: ex.channel_bound(),
                };
                let initial = message::sasl_initial_response(ex.mechanism, first.as_bytes());
                wire::send(server, &initial).await?;
                scram = Scram::Started(ex);
            }
            (AuthRequest::SaslContinue(data), Scram::Started(ex)) => {
                scram = Scram::Answered(answer_challenge(server, ex, &data, credential).await?);
            }
            (AuthRequest::SaslFinal(data), Scram::Answered(waiting)) => {
                waiting.verify(&data)?;
                // Proven; AuthenticationOk must follow.
                return expect_ok(server, buf).await.map(|()| leg);
            }
            // Cleartext or MD5 over verified TLS: only for a password
            // pgbastion holds (the auth_query role, identity logins),
            // never with a client's proof.
            (
                request @ (AuthRequest::Other(3) | AuthRequest::Md5Password(_)),
                Scram::NotStarted,
            ) => return answer_password(server, buf, user, request, credential).await,
            (request @ (AuthRequest::Other(_) | AuthRequest::Md5Password(_)), _) => {
                return Err(LoginError::UnsupportedMethod(request.code()))
            }
            (
                AuthRequest::Sasl(_) | AuthRequest::SaslContinue(_) | AuthRequest::SaslFinal(_),
                _,
            ) => return Err(LoginError::Unexpected('R')),
        }
        let (t, body) = wire::read_message(server, buf, MAX_LOGIN_MESSAGE).await?;
        request = match t {
            tag::AUTHENTICATION => AuthRequest::parse(&body).map_err(WireError::from)?,
            tag::ERROR_RESPONSE => return Err(refused(body)),
            tag::NOTICE_RESPONSE => continue_after_notice(server, buf).await?,
            other => return Err(LoginError::Unexpected(char::from(other))),
        };
    }
}
/// Where the SCRAM exchange with the server stands.
enum Scram {
    NotStarted,
    /// The client-first message is sent.
    Started(ClientExchange),
    /// The client-final message is sent; the server must prove itself.
    Answered(ClientAwaitingFinal),
}

/// Answers the server-first message (`data`) with the client-final one.
async fn answer_challenge<S>(
    server: &mut S,
    ex: ClientExchange,
    data: &[u8],
    credential: &Credential<'_>,
) -> Result<ClientAwaitingFinal, LoginError>
where
    S: AsyncWrite + Unpin + ?Sized,
{
    // A held password is salted off the async workers (PBKDF2 with the
    // server's iteration count takes up to seconds).
    let (salted, salt, iterations);
    let credential = match credential {
        Credential::Password(p) => {
            (salt, iterations) = ex.server_params(data)?;
            salted = derive::salted_password(p, &salt, iterations).await?;
            Credential::Salted {
                salted: &salted,
                salt: &salt,
                iterations,
            }
        }
        other => *other,
    };
    let (waiting, reply) = ex.respond(data, &credential)?;
    wire::send(server, &message::sasl_response(reply.as_bytes())).await?;
    Ok(waiting)
}

/// Answers a cleartext-password or MD5 request with the password
/// pgbastion holds (never a client's proof), then reads AuthenticationOk.
async fn answer_password<S>(
    server: &mut S,
    buf: &mut Vec<u8>,
    user: &str,
    request: AuthRequest,
    credential: &Credential<'_>,
) -> Result<LegAuth, LoginError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Credential::Password(p) = credential else {
        return Err(LoginError::UnsupportedMethod(request.code()));
    };
    let (answer, mechanism) = match request {
        AuthRequest::Md5Password(salt) => {
            (message::md5_password_message(user, p, salt), Mechanism::Md5)
        }
        _ => (message::password_message(p), Mechanism::Password),
    };
    wire::send(server, &answer).await?;
    expect_ok(server, buf).await?;
    Ok(LegAuth {
        mechanism,
        channel_binding: false,
    })
}

/// Reads the AuthenticationOk that must come next.
async fn expect_ok<S>(server: &mut S, buf: &mut Vec<u8>) -> Result<(), LoginError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let (t, body) = wire::read_message(server, buf, MAX_LOGIN_MESSAGE).await?;
    match (t, AuthRequest::parse(&body)) {
        (tag::AUTHENTICATION, Ok(AuthRequest::Ok)) => Ok(()),
        (tag::ERROR_RESPONSE, _) => Err(refused(body)),
        _ => Err(LoginError::Unexpected(char::from(t))),
    }
}

/// Skips notices until the next authentication request.
async fn continue_after_notice<S>(
    server: &mut S,
    buf: &mut Vec<u8>,
) -> Result<AuthRequest, LoginError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    first_request(server, buf, |_| {}).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// issue 19 item 23: logging in with a held password against a server
    /// that asks for a huge iteration count does not stall the other tasks
    /// of a single-threaded runtime while the key is derived.
    #[tokio::test(flavor = "current_thread")]
    async fn salting_a_held_password_does_not_stall_other_tasks() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        // A server that offers SCRAM, asks for 2M iterations, and then
        // reports when the client's final message arrived.
        let fake = tokio::spawn(async move {
            let mut buf = Vec::new();
            let (_, first) = wire::read_message(&mut server, &mut buf, 4096)
                .await
                .unwrap();
            let (_, data) = message::parse_sasl_initial_response(&first).unwrap();
            let first = std::str::from_utf8(data.unwrap()).unwrap().to_owned();
            let nonce = first.rsplit_once("r=").unwrap().1;
            let reply = format!("r={nonce}srv,s=c2FsdA==,i=300000");
            wire::send(
                &mut server,
                &message::authentication_sasl_data(false, reply.as_bytes()),
            )
            .await
            .unwrap();
            wire::read_message(&mut server, &mut buf, 4096)
                .await
                .unwrap();
        });
        let started = Instant::now();
        let login = tokio::spawn(async move {
            let mut buf = Vec::new();
            let request = AuthRequest::Sasl(vec![scram::SCRAM_SHA_256.into()]);
            let _ = complete(
                &mut client,
                &mut buf,
                "app",
                request,
                None,
                &Credential::Password(b"pw"),
            )
            .await;
        });
        let mut longest_gap = Duration::ZERO;
        let mut last = Instant::now();
        while !fake.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            longest_gap = longest_gap.max(last.elapsed());
            last = Instant::now();
        }
        let took = started.elapsed();
        fake.await.unwrap();
        login.abort();
        assert!(took > Duration::from_millis(50), "took {took:?}");
        assert!(
            longest_gap < took / 4,
            "other tasks stalled for {longest_gap:?} of {took:?}"
        );
    }
}
