//! Bazel's Build Event Protocol decoded at ingest: each stored event becomes
//! one [`Fact`], the part of it the invocation model reads.
//!
//! Decoding reads the event's stored (already redacted) bytes, so nothing a
//! fact carries can hold a credential the stored event does not. The path to
//! the `bazel_event` payload is read with a slim message ([`Envelope`]) whose
//! `bytes` field borrows from the stored buffer, and the payload is decoded
//! once, as a `build_event_stream.BuildEvent` that holds only what the model
//! reads ([`SlimEvent`]): the payloads no fact is made of (the structured
//! command line, options, configurations, sets of files: most of a stream's
//! bytes) are skipped unread, which is what keeps decoding cheap at ingest.
//! Unknown fields are skipped, so Bazel 2.1, 4.2 and newer streams all
//! decode. An event that does not decode is [`Fact::Undecodable`]: counted on
//! its invocation, never a publish failure (the raw event is stored either
//! way); a payload that is skipped is not checked beyond its length.

use bytes::Bytes;
use prost::Message;

use crate::bes::event::EventKind;
use crate::proto::build_event_stream as bep;
use crate::proto::google::devtools::build::v1::{build_event, OrderedBuildEvent};
use crate::proto::gridgate::v1 as gg;

/// Most bytes of one label, pattern or other string a fact keeps.
const MAX_STRING: usize = 4096;
/// Most items of one list a fact keeps (patterns, command line words, ...).
const MAX_ITEMS: usize = 1000;

/// What one event tells about its invocation.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Fact {
    /// Nothing the model reads.
    #[default]
    Nothing,
    /// A `bazel_event` that is not a decodable `build_event_stream.BuildEvent`.
    Undecodable,
    /// Lifecycle: the invocation attempt started.
    AttemptStarted,
    /// Lifecycle: the attempt finished with this `BuildStatus.Result`.
    AttemptFinished {
        /// The `BuildStatus.Result` number (0, UNKNOWN_STATUS, when unset).
        result: i32,
    },
    /// BEP BuildStarted.
    Started {
        /// The invocation's UUID as Bazel reports it.
        uuid: String,
        /// The Bazel command, e.g. `build` or `test`.
        command: String,
        /// `build_tool_version`, e.g. `7.4.1`.
        version: String,
        /// When the build started, in milliseconds since the Unix epoch.
        start_millis: i64,
        /// The client's workspace directory.
        workspace: String,
    },
    /// BEP PatternExpanded (the id carries the patterns).
    Patterns(Vec<String>),
    /// BEP UnstructuredCommandLine.
    CommandLine(Vec<String>),
    /// BEP WorkspaceStatus: BUILD_USER and BUILD_HOST.
    WorkspaceStatus {
        /// `BUILD_USER`, when reported.
        user: Option<String>,
        /// `BUILD_HOST`, when reported.
        host: Option<String>,
    },
    /// BEP BuildMetadata.
    Metadata(Vec<(String, String)>),
    /// BEP TargetConfigured.
    Configured {
        /// The target's label.
        label: String,
        /// The rule kind, e.g. `cc_library rule`.
        kind: String,
        /// The test size name (`SMALL`, ...); empty for non-tests.
        test_size: String,
    },
    /// BEP TargetComplete.
    Completed {
        /// The target's label.
        label: String,
        /// Whether the target built.
        success: bool,
        /// The failure detail's message; empty on success.
        failure_message: String,
        /// Labels (or primary outputs) of the failed children that caused a
        /// failure; empty on success.
        root_causes: Vec<String>,
    },
    /// BEP Aborted for a target (configured, completed or test summary id).
    Aborted {
        /// The target's label.
        label: String,
        /// The `Aborted.AbortReason` name, e.g. `USER_INTERRUPTED`.
        reason: String,
        /// Bazel's free-text explanation.
        description: String,
    },
    /// BEP ActionExecuted (failed actions, by Bazel's default).
    Action(gg::ActionFailure),
    /// BEP TestResult: one attempt.
    TestResult {
        /// The test target's label.
        label: String,
        /// The attempt: run, shard, attempt numbers, status and logs.
        run: gg::TestRun,
    },
    /// BEP TestSummary.
    TestSummary {
        /// The test target's label.
        label: String,
        /// The overall status and counts (without runs, which come from
        /// [`Fact::TestResult`]).
        summary: gg::TestInfo,
    },
    /// BEP Progress: console output (stdout, then stderr).
    Progress(String),
    /// BEP BuildFinished.
    Finished {
        /// Bazel's exit code (0 when unset).
        code: i32,
        /// The exit code's name, e.g. `SUCCESS` or `BUILD_FAILURE`.
        name: String,
        /// When the build finished, in milliseconds since the Unix epoch.
        finish_millis: i64,
    },
    /// BEP BuildMetrics.
    Metrics(gg::Metrics),
}

