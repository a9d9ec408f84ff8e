//! The PROXY protocol (HAProxy's specification), versions 1 (text) and 2
//! (binary): parsing what a load balancer puts in front of a connection, and
//! building the header pgbastion sends to upstreams that accept one.
//!
//! Pure functions over bytes. `parse` says "need more" until a header is
//! complete, so the caller reads exactly as far as the header and no more
//! matters; every length is checked before it is trusted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::Serialize;
use thiserror::Error;

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included.
pub const V1_MAX_LEN: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";

/// TLV types (PP2_TYPE_*), and the one pgbastion defines.
pub mod tlv {
    pub const ALPN: u8 = 0x01;
    pub const AUTHORITY: u8 = 0x02;
    pub const CRC32C: u8 = 0x03;
    pub const NOOP: u8 = 0x04;
    pub const UNIQUE_ID: u8 = 0x05;
    pub const SSL: u8 = 0x20;
    pub const SSL_VERSION: u8 = 0x21;
    pub const SSL_CN: u8 = 0x22;
    pub const SSL_CIPHER: u8 = 0x23;
    pub const SSL_SIG_ALG: u8 = 0x24;
    pub const SSL_KEY_ALG: u8 = 0x25;
    pub const NETNS: u8 = 0x30;
    /// Google Cloud Private Service Connect: the PSC connection id (u64).
    pub const GCP: u8 = 0xE0;
    /// pgbastion's identity of the client, as JSON (see `IdentityTlv`).
    pub const PGBASTION_IDENTITY: u8 = 0xE4;
    /// AWS: subtype 0x01 carries the VPC endpoint id.
    pub const AWS: u8 = 0xEA;
    /// Azure: subtype 0x01 carries the Private Link id (u32, little endian).
    pub const AZURE: u8 = 0xEE;
    /// SSL TLV client flags.
    pub const CLIENT_SSL: u8 = 0x01;
    pub const CLIENT_CERT_CONN: u8 = 0x02;
    pub const CLIENT_CERT_SESS: u8 = 0x04;
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProxyError {
    #[error("no PROXY protocol header (the connection did not start with one)")]
    Missing,
    #[error("PROXY v1 header has no CRLF within 107 bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 header: {0}")]
    V1Malformed(&'static str),
    #[error("unsupported PROXY v2 version/command byte 0x{0:02x}")]
    V2BadVersionCommand(u8),
    #[error("unsupported PROXY v2 address family/protocol 0x{0:02x}")]
    V2BadFamily(u8),
    #[error("PROXY v2 length {len} is too short for its address family (needs {need})")]
    V2TooShort { len: usize, need: usize },
    #[error("malformed PROXY v2 TLV: {0}")]
    BadTlv(&'static str),
    #[error("PROXY v2 CRC32C mismatch")]
    BadChecksum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// A health check or the balancer's own connection: use the socket's
    /// own addresses.
    Local,
    /// A relayed connection: the addresses are the real client's.
    Proxy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addresses {
    /// Unknown or unspecified (v1 `UNKNOWN`, v2 `AF_UNSPEC`).
    Unspec,
    Tcp {
        src: SocketAddr,
        dst: SocketAddr,
    },
    /// Unix socket paths (up to 108 bytes each, NUL-padded in v2).
    Unix {
        src: Vec<u8>,
        dst: Vec<u8>,
    },
}

/// The SSL TLV: how the client reached the balancer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SslInfo {
    pub client: u8,
    pub verify: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sig_alg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_alg: Option<String>,
}

/// The TLVs pgbastion understands; others are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Tlvs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssl: Option<SslInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws_vpce_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub azure_link_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gcp_psc_id: Option<u64>,
    /// pgbastion's identity TLV from an upstream pgbastion (JSON text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pgbastion_identity: Option<String>,
    /// A CRC32C was present (and matched: a mismatch is an error).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub crc32c_verified: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    pub version: u8,
    pub command: Command,
    pub addresses: Addresses,
    pub tlvs: Tlvs,
}

impl ProxyHeader {
    /// The real client's address, when the header carries one.
    pub fn source(&self) -> Option<SocketAddr> {
        match (&self.command, &self.addresses) {
            (Command::Proxy, Addresses::Tcp { src, .. }) => Some(*src),
            _ => None,
        }
    }
}

/// Parses a header at the start of `buf`. `Ok(None)`: not complete yet,
/// read more. `Ok(Some((header, n)))`: the header is the first `n` bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    // Decide the version from as few bytes as can tell them apart.
    let v2_prefix = buf.len().min(V2_SIGNATURE.len());
    if buf[..v2_prefix] == V2_SIGNATURE[..v2_prefix] {
        return if buf.len() < 16 {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let v1_prefix = buf.len().min(V1_PREFIX.len());
    if buf[..v1_prefix] == V1_PREFIX[..v1_prefix] {
        return if buf.len() < V1_PREFIX.len() {
            Ok(None)
        } else {
            parse_v1(buf)
        };
    }
    Err(ProxyError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ProxyError::V1TooLong)
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..cr])
        .map_err(|_| ProxyError::V1Malformed("not ASCII"))?;
    let mut parts = line.split(' ');
    let proto = parts.next().ok_or(ProxyError::V1Malformed("no protocol"))?;
    let addresses = match proto {
        // "UNKNOWN" may be followed by anything; the receiver ignores it.
        "UNKNOWN" => Addresses::Unspec,
        "TCP4" | "TCP6" => {
            let mut next = || parts.next().ok_or(ProxyError::V1Malformed("missing field"));
            let (sip, dip, sport, dport) = (next()?, next()?, next()?, next()?);
            if parts.next().is_some() {
                return Err(ProxyError::V1Malformed("extra fields"));
            }
            let ip = |s: &str| -> Result<IpAddr, ProxyError> {
                let ip: IpAddr = s
                    .parse()
                    .map_err(|_| ProxyError::V1Malformed("bad address"))?;
                match (proto, ip) {
                    ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
                    _ => Err(ProxyError::V1Malformed(
                        "address does not match the protocol",
                    )),
                }
            };
            let port = |s: &str| -> Result<u16, ProxyError> {
                if s.is_empty()
                    || (s.len() > 1 && s.starts_with('0'))
                    || !s.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(ProxyError::V1Malformed("bad port"));
                }
                s.parse().map_err(|_| ProxyError::V1Malformed("bad port"))
            };
            Addresses::Tcp {
                src: SocketAddr::new(ip(sip)?, port(sport)?),
                dst: SocketAddr::new(ip(dip)?, port(dport)?),
            }
        }
        _ => return Err(ProxyError::V1Malformed("unknown protocol")),
    };
    Ok(Some((
        ProxyHeader {
            version: 1,
            command: Command::Proxy,
            addresses,
            tlvs: Tlvs::default(),
        },
        cr + 2,
    )))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let ver_cmd = buf[12];
    let command = match ver_cmd {
        0x20 => Command::Local,
        0x21 => Command::Proxy,
        other => return Err(ProxyError::V2BadVersionCommand(other)),
    };
    let fam = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    let need = match fam {
        0x00 => 0,
        0x11 => 12,
        0x21 => 36,
        0x31 => 216,
        other => return Err(ProxyError::V2BadFamily(other)),
    };
    if len < need {
        return Err(ProxyError::V2TooShort { len, need });
    }
    let (addr, tlv_bytes) = body.split_at(need);
    let addresses = match (command, fam) {
        // LOCAL: the receiver must ignore the address block.
        (Command::Local, _) | (_, 0x00) => Addresses::Unspec,
        (_, 0x11) => {
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    addr[o],
                    addr[o + 1],
                    addr[o + 2],
                    addr[o + 3],
                ))
            };
            Addresses::Tcp {
                src: SocketAddr::new(ip(0), u16::from_be_bytes([addr[8], addr[9]])),
                dst: SocketAddr::new(ip(4), u16::from_be_bytes([addr[10], addr[11]])),
            }
        }
        (_, 0x21) => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&addr[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            Addresses::Tcp {
                src: SocketAddr::new(ip(0), u16::from_be_bytes([addr[32], addr[33]])),
                dst: SocketAddr::new(ip(16), u16::from_be_bytes([addr[34], addr[35]])),
            }
        }
        _ => {
            let path = |b: &[u8]| b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())].to_vec();
            Addresses::Unix {
                src: path(&addr[..108]),
                dst: path(&addr[108..]),
            }
        }
    };
    let tlvs = parse_tlvs(tlv_bytes, &buf[..total], 16 + need)?;
    Ok(Some((
        ProxyHeader {
            version: 2,
            command,
            addresses,
            tlvs,
        },
        total,
    )))
}

