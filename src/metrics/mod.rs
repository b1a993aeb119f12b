//! Metrics: what gridgate measures, and where it goes.
//!
//! Code records through the [`metrics`] facade. [`Telemetry::install`] puts a
//! recorder behind it when the config asks for an output:
//!
//! - `metrics: { address: ... }`: a Prometheus text endpoint (`GET /metrics`)
//!   on its own HTTP listener, rendered by `metrics-exporter-prometheus`;
//! - `monitoring: { enabled: true, ... }`: BuildGrid's monitoring output, StatsD
//!   or JSON lines pushed every period ([`statsd`]).
//!
//! With neither, no recorder is installed and every measurement is a no-op.
//! Every metric is listed in [`METRICS`] (name, kind, labels, help); the
//! README's table is checked against it by a test.
//!
//! Label values that a client can choose (instance names) are bounded: an
//! instance gets its own label once it is declared in the config or a caller
//! was admitted to it, up to [`MAX_INSTANCE_LABELS`]; everything else is
//! counted under `instance="(other)"`.

mod fanout;
pub mod prometheus;
pub mod statsd;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use metrics::{Counter, Histogram, SharedString};

use crate::config::Config;

/// Distinct instance label values before the rest share `(other)`.
pub const MAX_INSTANCE_LABELS: usize = 256;

/// The label of instances beyond [`MAX_INSTANCE_LABELS`] or never admitted.
pub const OTHER_INSTANCE: &str = "(other)";

/// What kind of metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A total that only grows (Prometheus names end in `_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution of observed values (durations, in seconds).
    Histogram,
}

/// One metric gridgate records.
#[derive(Debug, Clone, Copy)]
pub struct MetricDoc {
    /// The Prometheus name, e.g. `gridgate_rpc_requests_total`.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The label names, comma-separated (`""` for none).
    pub labels: &'static str,
    /// The help text, as exported and listed in the README.
    pub help: &'static str,
}

