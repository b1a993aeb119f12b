//! BuildGrid's `monitoring:` output: metrics pushed as StatsD (or JSON) lines to
//! stdout, a file, a Unix socket or a UDP address, once per period.
//!
//! The recorder keeps its own registry. Every `period` the flusher turns it
//! into lines:
//!
//! - counters: the increase since the last flush, `name:5|c` (nothing when 0);
//! - gauges: the current value, `name:3|g`;
//! - histograms: the samples of the period, durations in milliseconds
//!   (`name_ms:1.25|ms`), sizes as `|h`. Above [`MAX_SAMPLES`] samples per
//!   series and period, an evenly spread subset is sent with its sample rate
//!   (`|@0.01`), as StatsD clients do, so the output stays bounded under load.
//!
//! Tags (the metric's labels plus `additional-tags`) are written in the
//! configured `tag-format`:
//!
//! ```text
//! none           gridgate_rpc_requests_total:1|c
//! influx-statsd  gridgate_rpc_requests_total,code=OK,method=Write:1|c
//! dogstatsd      gridgate_rpc_requests_total:1|c|#code:OK,method:Write
//! graphite       gridgate_rpc_requests_total;code=OK;method=Write:1|c
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};

use crate::config::MonitoringConfig;

/// At most this many samples per histogram series are sent per period.
pub const MAX_SAMPLES: usize = 64;

/// The largest UDP datagram sent (lines are batched up to this size).
const MAX_DATAGRAM: usize = 1432;

/// How tags are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagFormat {
    /// `none`: tags are left out.
    None,
    /// `influx-statsd`: `name,key=value:1|c`.
    InfluxStatsd,
    /// `dogstatsd`: `name:1|c|#key:value`.
    DogStatsd,
    /// `graphite`: `name;key=value:1|c`.
    Graphite,
}

impl TagFormat {
    fn parse(s: &str) -> TagFormat {
        match s {
            "influx-statsd" => TagFormat::InfluxStatsd,
            "dogstatsd" => TagFormat::DogStatsd,
            "graphite" => TagFormat::Graphite,
            _ => TagFormat::None,
        }
    }
}

/// How one record is serialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `serialization-format: statsd`: one StatsD line per record.
    Statsd,
    /// `serialization-format: json`: one JSON object per line (`name`,
    /// `type`, `value`, `tags`, and `sample_rate` when sampled).
    Json,
}

/// The kind of a StatsD record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Timer,
    Histogram,
}

impl Kind {
    fn statsd(self) -> &'static str {
        match self {
            Kind::Counter => "c",
            Kind::Gauge => "g",
            Kind::Timer => "ms",
            Kind::Histogram => "h",
        }
    }
    fn json(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Timer => "timer",
            Kind::Histogram => "histogram",
        }
    }
}

/// Formats records as lines.
#[derive(Debug, Clone)]
pub struct LineFormat {
    prefix: String,
    format: Format,
    tags: TagFormat,
    additional: Vec<(String, String)>,
}

