//! `google.devtools.build.v1.PublishBuildEvent`: where Bazel's build events
//! come in (see ../shared/PROTOCOLS.md §1–§3 for what Bazel's client needs).
//!
//! - `PublishLifecycleEvent` stores one lifecycle event (BuildEnqueued,
//!   InvocationAttemptStarted, InvocationAttemptFinished, BuildFinished) on a
//!   CONTROLLER stream; anything else is INVALID_ARGUMENT. The event with
//!   number 1 creates its stream; a retransmission of a stored event is
//!   acknowledged again (Bazel retries after a lost response), a *different*
//!   event at a stored number is ALREADY_EXISTS (BuildGrid's
//!   `DuplicateStreamError`, which it wrongly maps to INTERNAL).
//! - `PublishBuildToolEventStream` acknowledges every event with its stream id
//!   and sequence number, in order, only after the store has it (durably, for
//!   the durable stores). Events that are already stored (a stream reopened
//!   after lost acks, starting at or before the first unacknowledged number)
//!   are acknowledged again without being stored twice. The response stream
//!   ends OK only after every event is acknowledged and the client has
//!   half-closed. Messages that arrive together are stored as one batch.
//!
//! The instance of every message is its `project_id` (Bazel's `--project_id`,
//! later `--bes_instance_name`; "" when unset): the Gate authorizes it and the
//! store keys the stream by it, so streams of different instances never
//! collide, whatever build ids their clients choose. All messages of one
//! `PublishBuildToolEventStream` call must carry the same `project_id` and
//! stream id, so the instance the Gate checked on the first message holds for
//! the whole call.
//!
//! Status codes, chosen for what Bazel does with them (Bazel 2.1 retries every
//! code except INVALID_ARGUMENT and FAILED_PRECONDITION; newer Bazel also does
//! not retry PERMISSION_DENIED):
//! - malformed input (no stream id, UNKNOWN_COMPONENT, a sequence number below
//!   1, an event over `build-events.max-event-bytes`, a lifecycle event on the
//!   tool stream or the reverse, a changed `project_id` or stream id): INVALID_ARGUMENT;
//! - a sequence gap or reordering (the event after number N is not N+1), or an
//!   event after the stream's final one: FAILED_PRECONDITION. The client
//!   resends from its first unacknowledged event, which is exactly where the
//!   gap is, so retrying cannot help: a non-retried code fails the upload at
//!   once instead of after four slow retries;
//! - a stream the memory store evicted (to stay within `build-events.max-bytes`)
//!   while this call was writing it: FAILED_PRECONDITION, saying so; its
//!   acknowledged events are gone, so resending cannot help either;
//! - a full memory store: RESOURCE_EXHAUSTED; the database or disk failing:
//!   UNAVAILABLE or INTERNAL. These are retried, and unacknowledged events are
//!   resent.
//!
//! With `check_preceding_lifecycle_events_present` (newer Bazel's
//! `--bes_check_preceding_lifecycle_events`), a tool stream is refused with
//! FAILED_PRECONDITION unless its invocation's InvocationAttemptStarted is
//! stored, and an InvocationAttemptStarted unless its build's BuildEnqueued is.
//!
//! Events acknowledged before an error stay stored; a client that disconnects
//! mid-stream loses nothing that was acknowledged.

use std::sync::Arc;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::event::{prepare, EventError, EventKind, Prepared, StreamKey};
use super::invocation::Publisher;
use super::store::{EventStore, Outcome, Published, Rejection, StoreError};
use crate::gate::audit::bounded;
use crate::proto::google::devtools::build::v1::{
    publish_build_event_server::PublishBuildEvent, stream_id::BuildComponent,
    PublishBuildToolEventStreamRequest, PublishBuildToolEventStreamResponse,
    PublishLifecycleEventRequest,
};

/// Most messages stored as one batch.
const MAX_BATCH: usize = 2048;
/// Most bytes stored as one batch (it may go over by one event).
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Most bytes of received but not yet stored messages held per call.
const READ_AHEAD_BYTES: u32 = 16 << 20;
/// Most bytes of received but not yet stored messages held by all calls together.
const READ_AHEAD_TOTAL_BYTES: usize = 256 << 20;

