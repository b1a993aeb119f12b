//! Where build events rest: one store interface ([`EventStore`]) and three
//! backends, chosen by `build-events.store`:
//!
//! - [`memory::MemoryStore`] (the default): bounded by a byte budget; the
//!   oldest finished streams are evicted first;
//! - [`file::FileStore`]: an embedded durable single-node store (redb);
//! - [`postgres::PostgresStore`]: shared by several gateway replicas.
//!
//! The interface is modelled on BuildGrid's `BuildEventStreamStorage`
//! (`new_stream`, `get_stream`, `get_matching_streams`, `publish_event`,
//! `query_events`, `DuplicateStreamError`), with one difference that makes it
//! safe for several replicas and for retransmissions: a stream is not created
//! by a separate call but by storing its event number 1, atomically with the
//! checks ([`EventStore::publish_events`]). What BuildGrid's
//! `DuplicateStreamError` reports (a second BuildEnqueued for a stream) comes
//! back as [`Outcome::Duplicate`] with `identical: false` at sequence number 1;
//! an identical retransmission is `identical: true` and is acknowledged again.
//!
//! Every backend keeps the same rules, which the conformance tests in
//! `tests.rs` check against all three:
//! - sequence numbers of a stream are consecutive from 1; an event at or below
//!   the last stored number is a duplicate (never stored twice); one above the
//!   next expected number is a [`Rejection::Gap`];
//! - a stream is keyed by its instance too ([`StreamKey::instance`]): two
//!   instances publishing for the same build id write two separate streams,
//!   and neither can tell from the answers that the other exists;
//! - nothing follows a stream's final event ([`Rejection::Finished`]);
//! - [`EventStore::publish_events`] returns only after the stored events are
//!   durable (for the durable stores), so acknowledging them is safe;
//! - the invocation a batch of events feeds ([`crate::bes::invocation`]) is
//!   updated in the same transaction as the events are stored, from the
//!   [`Fact`](crate::bes::invocation::Fact)s of the events stored now (never
//!   of duplicates), so an invocation always agrees with its events.

pub mod file;
pub mod memory;
pub mod postgres;
#[cfg(test)]
pub(crate) mod tests;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use regex::Regex;

use super::event::{EventKind, Prepared, StreamKey};
use super::invocation::InvocationKey;
use crate::config::BuildEventsConfig;
use crate::proto::gridgate::v1 as gg;

/// What happened to one published event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored now.
    Stored,
    /// That sequence number was stored before (a retransmission); nothing was
    /// stored. `identical` tells whether the stored event has the same bytes.
    Duplicate {
        /// Whether the stored event's bytes equal the new one's.
        identical: bool,
    },
}

/// Why a store refused an event (and every later event of the same batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The event skips sequence numbers: the stream expects `expected` next.
    Gap {
        /// The sequence number the stream expects next.
        expected: i64,
        /// The event's sequence number.
        got: i64,
    },
    /// The stream has received its final event (number `last`) already.
    Finished {
        /// The sequence number of the stream's final event.
        last: i64,
        /// The event's sequence number.
        got: i64,
    },
    /// The store is full and nothing can be evicted to make room.
    Full {
        /// The store's budget in bytes (`build-events.max-bytes`).
        budget: u64,
    },
}

/// The result of [`EventStore::publish_events`]: one outcome per event,
/// in order, up to the first rejected one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// Outcomes of the events before the rejection (all of them without one).
    pub outcomes: Vec<Outcome>,
    /// Why the event after the last outcome was refused, if one was.
    pub rejection: Option<Rejection>,
}

/// A failure of the store itself (disk, database): the events of the batch
/// may or may not be stored, and none of them may be acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or is overloaded; retrying may help.
    #[error("build event store unavailable: {0}")]
    Unavailable(String),
    /// The backend failed.
    #[error("build event store failed: {0}")]
    Internal(String),
}