impl LineFormat {
    /// The prefix, format and tags of the `monitoring:` section.
    pub fn from_config(m: &MonitoringConfig) -> LineFormat {
        LineFormat {
            prefix: m.metric_prefix.clone(),
            format: if m.serialization_format == "json" {
                Format::Json
            } else {
                Format::Statsd
            },
            tags: TagFormat::parse(&m.tag_format),
            additional: m
                .additional_tags
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// One record as a line (without the newline).
    fn line(
        &self,
        key: &Key,
        name_suffix: &str,
        value: f64,
        kind: Kind,
        rate: Option<f64>,
    ) -> String {
        let mut tags: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
        tags.extend(
            self.additional
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let name = format!("{}{}{}", self.prefix, key.name(), name_suffix);
        let mut out = String::with_capacity(96);
        match self.format {
            Format::Json => {
                let tags: BTreeMap<&str, &str> = tags.into_iter().collect();
                let mut record = serde_json::json!({
                    "name": name,
                    "type": kind.json(),
                    "value": value,
                    "tags": tags,
                });
                if let (Some(rate), Some(obj)) = (rate, record.as_object_mut()) {
                    obj.insert("sample_rate".into(), serde_json::json!(rate));
                }
                out.push_str(&record.to_string());
            }
            Format::Statsd => {
                let clean = |s: &str| -> String {
                    s.chars()
                        .map(|c| match c {
                            ':' | '|' | ',' | ';' | '=' | '#' | '@' | '\n' | ' ' => '_',
                            c => c,
                        })
                        .collect()
                };
                out.push_str(&clean(&name));
                if self.tags == TagFormat::InfluxStatsd {
                    for (k, v) in &tags {
                        let _ = write!(out, ",{}={}", clean(k), clean(v));
                    }
                }
                if self.tags == TagFormat::Graphite {
                    for (k, v) in &tags {
                        let _ = write!(out, ";{}={}", clean(k), clean(v));
                    }
                }
                let _ = write!(out, ":{}|{}", Number(value), kind.statsd());
                if let Some(rate) = rate {
                    let _ = write!(out, "|@{}", Number(rate));
                }
                if self.tags == TagFormat::DogStatsd && !tags.is_empty() {
                    out.push_str("|#");
                    for (i, (k, v)) in tags.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        let _ = write!(out, "{}:{}", clean(k), clean(v));
                    }
                }
            }
        }
        out
    }
}

/// A number as StatsD expects it: integers without a fraction.
struct Number(f64);

impl std::fmt::Display for Number {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.0.is_finite() {
            return f.write_str("0");
        }
        if self.0.fract() == 0.0 && self.0.abs() < 1e15 {
            return write!(f, "{}", self.0 as i64);
        }
        let text = format!("{:.6}", self.0);
        f.write_str(text.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// The recorder behind `monitoring:`.
pub struct StatsdRecorder {
    registry: Registry<Key, AtomicStorage>,
}

impl std::fmt::Debug for StatsdRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsdRecorder")
    }
}

impl Default for StatsdRecorder {
    fn default() -> Self {
        StatsdRecorder::new()
    }
}

impl StatsdRecorder {
    /// A recorder with an empty registry.
    pub fn new() -> StatsdRecorder {
        StatsdRecorder {
            registry: Registry::atomic(),
        }
    }
}

impl Recorder for StatsdRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

/// Turns the recorder's registry into lines, period after period.
pub struct Flusher {
    recorder: Arc<StatsdRecorder>,
    format: LineFormat,
    last: HashMap<Key, u64>,
}

impl Flusher {
    /// Reads `recorder`'s registry and writes lines in `format`; counters
    /// start from zero.
    pub fn new(recorder: Arc<StatsdRecorder>, format: LineFormat) -> Flusher {
        Flusher {
            recorder,
            format,
            last: HashMap::new(),
        }
    }

    /// The lines of one period.
    pub fn lines(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        let registry = &self.recorder.registry;
        let mut counters = Vec::new();
        registry.visit_counters(|key, c| {
            counters.push((key.clone(), c.load(std::sync::atomic::Ordering::Relaxed)));
        });
        counters.sort_by(|a, b| a.0.name().cmp(b.0.name()));
        for (key, value) in counters {
            let before = self.last.insert(key.clone(), value).unwrap_or(0);
            let delta = value.saturating_sub(before);
            if delta > 0 {
                lines.push(
                    self.format
                        .line(&key, "", delta as f64, Kind::Counter, None),
                );
            }
        }
        let mut gauges = Vec::new();
        registry.visit_gauges(|key, g| {
            let v = f64::from_bits(g.load(std::sync::atomic::Ordering::Relaxed));
            gauges.push((key.clone(), v));
        });
        gauges.sort_by(|a, b| a.0.name().cmp(b.0.name()));
        for (key, v) in gauges {
            lines.push(self.format.line(&key, "", v, Kind::Gauge, None));
        }
        let mut histograms = Vec::new();
        registry.visit_histograms(|key, h| {
            let mut samples = Vec::new();
            h.clear_with(|values| samples.extend_from_slice(values));
            if !samples.is_empty() {
                histograms.push((key.clone(), samples));
            }
        });
        histograms.sort_by(|a, b| a.0.name().cmp(b.0.name()));
        for (key, samples) in histograms {
            // Durations are recorded in seconds (Prometheus' base unit) and
            // sent as StatsD timers in milliseconds.
            let (kind, suffix, scale) = match key.name().strip_suffix("_seconds") {
                Some(_) => (Kind::Timer, "_ms", 1000.0),
                None => (Kind::Histogram, "", 1.0),
            };
            let name = key.name().strip_suffix("_seconds").unwrap_or(key.name());
            let renamed =
                Key::from_parts(name.to_string(), key.labels().cloned().collect::<Vec<_>>());
            let n = samples.len();
            if n <= MAX_SAMPLES {
                for v in samples {
                    lines.push(self.format.line(&renamed, suffix, v * scale, kind, None));
                }
            } else {
                let rate = MAX_SAMPLES as f64 / n as f64;
                for i in 0..MAX_SAMPLES {
                    let v = samples[i * n / MAX_SAMPLES];
                    lines.push(
                        self.format
                            .line(&renamed, suffix, v * scale, kind, Some(rate)),
                    );
                }
            }
        }
        lines
    }
}

/// Where the lines go.
pub enum Sink {
    /// `endpoint-type: stdout` (the default).
    Stdout,
    /// `endpoint-type: file`: appended to the file at `endpoint-location`.
    File(std::fs::File),
    /// `endpoint-type: socket`: written to a Unix stream socket.
    Socket {
        /// The socket's path (`endpoint-location`).
        path: std::path::PathBuf,
        /// The connection, made on first send and again after a write fails.
        stream: Option<tokio::net::UnixStream>,
    },
    /// `endpoint-type: udp`: datagrams of up to 1432 bytes, connected to the
    /// `host:port` at `endpoint-location`.
    Udp(tokio::net::UdpSocket),
    /// `endpoint-type: silent`: lines are dropped.
    Silent,
}

impl Sink {
    /// Opens the configured endpoint; errors name the location.
    pub async fn open(m: &MonitoringConfig) -> Result<Sink, String> {
        let location = m.endpoint_location.clone().unwrap_or_default();
        match m.endpoint_type.as_str() {
            "silent" => Ok(Sink::Silent),
            "file" => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&location)
                .map(Sink::File)
                .map_err(|e| format!("monitoring.endpoint-location: cannot open {location}: {e}")),
            "socket" => Ok(Sink::Socket {
                path: location.into(),
                stream: None,
            }),
            "udp" => {
                let target = tokio::net::lookup_host(&location)
                    .await
                    .map_err(|e| {
                        format!("monitoring.endpoint-location: cannot resolve {location}: {e}")
                    })?
                    .next()
                    .ok_or_else(|| {
                        format!("monitoring.endpoint-location: {location} has no address")
                    })?;
                let local = if target.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                };
                let socket = tokio::net::UdpSocket::bind(local)
                    .await
                    .map_err(|e| format!("monitoring: cannot open a UDP socket: {e}"))?;
                socket
                    .connect(target)
                    .await
                    .map_err(|e| format!("monitoring.endpoint-location: {location}: {e}"))?;
                Ok(Sink::Udp(socket))
            }
            _ => Ok(Sink::Stdout),
        }
    }

