//! The verifier's settings: providers, their keys, the claim mapping.

use super::*;

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
