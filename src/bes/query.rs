//! Reading build events back: BuildGrid's `build.buildgrid.QueryBuildEvents`
//! and gridgate's own `gridgate.v1.BuildEvents` (filters, streamed results).
//!
//! Both take a regular expression searched in each stream's key
//! `{build_id}.{component number}.{invocation_id}` (as BuildGrid does;
//! empty matches everything). Patterns use the `regex` crate, which matches
//! in linear time; patterns over [`MAX_PATTERN_BYTES`] or compiling to more
//! than a few hundred KiB are refused, so no pattern can stall the server.
//!
//! A caller sees only streams of instances it may `QueryEventStreams` on (the
//! Gate's [`Admission`] answers per stream). With `instance_name` set the query
//! is narrowed to that instance, and refused (PERMISSION_DENIED) if the caller
//! may not query it. The Gate puts an `Admission` into every admitted request;
//! a server without a Gate in front (tests, `authorization: none` before the
//! Gate existed) has none, and then the caller may query everything.

use std::sync::Arc;

use prost::Message;
use regex::{Regex, RegexBuilder};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::event::{check_instance, kind_names, EventKind};
use super::publish::store_status;
use super::store::{EventFilter, EventStore, StoredEvent, StreamInfo};
use crate::gate::Admission;
use crate::proto::build::buildgrid::{
    query_build_events_server::QueryBuildEvents, query_event_streams_response::BuildEventStream,
    QueryEventStreamsRequest, QueryEventStreamsResponse,
};
use crate::proto::google::devtools::build::v1::OrderedBuildEvent;
use crate::proto::gridgate::v1 as gg;

/// The ACL request name of both query RPCs.
pub const QUERY_RPC: &str = "QueryEventStreams";
/// Longest pattern accepted.
pub const MAX_PATTERN_BYTES: usize = 1024;
/// Events per chunk of the streaming query (also bounded by bytes).
const CHUNK_EVENTS: usize = 1000;
const CHUNK_BYTES: usize = 1 << 20;

/// Compiles a query pattern within the size limits.
pub fn compile_pattern(pattern: &str) -> Result<Regex, Status> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(Status::invalid_argument(format!(
            "build_id_pattern is {} bytes; the limit is {MAX_PATTERN_BYTES}",
            pattern.len()
        )));
    }
    RegexBuilder::new(pattern)
        .size_limit(256 * 1024)
        .dfa_size_limit(1 << 20)
        .nest_limit(32)
        .build()
        .map_err(|e| {
            Status::invalid_argument(format!(
                "build_id_pattern is not a valid regular expression: {e}"
            ))
        })
}

/// The caller's admission, or allow-all when no Gate set one.
fn admission<T>(request: &Request<T>) -> Admission {
    request
        .extensions()
        .get::<Admission>()
        .cloned()
        .unwrap_or_else(|| Admission::anonymous_allow_all(None, QUERY_RPC))
}

/// The streams matching `pattern` the caller may see, optionally of one instance.
async fn visible_streams(
    store: &dyn EventStore,
    admission: &Admission,
    pattern: &str,
    instance: &str,
) -> Result<Vec<StreamInfo>, Status> {
    let re = compile_pattern(pattern)?;
    check_instance("instance_name", instance)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let instance = (!instance.is_empty()).then_some(instance);
    if let Some(i) = instance {
        if !admission.may(i, QUERY_RPC) {
            return Err(Status::permission_denied(format!(
                "no rule allows {QUERY_RPC} on instance {i:?}"
            )));
        }
    }
    let streams = store
        .get_matching_streams(&re, instance)
        .await
        .map_err(|e| store_status(&e))?;
    Ok(streams
        .into_iter()
        .filter(|s| admission.may(&s.key.instance, QUERY_RPC))
        .collect())
}

/// Decodes a stored event; a record that does not decode is skipped (logged).
fn decode(stream: &StreamInfo, e: &StoredEvent) -> Option<OrderedBuildEvent> {
    match OrderedBuildEvent::decode(e.body.clone()) {
        Ok(ev) => Some(ev),
        Err(err) => {
            tracing::error!(
                stream = %stream.key,
                seq = e.seq,
                "stored build event does not decode: {}",
                crate::gate::audit::bounded(&err.to_string())
            );
            None
        }
    }
}

/// BuildGrid's QueryBuildEvents.
pub struct QueryService {
    store: Arc<dyn EventStore>,
    max_response_bytes: usize,
}

impl QueryService {
    /// A query service over `store`; unary answers are refused above
    /// `max_response_bytes` (the streaming query has no such limit).
    pub fn new(store: Arc<dyn EventStore>, max_response_bytes: usize) -> QueryService {
        QueryService {
            store,
            max_response_bytes,
        }
    }
}

