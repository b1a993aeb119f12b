//! What the Build Event Service knows about an event: which stream it belongs
//! to ([`StreamKey`]), what kind it is ([`EventKind`]), and the checks every
//! published event passes before it reaches a store ([`Prepared`]).

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use super::invocation::{Fact, Publisher};

use crate::proto::google::devtools::build::v1::{
    build_event, stream_id::BuildComponent, OrderedBuildEvent, StreamId,
};

/// Identifies one event stream: the protocol's `(build_id, invocation_id,
/// component)` under the instance that publishes it.
///
/// The instance (the publisher's `project_id`, which the Gate authorizes) is
/// part of the key so that one team's streams can never collide with
/// another's: a team that publishes first for a build id neither blocks
/// another team's stream of that build id nor learns that it exists. Keys
/// order by build id first (the instance last), as queries list them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    /// The build request id (Bazel's `--build_request_id`, a UUID).
    pub build_id: String,
    /// The invocation id; empty for the build-level controller stream.
    pub invocation_id: String,
    /// The `StreamId.BuildComponent` number (1 controller, 2 worker, 3 tool).
    pub component: i32,
    /// The instance that owns the stream.
    pub instance: String,
}

impl StreamKey {
    /// The key that query patterns are searched in, as BuildGrid forms it:
    /// `{build_id}.{component}.{invocation_id}` with the component as its
    /// enum number (BuildGrid formats the Python protobuf enum, an int).
    pub fn query_key(&self) -> String {
        format!(
            "{}.{}.{}",
            self.build_id, self.component, self.invocation_id
        )
    }

    /// The protobuf `StreamId`.
    pub fn to_proto(&self) -> StreamId {
        StreamId {
            build_id: self.build_id.clone(),
            invocation_id: self.invocation_id.clone(),
            component: self.component,
        }
    }

    /// The component's name, for messages and the CLI.
    pub fn component_name(&self) -> &'static str {
        component_name(self.component)
    }
}

/// The name of a `StreamId.BuildComponent` number.
pub fn component_name(component: i32) -> &'static str {
    match BuildComponent::try_from(component) {
        Ok(BuildComponent::Controller) => "CONTROLLER",
        Ok(BuildComponent::Worker) => "WORKER",
        Ok(BuildComponent::Tool) => "TOOL",
        Ok(BuildComponent::UnknownComponent) => "UNKNOWN_COMPONENT",
        Err(_) => "INVALID_COMPONENT",
    }
}

/// Shown in error messages and log lines, each id cut by
/// [`bounded`](crate::gate::audit::bounded): a client's id never reaches a log
/// line whole.
impl std::fmt::Display for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::gate::audit::bounded;
        write!(
            f,
            "{{build_id {:?}, invocation_id {:?}, {}}}",
            bounded(&self.build_id),
            bounded(&self.invocation_id),
            self.component_name()
        )
    }
}

/// The kind of a build event: which field of the `BuildEvent.event` oneof is
/// set. The number is the field number (also what stores persist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Lifecycle: an attempt of an invocation started.
    InvocationAttemptStarted = 51,
    /// Lifecycle: an attempt of an invocation finished, with its result.
    InvocationAttemptFinished = 52,
    /// Lifecycle: the build was enqueued.
    BuildEnqueued = 53,
    /// Lifecycle: the build finished, with its result.
    BuildFinished = 55,
    /// Text the tool printed (stdout or stderr).
    ConsoleOutput = 56,
    /// The last event of a component's stream.
    ComponentStreamFinished = 59,
    /// A Bazel Build Event Protocol event (`build_event_stream.BuildEvent` in
    /// an `Any`).
    BazelEvent = 60,
    /// A build execution event, as an opaque `Any`.
    BuildExecutionEvent = 61,
    /// A source fetch event, as an opaque `Any`.
    SourceFetchEvent = 62,
    /// A Buck2 event, as an opaque `Any`.
    BuckEvent = 63,
}

impl EventKind {
    /// Every kind, in field-number order.
    pub const ALL: [EventKind; 10] = [
        EventKind::InvocationAttemptStarted,
        EventKind::InvocationAttemptFinished,
        EventKind::BuildEnqueued,
        EventKind::BuildFinished,
        EventKind::ConsoleOutput,
        EventKind::ComponentStreamFinished,
        EventKind::BazelEvent,
        EventKind::BuildExecutionEvent,
        EventKind::SourceFetchEvent,
        EventKind::BuckEvent,
    ];

