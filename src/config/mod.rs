//! The configuration model: a YAML file whose `server:`, `authorization:`,
//! `monitoring:`, `server-reflection` and `grpc-compression` sections take
//! BuildGrid's own keys, plus gridgate's `instances:`, `build-events:` and
//! `limits:`.
//!
//! Loading happens in two steps. The document is parsed and BuildGrid's tags are
//! resolved ([`yaml`]), then deserialized into the `Raw*` types, which refuse
//! unknown keys and wrong types with the key path at fault. [`Config::from_raw`]
//! then checks what types cannot (files exist, addresses parse, settings that
//! contradict each other) and produces the validated [`Config`]. Relative paths
//! are taken from the directory of the config file.
//!
//! Every error is a [`ConfigError`] that names the file, the key path and the
//! reason, e.g. `gridgate.yaml: server[0].credentials.tls-server-key: cannot
//! read certs/server.key: No such file or directory`.

mod raw;
pub mod yaml;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use raw::*;

/// The config `gridgate serve` runs when no `--config` is given: plaintext on
/// loopback, authorization `none`, in-memory stores.
pub const DEFAULT_CONFIG: &str = include_str!("default.yaml");

/// The name shown for the embedded default config in messages.
pub const DEFAULT_CONFIG_NAME: &str = "<embedded default config>";

/// A configuration error: which file, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file (or `<embedded default config>`).
    pub file: String,
    /// The key path, e.g. `server[0].credentials.tls-server-cert`; empty for the whole document.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A validated gridgate configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was loaded from.
    pub source: String,
    /// BuildGrid's free-text `description`.
    pub description: Option<String>,
    /// The listening channels (BuildGrid's `server:` list).
    pub channels: Vec<ChannelConfig>,
    /// Who may call, and what (BuildGrid's `authorization:`).
    pub authorization: AuthorizationConfig,
    /// BuildGrid's `monitoring:` section.
    pub monitoring: MonitoringConfig,
    /// Whether gRPC server reflection is served.
    pub server_reflection: bool,
    /// The compression used for responses when the client accepts it.
    pub compression: Compression,
    /// The instances served behind the gate.
    pub instances: Vec<InstanceConfig>,
    /// The Build Event Service store.
    pub build_events: BuildEventsConfig,
    /// Limits of the Build Event Service that apply to every store.
    pub build_events_limits: BuildEventsLimits,
    /// Connection and request limits.
    pub limits: LimitsConfig,
    /// The Prometheus endpoint (`metrics: { address: ... }`), off when `None`.
    pub metrics: Option<MetricsEndpointConfig>,
    /// Things a BuildGrid config carries that gridgate accepts but does not use,
    /// as (key path, note) pairs; logged as warnings at start.
    pub ignored: Vec<(String, String)>,
}

/// One listening channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelConfig {
    /// The address as written.
    pub address: String,
    /// Where to listen.
    pub listen: ListenAddr,
    /// TLS settings; `None` means plaintext.
    pub tls: Option<TlsConfig>,
    /// `allow-open: true`: this non-loopback channel may serve with authorization `none`.
    pub allow_open: bool,
}

/// A listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address (port 0 means any free port).
    Tcp(SocketAddr),
    /// A Unix domain socket path.
    Unix(PathBuf),
}

impl ListenAddr {
    /// Whether only this machine can connect (loopback TCP or a Unix socket).
    pub fn is_local(&self) -> bool {
        match self {
            ListenAddr::Tcp(addr) => addr.ip().is_loopback(),
            ListenAddr::Unix(_) => true,
        }
    }
}

/// TLS for one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM CA bundle client certificates must chain to; when set, client
    /// certificates are required and verified at the handshake.
    pub client_ca: Option<PathBuf>,
}

/// How callers are identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// Nobody is identified; every call is allowed.
    None,
    /// A JSON Web Token in the `authorization: Bearer` header.
    Jwt,
    /// `x-request-actor` / `-subject` / `-workflow` headers from a trusted proxy.
    Headers,
}

/// The `authorization:` section.
#[derive(Debug, Clone)]
pub struct AuthorizationConfig {
    /// The method.
    pub method: AuthMethod,
    /// JWT settings (with `method: jwt`).
    pub jwt: Option<JwtConfig>,
    /// A BuildGrid ACL file or a directory of per-team files.
    pub acl_config: Option<PathBuf>,
    /// How ACL patterns match a value.
    pub acl_match: AclMatch,
    /// Instances callers may use without credentials (ACLs still apply).
    pub allow_unauthenticated_instances: Vec<String>,
    /// Loopback and Unix-socket peers need no credentials (ACLs still apply).
    pub allow_localhost_requests: bool,
    /// Health checks pass without credentials.
    pub open_health: bool,
    /// Server reflection passes without credentials.
    pub open_reflection: bool,
    /// Watch the ACL files and reload them when they change.
    pub watch_policy: bool,
    /// Refuse to start when a JWKS provider has no usable key after the first
    /// fetch (otherwise: start, report NOT_SERVING and refuse tokens until
    /// keys arrive).
    pub jwks_required_at_start: bool,
}

/// How ACL regexes match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclMatch {
    /// The pattern must match the whole value (gridgate's default).
    Whole,
    /// The pattern must match at the start, like BuildGrid's `re.match`.
    Prefix,
}

/// JWT validation settings.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    /// One provider per issuer (BuildGrid's flat keys make one provider).
    pub providers: Vec<JwtProviderConfig>,
    /// Clock-skew leeway for `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Refuse tokens that live longer than this.
    pub max_token_lifetime: Option<Duration>,
    /// Validated tokens kept in the cache.
    pub token_cache_size: u64,
    /// Which claims make the actor, subject and workflow.
    pub claims: ClaimsConfig,
}

/// Claims that make the BuildGrid identity fields; the first present wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimsConfig {
    /// Default `[act, sub]`.
    pub actor: Vec<String>,
    /// Default `[sub]`.
    pub subject: Vec<String>,
    /// Default `[aud]`.
    pub workflow: Vec<String>,
}

impl Default for ClaimsConfig {
    fn default() -> Self {
        ClaimsConfig {
            actor: vec!["act".into(), "sub".into()],
            subject: vec!["sub".into()],
            workflow: vec!["aud".into()],
        }
    }
}

/// One token issuer.
#[derive(Debug, Clone)]
pub struct JwtProviderConfig {
    /// A name for messages (the issuer, or `default`).
    pub name: String,
    /// Only tokens with this `iss` are checked against this provider.
    pub issuer: Option<String>,
    /// Accepted signature algorithms.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Where the verification key comes from.
    pub key: JwtKeyConfig,
    /// Accepted audiences (empty: not checked).
    pub audiences: Vec<String>,
    /// Accept HMAC secrets shorter than the hash output.
    pub allow_weak_secret: bool,
}

/// Where a provider's verification key comes from.
#[derive(Clone)]
pub enum JwtKeyConfig {
    /// An HMAC secret (the file's contents, trimmed, as BuildGrid).
    Secret(Vec<u8>),
    /// A PEM public key (BuildGrid's `secret` with an RS/PS/ES algorithm).
    PublicKeyPem(Vec<u8>),
    /// JWKS URLs.
    Jwks {
        /// One or more URLs whose keys are merged.
        urls: Vec<String>,
        /// How often they are fetched again.
        refresh: Duration,
        /// Keys older than this (since the last good fetch) are dropped.
        max_staleness: Option<Duration>,
        /// At most one refetch for an unknown `kid` in this interval.
        min_refetch_interval: Duration,
    },
}