/// Splits `bytes` into (type, value) pairs.
fn tlv_iter(mut bytes: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8], usize), ProxyError>> {
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        if bytes.len() < 3 {
            bytes = &[];
            return Some(Err(ProxyError::BadTlv("truncated TLV header")));
        }
        let t = bytes[0];
        let len = usize::from(u16::from_be_bytes([bytes[1], bytes[2]]));
        if bytes.len() < 3 + len {
            bytes = &[];
            return Some(Err(ProxyError::BadTlv("TLV longer than the header")));
        }
        let value = &bytes[3..3 + len];
        let at = offset;
        offset += 3 + len;
        bytes = &bytes[3 + len..];
        Some(Ok((t, value, at)))
    })
}

fn text(v: &[u8], what: &'static str) -> Result<String, ProxyError> {
    String::from_utf8(v.to_vec()).map_err(|_| ProxyError::BadTlv(what))
}

/// Parses the TLVs; `header` is the whole header (for the CRC32C) and
/// `tlv_start` where the TLVs begin in it.
fn parse_tlvs(bytes: &[u8], header: &[u8], tlv_start: usize) -> Result<Tlvs, ProxyError> {
    let mut out = Tlvs::default();
    for item in tlv_iter(bytes) {
        let (t, v, at) = item?;
        match t {
            tlv::ALPN => out.alpn = Some(text(v, "ALPN is not text")?),
            tlv::AUTHORITY => out.authority = Some(text(v, "AUTHORITY is not UTF-8")?),
            tlv::UNIQUE_ID => {
                if v.len() > 128 {
                    return Err(ProxyError::BadTlv("UNIQUE_ID longer than 128 bytes"));
                }
                out.unique_id = Some(String::from_utf8_lossy(v).into_owned());
            }
            tlv::CRC32C => {
                let got: [u8; 4] = v
                    .try_into()
                    .map_err(|_| ProxyError::BadTlv("CRC32C is not 4 bytes"))?;
                let mut copy = header.to_vec();
                let value_at = tlv_start + at + 3;
                copy[value_at..value_at + 4].fill(0);
                if crc32c(&copy) != u32::from_be_bytes(got) {
                    return Err(ProxyError::BadChecksum);
                }
                out.crc32c_verified = true;
            }
            tlv::SSL => out.ssl = Some(parse_ssl(v)?),
            tlv::NETNS => out.netns = Some(text(v, "NETNS is not text")?),
            tlv::AWS => {
                if let Some((&0x01, id)) = v.split_first() {
                    out.aws_vpce_id = Some(text(id, "AWS VPC endpoint id is not text")?);
                }
            }
            tlv::AZURE => {
                if let Some((&0x01, id)) = v.split_first() {
                    let id: [u8; 4] = id
                        .try_into()
                        .map_err(|_| ProxyError::BadTlv("Azure link id is not 4 bytes"))?;
                    out.azure_link_id = Some(u32::from_le_bytes(id));
                }
            }
            tlv::GCP => {
                let id: [u8; 8] = v
                    .try_into()
                    .map_err(|_| ProxyError::BadTlv("GCP PSC id is not 8 bytes"))?;
                out.gcp_psc_id = Some(u64::from_be_bytes(id));
            }
            tlv::PGBASTION_IDENTITY => {
                out.pgbastion_identity = Some(text(v, "identity TLV is not UTF-8")?)
            }
            _ => {}
        }
    }
    Ok(out)
}