/// The PublishBuildEvent service.
pub struct PublishService {
    store: Arc<dyn EventStore>,
    max_event_bytes: usize,
    /// The read-ahead budget shared by every tool stream call.
    read_ahead: Arc<Semaphore>,
}

impl PublishService {
    /// A service storing into `store`, refusing events over `max_event_bytes`.
    pub fn new(store: Arc<dyn EventStore>, max_event_bytes: usize) -> PublishService {
        PublishService {
            store,
            max_event_bytes,
            read_ahead: Arc::new(Semaphore::new(READ_AHEAD_TOTAL_BYTES)),
        }
    }
}

/// Longest publisher identity kept on an invocation.
const MAX_PUBLISHER_BYTES: usize = 256;

/// Who is publishing, from the Gate's admission (none without a Gate).
fn publisher<T>(request: &Request<T>) -> Arc<Publisher> {
    let identity = request
        .extensions()
        .get::<crate::gate::Admission>()
        .and_then(|a| {
            a.identity
                .actor
                .clone()
                .or_else(|| a.identity.subject.clone())
        })
        .unwrap_or_default();
    let mut identity = identity;
    if identity.len() > MAX_PUBLISHER_BYTES {
        let mut end = MAX_PUBLISHER_BYTES;
        while !identity.is_char_boundary(end) {
            end -= 1;
        }
        identity.truncate(end);
    }
    Arc::new(Publisher {
        identity,
        keywords: Vec::new(),
    })
}

/// The keywords kept from a request (bounded in number and length).
fn keywords(list: &[String]) -> Vec<String> {
    list.iter()
        .filter(|k| k.len() <= 1024)
        .take(100)
        .cloned()
        .collect()
}

fn invalid(e: EventError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// The status for a store's refusal of an event of `stream`.
pub(crate) fn rejection_status(stream: &StreamKey, r: &Rejection) -> Status {
    match r {
        Rejection::Gap { expected, got } => Status::failed_precondition(format!(
            "sequence gap in stream {stream}: the next event must be number {expected}, got {got} \
             (sequence numbers are consecutive from 1)"
        )),
        Rejection::Finished { last, got } => Status::failed_precondition(format!(
            "stream {stream} is finished: its final event is number {last}, got {got}"
        )),
        Rejection::Full { budget } => Status::resource_exhausted(format!(
            "the build event store is full (memory budget {budget} bytes, build-events.max-bytes)"
        )),
    }
}

pub(crate) fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::Unavailable(_) => Status::unavailable(e.to_string()),
        StoreError::Internal(_) => Status::internal(e.to_string()),
    }
}

/// For `check_preceding_lifecycle_events_present`: the stream holding the
/// preceding lifecycle event must exist (under the same instance: `key`
/// carries it).
async fn require_stream(
    store: &dyn EventStore,
    key: &StreamKey,
    event: &str,
) -> Result<(), Status> {
    match store.get_stream(key).await.map_err(|e| store_status(&e))? {
        Some(_) => Ok(()),
        None => Err(Status::failed_precondition(format!(
            "check_preceding_lifecycle_events_present: no {event} was published for {key}"
        ))),
    }
}