    /// The oneof field name, e.g. `bazel_event` (used by query filters).
    pub fn name(self) -> &'static str {
        match self {
            EventKind::InvocationAttemptStarted => "invocation_attempt_started",
            EventKind::InvocationAttemptFinished => "invocation_attempt_finished",
            EventKind::BuildEnqueued => "build_enqueued",
            EventKind::BuildFinished => "build_finished",
            EventKind::ConsoleOutput => "console_output",
            EventKind::ComponentStreamFinished => "component_stream_finished",
            EventKind::BazelEvent => "bazel_event",
            EventKind::BuildExecutionEvent => "build_execution_event",
            EventKind::SourceFetchEvent => "source_fetch_event",
            EventKind::BuckEvent => "buck_event",
        }
    }

    /// The kind with this oneof field name.
    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kind with this field number (as stores persist it).
    pub fn from_number(n: i32) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| *k as i32 == n)
    }

    /// The kind of a decoded event.
    pub fn of(event: &build_event::Event) -> EventKind {
        use build_event::Event as E;
        match event {
            E::InvocationAttemptStarted(_) => EventKind::InvocationAttemptStarted,
            E::InvocationAttemptFinished(_) => EventKind::InvocationAttemptFinished,
            E::BuildEnqueued(_) => EventKind::BuildEnqueued,
            E::BuildFinished(_) => EventKind::BuildFinished,
            E::ConsoleOutput(_) => EventKind::ConsoleOutput,
            E::ComponentStreamFinished(_) => EventKind::ComponentStreamFinished,
            E::BazelEvent(_) => EventKind::BazelEvent,
            E::BuildExecutionEvent(_) => EventKind::BuildExecutionEvent,
            E::SourceFetchEvent(_) => EventKind::SourceFetchEvent,
            E::BuckEvent(_) => EventKind::BuckEvent,
        }
    }

    /// Whether this is one of the four lifecycle events, which only
    /// `PublishLifecycleEvent` takes.
    pub fn is_lifecycle(self) -> bool {
        matches!(
            self,
            EventKind::BuildEnqueued
                | EventKind::InvocationAttemptStarted
                | EventKind::InvocationAttemptFinished
                | EventKind::BuildFinished
        )
    }

    /// Whether this event is the last of its stream: nothing may follow it.
    pub fn finishes_stream(self) -> bool {
        matches!(
            self,
            EventKind::ComponentStreamFinished
                | EventKind::InvocationAttemptFinished
                | EventKind::BuildFinished
        )
    }
}

/// The names of every kind, for error messages and help.
pub fn kind_names() -> String {
    EventKind::ALL
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An event ready for a store: checked, redacted and encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Its stream.
    pub stream: StreamKey,
    /// Its sequence number (>= 1).
    pub seq: i64,
    /// Its kind.
    pub kind: EventKind,
    /// Its `event_time` in microseconds since the Unix epoch, when set.
    pub time_micros: Option<i64>,
    /// The encoded `OrderedBuildEvent`, with credentials redacted.
    pub body: Bytes,
    /// What it tells about its invocation ([`Fact::Nothing`] until decoded
    /// with [`Prepared::decode`]).
    pub fact: Fact,
    /// Who published it, when known.
    pub publisher: Option<Arc<Publisher>>,
}

impl Prepared {
    /// Decodes the stored bytes into the event's [`Fact`] (once, at ingest).
    pub fn decode(&mut self) {
        self.fact = super::invocation::decode(self.kind, &self.body);
    }
}

