//! The validated configuration: what each section of the YAML file becomes.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// The web listener (`web:`), off when `None`.
    pub web: Option<WebConfig>,
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
    /// The key path of the key material (`authorization.secret`,
    /// `authorization.jwt.providers[1].jwks-url`, ...), for the errors of the
    /// verifier that checks it.
    pub key_at: String,
    /// The file the key was read from (`secret:`), for the same errors.
    pub key_file: Option<std::path::PathBuf>,
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
        /// How often they are fetched again (`None`: the verifier's default).
        refresh: Option<Duration>,
        /// Keys older than this (since the last good fetch) are dropped
        /// (`None`: the verifier's default).
        max_staleness: Option<Duration>,
        /// At most one refetch for an unknown `kid` in this interval
        /// (`None`: the verifier's default).
        min_refetch_interval: Option<Duration>,
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
    /// `monitoring.enabled`: whether metrics are pushed at all (default false).
    pub enabled: bool,
    /// `monitoring.endpoint-type`: `stdout` (default), `file`, `socket`, `udp`
    /// or `silent`.
    pub endpoint_type: String,
    /// `monitoring.endpoint-location`: the file, socket path or `host:port`;
    /// required by `file`, `socket` and `udp` when enabled.
    pub endpoint_location: Option<String>,
    /// `monitoring.serialization-format`: `statsd` (default) or `json`.
    pub serialization_format: String,
    /// `monitoring.metric-prefix`, normalised to end in exactly one dot, or
    /// empty for none.
    pub metric_prefix: String,
    /// `monitoring.tag-format`: `none` (default), `influx-statsd`, `dogstatsd`
    /// or `graphite`.
    pub tag_format: String,
    /// `monitoring.additional-tags`: tags added to every metric line.
    pub additional_tags: BTreeMap<String, String>,
    /// `monitoring.period-seconds`: how often metrics are pushed (default 5 s,
    /// at least 1 s).
    pub period: Duration,
}

/// Response compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Responses are not compressed (`grpc-compression: none`, the default).
    None,
    /// `grpc-compression: gzip`.
    Gzip,
    /// `grpc-compression: deflate`.
    Deflate,
    /// `grpc-compression: zstd`.
    Zstd,
}

/// One instance behind the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceConfig {
    /// The instance name ("" is the unnamed instance).
    pub name: String,
    /// The instance's free-text `description`; informational only.
    pub description: Option<String>,
    /// Served locally, or forwarded.
    pub backend: InstanceBackend,
}

/// Where an instance's requests are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceBackend {
    /// By gridgate's own services.
    Local {
        /// The instance's `cas:` store (default: 1 GiB in memory).
        cas: CasConfig,
        /// The instance's `action-cache:` settings.
        action_cache: ActionCacheConfig,
    },
    /// By an upstream REAPI server.
    Upstream(UpstreamConfig),
}

/// A local CAS store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasConfig {
    /// `backend: memory`: blobs are lost on restart.
    Memory {
        /// `cas.max-bytes`: the most blob bytes kept (default 1 GiB); the
        /// least recently used blobs are evicted beyond it.
        max_bytes: u64,
    },
    /// `backend: disk`: one file per blob under a directory.
    Disk {
        /// `cas.path`: the directory, resolved against the config file's.
        path: PathBuf,
        /// `cas.max-bytes`: the most blob bytes kept (default 10 GiB); the
        /// least recently used blobs are evicted beyond it.
        max_bytes: u64,
    },
}

/// A local action cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionCacheConfig {
    /// `action-cache.allow-updates`: whether clients may write results with
    /// `UpdateActionResult` (default true).
    pub allow_updates: bool,
    /// `action-cache.max-entries`: the most results kept (default 1,000,000).
    pub max_entries: u64,
}

/// An upstream REAPI server.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// `grpc://host:port` (plaintext) or `grpcs://host:port` (TLS).
    pub address: String,
    /// Whether the upstream is reached over TLS (`grpcs://` or `https://`).
    pub tls: bool,
    /// `tls-ca`: PEM CA bundle the upstream's certificate must chain to;
    /// required with TLS (the system's trust store is not used).
    pub tls_ca: Option<PathBuf>,
    /// `tls-client-cert`: PEM certificate chain gridgate presents upstream
    /// (with `tls-client-key`).
    pub tls_client_cert: Option<PathBuf>,
    /// `tls-client-key`: PEM private key for `tls-client-cert`.
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
    /// `store: memory` (the default): events are lost on restart.
    Memory {
        /// `build-events.max-bytes`: the most event bytes kept (default
        /// 256 MiB).
        max_bytes: u64,
    },
    /// `store: { file: PATH }`: a single-file database.
    File {
        /// The database file, resolved against the config file's directory.
        path: PathBuf,
    },
    /// `store: { postgres: URL }`: a PostgreSQL database.
    Postgres {
        /// The `postgres://` or `postgresql://` connection URL.
        url: String,
    },
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

/// The largest HTTP/2 frame gridgate lets a client send, by default. HTTP/2's
/// own default is 16 KiB, which cuts a 1 MiB ByteStream Write message into 64
/// frames, each received, woken for and copied on its own; 256 KiB frames cut
/// that per-frame work by 16 (bench/RESULTS.md, "ByteStream write: larger
/// HTTP/2 frames"). A frame is read whole before it is used, so this is also
/// the most a connection buffers for one incomplete frame; the 1 MiB
/// connection flow-control window bounds the data in flight either way.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 256 * 1024;
/// HTTP/2's lower bound for SETTINGS_MAX_FRAME_SIZE, 16 KiB (RFC 9113,
/// section 6.5.2).
pub const MIN_FRAME_BYTES: u32 = 16 * 1024;
/// HTTP/2's upper bound for SETTINGS_MAX_FRAME_SIZE, 2^24 - 1 bytes (RFC 9113,
/// section 6.5.2).
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

/// The web listener: invocation pages, search, sign-in and the JSON API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebConfig {
    /// The address as written.
    pub address: String,
    /// Where to listen.
    pub listen: ListenAddr,
    /// TLS settings (the keys of a `server:` channel); `None` means plaintext.
    pub tls: Option<TlsConfig>,
    /// Whether browsers must, may or cannot present a client certificate.
    pub client_certificates: ClientCertificates,
    /// The base URL people reach the pages at, without a trailing `/`
    /// (Bazel's `--bes_results_url` is `<public-url>/invocation/`).
    pub public_url: Option<String>,
    /// The key session and sign-in cookies are sealed with.
    pub session_key: Option<SessionKey>,
    /// Sign-in with OpenID Connect.
    pub oidc: Option<OidcConfig>,
}

/// Client certificates on the web listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertificates {
    /// No client CA: none are asked for.
    Off,
    /// Asked for and verified when presented; a browser without one may sign in otherwise.
    Optional,
    /// The handshake fails without a verified certificate.
    Required,
}

/// Secret bytes of `web.session-key-file` (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(pub Vec<u8>);

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey([{} bytes redacted])", self.0.len())
    }
}

/// The OAuth client secret (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSecret(pub String);

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret([redacted])")
    }
}

/// `web.oidc:`: the OpenID provider people sign in with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    /// The issuer URL (without a trailing `/`); its discovery document is
    /// `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    /// The OAuth client id (the ID token's audience).
    pub client_id: String,
    /// The client secret; `None` for a public client (PKCE alone).
    pub client_secret: Option<ClientSecret>,
    /// The scopes asked for (`openid` always among them).
    pub scopes: Vec<String>,
    /// Which ID token claims make the actor, subject and workflow.
    pub claims: ClaimsConfig,
}