/// What a store knows about one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The stream (its instance included).
    pub key: StreamKey,
    /// The highest stored sequence number.
    pub last_seq: i64,
    /// Whether its final event is stored.
    pub finished: bool,
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Its sequence number.
    pub seq: i64,
    /// Its kind.
    pub kind: EventKind,
    /// Its `event_time` in microseconds since the Unix epoch, when it had one.
    pub time_micros: Option<i64>,
    /// The encoded (redacted) `OrderedBuildEvent`.
    pub body: Bytes,
}

/// Which events of a stream a query wants. The default wants all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only these kinds (empty: all).
    pub kinds: Vec<EventKind>,
    /// Only sequence numbers >= this.
    pub min_seq: Option<i64>,
    /// Only sequence numbers <= this.
    pub max_seq: Option<i64>,
    /// Only events with an event time >= this (microseconds since the epoch).
    pub since_micros: Option<i64>,
    /// Only events with an event time < this.
    pub until_micros: Option<i64>,
}

impl EventFilter {
    /// Whether `e` passes the filter.
    pub fn accepts(&self, e: &StoredEvent) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&e.kind))
            && self.min_seq.is_none_or(|m| e.seq >= m)
            && self.max_seq.is_none_or(|m| e.seq <= m)
            && self
                .since_micros
                .is_none_or(|s| e.time_micros.is_some_and(|t| t >= s))
            && self
                .until_micros
                .is_none_or(|u| e.time_micros.is_some_and(|t| t < u))
    }
}

/// Counters a store keeps about itself (for metrics and logs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Streams held now (memory store; 0 where unknown).
    pub streams: u64,
    /// Bytes held now (memory store; 0 where unknown).
    pub bytes: u64,
    /// Streams evicted to stay within the byte budget since start.
    pub evicted_streams: u64,
    /// Events stored since start.
    pub stored_events: u64,
    /// Retransmitted events acknowledged without storing since start.
    pub duplicate_events: u64,
}

/// The store interface every backend implements. Futures are boxed so the
/// service can hold any backend as `Arc<dyn EventStore>`.
pub trait EventStore: Send + Sync + 'static {
    /// The backend's name for logs (`memory`, `file`, `postgres`).
    fn backend(&self) -> &'static str;

    /// Stores `events` (all of one stream, in the order received), creating
    /// the stream with its event number 1 (BuildGrid's `new_stream` +
    /// `publish_event`). Stops at the first refused event; the ones before
    /// it stay stored. Returns after the stored events are durable.
    fn publish_events<'a>(
        &'a self,
        events: &'a [Prepared],
    ) -> BoxFuture<'a, Result<Published, StoreError>>;

    /// One stream, if stored (BuildGrid's `get_stream`).
    fn get_stream<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<StreamInfo>, StoreError>>;

    /// Streams whose [`StreamKey::query_key`] the pattern finds a match in,
    /// optionally only those of one instance, ordered by key (BuildGrid's
    /// `get_matching_streams`).
    fn get_matching_streams<'a>(
        &'a self,
        pattern: &'a Regex,
        instance: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<StreamInfo>, StoreError>>;

    /// A stream's events that pass `filter`, in sequence order (BuildGrid's
    /// `query_events`). A stream that does not exist has no events.
    fn query_events<'a>(
        &'a self,
        key: &'a StreamKey,
        filter: &'a EventFilter,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>>;

    /// The events of several streams that pass `filter`, one list per key in
    /// the order of `keys`. Backends where a round trip is costly answer in
    /// one; the default asks stream by stream.
    fn query_events_many<'a>(
        &'a self,
        keys: &'a [StreamKey],
        filter: &'a EventFilter,
    ) -> BoxFuture<'a, Result<Vec<Vec<StoredEvent>>, StoreError>> {
        async move {
            let mut out = Vec::with_capacity(keys.len());
            for k in keys {
                out.push(self.query_events(k, filter).await?);
            }
            Ok(out)
        }
        .boxed()
    }

    /// The store's counters.
    fn stats(&self) -> StoreStats;

    /// Invocations matching `query`, newest first (start time, then instance
    /// and invocation id, descending), after `query.after`, at most `limit`.
    fn list_invocations<'a>(
        &'a self,
        query: &'a InvocationQuery,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<gg::Invocation>, StoreError>>;

    /// One invocation's summary.
    fn get_invocation<'a>(
        &'a self,
        key: &'a InvocationKey,
    ) -> BoxFuture<'a, Result<Option<gg::Invocation>, StoreError>>;

    /// An invocation's targets in label order, after `after` (exclusive), at
    /// most `limit`.
    fn get_targets<'a>(
        &'a self,
        key: &'a InvocationKey,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<gg::Target>, StoreError>>;

    /// One step of retention: deletes up to `batch` streams (with their
    /// events and the invocations they feed) whose last event was stored
    /// before `expire_before` (ms since the epoch, by this server's clock),
    /// and marks invocations still running whose last event was stored
    /// before `abandon_before` as abandoned (up to `batch`).
    fn sweep<'a>(
        &'a self,
        expire_before: Option<i64>,
        abandon_before: Option<i64>,
        batch: usize,
    ) -> BoxFuture<'a, Result<Swept, StoreError>>;

    /// The console output chunks (offset, text) of an invocation that hold
    /// bytes at or after `offset`, in order, until about `limit` bytes.
    fn get_log<'a>(
        &'a self,
        key: &'a InvocationKey,
        offset: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(i64, Bytes)>, StoreError>>;

    /// The instances that hold an invocation with this id, in name order
    /// (ids are meant to be unique, but two instances may publish the same
    /// one). For pages reached by id alone, which keep only the instances
    /// the viewer may query.
    fn find_invocation<'a>(
        &'a self,
        invocation_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>>;
}

