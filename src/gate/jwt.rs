//! The JWT authenticator: turns a bearer token into a verified [`Identity`].
//!
//! A [`JwtAuthenticator`] is built once from [`JwtSettings`] (one or more providers,
//! each with its issuer, algorithms, key and audiences) and then verifies tokens:
//!
//! ```text
//! token (the bytes after "Bearer ")
//!   -> size limit (MAX_TOKEN_BYTES) -> cache lookup by SHA-256 of the token
//!   -> header: alg must be one the provider allows; `crit` refused; `kid` <= 256 bytes;
//!      `jku`, `x5u`, `jwk`, `x5c` are never used to find a key
//!   -> provider: the only one (BuildGrid style, no issuer), or chosen by the exact
//!      unverified `iss` (verified again after the signature)
//!   -> key: the static secret / PEM key, or the JWKS key with the token's `kid`
//!      (an unknown kid triggers one rate-limited refetch; inside the hold-off
//!      the token waits for the next one)
//!   -> jsonwebtoken::decode with the Validation pre-built for (provider, alg):
//!      signature, `exp` (required), `nbf`, `iss`, `aud` (required when configured)
//!   -> own checks: `iat` not in the future, lifetime cap, no duplicate claim names
//!   -> Identity { actor, subject, workflow, claims } -> cached until the token's `exp`
//! ```
//!
//! A cache hit is only honoured while the key that verified the token is still in the
//! provider's key set (and not stale), so removing a key from a JWKS revokes the
//! cached tokens it signed.
//!
//! Refusals are [`AuthError`]s whose text is short and safe to send to the caller: it
//! never contains the token or a secret.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use gridgate::gate::jwt::{JwtAuthenticator, JwtSettings, ProviderSettings, KeySource};
//! use gridgate::gate::jwks::JwksSettings;
//! let settings = JwtSettings {
//!     providers: vec![ProviderSettings {
//!         name: "github".into(),
//!         issuer: Some("https://token.actions.githubusercontent.com".into()),
//!         algorithms: vec![jsonwebtoken::Algorithm::RS256],
//!         key: KeySource::Jwks(JwksSettings::new(vec![
//!             "https://token.actions.githubusercontent.com/.well-known/jwks".into(),
//!         ])),
//!         audiences: vec!["https://gate.example".into()],
//!         allow_weak_secret: false,
//!     }],
//!     ..JwtSettings::default()
//! };
//! let auth = JwtAuthenticator::new(settings)?;
//! auth.start().await;
//! let identity = auth.authenticate("eyJ...").await?;
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use moka::sync::Cache;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::watch;

use super::identity::{AuthMethod, Identity};
use super::jwks::{self, AlgSet, JwksConfigError, JwksSettings, JwksSource, Selection, VerifyKey};

/// The longest token accepted, in bytes; longer ones are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// The longest time a verified token stays in the cache, even if its `exp` is later.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(3600);
/// How many keys with the same `kid` are tried before giving up.
const MAX_CANDIDATE_KEYS: usize = 4;

/// Settings of the JWT authenticator.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// The token issuers. One provider with `issuer: None` is BuildGrid's single-key
    /// mode; otherwise every provider needs a distinct issuer.
    pub providers: Vec<ProviderSettings>,
    /// Clock-skew leeway for `exp`, `nbf` and `iat`. Default 60 s.
    pub leeway: Duration,
    /// Refuse tokens whose `exp - iat` (or `exp - nbf` without `iat`, or `exp - now`
    /// without either) exceeds this. Default: no limit.
    pub max_lifetime: Option<Duration>,
    /// The most verified tokens kept in the cache; 0 disables the cache. Default 100 000.
    pub cache_capacity: u64,
    /// Which claims become the identity's actor, subject and workflow.
    pub claims: ClaimMapping,
}

impl JwtSettings {
    /// Default [`JwtSettings::leeway`].
    pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
    /// Default [`JwtSettings::cache_capacity`].
    pub const DEFAULT_CACHE_CAPACITY: u64 = 100_000;
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            providers: Vec::new(),
            leeway: Self::DEFAULT_LEEWAY,
            max_lifetime: None,
            cache_capacity: Self::DEFAULT_CACHE_CAPACITY,
            claims: ClaimMapping::default(),
        }
    }
}

/// Which claims fill the identity fields: for each field, the first claim present wins.
///
/// A string claim is taken as it is, a number or boolean as its JSON text, an object
/// (an RFC 8693 `act`) by its `sub`, a list (an `aud`) by its first element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimMapping {
    /// Default `["act", "sub"]`.
    pub actor: Vec<String>,
    /// Default `["sub"]`.
    pub subject: Vec<String>,
    /// Default `["aud"]`; without any, the provider's first configured audience.
    pub workflow: Vec<String>,
}

impl Default for ClaimMapping {
    fn default() -> Self {
        ClaimMapping {
            actor: vec!["act".into(), "sub".into()],
            subject: vec!["sub".into()],
            workflow: vec!["aud".into()],
        }
    }
}

