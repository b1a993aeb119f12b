//! Keys: the algorithms a key may verify, RSA size rules, a JWK turned into a
//! verifying key, a fetched document parsed, and the merged set a token's key is
//! selected from.

use super::*;

/// A small set of [`Algorithm`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlgSet(u16);

impl AlgSet {
    /// The RSA algorithms (PKCS#1 v1.5 and PSS).
    pub const RSA: AlgSet = AlgSet(0b0000_0111_1110_0000);

    fn bit(alg: Algorithm) -> Option<u16> {
        let index = match alg {
            Algorithm::HS256 => 0,
            Algorithm::HS384 => 1,
            Algorithm::HS512 => 2,
            Algorithm::ES256 => 3,
            Algorithm::ES384 => 4,
            Algorithm::RS256 => 5,
            Algorithm::RS384 => 6,
            Algorithm::RS512 => 7,
            Algorithm::PS256 => 8,
            Algorithm::PS384 => 9,
            Algorithm::PS512 => 10,
            Algorithm::EdDSA => 11,
            _ => return None,
        };
        Some(1 << index)
    }

    /// The set holding only `alg` (empty for an algorithm this module does not know).
    pub fn one(alg: Algorithm) -> AlgSet {
        AlgSet(Self::bit(alg).unwrap_or(0))
    }

    /// The set of these algorithms, or `None` if one of them is not supported.
    pub fn from_slice(algs: &[Algorithm]) -> Option<AlgSet> {
        let mut bits = 0;
        for alg in algs {
            bits |= Self::bit(*alg)?;
        }
        Some(AlgSet(bits))
    }

    /// Whether `alg` is in the set.
    pub fn contains(self, alg: Algorithm) -> bool {
        Self::bit(alg).is_some_and(|b| self.0 & b != 0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The algorithms in both sets.
    pub fn intersect(self, other: AlgSet) -> AlgSet {
        AlgSet(self.0 & other.0)
    }
}

/// One public key, parsed once, ready to verify signatures.
pub struct VerifyKey {
    /// The key's `kid`, if it has one.
    pub kid: Option<String>,
    /// The algorithms this key may verify (the provider's, narrowed by the key's type and `alg`).
    pub algorithms: AlgSet,
    /// The key itself.
    pub key: DecodingKey,
    /// SHA-256 of the key's JWK (or of the configured key): identifies the key in caches.
    pub fingerprint: [u8; 32],
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// SHA-256 of some bytes.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The smallest RSA modulus aws-lc-rs verifies signatures with, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// The largest RSA modulus aws-lc-rs verifies signatures with, in bits.
pub const MAX_RSA_BITS: usize = 8192;

/// Why an RSA key cannot be used: aws-lc-rs verifies only with moduli of
/// [`MIN_RSA_BITS`] to [`MAX_RSA_BITS`] bits, so with any other key every
/// token would fail as "bad signature". Such keys are refused when they load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RsaKeyError {
    /// A modulus shorter than [`MIN_RSA_BITS`].
    #[error("RSA key of {0} bits; at least {MIN_RSA_BITS} are needed")]
    TooSmall(usize),
    /// A modulus longer than [`MAX_RSA_BITS`].
    #[error("RSA key of {0} bits; at most {MAX_RSA_BITS} are supported")]
    TooLarge(usize),
    /// Not an RSA public key (modulus and exponent) at all.
    #[error("not a readable RSA public key")]
    Malformed,
}

/// The size in bits of an RSA modulus (big-endian, leading zero bytes allowed).
pub fn modulus_bits(n: &[u8]) -> usize {
    let n: &[u8] = match n.iter().position(|b| *b != 0) {
        Some(first) => &n[first..],
        None => return 0,
    };
    n.len() * 8 - n[0].leading_zeros() as usize
}

/// Checks an RSA modulus's size; returns it in bits.
pub fn check_rsa_modulus(n: &[u8]) -> Result<usize, RsaKeyError> {
    match modulus_bits(n) {
        bits if bits < MIN_RSA_BITS => Err(RsaKeyError::TooSmall(bits)),
        bits if bits > MAX_RSA_BITS => Err(RsaKeyError::TooLarge(bits)),
        bits => Ok(bits),
    }
}

/// Checks the size of an RSA verification key (from a JWK's `n` and `e`, or
/// a PEM's PKCS#1 DER); keys of other families pass.
pub fn check_rsa_key(key: &DecodingKey) -> Result<(), RsaKeyError> {
    use x509_parser::prelude::FromDer as _;
    if key.family() != jsonwebtoken::AlgorithmFamily::Rsa {
        return Ok(());
    }
    match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, e } if !e.is_empty() => {
            check_rsa_modulus(n).map(drop)
        }
        DecodingKeyKind::SecretOrDer(der) => {
            match x509_parser::public_key::RSAPublicKey::from_der(der) {
                Ok((rest, key)) if rest.is_empty() && !key.exponent.is_empty() => {
                    check_rsa_modulus(key.modulus).map(drop)
                }
                _ => Err(RsaKeyError::Malformed),
            }
        }
        _ => Err(RsaKeyError::Malformed),
    }
}

