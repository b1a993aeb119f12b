//! JSON Web Key Sets: the public keys of a JWT issuer, fetched over HTTPS and kept fresh.
//!
//! A [`JwksSource`] belongs to one JWT provider (see [`super::jwt`]). It fetches the
//! provider's key set URLs:
//!
//! - once when the authenticator starts ([`JwksSource::refresh`]),
//! - every [`JwksSettings::refresh`] interval (sooner, with a doubling back-off from
//!   1 s, after a failed fetch), from the task [`JwksSource::spawn_refresher`] starts,
//! - on demand when a token names a `kid` the set does not have
//!   ([`JwksSource::refetch_on_demand`]): at most one such fetch per
//!   [`JwksSettings::min_refetch_interval`] (the hold-off), and concurrent
//!   callers share it. A token that arrives inside the hold-off (after
//!   another unknown kid, perhaps an attacker's) waits for the next permitted
//!   fetch instead of being refused, so a key rotation never refuses a valid
//!   token; at most [`MAX_REFETCH_WAITERS`] requests wait at once, later ones
//!   are refused at once.
//!
//! The keys of several URLs are merged. Each URL keeps its last good keys: a fetch that
//! fails (unreachable, time-out, status other than 200, a body over
//! [`MAX_JWKS_BYTES`], bad JSON, no usable key) is logged with `tracing::warn!` and
//! changes nothing. With [`JwksSettings::max_staleness`], keys whose URL has not been
//! fetched successfully for that long are no longer used.
//!
//! Only keys meant for signatures are kept: a JWK whose `use` is not `sig`, whose
//! `key_ops` lacks `verify`, whose `alg` is not one of the provider's algorithms, or
//! whose type cannot verify any of them (symmetric `oct` keys are never taken from a
//! key set) is skipped. Keys are parsed once, when fetched.
//!
//! Key set URLs must be `https`, except `http` to a loopback host (`127.0.0.0/8`,
//! `::1`, `localhost`), for tests and sidecars. Redirects are followed (at most 5)
//! only to URLs that pass the same rule.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use serde::Deserialize;

/// The largest key set document accepted, in bytes.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// The most keys taken from one key set document; later ones are ignored.
pub const MAX_KEYS_PER_DOCUMENT: usize = 100;
/// The longest `kid` accepted, in bytes, in a key set or in a token header.
pub const MAX_KID_BYTES: usize = 256;
/// The most redirects followed when fetching a key set.
const MAX_REDIRECTS: usize = 5;
/// The first retry delay after a failed fetch; it doubles up to the refresh interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The most requests of one provider that wait at once for a fetch triggered
/// by an unknown `kid`; more are refused at once ("unknown signing key").
/// Each waits at most the hold-off and the fetch, so a flood of unknown kids
/// holds at most this many requests (and one fetch per hold-off).
pub const MAX_REFETCH_WAITERS: usize = 1024;

/// How to fetch and keep the key set of one provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksSettings {
    /// Key set URLs; the keys of all of them are merged.
    pub urls: Vec<String>,
    /// How often the key set is fetched again. Default 60 minutes (as BuildGrid's `jwks-fetch-minutes`).
    pub refresh: Duration,
    /// Keys not refreshed successfully for this long are dropped (tokens are then
    /// refused with "no keys available for issuer"). `None` keeps the last good keys
    /// for ever. Default 24 hours.
    pub max_staleness: Option<Duration>,
    /// The least time between two fetches triggered by an unknown `kid`. Default 10 s (as `jwks-refetch-min-seconds`).
    pub min_refetch_interval: Duration,
    /// The time limit of one fetch (connect, headers and body). Default 10 s.
    pub timeout: Duration,
}

impl JwksSettings {
    /// Default [`JwksSettings::refresh`].
    pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60 * 60);
    /// Default [`JwksSettings::max_staleness`].
    pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(24 * 3600);
    /// Default [`JwksSettings::min_refetch_interval`].
    pub const DEFAULT_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
    /// Default [`JwksSettings::timeout`].
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Settings for these URLs, with every other field at its default.
    pub fn new(urls: Vec<String>) -> Self {
        JwksSettings {
            urls,
            ..JwksSettings::default()
        }
    }
}

