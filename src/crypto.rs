//! The two hash primitives several subsystems share: SHA-256 and
//! HMAC-SHA-256, both with 32-byte outputs. SCRAM uses them for its keys
//! and proofs, the audit chain for `prev`, the fleet for its key names and
//! sealing key, scram mode for mock salts. They live here, below all of
//! those, so none of them depends on another for a hash.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// The output length of both functions.
pub const HASH_LEN: usize = 32;

/// A SHA-256 or HMAC-SHA-256 output.
pub type Hash = [u8; HASH_LEN];

/// HMAC-SHA-256 of `msg` under `key` (of any length).
pub fn hmac(key: &[u8], msg: &[u8]) -> Hash {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

pub fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231 test case 2 and FIPS 180-2's "abc".
    #[test]
    fn known_answers() {
        assert_eq!(
            hex::encode(hmac(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