impl fmt::Debug for JwtKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwtKeyConfig::Secret(s) => write!(f, "Secret([{} bytes redacted])", s.len()),
            JwtKeyConfig::PublicKeyPem(p) => write!(f, "PublicKeyPem([{} bytes])", p.len()),
            JwtKeyConfig::Jwks {
                urls,
                refresh,
                max_staleness,
                min_refetch_interval,
            } => f
                .debug_struct("Jwks")
                .field("urls", urls)
                .field("refresh", refresh)
                .field("max_staleness", max_staleness)
                .field("min_refetch_interval", min_refetch_interval)
                .finish(),
        }
    }
}

/// gridgate's Prometheus endpoint: `GET /metrics` on its own HTTP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsEndpointConfig {
    /// Where to listen (port 0 picks a free port; the bound address is logged).
    pub address: SocketAddr,
}

/// BuildGrid's `monitoring:` section: metrics pushed as StatsD or JSON lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitoringConfig {
    pub enabled: bool,
    pub endpoint_type: String,
    pub endpoint_location: Option<String>,
    pub serialization_format: String,
    pub metric_prefix: String,
    pub tag_format: String,
    pub additional_tags: BTreeMap<String, String>,
    pub period: Duration,
}

/// Response compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Deflate,
    Zstd,
}

/// One instance behind the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceConfig {
    /// The instance name ("" is the unnamed instance).
    pub name: String,
    pub description: Option<String>,
    /// Served locally, or forwarded.
    pub backend: InstanceBackend,
}

/// Where an instance's requests are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceBackend {
    /// By gridgate's own services.
    Local {
        cas: CasConfig,
        action_cache: ActionCacheConfig,
    },
    /// By an upstream REAPI server.
    Upstream(UpstreamConfig),
}

/// A local CAS store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasConfig {
    Memory { max_bytes: u64 },
    Disk { path: PathBuf, max_bytes: u64 },
}

/// A local action cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionCacheConfig {
    pub allow_updates: bool,
    pub max_entries: u64,
}

/// An upstream REAPI server.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// `grpc://host:port` (plaintext) or `grpcs://host:port` (TLS).
    pub address: String,
    pub tls: bool,
    pub tls_ca: Option<PathBuf>,
    pub tls_client_cert: Option<PathBuf>,
    pub tls_client_key: Option<PathBuf>,
    /// Static headers sent upstream (e.g. a service token).
    pub headers: BTreeMap<String, String>,
    /// Instance name presented upstream, when it differs.
    pub instance_name: Option<String>,
}

impl UpstreamConfig {
    /// The address as it may be logged or shown: without `user:password@`.
    pub fn shown_address(&self) -> String {
        without_userinfo(&self.address)
    }
}

/// Shows the address without its user-info and the headers without their
/// values: both may hold credentials.
impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("address", &self.shown_address())
            .field("tls", &self.tls)
            .field("tls_ca", &self.tls_ca)
            .field("tls_client_cert", &self.tls_client_cert)
            .field("tls_client_key", &self.tls_client_key)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("instance_name", &self.instance_name)
            .finish()
    }
}

/// An address or URL without the user-info of its authority
/// (`grpc://user:password@host:port` becomes `grpc://host:port`), for every
/// place an address is logged or shown: credentials never leave the config.
pub fn without_userinfo(address: &str) -> String {
    let start = address.find("://").map_or(0, |i| i + 3);
    let rest = &address[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}{}", &address[..start], &rest[at + 1..]),
        None => address.to_string(),
    }
}

/// The Build Event Service store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEventsConfig {
    Memory { max_bytes: u64 },
    File { path: PathBuf },
    Postgres { url: String },
}

/// Limits of the Build Event Service (`build-events:`) that apply to every store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildEventsLimits {
    /// `build-events.max-event-bytes`: the largest single event (an encoded
    /// `OrderedBuildEvent`) accepted; larger ones are INVALID_ARGUMENT.
    pub max_event_bytes: usize,
    /// `build-events.retention.max-age`: streams (and their invocations)
    /// whose last event is older are deleted; None keeps them.
    pub max_age: Option<Duration>,
    /// `build-events.retention.abandoned-after`: an unfinished invocation
    /// silent this long is marked abandoned; None never marks one.
    pub abandoned_after: Option<Duration>,
}

impl Default for BuildEventsLimits {
    fn default() -> Self {
        BuildEventsLimits {
            max_event_bytes: 4 << 20,
            max_age: None,
            abandoned_after: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

/// An age such as `30d`, `12h`, `90m`, `45s` or `2w`; `none` is None.
fn parse_age(text: &str) -> Result<Option<Duration>, String> {
    let t = text.trim();
    if t == "none" {
        return Ok(None);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not an age like 30d, 12h, 90m, 45s or none"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h, d or w")),
    };
    if n == 0 {
        return Err(format!("{text:?} is zero (write none to keep everything)"));
    }
    n.checked_mul(unit_secs)
        .filter(|s| *s <= 100 * 365 * 86_400)
        .map(|s| Some(Duration::from_secs(s)))
        .ok_or_else(|| format!("{text:?} is more than 100 years"))
}

/// The largest HTTP/2 frame gridgate lets a client send, by default. HTTP/2's
/// own default is 16 KiB, which cuts a 1 MiB ByteStream Write message into 64
/// frames, each received, woken for and copied on its own; 256 KiB frames cut
/// that per-frame work by 16 (bench/RESULTS.md, "ByteStream write: larger
/// HTTP/2 frames"). A frame is read whole before it is used, so this is also
/// the most a connection buffers for one incomplete frame; the 1 MiB
/// connection flow-control window bounds the data in flight either way.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 256 * 1024;
/// HTTP/2's bounds for SETTINGS_MAX_FRAME_SIZE (RFC 9113, section 6.5.2).
pub const MIN_FRAME_BYTES: u32 = 16 * 1024;
pub const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;

/// Connection and request limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Grace period for in-flight RPCs on shutdown.
    pub shutdown_grace: Duration,
    /// TLS handshakes slower than this are dropped.
    pub tls_handshake_timeout: Duration,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 header list size (bytes).
    pub max_header_list_size: u32,
    /// Largest HTTP/2 frame a client may send (SETTINGS_MAX_FRAME_SIZE).
    pub max_frame_size: u32,
    /// HTTP/2 keepalive ping interval.
    pub keepalive_interval: Duration,
    /// Close the connection when a keepalive ping is not answered in this time.
    pub keepalive_timeout: Duration,
    /// Largest gRPC message a service decodes.
    pub max_message_bytes: usize,
    /// RPCs in progress (arrival to the end of the response) across all
    /// connections; more are refused at once with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: usize,
    /// Open connections across all channels; more are closed at once.
    pub max_connections: usize,
    /// The first request message (which names the instance) must be whole
    /// within this, else DEADLINE_EXCEEDED: a client trickling bytes cannot
    /// hold a request open before the Gate decided on it.
    pub first_message_timeout: Duration,
    /// A connection with no open stream this long is closed.
    pub idle_connection_timeout: Duration,
    /// Bytes of first messages buffered before the Gate decided, across
    /// all connections; beyond it, RESOURCE_EXHAUSTED at once.
    pub max_pending_bytes: usize,
    /// The same, per connection.
    pub max_pending_bytes_per_connection: usize,
    /// The share (percent) of every request and byte budget that open
    /// routes and anonymous callers may hold together.
    pub anonymous_share_percent: u8,
    /// Longest instance name a request may carry; longer: INVALID_ARGUMENT.
    pub max_instance_name_bytes: usize,
}