impl Default for JwksSettings {
    fn default() -> Self {
        JwksSettings {
            urls: Vec::new(),
            refresh: Self::DEFAULT_REFRESH,
            max_staleness: Some(Self::DEFAULT_MAX_STALENESS),
            min_refetch_interval: Self::DEFAULT_MIN_REFETCH_INTERVAL,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

/// Why a key set configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum JwksConfigError {
    /// No URL was given.
    #[error("no key set URL")]
    NoUrls,
    /// A URL is not acceptable.
    #[error("key set URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as configured.
        url: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Checks a key set URL: `https`, or `http` to a loopback host.
pub fn check_url(url: &str) -> Result<reqwest::Url, &'static str> {
    let parsed = reqwest::Url::parse(url).map_err(|_| "not a valid URL")?;
    check_parsed_url(&parsed)?;
    Ok(parsed)
}

fn check_parsed_url(url: &reqwest::Url) -> Result<(), &'static str> {
    let host = url.host_str().ok_or("the URL has no host")?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback_host(host) => Ok(()),
        "http" => Err("plain http is only allowed to a loopback host; use https"),
        _ => Err("the scheme must be https"),
    }
}

fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

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
    keys: Vec<(usize, Arc<VerifyKey>)>,
    fetched_at: Vec<Option<Instant>>,
    max_staleness: Option<Duration>,
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

/// The keys last fetched from one URL.
#[derive(Default)]
struct UrlKeys {
    keys: Vec<Arc<VerifyKey>>,
    fetched_at: Option<Instant>,
    /// Whether the loss of these keys to staleness was already logged.
    stale_logged: bool,
}

/// State changed only by a fetch, under [`JwksSource::fetch_lock`].
struct FetchState {
    urls: Vec<UrlKeys>,
    last_on_demand: Option<Instant>,
}

/// The key set of one provider: fetched, merged, cached and refreshed.
pub struct JwksSource {
    name: String,
    settings: JwksSettings,
    urls: Vec<reqwest::Url>,
    allowed: AlgSet,
    client: reqwest::Client,
    current: RwLock<Arc<KeySet>>,
    /// Held for the length of a fetch; owned so that a fetch runs in its own
    /// task, to the end, whoever of its waiters goes away.
    fetch_lock: Arc<tokio::sync::Mutex<FetchState>>,
    /// How many fetch rounds have begun; a round's number is this count when it began.
    rounds_begun: AtomicU64,
    /// The number of the last completed round (successful or not).
    last_round_done: AtomicU64,
    /// Whether that round fetched every URL.
    last_round_ok: std::sync::atomic::AtomicBool,
    /// Requests waiting in [`JwksSource::refetch_on_demand`].
    refetch_waiters: tokio::sync::Semaphore,
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksSource")
            .field("name", &self.name)
            .field("urls", &self.settings.urls)
            .finish_non_exhaustive()
    }
}