fn parse_ssl(v: &[u8]) -> Result<SslInfo, ProxyError> {
    if v.len() < 5 {
        return Err(ProxyError::BadTlv("SSL TLV shorter than 5 bytes"));
    }
    let mut ssl = SslInfo {
        client: v[0],
        verify: u32::from_be_bytes([v[1], v[2], v[3], v[4]]),
        ..SslInfo::default()
    };
    for item in tlv_iter(&v[5..]) {
        let (t, value, _) = item?;
        let s = || text(value, "SSL sub-TLV is not text");
        match t {
            tlv::SSL_VERSION => ssl.version = Some(s()?),
            tlv::SSL_CN => ssl.cn = Some(s()?),
            tlv::SSL_CIPHER => ssl.cipher = Some(s()?),
            tlv::SSL_SIG_ALG => ssl.sig_alg = Some(s()?),
            tlv::SSL_KEY_ALG => ssl.key_alg = Some(s()?),
            _ => {}
        }
    }
    Ok(ssl)
}

/// Builds a v1 header (no TLVs in v1). Mixed families are sent as IPv6.
pub fn encode_v1(src: Option<SocketAddr>, dst: Option<SocketAddr>) -> Vec<u8> {
    match (src, dst) {
        (Some(s), Some(d)) => {
            let (s, d) = same_family(s, d);
            let proto = if s.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {proto} {} {} {} {}\r\n",
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            )
            .into_bytes()
        }
        _ => b"PROXY UNKNOWN\r\n".to_vec(),
    }
}