#[tonic::async_trait]
impl QueryBuildEvents for QueryService {
    async fn query_event_streams(
        &self,
        request: Request<QueryEventStreamsRequest>,
    ) -> Result<Response<QueryEventStreamsResponse>, Status> {
        let admission = admission(&request);
        let req = request.into_inner();
        let streams = visible_streams(
            &*self.store,
            &admission,
            &req.build_id_pattern,
            &req.instance_name,
        )
        .await?;
        let mut out = QueryEventStreamsResponse::default();
        let mut size = 0;
        let all = EventFilter::default();
        for s in streams {
            let events = self
                .store
                .query_events(&s.key, &all)
                .await
                .map_err(|e| store_status(&e))?;
            size += events.iter().map(|e| e.body.len() + 8).sum::<usize>() + 64;
            if size > self.max_response_bytes {
                return Err(Status::resource_exhausted(format!(
                    "the matching streams exceed {} bytes; narrow build_id_pattern or instance_name, \
                     or use /gridgate.v1.BuildEvents/QueryEventStreams, which streams its results",
                    self.max_response_bytes
                )));
            }
            out.streams.push(BuildEventStream {
                stream_id: Some(s.key.to_proto()),
                events: events.iter().filter_map(|e| decode(&s, e)).collect(),
            });
        }
        Ok(Response::new(out))
    }
}

/// gridgate's BuildEvents query service.
pub struct EventsService {
    store: Arc<dyn EventStore>,
}

impl EventsService {
    /// A query service over `store`.
    pub fn new(store: Arc<dyn EventStore>) -> EventsService {
        EventsService { store }
    }
}

/// Turns the request's filters into an [`EventFilter`].
fn event_filter(req: &gg::QueryEventStreamsRequest) -> Result<EventFilter, Status> {
    let mut kinds = Vec::new();
    for k in &req.event_kinds {
        kinds.push(EventKind::from_name(k).ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown event kind {k:?}; known kinds: {}",
                kind_names()
            ))
        })?);
    }
    let micros = |t: &prost_types::Timestamp| {
        t.seconds
            .saturating_mul(1_000_000)
            .saturating_add(i64::from(t.nanos / 1000))
    };
    let seq = |n: i64, what: &str| -> Result<Option<i64>, Status> {
        match n {
            0 => Ok(None),
            n if n < 0 => Err(Status::invalid_argument(format!("{what} is negative"))),
            n => Ok(Some(n)),
        }
    };
    Ok(EventFilter {
        kinds,
        min_seq: seq(req.min_sequence_number, "min_sequence_number")?,
        max_seq: seq(req.max_sequence_number, "max_sequence_number")?,
        since_micros: req.since.as_ref().map(micros),
        until_micros: req.until.as_ref().map(micros),
    })
}

type ChunkStream = ReceiverStream<Result<gg::EventStreamChunk, Status>>;

/// Streams read from the store at once by the streaming query, at most.
const GROUP_STREAMS: usize = 256;
/// Events (estimated from the streams' last sequence numbers) read at once.
const GROUP_EVENTS: usize = 20_000;

/// Sends one stream as chunks; false when the client has gone.
async fn send_stream(
    tx: &mpsc::Sender<Result<gg::EventStreamChunk, Status>>,
    s: &StreamInfo,
    events: &[StoredEvent],
    skip_empty: bool,
) -> bool {
    if events.is_empty() && skip_empty {
        return true;
    }
    let chunk = |events: Vec<OrderedBuildEvent>, complete: bool| gg::EventStreamChunk {
        stream_id: Some(s.key.to_proto()),
        instance_name: s.key.instance.clone(),
        events,
        stream_complete: complete,
        stream_finished: s.finished,
    };
    let mut pending = Vec::new();
    let mut bytes = 0;
    for e in events {
        if pending.len() >= CHUNK_EVENTS || bytes >= CHUNK_BYTES {
            if tx
                .send(Ok(chunk(std::mem::take(&mut pending), false)))
                .await
                .is_err()
            {
                return false;
            }
            bytes = 0;
        }
        if let Some(d) = decode(s, e) {
            bytes += e.body.len();
            pending.push(d);
        }
    }
    tx.send(Ok(chunk(pending, true))).await.is_ok()
}

#[tonic::async_trait]
impl gg::build_events_server::BuildEvents for EventsService {
    type QueryEventStreamsStream = ChunkStream;