/// One token issuer.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    /// For logs and messages, e.g. the issuer or "default".
    pub name: String,
    /// `Some`: only tokens with exactly this `iss` go to this provider, and `iss` is
    /// required. `None`: the BuildGrid-style single provider (`iss` not checked).
    pub issuer: Option<String>,
    /// The algorithms accepted; the token header's `alg` must be one of them.
    pub algorithms: Vec<Algorithm>,
    /// Where the verification key comes from.
    pub key: KeySource,
    /// Non-empty: the token must carry an `aud` and one of its values must be one of
    /// these. Empty: `aud` is not checked.
    pub audiences: Vec<String>,
    /// Accept an HMAC secret shorter than the hash output (with a warning).
    pub allow_weak_secret: bool,
}

/// Where a provider's verification keys come from.
#[derive(Clone)]
pub enum KeySource {
    /// An HMAC secret (HS256/384/512), at least as long as the hash output
    /// (32/48/64 bytes) unless `allow_weak_secret`.
    Secret(Vec<u8>),
    /// A public key (or certificate) in PEM for RS*/PS*/ES*/EdDSA: BuildGrid's
    /// `secret` for asymmetric algorithms.
    PublicKeyPem(Vec<u8>),
    /// A JSON Web Key Set fetched over HTTPS.
    Jwks(JwksSettings),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Secret(s) => write!(f, "Secret([{} bytes redacted])", s.len()),
            KeySource::PublicKeyPem(p) => write!(f, "PublicKeyPem([{} bytes])", p.len()),
            KeySource::Jwks(j) => f.debug_tuple("Jwks").field(j).finish(),
        }
    }
}

/// Why the JWT settings were refused. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    /// No provider was configured.
    #[error("no JWT provider configured")]
    NoProviders,
    /// Several providers, and one of them has no issuer.
    #[error("provider {provider:?}: an issuer is required when several providers are configured")]
    IssuerRequired {
        /// The provider's name.
        provider: String,
    },
    /// Two providers have the same issuer.
    #[error("providers {first:?} and {second:?} have the same issuer")]
    DuplicateIssuer {
        /// The first provider's name.
        first: String,
        /// The second provider's name.
        second: String,
    },
    /// A provider lists no algorithm.
    #[error("provider {provider:?}: no algorithm configured")]
    NoAlgorithms {
        /// The provider's name.
        provider: String,
    },
    /// An algorithm is not supported.
    #[error("provider {provider:?}: algorithm {algorithm:?} is not supported")]
    UnsupportedAlgorithm {
        /// The provider's name.
        provider: String,
        /// The algorithm.
        algorithm: Algorithm,
    },
    /// An algorithm does not fit the kind of key configured.
    #[error("provider {provider:?}: algorithm {algorithm:?} cannot be used with {key}")]
    AlgorithmKeyMismatch {
        /// The provider's name.
        provider: String,
        /// The algorithm.
        algorithm: Algorithm,
        /// The kind of key configured.
        key: &'static str,
    },
    /// An HMAC secret is empty.
    #[error("provider {provider:?}: the HMAC secret is empty")]
    EmptySecret {
        /// The provider's name.
        provider: String,
    },
    /// An HMAC secret is shorter than the hash output.
    #[error(
        "provider {provider:?}: the HMAC secret has {length} bytes, {algorithm:?} needs at \
         least {minimum} (set allow-weak-secret to accept it anyway)"
    )]
    WeakSecret {
        /// The provider's name.
        provider: String,
        /// The algorithm needing the longest secret.
        algorithm: Algorithm,
        /// The secret's length in bytes.
        length: usize,
        /// The minimum length in bytes.
        minimum: usize,
    },
    /// The public key is an RSA key of a size that cannot verify signatures.
    #[error("provider {provider:?}: {source}")]
    RsaKeySize {
        /// The provider's name.
        provider: String,
        /// The size and the limit.
        #[source]
        source: jwks::RsaKeyError,
    },
    /// The public key PEM cannot be used.
    #[error("provider {provider:?}: bad public key: {reason}")]
    BadPublicKey {
        /// The provider's name.
        provider: String,
        /// Why.
        reason: &'static str,
    },
    /// The key set settings are wrong.
    #[error("provider {provider:?}: {source}")]
    Jwks {
        /// The provider's name.
        provider: String,
        /// What is wrong.
        #[source]
        source: JwksConfigError,
    },
}