impl LimitsConfig {
    /// `anonymous-share-percent` of `n`, at least 1.
    pub fn anonymous_share(&self, n: usize) -> usize {
        (n / 100)
            .saturating_mul(usize::from(self.anonymous_share_percent))
            .saturating_add(n % 100 * usize::from(self.anonymous_share_percent) / 100)
            .max(1)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            shutdown_grace: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            max_concurrent_streams: 1024,
            max_header_list_size: 16 * 1024,
            max_frame_size: DEFAULT_MAX_FRAME_BYTES,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_requests: 10_000,
            max_connections: 10_000,
            first_message_timeout: Duration::from_secs(30),
            idle_connection_timeout: Duration::from_secs(300),
            max_pending_bytes: 256 << 20,
            max_pending_bytes_per_connection: 64 << 20,
            anonymous_share_percent: 25,
            max_instance_name_bytes: 512,
        }
    }
}

impl Config {
    /// Loads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: name.clone(),
            key: String::new(),
            reason: format!("cannot read the config file: {e}"),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Config::parse(&text, &name, base)
    }

    /// The embedded default config.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME, Path::new("."))
    }

    /// Parses and validates a config document; `name` is used in errors and
    /// relative paths are resolved against `base`.
    pub fn parse(text: &str, name: &str, base: &Path) -> Result<Config, ConfigError> {
        let err = |key: String, reason: String| ConfigError {
            file: name.to_string(),
            key,
            reason,
        };
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("line {} column {}: ", l.line(), l.column()))
                .unwrap_or_default();
            err(String::new(), format!("{at}invalid YAML: {e}"))
        })?;
        if doc.is_null() {
            return Err(err(String::new(), "the config is empty".into()));
        }
        if let Some(map) = doc.as_mapping() {
            for key in BUILDGRID_SERVICE_KEYS {
                if map.contains_key(key) {
                    return Err(err(
                        key.to_string(),
                        "is a BuildGrid service definition; gridgate declares its stores and \
                         upstreams under instances: and build-events: (see the README's config reference). \
                         Keep only server:, authorization:, monitoring:, server-reflection and grpc-compression \
                         from a BuildGrid config"
                            .to_string(),
                    ));
                }
            }
        }
        let doc = yaml::resolve_tags(doc, "", base).map_err(|(k, r)| err(k, r))?;
        let raw: RawConfig = serde_path_to_error::deserialize(doc).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            err(key, e.into_inner().to_string())
        })?;
        Config::from_raw(raw, name, base)
    }

    fn from_raw(raw: RawConfig, name: &str, base: &Path) -> Result<Config, ConfigError> {
        let v = Validator {
            file: name.to_string(),
            base: base.to_path_buf(),
        };
        let mut ignored = Vec::new();
        if let Some(n) = raw.thread_pool_size {
            ignored.push((
                "thread-pool-size".to_string(),
                format!("{n}: gridgate runs on an async runtime; use limits.max-concurrent-streams to bound concurrency"),
            ));
        }
        if raw.grpc_server_options.is_some() {
            ignored.push((
                "grpc-server-options".to_string(),
                "C-core channel arguments do not apply; see the limits: section".to_string(),
            ));
        }

        if raw.server.is_empty() {
            return Err(v.err(
                "server",
                "at least one channel is needed, e.g. `- !channel { address: \"127.0.0.1:50051\", insecure-mode: true }`",
            ));
        }
        let channels = raw
            .server
            .iter()
            .enumerate()
            .map(|(i, c)| v.channel(&format!("server[{i}]"), c))
            .collect::<Result<Vec<_>, _>>()?;

        let authorization = v.authorization(raw.authorization.as_ref())?;
        if authorization.method == AuthMethod::None {
            for (i, c) in channels.iter().enumerate() {
                if !c.listen.is_local() && !c.allow_open {
                    return Err(v.err(
                        &format!("server[{i}].address"),
                        &format!(
                            "{} is reachable from other machines but authorization is `none`: \
                             configure authorization, or set `allow-open: true` on this channel \
                             to serve an open endpoint on purpose",
                            c.address
                        ),
                    ));
                }
            }
        }

        let monitoring = v.monitoring(raw.monitoring.as_ref())?;
        let compression = match raw.grpc_compression.as_deref() {
            None => Compression::None,
            Some(s) => match s.to_ascii_lowercase().as_str() {
                "nocompression" | "none" => Compression::None,
                "gzip" => Compression::Gzip,
                "deflate" => Compression::Deflate,
                "zstd" => Compression::Zstd,
                other => {
                    return Err(v.err(
                        "grpc-compression",
                        &format!(
                        "unknown value {other:?} (expected NoCompression, Gzip, Deflate or Zstd)"
                    ),
                    ))
                }
            },
        };

        let mut names = HashSet::new();
        let mut instances = Vec::new();
        for (i, inst) in raw.instances.iter().enumerate() {
            let key = format!("instances[{i}]");
            if !names.insert(inst.name.clone()) {
                return Err(v.err(
                    &format!("{key}.name"),
                    &format!("instance {:?} is declared twice", inst.name),
                ));
            }
            instances.push(v.instance(&key, inst)?);
        }
        for name in &authorization.allow_unauthenticated_instances {
            if !names.contains(name) && !raw.instances.is_empty() {
                ignored.push((
                    "authorization.allow-unauthenticated-instances".into(),
                    format!("{name:?} is not a declared instance"),
                ));
            }
        }

        let build_events = v.build_events(raw.build_events.as_ref())?;
        let build_events_limits = v.build_events_limits(raw.build_events.as_ref())?;
        let limits = v.limits(raw.limits.as_ref())?;
        let metrics = match &raw.metrics {
            None => None,
            Some(m) => Some(MetricsEndpointConfig {
                address: m.address.parse().map_err(|_| {
                    v.err(
                        "metrics.address",
                        &format!(
                            "{:?} is not an IP address and port (e.g. 127.0.0.1:9464)",
                            m.address
                        ),
                    )
                })?,
            }),
        };

        Ok(Config {
            source: name.to_string(),
            description: raw.description,
            channels,
            authorization,
            monitoring,
            server_reflection: raw.server_reflection.unwrap_or(true),
            compression,
            instances,
            build_events,
            build_events_limits,
            limits,
            metrics,
            ignored,
        })
    }

    /// A human-readable summary, printed by `gridgate check-config`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "config: {}", self.source);
        for c in &self.channels {
            let tls = match &c.tls {
                None => "plaintext".to_string(),
                Some(t) if t.client_ca.is_some() => format!(
                    "TLS, client certificates required (CA {})",
                    t.client_ca.as_deref().unwrap_or(Path::new("")).display()
                ),
                Some(_) => "TLS".to_string(),
            };
            let _ = writeln!(s, "listen: {} ({tls})", c.address);
        }
        let a = &self.authorization;
        let method = match a.method {
            AuthMethod::None => "none (open endpoint)".to_string(),
            AuthMethod::Headers => "headers (trusted proxy)".to_string(),
            AuthMethod::Jwt => {
                let jwt = a.jwt.as_ref();
                let providers = jwt
                    .map(|j| {
                        j.providers
                            .iter()
                            .map(|p| {
                                let key = match &p.key {
                                    JwtKeyConfig::Secret(_) => "HMAC secret".to_string(),
                                    JwtKeyConfig::PublicKeyPem(_) => "PEM public key".to_string(),
                                    JwtKeyConfig::Jwks { urls, .. } => {
                                        format!("JWKS {}", urls.join(", "))
                                    }
                                };
                                let algs: Vec<String> =
                                    p.algorithms.iter().map(|a| format!("{a:?}")).collect();
                                format!("{} [{}; {key}]", p.name, algs.join(","))
                            })
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_default();
                format!("jwt: {providers}")
            }
        };
        let _ = writeln!(s, "authorization: {method}");
        if let Some(acl) = &a.acl_config {
            let _ = writeln!(
                s,
                "acl-config: {} ({} matching)",
                acl.display(),
                match a.acl_match {
                    AclMatch::Whole => "whole-value",
                    AclMatch::Prefix => "prefix (BuildGrid)",
                }
            );
        }
        if !a.allow_unauthenticated_instances.is_empty() {
            let _ = writeln!(
                s,
                "unauthenticated instances: {:?}",
                a.allow_unauthenticated_instances
            );
        }
        for i in &self.instances {
            let what = match &i.backend {
                InstanceBackend::Local { cas, action_cache } => {
                    let cas = match cas {
                        CasConfig::Memory { max_bytes } => format!("memory CAS {max_bytes} bytes"),
                        CasConfig::Disk { path, max_bytes } => {
                            format!("disk CAS {} {max_bytes} bytes", path.display())
                        }
                    };
                    format!(
                        "{cas}, action cache {}",
                        if action_cache.allow_updates {
                            "read-write"
                        } else {
                            "read-only"
                        }
                    )
                }
                InstanceBackend::Upstream(u) => format!("upstream {}", u.shown_address()),
            };
            let _ = writeln!(s, "instance {:?}: {what}", i.name);
        }
        let bes = match &self.build_events {
            BuildEventsConfig::Memory { max_bytes } => format!("memory ({max_bytes} bytes)"),
            BuildEventsConfig::File { path } => format!("file {}", path.display()),
            BuildEventsConfig::Postgres { .. } => "postgres".to_string(),
        };
        let _ = writeln!(
            s,
            "build events: {bes}, events up to {} bytes",
            self.build_events_limits.max_event_bytes
        );
        let _ = writeln!(
            s,
            "reflection: {}, compression: {:?}",
            if self.server_reflection { "on" } else { "off" },
            self.compression
        );
        for (k, note) in &self.ignored {
            let _ = writeln!(s, "note: {k}: {note}");
        }
        s
    }
}