/// Why one JWK of a key set was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SkippedKey {
    /// An RSA key of a size that cannot verify (worth a warning: the key set
    /// publishes a key its issuer may sign with).
    #[error("{0}")]
    Rsa(RsaKeyError),
    /// Any other reason.
    #[error("{0}")]
    Unusable(&'static str),
}

impl From<&'static str> for SkippedKey {
    fn from(reason: &'static str) -> Self {
        SkippedKey::Unusable(reason)
    }
}

/// Turns one JWK into a [`VerifyKey`] usable with some of `allowed`, or says why not.
pub fn key_from_jwk(jwk: &Jwk, allowed: AlgSet) -> Result<VerifyKey, SkippedKey> {
    if let Some(key_use) = &jwk.common.public_key_use {
        if *key_use != PublicKeyUse::Signature {
            return Err("`use` is not `sig`".into());
        }
    }
    if let Some(ops) = &jwk.common.key_operations {
        if !ops.contains(&KeyOperations::Verify) {
            return Err("`key_ops` does not include `verify`".into());
        }
    }
    if jwk
        .common
        .key_id
        .as_ref()
        .is_some_and(|k| k.len() > MAX_KID_BYTES)
    {
        return Err("`kid` is too long".into());
    }
    let (by_type, point_len) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (AlgSet::RSA, None),
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => (AlgSet::one(Algorithm::ES256), Some(65)),
            EllipticCurve::P384 => (AlgSet::one(Algorithm::ES384), Some(97)),
            _ => return Err("unsupported elliptic curve".into()),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => (AlgSet::one(Algorithm::EdDSA), Some(32)),
            _ => return Err("unsupported OKP curve".into()),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (`oct`) keys are not accepted from a key set".into())
        }
        _ => return Err("unsupported key type".into()),
    };
    let mut algorithms = by_type.intersect(allowed);
    if let Some(key_alg) = jwk.common.key_algorithm {
        match Algorithm::try_from(key_alg) {
            Ok(alg) => algorithms = algorithms.intersect(AlgSet::one(alg)),
            Err(_) => return Err("`alg` is not a signature algorithm".into()),
        }
    }
    if algorithms.is_empty() {
        return Err("the key cannot verify any algorithm the provider allows".into());
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "invalid key parameters")?;
    match (key.kind(), point_len) {
        (DecodingKeyKind::RsaModulusExponent { .. }, _) => {
            check_rsa_key(&key).map_err(|e| match e {
                RsaKeyError::Malformed => SkippedKey::Unusable("invalid key parameters"),
                size => SkippedKey::Rsa(size),
            })?;
        }
        (DecodingKeyKind::SecretOrDer(bytes), Some(len)) if bytes.len() != len => {
            return Err("invalid key parameters".into());
        }
        _ => {}
    }
    let canonical = serde_json::to_vec(jwk).map_err(|_| "invalid key parameters")?;
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        algorithms,
        key,
        fingerprint: sha256(&canonical),
    })
}

/// Why one fetch of one key set URL failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connecting, sending or reading failed (including the time limit).
    #[error("request failed: {0}")]
    Http(String),
    /// The server answered with another status than 200.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The body is larger than [`MAX_JWKS_BYTES`].
    #[error("key set larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    /// The body is not a JSON key set.
    #[error("not a JSON key set: {0}")]
    Json(String),
    /// The key set has no keys.
    #[error("the key set is empty")]
    Empty,
    /// The key set has keys, but none usable.
    #[error("no usable key in the key set ({0} skipped)")]
    NoUsableKeys(usize),
}