/// Why a token was refused. The text is short and safe to return to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Longer than [`MAX_TOKEN_BYTES`].
    #[error("token too large")]
    TooLarge,
    /// Not three base64url parts of JSON, or claims of the wrong shape.
    #[error("malformed token")]
    Malformed,
    /// A claim the checks need has the wrong type (e.g. `exp` as a string).
    #[error("invalid {0} claim")]
    InvalidClaim(&'static str),
    /// The header's `alg` is not one the provider allows (including `none`).
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    /// The header has a `crit` parameter.
    #[error("token has critical header parameters")]
    CriticalHeader,
    /// The header's `kid` is longer than 256 bytes.
    #[error("key id too long")]
    KidTooLong,
    /// No provider has the token's issuer.
    #[error("unknown issuer")]
    UnknownIssuer,
    /// Several providers are configured and the token has no `iss`.
    #[error("token has no issuer")]
    MissingIssuer,
    /// The verified `iss` is not the provider's.
    #[error("issuer mismatch")]
    IssuerMismatch,
    /// No key of the provider has the token's `kid` (after a refetch).
    #[error("unknown signing key")]
    UnknownKey,
    /// The key with the token's `kid` may not verify the token's algorithm.
    #[error("signing key does not allow this algorithm")]
    KeyAlgorithmMismatch,
    /// The token has no `kid` and several keys could verify it.
    #[error("token has no key id and the issuer has several keys")]
    AmbiguousKey,
    /// The provider's key set has no usable key (never fetched, or stale).
    #[error("no keys available for issuer")]
    NoKeys,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The key could not be used to verify.
    #[error("unusable signing key")]
    UnusableKey,
    /// `exp` is past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` is in the future (beyond the leeway).
    #[error("token issued in the future")]
    IssuedInFuture,
    /// No `exp`.
    #[error("token has no expiry")]
    NoExpiry,
    /// The token lives longer than the configured maximum.
    #[error("token lifetime exceeds maximum")]
    LifetimeExceeded,
    /// No audience of the token is configured.
    #[error("audience mismatch")]
    AudienceMismatch,
    /// Audiences are configured and the token has none.
    #[error("token has no audience")]
    MissingAudience,
    /// Any other failure of the JWT library.
    #[error("token verification failed")]
    Verification,
}

impl AuthError {
    /// A stable label for metrics, e.g. `expired`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AuthError::TooLarge => "too_large",
            AuthError::Malformed => "malformed",
            AuthError::InvalidClaim(_) => "invalid_claim",
            AuthError::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthError::CriticalHeader => "critical_header",
            AuthError::KidTooLong => "kid_too_long",
            AuthError::UnknownIssuer => "unknown_issuer",
            AuthError::MissingIssuer => "missing_issuer",
            AuthError::IssuerMismatch => "issuer_mismatch",
            AuthError::UnknownKey => "unknown_key",
            AuthError::KeyAlgorithmMismatch => "key_algorithm_mismatch",
            AuthError::AmbiguousKey => "ambiguous_key",
            AuthError::NoKeys => "no_keys",
            AuthError::BadSignature => "bad_signature",
            AuthError::UnusableKey => "unusable_key",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::IssuedInFuture => "issued_in_future",
            AuthError::NoExpiry => "no_expiry",
            AuthError::LifetimeExceeded => "lifetime_exceeded",
            AuthError::AudienceMismatch => "audience_mismatch",
            AuthError::MissingAudience => "missing_audience",
            AuthError::Verification => "verification_failed",
        }
    }

    fn from_library(error: &jsonwebtoken::errors::Error) -> AuthError {
        match error.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidAudience => AuthError::AudienceMismatch,
            ErrorKind::InvalidIssuer => AuthError::IssuerMismatch,
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                AuthError::AlgorithmNotAllowed
            }
            ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                "exp" => AuthError::NoExpiry,
                "aud" => AuthError::MissingAudience,
                "iss" => AuthError::MissingIssuer,
                _ => AuthError::Malformed,
            },
            ErrorKind::InvalidClaimFormat(claim) => match claim.as_str() {
                "exp" => AuthError::InvalidClaim("exp"),
                "nbf" => AuthError::InvalidClaim("nbf"),
                _ => AuthError::Malformed,
            },
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_) => AuthError::Malformed,
            ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::UnsupportedAlgorithm => AuthError::UnusableKey,
            _ => AuthError::Verification,
        }
    }
}

/// One configured provider, ready to verify.
struct Provider {
    name: String,
    issuer: Option<String>,
    audiences: Vec<String>,
    algorithms: AlgSet,
    /// One Validation per allowed algorithm, built from the configuration.
    validations: Vec<(Algorithm, Validation)>,
    keys: ProviderKeys,
}

enum ProviderKeys {
    Static(Arc<VerifyKey>),
    Jwks(Arc<JwksSource>),
}

/// Which key verified a cached token.
enum KeyRef {
    Static,
    Jwks([u8; 32]),
}

/// The last token a connection sent, verified: see
/// [`JwtAuthenticator::authenticate_on_connection`].
#[derive(Default)]
pub struct ConnectionToken {
    held: std::sync::Mutex<Option<Arc<HeldToken>>>,
}

struct HeldToken {
    token: Box<str>,
    entry: Arc<CachedToken>,
    identity: Arc<Identity>,
}

impl ConnectionToken {
    fn get(&self) -> Option<Arc<HeldToken>> {
        match self.held.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, held: Arc<HeldToken>) {
        match self.held.lock() {
            Ok(mut g) => *g = Some(held),
            Err(poisoned) => *poisoned.into_inner() = Some(held),
        }
    }
}

impl fmt::Debug for ConnectionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token.
        f.write_str("ConnectionToken")
    }
}

struct CachedToken {
    identity: Identity,
    provider: usize,
    key: KeyRef,
    /// The token's `exp` (at most [`MAX_CACHE_TTL`] after insertion), on the monotonic clock.
    valid_until: Instant,
}

struct TokenExpiry;

impl moka::Expiry<[u8; 32], Arc<CachedToken>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<CachedToken>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.valid_until.saturating_duration_since(created_at))
    }
}