impl Fact {
    /// Roughly how many bytes the fact adds to its invocation's stored data
    /// (for the memory store's budget).
    pub fn weight(&self) -> u64 {
        let s = |v: &str| v.len() as u64;
        match self {
            Fact::Nothing | Fact::Undecodable | Fact::AttemptStarted => 0,
            Fact::AttemptFinished { .. } | Fact::Finished { .. } | Fact::Metrics(_) => 16,
            Fact::Started {
                uuid,
                command,
                version,
                workspace,
                ..
            } => s(uuid) + s(command) + s(version) + s(workspace),
            Fact::Patterns(v) | Fact::CommandLine(v) => v.iter().map(|x| s(x) + 2).sum(),
            Fact::WorkspaceStatus { user, host } => {
                user.as_deref().map_or(0, s) + host.as_deref().map_or(0, s)
            }
            Fact::Metadata(v) => v.iter().map(|(k, x)| s(k) + s(x) + 4).sum(),
            Fact::Configured { label, kind, .. } => 2 * s(label) + s(kind) + 16,
            Fact::Completed {
                label,
                failure_message,
                root_causes,
                ..
            } => s(label) + s(failure_message) + root_causes.iter().map(|x| s(x)).sum::<u64>() + 8,
            Fact::Aborted {
                label, description, ..
            } => s(label) + s(description) + 16,
            Fact::Action(a) => a.encoded_len() as u64,
            Fact::TestResult { label, run } => s(label) + run.encoded_len() as u64,
            Fact::TestSummary { label, summary } => s(label) + summary.encoded_len() as u64,
            Fact::Progress(text) => s(text),
        }
    }
}

/// The path from a stored `OrderedBuildEvent` to its `bazel_event` payload,
/// borrowing the payload's bytes (`event` = 3, `bazel_event` = 60, `value` = 2).
#[derive(Clone, PartialEq, Message)]
struct Envelope {
    #[prost(message, optional, tag = "3")]
    event: Option<EnvelopeEvent>,
}

#[derive(Clone, PartialEq, Message)]
struct EnvelopeEvent {
    #[prost(message, optional, tag = "60")]
    bazel_event: Option<EnvelopeAny>,
}

#[derive(Clone, PartialEq, Message)]
struct EnvelopeAny {
    #[prost(bytes = "bytes", tag = "2")]
    value: Bytes,
}

/// The part of a `build_event_stream.BuildEvent` the model reads: its id,
/// its children (left encoded until a failed TargetComplete needs them) and
/// the payloads a [`Fact`] is made of, with the field numbers of
/// `build_event_stream.proto`. Every other payload (the structured command
/// line, options, configurations, sets of files: most of a stream's bytes)
/// is skipped unread as an unknown field.
#[derive(Clone, PartialEq, Message)]
struct SlimEvent {
    #[prost(message, optional, tag = "1")]
    id: Option<bep::BuildEventId>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    children: Vec<Bytes>,
    #[prost(
        oneof = "SlimPayload",
        tags = "3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 18, 24, 26"
    )]
    payload: Option<SlimPayload>,
}