macro_rules! metric_names {
    ($( $ident:ident = $name:literal, $kind:ident, $labels:literal, $help:literal; )*) => {
        $( #[doc = $help] pub const $ident: &str = $name; )*
        /// Every metric, for the descriptions and the README.
        pub const METRICS: &[MetricDoc] = &[
            $( MetricDoc { name: $name, kind: Kind::$kind, labels: $labels, help: $help }, )*
        ];
    };
}

metric_names! {
    RPC_REQUESTS = "gridgate_rpc_requests_total", Counter, "service, method, instance, code",
        "RPCs finished, by gRPC status code (refusals by the Gate included).";
    RPC_DURATION = "gridgate_rpc_duration_seconds", Histogram, "service, method, instance, code",
        "Time from the request's arrival to the end of its response (streams: to the last message).";
    GATE_DECISIONS = "gridgate_gate_decisions_total", Counter, "outcome, reason",
        "Gate decisions: outcome allow, deny, unauthenticated, unrouted, invalid or shed, with a short reason.";
    TOKEN_CACHE = "gridgate_token_cache_total", Counter, "result",
        "Verified-token cache lookups: hit or miss (a miss verifies the signature).";
    JWKS_FETCHES = "gridgate_jwks_fetches_total", Counter, "provider, result",
        "JWKS fetches by provider: success or failure.";
    JWKS_KEYS = "gridgate_jwks_keys", Gauge, "provider",
        "Usable keys in the provider's current key set.";
    JWKS_AGE = "gridgate_jwks_last_success_age_seconds", Gauge, "provider",
        "Seconds since the provider's last successful JWKS fetch (-1: never).";
    POLICY_RELOADS = "gridgate_policy_reloads_total", Counter, "result",
        "Policy reloads (file change or SIGHUP): success or failure (the old policy stays).";
    POLICY_INFO = "gridgate_policy_info", Gauge, "version",
        "1 for the version (fingerprint) of the policy in force, 0 for earlier ones.";
    BES_EVENTS = "gridgate_bes_events_stored_total", Counter, "kind",
        "Build events stored: kind lifecycle or build_tool.";
    BES_BYTES = "gridgate_bes_event_bytes_stored_total", Counter, "kind",
        "Bytes of build events stored.";
    BES_OPEN_STREAMS = "gridgate_bes_open_streams", Gauge, "",
        "PublishBuildToolEventStream calls in progress.";
    BES_STORE_DURATION = "gridgate_bes_store_duration_seconds", Histogram, "store",
        "Time to store one build event (durably, for the durable stores).";
    BES_EVICTIONS = "gridgate_bes_evictions_total", Counter, "store",
        "Build event streams removed to keep the store within its limits.";
    BES_RETENTION = "gridgate_bes_retention_total", Counter, "store, action",
        "Retention: action deleted_streams (past build-events.retention.max-age) or abandoned_invocations.";
    CAS_BYTES = "gridgate_cas_bytes_stored_total", Counter, "instance",
        "Bytes of blobs newly stored in a local CAS.";
    CAS_LOOKUPS = "gridgate_cas_lookups_total", Counter, "instance, result",
        "CAS blob lookups (reads and FindMissingBlobs): hit or miss.";
    CAS_EVICTIONS = "gridgate_cas_evictions_total", Counter, "instance",
        "Blobs evicted from a local CAS to stay within its byte budget.";
    UPSTREAM_ERRORS = "gridgate_upstream_errors_total", Counter, "instance, code",
        "Forwarded RPCs that ended in an error: the upstream's status, or UNAVAILABLE when unreachable.";
    CONNECTIONS = "gridgate_connections_total", Counter, "transport",
        "Connections accepted: transport tcp, tls or unix.";
    OPEN_CONNECTIONS = "gridgate_open_connections", Gauge, "",
        "Connections currently open.";
    CONNECTIONS_REFUSED = "gridgate_connections_refused_total", Counter, "",
        "Connections closed at once because limits.max-connections were open.";
    TLS_HANDSHAKE_FAILURES = "gridgate_tls_handshake_failures_total", Counter, "reason",
        "TLS handshakes that failed: reason timeout or error (bad or missing client certificate included).";
}

/// Whether a recorder is installed (measurements are skipped otherwise).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether measurements go anywhere.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The installed outputs.
pub struct Telemetry {
    prometheus: Option<prometheus::Endpoint>,
    statsd: Option<(statsd::Flusher, statsd::Sink, Duration)>,
}

/// Why the metrics outputs could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The Prometheus endpoint's address could not be bound.
    #[error("metrics.address: cannot listen on {addr}: {source}")]
    Listen {
        /// The configured `metrics.address`.
        addr: std::net::SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The `monitoring:` output (or the exporter) could not be set up; the
    /// message says why.
    #[error("{0}")]
    Monitoring(String),
    /// Another recorder was installed first (the recorder is process-wide).
    #[error("a metrics recorder is already installed in this process")]
    AlreadyInstalled,
}

impl Telemetry {
    /// Installs the process-wide recorder the config asks for and binds the
    /// Prometheus listener. `None` when the config asks for no metrics output.
    pub async fn install(config: &Config) -> Result<Option<Telemetry>, TelemetryError> {
        let want_statsd = config.monitoring.enabled;
        if config.metrics.is_none() && !want_statsd {
            return Ok(None);
        }
        let mut recorders: Vec<Box<dyn metrics::Recorder + Send + Sync>> = Vec::new();
        let prometheus = match &config.metrics {
            Some(m) => {
                let (recorder, endpoint) = prometheus::Endpoint::bind(m.address).await?;
                recorders.push(Box::new(recorder));
                Some(endpoint)
            }
            None => None,
        };
        let statsd = if want_statsd {
            let recorder = Arc::new(statsd::StatsdRecorder::new());
            recorders.push(Box::new(recorder.clone()));
            let sink = statsd::Sink::open(&config.monitoring)
                .await
                .map_err(TelemetryError::Monitoring)?;
            let flusher = statsd::Flusher::new(
                recorder,
                statsd::LineFormat::from_config(&config.monitoring),
            );
            Some((flusher, sink, config.monitoring.period))
        } else {
            None
        };
        let recorder = fanout::Fanout::new(recorders);
        metrics::set_global_recorder(recorder).map_err(|_| TelemetryError::AlreadyInstalled)?;
        describe();
        seed_instances(config);
        ENABLED.store(true, Ordering::Relaxed);
        Ok(Some(Telemetry { prometheus, statsd }))
    }

    /// The Prometheus endpoint's address, if any.
    pub fn prometheus_addr(&self) -> Option<std::net::SocketAddr> {
        self.prometheus.as_ref().map(|p| p.local_addr())
    }

    /// Starts serving and pushing; `sample` runs before each push and scrape
    /// (it sets the gauges that are read rather than counted).
    pub fn start(self, sample: Arc<dyn Fn() + Send + Sync>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        if let Some(endpoint) = self.prometheus {
            tracing::info!(
                "metrics: Prometheus endpoint on http://{}/metrics",
                endpoint.local_addr()
            );
            tasks.push(tokio::spawn(endpoint.serve(sample.clone())));
        }
        if let Some((flusher, sink, period)) = self.statsd {
            tasks.push(tokio::spawn(statsd::run(
                flusher,
                sink,
                period,
                move || sample(),
            )));
        }
        tasks
    }
}

/// Gives every metric its help text (shown by the Prometheus endpoint).
fn describe() {
    for m in METRICS {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// Instance names that may appear as label values.
static INSTANCES: OnceLock<RwLock<HashSet<Arc<str>>>> = OnceLock::new();

fn instances() -> &'static RwLock<HashSet<Arc<str>>> {
    INSTANCES.get_or_init(|| RwLock::new(HashSet::new()))
}

fn seed_instances(config: &Config) {
    let mut set = instances().write().unwrap_or_else(PoisonError::into_inner);
    set.insert(Arc::from(""));
    set.insert(Arc::from(OTHER_INSTANCE));
    for i in &config.instances {
        set.insert(Arc::from(i.name.as_str()));
    }
    for i in &config.authorization.allow_unauthenticated_instances {
        set.insert(Arc::from(i.as_str()));
    }
}

/// The label for an instance: its name if known (or, when `admitted`, newly
/// learnt while there is room), `(other)` otherwise.
pub fn instance_label(instance: &str, admitted: bool) -> SharedString {
    let set = instances();
    {
        let known = set.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(name) = known.get(instance) {
            return SharedString::from(name.clone());
        }
        if !admitted || known.len() >= MAX_INSTANCE_LABELS {
            return SharedString::const_str(OTHER_INSTANCE);
        }
    }
    let mut known = set.write().unwrap_or_else(PoisonError::into_inner);
    if known.len() >= MAX_INSTANCE_LABELS {
        return SharedString::const_str(OTHER_INSTANCE);
    }
    let name: Arc<str> = Arc::from(instance);
    known.insert(name.clone());
    SharedString::from(name)
}

/// The gRPC status code's name, as used in labels (`OK`, `PERMISSION_DENIED`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The handles of one RPC series, looked up once and reused.
#[derive(Clone)]
struct RpcHandles {
    count: Counter,
    duration: Histogram,
}

type RpcKey = (&'static str, &'static str, SharedString, tonic::Code);

static RPC_HANDLES: OnceLock<RwLock<HashMap<RpcKey, RpcHandles>>> = OnceLock::new();

/// Records one finished RPC.
pub fn record_rpc(
    service: &'static str,
    method: &'static str,
    instance: &SharedString,
    code: tonic::Code,
    elapsed: Duration,
) {
    if !enabled() {
        return;
    }
    let map = RPC_HANDLES.get_or_init(|| RwLock::new(HashMap::new()));
    let key: RpcKey = (service, method, instance.clone(), code);
    let cached = map
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&key)
        .cloned();
    let handles = match cached {
        Some(h) => h,
        None => {
            let labels = vec![
                metrics::Label::new("service", service),
                metrics::Label::new("method", method),
                metrics::Label::new("instance", instance.clone()),
                metrics::Label::new("code", code_name(code)),
            ];
            let h = RpcHandles {
                count: metrics::counter!(RPC_REQUESTS, labels.clone()),
                duration: metrics::histogram!(RPC_DURATION, labels),
            };
            map.write()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(key, h.clone());
            h
        }
    };
    handles.count.increment(1);
    handles.duration.record(elapsed.as_secs_f64());
}

/// Counter handles looked up once per key: the per-request paths pay a
/// read-locked map lookup instead of a registry lookup in every recorder.
struct Handles<K> {
    map: OnceLock<RwLock<HashMap<K, Counter>>>,
}

impl<K: std::hash::Hash + Eq + Clone> Handles<K> {
    const fn new() -> Self {
        Handles {
            map: OnceLock::new(),
        }
    }

    fn get(&self, key: &K, make: impl FnOnce() -> Counter) -> Counter {
        let map = self.map.get_or_init(|| RwLock::new(HashMap::new()));
        if let Some(c) = map.read().unwrap_or_else(PoisonError::into_inner).get(key) {
            return c.clone();
        }
        let c = make();
        map.write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.clone(), c.clone());
        c
    }
}