/// Parses a key set document fetched from `url` (named in warnings), keeping
/// the keys usable with some of `allowed`. An RSA key of a size that cannot
/// verify is skipped with a warning naming the URL, its `kid` and its size;
/// other unusable keys are skipped quietly (debug level). Skipped keys count
/// in [`FetchError::NoUsableKeys`].
pub fn parse_jwks(
    body: &[u8],
    allowed: AlgSet,
    url: &str,
) -> Result<Vec<Arc<VerifyKey>>, FetchError> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet = serde_json::from_slice(body).map_err(|e| FetchError::Json(e.to_string()))?;
    if raw.keys.is_empty() {
        return Err(FetchError::Empty);
    }
    let mut keys = Vec::new();
    let mut skipped = 0;
    for value in raw.keys.into_iter().take(MAX_KEYS_PER_DOCUMENT) {
        let jwk = match serde_json::from_value::<Jwk>(value) {
            Ok(jwk) => jwk,
            Err(_) => {
                skipped += 1;
                tracing::debug!(url, reason = "not a JWK", "skipping a key of a key set");
                continue;
            }
        };
        match key_from_jwk(&jwk, allowed) {
            Ok(key) => keys.push(Arc::new(key)),
            Err(reason) => {
                skipped += 1;
                // The kid came from the key server: bounded before it is logged.
                let kid: Option<String> = jwk
                    .common
                    .key_id
                    .as_deref()
                    .map(|k| k.chars().take(64).collect());
                match reason {
                    SkippedKey::Rsa(size) => tracing::warn!(
                        url,
                        kid = kid.as_deref().unwrap_or("(none)"),
                        reason = %size,
                        "skipping an RSA key of a key set: it cannot verify signatures"
                    ),
                    SkippedKey::Unusable(reason) => tracing::debug!(
                        url,
                        kid = kid.as_deref().unwrap_or("(none)"),
                        reason,
                        "skipping a key of a key set"
                    ),
                }
            }
        }
    }
    if keys.is_empty() {
        return Err(FetchError::NoUsableKeys(skipped));
    }
    Ok(keys)
}

/// What [`KeySet::select`] found for a token.
#[derive(Debug)]
pub enum Selection {
    /// Keys that may have signed the token (usually one).
    Found(Vec<Arc<VerifyKey>>),
    /// The set has no usable (fresh) key at all.
    NoKeys,
    /// No key has the token's `kid`.
    UnknownKid,
    /// Keys have the token's `kid` but none may verify the token's algorithm.
    AlgorithmMismatch,
    /// The token has no `kid` and several keys could verify it.
    Ambiguous,
    /// The token has no `kid` and no key can verify its algorithm.
    NoKeyForAlgorithm,
}

/// A snapshot of the merged keys of one provider.
#[derive(Debug)]
pub struct KeySet {
    /// Increases whenever the set of keys changes.
    pub generation: u64,
    pub(super) keys: Vec<(usize, Arc<VerifyKey>)>,
    pub(super) fetched_at: Vec<Option<Instant>>,
    pub(super) max_staleness: Option<Duration>,
}

impl KeySet {
    fn fresh(&self, url: usize, now: Instant) -> bool {
        match (
            self.fetched_at.get(url).copied().flatten(),
            self.max_staleness,
        ) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(at), Some(max)) => now.saturating_duration_since(at) <= max,
        }
    }

    /// The keys that may still be used at `now`.
    pub fn fresh_keys(&self, now: Instant) -> impl Iterator<Item = &Arc<VerifyKey>> {
        self.keys
            .iter()
            .filter(move |(url, _)| self.fresh(*url, now))
            .map(|(_, key)| key)
    }

    /// Whether some key may still be used at `now`.
    pub fn has_fresh_keys(&self, now: Instant) -> bool {
        self.fresh_keys(now).next().is_some()
    }

    /// Whether the key with this fingerprint is in the set and may still be used.
    pub fn contains_fresh(&self, fingerprint: &[u8; 32], now: Instant) -> bool {
        self.keys
            .iter()
            .any(|(url, key)| key.fingerprint == *fingerprint && self.fresh(*url, now))
    }

    /// The keys that may verify a token with this `kid` and algorithm.
    pub fn select(&self, kid: Option<&str>, alg: Algorithm, now: Instant) -> Selection {
        let mut any = false;
        let mut kid_seen = false;
        let mut found = Vec::new();
        for key in self.fresh_keys(now) {
            any = true;
            if let Some(kid) = kid {
                if key.kid.as_deref() != Some(kid) {
                    continue;
                }
                kid_seen = true;
            }
            if key.algorithms.contains(alg) {
                found.push(key.clone());
            }
        }
        match (kid, found.len()) {
            _ if !any => Selection::NoKeys,
            (Some(_), 0) if kid_seen => Selection::AlgorithmMismatch,
            (Some(_), 0) => Selection::UnknownKid,
            (None, 0) => Selection::NoKeyForAlgorithm,
            (None, n) if n > 1 => Selection::Ambiguous,
            _ => Selection::Found(found),
        }
    }
}