    /// Sends the lines; a failure is logged and the lines are dropped (metrics
    /// never hold up requests).
    pub async fn send(&mut self, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        match self {
            Sink::Silent => {}
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                for l in lines {
                    let _ = writeln!(out, "{l}");
                }
                let _ = out.flush();
            }
            Sink::File(f) => {
                let mut text = String::new();
                for l in lines {
                    text.push_str(l);
                    text.push('\n');
                }
                if let Err(e) = f.write_all(text.as_bytes()) {
                    tracing::warn!("monitoring: cannot write the metrics file: {e}");
                }
            }
            Sink::Socket { path, stream } => {
                use tokio::io::AsyncWriteExt;
                let mut text = String::new();
                for l in lines {
                    text.push_str(l);
                    text.push('\n');
                }
                for attempt in 0..2 {
                    if stream.is_none() {
                        match tokio::net::UnixStream::connect(&*path).await {
                            Ok(s) => *stream = Some(s),
                            Err(e) => {
                                tracing::debug!(
                                    "monitoring: cannot connect to {}: {e}",
                                    path.display()
                                );
                                return;
                            }
                        }
                    }
                    let Some(s) = stream.as_mut() else { return };
                    match s.write_all(text.as_bytes()).await {
                        Ok(()) => return,
                        Err(e) => {
                            *stream = None;
                            if attempt == 1 {
                                tracing::debug!("monitoring: writing to {}: {e}", path.display());
                            }
                        }
                    }
                }
            }
            Sink::Udp(socket) => {
                for datagram in batch(lines, MAX_DATAGRAM) {
                    if let Err(e) = socket.send(datagram.as_bytes()).await {
                        // Nobody listening (ICMP port unreachable) is normal for StatsD.
                        tracing::debug!("monitoring: UDP send: {e}");
                    }
                }
            }
        }
    }
}