/// Readiness shared with the refresh tasks.
struct Readiness {
    sources: Vec<Arc<JwksSource>>,
    tx: watch::Sender<bool>,
}

impl Readiness {
    fn compute(&self) -> bool {
        self.sources.iter().all(|s| s.has_fresh_keys())
    }

    fn update(&self) -> bool {
        let ready = self.compute();
        self.tx.send_if_modified(|current| {
            let changed = *current != ready;
            *current = ready;
            changed
        });
        ready
    }
}

/// Verifies JWTs against the configured providers. See the module documentation.
pub struct JwtAuthenticator {
    providers: Vec<Provider>,
    /// The one provider without an issuer, BuildGrid style.
    single: bool,
    leeway_secs: u64,
    max_lifetime_secs: Option<u64>,
    claims: ClaimMapping,
    cache: Option<Cache<[u8; 32], Arc<CachedToken>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    readiness: Arc<Readiness>,
    started: AtomicBool,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field(
                "providers",
                &self.providers.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// Checks the settings and builds the authenticator. Key sets are not fetched
    /// until [`JwtAuthenticator::start`] (or the first token that needs them).
    pub fn new(settings: JwtSettings) -> Result<Arc<Self>, JwtConfigError> {
        if settings.providers.is_empty() {
            return Err(JwtConfigError::NoProviders);
        }
        let single = settings.providers.len() == 1 && settings.providers[0].issuer.is_none();
        if !single {
            for (i, p) in settings.providers.iter().enumerate() {
                let Some(issuer) = &p.issuer else {
                    return Err(JwtConfigError::IssuerRequired {
                        provider: p.name.clone(),
                    });
                };
                if let Some(other) = settings.providers[..i]
                    .iter()
                    .find(|o| o.issuer.as_ref() == Some(issuer))
                {
                    return Err(JwtConfigError::DuplicateIssuer {
                        first: other.name.clone(),
                        second: p.name.clone(),
                    });
                }
            }
        }
        let leeway_secs = settings.leeway.as_secs();
        let mut providers = Vec::with_capacity(settings.providers.len());
        for p in settings.providers {
            providers.push(build_provider(p, leeway_secs)?);
        }
        let sources: Vec<Arc<JwksSource>> = providers
            .iter()
            .filter_map(|p| match &p.keys {
                ProviderKeys::Jwks(s) => Some(s.clone()),
                ProviderKeys::Static(_) => None,
            })
            .collect();
        let (tx, _) = watch::channel(sources.is_empty());
        let cache = (settings.cache_capacity > 0).then(|| {
            Cache::builder()
                .max_capacity(settings.cache_capacity)
                .expire_after(TokenExpiry)
                .build()
        });
        Ok(Arc::new(JwtAuthenticator {
            providers,
            single,
            leeway_secs,
            max_lifetime_secs: settings.max_lifetime.map(|d| d.as_secs()),
            claims: settings.claims,
            cache,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            readiness: Arc::new(Readiness { sources, tx }),
            started: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        }))
    }

    /// Fetches every key set once (a failure is logged, not returned) and starts the
    /// refresh tasks. The tasks stop when the authenticator is dropped or
    /// [`JwtAuthenticator::shutdown`] is called. Calling it again does nothing.
    pub async fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let sources = self.readiness.sources.clone();
        let results = futures_util::future::join_all(
            sources.iter().map(|s| async move { s.refresh().await }),
        )
        .await;
        let mut handles = Vec::with_capacity(sources.len());
        for (source, ok) in sources.into_iter().zip(results) {
            if !source.has_fresh_keys() {
                tracing::warn!(
                    provider = source.name(),
                    "no usable key yet; tokens of this provider are refused until a fetch succeeds"
                );
            }
            let readiness = self.readiness.clone();
            let handle = source.spawn_refresher(ok, move || {
                readiness.update();
            });
            handles.push(handle.abort_handle());
        }
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(handles);
        self.readiness.update();
    }

    /// Stops the refresh tasks (the keys fetched so far stay in use).
    pub fn shutdown(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }

    /// Whether every key set provider has a usable key (secret and PEM providers
    /// always do).
    pub fn ready(&self) -> bool {
        self.readiness.update()
    }

    /// Watches [`JwtAuthenticator::ready`], for the health service. Updated after
    /// every key set fetch and when keys become stale.
    pub fn subscribe_ready(&self) -> watch::Receiver<bool> {
        self.readiness.update();
        self.readiness.tx.subscribe()
    }

    /// Sets the gauges of every JWKS provider (key count, age of the keys).
    pub fn sample_metrics(&self) {
        for source in &self.readiness.sources {
            source.sample_metrics();
        }
    }