/// The payloads of [`SlimEvent`] (`BuildEvent.payload`, same field numbers).
#[derive(Clone, PartialEq, prost::Oneof)]
enum SlimPayload {
    #[prost(message, tag = "3")]
    Progress(bep::Progress),
    #[prost(message, tag = "4")]
    Aborted(bep::Aborted),
    #[prost(message, tag = "5")]
    Started(bep::BuildStarted),
    #[prost(message, tag = "6")]
    Expanded(Skipped),
    #[prost(message, tag = "7")]
    Action(bep::ActionExecuted),
    #[prost(message, tag = "8")]
    Completed(SlimTargetComplete),
    #[prost(message, tag = "9")]
    TestSummary(SlimTestSummary),
    #[prost(message, tag = "10")]
    TestResult(bep::TestResult),
    #[prost(message, tag = "12")]
    UnstructuredCommandLine(bep::UnstructuredCommandLine),
    #[prost(message, tag = "14")]
    Finished(bep::BuildFinished),
    #[prost(message, tag = "16")]
    WorkspaceStatus(bep::WorkspaceStatus),
    #[prost(message, tag = "18")]
    Configured(SlimTargetConfigured),
    #[prost(message, tag = "24")]
    BuildMetrics(bep::BuildMetrics),
    #[prost(message, tag = "26")]
    BuildMetadata(bep::BuildMetadata),
}

/// A payload whose presence is all the model reads (its fields are skipped).
#[derive(Clone, PartialEq, Message)]
struct Skipped {}

/// `TargetComplete` without its output groups and files.
#[derive(Clone, PartialEq, Message)]
struct SlimTargetComplete {
    #[prost(bool, tag = "1")]
    success: bool,
    #[prost(message, optional, tag = "9")]
    failure_detail: Option<SlimFailureDetail>,
}

/// `failure_details.FailureDetail`: its message only.
#[derive(Clone, PartialEq, Message)]
struct SlimFailureDetail {
    #[prost(string, tag = "1")]
    message: String,
}

/// `TargetConfigured` without its tags.
#[derive(Clone, PartialEq, Message)]
struct SlimTargetConfigured {
    #[prost(string, tag = "1")]
    target_kind: String,
    #[prost(enumeration = "bep::TestSize", tag = "2")]
    test_size: i32,
}

/// `TestSummary` without its lists of passed and failed files.
#[derive(Clone, PartialEq, Message)]
struct SlimTestSummary {
    #[prost(enumeration = "bep::TestStatus", tag = "5")]
    overall_status: i32,
    #[prost(int32, tag = "1")]
    total_run_count: i32,
    #[prost(int32, tag = "10")]
    run_count: i32,
    #[prost(int32, tag = "11")]
    shard_count: i32,
    #[prost(int32, tag = "6")]
    total_num_cached: i32,
    #[prost(int64, tag = "9")]
    total_run_duration_millis: i64,
}