/// Why an event was refused before reaching the store (all INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The request carries no `ordered_build_event`.
    #[error("the request has no ordered_build_event")]
    MissingEvent,
    /// The event has no `stream_id`.
    #[error("the event has no stream_id")]
    MissingStreamId,
    /// The stream id's `build_id` is empty.
    #[error("stream_id.build_id is empty")]
    MissingBuildId,
    /// The stream id's component is UNKNOWN_COMPONENT or a number outside the
    /// enum (the number given).
    #[error("stream_id.component is {0} (UNKNOWN_COMPONENT or not a known component); expected CONTROLLER, WORKER or TOOL")]
    UnknownComponent(i32),
    /// The sequence number (given) is below 1.
    #[error("sequence_number is {0}; sequence numbers start at 1")]
    BadSequence(i64),
    /// `BuildEvent.event` is unset or of a kind this server does not know.
    #[error("the event has no build event (BuildEvent.event is unset or of a kind this server does not know)")]
    MissingKind,
    /// The encoded event is over `build-events.max-event-bytes`.
    #[error("the event is {size} bytes encoded, over the limit of {limit} bytes (build-events.max-event-bytes)")]
    TooLarge {
        /// The encoded event's size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// An id field is longer than its limit (e.g. [`MAX_ID_BYTES`]).
    #[error("{field} is {len} bytes long, over the limit of {limit} bytes ({name})")]
    FieldTooLong {
        /// The field's protocol name, e.g. `stream_id.build_id`.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        limit: usize,
        /// What the limit is, for the message.
        name: &'static str,
    },
}

/// Longest build id and invocation id accepted, when publishing and in
/// queries (Bazel sends UUIDs: 36 bytes).
pub const MAX_ID_BYTES: usize = 1024;
/// What [`MAX_ID_BYTES`] is called in messages.
const ID_LIMIT_NAME: &str = "the limit for build and invocation ids";
/// Longest instance (`project_id`, `instance_name`) the Build Event Service
/// accepts: the largest `limits.max-instance-name-bytes` can be. The Gate
/// refuses an instance over the configured limit before the service sees it;
/// this bound holds where no Gate is in front.
pub const MAX_INSTANCE_BYTES: usize = 65_536;

/// Checks a build id or invocation id from a client against [`MAX_ID_BYTES`].
pub fn check_id(field: &'static str, value: &str) -> Result<(), EventError> {
    check_len(field, value, MAX_ID_BYTES, ID_LIMIT_NAME)
}

/// Checks an instance name from a client against [`MAX_INSTANCE_BYTES`].
pub fn check_instance(field: &'static str, value: &str) -> Result<(), EventError> {
    check_len(
        field,
        value,
        MAX_INSTANCE_BYTES,
        "the largest limits.max-instance-name-bytes",
    )
}

fn check_len(
    field: &'static str,
    value: &str,
    limit: usize,
    name: &'static str,
) -> Result<(), EventError> {
    if value.len() > limit {
        return Err(EventError::FieldTooLong {
            field,
            len: value.len(),
            limit,
            name,
        });
    }
    Ok(())
}

