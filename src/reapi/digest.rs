//! SHA-256 content digests: the key every blob is stored under, and the
//! hashing that verifies a blob matches its digest.
//!
//! gridgate's local instances support exactly one digest function, SHA-256
//! (what Bazel and BuildGrid use by default). A [`BlobKey`] is the parsed form
//! of a REAPI `Digest` (lowercase hex hash + size), so a malformed digest is
//! refused once, at the edge, and the stores only ever see valid keys.

use std::fmt;

use aws_lc_rs::digest;

use crate::proto::build::bazel::remote::execution::v2::{digest_function, Digest};

/// A SHA-256 digest with the blob's size: what identifies a blob.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobKey {
    /// The SHA-256 of the blob.
    pub hash: [u8; 32],
    /// The blob's length in bytes.
    pub size: u64,
}

/// Why a digest is not a valid SHA-256 digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The hash (given) is not 64 lowercase hexadecimal characters.
    #[error("digest hash {0:?} is not 64 lowercase hexadecimal characters (SHA-256)")]
    BadHash(String),
    /// The size (given) is below zero.
    #[error("digest size {0} is negative")]
    NegativeSize(i64),
    /// The request has no digest where one is required.
    #[error("missing digest")]
    Missing,
    /// The request's `digest_function` (the enum number given) is neither
    /// unset nor SHA256.
    #[error("digest function {0} is not supported: this instance uses SHA256")]
    Function(i32),
}

/// The SHA-256 of the empty blob.
const EMPTY_SHA256: [u8; 32] = [
    0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
    0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
];

impl BlobKey {
    /// The empty blob, which every instance holds.
    pub const EMPTY: BlobKey = BlobKey {
        hash: EMPTY_SHA256,
        size: 0,
    };

    /// Parses a lowercase hex SHA-256 hash and a size.
    pub fn parse(hash: &str, size: i64) -> Result<BlobKey, DigestError> {
        let size = u64::try_from(size).map_err(|_| DigestError::NegativeSize(size))?;
        let bad = || {
            let shown: String = hash.chars().take(80).collect();
            DigestError::BadHash(shown)
        };
        let raw = hash.as_bytes();
        if raw.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        let mut invalid = 0u8;
        for (o, pair) in out.iter_mut().zip(raw.chunks_exact(2)) {
            let (hi, lo) = (
                HEX_VALUE[usize::from(pair[0])],
                HEX_VALUE[usize::from(pair[1])],
            );
            invalid |= (hi | lo) & 0x10;
            *o = (hi << 4) | (lo & 0x0f);
        }
        if invalid != 0 {
            return Err(bad());
        }
        Ok(BlobKey { hash: out, size })
    }

    /// Parses a REAPI digest message.
    pub fn from_digest(d: Option<&Digest>) -> Result<BlobKey, DigestError> {
        let d = d.ok_or(DigestError::Missing)?;
        BlobKey::parse(&d.hash, d.size_bytes)
    }

    /// The key of `data` (hashes it).
    pub fn of(data: &[u8]) -> BlobKey {
        let mut h = Sha256::new();
        h.update(data);
        h.finish(data.len() as u64)
    }

    /// Whether this is the empty blob.
    pub fn is_empty(&self) -> bool {
        self.size == 0 && self.hash == EMPTY_SHA256
    }

    /// The lowercase hex hash.
    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (pair, b) in out.chunks_exact_mut(2).zip(self.hash) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 15)];
        }
        // Only ASCII digits were written: this never fails.
        std::str::from_utf8(&out).unwrap_or_default().to_owned()
    }

    /// The REAPI digest message.
    pub fn to_digest(&self) -> Digest {
        Digest {
            hash: self.hex(),
            size_bytes: i64::try_from(self.size).unwrap_or(i64::MAX),
        }
    }
}

impl fmt::Display for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hex(), self.size)
    }
}

impl fmt::Debug for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobKey({self})")
    }
}

/// The value of each lowercase hex digit; 0x10 marks a byte that is not one.
static HEX_VALUE: [u8; 256] = {
    let mut t = [0x10u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Checks a request's `digest_function` field: unset (UNKNOWN) or SHA256.
pub fn check_function(value: i32) -> Result<(), DigestError> {
    if value == digest_function::Value::Unknown as i32
        || value == digest_function::Value::Sha256 as i32
    {
        Ok(())
    } else {
        Err(DigestError::Function(value))
    }
}

/// An incremental SHA-256, cloneable so a paused upload keeps its state.
#[derive(Clone)]
pub struct Sha256(digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::new()
    }
}

impl Sha256 {
    /// A fresh hasher.
    pub fn new() -> Sha256 {
        Sha256(digest::Context::new(&digest::SHA256))
    }

    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The key of everything added, given its total length.
    pub fn finish(self, size: u64) -> BlobKey {
        let d = self.0.finish();
        let mut hash = [0u8; 32];
        hash.copy_from_slice(d.as_ref());
        BlobKey { hash, size }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_blob() {
        assert_eq!(BlobKey::of(b""), BlobKey::EMPTY);
        assert!(BlobKey::EMPTY.is_empty());
        assert_eq!(
            BlobKey::EMPTY.hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn parse_round_trip() {
        let k = BlobKey::of(b"hello");
        let back = BlobKey::parse(&k.hex(), 5).unwrap();
        assert_eq!(k, back);
        assert!(BlobKey::parse(&k.hex().to_uppercase(), 5).is_err());
        assert!(BlobKey::parse("abc", 5).is_err());
        assert!(BlobKey::parse(&k.hex(), -1).is_err());
        assert!(BlobKey::from_digest(None).is_err());
    }
}