/// What one [`EventStore::sweep`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Streams deleted (past the maximum age).
    pub deleted_streams: u64,
    /// Invocations marked abandoned.
    pub abandoned: u64,
}

/// Now, in milliseconds since the Unix epoch (the stores' clock for ages).
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Which invocations [`EventStore::list_invocations`] returns. Every set
/// field narrows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvocationQuery {
    /// Only this instance.
    pub instance: Option<String>,
    /// Only this build id.
    pub build_id: Option<String>,
    /// Only this BUILD_USER.
    pub user: Option<String>,
    /// Only this state.
    pub state: Option<gg::InvocationState>,
    /// Only this command.
    pub command: Option<String>,
    /// Only invocations one of whose target patterns contains this.
    pub pattern: Option<String>,
    /// Only invocations whose build metadata has all of these pairs.
    pub metadata: Vec<(String, String)>,
    /// Only invocations started at or after this (ms since the epoch).
    pub started_after: Option<i64>,
    /// Only invocations started before this.
    pub started_before: Option<i64>,
    /// Only invocations after this one in the listing order.
    pub after: Option<Cursor>,
}

/// A position in the invocation listing (newest first).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cursor {
    /// Start time (ms since the epoch).
    pub start_millis: i64,
    /// Instance.
    pub instance: String,
    /// Invocation id.
    pub invocation_id: String,
}

impl Cursor {
    /// The cursor of an invocation.
    pub fn of(inv: &gg::Invocation) -> Cursor {
        Cursor {
            start_millis: inv.start_time_millis,
            instance: inv.instance_name.clone(),
            invocation_id: inv.invocation_id.clone(),
        }
    }
}

impl InvocationQuery {
    /// Whether `inv` passes every filter except the position (`after`),
    /// which stores apply with their indexes.
    pub fn matches(&self, inv: &gg::Invocation) -> bool {
        self.instance
            .as_ref()
            .is_none_or(|i| *i == inv.instance_name)
            && self.build_id.as_ref().is_none_or(|b| *b == inv.build_id)
            && self.user.as_ref().is_none_or(|u| *u == inv.user)
            && self.state.is_none_or(|s| s == inv.state())
            && self.command.as_ref().is_none_or(|c| *c == inv.command)
            && self
                .pattern
                .as_ref()
                .is_none_or(|p| inv.patterns.iter().any(|x| x.contains(p.as_str())))
            && self
                .metadata
                .iter()
                .all(|(k, v)| inv.build_metadata.get(k) == Some(v))
            && self
                .started_after
                .is_none_or(|t| inv.start_time_millis >= t)
            && self
                .started_before
                .is_none_or(|t| inv.start_time_millis < t)
    }

