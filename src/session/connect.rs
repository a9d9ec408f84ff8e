//! Stage 4, the server leg: dial and verify the upstream (presenting the
//! client certificate of an identity login that has one), with the PROXY
//! header the upstream asks for, then forward the StartupMessage — only
//! now, on a verified connection, does the server see anything the client
//! sent. Also the outbound PROXY header a forwarded cancel carries.

use super::login::LoginPlan;
use super::{Admitted, Exit, Session, SessionError};
use crate::audit::{AuthFacts, ClientTransport, UpstreamFacts};
use crate::config::SendProxyProtocol;
use crate::identity::cert;
use crate::protocol::proxy::{self, SslInfo};
use crate::upstream::{Upstream, UpstreamConn};

use tokio::io::AsyncWriteExt;

/// A verified server connection that has the StartupMessage.
pub(super) struct Connected {
    pub conn: UpstreamConn,
    /// The server leg, for the audit.
    pub facts: UpstreamFacts,
}

impl Session {
    /// Stage 4: the server connection, with the StartupMessage sent.
    pub(super) async fn connect(
        &self,
        admitted: &Admitted,
        plan: &LoginPlan,
        peer_cert: Option<&[u8]>,
        auth: &AuthFacts,
    ) -> Result<Connected, Exit> {
        let upstream = &*admitted.route.upstream;
        let t = &self.settings.timeouts;
        let proxy_header = self.outbound_proxy_header(upstream, peer_cert);
        let mut up = upstream
            .connect_presenting(
                plan.presenting(),
                t.upstream_connect,
                t.upstream_tls,
                proxy_header.as_deref(),
            )
            .await
            .map_err(|e| Exit::refused_in_login(e, auth))?;
        self.shared.metrics.upstream_connected(
            &upstream.config.name,
            up.timing.connect,
            up.timing.tls,
        );
        let facts = UpstreamFacts {
            name: upstream.config.name.clone(),
            addr: up.addr.to_string(),
            tls: up.tls.clone(),
        };
        // (Refused without how far authentication got, as it always was.)
        up.stream
            .write_all(admitted.startup.as_bytes())
            .await
            .map_err(|e| Exit::refused(SessionError::UpstreamIo(e)))?;
        Ok(Connected { conn: up, facts })
    }

    /// The PROXY header for an upstream that wants one: the client's real
    /// address and, in v2, the client leg's TLS facts (SSL TLV with version,
    /// cipher and certificate CN; SNI as AUTHORITY), the session id as
    /// UNIQUE_ID, and pgbastion's identity of the client as JSON in TLV
    /// 0xE4.
    pub(super) fn outbound_proxy_header(
        &self,
        upstream: &Upstream,
        peer_cert: Option<&[u8]>,
    ) -> Option<Vec<u8>> {
        match upstream.config.send_proxy_protocol {
            SendProxyProtocol::Off => None,
            SendProxyProtocol::V1 => Some(proxy::encode_v1(self.peer, self.local)),
            SendProxyProtocol::V2 => {
                let mut tlvs = vec![(
                    proxy::tlv::UNIQUE_ID,
                    self.facts.session_id.as_bytes().to_vec(),
                )];
                if let Some(ClientTransport::Tls(info)) = &self.facts.client_tls {
                    if let Some(sni) = &info.sni {
                        tlvs.push((proxy::tlv::AUTHORITY, sni.as_bytes().to_vec()));
                    }
                    if let Some(alpn) = &info.alpn {
                        tlvs.push((proxy::tlv::ALPN, alpn.as_bytes().to_vec()));
                    }
                    tlvs.push((proxy::tlv::SSL, ssl_tlv(info, peer_cert)));
                }
                if let Some(identity) = &self.facts.identity {
                    if let Ok(json) = serde_json::to_vec(identity) {
                        tlvs.push((proxy::tlv::PGBASTION_IDENTITY, json));
                    }
                }
                Some(proxy::encode_v2(self.peer, self.local, &tlvs))
            }
        }
    }
}

/// The PROXY v2 SSL TLV for a TLS client leg.
fn ssl_tlv(info: &crate::tls::TlsInfo, peer_cert: Option<&[u8]>) -> Vec<u8> {
    let cert_flags = if peer_cert.is_some() {
        proxy::tlv::CLIENT_CERT_CONN | proxy::tlv::CLIENT_CERT_SESS
    } else {
        0
    };
    let ssl = SslInfo {
        client: proxy::tlv::CLIENT_SSL | cert_flags,
        verify: 0,
        version: Some(info.version.clone()),
        cipher: Some(info.cipher.clone()),
        cn: peer_cert.and_then(cert::common_name),
        ..SslInfo::default()
    };
    proxy::ssl_tlv(&ssl)
}