    /// Cache hits and misses so far.
    pub fn cache_stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Verifies a token (without the `Bearer ` prefix) and returns who it identifies.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let Some(cache) = &self.cache else {
            return self.verify(token).await.map(|(identity, _)| identity);
        };
        self.cached_entry(cache, token)
            .await
            .map(|entry| entry.identity.clone())
    }

    /// The cache entry for a token: from the cache when still valid, else
    /// verified and cached.
    async fn cached_entry(
        &self,
        cache: &Cache<[u8; 32], Arc<CachedToken>>,
        token: &str,
    ) -> Result<Arc<CachedToken>, AuthError> {
        let digest = jwks::sha256(token.as_bytes());
        if let Some(entry) = cache.get(&digest) {
            if self.still_valid(&entry) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                crate::metrics::token_cache(true);
                return Ok(entry);
            }
            cache.invalidate(&digest);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        crate::metrics::token_cache(false);
        let (_, entry) = self.verify(token).await?;
        let entry = Arc::new(entry);
        if entry.valid_until > Instant::now() {
            cache.insert(digest, entry.clone());
        }
        Ok(entry)
    }

    /// Like [`JwtAuthenticator::authenticate`], reusing what `slot` (one per
    /// connection) holds when the connection sends the same token again: then
    /// only the expiry and the key's presence in the key set are checked, with
    /// no hashing and no shared-cache lookup. The identity is returned with
    /// `certificate` attached.
    pub async fn authenticate_on_connection(
        &self,
        token: &str,
        slot: &ConnectionToken,
        certificate: Option<&Arc<crate::gate::identity::PeerCertificate>>,
    ) -> Result<Arc<Identity>, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let Some(cache) = &self.cache else {
            let mut identity = self.verify(token).await?.0;
            identity.certificate = certificate.cloned();
            return Ok(Arc::new(identity));
        };
        if let Some(held) = slot.get() {
            if *held.token == *token && self.still_valid(&held.entry) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                crate::metrics::token_cache(true);
                return Ok(held.identity.clone());
            }
        }
        let entry = self.cached_entry(cache, token).await?;
        let mut identity = entry.identity.clone();
        identity.certificate = certificate.cloned();
        let identity = Arc::new(identity);
        slot.set(Arc::new(HeldToken {
            token: token.into(),
            entry,
            identity: identity.clone(),
        }));
        Ok(identity)
    }

    /// Whether a cached token may still be accepted: not expired, and its key still
    /// in the provider's key set.
    fn still_valid(&self, entry: &CachedToken) -> bool {
        let now = Instant::now();
        if entry.valid_until <= now {
            return false;
        }
        match (&self.providers[entry.provider].keys, &entry.key) {
            (ProviderKeys::Static(_), KeyRef::Static) => true,
            (ProviderKeys::Jwks(source), KeyRef::Jwks(fingerprint)) => {
                source.contains_fresh(fingerprint, now)
            }
            _ => false,
        }
    }

    async fn verify(&self, token: &str) -> Result<(Identity, CachedToken), AuthError> {
        let parts = split_token(token)?;
        let header: RawHeader = decode_part(parts.header)?;
        match &header.crit {
            None => {}
            Some(Value::Array(list)) if list.is_empty() => return Err(AuthError::Malformed),
            Some(_) => return Err(AuthError::CriticalHeader),
        }
        let alg = Algorithm::from_str(&header.alg).map_err(|_| AuthError::AlgorithmNotAllowed)?;
        let kid = header.kid.as_deref();
        if kid.is_some_and(|k| k.len() > jwks::MAX_KID_BYTES) {
            return Err(AuthError::KidTooLong);
        }

        let index = self.select_provider(parts.payload)?;
        let provider = &self.providers[index];
        if !provider.algorithms.contains(alg) {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        let Some(validation) = provider
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
        else {
            return Err(AuthError::AlgorithmNotAllowed);
        };

        let candidates = match &provider.keys {
            ProviderKeys::Static(key) => vec![key.clone()],
            ProviderKeys::Jwks(source) => find_keys(source, kid, alg).await?,
        };

        let mut result = Err(AuthError::UnknownKey);
        for key in candidates.iter().take(MAX_CANDIDATE_KEYS) {
            result = jsonwebtoken::decode::<StrictClaims>(token, &key.key, validation)
                .map(|data| (data.claims.0, key))
                .map_err(|e| AuthError::from_library(&e));
            if !matches!(result, Err(AuthError::BadSignature)) {
                break;
            }
        }
        let (claims, key) = match result {
            Ok(found) => found,
            Err(error) => {
                tracing::debug!(provider = %provider.name, reason = %error, "token refused");
                return Err(error);
            }
        };

        let exp = self.check_claims(provider, &claims)?;
        let remaining = exp.saturating_sub(jsonwebtoken::get_current_timestamp());
        let valid_until = Instant::now() + Duration::from_secs(remaining).min(MAX_CACHE_TTL);
        let identity = self.identity(provider, claims);
        let entry = CachedToken {
            identity: identity.clone(),
            provider: index,
            key: match &provider.keys {
                ProviderKeys::Static(_) => KeyRef::Static,
                ProviderKeys::Jwks(_) => KeyRef::Jwks(key.fingerprint),
            },
            valid_until,
        };
        Ok((identity, entry))
    }

    fn select_provider(&self, payload: &str) -> Result<usize, AuthError> {
        if self.single {
            return Ok(0);
        }
        // Unverified: only to choose the provider; the issuer is verified after the
        // signature, by the provider's Validation.
        let unverified: IssuerOnly = decode_part(payload)?;
        let issuer = unverified.iss.ok_or(AuthError::MissingIssuer)?;
        self.providers
            .iter()
            .position(|p| p.issuer.as_deref() == Some(issuer.as_str()))
            .ok_or(AuthError::UnknownIssuer)
    }

    /// The checks the library does not do. Returns `exp`.
    fn check_claims(
        &self,
        provider: &Provider,
        claims: &Map<String, Value>,
    ) -> Result<u64, AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        let exp = numeric_claim(claims, "exp")?.ok_or(AuthError::NoExpiry)?;
        let iat = numeric_claim(claims, "iat")?;
        let nbf = numeric_claim(claims, "nbf")?;
        if iat.is_some_and(|iat| iat > now.saturating_add(self.leeway_secs)) {
            return Err(AuthError::IssuedInFuture);
        }
        if let Some(max) = self.max_lifetime_secs {
            let start = iat.or(nbf).unwrap_or(now);
            if exp.saturating_sub(start) > max {
                return Err(AuthError::LifetimeExceeded);
            }
        }
        if let Some(issuer) = &provider.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
                return Err(AuthError::IssuerMismatch);
            }
        }
        Ok(exp)
    }

    fn identity(&self, provider: &Provider, claims: Map<String, Value>) -> Identity {
        identity_from_claims(
            &self.claims,
            claims,
            provider.audiences.first().map(String::as_str),
        )
    }
}