/// Checks a lifecycle event's kind against its stream: BuildEnqueued and
/// BuildFinished on the build's stream (no invocation id),
/// InvocationAttemptStarted/Finished on the invocation's stream.
fn check_lifecycle(p: &Prepared) -> Result<(), Status> {
    if !p.kind.is_lifecycle() {
        return Err(Status::invalid_argument(format!(
            "PublishLifecycleEvent takes build_enqueued, invocation_attempt_started, \
             invocation_attempt_finished or build_finished; got {} (send it on PublishBuildToolEventStream)",
            p.kind.name()
        )));
    }
    if p.stream.component != BuildComponent::Controller as i32 {
        return Err(Status::invalid_argument(format!(
            "lifecycle events belong to CONTROLLER streams; got {}",
            p.stream.component_name()
        )));
    }
    let per_invocation = matches!(
        p.kind,
        EventKind::InvocationAttemptStarted | EventKind::InvocationAttemptFinished
    );
    if per_invocation == p.stream.invocation_id.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{} belongs to {} stream",
            p.kind.name(),
            if per_invocation {
                "an invocation's (stream_id.invocation_id set)"
            } else {
                "the build's (stream_id.invocation_id empty)"
            }
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl PublishBuildEvent for PublishService {
    async fn publish_lifecycle_event(
        &self,
        request: Request<PublishLifecycleEventRequest>,
    ) -> Result<Response<()>, Status> {
        let who = publisher(&request);
        let req = request.into_inner();
        let event = req
            .build_event
            .ok_or_else(|| invalid(EventError::MissingEvent))?;
        let mut prepared =
            prepare(&event, &req.project_id, self.max_event_bytes).map_err(invalid)?;
        prepared.decode();
        prepared.publisher = Some(who);
        check_lifecycle(&prepared)?;
        if req.check_preceding_lifecycle_events_present
            && prepared.kind == EventKind::InvocationAttemptStarted
        {
            let build = StreamKey {
                invocation_id: String::new(),
                ..prepared.stream.clone()
            };
            require_stream(&*self.store, &build, "build_enqueued").await?;
        }
        let published =
            publish_measured(&*self.store, std::slice::from_ref(&prepared), "lifecycle")
                .await
                .map_err(|e| store_status(&e))?;
        if let Some(r) = &published.rejection {
            return Err(rejection_status(&prepared.stream, r));
        }
        match published.outcomes.first() {
            Some(Outcome::Stored | Outcome::Duplicate { identical: true }) => Ok(Response::new(())),
            Some(Outcome::Duplicate { identical: false }) => Err(Status::already_exists(format!(
                "stream {} already has a different event number {}{}",
                prepared.stream,
                prepared.seq,
                if prepared.seq == 1 {
                    " (the stream exists: a build or invocation id was reused)"
                } else {
                    ""
                }
            ))),
            None => Err(Status::internal("the store returned no outcome")),
        }
    }

    type PublishBuildToolEventStreamStream =
        ReceiverStream<Result<PublishBuildToolEventStreamResponse, Status>>;

    async fn publish_build_tool_event_stream(
        &self,
        request: Request<Streaming<PublishBuildToolEventStreamRequest>>,
    ) -> Result<Response<Self::PublishBuildToolEventStreamStream>, Status> {
        let who = publisher(&request);
        let inbound = request.into_inner();
        let (acks, rx) = mpsc::channel(MAX_BATCH);
        let store = self.store.clone();
        let max_event_bytes = self.max_event_bytes;
        let shared = self.read_ahead.clone();
        tokio::spawn(async move {
            let _open = crate::metrics::OpenBesStream::new();
            ToolStream {
                store,
                max_event_bytes,
                acks,
                publisher: who,
                first: None,
                check_preceding: false,
                acked: false,
            }
            .run(inbound, shared)
            .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Stores events and measures it: time per event, events and bytes newly stored.
async fn publish_measured(
    store: &dyn EventStore,
    events: &[Prepared],
    kind: &'static str,
) -> Result<Published, StoreError> {
    if !crate::metrics::enabled() {
        return store.publish_events(events).await;
    }
    let started = std::time::Instant::now();
    let result = store.publish_events(events).await;
    if let Ok(published) = &result {
        let (mut count, mut bytes) = (0u64, 0u64);
        for (outcome, e) in published.outcomes.iter().zip(events) {
            if *outcome == Outcome::Stored {
                count += 1;
                bytes += e.body.len() as u64;
            }
        }
        crate::metrics::bes_stored(
            store.backend(),
            kind,
            count,
            bytes,
            started.elapsed(),
            published.outcomes.len(),
        );
    }
    result
}

/// One `PublishBuildToolEventStream` call.
struct ToolStream {
    store: Arc<dyn EventStore>,
    max_event_bytes: usize,
    acks: mpsc::Sender<Result<PublishBuildToolEventStreamResponse, Status>>,
    /// Who publishes (with the first message's keywords once it arrived).
    publisher: Arc<Publisher>,
    /// The stream of the first message (its `project_id` the stream's instance).
    first: Option<StreamKey>,
    /// The first message asked for `check_preceding_lifecycle_events_present`
    /// and it has not been checked yet.
    check_preceding: bool,
    /// Whether an event of this call was acknowledged (so its stream was in
    /// the store).
    acked: bool,
}

/// One item read off the request stream by [`read_ahead`].
enum Read {
    /// A message, with the buffer budget it holds until it is stored (the
    /// call's and the shared one).
    Message(
        Box<PublishBuildToolEventStreamRequest>,
        OwnedSemaphorePermit,
        OwnedSemaphorePermit,
    ),
    /// The client half-closed.
    End,
    /// The client went away or sent something undecodable.
    Error(Status),
}

impl ToolStream {
    async fn run(
        mut self,
        inbound: Streaming<PublishBuildToolEventStreamRequest>,
        shared: Arc<Semaphore>,
    ) {
        // A reader task keeps taking messages off the connection (so HTTP/2
        // flow control stays open) while a batch is being stored; what it
        // buffers is bounded by bytes.
        let (queue, mut queued) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(READ_AHEAD_BYTES as usize));
        tokio::spawn(read_ahead(inbound, queue, budget, shared));
        loop {
            // Wait for one message, then take whatever else is queued.
            let mut batch = Vec::new();
            let mut permits = Vec::new();
            let mut batch_bytes = 0;
            let mut ended = false;
            let mut failure: Option<Status> = None;
            let mut item = queued.recv().await;
            loop {
                match item {
                    Some(Read::Message(m, permit, shared)) => {
                        batch_bytes += permit.num_permits();
                        permits.push((permit, shared));
                        batch.push(*m);
                    }
                    Some(Read::End) => ended = true,
                    Some(Read::Error(s)) if batch.is_empty() => {
                        // A broken-off client will not see this; a request the
                        // Gate refused mid-stream (a later message naming
                        // another instance) carries its refusal to the client.
                        self.client_error(&s);
                        let _ = self.acks.send(Err(s)).await;
                        return;
                    }
                    Some(Read::Error(s)) => failure = Some(s),
                    None => ended = true,
                }
                if ended
                    || failure.is_some()
                    || batch.len() >= MAX_BATCH
                    || batch_bytes >= MAX_BATCH_BYTES
                {
                    break;
                }
                match queued.try_recv() {
                    Ok(next) => item = Some(next),
                    Err(_) => break,
                }
            }
            if batch.is_empty() && ended {
                return;
            }
            // Check every message; store the good ones before the first bad one.
            let mut prepared = Vec::with_capacity(batch.len());
            for m in batch {
                match self.check(m) {
                    Ok(p) => prepared.push(p),
                    Err(s) => {
                        failure = Some(s);
                        break;
                    }
                }
            }
            if self.check_preceding && !prepared.is_empty() {
                self.check_preceding = false;
                if let Some(stream) = &self.first {
                    let invocation = StreamKey {
                        component: BuildComponent::Controller as i32,
                        ..stream.clone()
                    };
                    let required =
                        require_stream(&*self.store, &invocation, "invocation_attempt_started")
                            .await;
                    if let Err(status) = required {
                        let _ = self.acks.send(Err(status)).await;
                        return;
                    }
                }
            }
            if let Some(status) = self.store_and_ack(&prepared).await {
                // A refusal by the store comes before a later bad message.
                failure = Some(status);
            }
            if let Some(status) = failure {
                tracing::debug!(
                    code = ?status.code(),
                    "build event stream failed: {}",
                    bounded(status.message())
                );
                let _ = self.acks.send(Err(status)).await;
                return;
            }
            if ended {
                return;
            }
        }
    }

    /// Logs the end of a stream the client broke off.
    fn client_error(&self, status: &Status) {
        tracing::debug!(
            stream = ?self.first.as_ref().map(|k| k.to_string()),
            code = ?status.code(),
            "build event stream ended by the client: {}",
            bounded(status.message())
        );
    }

    /// Checks one message: the same stream and project_id as the first one,
    /// a valid tool event.
    fn check(&mut self, m: PublishBuildToolEventStreamRequest) -> Result<Prepared, Status> {
        let event = m
            .ordered_build_event
            .ok_or_else(|| invalid(EventError::MissingEvent))?;
        let mut p = prepare(&event, &m.project_id, self.max_event_bytes).map_err(invalid)?;
        match &self.first {
            None => {
                if p.stream.component == BuildComponent::Controller as i32 {
                    return Err(Status::invalid_argument(
                        "PublishBuildToolEventStream takes TOOL or WORKER streams; \
                         CONTROLLER streams take lifecycle events (PublishLifecycleEvent)",
                    ));
                }
                self.first = Some(p.stream.clone());
                self.check_preceding = m.check_preceding_lifecycle_events_present;
                // Bazel sends its keywords (`--bes_keywords`, `command_name=`)
                // with the stream's first message.
                if !m.notification_keywords.is_empty() {
                    let mut who = (*self.publisher).clone();
                    who.keywords = keywords(&m.notification_keywords);
                    self.publisher = Arc::new(who);
                }
            }
            Some(stream) => {
                if stream.instance != m.project_id {
                    return Err(Status::invalid_argument(format!(
                        "project_id changed within one stream (message {} of stream {stream}); \
                         every message of a PublishBuildToolEventStream call must carry the same project_id",
                        p.seq
                    )));
                }
                if *stream != p.stream {
                    return Err(Status::invalid_argument(format!(
                        "one PublishBuildToolEventStream call carries one stream: {stream}; got an event for {}",
                        p.stream
                    )));
                }
            }
        }
        if p.kind.is_lifecycle() {
            return Err(Status::invalid_argument(format!(
                "{} is a lifecycle event: send it with PublishLifecycleEvent",
                p.kind.name()
            )));
        }
        p.decode();
        p.publisher = Some(self.publisher.clone());
        Ok(p)
    }

    /// Stores a batch and sends its acks in order. Returns the status to end
    /// the call with when the store refused an event or failed.
    async fn store_and_ack(&mut self, prepared: &[Prepared]) -> Option<Status> {
        let stream = self.first.clone()?;
        if prepared.is_empty() {
            return None;
        }
        let published = match publish_measured(&*self.store, prepared, "build_tool").await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    stream = %stream,
                    "storing build events failed: {}",
                    bounded(&e.to_string())
                );
                return Some(store_status(&e));
            }
        };
        for (outcome, p) in published.outcomes.iter().zip(prepared) {
            if *outcome == (Outcome::Duplicate { identical: false }) {
                tracing::warn!(
                    stream = %stream,
                    seq = p.seq,
                    "retransmitted build event differs from the stored one; kept the stored one"
                );
            }
            let ack = PublishBuildToolEventStreamResponse {
                stream_id: Some(stream.to_proto()),
                sequence_number: p.seq,
            };
            if self.acks.send(Ok(ack)).await.is_err() {
                // The client is gone; what was stored stays stored.
                return None;
            }
            self.acked = true;
        }
        published.rejection.as_ref().map(|r| match r {
            // The stream was in the store earlier in this call and is gone
            // now: the memory store evicted it between two batches. Not a gap
            // the client made, and resending cannot bring it back.
            Rejection::Gap { expected: 1, got } if self.acked => {
                Status::failed_precondition(format!(
                    "stream {stream} was evicted from the build event store while this call was \
                     writing it (memory store full, build-events.max-bytes): events before \
                     number {got} are lost and the stream cannot be continued"
                ))
            }
            _ => rejection_status(&stream, r),
        })
    }
}

/// Reads the request stream into `queue` until it ends, the consumer goes
/// away or an error; holds at most [`READ_AHEAD_BYTES`] of unstored messages
/// (and all calls together at most [`READ_AHEAD_TOTAL_BYTES`]).
async fn read_ahead(
    mut inbound: Streaming<PublishBuildToolEventStreamRequest>,
    queue: mpsc::UnboundedSender<Read>,
    budget: Arc<Semaphore>,
    shared: Arc<Semaphore>,
) {
    loop {
        let item = match inbound.next().await {
            Some(Ok(m)) => {
                let size = m
                    .ordered_build_event
                    .as_ref()
                    .map_or(0, prost::Message::encoded_len)
                    .clamp(1, READ_AHEAD_BYTES as usize) as u32;
                let Ok(permit) = budget.clone().acquire_many_owned(size).await else {
                    return;
                };
                let Ok(shared_permit) = shared.clone().acquire_many_owned(size).await else {
                    return;
                };
                Read::Message(Box::new(m), permit, shared_permit)
            }
            Some(Err(s)) => Read::Error(s),
            None => Read::End,
        };
        let last = !matches!(item, Read::Message(..));
        if queue.send(item).is_err() || last {
            return;
        }
    }
}