static GATE_HANDLES: Handles<(&'static str, &'static str)> = Handles::new();
static TOKEN_HANDLES: OnceLock<[Counter; 2]> = OnceLock::new();

/// Counts a Gate decision.
#[inline]
pub fn gate_decision(outcome: &'static str, reason: &'static str) {
    if enabled() {
        GATE_HANDLES
            .get(
                &(outcome, reason),
                || metrics::counter!(GATE_DECISIONS, "outcome" => outcome, "reason" => reason),
            )
            .increment(1);
    }
}

/// Counts a token cache lookup.
#[inline]
pub fn token_cache(hit: bool) {
    if enabled() {
        let [hits, misses] = TOKEN_HANDLES.get_or_init(|| {
            [
                metrics::counter!(TOKEN_CACHE, "result" => "hit"),
                metrics::counter!(TOKEN_CACHE, "result" => "miss"),
            ]
        });
        if hit { hits } else { misses }.increment(1);
    }
}

/// Counts a JWKS fetch of one URL.
pub fn jwks_fetch(provider: &str, ok: bool) {
    if enabled() {
        let result = if ok { "success" } else { "failure" };
        metrics::counter!(JWKS_FETCHES, "provider" => provider.to_string(), "result" => result)
            .increment(1);
    }
}

/// Sets a JWKS provider's gauges.
pub fn jwks_gauges(provider: &str, keys: usize, age_seconds: f64) {
    if enabled() {
        metrics::gauge!(JWKS_KEYS, "provider" => provider.to_string()).set(keys as f64);
        metrics::gauge!(JWKS_AGE, "provider" => provider.to_string()).set(age_seconds);
    }
}

