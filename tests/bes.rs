//! Black-box tests of the Build Event Service: a real gateway on loopback,
//! tonic clients behaving like Bazel's BES uploader (and misbehaving), the same
//! suite against the memory, file and PostgreSQL stores.

mod common;
#[path = "common/jwks_server.rs"]
mod jwks_server;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{loopback_config, pg, plain_channel, run_binary, with_token, TestServer};
use gridgate::proto::build::buildgrid::{
    query_build_events_client::QueryBuildEventsClient, QueryEventStreamsRequest,
};
use gridgate::proto::google::devtools::build::v1::{
    build_event, publish_build_event_client::PublishBuildEventClient, BuildEvent,
    OrderedBuildEvent, PublishBuildToolEventStreamRequest, PublishLifecycleEventRequest, StreamId,
};
use gridgate::proto::gridgate::v1 as gg;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

const CONTROLLER: i32 = 1;
const TOOL: i32 = 3;

/// A build id no other test uses.
fn unique(name: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{name}-{nanos:x}-{}", N.fetch_add(1, Ordering::Relaxed))
}

fn sid(build: &str, inv: &str, component: i32) -> StreamId {
    StreamId {
        build_id: build.into(),
        invocation_id: inv.into(),
        component,
    }
}

fn ordered(stream: &StreamId, seq: i64, event: build_event::Event) -> OrderedBuildEvent {
    OrderedBuildEvent {
        stream_id: Some(stream.clone()),
        sequence_number: seq,
        event: Some(BuildEvent {
            event_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + seq,
                nanos: 0,
            }),
            event: Some(event),
        }),
    }
}

/// A `bazel_event` whose payload is `payload`.
fn bazel(payload: &[u8]) -> build_event::Event {
    build_event::Event::BazelEvent(prost_types::Any {
        type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
        value: payload.to_vec(),
    })
}

fn finished() -> build_event::Event {
    build_event::Event::ComponentStreamFinished(build_event::BuildComponentStreamFinished {
        r#type: 1,
    })
}

/// Tool-stream requests for events `from..=to` (the last `finished` when it is `last`).
fn tool_events(
    stream: &StreamId,
    project: &str,
    from: i64,
    to: i64,
    last: i64,
) -> Vec<PublishBuildToolEventStreamRequest> {
    (from..=to)
        .map(|seq| {
            let event = if seq == last {
                finished()
            } else {
                bazel(format!("event {seq}").as_bytes())
            };
            PublishBuildToolEventStreamRequest {
                ordered_build_event: Some(ordered(stream, seq, event)),
                notification_keywords: if seq == 1 {
                    vec!["command_name=build".into(), "protocol_name=BEP".into()]
                } else {
                    vec![]
                },
                project_id: project.into(),
                ..Default::default()
            }
        })
        .collect()
}

fn lifecycle(
    stream: &StreamId,
    seq: i64,
    project: &str,
    event: build_event::Event,
) -> PublishLifecycleEventRequest {
    PublishLifecycleEventRequest {
        service_level: 1,
        build_event: Some(ordered(stream, seq, event)),
        project_id: project.into(),
        ..Default::default()
    }
}

fn enqueued() -> build_event::Event {
    build_event::Event::BuildEnqueued(build_event::BuildEnqueued { details: None })
}

fn attempt_started() -> build_event::Event {
    build_event::Event::InvocationAttemptStarted(build_event::InvocationAttemptStarted {
        attempt_number: 1,
        details: None,
    })
}

fn attempt_finished() -> build_event::Event {
    build_event::Event::InvocationAttemptFinished(build_event::InvocationAttemptFinished {
        invocation_status: None,
        details: None,
    })
}

fn build_finished() -> build_event::Event {
    build_event::Event::BuildFinished(build_event::BuildFinished {
        status: None,
        details: None,
    })
}

/// Sends `msgs` on one PublishBuildToolEventStream call, half-closes, and
/// collects the acked sequence numbers and how the call ended.
async fn publish_stream(
    channel: &Channel,
    msgs: Vec<PublishBuildToolEventStreamRequest>,
) -> (Vec<i64>, Result<(), tonic::Status>) {
    let mut client = PublishBuildEventClient::new(channel.clone());
    let expected_stream = msgs
        .first()
        .and_then(|m| m.ordered_build_event.as_ref())
        .and_then(|e| e.stream_id.clone());
    let mut acks = Vec::new();
    let mut responses = match client
        .publish_build_tool_event_stream(tokio_stream::iter(msgs))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return (acks, Err(s)),
    };
    loop {
        match responses.message().await {
            Ok(Some(ack)) => {
                assert_eq!(ack.stream_id, expected_stream, "ack names the stream");
                acks.push(ack.sequence_number);
            }
            Ok(None) => return (acks, Ok(())),
            Err(s) => return (acks, Err(s)),
        }
    }
}

async fn publish_lifecycle(
    channel: &Channel,
    req: PublishLifecycleEventRequest,
) -> Result<(), tonic::Status> {
    PublishBuildEventClient::new(channel.clone())
        .publish_lifecycle_event(req)
        .await
        .map(|_| ())
}

/// BuildGrid's QueryEventStreams: (stream key, sequence numbers) per stream.
async fn query(channel: &Channel, pattern: &str) -> Vec<(StreamId, Vec<OrderedBuildEvent>)> {
    let resp = QueryBuildEventsClient::new(channel.clone())
        .query_event_streams(QueryEventStreamsRequest {
            build_id_pattern: pattern.into(),
            instance_name: String::new(),
        })
        .await
        .expect("query")
        .into_inner();
    resp.streams
        .into_iter()
        .map(|s| (s.stream_id.unwrap_or_default(), s.events))
        .collect()
}

fn seqs(events: &[OrderedBuildEvent]) -> Vec<i64> {
    events.iter().map(|e| e.sequence_number).collect()
}