    /// Whether a row at `c` comes after the query's position.
    pub fn is_after(&self, c: &Cursor) -> bool {
        self.after.as_ref().is_none_or(|a| c < a)
    }
}

/// Opens the configured store (creating files, connecting and migrating the
/// database as needed).
pub async fn open(config: &BuildEventsConfig) -> Result<Arc<dyn EventStore>, StoreError> {
    Ok(match config {
        BuildEventsConfig::Memory { max_bytes } => Arc::new(memory::MemoryStore::new(*max_bytes)),
        BuildEventsConfig::File { path } => Arc::new(file::FileStore::open(path).await?),
        BuildEventsConfig::Postgres { url } => {
            let store = Arc::new(postgres::PostgresStore::connect(url).await?);
            // Streams stored before invocations were indexed get theirs
            // built in the background (a publish to one does it at once).
            let backfill = store.clone();
            tokio::spawn(async move {
                match backfill.backfill().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(streams = n, "build events: invocations built for streams stored before indexing"),
                    Err(e) => tracing::warn!(
                        "build events: building invocations of older streams failed (a publish to one builds it): {}",
                        crate::gate::audit::bounded(&e.to_string())
                    ),
                }
            });
            store
        }
    })
}

/// Applies the rules shared by every backend to one event of a stream whose
/// state is `state` (None: not stored yet). Returns what to do with it and
/// updates `state` as if it was stored.
pub(crate) fn check_event(
    state: &mut Option<StreamInfo>,
    event: &Prepared,
) -> Result<Step, Rejection> {
    match state {
        None => {
            if event.seq != 1 {
                return Err(Rejection::Gap {
                    expected: 1,
                    got: event.seq,
                });
            }
            *state = Some(StreamInfo {
                key: event.stream.clone(),
                last_seq: 1,
                finished: event.kind.finishes_stream(),
            });
            Ok(Step::Create)
        }
        Some(s) => {
            if event.seq <= s.last_seq {
                return Ok(Step::Duplicate);
            }
            if s.finished {
                return Err(Rejection::Finished {
                    last: s.last_seq,
                    got: event.seq,
                });
            }
            if event.seq != s.last_seq + 1 {
                return Err(Rejection::Gap {
                    expected: s.last_seq + 1,
                    got: event.seq,
                });
            }
            s.last_seq = event.seq;
            s.finished = event.kind.finishes_stream();
            Ok(Step::Append)
        }
    }
}

/// The literal text every build id a pattern can match starts with, when the
/// pattern is anchored at the start (`^…`) and has no alternation: the
/// pattern's leading literal characters up to the first `.` of the key (a
/// key is `{build_id}.{component}.{invocation_id}`, so a key starting with a
/// text that holds no `.` has a build id starting with it).
pub(crate) fn build_id_prefix(pattern: &str) -> Option<String> {
    let rest = pattern.strip_prefix('^')?;
    if pattern.contains('|') {
        return None;
    }
    let mut out = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        let literal = match c {
            '\\' => match chars.next() {
                Some(e) if e.is_ascii_punctuation() => e,
                _ => break, // \d, \w, \b, ...: not a literal
            },
            '.' | '[' | ']' | '(' | ')' | '{' | '}' | '*' | '+' | '?' | '^' | '$' => break,
            c => c,
        };
        // A quantifier after it makes the character optional or repeated.
        if matches!(chars.peek(), Some('*' | '?' | '{' | '+')) {
            break;
        }
        if literal == '.' {
            break;
        }
        out.push(literal);
    }
    (!out.is_empty()).then_some(out)
}

/// What [`check_event`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Create the stream with this event.
    Create,
    /// Append this event.
    Append,
    /// Compare with the stored event of that number; store nothing.
    Duplicate,
}