/// The identity that (verified) claims give under a claim mapping: for each field the
/// first mapped claim present wins (see [`ClaimMapping`]); `default_workflow` (the
/// provider's first configured audience) is the workflow when no workflow claim is
/// present. The method is [`AuthMethod::Jwt`]; it has no certificate.
pub fn identity_from_claims(
    mapping: &ClaimMapping,
    claims: Map<String, Value>,
    default_workflow: Option<&str>,
) -> Identity {
    let actor = first_claim(&claims, &mapping.actor);
    let subject = first_claim(&claims, &mapping.subject);
    let workflow =
        first_claim(&claims, &mapping.workflow).or_else(|| default_workflow.map(str::to_owned));
    Identity {
        method: AuthMethod::Jwt,
        actor,
        subject,
        workflow,
        claims: Arc::new(claims),
        certificate: None,
    }
}

impl Drop for JwtAuthenticator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Finds the keys of a key set that may verify a token, refetching once if the
/// `kid` is unknown (waiting out the refetch hold-off if need be, so that a
/// new key is found) or the set is empty (not waiting: the key server is
/// down, and the periodic refresh retries).
async fn find_keys(
    source: &Arc<JwksSource>,
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<Vec<Arc<VerifyKey>>, AuthError> {
    let mut refetched = false;
    loop {
        let selection = source.current().select(kid, alg, Instant::now());
        let (error, wait) = match selection {
            Selection::Found(keys) => return Ok(keys),
            Selection::AlgorithmMismatch => return Err(AuthError::KeyAlgorithmMismatch),
            Selection::Ambiguous => return Err(AuthError::AmbiguousKey),
            Selection::NoKeyForAlgorithm => return Err(AuthError::UnknownKey),
            Selection::UnknownKid => (AuthError::UnknownKey, true),
            Selection::NoKeys => (AuthError::NoKeys, false),
        };
        if refetched || !source.refetch_on_demand(wait).await {
            return Err(error);
        }
        refetched = true;
    }
}

fn build_provider(p: ProviderSettings, leeway_secs: u64) -> Result<Provider, JwtConfigError> {
    let name = p.name;
    let mut algorithms: Vec<Algorithm> = Vec::new();
    for alg in p.algorithms {
        if !algorithms.contains(&alg) {
            algorithms.push(alg);
        }
    }
    if algorithms.is_empty() {
        return Err(JwtConfigError::NoAlgorithms { provider: name });
    }
    let Some(alg_set) = AlgSet::from_slice(&algorithms) else {
        let algorithm = algorithms
            .iter()
            .copied()
            .find(|a| AlgSet::from_slice(&[*a]).is_none())
            .unwrap_or_default();
        return Err(JwtConfigError::UnsupportedAlgorithm {
            provider: name,
            algorithm,
        });
    };
    let mismatch = |algorithm: Algorithm, key: &'static str| JwtConfigError::AlgorithmKeyMismatch {
        provider: name.clone(),
        algorithm,
        key,
    };

    let keys = match p.key {
        KeySource::Secret(secret) => {
            if let Some(alg) = algorithms
                .iter()
                .find(|a| a.family() != AlgorithmFamily::Hmac)
            {
                return Err(mismatch(
                    *alg,
                    "a shared secret (use a public key or a key set)",
                ));
            }
            if secret.is_empty() {
                return Err(JwtConfigError::EmptySecret { provider: name });
            }
            let (algorithm, minimum) = algorithms
                .iter()
                .map(|a| (*a, hmac_minimum(*a)))
                .max_by_key(|(_, m)| *m)
                .unwrap_or((Algorithm::HS256, 32));
            if secret.len() < minimum {
                if !p.allow_weak_secret {
                    return Err(JwtConfigError::WeakSecret {
                        provider: name,
                        algorithm,
                        length: secret.len(),
                        minimum,
                    });
                }
                tracing::warn!(
                    provider = %name,
                    length = secret.len(),
                    minimum,
                    "HMAC secret shorter than the hash output, accepted because allow-weak-secret is set"
                );
            }
            ProviderKeys::Static(Arc::new(VerifyKey {
                kid: None,
                algorithms: alg_set,
                key: DecodingKey::from_secret(&secret),
                fingerprint: [0; 32],
            }))
        }
        KeySource::PublicKeyPem(pem) => {
            let family = algorithms[0].family();
            if let Some(alg) = algorithms
                .iter()
                .find(|a| a.family() == AlgorithmFamily::Hmac || a.family() != family)
            {
                return Err(mismatch(
                    *alg,
                    "this public key (HMAC needs a shared secret; one PEM key serves one family)",
                ));
            }
            let key = public_key_from_pem(&pem, family, &algorithms).map_err(|reason| {
                JwtConfigError::BadPublicKey {
                    provider: name.clone(),
                    reason,
                }
            })?;
            jwks::check_rsa_key(&key).map_err(|source| match source {
                jwks::RsaKeyError::Malformed => JwtConfigError::BadPublicKey {
                    provider: name.clone(),
                    reason: "not a readable RSA public key",
                },
                source => JwtConfigError::RsaKeySize {
                    provider: name.clone(),
                    source,
                },
            })?;
            ProviderKeys::Static(Arc::new(VerifyKey {
                kid: None,
                algorithms: alg_set,
                key,
                fingerprint: [0; 32],
            }))
        }
        KeySource::Jwks(settings) => {
            if let Some(alg) = algorithms
                .iter()
                .find(|a| a.family() == AlgorithmFamily::Hmac)
            {
                return Err(mismatch(*alg, "a key set (HMAC needs a shared secret)"));
            }
            let source = JwksSource::new(&name, settings, alg_set).map_err(|source| {
                JwtConfigError::Jwks {
                    provider: name.clone(),
                    source,
                }
            })?;
            ProviderKeys::Jwks(Arc::new(source))
        }
    };

    if p.issuer.is_some() && p.audiences.is_empty() {
        tracing::warn!(
            provider = %name,
            "no audience configured: tokens of this issuer for any audience are accepted"
        );
    }
    let validations = algorithms
        .iter()
        .map(|alg| {
            (
                *alg,
                build_validation(*alg, p.issuer.as_deref(), &p.audiences, leeway_secs),
            )
        })
        .collect();
    Ok(Provider {
        name,
        issuer: p.issuer,
        audiences: p.audiences,
        algorithms: alg_set,
        validations,
        keys,
    })
}