    async fn query_event_streams(
        &self,
        request: Request<gg::QueryEventStreamsRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let admission = admission(&request);
        let req = request.into_inner();
        let filter = event_filter(&req)?;
        let streams = visible_streams(
            &*self.store,
            &admission,
            &req.build_id_pattern,
            &req.instance_name,
        )
        .await?;
        // A small channel: the client's reading speed paces the store reads.
        let (tx, rx) = mpsc::channel(2);
        let store = self.store.clone();
        tokio::spawn(async move {
            // Streams are read in groups (one round trip each for the stores
            // where that matters), small enough to hold in memory.
            let mut rest = streams.as_slice();
            while !rest.is_empty() {
                let mut n = 0;
                let mut events_guess = 0;
                while n < rest.len() && n < GROUP_STREAMS && events_guess < GROUP_EVENTS {
                    events_guess += rest[n].last_seq.max(1) as usize;
                    n += 1;
                }
                let (group, later) = rest.split_at(n.max(1));
                rest = later;
                let keys: Vec<_> = group.iter().map(|s| s.key.clone()).collect();
                let all = match store.query_events_many(&keys, &filter).await {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(store_status(&e))).await;
                        return;
                    }
                };
                for (s, events) in group.iter().zip(all) {
                    if !send_stream(&tx, s, &events, req.skip_empty_streams).await {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bes::event::prepare;
    use crate::bes::store::memory::MemoryStore;
    use crate::gate::identity::Identity;
    use crate::gate::Authorizer;
    use crate::proto::google::devtools::build::v1::{build_event, BuildEvent, StreamId};

    /// May query team-a only.
    struct TeamA;
    impl Authorizer for TeamA {
        fn allows(&self, _: &Identity, instance: &str, rpc: &str) -> bool {
            instance == "team-a" && rpc == QUERY_RPC
        }
    }

    fn team_a_caller() -> Admission {
        Admission {
            identity: Arc::new(Identity::anonymous(None)),
            instance: None,
            rpc: QUERY_RPC,
            authorizer: Arc::new(TeamA),
        }
    }

    async fn store_with_two_teams() -> Arc<dyn EventStore> {
        let store = Arc::new(MemoryStore::new(1 << 20));
        for (inv, team) in [("a", "team-a"), ("b", "team-b")] {
            let e = OrderedBuildEvent {
                stream_id: Some(StreamId {
                    build_id: "build".into(),
                    invocation_id: inv.into(),
                    component: 3,
                }),
                sequence_number: 1,
                event: Some(BuildEvent {
                    event_time: None,
                    event: Some(build_event::Event::BazelEvent(prost_types::Any::default())),
                }),
            };
            let p = prepare(&e, team, 1 << 20).unwrap();
            store.publish_events(&[p]).await.unwrap();
        }
        store
    }

    #[tokio::test]
    async fn callers_see_only_instances_they_may_query() {
        let store = store_with_two_teams().await;
        let caller = team_a_caller();
        let seen = visible_streams(&*store, &caller, "", "").await.unwrap();
        assert_eq!(
            seen.iter()
                .map(|s| s.key.instance.as_str())
                .collect::<Vec<_>>(),
            vec!["team-a"]
        );
        let err = visible_streams(&*store, &caller, "", "team-b")
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let seen = visible_streams(&*store, &caller, "build", "team-a")
            .await
            .unwrap();
        assert_eq!(seen.len(), 1);

        // Through the RPC, with the Gate's admission in the extensions.
        let svc = QueryService::new(store.clone(), 1 << 20);
        let mut req = Request::new(QueryEventStreamsRequest {
            build_id_pattern: ".".into(),
            instance_name: String::new(),
        });
        req.extensions_mut().insert(caller);
        let resp = svc.query_event_streams(req).await.unwrap().into_inner();
        assert_eq!(resp.streams.len(), 1);
        assert_eq!(
            resp.streams[0]
                .stream_id
                .as_ref()
                .map(|s| s.invocation_id.as_str()),
            Some("a")
        );
        // No admission (no Gate in front): everything.
        let resp = svc
            .query_event_streams(Request::new(QueryEventStreamsRequest {
                build_id_pattern: ".".into(),
                instance_name: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.streams.len(), 2);
    }

    #[test]
    fn patterns_are_bounded() {
        assert!(compile_pattern("^abc\\.3\\.").is_ok());
        assert!(compile_pattern("").is_ok());
        assert_eq!(
            compile_pattern(&"a".repeat(MAX_PATTERN_BYTES + 1))
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
        assert!(compile_pattern("(\\w{100}){100}").is_err());
        assert!(compile_pattern(
            "((((((((((((((((((((((((((((((((((a))))))))))))))))))))))))))))))))))"
        )
        .is_err());
    }
}