/// Counts a policy reload and marks the version in force.
pub fn policy_reload(ok: bool, old_version: &str, new_version: &str) {
    if !enabled() {
        return;
    }
    let result = if ok { "success" } else { "failure" };
    metrics::counter!(POLICY_RELOADS, "result" => result).increment(1);
    if ok && old_version != new_version {
        policy_version(Some(old_version), new_version);
    }
}

/// Marks `version` as the policy in force (and `old` as replaced).
pub fn policy_version(old: Option<&str>, version: &str) {
    if !enabled() {
        return;
    }
    if let Some(old) = old {
        metrics::gauge!(POLICY_INFO, "version" => old.to_string()).set(0.0);
    }
    metrics::gauge!(POLICY_INFO, "version" => version.to_string()).set(1.0);
}

/// Counts a forwarded RPC that ended in an error.
pub fn upstream_error(instance: &SharedString, code: tonic::Code) {
    if enabled() {
        metrics::counter!(UPSTREAM_ERRORS, "instance" => instance.clone(), "code" => code_name(code))
            .increment(1);
    }
}

/// Counts a connection while it is open (counted when made, released on drop).
pub struct OpenConnection(bool);

impl OpenConnection {
    /// Counts a new connection over `transport` (`tcp`, `tls` or `unix`) and
    /// holds it in the open-connections gauge until dropped.
    pub fn new(transport: &'static str) -> OpenConnection {
        if !enabled() {
            return OpenConnection(false);
        }
        metrics::counter!(CONNECTIONS, "transport" => transport).increment(1);
        metrics::gauge!(OPEN_CONNECTIONS).increment(1.0);
        OpenConnection(true)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.0 {
            metrics::gauge!(OPEN_CONNECTIONS).decrement(1.0);
        }
    }
}

/// Counts a failed TLS handshake (`error` or `timeout`).
pub fn tls_handshake_failure(reason: &'static str) {
    if enabled() {
        metrics::counter!(TLS_HANDSHAKE_FAILURES, "reason" => reason).increment(1);
    }
}