async fn tool_seqs(channel: &Channel, build: &str) -> Vec<i64> {
    let streams = query(channel, &format!("^{}\\.3\\.", regex_escape(build))).await;
    assert!(streams.len() <= 1, "{streams:?}");
    streams.first().map(|(_, e)| seqs(e)).unwrap_or_default()
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_string()
            } else {
                format!("\\{c}")
            }
        })
        .collect()
}

/// What Bazel does: BuildEnqueued, InvocationAttemptStarted, the tool
/// stream, InvocationAttemptFinished, BuildFinished; retransmitted lifecycle
/// events acknowledged again; the three streams found by a query.
async fn bazel_like_build(ch: &Channel) {
    let build = unique("life");
    let bs = sid(&build, "", CONTROLLER);
    let is = sid(&build, "inv-1", CONTROLLER);
    let ts = sid(&build, "inv-1", TOOL);
    publish_lifecycle(ch, lifecycle(&bs, 1, "team-a", enqueued()))
        .await
        .unwrap();
    // Bazel retries a lifecycle event whose response was lost.
    publish_lifecycle(ch, lifecycle(&bs, 1, "team-a", enqueued()))
        .await
        .unwrap();
    publish_lifecycle(ch, lifecycle(&is, 1, "team-a", attempt_started()))
        .await
        .unwrap();

    let mut msgs = tool_events(&ts, "team-a", 1, 40, 41);
    msgs.push(PublishBuildToolEventStreamRequest {
        ordered_build_event: Some(ordered(
            &ts,
            41,
            build_event::Event::ConsoleOutput(build_event::ConsoleOutput {
                r#type: 2,
                output: Some(build_event::console_output::Output::TextOutput(
                    "INFO: Build completed successfully\n".into(),
                )),
            }),
        )),
        project_id: "team-a".into(),
        ..Default::default()
    });
    msgs.extend(tool_events(&ts, "team-a", 42, 42, 42));
    let (acks, end) = publish_stream(ch, msgs).await;
    end.unwrap();
    assert_eq!(
        acks,
        (1..=42).collect::<Vec<_>>(),
        "every event acked, in order"
    );

    publish_lifecycle(ch, lifecycle(&is, 2, "team-a", attempt_finished()))
        .await
        .unwrap();
    publish_lifecycle(ch, lifecycle(&bs, 2, "team-a", build_finished()))
        .await
        .unwrap();

    let streams = query(ch, &format!("^{}\\.", regex_escape(&build))).await;
    let got: Vec<(StreamId, Vec<i64>)> =
        streams.iter().map(|(s, e)| (s.clone(), seqs(e))).collect();
    assert_eq!(
        got,
        vec![
            (bs.clone(), vec![1, 2]),
            (is.clone(), vec![1, 2]),
            (ts.clone(), (1..=42).collect()),
        ]
    );
    // Stored bytes are the events as sent.
    let tool = &streams[2].1;
    assert_eq!(tool[4], ordered(&ts, 5, bazel(b"event 5")));

    // A different event claiming the build stream's first place.
    let mut other = lifecycle(&bs, 1, "team-a", enqueued());
    if let Some(e) = other.build_event.as_mut().and_then(|e| e.event.as_mut()) {
        e.event_time = None;
    }
    let err = publish_lifecycle(ch, other).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    // Nothing follows a finished stream.
    let (acks, end) = publish_stream(ch, tool_events(&ts, "team-a", 43, 43, 0)).await;
    assert!(acks.is_empty());
    assert_eq!(end.unwrap_err().code(), Code::FailedPrecondition);
    // Lifecycle events only on PublishLifecycleEvent and the reverse.
    let err = publish_lifecycle(ch, lifecycle(&bs, 3, "team-a", bazel(b"x")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = publish_lifecycle(
        ch,
        lifecycle(&sid(&build, "inv-1", TOOL), 1, "team-a", enqueued()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = publish_lifecycle(
        ch,
        lifecycle(&sid(&build, "", CONTROLLER), 1, "team-a", attempt_started()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut msgs = tool_events(&sid(&build, "inv-2", TOOL), "team-a", 1, 1, 0);
    msgs[0].ordered_build_event = Some(ordered(&sid(&build, "inv-2", TOOL), 1, enqueued()));
    let (_, end) = publish_stream(ch, msgs).await;
    assert_eq!(end.unwrap_err().code(), Code::InvalidArgument);
}

/// Lost acks: the client reconnects and resends from an earlier number or
/// from its first unacknowledged one; nothing is stored twice.
async fn retransmission(ch: &Channel) {
    let build = unique("retx");
    let ts = sid(&build, "inv", TOOL);
    let all = tool_events(&ts, "team-a", 1, 30, 30);

    // Send 1..=10, read 4 acks, then drop the call (the rest of the acks are "lost").
    let (tx, rx) = mpsc::channel(32);
    let mut client = PublishBuildEventClient::new(ch.clone());
    for m in &all[..10] {
        tx.send(m.clone()).await.unwrap();
    }
    let mut responses = client
        .publish_build_tool_event_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for want in 1..=4 {
        let ack = responses.message().await.unwrap().unwrap();
        assert_eq!(ack.sequence_number, want);
    }
    drop(responses);
    drop(tx);
    // Acknowledged events stay stored after the client went away.
    let mut stored = Vec::new();
    for _ in 0..100 {
        stored = tool_seqs(ch, &build).await;
        if stored.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(&stored[..4], &[1, 2, 3, 4]);

    // A continuation stream starting at the first unacknowledged number (5),
    // as Bazel does, up to 20.
    let (acks, end) = publish_stream(ch, all[4..20].to_vec()).await;
    end.unwrap();
    assert_eq!(acks, (5..=20).collect::<Vec<_>>());
    // One starting earlier than needed (at 2) through the end.
    let (acks, end) = publish_stream(ch, all[1..].to_vec()).await;
    end.unwrap();
    assert_eq!(acks, (2..=30).collect::<Vec<_>>());
    assert_eq!(tool_seqs(ch, &build).await, (1..=30).collect::<Vec<_>>());
}

/// Reordered or skipped sequence numbers end the call with FAILED_PRECONDITION
/// after the good events before them are acked.
async fn gaps_and_reordering(ch: &Channel) {
    let build = unique("gap");
    let ts = sid(&build, "inv", TOOL);
    let all = tool_events(&ts, "team-a", 1, 10, 10);
    // 1, 2, 4, 3: reordered.
    let msgs = vec![
        all[0].clone(),
        all[1].clone(),
        all[3].clone(),
        all[2].clone(),
    ];
    let (acks, end) = publish_stream(ch, msgs).await;
    assert_eq!(acks, vec![1, 2]);
    let err = end.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("expected") || err.message().contains("must be number 3"),
        "{}",
        err.message()
    );
    // A new stream that does not start at 1.
    let other = sid(&unique("gap2"), "inv", TOOL);
    let (acks, end) = publish_stream(ch, tool_events(&other, "team-a", 3, 5, 0)).await;
    assert!(acks.is_empty());
    assert_eq!(end.unwrap_err().code(), Code::FailedPrecondition);
    // The first stream goes on where it stopped.
    let (acks, end) = publish_stream(ch, all[2..].to_vec()).await;
    end.unwrap();
    assert_eq!(acks, (3..=10).collect::<Vec<_>>());
    assert_eq!(tool_seqs(ch, &build).await, (1..=10).collect::<Vec<_>>());
}

/// Streams are keyed by instance: another instance's events for the same
/// stream id go to that instance's own stream, and nothing in the answers
/// tells either instance that the other's exists.
async fn instances_do_not_share_streams(ch: &Channel) {
    let build = unique("own");
    let ts = sid(&build, "inv", TOOL);
    let (acks, end) = publish_stream(ch, tool_events(&ts, "team-a", 1, 3, 0)).await;
    end.unwrap();
    assert_eq!(acks, vec![1, 2, 3]);
    // team-b continuing "team-a's" stream gets what any new stream gets
    // when it does not start at 1: a gap.
    let (acks, end) = publish_stream(ch, tool_events(&ts, "team-b", 4, 5, 0)).await;
    assert!(acks.is_empty());
    let err = end.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("must be number 1"),
        "{}",
        err.message()
    );
    // Its own stream of that id starts at 1.
    let (acks, end) = publish_stream(ch, tool_events(&ts, "team-b", 1, 2, 2)).await;
    end.unwrap();
    assert_eq!(acks, vec![1, 2]);
    let bs = sid(&build, "", CONTROLLER);
    publish_lifecycle(ch, lifecycle(&bs, 1, "team-a", enqueued()))
        .await
        .unwrap();
    publish_lifecycle(ch, lifecycle(&bs, 1, "team-b", enqueued()))
        .await
        .unwrap();
    // project_id may not change within one call: the Gate holds every later
    // message to the first one's instance and ends the call with
    // PERMISSION_DENIED after the messages before it; event 3 is never
    // acknowledged or stored.
    let other = sid(&unique("own2"), "inv", TOOL);
    let mut msgs = tool_events(&other, "team-a", 1, 3, 0);
    msgs[2].project_id = "team-b".into();
    let (acks, end) = publish_stream(ch, msgs).await;
    assert!(
        acks.len() <= 2 && acks.iter().copied().eq(1..=acks.len() as i64),
        "{acks:?}"
    );
    let err = end.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("project_id"), "{err:?}");
    assert!(!tool_seqs(ch, &other.build_id).await.contains(&3));
    // Both streams of `build`, each under its own instance.
    let streams = query(ch, &format!("^{}\\.3\\.", regex_escape(&build))).await;
    let mut lens: Vec<usize> = streams.iter().map(|(_, e)| e.len()).collect();
    lens.sort_unstable();
    assert_eq!(lens, vec![2, 3]);
}

/// Bad input gets a clear INVALID_ARGUMENT; what was acked before stays.
async fn bad_input(ch: &Channel) {
    let build = unique("bad");
    let ts = sid(&build, "inv", TOOL);
    let good = tool_events(&ts, "team-a", 1, 2, 0);
    let cases: Vec<(&str, PublishBuildToolEventStreamRequest)> = vec![
        ("no stream id", {
            let mut m = tool_events(&ts, "team-a", 3, 3, 0).remove(0);
            if let Some(e) = m.ordered_build_event.as_mut() {
                e.stream_id = None;
            }
            m
        }),
        ("unknown component", {
            let mut m = tool_events(&ts, "team-a", 3, 3, 0).remove(0);
            if let Some(e) = m.ordered_build_event.as_mut() {
                e.stream_id = Some(sid(&build, "inv", 0));
            }
            m
        }),
        (
            "too large",
            PublishBuildToolEventStreamRequest {
                ordered_build_event: Some(ordered(&ts, 3, bazel(&vec![b'x'; 100 * 1024]))),
                project_id: "team-a".into(),
                ..Default::default()
            },
        ),
        (
            "no event",
            PublishBuildToolEventStreamRequest {
                ordered_build_event: None,
                project_id: "team-a".into(),
                ..Default::default()
            },
        ),
        (
            "another stream",
            tool_events(&sid(&build, "other", TOOL), "team-a", 3, 3, 0).remove(0),
        ),
    ];
    for (what, bad) in cases {
        let mut msgs = good.clone();
        msgs.push(bad);
        let (acks, end) = publish_stream(ch, msgs).await;
        assert_eq!(acks, vec![1, 2], "{what}");
        let err = end.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(!err.message().is_empty());
        if what == "too large" {
            assert!(
                err.message().contains("max-event-bytes"),
                "{}",
                err.message()
            );
        }
    }
    // Every message of a call after the first bad one was refused; the stream
    // holds exactly the acked events.
    assert_eq!(tool_seqs(ch, &build).await, vec![1, 2]);
    // A stream opened on a CONTROLLER stream id.
    let (_, end) = publish_stream(
        ch,
        tool_events(&sid(&build, "inv", CONTROLLER), "team-a", 1, 1, 0),
    )
    .await;
    assert_eq!(end.unwrap_err().code(), Code::InvalidArgument);
}

/// `check_preceding_lifecycle_events_present`: the parent lifecycle event
/// must have been stored first.
async fn preceding_lifecycle_events(ch: &Channel) {
    let build = unique("preceding");
    let bs = sid(&build, "", CONTROLLER);
    let is = sid(&build, "inv", CONTROLLER);
    let ts = sid(&build, "inv", TOOL);
    let mut started = lifecycle(&is, 1, "team-a", attempt_started());
    started.check_preceding_lifecycle_events_present = true;
    let err = publish_lifecycle(ch, started.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let mut msgs = tool_events(&ts, "team-a", 1, 3, 3);
    msgs[0].check_preceding_lifecycle_events_present = true;
    let (acks, end) = publish_stream(ch, msgs.clone()).await;
    assert!(acks.is_empty());
    assert_eq!(end.unwrap_err().code(), Code::FailedPrecondition);
    publish_lifecycle(ch, lifecycle(&bs, 1, "team-a", enqueued()))
        .await
        .unwrap();
    publish_lifecycle(ch, started).await.unwrap();
    let (acks, end) = publish_stream(ch, msgs).await;
    end.unwrap();
    assert_eq!(acks, vec![1, 2, 3]);
}

/// The whole suite against one store config.
async fn suite(store_yaml: &str, dir: &Path) {
    let yaml = loopback_config(
        "",
        &format!("build-events:\n{store_yaml}  max-event-bytes: 64K\n"),
    );
    let server = TestServer::start(&yaml, dir).await;
    let ch = plain_channel(server.tcp()).await;
    bazel_like_build(&ch).await;
    retransmission(&ch).await;
    gaps_and_reordering(&ch).await;
    instances_do_not_share_streams(&ch).await;
    bad_input(&ch).await;
    preceding_lifecycle_events(&ch).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_memory_store() {
    let dir = tempfile::tempdir().unwrap();
    suite("  store: memory\n", dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_file_store() {
    let dir = tempfile::tempdir().unwrap();
    suite("  store: { file: events.redb }\n", dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suite_postgres_store() {
    let Some(schema) = pg::fresh_schema("bes_suite").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    suite(
        &format!("  store: {{ postgres: \"{}\" }}\n", schema.url),
        dir.path(),
    )
    .await;
}

/// Team B publishes a lifecycle event for build X first (with its own
/// credentials and instance); then team A publishes its whole build X. A's
/// publish succeeds; each team's queries see only its own events, whether
/// they name their instance or ask over every instance they may query.
async fn squatting_a_build_id_blocks_nobody(store_yaml: &str, dir: &Path) {
    let key = jwks_server::TestKey::hmac(
        jsonwebtoken::Algorithm::HS256,
        b"0123456789abcdef0123456789abcdef-bes-squat",
    );
    std::fs::write(dir.join("hmac.secret"), key.secret()).unwrap();
    std::fs::write(
        dir.join("acl.yaml"),
        "team-a:\n  allow:\n    - actor: 'alice$'\nteam-b:\n  allow:\n    - actor: 'bob$'\n",
    )
    .unwrap();
    let yaml = loopback_config(
        "",
        &format!(
            "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  audience: gridgate\n  acl-config: acl.yaml\nbuild-events:\n{store_yaml}"
        ),
    );
    let server = TestServer::start(&yaml, dir).await;
    let ch = plain_channel(server.tcp()).await;
    let token = |sub: &str| key.sign(&jwks_server::claims("https://ci.example", "gridgate", sub));
    let (alice, bob) = (token("alice"), token("bob"));
    let client = || PublishBuildEventClient::new(ch.clone());

    let build = unique("squat");
    let bs = sid(&build, "", CONTROLLER);
    let is = sid(&build, "inv-1", CONTROLLER);
    let ts = sid(&build, "inv-1", TOOL);
    // Team B squats on the build id. Bob may not publish as team-a.
    client()
        .publish_lifecycle_event(with_token(lifecycle(&bs, 1, "team-b", enqueued()), &bob))
        .await
        .unwrap();
    let err = client()
        .publish_lifecycle_event(with_token(
            lifecycle(&is, 1, "team-a", attempt_started()),
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Team A's whole build, as Bazel publishes it.
    for (stream, seq, event) in [(&bs, 1, enqueued()), (&is, 1, attempt_started())] {
        client()
            .publish_lifecycle_event(with_token(lifecycle(stream, seq, "team-a", event), &alice))
            .await
            .unwrap_or_else(|e| panic!("team A's lifecycle event on {stream:?}: {e:?}"));
    }
    let msgs = tool_events(&ts, "team-a", 1, 20, 20);
    let mut acks = client()
        .publish_build_tool_event_stream(with_token(tokio_stream::iter(msgs), &alice))
        .await
        .unwrap()
        .into_inner();
    let mut acked = Vec::new();
    while let Some(ack) = acks.message().await.unwrap() {
        acked.push(ack.sequence_number);
    }
    assert_eq!(acked, (1..=20).collect::<Vec<_>>());
    for (stream, seq, event) in [(&is, 2, attempt_finished()), (&bs, 2, build_finished())] {
        client()
            .publish_lifecycle_event(with_token(lifecycle(stream, seq, "team-a", event), &alice))
            .await
            .unwrap_or_else(|e| panic!("team A's lifecycle event on {stream:?}: {e:?}"));
    }

    // What each team reads back: (instance, invocation, component, seqs).
    let read = |token: String, instance: &'static str| {
        let ch = ch.clone();
        let pattern = format!("^{}\\.", regex_escape(&build));
        async move {
            let mut s = gg::build_events_client::BuildEventsClient::new(ch)
                .query_event_streams(with_token(
                    gg::QueryEventStreamsRequest {
                        build_id_pattern: pattern,
                        instance_name: instance.into(),
                        ..Default::default()
                    },
                    &token,
                ))
                .await?
                .into_inner();
            let mut out: Vec<(String, String, i32, Vec<i64>)> = Vec::new();
            while let Some(c) = s.message().await? {
                let id = c.stream_id.clone().unwrap_or_default();
                out.push((
                    c.instance_name,
                    id.invocation_id,
                    id.component,
                    seqs(&c.events),
                ));
            }
            Ok::<_, tonic::Status>(out)
        }
    };
    let team_a = vec![
        ("team-a".to_string(), String::new(), CONTROLLER, vec![1, 2]),
        (
            "team-a".to_string(),
            "inv-1".to_string(),
            CONTROLLER,
            vec![1, 2],
        ),
        (
            "team-a".to_string(),
            "inv-1".to_string(),
            TOOL,
            (1..=20).collect(),
        ),
    ];
    let team_b = vec![("team-b".to_string(), String::new(), CONTROLLER, vec![1])];
    assert_eq!(read(alice.clone(), "team-a").await.unwrap(), team_a);
    assert_eq!(read(alice.clone(), "").await.unwrap(), team_a);
    assert_eq!(read(bob.clone(), "team-b").await.unwrap(), team_b);
    assert_eq!(read(bob.clone(), "").await.unwrap(), team_b);
    let err = read(bob.clone(), "team-a").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // BuildGrid's query narrows the same way.
    let resp = QueryBuildEventsClient::new(ch.clone())
        .query_event_streams(with_token(
            QueryEventStreamsRequest {
                build_id_pattern: format!("^{}\\.", regex_escape(&build)),
                instance_name: String::new(),
            },
            &bob,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.streams.len(), 1);
    assert_eq!(seqs(&resp.streams[0].events), vec![1]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squatting_a_build_id_blocks_nobody_memory_store() {
    let dir = tempfile::tempdir().unwrap();
    squatting_a_build_id_blocks_nobody("  store: memory\n", dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squatting_a_build_id_blocks_nobody_file_store() {
    let dir = tempfile::tempdir().unwrap();
    squatting_a_build_id_blocks_nobody("  store: { file: events.redb }\n", dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squatting_a_build_id_blocks_nobody_postgres_store() {
    let Some(schema) = pg::fresh_schema("bes_squat").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    squatting_a_build_id_blocks_nobody(
        &format!("  store: {{ postgres: \"{}\" }}\n", schema.url),
        dir.path(),
    )
    .await;
}

/// A stream the memory store evicts while its call is still writing it (the
/// budget is taken by a newer stream) ends with FAILED_PRECONDITION saying
/// so, not with a sequence gap the client did not make.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_evicted_while_being_written_is_told_so() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = loopback_config("", "build-events:\n  store: memory\n  max-bytes: 64K\n");
    let server = TestServer::start(&yaml, dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    // Events of about 4 KiB: five take some 20 KiB of the 64 KiB budget.
    let event = |stream: &StreamId, seq: i64, size: usize| PublishBuildToolEventStreamRequest {
        ordered_build_event: Some(ordered(stream, seq, bazel(&vec![b'x'; size]))),
        project_id: "team-a".into(),
        ..Default::default()
    };
    let ts = sid(&unique("evicted"), "inv", TOOL);
    let all: Vec<_> = (1..=10).map(|seq| event(&ts, seq, 4000)).collect();
    let (tx, rx) = mpsc::channel(16);
    for m in &all[..5] {
        tx.send(m.clone()).await.unwrap();
    }
    let mut acks = PublishBuildEventClient::new(ch.clone())
        .publish_build_tool_event_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for seq in 1..=5 {
        assert_eq!(acks.message().await.unwrap().unwrap().sequence_number, seq);
    }

    // Another build's stream of 6 x 8000 bytes fits the budget only without
    // the first one, which is idle: it is evicted.
    let other = sid(&unique("filler"), "inv", TOOL);
    let filler: Vec<_> = (1..=6).map(|seq| event(&other, seq, 8000)).collect();
    let (filled, end) = publish_stream(&ch, filler).await;
    end.unwrap();
    assert_eq!(filled, (1..=6).collect::<Vec<_>>());

    tx.send(all[5].clone()).await.unwrap();
    let err = acks.message().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("evicted"), "{}", err.message());
    assert!(err.message().contains("max-bytes"), "{}", err.message());
    drop(tx);
    server.stop().await;
}

/// Two gateways sharing one PostgreSQL store: a stream started on one and
/// retransmitted to both ends up with every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_a_postgres_store() {
    let Some(schema) = pg::fresh_schema("bes_replicas").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let yaml = loopback_config(
        "",
        &format!(
            "build-events:\n  store: {{ postgres: \"{}\" }}\n",
            schema.url
        ),
    );
    let a = TestServer::start(&yaml, dir.path()).await;
    let b = TestServer::start(&yaml, dir.path()).await;
    let cha = plain_channel(a.tcp()).await;
    let chb = plain_channel(b.tcp()).await;
    let build = unique("replicas");
    let ts = sid(&build, "inv", TOOL);
    let all = tool_events(&ts, "team-a", 1, 50, 50);
    let (acks, end) = publish_stream(&cha, all[..20].to_vec()).await;
    end.unwrap();
    assert_eq!(acks.len(), 20);
    // The client "lost" acks 11..20 and retries on both replicas at once.
    let (ra, rb) = tokio::join!(
        publish_stream(&cha, all[10..].to_vec()),
        publish_stream(&chb, all[10..].to_vec())
    );
    ra.1.unwrap();
    rb.1.unwrap();
    assert_eq!(ra.0, (11..=50).collect::<Vec<_>>());
    assert_eq!(rb.0, (11..=50).collect::<Vec<_>>());
    assert_eq!(tool_seqs(&chb, &build).await, (1..=50).collect::<Vec<_>>());
    a.stop().await;
    b.stop().await;
}

/// The file store keeps every acknowledged event across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_restart_keeps_acknowledged_events() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = loopback_config("", "build-events:\n  store: { file: data/events.redb }\n");
    let server = TestServer::start(&yaml, dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    let build = unique("restart");
    let ts = sid(&build, "inv", TOOL);
    let (acks, end) = publish_stream(&ch, tool_events(&ts, "team-a", 1, 25, 0)).await;
    end.unwrap();
    assert_eq!(acks, (1..=25).collect::<Vec<_>>());
    let bs = sid(&build, "", CONTROLLER);
    publish_lifecycle(&ch, lifecycle(&bs, 1, "team-a", enqueued()))
        .await
        .unwrap();
    drop(ch);
    server.stop().await;

    let server = TestServer::start(&yaml, dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    assert_eq!(tool_seqs(&ch, &build).await, (1..=25).collect::<Vec<_>>());
    // The stream continues where it was.
    let (acks, end) = publish_stream(&ch, tool_events(&ts, "team-a", 20, 30, 30)).await;
    end.unwrap();
    assert_eq!(acks, (20..=30).collect::<Vec<_>>());
    assert_eq!(tool_seqs(&ch, &build).await, (1..=30).collect::<Vec<_>>());
    assert_eq!(
        query(&ch, &format!("^{}\\.1\\.$", regex_escape(&build)))
            .await
            .len(),
        1
    );
    server.stop().await;
}

/// gridgate.v1.BuildEvents/QueryEventStreams: filters and chunks.
async fn chunks(
    ch: &Channel,
    req: gg::QueryEventStreamsRequest,
) -> Result<Vec<gg::EventStreamChunk>, tonic::Status> {
    let mut s = gg::build_events_client::BuildEventsClient::new(ch.clone())
        .query_event_streams(req)
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(c) = s.message().await? {
        out.push(c);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filters_instances_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&loopback_config("", ""), dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    let build = unique("q");
    let a = sid(&build, "inv-a", TOOL);
    let b = sid(&build, "inv-b", TOOL);
    publish_stream(&ch, tool_events(&a, "team-a", 1, 2500, 2500))
        .await
        .1
        .unwrap();
    publish_stream(&ch, tool_events(&b, "team-b", 1, 5, 5))
        .await
        .1
        .unwrap();
    let pattern = format!("^{}\\.", regex_escape(&build));
    let req = |f: &dyn Fn(&mut gg::QueryEventStreamsRequest)| {
        let mut r = gg::QueryEventStreamsRequest {
            build_id_pattern: pattern.clone(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let summary = |cs: &[gg::EventStreamChunk]| -> Vec<(String, String, Vec<i64>)> {
        let mut out: Vec<(String, String, Vec<i64>)> = Vec::new();
        for c in cs {
            let inv = c.stream_id.clone().unwrap_or_default().invocation_id;
            match out.last_mut() {
                Some(last) if last.0 == inv => last.2.extend(seqs(&c.events)),
                _ => out.push((inv, c.instance_name.clone(), seqs(&c.events))),
            }
        }
        out
    };

    // Everything, in chunks of at most 1000 events; the last chunk says so.
    let all = chunks(&ch, req(&|_| {})).await.unwrap();
    assert_eq!(all.len(), 4, "2500 events in 3 chunks + 1 stream");
    assert_eq!(all.iter().filter(|c| c.stream_complete).count(), 2);
    assert!(all[2].stream_complete && all[2].stream_finished);
    assert_eq!(
        summary(&all),
        vec![
            ("inv-a".into(), "team-a".into(), (1..=2500).collect()),
            ("inv-b".into(), "team-b".into(), (1..=5).collect())
        ]
    );
    // Instance.
    let only_b = chunks(&ch, req(&|r| r.instance_name = "team-b".into()))
        .await
        .unwrap();
    assert_eq!(
        summary(&only_b),
        vec![("inv-b".into(), "team-b".into(), (1..=5).collect())]
    );
    // Kind + skip empty.
    let fin = chunks(
        &ch,
        req(&|r| {
            r.event_kinds = vec!["component_stream_finished".into()];
            r.skip_empty_streams = true;
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        summary(&fin),
        vec![
            ("inv-a".into(), "team-a".into(), vec![2500]),
            ("inv-b".into(), "team-b".into(), vec![5])
        ]
    );
    // Sequence range.
    let range = chunks(
        &ch,
        req(&|r| {
            r.min_sequence_number = 3;
            r.max_sequence_number = 4;
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        summary(&range),
        vec![
            ("inv-a".into(), "team-a".into(), vec![3, 4]),
            ("inv-b".into(), "team-b".into(), vec![3, 4])
        ]
    );
    // Event time (events are stamped 1_700_000_000 + seq).
    let late = chunks(
        &ch,
        req(&|r| {
            r.since = Some(prost_types::Timestamp {
                seconds: 1_700_002_498,
                nanos: 0,
            });
            r.skip_empty_streams = true;
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        summary(&late),
        vec![("inv-a".into(), "team-a".into(), vec![2498, 2499, 2500])]
    );
    // Bad requests.
    let err = chunks(&ch, req(&|r| r.event_kinds = vec!["bogus".into()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("bazel_event"),
        "lists the kinds: {}",
        err.message()
    );
    let err = chunks(&ch, req(&|r| r.build_id_pattern = "(".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = chunks(&ch, req(&|r| r.build_id_pattern = "a".repeat(2000)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A pattern whose compiled form is huge is refused, not run.
    let err = chunks(&ch, req(&|r| r.build_id_pattern = "(\\w{100}){100}".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // BuildGrid's query: everything in one message, bounded.
    let streams = query(&ch, &pattern).await;
    assert_eq!(streams.len(), 2);
    assert_eq!(streams[0].1.len(), 2500);
    let err = QueryBuildEventsClient::new(ch.clone())
        .query_event_streams(QueryEventStreamsRequest {
            build_id_pattern: "(".into(),
            instance_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The CLI prints the same through the streaming query.
    let addr = server.tcp();
    let p = pattern.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        run_binary(&[
            "events",
            "query",
            &p,
            "--server",
            &format!("grpc://{addr}"),
            "--instance",
            "team-b",
            "--json",
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["instance"], "team-b");
    assert_eq!(lines[0]["component"], "TOOL");
    assert_eq!(lines[0]["events"].as_array().map(Vec::len), Some(5));
    assert_eq!(lines[0]["events"][4]["kind"], "component_stream_finished");
    let p = pattern.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        run_binary(&[
            "events",
            "query",
            &p,
            "--server",
            &format!("grpc://{addr}"),
            "--kind",
            "bazel_event",
            "--from-seq",
            "2",
            "--to-seq",
            "3",
            "--since",
            "2023-11-14T22:13:21Z",
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("instance=\"team-a\""), "{out}");
    assert!(
        out.contains("#2 ") && out.contains("#3 ") && !out.contains("#4 "),
        "{out}"
    );
    assert!(out.contains("2 stream(s)"), "{out}");
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        run_binary(&[
            "events",
            "query",
            ".",
            "--server",
            &format!("grpc://{addr}"),
            "--since",
            "yesterday",
        ])
    })
    .await
    .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("RFC 3339"), "{err}");
    server.stop().await;
}

/// Credentials in Bazel's command line never reach the store: a query returns
/// them masked, everything else intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_redacted_before_storing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&loopback_config("", ""), dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    let build = unique("redact");
    let ts = sid(&build, "inv", TOOL);
    // build_event_stream.BuildEvent { id = 1 {unstructured_command_line = 11 {}},
    //   unstructured_command_line = 12 { args = 1 ... } }
    fn ld(field: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![field << 3 | 2];
        let mut n = payload.len();
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(payload);
        out
    }
    let args: Vec<u8> = [
        "build",
        "//:all",
        "--remote_header=Authorization=Bearer eyJhbGciOi.s3cr3t.sig",
        "--bes_header=x-buildbuddy-api-key=KEY123",
        "--remote_cache=grpcs://ci:hunter2@cache.example.com",
    ]
    .iter()
    .flat_map(|a| ld(1, a.as_bytes()))
    .collect();
    let payload = [ld(1, &ld(11, &[])), ld(12, &args)].concat();
    let mut msgs = tool_events(&ts, "team-a", 1, 2, 2);
    msgs[0].ordered_build_event = Some(ordered(&ts, 1, bazel(&payload)));
    let (acks, end) = publish_stream(&ch, msgs.clone()).await;
    end.unwrap();
    assert_eq!(acks, vec![1, 2]);
    // A retransmission of the same (unredacted) event is still a duplicate.
    let (acks, end) = publish_stream(&ch, msgs).await;
    end.unwrap();
    assert_eq!(acks, vec![1, 2]);

    let streams = query(&ch, &format!("^{}\\.", regex_escape(&build))).await;
    let first = &streams[0].1[0];
    let Some(build_event::Event::BazelEvent(any)) =
        first.event.as_ref().and_then(|e| e.event.clone())
    else {
        panic!("not a bazel event: {first:?}")
    };
    let text = String::from_utf8_lossy(&any.value).into_owned();
    for secret in ["s3cr3t", "eyJhbGciOi", "KEY123", "hunter2"] {
        assert!(!text.contains(secret), "{secret} stored: {text}");
    }
    for kept in [
        "--remote_header=Authorization=",
        "--bes_header=x-buildbuddy-api-key=",
        "@cache.example.com",
        "//:all",
    ] {
        assert!(text.contains(kept), "{kept} lost: {text}");
    }
    assert_eq!(any.value.len(), payload.len(), "same length");
    let all_bytes = first.encode_to_vec();
    assert!(!String::from_utf8_lossy(&all_bytes).contains("hunter2"));
    server.stop().await;
}

/// The forms a secret takes in Bazel's command line and in console output
/// (environment flags, credential JSON, headers, assignments, a keyword split
/// by a zero-width character) are masked before storing; a query returns
/// every other byte as it was published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_form_of_secret_is_masked_and_nothing_else_changes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&loopback_config("", ""), dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    let build = unique("redact-forms");
    let ts = sid(&build, "inv", TOOL);
    fn ld(field: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![field << 3 | 2];
        let mut n = payload.len();
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
        out.extend_from_slice(payload);
        out
    }
    let args = [
        "build",
        "//:all",
        "--action_env=GITHUB_TOKEN=ghp_SECRET01",
        "--client_env=npm_auth=SECRET02",
        "--repo_env=MY_SECRET=SECRET03",
        "--host_action_env=DB_PASSWORD=SECRET04",
        "--test_env=API_KEY=SECRET05",
        "--google_credentials_json={\"type\": \"service_account\", \"private_key\": \"SECRET06\"}",
        "--test_env",
        "NPM_TOKEN=SECRET07",
        "--action_env=PATH=/usr/bin",
        "--action_env=KEYBOARD_LAYOUT=de",
    ];
    let payload = [
        ld(1, &ld(11, &[])),
        ld(
            12,
            &args
                .iter()
                .flat_map(|a| ld(1, a.as_bytes()))
                .collect::<Vec<u8>>(),
        ),
    ]
    .concat();
    let console = "\
$ curl -H 'PRIVATE-TOKEN: SECRET08' -H \"X-Auth-Token: SECRET09\" https://git.example/api\n\
password=SECRET10\n\
aws_secret_access_key = SECRET11\n\
+ export GITHUB_TOKEN=SECRET12\n\
DEPLOY_KEY=SECRET13 ./deploy.sh\n\
Authorization: Bear\u{200b}er SECRET14\n\
GIT_AUTHOR_NAME=Ann KEYBOARD_LAYOUT=de PATH=/usr/bin\n\
INFO: Build completed successfully, 3 total actions\n";
    let console_event = build_event::Event::ConsoleOutput(build_event::ConsoleOutput {
        r#type: 1,
        output: Some(build_event::console_output::Output::TextOutput(
            console.into(),
        )),
    });
    let mut msgs = tool_events(&ts, "team-a", 1, 3, 3);
    msgs[0].ordered_build_event = Some(ordered(&ts, 1, bazel(&payload)));
    msgs[1].ordered_build_event = Some(ordered(&ts, 2, console_event.clone()));
    let (acks, end) = publish_stream(&ch, msgs).await;
    end.unwrap();
    assert_eq!(acks, vec![1, 2, 3]);

    let streams = query(&ch, &format!("^{}\\.", regex_escape(&build))).await;
    let events = &streams[0].1;
    let Some(build_event::Event::BazelEvent(any)) =
        events[0].event.as_ref().and_then(|e| e.event.clone())
    else {
        panic!("not a bazel event: {:?}", events[0])
    };
    let Some(build_event::Event::ConsoleOutput(build_event::ConsoleOutput {
        output: Some(build_event::console_output::Output::TextOutput(text)),
        ..
    })) = events[1].event.as_ref().and_then(|e| e.event.clone())
    else {
        panic!("not console output: {:?}", events[1])
    };
    let stored = [
        String::from_utf8_lossy(&any.value).into_owned(),
        text.clone(),
    ]
    .concat();
    for n in 1..=14 {
        let secret = format!("SECRET{n:02}");
        assert!(!stored.contains(&secret), "{secret} stored: {stored}");
    }
    // Only masked bytes differ: every other byte is as published.
    for (before, after) in [
        (payload.as_slice(), any.value.as_slice()),
        (console.as_bytes(), text.as_bytes()),
    ] {
        assert_eq!(before.len(), after.len());
        for (i, (a, b)) in before.iter().zip(after).enumerate() {
            assert!(a == b || *b == b'*', "byte {i} changed: {stored}");
        }
    }
    for kept in [
        "--action_env=GITHUB_TOKEN=",
        "--client_env=npm_auth=",
        "--action_env=PATH=/usr/bin",
        "--action_env=KEYBOARD_LAYOUT=de",
        "PRIVATE-TOKEN: ",
        "https://git.example/api",
        "+ export GITHUB_TOKEN=",
        " ./deploy.sh",
        "Authorization: Bear\u{200b}er ",
        "GIT_AUTHOR_NAME=Ann KEYBOARD_LAYOUT=de PATH=/usr/bin\n",
        "INFO: Build completed successfully, 3 total actions\n",
    ] {
        assert!(stored.contains(kept), "{kept:?} lost: {stored}");
    }
    server.stop().await;
}

/// `kill -9` while a stream is being ingested, then a restart on the same
/// store: every acknowledged event is there, exactly once, and the client's
/// retry from its first unacknowledged event completes the stream.
async fn kill_9_during_ingestion(store_yaml: &str, dir: &Path) {
    use common::Binary;
    const TOTAL: i64 = 2000;
    let config = dir.join("gridgate.yaml");
    std::fs::write(
        &config,
        loopback_config("", &format!("build-events:\n{store_yaml}")),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let start = |config: &str| {
        let mut bin = Binary::start(&["serve", "--config", config]);
        let addr = bin.listening_addr();
        (bin, addr)
    };
    let (mut bin, addr) = tokio::task::block_in_place(|| start(&config));
    let ch = plain_channel(addr).await;
    let build = unique("kill9");
    let ts = sid(&build, "inv", TOOL);
    let all = tool_events(&ts, "team-a", 1, TOTAL, TOTAL);

    // Send the first half as fast as the connection takes it (not all of it:
    // a fast server could otherwise acknowledge everything before the kill);
    // kill the server once some acks came back and more events are in flight.
    const SENT_BEFORE_KILL: usize = (TOTAL / 2) as usize;
    let (tx, rx) = mpsc::channel(64);
    let sender = {
        let all = all.clone();
        tokio::spawn(async move {
            for m in all.into_iter().take(SENT_BEFORE_KILL) {
                if tx.send(m).await.is_err() {
                    break;
                }
            }
            // Keep the request stream open: the kill ends the call.
            std::future::pending::<()>().await;
        })
    };
    let mut responses = PublishBuildEventClient::new(ch.clone())
        .publish_build_tool_event_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut acked = Vec::new();
    while acked.len() < 300 {
        match responses.message().await {
            Ok(Some(ack)) => acked.push(ack.sequence_number),
            other => panic!("stream ended early: {other:?}"),
        }
    }
    bin.child.kill().unwrap(); // SIGKILL
    let _ = bin.child.wait();
    // Acks that were already on their way still count as acknowledged.
    while let Ok(Some(ack)) = responses.message().await {
        acked.push(ack.sequence_number);
    }
    sender.abort();
    drop(ch);
    let last_acked = *acked.last().unwrap();
    assert_eq!(acked, (1..=last_acked).collect::<Vec<_>>(), "acks in order");
    assert!(
        last_acked <= SENT_BEFORE_KILL as i64,
        "acknowledged {last_acked} of {SENT_BEFORE_KILL} sent"
    );

    let (bin2, addr) = tokio::task::block_in_place(|| start(&config));
    let ch = plain_channel(addr).await;
    let stored = tool_seqs(&ch, &build).await;
    let n = stored.len() as i64;
    assert!(n >= last_acked, "stored {n} < acknowledged {last_acked}");
    assert_eq!(
        stored,
        (1..=n).collect::<Vec<_>>(),
        "each event once, no gap"
    );
    // The retry, from the first event it saw no ack for.
    let (acks, end) = publish_stream(&ch, all[last_acked as usize..].to_vec()).await;
    end.unwrap();
    assert_eq!(acks, (last_acked + 1..=TOTAL).collect::<Vec<_>>());
    assert_eq!(
        tool_seqs(&ch, &build).await,
        (1..=TOTAL).collect::<Vec<_>>()
    );
    drop(bin2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_ingestion_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!(
        "  store: {{ file: {} }}\n",
        dir.path().join("events.redb").display()
    );
    kill_9_during_ingestion(&store, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_ingestion_postgres_store() {
    let Some(schema) = pg::fresh_schema("bes_kill9").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    kill_9_during_ingestion(
        &format!("  store: {{ postgres: \"{}\" }}\n", schema.url),
        dir.path(),
    )
    .await;
}
