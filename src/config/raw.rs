//! The config document as written: serde types that refuse unknown keys and
//! wrong types. [`super::Config::from_raw`] turns them into the validated model.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Top-level keys of a full BuildGrid config that describe BuildGrid's own
/// services; gridgate declares its services under `instances:` instead.
pub(super) const BUILDGRID_SERVICE_KEYS: [&str; 9] = [
    "storages",
    "caches",
    "schedulers",
    "connections",
    "clients",
    "services",
    "cleanup",
    "sentry",
    "limiter",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawConfig {
    pub description: Option<String>,
    #[serde(default)]
    pub server: Vec<RawChannel>,
    pub authorization: Option<RawAuthorization>,
    pub monitoring: Option<RawMonitoring>,
    pub server_reflection: Option<bool>,
    pub grpc_compression: Option<String>,
    pub thread_pool_size: Option<u64>,
    pub grpc_server_options: Option<BTreeMap<String, serde_yaml_ng::Value>>,
    #[serde(default)]
    pub instances: Vec<RawInstance>,
    pub build_events: Option<RawBuildEvents>,
    pub limits: Option<RawLimits>,
    pub metrics: Option<RawMetrics>,
    pub web: Option<RawWeb>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawMetrics {
    pub address: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawChannel {
    pub address: Option<String>,
    pub port: Option<u16>,
    pub insecure_mode: Option<bool>,
    pub credentials: Option<RawCredentials>,
    #[serde(default)]
    pub allow_open: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawCredentials {
    pub tls_server_key: Option<String>,
    pub tls_server_cert: Option<String>,
    pub tls_client_certs: Option<String>,
}

impl RawCredentials {
    /// BuildGrid's reference config writes every key as `null` for plaintext.
    pub(super) fn is_empty(&self) -> bool {
        self.tls_server_key.is_none()
            && self.tls_server_cert.is_none()
            && self.tls_client_certs.is_none()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawAuthorization {
    pub method: String,
    // BuildGrid's keys.
    pub secret: Option<String>,
    pub jwks_url: Option<OneOrMany>,
    pub audience: Option<OneOrMany>,
    pub jwks_fetch_minutes: Option<u64>,
    pub algorithm: Option<String>,
    pub acl_config: Option<String>,
    pub allow_unauthenticated_instances: Option<Vec<String>>,
    pub allow_unauthorized_instances: Option<Vec<String>>,
    pub allow_localhost_requests: Option<bool>,
    // gridgate's additions.
    pub issuer: Option<String>,
    pub providers: Option<Vec<RawProvider>>,
    pub allow_weak_secret: Option<bool>,
    pub leeway_seconds: Option<u64>,
    pub max_token_lifetime_minutes: Option<u64>,
    pub jwks_max_staleness_minutes: Option<u64>,
    pub jwks_refetch_min_seconds: Option<u64>,
    pub token_cache_size: Option<u64>,
    pub claims: Option<RawClaims>,
    pub acl_match: Option<String>,
    pub open_health: Option<bool>,
    pub open_reflection: Option<bool>,
    pub watch_policy: Option<bool>,
    pub jwks_required_at_start: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawProvider {
    pub issuer: Option<String>,
    pub secret: Option<String>,
    pub jwks_url: Option<OneOrMany>,
    pub audience: Option<OneOrMany>,
    pub algorithm: Option<String>,
    pub jwks_fetch_minutes: Option<u64>,
    pub jwks_max_staleness_minutes: Option<u64>,
    pub jwks_refetch_min_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawClaims {
    pub actor: Option<OneOrMany>,
    pub subject: Option<OneOrMany>,
    pub workflow: Option<OneOrMany>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawMonitoring {
    pub enabled: Option<bool>,
    pub endpoint_type: Option<String>,
    pub endpoint_location: Option<String>,
    pub serialization_format: Option<String>,
    pub metric_prefix: Option<String>,
    pub tag_format: Option<String>,
    pub additional_tags: Option<BTreeMap<String, String>>,
    pub period_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawInstance {
    pub name: String,
    pub description: Option<String>,
    pub cas: Option<RawCas>,
    pub action_cache: Option<RawActionCache>,
    pub upstream: Option<RawUpstream>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawCas {
    pub backend: String,
    pub path: Option<String>,
    pub max_bytes: Option<Size>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawActionCache {
    pub allow_updates: Option<bool>,
    pub max_entries: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawUpstream {
    pub address: String,
    pub tls_ca: Option<String>,
    pub tls_client_cert: Option<String>,
    pub tls_client_key: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub instance_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawBuildEvents {
    pub store: Option<RawStore>,
    pub max_bytes: Option<Size>,
    pub max_event_bytes: Option<Size>,
    pub retention: Option<RawRetention>,
}

/// `build-events.retention`: ages like `30d`, `12h`, or `none`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawRetention {
    pub max_age: Option<String>,
    pub abandoned_after: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawLimits {
    pub shutdown_grace_seconds: Option<u64>,
    pub tls_handshake_timeout_seconds: Option<u64>,
    pub max_concurrent_streams: Option<u32>,
    pub max_header_list_bytes: Option<u32>,
    pub max_frame_bytes: Option<u32>,
    pub keepalive_interval_seconds: Option<u64>,
    pub keepalive_timeout_seconds: Option<u64>,
    pub max_message_bytes: Option<usize>,
    pub max_concurrent_requests: Option<usize>,
    pub max_connections: Option<usize>,
    pub first_message_timeout_seconds: Option<u64>,
    pub idle_connection_timeout_seconds: Option<u64>,
    pub max_pending_bytes: Option<Size>,
    pub max_pending_bytes_per_connection: Option<Size>,
    pub anonymous_share_percent: Option<u8>,
    pub max_instance_name_bytes: Option<usize>,
}

/// A string or a list of strings (BuildGrid's `audience`, `jwks-url`).
#[derive(Debug, Clone)]
pub(super) struct OneOrMany(pub Vec<String>);

impl OneOrMany {
    pub(super) fn into_vec(self) -> Vec<String> {
        self.0
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A byte size: an integer, or a string with a unit as BuildGrid writes them
/// (`2048M`, `1G`, `512k`, `10GiB`, `1.5G`).
#[derive(Debug, Clone)]
pub(super) enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    pub(super) fn bytes(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(t) => parse_size(t),
        }
    }
}

/// Parses `2048M`, `1G`, `10GiB`, `512kb`, `4096` into bytes (binary units).
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("ib")
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 1073741824, 2048M, 1G)"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("{text:?} is not a size"));
    }
    let bytes = value * mult as f64;
    if bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes as u64)
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte count or a size such as 2048M or 1G")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size::Bytes(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size::Bytes)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map_err(E::custom)?;
                Ok(Size::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `store: memory`, `store: { file: PATH }` or `store: { postgres: URL }`.
#[derive(Debug, Clone)]
pub(super) enum RawStore {
    Name(String),
    File { file: String },
    Postgres { postgres: String },
}

impl<'de> Deserialize<'de> for RawStore {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawStore;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("memory, { file: PATH } or { postgres: URL }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawStore, E> {
                Ok(RawStore::Name(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawStore, A::Error> {
                let Some(key) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "expected { file: PATH } or { postgres: URL }",
                    ));
                };
                let value: String = map.next_value()?;
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom("give exactly one store"));
                }
                match key.as_str() {
                    "file" => Ok(RawStore::File { file: value }),
                    "postgres" => Ok(RawStore::Postgres { postgres: value }),
                    other => Err(de::Error::unknown_field(other, &["file", "postgres"])),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `web:`: the listener of the invocation pages and the JSON API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawWeb {
    pub address: Option<String>,
    pub insecure_mode: Option<bool>,
    pub credentials: Option<RawCredentials>,
    #[serde(default)]
    pub allow_open: bool,
    pub client_certificates: Option<String>,
    pub public_url: Option<String>,
    pub session_key_file: Option<String>,
    pub oidc: Option<RawOidc>,
}

/// `web.oidc:`: sign-in with an OpenID provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawOidc {
    pub issuer: String,
    pub client_id: String,
    pub client_secret_file: Option<String>,
    pub scopes: Option<OneOrMany>,
    pub claims: Option<RawClaims>,
}