/// The Validation for one (provider, algorithm): built from the configuration only.
fn build_validation(
    alg: Algorithm,
    issuer: Option<&str>,
    audiences: &[String],
    leeway_secs: u64,
) -> Validation {
    let mut validation = Validation::new(alg);
    validation.algorithms = vec![alg];
    validation.leeway = leeway_secs;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required: HashSet<String> = HashSet::from(["exp".to_owned()]);
    if let Some(issuer) = issuer {
        validation.set_issuer(&[issuer]);
        required.insert("iss".to_owned());
    }
    if audiences.is_empty() {
        validation.validate_aud = false;
        validation.aud = None;
    } else {
        validation.validate_aud = true;
        validation.set_audience(audiences);
        required.insert("aud".to_owned());
    }
    validation.required_spec_claims = required;
    validation
}

fn hmac_minimum(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

/// Checks the size of the RSA key in a PEM, so that the config can refuse
/// it with the file and key path. A PEM that holds no RSA public key passes:
/// it is refused when the authenticator is built.
pub fn check_rsa_pem_size(pem: &[u8]) -> Result<(), jwks::RsaKeyError> {
    match DecodingKey::from_rsa_pem(pem) {
        Ok(key) => match jwks::check_rsa_key(&key) {
            Err(jwks::RsaKeyError::Malformed) => Ok(()),
            other => other,
        },
        Err(_) => Ok(()),
    }
}

fn public_key_from_pem(
    pem: &[u8],
    family: AlgorithmFamily,
    algorithms: &[Algorithm],
) -> Result<DecodingKey, &'static str> {
    let text = std::str::from_utf8(pem).map_err(|_| "not PEM text")?;
    if text.contains("PRIVATE KEY-----") {
        return Err("a private key was given; configure the public key");
    }
    let key = match family {
        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
        AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem),
        AlgorithmFamily::Hmac => return Err("HMAC needs a shared secret"),
    }
    .map_err(|_| "not a public key PEM of the algorithms' family")?;
    if family == AlgorithmFamily::Ec {
        let length = key.try_get_as_bytes().map(<[u8]>::len).unwrap_or(0);
        for alg in algorithms {
            let expected = if *alg == Algorithm::ES384 { 97 } else { 65 };
            if length != expected {
                return Err("the elliptic curve does not match the algorithm");
            }
        }
    }
    Ok(key)
}

/// The header and payload of a compact JWS (the signature is left to the library).
struct Parts<'a> {
    header: &'a str,
    payload: &'a str,
}

