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
//! The files: `settings` (what is configured), `errors`, `token` (the compact
//! form and its header), `providers` (one issuer each: keys and pre-built
//! validations), `verifier` ([`JwtAuthenticator`]), `cache` (verified tokens per
//! connection and by digest) and `claims` (strict parsing, the identity mapping).
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

mod cache;
mod claims;
mod errors;
mod providers;
mod settings;
mod token;
mod verifier;

pub use cache::*;
pub use claims::*;
pub use errors::*;
pub use providers::*;
pub use settings::*;
use token::*;
pub use verifier::*;

#[cfg(test)]
mod tests;
