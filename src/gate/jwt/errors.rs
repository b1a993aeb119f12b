//! Why settings are refused ([`JwtConfigError`]) and why a token is ([`AuthError`]).

use super::*;

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

    pub(super) fn from_library(error: &jsonwebtoken::errors::Error) -> AuthError {
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
