//! Shared secrets.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// Bytes in a [`Secret`]: HMAC-SHA256 and ChaCha20-Poly1305 both take 256-bit keys.
pub const SECRET_LEN: usize = 32;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SecretError {
    #[error("a key is base64 of {SECRET_LEN} bytes; this one is not valid base64")]
    NotBase64,
    #[error("a key is base64 of {SECRET_LEN} bytes; this one holds {0}")]
    WrongLength(usize),
    #[error("the system's random source failed: {0}")]
    Random(String),
}

/// A 256-bit shared secret. Never printed by `Debug`, zeroed when dropped, and compared in
/// constant time, so neither logs nor timing tell anything about it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Secret([u8; SECRET_LEN]);

impl Secret {
    /// A fresh random key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, SecretError> {
        let mut bytes = [0u8; SECRET_LEN];
        getrandom::fill(&mut bytes).map_err(|e| SecretError::Random(e.to_string()))?;
        Ok(Secret(bytes))
    }

    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        Secret(bytes)
    }

    pub fn from_base64(text: &str) -> Result<Self, SecretError> {
        let mut bytes = B64
            .decode(text.trim())
            .map_err(|_| SecretError::NotBase64)?;
        let len = bytes.len();
        let secret = <[u8; SECRET_LEN]>::try_from(bytes.as_slice())
            .map(Secret)
            .map_err(|_| SecretError::WrongLength(len));
        bytes.zeroize();
        secret
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }
}

// By hand rather than zeroize's derive: the derive's proc-macro turns on syn features that
// change bindgen's build and with it RocksDB's (ARCHITECTURE.md, "Building").
impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl TryFrom<String> for Secret {
    type Error = SecretError;
    fn try_from(mut s: String) -> Result<Self, SecretError> {
        let secret = Secret::from_base64(&s);
        s.zeroize();
        secret
    }
}

impl From<Secret> for String {
    fn from(s: Secret) -> String {
        s.to_base64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_lengths_are_checked() {
        let k = Secret::generate().expect("random");
        assert_eq!(Secret::from_base64(&k.to_base64()).expect("decode"), k);
        assert_ne!(Secret::generate().expect("random"), k);
        assert_eq!(
            Secret::from_base64("aGVsbG8="),
            Err(SecretError::WrongLength(5))
        );
        assert_eq!(
            Secret::from_base64("not base64!"),
            Err(SecretError::NotBase64)
        );
        assert_eq!(format!("{k:?}"), "Secret(<redacted>)");
    }
}