/// The bytes of a compact JWS: the base64url alphabet and `.`.
static TOKEN_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.';
        i += 1;
    }
    table
};

fn split_token(token: &str) -> Result<Parts<'_>, AuthError> {
    if !token.bytes().all(|b| TOKEN_BYTES[usize::from(b)]) {
        return Err(AuthError::Malformed);
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(payload), Some(signature), None)
            if !header.is_empty() && !payload.is_empty() && !signature.is_empty() =>
        {
            Ok(Parts { header, payload })
        }
        _ => Err(AuthError::Malformed),
    }
}

/// Decodes one base64url part as JSON.
fn decode_part<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| AuthError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)
}

/// The header fields this module reads. A duplicated field is an error; `jku`,
/// `x5u`, `jwk` and `x5c` are deliberately not read.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

/// The unverified issuer, to choose the provider.
#[derive(Deserialize)]
struct IssuerOnly {
    #[serde(default)]
    iss: Option<String>,
}

/// A numeric claim as whole seconds: absent is `None`, another type is an error.
fn numeric_claim(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<u64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                        Ok(Some(f.round() as u64))
                    }
                    _ => Err(AuthError::InvalidClaim(name)),
                }
            }
        }
        Some(_) => Err(AuthError::InvalidClaim(name)),
    }
}

fn first_claim(claims: &Map<String, Value>, names: &[String]) -> Option<String> {
    names
        .iter()
        .find_map(|name| claims.get(name).and_then(claim_text))
}

/// A claim as identity text: strings as they are, numbers and booleans as JSON text,
/// an object by its `sub` (RFC 8693 `act`), a list by its first element.
fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Object(map) => map.get("sub").and_then(Value::as_str).map(str::to_owned),
        Value::Array(items) => items.first().and_then(|first| match first {
            Value::String(s) => Some(s.clone()),
            Value::Bool(_) | Value::Number(_) => Some(first.to_string()),
            _ => None,
        }),
        Value::Null => None,
    }
}

/// The token's claims, refusing duplicate member names at any depth (RFC 7519 lets a
/// parser refuse them; two parsers picking different duplicates is a classic bypass).
struct StrictClaims(Map<String, Value>);

impl<'de> Deserialize<'de> for StrictClaims {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match deserializer.deserialize_any(StrictVisitor)? {
            Value::Object(map) => Ok(StrictClaims(map)),
            _ => Err(de::Error::custom("the claims are not a JSON object")),
        }
    }
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("not a finite number"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(StrictVisitor)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            let StrictValue(value) = access.next_value()?;
            if map.insert(key, value).is_some() {
                return Err(de::Error::custom("duplicate member name"));
            }
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_claims_refuse_duplicates() {
        let ok: StrictClaims =
            serde_json::from_str(r#"{"a":1,"b":{"c":[1,2,{"d":null}]}}"#).unwrap();
        assert_eq!(ok.0.len(), 2);
        assert!(serde_json::from_str::<StrictClaims>(r#"{"a":1,"a":2}"#).is_err());
        assert!(serde_json::from_str::<StrictClaims>(r#"{"a":{"b":1,"b":2}}"#).is_err());
        assert!(serde_json::from_str::<StrictClaims>(r#"[1]"#).is_err());
        assert!(serde_json::from_str::<StrictClaims>(r#""x""#).is_err());
    }

    #[test]
    fn claim_texts() {
        assert_eq!(claim_text(&serde_json::json!("x")).as_deref(), Some("x"));
        assert_eq!(
            claim_text(&serde_json::json!(true)).as_deref(),
            Some("true")
        );
        assert_eq!(claim_text(&serde_json::json!(42)).as_deref(), Some("42"));
        assert_eq!(
            claim_text(&serde_json::json!({"sub": "svc", "act": {"sub": "older"}})).as_deref(),
            Some("svc")
        );
        assert_eq!(
            claim_text(&serde_json::json!(["a", "b"])).as_deref(),
            Some("a")
        );
        assert_eq!(claim_text(&serde_json::json!([])), None);
        assert_eq!(claim_text(&serde_json::json!(null)), None);
    }

    #[test]
    fn numeric_claims() {
        let claims = serde_json::json!({"a": 5, "b": 5.4, "c": "5", "d": -1, "e": 1e300});
        let Value::Object(map) = claims else {
            unreachable!()
        };
        assert_eq!(numeric_claim(&map, "a"), Ok(Some(5)));
        assert_eq!(numeric_claim(&map, "b"), Ok(Some(5)));
        assert_eq!(numeric_claim(&map, "x"), Ok(None));
        assert!(numeric_claim(&map, "c").is_err());
        assert!(numeric_claim(&map, "d").is_err());
        assert!(numeric_claim(&map, "e").is_err());
    }

    #[test]
    fn split() {
        assert!(split_token("a.b.c").is_ok());
        for bad in [
            "",
            "a",
            "a.b",
            "a.b.c.d",
            "a.b.c.d.e",
            "a..c",
            ".b.c",
            "a.b.",
            "a.b.c=",
            "a b.c.d",
            "é.b.c",
        ] {
            assert!(split_token(bad).is_err(), "{bad}");
        }
    }
}