impl JwksSource {
    /// A key set source for the provider `name`, keeping keys usable with `allowed`.
    /// Checks the settings; fetches nothing yet.
    pub fn new(
        name: &str,
        settings: JwksSettings,
        allowed: AlgSet,
    ) -> Result<Self, JwksConfigError> {
        if settings.urls.is_empty() {
            return Err(JwksConfigError::NoUrls);
        }
        let urls = settings
            .urls
            .iter()
            .map(|u| {
                check_url(u).map_err(|reason| JwksConfigError::BadUrl {
                    url: u.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if settings.refresh.is_zero() {
            return Err(JwksConfigError::ZeroDuration(
                "the key set refresh interval",
            ));
        }
        if settings.timeout.is_zero() {
            return Err(JwksConfigError::ZeroDuration("the key set fetch timeout"));
        }
        if settings.max_staleness.is_some_and(|d| d.is_zero()) {
            return Err(JwksConfigError::ZeroDuration(
                "the key set maximum staleness",
            ));
        }
        let redirect = reqwest::redirect::Policy::custom(|attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if let Err(reason) = check_parsed_url(attempt.url()) {
                attempt.error(reason)
            } else {
                attempt.follow()
            }
        });
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(redirect)
            .user_agent(concat!("gridgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| JwksConfigError::Client(e.to_string()))?;
        let url_count = urls.len();
        Ok(JwksSource {
            name: name.to_owned(),
            current: RwLock::new(Arc::new(KeySet {
                generation: 0,
                keys: Vec::new(),
                fetched_at: vec![None; url_count],
                max_staleness: settings.max_staleness,
            })),
            fetch_lock: Arc::new(tokio::sync::Mutex::new(FetchState {
                urls: (0..url_count).map(|_| UrlKeys::default()).collect(),
                last_on_demand: None,
            })),
            settings,
            urls,
            allowed,
            client,
            rounds_begun: AtomicU64::new(0),
            last_round_done: AtomicU64::new(0),
            last_round_ok: std::sync::atomic::AtomicBool::new(false),
            refetch_waiters: tokio::sync::Semaphore::new(MAX_REFETCH_WAITERS),
        })
    }

    /// The provider name this source belongs to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settings of this source.
    pub fn settings(&self) -> &JwksSettings {
        &self.settings
    }

    /// The current snapshot of the keys.
    pub fn current(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the key with this fingerprint is in the set and may still be used at `now`.
    pub fn contains_fresh(&self, fingerprint: &[u8; 32], now: Instant) -> bool {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_fresh(fingerprint, now)
    }

    /// Whether some key is usable now.
    pub fn has_fresh_keys(&self) -> bool {
        self.current().has_fresh_keys(Instant::now())
    }

    /// Fetches every URL now (waiting for a fetch under way first). Returns whether
    /// every URL was fetched successfully.
    pub async fn refresh(&self) -> bool {
        let mut state = self.fetch_lock.lock().await;
        self.fetch_all(&mut state).await
    }

    /// Sets this provider's gauges: usable keys, and seconds since the last
    /// successful fetch of any of its URLs (-1 before the first).
    pub fn sample_metrics(&self) {
        let now = Instant::now();
        let set = self.current();
        let keys = set.fresh_keys(now).count();
        let age = set
            .fetched_at
            .iter()
            .flatten()
            .map(|at| now.saturating_duration_since(*at).as_secs_f64())
            .reduce(f64::min)
            .unwrap_or(-1.0);
        crate::metrics::jwks_gauges(&self.name, keys, age);
    }

    /// Fetches the key set again because a token named a `kid` it does not
    /// have (or the set has no usable key), at most once per
    /// [`JwksSettings::min_refetch_interval`] (the hold-off). Returns whether
    /// a fetch that answers the call completed (the caller should then look
    /// at the keys again): one that began after the call began, or one under
    /// way then if it failed or the caller does not `wait`. Concurrent
    /// callers share that fetch.
    ///
    /// Inside the hold-off, a caller with `wait` waits for the next permitted
    /// fetch (at most the hold-off, then the fetch itself); without `wait` it
    /// gets `false` at once. Beyond [`MAX_REFETCH_WAITERS`] callers at once,
    /// `false` at once too.
    pub async fn refetch_on_demand(self: &Arc<Self>, wait: bool) -> bool {
        let Ok(_waiting) = self.refetch_waiters.try_acquire() else {
            tracing::debug!(provider = %self.name, "too many requests waiting for a key set fetch");
            return false;
        };
        let done_before = self.last_round_done.load(Ordering::Acquire);
        let begun_before = self.rounds_begun.load(Ordering::Acquire);
        loop {
            let mut state = self.fetch_lock.clone().lock_owned().await;
            let done = self.last_round_done.load(Ordering::Acquire);
            // A fetch that began after this call answers it. One already
            // under way does too for an empty set, and for an unknown kid
            // when it failed (the key server is in trouble: another fetch
            // would double the wait for nothing); when it succeeded it may
            // have asked before the new key was published, so the caller
            // waits for the next.
            let under_way_answers = !wait || !self.last_round_ok.load(Ordering::Acquire);
            if done > begun_before || (under_way_answers && done > done_before) {
                return true;
            }
            let now = Instant::now();
            let next_permitted = state
                .last_on_demand
                .map(|at| at + self.settings.min_refetch_interval)
                .filter(|next| *next > now);
            if let Some(next) = next_permitted {
                if !wait {
                    return false;
                }
                drop(state);
                tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
                continue;
            }
            state.last_on_demand = Some(now);
            tracing::debug!(provider = %self.name, "unknown key id: fetching the key set again");
            // In its own task: a caller that goes away (or its deadline) must
            // not cancel the fetch the other waiters wait for.
            let this = self.clone();
            let fetch = tokio::spawn(async move {
                let mut state = state;
                this.fetch_all(&mut state).await;
            });
            let _ = fetch.await;
            return true;
        }
    }

    async fn fetch_all(&self, state: &mut FetchState) -> bool {
        let round = self.rounds_begun.fetch_add(1, Ordering::AcqRel) + 1;
        let results =
            futures_util::future::join_all(self.urls.iter().map(|url| self.fetch_one(url.clone())))
                .await;
        let now = Instant::now();
        let mut all_ok = true;
        for ((url, slot), result) in self.urls.iter().zip(state.urls.iter_mut()).zip(results) {
            crate::metrics::jwks_fetch(&self.name, result.is_ok());
            match result {
                Ok(keys) => {
                    slot.keys = keys;
                    slot.fetched_at = Some(now);
                    slot.stale_logged = false;
                }
                Err(error) => {
                    all_ok = false;
                    tracing::warn!(
                        provider = %self.name,
                        url = %url,
                        reason = %error,
                        "key set fetch failed; keeping the previous keys"
                    );
                }
            }
        }
        self.publish(state);
        self.last_round_ok.store(all_ok, Ordering::Release);
        self.last_round_done.store(round, Ordering::Release);
        all_ok
    }

    /// Builds a new snapshot from the per-URL keys.
    fn publish(&self, state: &FetchState) {
        let mut guard = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let keys: Vec<(usize, Arc<VerifyKey>)> = state
            .urls
            .iter()
            .enumerate()
            .flat_map(|(i, u)| u.keys.iter().map(move |k| (i, k.clone())))
            .collect();
        let same = keys.len() == guard.keys.len()
            && keys
                .iter()
                .zip(guard.keys.iter())
                .all(|((ia, a), (ib, b))| ia == ib && a.fingerprint == b.fingerprint);
        let generation = if same {
            guard.generation
        } else {
            guard.generation + 1
        };
        *guard = Arc::new(KeySet {
            generation,
            keys,
            fetched_at: state.urls.iter().map(|u| u.fetched_at).collect(),
            max_staleness: self.settings.max_staleness,
        });
    }

    async fn fetch_one(&self, url: reqwest::Url) -> Result<Vec<Arc<VerifyKey>>, FetchError> {
        let url_text = url.to_string();
        let mut response = self
            .client
            .get(url)
            .header(
                reqwest::header::ACCEPT,
                "application/json, application/jwk-set+json",
            )
            .send()
            .await
            .map_err(|e| FetchError::Http(error_chain(&e)))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
        {
            return Err(FetchError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::Http(error_chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body, self.allowed, url_text.as_str())
    }

    /// When the next URL's keys become stale, if that is in the future.
    fn next_stale_deadline(&self, now: Instant) -> Option<Instant> {
        let max = self.settings.max_staleness?;
        let set = self.current();
        set.fetched_at
            .iter()
            .flatten()
            .map(|at| *at + max)
            .filter(|deadline| *deadline > now)
            .min()
    }

    fn log_stale(&self) {
        let Ok(mut state) = self.fetch_lock.try_lock() else {
            return;
        };
        let Some(max) = self.settings.max_staleness else {
            return;
        };
        let now = Instant::now();
        for (url, slot) in self.urls.iter().zip(state.urls.iter_mut()) {
            let stale = slot
                .fetched_at
                .is_some_and(|at| now.saturating_duration_since(at) > max);
            if stale && !slot.stale_logged && !slot.keys.is_empty() {
                slot.stale_logged = true;
                tracing::warn!(
                    provider = %self.name,
                    url = %url,
                    max_staleness_secs = max.as_secs(),
                    "keys not refreshed within the maximum staleness; no longer used"
                );
            }
        }
    }

    /// Starts the task that refreshes the keys every [`JwksSettings::refresh`]
    /// (sooner after a failure) and calls `on_change` after every fetch and whenever
    /// keys become stale. `last_ok` says whether the last fetch succeeded.
    pub fn spawn_refresher(
        self: Arc<Self>,
        last_ok: bool,
        on_change: impl Fn() + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut failures: u32 = if last_ok { 0 } else { 1 };
            let mut next_fetch = Instant::now() + self.retry_delay(failures);
            loop {
                let now = Instant::now();
                let wake = self
                    .next_stale_deadline(now)
                    .map_or(next_fetch, |deadline| deadline.min(next_fetch));
                tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
                if Instant::now() >= next_fetch {
                    let ok = self.refresh().await;
                    failures = if ok { 0 } else { failures.saturating_add(1) };
                    next_fetch = Instant::now() + self.retry_delay(failures);
                } else {
                    // Woken at a staleness deadline: let the stale keys' sleep end.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                self.log_stale();
                on_change();
            }
        })
    }

    fn retry_delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return self.settings.refresh;
        }
        let backoff = FIRST_RETRY.saturating_mul(1u32 << (failures - 1).min(16));
        backoff.min(self.settings.refresh)
    }
}

/// An error and its sources, on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(check_url("https://token.actions.githubusercontent.com/.well-known/jwks").is_ok());
        assert!(check_url("http://127.0.0.1:8080/jwks").is_ok());
        assert!(check_url("http://127.1.2.3/jwks").is_ok());
        assert!(check_url("http://[::1]:9/jwks").is_ok());
        assert!(check_url("http://localhost/jwks").is_ok());
        assert!(check_url("http://LOCALHOST/jwks").is_ok());
        assert!(check_url("http://example.com/jwks").is_err());
        assert!(check_url("http://10.0.0.1/jwks").is_err());
        assert!(check_url("http://localhost.evil.com/jwks").is_err());
        assert!(check_url("http://127.0.0.1.nip.io/jwks").is_err());
        assert!(check_url("ftp://127.0.0.1/jwks").is_err());
        assert!(check_url("file:///etc/jwks").is_err());
        assert!(check_url("not a url").is_err());
    }

    #[test]
    fn algsets() {
        let set = AlgSet::from_slice(&[Algorithm::RS256, Algorithm::ES256]).unwrap();
        assert!(set.contains(Algorithm::RS256));
        assert!(!set.contains(Algorithm::PS256));
        assert!(AlgSet::RSA.contains(Algorithm::PS512));
        assert!(!AlgSet::RSA.contains(Algorithm::HS256));
        assert!(!AlgSet::RSA.contains(Algorithm::EdDSA));
        assert!(set.intersect(AlgSet::RSA) == AlgSet::one(Algorithm::RS256));
    }

    #[test]
    fn rsa_key_sizes() {
        assert_eq!(modulus_bits(&[]), 0);
        assert_eq!(modulus_bits(&[0, 0]), 0);
        assert_eq!(modulus_bits(&[0, 1]), 1);
        assert_eq!(modulus_bits(&[0, 0x80, 0]), 16);
        assert_eq!(
            check_rsa_modulus(&[0xff; 128]),
            Err(RsaKeyError::TooSmall(1024))
        );
        // 256 bytes are not always 2048 bits.
        assert_eq!(
            check_rsa_modulus(&[0x7f; 256]),
            Err(RsaKeyError::TooSmall(2047))
        );
        assert_eq!(check_rsa_modulus(&[0x80; 256]), Ok(2048));
        let mut padded = vec![0; 3];
        padded.extend([0xc5; 512]);
        assert_eq!(check_rsa_modulus(&padded), Ok(4096));
        assert_eq!(check_rsa_modulus(&[0xff; 1024]), Ok(8192));
        assert_eq!(
            check_rsa_modulus(&[0x01; 1025]),
            Err(RsaKeyError::TooLarge(8193))
        );
        assert_eq!(
            RsaKeyError::TooSmall(1024).to_string(),
            "RSA key of 1024 bits; at least 2048 are needed"
        );
    }

    #[test]
    fn key_set_documents() {
        let all =
            AlgSet::from_slice(&[Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA]).unwrap();
        assert!(matches!(
            parse_jwks(b"not json", all, "test"),
            Err(FetchError::Json(_))
        ));
        assert!(matches!(
            parse_jwks(b"{}", all, "test"),
            Err(FetchError::Json(_))
        ));
        assert!(matches!(
            parse_jwks(b"{\"keys\":[]}", all, "test"),
            Err(FetchError::Empty)
        ));
        let oct = br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"h"},{"kty":"weird"},42]}"#;
        assert!(matches!(
            parse_jwks(oct, all, "test"),
            Err(FetchError::NoUsableKeys(3))
        ));
        // A P-256 point of the wrong length is refused when loaded.
        let bad_ec = br#"{"keys":[{"kty":"EC","crv":"P-256","x":"AAAA","y":"AAAA","kid":"e"}]}"#;
        assert!(matches!(
            parse_jwks(bad_ec, all, "test"),
            Err(FetchError::NoUsableKeys(1))
        ));
        // A short RSA modulus is refused.
        let small_rsa = br#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB","kid":"r"}]}"#;
        assert!(matches!(
            parse_jwks(small_rsa, all, "test"),
            Err(FetchError::NoUsableKeys(1))
        ));
    }
}