/// The fact of a stored event (`body` is the encoded, redacted
/// `OrderedBuildEvent`).
pub fn decode(kind: EventKind, body: &Bytes) -> Fact {
    match kind {
        EventKind::BazelEvent => {
            let payload = match Envelope::decode(body.clone()) {
                Ok(Envelope {
                    event:
                        Some(EnvelopeEvent {
                            bazel_event: Some(any),
                        }),
                }) => any.value,
                _ => return Fact::Undecodable,
            };
            match SlimEvent::decode(payload) {
                Ok(e) => bep_fact(e),
                Err(_) => Fact::Undecodable,
            }
        }
        EventKind::InvocationAttemptStarted | EventKind::InvocationAttemptFinished => {
            match OrderedBuildEvent::decode(body.clone())
                .ok()
                .and_then(|e| e.event)
                .and_then(|e| e.event)
            {
                Some(build_event::Event::InvocationAttemptStarted(_)) => Fact::AttemptStarted,
                Some(build_event::Event::InvocationAttemptFinished(f)) => Fact::AttemptFinished {
                    result: f.invocation_status.map_or(0, |s| s.result),
                },
                _ => Fact::Nothing,
            }
        }
        _ => Fact::Nothing,
    }
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_STRING {
        let mut end = MAX_STRING;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn clip_all(mut v: Vec<String>) -> Vec<String> {
    v.truncate(MAX_ITEMS);
    v.into_iter().map(clip).collect()
}

fn file_uri(f: &bep::File) -> String {
    match &f.file {
        Some(bep::file::File::Uri(u)) => clip(u.clone()),
        _ => String::new(),
    }
}

fn test_status(n: i32) -> String {
    bep::TestStatus::try_from(n)
        .map_or("NO_STATUS", |s| s.as_str_name())
        .to_string()
}

/// The label an event id names, for target and test events.
fn id_label(id: Option<&bep::BuildEventId>) -> Option<String> {
    use bep::build_event_id::Id;
    Some(clip(match id?.id.as_ref()? {
        Id::TargetConfigured(t) => t.label.clone(),
        Id::TargetCompleted(t) => t.label.clone(),
        Id::TestResult(t) => t.label.clone(),
        Id::TestSummary(t) => t.label.clone(),
        Id::ActionCompleted(a) => a.label.clone(),
        Id::ConfiguredLabel(l) => l.label.clone(),
        Id::UnconfiguredLabel(l) => l.label.clone(),
        _ => return None,
    }))
}

fn bep_fact(e: SlimEvent) -> Fact {
    use bep::build_event_id::Id;
    use SlimPayload as P;
    let Some(payload) = e.payload else {
        return Fact::Nothing;
    };
    let label = || id_label(e.id.as_ref()).unwrap_or_default();
    match payload {
        P::Progress(p) => {
            let mut text = p.stdout;
            text.push_str(&p.stderr);
            if text.is_empty() {
                Fact::Nothing
            } else {
                Fact::Progress(text)
            }
        }
        P::Started(s) => Fact::Started {
            uuid: clip(s.uuid),
            command: clip(s.command),
            version: clip(s.build_tool_version),
            start_millis: s.start_time_millis,
            workspace: clip(s.workspace_directory),
        },
        P::Expanded(_) => match e.id.and_then(|i| i.id) {
            Some(Id::Pattern(p)) => Fact::Patterns(clip_all(p.pattern)),
            _ => Fact::Nothing,
        },
        P::UnstructuredCommandLine(c) => Fact::CommandLine(clip_all(c.args)),
        P::WorkspaceStatus(w) => {
            let get = |k: &str| {
                w.item
                    .iter()
                    .find(|i| i.key == k)
                    .map(|i| clip(i.value.clone()))
            };
            Fact::WorkspaceStatus {
                user: get("BUILD_USER"),
                host: get("BUILD_HOST"),
            }
        }
        P::BuildMetadata(m) => {
            let mut pairs: Vec<(String, String)> = m
                .metadata
                .into_iter()
                .map(|(k, v)| (clip(k), clip(v)))
                .collect();
            pairs.sort();
            pairs.truncate(MAX_ITEMS);
            Fact::Metadata(pairs)
        }
        P::Configured(c) => Fact::Configured {
            label: label(),
            kind: clip(c.target_kind),
            test_size: match bep::TestSize::try_from(c.test_size) {
                Ok(bep::TestSize::Unknown) | Err(_) => String::new(),
                Ok(s) => s.as_str_name().to_string(),
            },
        },
        P::Completed(c) => {
            let root_causes = if c.success {
                Vec::new()
            } else {
                clip_all(
                    e.children
                        .iter()
                        .filter_map(|child| bep::BuildEventId::decode(child.clone()).ok()?.id)
                        .filter_map(|child| match child {
                            Id::ActionCompleted(a) if !a.label.is_empty() => Some(a.label),
                            Id::ActionCompleted(a) => Some(a.primary_output),
                            Id::ConfiguredLabel(l) => Some(l.label),
                            Id::UnconfiguredLabel(l) => Some(l.label),
                            _ => None,
                        })
                        .collect(),
                )
            };
            Fact::Completed {
                label: label(),
                success: c.success,
                failure_message: c
                    .failure_detail
                    .map(|f| clip(f.message))
                    .unwrap_or_default(),
                root_causes,
            }
        }
        P::Aborted(a) => match e.id.as_ref().and_then(|i| i.id.as_ref()) {
            Some(
                Id::TargetConfigured(_)
                | Id::TargetCompleted(_)
                | Id::TestSummary(_)
                | Id::ConfiguredLabel(_)
                | Id::UnconfiguredLabel(_),
            ) => Fact::Aborted {
                label: label(),
                reason: bep::aborted::AbortReason::try_from(a.reason)
                    .map_or("UNKNOWN", |r| r.as_str_name())
                    .to_string(),
                description: clip(a.description),
            },
            _ => Fact::Nothing,
        },
        P::Action(a) => {
            let id_label = label();
            Fact::Action(gg::ActionFailure {
                mnemonic: clip(a.r#type),
                #[allow(deprecated)]
                label: if a.label.is_empty() {
                    id_label
                } else {
                    clip(a.label)
                },
                exit_code: a.exit_code,
                stdout_uri: a.stdout.as_ref().map(file_uri).unwrap_or_default(),
                stderr_uri: a.stderr.as_ref().map(file_uri).unwrap_or_default(),
                primary_output: a
                    .primary_output
                    .as_ref()
                    .map(|f| clip(f.name.clone()))
                    .unwrap_or_default(),
                failure_message: a
                    .failure_detail
                    .map(|f| clip(f.message))
                    .unwrap_or_default(),
            })
        }
        P::TestResult(t) => {
            let (run, shard, attempt) = match e.id.as_ref().and_then(|i| i.id.as_ref()) {
                Some(Id::TestResult(r)) => (r.run, r.shard, r.attempt),
                _ => (0, 0, 0),
            };
            let uri = |name: &str| {
                t.test_action_output
                    .iter()
                    .find(|f| f.name == name)
                    .map(file_uri)
                    .unwrap_or_default()
            };
            Fact::TestResult {
                label: label(),
                run: gg::TestRun {
                    run,
                    shard,
                    attempt,
                    status: test_status(t.status),
                    start_time_millis: t.test_attempt_start_millis_epoch,
                    duration_millis: t.test_attempt_duration_millis,
                    cached: t.cached_locally
                        || t.execution_info.as_ref().is_some_and(|x| x.cached_remotely),
                    test_log_uri: uri("test.log"),
                    test_xml_uri: uri("test.xml"),
                    status_details: clip(t.status_details.clone()),
                },
            }
        }
        P::TestSummary(s) => Fact::TestSummary {
            label: label(),
            summary: gg::TestInfo {
                status: test_status(s.overall_status),
                total_run_count: s.total_run_count,
                run_count: s.run_count,
                shard_count: s.shard_count,
                total_num_cached: s.total_num_cached,
                total_run_duration_millis: s.total_run_duration_millis,
                runs: Vec::new(),
                size: String::new(),
            },
        },
        P::Finished(f) => {
            let (code, name) = f
                .exit_code
                .map_or((0, String::new()), |c| (c.code, clip(c.name)));
            Fact::Finished {
                code,
                name,
                finish_millis: f.finish_time_millis,
            }
        }
        P::BuildMetrics(m) => {
            let actions = m.action_summary.unwrap_or_default();
            let cache = actions.action_cache_statistics.unwrap_or_default();
            Fact::Metrics(gg::Metrics {
                actions_created: actions.actions_created,
                actions_executed: actions.actions_executed,
                action_cache_hits: i64::from(cache.hits),
                action_cache_misses: i64::from(cache.misses),
                remote_cache_hits: actions.remote_cache_hits,
                targets_configured: m.target_metrics.map_or(0, |t| t.targets_configured),
                packages_loaded: m.package_metrics.map_or(0, |p| p.packages_loaded),
                wall_time_millis: m.timing_metrics.map_or(0, |t| t.wall_time_in_ms),
                cpu_time_millis: m.timing_metrics.map_or(0, |t| t.cpu_time_in_ms),
            })
        }
    }
}