fn same_family(s: SocketAddr, d: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if s.is_ipv4() == d.is_ipv4() {
        (s, d)
    } else {
        (v6(s), v6(d))
    }
}

/// Builds a v2 PROXY header with the given TLVs (type, value), and a
/// CRC32C over the whole header so the receiver can check it. The header's
/// length field is 16 bits: a TLV that would take it past 65535 bytes is
/// left out whole (never cut, which would corrupt it or the header).
pub fn encode_v2(
    src: Option<SocketAddr>,
    dst: Option<SocketAddr>,
    tlvs: &[(u8, Vec<u8>)],
) -> Vec<u8> {
    let mut addr = Vec::new();
    let fam = match (src, dst) {
        (Some(s), Some(d)) => {
            let (s, d) = same_family(s, d);
            match (s.ip(), d.ip()) {
                (IpAddr::V4(a), IpAddr::V4(b)) => {
                    addr.extend_from_slice(&a.octets());
                    addr.extend_from_slice(&b.octets());
                    addr.extend_from_slice(&s.port().to_be_bytes());
                    addr.extend_from_slice(&d.port().to_be_bytes());
                    0x11
                }
                (a, b) => {
                    let v6 = |ip: IpAddr| match ip {
                        IpAddr::V6(v) => v.octets(),
                        IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
                    };
                    addr.extend_from_slice(&v6(a));
                    addr.extend_from_slice(&v6(b));
                    addr.extend_from_slice(&s.port().to_be_bytes());
                    addr.extend_from_slice(&d.port().to_be_bytes());
                    0x21
                }
            }
        }
        _ => 0x00,
    };
    let mut body = addr;
    // Room for the CRC32C TLV (3 + 4 bytes) is kept at the end.
    const CRC_TLV: usize = 7;
    for (t, v) in tlvs {
        if body.len() + 3 + v.len() + CRC_TLV <= usize::from(u16::MAX) {
            push_tlv(&mut body, *t, v);
        }
    }
    let crc_at = 16 + body.len() + 3;
    push_tlv(&mut body, tlv::CRC32C, &[0; 4]);
    let mut out = Vec::with_capacity(16 + body.len());
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21);
    out.push(fam);
    out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    let crc = crc32c(&out);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
    out
}

/// Appends one TLV; values longer than 65535 bytes are cut (never the
/// case for what pgbastion sends).
pub fn push_tlv(out: &mut Vec<u8>, t: u8, v: &[u8]) {
    let v = &v[..v.len().min(usize::from(u16::MAX))];
    out.push(t);
    out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    out.extend_from_slice(v);
}

/// The SSL TLV value: client flags, verify result, and sub-TLVs.
pub fn ssl_tlv(ssl: &SslInfo) -> Vec<u8> {
    let mut v = vec![ssl.client];
    v.extend_from_slice(&ssl.verify.to_be_bytes());
    for (t, s) in [
        (tlv::SSL_VERSION, &ssl.version),
        (tlv::SSL_CN, &ssl.cn),
        (tlv::SSL_CIPHER, &ssl.cipher),
        (tlv::SSL_SIG_ALG, &ssl.sig_alg),
        (tlv::SSL_KEY_ALG, &ssl.key_alg),
    ] {
        if let Some(s) = s {
            push_tlv(&mut v, t, s.as_bytes());
        }
    }
    v
}

/// CRC-32C (Castagnoli), as the PROXY protocol's CRC32C TLV uses.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests;