/// Joins lines with newlines into datagrams of at most `max` bytes (a longer
/// line goes alone).
pub fn batch(lines: &[String], max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for l in lines {
        if !current.is_empty() && current.len() + 1 + l.len() > max {
            out.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push('\n');
        }
        current.push_str(l);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Flushes every `period` until aborted, and once more when asked to stop.
pub async fn run(mut flusher: Flusher, mut sink: Sink, period: Duration, before: impl Fn() + Send) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        before();
        let lines = flusher.lines();
        sink.send(&lines).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Label;

    fn format(tags: &str, json: bool) -> LineFormat {
        LineFormat {
            prefix: "gg.".into(),
            format: if json { Format::Json } else { Format::Statsd },
            tags: TagFormat::parse(tags),
            additional: vec![("env".into(), "prod".into())],
        }
    }

    fn key() -> Key {
        Key::from_parts(
            "rpc_total",
            vec![Label::new("method", "Write"), Label::new("code", "OK")],
        )
    }

    #[test]
    fn tag_formats() {
        let k = key();
        assert_eq!(
            format("none", false).line(&k, "", 3.0, Kind::Counter, None),
            "gg.rpc_total:3|c"
        );
        assert_eq!(
            format("influx-statsd", false).line(&k, "", 3.0, Kind::Counter, None),
            "gg.rpc_total,method=Write,code=OK,env=prod:3|c"
        );
        assert_eq!(
            format("dogstatsd", false).line(&k, "", 1.5, Kind::Timer, Some(0.5)),
            "gg.rpc_total:1.5|ms|@0.5|#method:Write,code:OK,env:prod"
        );
        assert_eq!(
            format("graphite", false).line(&k, "", 2.0, Kind::Gauge, None),
            "gg.rpc_total;method=Write;code=OK;env=prod:2|g"
        );
        let json: serde_json::Value =
            serde_json::from_str(&format("none", true).line(&k, "", 3.0, Kind::Counter, None))
                .unwrap();
        assert_eq!(json["name"], "gg.rpc_total");
        assert_eq!(json["type"], "counter");
        assert_eq!(json["value"], 3.0);
        assert_eq!(json["tags"]["env"], "prod");
        assert_eq!(json["tags"]["method"], "Write");
    }

    #[test]
    fn separators_in_values_cannot_forge_tags() {
        let k = Key::from_parts("x", vec![Label::new("instance", "a,b=c:1|c\n#")]);
        let line = format("influx-statsd", false).line(&k, "", 1.0, Kind::Counter, None);
        assert_eq!(line, "gg.x,instance=a_b_c_1_c__,env=prod:1|c");
    }

    #[test]
    fn counters_send_deltas_and_histograms_are_sampled() {
        let rec = Arc::new(StatsdRecorder::new());
        let meta = Metadata::new("t", metrics::Level::INFO, None);
        let c = rec.register_counter(&Key::from_name("hits"), &meta);
        let h = rec.register_histogram(&Key::from_name("latency_seconds"), &meta);
        let mut f = Flusher::new(rec.clone(), format("none", false));
        c.increment(2);
        h.record(0.002);
        assert_eq!(f.lines(), vec!["gg.hits:2|c", "gg.latency_ms:2|ms"]);
        assert!(f.lines().is_empty(), "nothing new, nothing sent");
        c.increment(1);
        for _ in 0..1000 {
            h.record(0.001);
        }
        let lines = f.lines();
        assert_eq!(lines[0], "gg.hits:1|c");
        assert_eq!(lines.len(), 1 + MAX_SAMPLES);
        assert_eq!(lines[1], "gg.latency_ms:1|ms|@0.064");
    }

    #[test]
    fn datagrams_hold_whole_lines() {
        let lines: Vec<String> = (0..100).map(|i| format!("metric_{i}:1|c")).collect();
        let d = batch(&lines, 100);
        assert!(d.iter().all(|p| p.len() <= 100));
        let rejoined: Vec<&str> = d.iter().flat_map(|p| p.split('\n')).collect();
        assert_eq!(rejoined.len(), 100);
        assert_eq!(rejoined[99], "metric_99:1|c");
    }
}
