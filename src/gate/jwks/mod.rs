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

mod keys;
mod source;

pub use keys::*;
pub use source::*;

#[cfg(test)]
mod tests;