/// The longest duration a `*-minutes` key may give: 100 years.
const MAX_MINUTES: u64 = 100 * 365 * 24 * 60;

/// The largest `leeway-seconds`: one day. The token checks compute `now - leeway`,
/// which a leeway beyond the current time would overflow.
const MAX_LEEWAY_SECONDS: u64 = 86_400;

/// Checks raw sections and resolves paths; carries the file name for errors.
struct Validator {
    file: String,
    base: PathBuf,
}

impl Validator {
    fn err(&self, key: &str, reason: &str) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A duration given in minutes. More than [`MAX_MINUTES`] is refused: it would
    /// overflow (`minutes * 60`, and the clock arithmetic done with it).
    fn minutes(&self, key: &str, minutes: u64) -> Result<Duration, ConfigError> {
        if minutes > MAX_MINUTES {
            return Err(self.err(
                key,
                &format!("{minutes} is more than {MAX_MINUTES} minutes (100 years)"),
            ));
        }
        Ok(Duration::from_secs(minutes * 60))
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// Resolves a path that must name a readable file.
    fn readable_file(&self, key: &str, p: &str) -> Result<PathBuf, ConfigError> {
        let path = self.path(p);
        // Checked before opening: opening a FIFO would block.
        if path.exists() && !path.is_file() {
            return Err(self.err(key, &format!("{} is not a file", path.display())));
        }
        match std::fs::File::open(&path) {
            Ok(_) => Ok(path),
            Err(e) => Err(self.err(key, &format!("cannot read {}: {e}", path.display()))),
        }
    }

    fn channel(&self, key: &str, c: &RawChannel) -> Result<ChannelConfig, ConfigError> {
        let address = match (&c.address, c.port) {
            (Some(a), None) => a.clone(),
            (None, Some(port)) => format!("[::]:{port}"),
            (Some(_), Some(_)) => {
                return Err(self.err(key, "give either `address` or the older `port`, not both"))
            }
            (None, None) => {
                return Err(self.err(
                    &format!("{key}.address"),
                    "missing: e.g. \"127.0.0.1:50051\" or \"unix:/run/gridgate.sock\"",
                ))
            }
        };
        let listen = self.listen_addr(&format!("{key}.address"), &address)?;
        let creds = c.credentials.as_ref().filter(|c| !c.is_empty());
        let insecure = match c.insecure_mode {
            Some(v) => v,
            // BuildGrid requires the key; without it, credentials decide.
            None => creds.is_none(),
        };
        let tls = match (insecure, creds) {
            (true, None) => None,
            (true, Some(_)) => return Err(self.err(
                &format!("{key}.insecure-mode"),
                "is true but credentials are given: gridgate will not silently serve plaintext; \
                     set insecure-mode: false to use TLS, or remove the credentials",
            )),
            (false, None) => {
                return Err(self.err(
                    &format!("{key}.credentials"),
                    "insecure-mode is false, so TLS credentials are required \
                     (tls-server-key and tls-server-cert)",
                ))
            }
            (false, Some(cr)) => {
                let ck = format!("{key}.credentials");
                let key_file = cr.tls_server_key.as_deref().ok_or_else(|| {
                    self.err(
                        &format!("{ck}.tls-server-key"),
                        "missing: the server's PEM private key",
                    )
                })?;
                let cert_file = cr.tls_server_cert.as_deref().ok_or_else(|| {
                    self.err(
                        &format!("{ck}.tls-server-cert"),
                        "missing: the server's PEM certificate chain",
                    )
                })?;
                Some(TlsConfig {
                    key: self.readable_file(&format!("{ck}.tls-server-key"), key_file)?,
                    cert: self.readable_file(&format!("{ck}.tls-server-cert"), cert_file)?,
                    client_ca: cr
                        .tls_client_certs
                        .as_deref()
                        .map(|p| self.readable_file(&format!("{ck}.tls-client-certs"), p))
                        .transpose()?,
                })
            }
        };
        if matches!(listen, ListenAddr::Unix(_)) && c.allow_open {
            return Err(self.err(
                &format!("{key}.allow-open"),
                "only applies to TCP addresses (a Unix socket is local already)",
            ));
        }
        Ok(ChannelConfig {
            address,
            listen,
            tls,
            allow_open: c.allow_open,
        })
    }

    fn listen_addr(&self, key: &str, address: &str) -> Result<ListenAddr, ConfigError> {
        if let Some(rest) = address.strip_prefix("unix:") {
            // BuildGrid writes unix:///tmp/sock; gRPC also accepts unix:/tmp/sock.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(self.err(key, "unix: needs a socket path"));
            }
            return Ok(ListenAddr::Unix(self.path(path)));
        }
        if let Ok(addr) = address.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(addr));
        }
        let mut resolved = address.to_socket_addrs().map_err(|e| {
            self.err(
                key,
                &format!("{address:?} is not host:port, [ipv6]:port or unix:PATH ({e})"),
            )
        })?;
        resolved
            .next()
            .map(ListenAddr::Tcp)
            .ok_or_else(|| self.err(key, &format!("{address:?} resolves to no address")))
    }

    fn authorization(
        &self,
        a: Option<&RawAuthorization>,
    ) -> Result<AuthorizationConfig, ConfigError> {
        let Some(a) = a else {
            return Ok(AuthorizationConfig {
                method: AuthMethod::None,
                jwt: None,
                acl_config: None,
                acl_match: AclMatch::Whole,
                allow_unauthenticated_instances: Vec::new(),
                allow_localhost_requests: false,
                open_health: true,
                open_reflection: true,
                watch_policy: true,
                jwks_required_at_start: false,
            });
        };
        let k = |s: &str| format!("authorization.{s}");
        let method = match a.method.to_ascii_lowercase().as_str() {
            "none" => AuthMethod::None,
            "jwt" => AuthMethod::Jwt,
            "headers" => AuthMethod::Headers,
            other => {
                return Err(self.err(
                    &k("method"),
                    &format!("unknown method {other:?} (expected none, jwt or headers)"),
                ))
            }
        };
        if a.allow_unauthenticated_instances.is_some() && a.allow_unauthorized_instances.is_some() {
            return Err(self.err(
                &k("allow-unauthorized-instances"),
                "give allow-unauthenticated-instances or its older spelling allow-unauthorized-instances, not both",
            ));
        }
        let unauth = a
            .allow_unauthenticated_instances
            .clone()
            .or_else(|| a.allow_unauthorized_instances.clone())
            .unwrap_or_default();

        if method == AuthMethod::None {
            // Fail closed: settings that only mean something with authentication
            // would be silently ignored by an open endpoint.
            let stray = [
                ("secret", a.secret.is_some()),
                ("jwks-url", a.jwks_url.is_some()),
                ("audience", a.audience.is_some()),
                ("algorithm", a.algorithm.is_some()),
                ("acl-config", a.acl_config.is_some()),
                ("providers", a.providers.is_some()),
                ("allow-unauthenticated-instances", !unauth.is_empty()),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(self.err(
                    &k(key),
                    "has no effect with method none (every call is allowed): remove it, \
                     or choose method jwt or headers",
                ));
            }
        }
        if method != AuthMethod::Jwt {
            for (key, set) in [
                ("secret", a.secret.is_some()),
                ("jwks-url", a.jwks_url.is_some()),
                ("audience", a.audience.is_some()),
                ("algorithm", a.algorithm.is_some()),
                ("providers", a.providers.is_some()),
            ] {
                if set {
                    return Err(self.err(&k(key), "only applies to method jwt"));
                }
            }
        }

        let jwt = if method == AuthMethod::Jwt {
            Some(self.jwt(a)?)
        } else {
            None
        };
        let acl_config = match &a.acl_config {
            None => None,
            Some(p) => {
                let path = self.path(p);
                if !path.exists() {
                    return Err(self.err(
                        &k("acl-config"),
                        &format!("{} does not exist", path.display()),
                    ));
                }
                Some(path)
            }
        };
        let acl_match = match a.acl_match.as_deref() {
            None | Some("whole") => AclMatch::Whole,
            Some("prefix") => AclMatch::Prefix,
            Some(other) => {
                return Err(self.err(
                    &k("acl-match"),
                    &format!("unknown value {other:?} (expected whole or prefix)"),
                ))
            }
        };
        if a.acl_match.is_some() && acl_config.is_none() {
            return Err(self.err(&k("acl-match"), "needs acl-config"));
        }
        Ok(AuthorizationConfig {
            method,
            jwt,
            acl_config,
            acl_match,
            allow_unauthenticated_instances: unauth,
            allow_localhost_requests: a.allow_localhost_requests.unwrap_or(false),
            open_health: a.open_health.unwrap_or(true),
            open_reflection: a.open_reflection.unwrap_or(true),
            watch_policy: a.watch_policy.unwrap_or(true),
            jwks_required_at_start: a.jwks_required_at_start.unwrap_or(false),
        })
    }

    fn jwt(&self, a: &RawAuthorization) -> Result<JwtConfig, ConfigError> {
        let k = |s: &str| format!("authorization.{s}");
        let flat_set = a.secret.is_some()
            || a.jwks_url.is_some()
            || a.algorithm.is_some()
            || a.audience.is_some()
            || a.issuer.is_some();
        let providers = match &a.providers {
            Some(list) => {
                if flat_set {
                    return Err(self.err(
                        &k("providers"),
                        "give either providers: or the flat secret/jwks-url/algorithm/audience/issuer keys, not both",
                    ));
                }
                if list.is_empty() {
                    return Err(self.err(&k("providers"), "is empty"));
                }
                let mut issuers = HashSet::new();
                let mut out = Vec::new();
                for (i, p) in list.iter().enumerate() {
                    let key = format!("authorization.providers[{i}]");
                    let Some(iss) = &p.issuer else {
                        return Err(self.err(
                            &format!("{key}.issuer"),
                            "missing: with several providers each is chosen by the token's iss",
                        ));
                    };
                    if !issuers.insert(iss.clone()) {
                        return Err(self.err(
                            &format!("{key}.issuer"),
                            &format!("issuer {iss:?} appears twice"),
                        ));
                    }
                    out.push(self.provider(
                        &key,
                        p,
                        a.allow_weak_secret.unwrap_or(false),
                        a.jwks_fetch_minutes,
                    )?);
                }
                out
            }
            None => {
                let p = RawProvider {
                    issuer: a.issuer.clone(),
                    secret: a.secret.clone(),
                    jwks_url: a.jwks_url.clone(),
                    audience: a.audience.clone(),
                    algorithm: a.algorithm.clone(),
                    jwks_fetch_minutes: None,
                    jwks_max_staleness_minutes: a.jwks_max_staleness_minutes,
                    jwks_refetch_min_seconds: a.jwks_refetch_min_seconds,
                };
                vec![self.provider(
                    "authorization",
                    &p,
                    a.allow_weak_secret.unwrap_or(false),
                    a.jwks_fetch_minutes,
                )?]
            }
        };
        let claims = match &a.claims {
            None => ClaimsConfig::default(),
            Some(c) => {
                let d = ClaimsConfig::default();
                ClaimsConfig {
                    actor: c.actor.clone().map(|v| v.into_vec()).unwrap_or(d.actor),
                    subject: c.subject.clone().map(|v| v.into_vec()).unwrap_or(d.subject),
                    workflow: c
                        .workflow
                        .clone()
                        .map(|v| v.into_vec())
                        .unwrap_or(d.workflow),
                }
            }
        };
        let leeway = a.leeway_seconds.unwrap_or(60);
        if leeway > MAX_LEEWAY_SECONDS {
            return Err(self.err(
                &k("leeway-seconds"),
                &format!("{leeway} is more than {MAX_LEEWAY_SECONDS} seconds (one day)"),
            ));
        }
        Ok(JwtConfig {
            providers,
            leeway: Duration::from_secs(leeway),
            max_token_lifetime: a
                .max_token_lifetime_minutes
                .map(|m| self.minutes(&k("max-token-lifetime-minutes"), m))
                .transpose()?,
            token_cache_size: a.token_cache_size.unwrap_or(100_000),
            claims,
        })
    }

    fn provider(
        &self,
        key: &str,
        p: &RawProvider,
        allow_weak_secret: bool,
        default_fetch_minutes: Option<u64>,
    ) -> Result<JwtProviderConfig, ConfigError> {
        let k = |s: &str| format!("{key}.{s}");
        let alg_text = p.algorithm.as_deref().ok_or_else(|| {
            self.err(
                &k("algorithm"),
                "missing: name the signature algorithm the tokens use (e.g. hs256, rs256, es256)",
            )
        })?;
        let algorithm = parse_algorithm(alg_text).ok_or_else(|| {
            self.err(
                &k("algorithm"),
                &format!(
                    "unknown algorithm {alg_text:?} (expected one of hs256, hs384, hs512, rs256, rs384, rs512, ps256, ps384, ps512, es256, es384, eddsa)"
                ),
            )
        })?;
        let is_hmac = matches!(
            algorithm,
            jsonwebtoken::Algorithm::HS256
                | jsonwebtoken::Algorithm::HS384
                | jsonwebtoken::Algorithm::HS512
        );
        let key_source = match (&p.secret, &p.jwks_url) {
            (Some(_), Some(_)) => {
                return Err(self.err(key, "give exactly one of secret or jwks-url, not both"))
            }
            (None, None) => return Err(self.err(
                key,
                "needs a key: secret (a file with the HMAC secret or a PEM public key) or jwks-url",
            )),
            (Some(secret), None) => {
                let path = self.readable_file(&k("secret"), secret)?;
                let bytes = std::fs::read(&path).map_err(|e| {
                    self.err(
                        &k("secret"),
                        &format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                if is_hmac {
                    // BuildGrid strips surrounding whitespace from the secret file.
                    let text = String::from_utf8_lossy(&bytes);
                    let trimmed = text.trim().as_bytes().to_vec();
                    if trimmed.is_empty() {
                        return Err(self.err(&k("secret"), &format!("{} is empty", path.display())));
                    }
                    JwtKeyConfig::Secret(trimmed)
                } else {
                    if !bytes.starts_with(b"-----BEGIN")
                        && !String::from_utf8_lossy(&bytes)
                            .trim_start()
                            .starts_with("-----BEGIN")
                    {
                        return Err(self.err(
                            &k("secret"),
                            &format!(
                                "{} is not a PEM public key, which algorithm {alg_text} needs",
                                path.display()
                            ),
                        ));
                    }
                    if crate::gate::jwks::AlgSet::RSA.contains(algorithm) {
                        crate::gate::jwt::check_rsa_pem_size(&bytes).map_err(|e| {
                            self.err(&k("secret"), &format!("{}: {e}", path.display()))
                        })?;
                    }
                    JwtKeyConfig::PublicKeyPem(bytes)
                }
            }
            (None, Some(urls)) => {
                if is_hmac {
                    return Err(self.err(
                        &k("jwks-url"),
                        &format!("algorithm {alg_text} is HMAC; a JWKS publishes public keys (use secret:)"),
                    ));
                }
                let urls = urls.clone().into_vec();
                if urls.is_empty() {
                    return Err(self.err(&k("jwks-url"), "is empty"));
                }
                for (i, u) in urls.iter().enumerate() {
                    crate::gate::jwks::check_url(u)
                        .map(|_| ())
                        .map_err(|why| format!("{u:?}: {why}"))
                        .map_err(|r| self.err(&format!("{}[{i}]", k("jwks-url")), &r))?;
                }
                let minutes = p.jwks_fetch_minutes.or(default_fetch_minutes).unwrap_or(60);
                if minutes == 0 {
                    return Err(self.err(&k("jwks-fetch-minutes"), "must be at least 1"));
                }
                JwtKeyConfig::Jwks {
                    urls,
                    refresh: self.minutes(&k("jwks-fetch-minutes"), minutes)?,
                    max_staleness: p
                        .jwks_max_staleness_minutes
                        .map(|m| self.minutes(&k("jwks-max-staleness-minutes"), m))
                        .transpose()?,
                    min_refetch_interval: Duration::from_secs(
                        p.jwks_refetch_min_seconds.unwrap_or(10),
                    ),
                }
            }
        };
        let audiences = p.audience.clone().map(|a| a.into_vec()).unwrap_or_default();
        if audiences.iter().any(|a| a.is_empty()) {
            return Err(self.err(&k("audience"), "contains an empty audience"));
        }
        Ok(JwtProviderConfig {
            name: p.issuer.clone().unwrap_or_else(|| "default".to_string()),
            issuer: p.issuer.clone(),
            algorithms: vec![algorithm],
            key: key_source,
            audiences,
            allow_weak_secret,
        })
    }

    fn monitoring(&self, m: Option<&RawMonitoring>) -> Result<MonitoringConfig, ConfigError> {
        let d = RawMonitoring::default();
        let m = m.unwrap_or(&d);
        let endpoint_type = m.endpoint_type.clone().unwrap_or_else(|| "stdout".into());
        if !["stdout", "file", "socket", "udp", "silent"].contains(&endpoint_type.as_str()) {
            return Err(self.err(
                "monitoring.endpoint-type",
                &format!("unknown value {endpoint_type:?} (expected stdout, file, socket, udp or silent)"),
            ));
        }
        let format = m
            .serialization_format
            .clone()
            .unwrap_or_else(|| "statsd".into());
        match format.as_str() {
            "statsd" | "json" => {}
            "binary" => {
                return Err(self.err(
                    "monitoring.serialization-format",
                    "binary (BuildGrid's protobuf monitoring records) is not supported; use statsd or json",
                ))
            }
            other => {
                return Err(self.err(
                    "monitoring.serialization-format",
                    &format!("unknown value {other:?} (expected statsd or json)"),
                ))
            }
        }
        let tag_format = m.tag_format.clone().unwrap_or_else(|| "none".into());
        if !["none", "influx-statsd", "dogstatsd", "graphite"].contains(&tag_format.as_str()) {
            return Err(self.err(
                "monitoring.tag-format",
                &format!("unknown value {tag_format:?} (expected none, influx-statsd, dogstatsd or graphite)"),
            ));
        }
        if matches!(endpoint_type.as_str(), "file" | "socket" | "udp")
            && m.endpoint_location.is_none()
            && m.enabled.unwrap_or(false)
        {
            return Err(self.err(
                "monitoring.endpoint-location",
                &format!("missing: endpoint-type {endpoint_type} needs a location"),
            ));
        }
        if let (true, "udp", Some(location)) = (
            m.enabled.unwrap_or(false),
            endpoint_type.as_str(),
            m.endpoint_location.as_deref(),
        ) {
            let port_ok = location
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(self.err(
                    "monitoring.endpoint-location",
                    &format!("{location:?} is not host:port (e.g. 127.0.0.1:8125)"),
                ));
            }
        }
        let mut prefix = m.metric_prefix.clone().unwrap_or_default();
        while prefix.ends_with('.') {
            prefix.pop();
        }
        if !prefix.is_empty() {
            prefix.push('.');
        }
        Ok(MonitoringConfig {
            enabled: m.enabled.unwrap_or(false),
            endpoint_type,
            endpoint_location: m.endpoint_location.clone(),
            serialization_format: format,
            metric_prefix: prefix,
            tag_format,
            additional_tags: m.additional_tags.clone().unwrap_or_default(),
            period: Duration::from_secs(m.period_seconds.unwrap_or(5).max(1)),
        })
    }

    fn instance(&self, key: &str, i: &RawInstance) -> Result<InstanceConfig, ConfigError> {
        use crate::reapi::resource::RESERVED_SEGMENTS;
        if let Some(seg) = i.name.split('/').find(|s| RESERVED_SEGMENTS.contains(s)) {
            return Err(self.err(
                &format!("{key}.name"),
                &format!("instance names may not contain the segment {seg:?} (REAPI reserves it)"),
            ));
        }
        if i.name.starts_with('/') || i.name.ends_with('/') || i.name.contains("//") {
            return Err(self.err(
                &format!("{key}.name"),
                "instance names may not start or end with '/' or contain an empty segment",
            ));
        }
        let backend = match &i.upstream {
            Some(u) => {
                if i.cas.is_some() || i.action_cache.is_some() {
                    return Err(self.err(
                        &format!("{key}.upstream"),
                        "an upstream instance forwards everything: remove cas and action-cache",
                    ));
                }
                let k = format!("{key}.upstream");
                let (tls, rest) = if let Some(r) = u.address.strip_prefix("grpcs://") {
                    (true, r)
                } else if let Some(r) = u.address.strip_prefix("grpc://") {
                    (false, r)
                } else if let Some(r) = u.address.strip_prefix("https://") {
                    (true, r)
                } else if let Some(r) = u.address.strip_prefix("http://") {
                    (false, r)
                } else {
                    return Err(self.err(
                        &format!("{k}.address"),
                        &format!(
                            "{:?} needs a scheme: grpc://host:port (plaintext) or grpcs://host:port (TLS)",
                            without_userinfo(&u.address)
                        ),
                    ));
                };
                if rest.is_empty() || !rest.contains(':') {
                    return Err(self.err(&format!("{k}.address"), "needs host:port"));
                }
                if !tls && (u.tls_ca.is_some() || u.tls_client_cert.is_some()) {
                    return Err(self.err(
                        &format!("{k}.address"),
                        "TLS files are given but the address is plaintext grpc://; use grpcs://",
                    ));
                }
                if u.tls_client_cert.is_some() != u.tls_client_key.is_some() {
                    return Err(self.err(
                        &format!("{k}.tls-client-key"),
                        "tls-client-cert and tls-client-key go together",
                    ));
                }
                let file = |name: &str, v: &Option<String>| {
                    v.as_deref()
                        .map(|p| self.readable_file(&format!("{k}.{name}"), p))
                        .transpose()
                };
                for name in u.headers.keys() {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        return Err(
                            self.err(&format!("{k}.headers.{name}"), "is not a valid header name")
                        );
                    }
                }
                InstanceBackend::Upstream(UpstreamConfig {
                    address: u.address.clone(),
                    tls,
                    tls_ca: file("tls-ca", &u.tls_ca)?,
                    tls_client_cert: file("tls-client-cert", &u.tls_client_cert)?,
                    tls_client_key: file("tls-client-key", &u.tls_client_key)?,
                    headers: u.headers.clone(),
                    instance_name: u.instance_name.clone(),
                })
            }
            None => {
                let cas = match &i.cas {
                    None => CasConfig::Memory { max_bytes: 1 << 30 },
                    Some(c) => {
                        let max_bytes = c
                            .max_bytes
                            .as_ref()
                            .map(|s| s.bytes())
                            .transpose()
                            .map_err(|r| self.err(&format!("{key}.cas.max-bytes"), &r))?;
                        match c.backend.as_str() {
                            "memory" => {
                                if c.path.is_some() {
                                    return Err(self.err(
                                        &format!("{key}.cas.path"),
                                        "only applies to backend disk",
                                    ));
                                }
                                CasConfig::Memory {
                                    max_bytes: max_bytes.unwrap_or(1 << 30),
                                }
                            }
                            "disk" => CasConfig::Disk {
                                path: self.path(c.path.as_deref().ok_or_else(|| {
                                    self.err(
                                        &format!("{key}.cas.path"),
                                        "missing: backend disk needs a directory",
                                    )
                                })?),
                                max_bytes: max_bytes.unwrap_or(10 << 30),
                            },
                            other => {
                                return Err(self.err(
                                    &format!("{key}.cas.backend"),
                                    &format!("unknown backend {other:?} (expected memory or disk)"),
                                ))
                            }
                        }
                    }
                };
                let ac = i.action_cache.clone().unwrap_or_default();
                InstanceBackend::Local {
                    cas,
                    action_cache: ActionCacheConfig {
                        allow_updates: ac.allow_updates.unwrap_or(true),
                        max_entries: ac.max_entries.unwrap_or(1_000_000),
                    },
                }
            }
        };
        Ok(InstanceConfig {
            name: i.name.clone(),
            description: i.description.clone(),
            backend,
        })
    }

    fn build_events_limits(
        &self,
        b: Option<&RawBuildEvents>,
    ) -> Result<BuildEventsLimits, ConfigError> {
        let mut limits = BuildEventsLimits::default();
        if let Some(size) = b.and_then(|b| b.max_event_bytes.as_ref()) {
            let key = "build-events.max-event-bytes";
            let n = size.bytes().map_err(|r| self.err(key, &r))?;
            if !(1024..=(256 << 20)).contains(&n) {
                return Err(self.err(key, "must be between 1K and 256M"));
            }
            limits.max_event_bytes = n as usize;
        }
        if let Some(r) = b.and_then(|b| b.retention.as_ref()) {
            if let Some(a) = &r.max_age {
                let key = "build-events.retention.max-age";
                limits.max_age = parse_age(a).map_err(|e| self.err(key, &e))?;
            }
            if let Some(a) = &r.abandoned_after {
                let key = "build-events.retention.abandoned-after";
                limits.abandoned_after = parse_age(a).map_err(|e| self.err(key, &e))?;
            }
        }
        Ok(limits)
    }

    fn build_events(&self, b: Option<&RawBuildEvents>) -> Result<BuildEventsConfig, ConfigError> {
        let Some(b) = b else {
            return Ok(BuildEventsConfig::Memory {
                max_bytes: 256 << 20,
            });
        };
        let max_bytes = b
            .max_bytes
            .as_ref()
            .map(|s| s.bytes())
            .transpose()
            .map_err(|r| self.err("build-events.max-bytes", &r))?;
        let store = match &b.store {
            None => RawStore::Name("memory".into()),
            Some(s) => s.clone(),
        };
        match store {
            RawStore::Name(n) if n == "memory" => Ok(BuildEventsConfig::Memory {
                max_bytes: max_bytes.unwrap_or(256 << 20),
            }),
            RawStore::Name(n) => Err(self.err(
                "build-events.store",
                &format!("unknown store {n:?} (expected memory, {{ file: PATH }} or {{ postgres: URL }})"),
            )),
            RawStore::File { file } => {
                if max_bytes.is_some() {
                    return Err(self.err("build-events.max-bytes", "only applies to the memory store"));
                }
                Ok(BuildEventsConfig::File { path: self.path(&file) })
            }
            RawStore::Postgres { postgres } => {
                if max_bytes.is_some() {
                    return Err(self.err("build-events.max-bytes", "only applies to the memory store"));
                }
                if !(postgres.starts_with("postgres://") || postgres.starts_with("postgresql://")) {
                    return Err(self.err(
                        "build-events.store.postgres",
                        "must be a postgres:// or postgresql:// URL",
                    ));
                }
                Ok(BuildEventsConfig::Postgres { url: postgres })
            }
        }
    }

    fn limit_bytes(
        &self,
        key: &str,
        v: Option<&raw::Size>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(size) => {
                let n = size.bytes().map_err(|r| self.err(key, &r))?;
                usize::try_from(n).map_err(|_| self.err(key, "is too large"))
            }
        }
    }

    fn limits(&self, l: Option<&RawLimits>) -> Result<LimitsConfig, ConfigError> {
        let d = LimitsConfig::default();
        let Some(l) = l else { return Ok(d) };
        let secs = |v: Option<u64>, dflt: Duration| v.map(Duration::from_secs).unwrap_or(dflt);
        let out = LimitsConfig {
            shutdown_grace: secs(l.shutdown_grace_seconds, d.shutdown_grace),
            tls_handshake_timeout: secs(l.tls_handshake_timeout_seconds, d.tls_handshake_timeout),
            max_concurrent_streams: l.max_concurrent_streams.unwrap_or(d.max_concurrent_streams),
            max_header_list_size: l.max_header_list_bytes.unwrap_or(d.max_header_list_size),
            max_frame_size: l.max_frame_bytes.unwrap_or(d.max_frame_size),
            keepalive_interval: secs(l.keepalive_interval_seconds, d.keepalive_interval),
            keepalive_timeout: secs(l.keepalive_timeout_seconds, d.keepalive_timeout),
            max_message_bytes: l.max_message_bytes.unwrap_or(d.max_message_bytes),
            max_concurrent_requests: l
                .max_concurrent_requests
                .unwrap_or(d.max_concurrent_requests),
            max_connections: l.max_connections.unwrap_or(d.max_connections),
            first_message_timeout: secs(l.first_message_timeout_seconds, d.first_message_timeout),
            idle_connection_timeout: secs(
                l.idle_connection_timeout_seconds,
                d.idle_connection_timeout,
            ),
            max_pending_bytes: self.limit_bytes(
                "limits.max-pending-bytes",
                l.max_pending_bytes.as_ref(),
                d.max_pending_bytes,
            )?,
            max_pending_bytes_per_connection: self.limit_bytes(
                "limits.max-pending-bytes-per-connection",
                l.max_pending_bytes_per_connection.as_ref(),
                d.max_pending_bytes_per_connection,
            )?,
            anonymous_share_percent: l
                .anonymous_share_percent
                .unwrap_or(d.anonymous_share_percent),
            max_instance_name_bytes: l
                .max_instance_name_bytes
                .unwrap_or(d.max_instance_name_bytes),
        };
        if out.idle_connection_timeout.is_zero() {
            return Err(self.err(
                "limits.idle-connection-timeout-seconds",
                "must be at least 1",
            ));
        }
        if !(1..=100).contains(&out.anonymous_share_percent) {
            return Err(self.err(
                "limits.anonymous-share-percent",
                &format!(
                    "must be between 1 and 100, not {}",
                    out.anonymous_share_percent
                ),
            ));
        }
        if !(1..=65536).contains(&out.max_instance_name_bytes) {
            return Err(self.err(
                "limits.max-instance-name-bytes",
                &format!(
                    "must be between 1 and 65536, not {}",
                    out.max_instance_name_bytes
                ),
            ));
        }
        if out.max_pending_bytes < out.max_message_bytes {
            return Err(self.err(
                "limits.max-pending-bytes",
                &format!(
                    "{} is less than limits.max-message-bytes ({}): no first message could be read",
                    out.max_pending_bytes, out.max_message_bytes
                ),
            ));
        }
        if out.max_pending_bytes_per_connection < out.max_message_bytes {
            return Err(self.err(
                "limits.max-pending-bytes-per-connection",
                &format!(
                    "{} is less than limits.max-message-bytes ({}): no first message could be read",
                    out.max_pending_bytes_per_connection, out.max_message_bytes
                ),
            ));
        }
        if out.first_message_timeout.is_zero() {
            return Err(self.err("limits.first-message-timeout-seconds", "must be at least 1"));
        }
        if out.max_concurrent_requests == 0 {
            return Err(self.err("limits.max-concurrent-requests", "must be at least 1"));
        }
        if out.max_connections == 0 {
            return Err(self.err("limits.max-connections", "must be at least 1"));
        }
        if out.max_concurrent_streams == 0 {
            return Err(self.err("limits.max-concurrent-streams", "must be at least 1"));
        }
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&out.max_frame_size) {
            return Err(self.err(
                "limits.max-frame-bytes",
                &format!(
                    "must be between {MIN_FRAME_BYTES} and {MAX_FRAME_BYTES} \
                     (HTTP/2's limits for SETTINGS_MAX_FRAME_SIZE), not {}",
                    out.max_frame_size
                ),
            ));
        }
        if out.tls_handshake_timeout.is_zero() {
            return Err(self.err("limits.tls-handshake-timeout-seconds", "must be at least 1"));
        }
        Ok(out)
    }
}

/// Parses BuildGrid's lower-case algorithm names (upper case accepted too).
pub fn parse_algorithm(s: &str) -> Option<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm::*;
    Some(match s.to_ascii_lowercase().as_str() {
        "hs256" => HS256,
        "hs384" => HS384,
        "hs512" => HS512,
        "rs256" => RS256,
        "rs384" => RS384,
        "rs512" => RS512,
        "ps256" => PS256,
        "ps384" => PS384,
        "ps512" => PS512,
        "es256" => ES256,
        "es384" => ES384,
        "eddsa" | "ed25519" => EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