/// Counts build events newly stored by one publish call, and the time it took
/// per event.
pub fn bes_stored(
    store: &'static str,
    kind: &'static str,
    events: u64,
    bytes: u64,
    elapsed: Duration,
    attempted: usize,
) {
    if !enabled() {
        return;
    }
    if events > 0 {
        metrics::counter!(BES_EVENTS, "kind" => kind).increment(events);
        metrics::counter!(BES_BYTES, "kind" => kind).increment(bytes);
    }
    if attempted > 0 {
        let per_event = elapsed.as_secs_f64() / attempted as f64;
        metrics::histogram!(BES_STORE_DURATION, "store" => store).record(per_event);
    }
}

/// Sets the BES store's eviction counter from the store's own count.
pub fn bes_evictions(store: &'static str, evicted: u64) {
    if enabled() {
        metrics::counter!(BES_EVICTIONS, "store" => store).absolute(evicted);
    }
}

/// Counts what one retention batch did.
pub fn bes_retention(store: &'static str, deleted_streams: u64, abandoned: u64) {
    if enabled() {
        metrics::counter!(BES_RETENTION, "store" => store, "action" => "deleted_streams")
            .increment(deleted_streams);
        metrics::counter!(BES_RETENTION, "store" => store, "action" => "abandoned_invocations")
            .increment(abandoned);
    }
}

/// Counts an open PublishBuildToolEventStream call while it runs.
pub struct OpenBesStream(bool);

impl OpenBesStream {
    /// Holds one call in the open-streams gauge until dropped.
    pub fn new() -> OpenBesStream {
        if !enabled() {
            return OpenBesStream(false);
        }
        metrics::gauge!(BES_OPEN_STREAMS).increment(1.0);
        OpenBesStream(true)
    }
}

impl Default for OpenBesStream {
    fn default() -> Self {
        OpenBesStream::new()
    }
}

impl Drop for OpenBesStream {
    fn drop(&mut self) {
        if self.0 {
            metrics::gauge!(BES_OPEN_STREAMS).decrement(1.0);
        }
    }
}

/// The counters of one local CAS.
#[derive(Clone)]
pub struct CasCounters {
    /// Lookups that found their blob.
    pub hits: Counter,
    /// Lookups that did not.
    pub misses: Counter,
    /// Bytes of blobs newly stored.
    pub bytes_stored: Counter,
}

impl CasCounters {
    /// The counters of `instance` (no-ops when no recorder is installed).
    pub fn new(instance: &str) -> CasCounters {
        if !enabled() {
            return CasCounters {
                hits: Counter::noop(),
                misses: Counter::noop(),
                bytes_stored: Counter::noop(),
            };
        }
        let label = instance_label(instance, true);
        CasCounters {
            hits: metrics::counter!(CAS_LOOKUPS, "instance" => label.clone(), "result" => "hit"),
            misses: metrics::counter!(CAS_LOOKUPS, "instance" => label.clone(), "result" => "miss"),
            bytes_stored: metrics::counter!(CAS_BYTES, "instance" => label),
        }
    }
}

/// Sets an instance's CAS eviction counter from the store's own count.
pub fn cas_evictions(instance: &str, evicted: u64) {
    if enabled() {
        metrics::counter!(CAS_EVICTIONS, "instance" => instance_label(instance, true))
            .absolute(evicted);
    }
}

/// Counts a connection closed at once by the connection limit.
pub fn connection_refused() {
    if enabled() {
        metrics::counter!(CONNECTIONS_REFUSED).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_documents_every_metric() {
        let readme = include_str!("../../README.md");
        for m in METRICS {
            let row = format!("| `{}` |", m.name);
            assert!(readme.contains(&row), "README has no row for {}", m.name);
        }
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        for m in METRICS {
            assert!(m.name.starts_with("gridgate_"), "{}", m.name);
            assert!(
                m.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                m.name
            );
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                Kind::Histogram => assert!(m.name.ends_with("_seconds"), "{}", m.name),
                Kind::Gauge => assert!(!m.name.ends_with("_total"), "{}", m.name),
            }
        }
    }

    #[test]
    fn every_code_has_a_name() {
        for i in 0..17 {
            let code = tonic::Code::from_i32(i);
            assert_eq!(
                code_name(code).to_ascii_lowercase().replace('_', ""),
                format!("{code:?}").to_ascii_lowercase()
            );
        }
    }
}
