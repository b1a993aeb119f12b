//! Black-box tests that the Build Event Service keeps what a client sends out
//! of its log lines: ids over their limits are refused naming the field and
//! the limit, and ids within them reach a log line only cut. The real
//! `gridgate` binary on loopback, its stderr read back, tonic clients.

mod common;

use std::time::Duration;

use common::{loopback_config, plain_channel, Binary};
use gridgate::proto::build::buildgrid::{
    query_build_events_client::QueryBuildEventsClient, QueryEventStreamsRequest,
};
use gridgate::proto::google::devtools::build::v1::{
    build_event, publish_build_event_client::PublishBuildEventClient, BuildEvent,
    OrderedBuildEvent, PublishBuildToolEventStreamRequest, PublishLifecycleEventRequest, StreamId,
};
use gridgate::proto::gridgate::v1 as gg;
use gridgate::proto::gridgate::v1::invocations_client::InvocationsClient;
use tonic::Code;

const CONTROLLER: i32 = 1;
const TOOL: i32 = 3;

fn ordered(stream: &StreamId, seq: i64, event: build_event::Event) -> OrderedBuildEvent {
    OrderedBuildEvent {
        stream_id: Some(stream.clone()),
        sequence_number: seq,
        event: Some(BuildEvent {
            event_time: None,
            event: Some(event),
        }),
    }
}

fn bazel() -> build_event::Event {
    build_event::Event::BazelEvent(prost_types::Any {
        type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
        value: vec![],
    })
}

fn tool(stream: &StreamId, seq: i64) -> PublishBuildToolEventStreamRequest {
    PublishBuildToolEventStreamRequest {
        ordered_build_event: Some(ordered(stream, seq, bazel())),
        project_id: "team-a".into(),
        ..Default::default()
    }
}

/// Sends `messages` on one tool stream; the status it ends with.
async fn tool_stream(
    ch: &tonic::transport::Channel,
    messages: Vec<PublishBuildToolEventStreamRequest>,
) -> tonic::Status {
    let call = PublishBuildEventClient::new(ch.clone())
        .publish_build_tool_event_stream(tokio_stream::iter(messages))
        .await;
    let mut acks = match call {
        Ok(r) => r.into_inner(),
        Err(s) => return s,
    };
    loop {
        match acks.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return tonic::Status::ok(""),
            Err(s) => return s,
        }
    }
}

fn refused(status: &tonic::Status, field: &str, limit: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(field) && status.message().contains(limit),
        "the refusal names neither {field} nor {limit}: {}",
        status.message()
    );
    assert!(status.message().len() < 512, "{}", status.message());
}

/// Ids of a MiB are INVALID_ARGUMENT naming the field and the limit, on
/// every publish and query RPC, and neither they nor a 1024-byte id that is
/// accepted and then fails (a sequence gap, logged at debug) appear whole in
/// the server's log.
#[tokio::test(flavor = "multi_thread")]
async fn a_huge_id_is_refused_by_name_and_no_id_is_logged_whole() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gridgate.yaml");
    std::fs::write(
        &config,
        loopback_config("", "build-events:\n  store: memory\n"),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_string();
    let (mut bin, addr) = tokio::task::block_in_place(|| {
        let mut bin =
            Binary::start(&["--log", "gridgate=debug,info", "serve", "--config", &config]);
        let addr = bin.listening_addr();
        (bin, addr)
    });
    let ch = plain_channel(addr).await;
    let huge = format!("huge-{}", "h".repeat(1 << 20));
    let limit = "1024 bytes";

    let s = PublishBuildEventClient::new(ch.clone())
        .publish_lifecycle_event(PublishLifecycleEventRequest {
            build_event: Some(ordered(
                &StreamId {
                    build_id: huge.clone(),
                    invocation_id: String::new(),
                    component: CONTROLLER,
                },
                1,
                build_event::Event::BuildEnqueued(Default::default()),
            )),
            project_id: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&s, "stream_id.build_id", limit);

    let huge_inv = StreamId {
        build_id: "b".into(),
        invocation_id: huge.clone(),
        component: TOOL,
    };
    let s = tool_stream(&ch, vec![tool(&huge_inv, 1)]).await;
    refused(&s, "stream_id.invocation_id", limit);

    let mut inv = InvocationsClient::new(ch.clone());
    let s = inv
        .list_invocations(gg::ListInvocationsRequest {
            build_id: huge.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&s, "build_id", limit);
    let s = inv
        .get_invocation(gg::GetInvocationRequest {
            instance_name: "team-a".into(),
            invocation_id: huge.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&s, "invocation_id", limit);
    let s = inv
        .get_log(gg::GetLogRequest {
            instance_name: "team-a".into(),
            invocation_id: huge.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&s, "invocation_id", limit);
    let s = QueryBuildEventsClient::new(ch.clone())
        .query_event_streams(QueryEventStreamsRequest {
            build_id_pattern: huge.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    refused(&s, "build_id_pattern", "1024");

    // Ids at the limit are accepted; a gap then fails the stream, and the
    // failure is logged with the stream's ids cut.
    let long = format!("long-{}", "l".repeat(1019));
    assert_eq!(long.len(), 1024);
    let stream = StreamId {
        build_id: long.clone(),
        invocation_id: long.clone(),
        component: TOOL,
    };
    let s = tool_stream(&ch, vec![tool(&stream, 1), tool(&stream, 3)]).await;
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    let line =
        tokio::task::block_in_place(|| bin.wait_for_line("sequence gap", Duration::from_secs(10)))
            .unwrap_or_else(|| panic!("the failure was not logged: {:#?}", bin.seen));
    assert!(
        line.contains("…(") && !line.contains(&long),
        "the id was not cut: {line}"
    );

    bin.signal("TERM");
    tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));
    let log = bin.seen.join("\n");
    assert!(
        !log.contains(&"h".repeat(1024)),
        "a huge id reached the log"
    );
    assert!(!log.contains(&long), "a 1024-byte id reached the log whole");
    let longest = bin.seen.iter().map(String::len).max().unwrap_or(0);
    assert!(longest < 4096, "a log line of {longest} bytes");
}