/// Checks an event's stream id, sequence number, kind and size, redacts
/// credentials in it and encodes it for storing in a stream of `instance`
/// (the request's `project_id`).
pub fn prepare(
    event: &OrderedBuildEvent,
    instance: &str,
    max_event_bytes: usize,
) -> Result<Prepared, EventError> {
    let sid = event
        .stream_id
        .as_ref()
        .ok_or(EventError::MissingStreamId)?;
    if sid.build_id.is_empty() {
        return Err(EventError::MissingBuildId);
    }
    check_id("stream_id.build_id", &sid.build_id)?;
    check_id("stream_id.invocation_id", &sid.invocation_id)?;
    check_instance("project_id", instance)?;
    match BuildComponent::try_from(sid.component) {
        Ok(BuildComponent::Controller | BuildComponent::Worker | BuildComponent::Tool) => {}
        _ => return Err(EventError::UnknownComponent(sid.component)),
    }
    if event.sequence_number < 1 {
        return Err(EventError::BadSequence(event.sequence_number));
    }
    let build_event = event
        .event
        .as_ref()
        .and_then(|e| e.event.as_ref())
        .ok_or(EventError::MissingKind)?;
    let kind = EventKind::of(build_event);
    let size = event.encoded_len();
    if size > max_event_bytes {
        return Err(EventError::TooLarge {
            size,
            limit: max_event_bytes,
        });
    }
    let time_micros = event
        .event
        .as_ref()
        .and_then(|e| e.event_time.as_ref())
        .map(|t| {
            t.seconds
                .saturating_mul(1_000_000)
                .saturating_add(i64::from(t.nanos / 1000))
        });
    let mut body = Vec::with_capacity(size);
    event.encode(&mut body).map_err(|_| EventError::TooLarge {
        size,
        limit: max_event_bytes,
    })?;
    super::redact::redact_message(&mut body);
    Ok(Prepared {
        stream: StreamKey {
            build_id: sid.build_id.clone(),
            invocation_id: sid.invocation_id.clone(),
            component: sid.component,
            instance: instance.to_string(),
        },
        seq: event.sequence_number,
        kind,
        time_micros,
        body: Bytes::from(body),
        fact: Fact::Nothing,
        publisher: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::google::devtools::build::v1::BuildEvent;

    fn event(component: i32, seq: i64) -> OrderedBuildEvent {
        OrderedBuildEvent {
            stream_id: Some(StreamId {
                build_id: "b".into(),
                invocation_id: "i".into(),
                component,
            }),
            sequence_number: seq,
            event: Some(BuildEvent {
                event_time: Some(prost_types::Timestamp {
                    seconds: 10,
                    nanos: 5_000,
                }),
                event: Some(build_event::Event::BazelEvent(prost_types::Any {
                    type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
                    value: vec![1, 2, 3],
                })),
            }),
        }
    }

    #[test]
    fn prepare_checks_each_field() {
        let p = prepare(&event(3, 1), "i", 1 << 20).unwrap();
        assert_eq!(p.kind, EventKind::BazelEvent);
        assert_eq!(p.time_micros, Some(10_000_005));
        assert_eq!(p.stream.query_key(), "b.3.i");
        assert_eq!(
            OrderedBuildEvent::decode(p.body.clone()).unwrap(),
            event(3, 1)
        );
        assert_eq!(
            prepare(&event(0, 1), "i", 1 << 20),
            Err(EventError::UnknownComponent(0))
        );
        assert_eq!(
            prepare(&event(9, 1), "i", 1 << 20),
            Err(EventError::UnknownComponent(9))
        );
        assert_eq!(
            prepare(&event(3, 0), "i", 1 << 20),
            Err(EventError::BadSequence(0))
        );
        assert!(matches!(
            prepare(&event(3, 1), "i", 10),
            Err(EventError::TooLarge { limit: 10, .. })
        ));
        let mut e = event(3, 1);
        e.stream_id = None;
        assert_eq!(prepare(&e, "i", 1 << 20), Err(EventError::MissingStreamId));
        let mut e = event(3, 1);
        e.event = None;
        assert_eq!(prepare(&e, "i", 1 << 20), Err(EventError::MissingKind));
    }

    #[test]
    fn ids_over_the_limit_are_refused_naming_the_field_and_the_limit() {
        let mut e = event(3, 1);
        if let Some(s) = e.stream_id.as_mut() {
            s.build_id = "b".repeat(MAX_ID_BYTES + 1);
        }
        let err = prepare(&e, "i", 1 << 20).unwrap_err();
        assert_eq!(
            err.to_string(),
            "stream_id.build_id is 1025 bytes long, over the limit of 1024 bytes \
             (the limit for build and invocation ids)"
        );
        let mut e = event(3, 1);
        if let Some(s) = e.stream_id.as_mut() {
            s.invocation_id = "i".repeat(MAX_ID_BYTES + 1);
        }
        assert!(matches!(
            prepare(&e, "i", 1 << 20),
            Err(EventError::FieldTooLong {
                field: "stream_id.invocation_id",
                ..
            })
        ));
        let long = "p".repeat(MAX_INSTANCE_BYTES + 1);
        assert!(matches!(
            prepare(&event(3, 1), &long, 1 << 20),
            Err(EventError::FieldTooLong {
                field: "project_id",
                ..
            })
        ));
        let mut e = event(3, 1);
        if let Some(s) = e.stream_id.as_mut() {
            s.build_id = "b".repeat(MAX_ID_BYTES);
        }
        assert!(prepare(&e, "i", 1 << 20).is_ok());
    }

    #[test]
    fn a_stream_key_is_shown_with_its_ids_cut() {
        let key = StreamKey {
            build_id: "b".repeat(MAX_ID_BYTES),
            invocation_id: "i".repeat(MAX_ID_BYTES),
            component: 3,
            instance: String::new(),
        };
        let shown = key.to_string();
        assert!(shown.len() < 700, "{shown}");
        assert!(shown.contains("(1024 bytes)"), "{shown}");
        assert!(!shown.contains(&"b".repeat(300)), "{shown}");
    }

    #[test]
    fn kinds_round_trip() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::from_name(k.name()), Some(k));
            assert_eq!(EventKind::from_number(k as i32), Some(k));
        }
        assert_eq!(EventKind::from_name("nope"), None);
    }
}
