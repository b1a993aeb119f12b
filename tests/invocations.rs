//! Black-box tests of gridgate.v1.Invocations and `gridgate invocations`: a
//! real gateway behind a JWT + ACL Gate, a recorded Bazel 4.2.3 stream
//! published as Bazel publishes it, read back through gRPC and the CLI, on
//! every store.

mod common;
#[path = "common/jwks_server.rs"]
mod jwks_server;

use std::path::Path;

use bytes::Bytes;
use common::{loopback_config, pg, plain_channel, run_binary, with_token, TestServer};
use gridgate::proto::google::devtools::build::v1::{
    build_event, publish_build_event_client::PublishBuildEventClient, BuildEvent,
    OrderedBuildEvent, PublishBuildToolEventStreamRequest, PublishLifecycleEventRequest, StreamId,
};
use gridgate::proto::gridgate::v1 as gg;
use gridgate::proto::gridgate::v1::invocations_client::InvocationsClient;
use serde_json::Value;
use tonic::transport::Channel;
use tonic::Code;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-invocations";

/// The payloads of a recorded `--build_event_binary_file`.
fn recorded(rel: &str) -> Vec<Bytes> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bep")
        .join(rel);
    let mut data = Bytes::from(std::fs::read(path).unwrap());
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = prost::decode_length_delimiter(&mut data).unwrap();
        out.push(data.split_to(len));
    }
    out
}

/// The JSON file Bazel wrote in the same run.
fn recorded_json(rel: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bep")
        .join(rel);
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
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

struct Publisher {
    channel: Channel,
    token: String,
    project: String,
    build: String,
    invocation: String,
}

impl Publisher {
    fn stream(&self, component: i32, per_invocation: bool) -> StreamId {
        StreamId {
            build_id: self.build.clone(),
            invocation_id: if per_invocation {
                self.invocation.clone()
            } else {
                String::new()
            },
            component,
        }
    }

    async fn lifecycle(&self, per_invocation: bool, seq: i64, event: build_event::Event) {
        let req = PublishLifecycleEventRequest {
            service_level: 1,
            build_event: Some(ordered(&self.stream(1, per_invocation), seq, event)),
            project_id: self.project.clone(),
            ..Default::default()
        };
        PublishBuildEventClient::new(self.channel.clone())
            .publish_lifecycle_event(with_token(req, &self.token))
            .await
            .unwrap();
    }

    /// Publishes payloads `from..` as tool events `first_seq..`, with a
    /// final component_stream_finished when `last`.
    async fn tool(&self, payloads: &[Bytes], first_seq: i64, last: bool) {
        let stream = self.stream(3, true);
        let mut msgs: Vec<PublishBuildToolEventStreamRequest> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| PublishBuildToolEventStreamRequest {
                ordered_build_event: Some(ordered(
                    &stream,
                    first_seq + i as i64,
                    build_event::Event::BazelEvent(prost_types::Any {
                        type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
                        value: p.to_vec(),
                    }),
                )),
                notification_keywords: if first_seq + i as i64 == 1 {
                    vec![
                        "command_name=test".into(),
                        "protocol_name=BEP".into(),
                        "team-ci".into(),
                    ]
                } else {
                    vec![]
                },
                project_id: self.project.clone(),
                ..Default::default()
            })
            .collect();
        if last {
            let seq = first_seq + payloads.len() as i64;
            msgs.push(PublishBuildToolEventStreamRequest {
                ordered_build_event: Some(ordered(
                    &stream,
                    seq,
                    build_event::Event::ComponentStreamFinished(
                        build_event::BuildComponentStreamFinished { r#type: 1 },
                    ),
                )),
                project_id: self.project.clone(),
                ..Default::default()
            });
        }
        let n = msgs.len();
        let mut acks = PublishBuildEventClient::new(self.channel.clone())
            .publish_build_tool_event_stream(with_token(tokio_stream::iter(msgs), &self.token))
            .await
            .unwrap()
            .into_inner();
        let mut count = 0;
        while acks.message().await.unwrap().is_some() {
            count += 1;
        }
        assert_eq!(count, n);
    }
}

fn started() -> build_event::Event {
    build_event::Event::InvocationAttemptStarted(build_event::InvocationAttemptStarted {
        attempt_number: 1,
        details: None,
    })
}

async fn suite(store_yaml: &str, dir: &Path) {
    let key = jwks_server::TestKey::hmac(jsonwebtoken::Algorithm::HS256, SECRET);
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
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let invocation = format!("inv-{nanos:x}");
    let a = Publisher {
        channel: ch.clone(),
        token: alice.clone(),
        project: "team-a".into(),
        build: format!("build-{nanos:x}"),
        invocation: invocation.clone(),
    };
    // Team B publishes first under the same build and invocation ids.
    let b = Publisher {
        token: bob.clone(),
        project: "team-b".into(),
        ..a.clone_ids()
    };
    let payloads = recorded("bazel-4.2.3/test.bin");
    b.lifecycle(true, 1, started()).await;
    b.tool(&payloads[..3], 1, false).await;

    let client = || InvocationsClient::new(ch.clone());
    let get = |token: String, instance: &str, page_size: i32, page_token: String| {
        let req = gg::GetInvocationRequest {
            instance_name: instance.into(),
            invocation_id: invocation.clone(),
            page_size,
            page_token,
        };
        let mut c = client();
        async move {
            c.get_invocation(with_token(req, &token))
                .await
                .map(|r| r.into_inner())
        }
    };

    // Team A: half of the stream; the invocation reads as running and grows.
    a.lifecycle(true, 1, started()).await;
    let half = payloads.len() / 2;
    a.tool(&payloads[..half], 1, false).await;
    let running = get(alice.clone(), "team-a", 0, String::new())
        .await
        .unwrap();
    let inv = running.invocation.unwrap();
    assert_eq!(inv.state(), gg::InvocationState::Running);
    assert_eq!(inv.command, "test");
    assert_eq!(inv.publisher, "alice");
    assert_eq!(
        inv.keywords,
        vec!["command_name=test", "protocol_name=BEP", "team-ci"]
    );
    let events_then = inv.counts.unwrap().events;
    // The rest, then Bazel's end of the attempt.
    a.tool(&payloads[half..], half as i64 + 1, true).await;
    a.lifecycle(
        true,
        2,
        build_event::Event::InvocationAttemptFinished(build_event::InvocationAttemptFinished {
            invocation_status: Some(gridgate::proto::google::devtools::build::v1::BuildStatus {
                result: 2,
                ..Default::default()
            }),
            details: None,
        }),
    )
    .await;

    let json = recorded_json("bazel-4.2.3/test.json");
    let exit = json.iter().find_map(|e| e.get("finished")).unwrap();
    let done = get(alice.clone(), "team-a", 0, String::new())
        .await
        .unwrap();
    let inv = done.invocation.clone().unwrap();
    assert_eq!(inv.state(), gg::InvocationState::Failed);
    assert_eq!(
        i64::from(inv.exit_code),
        exit["exitCode"]["code"].as_i64().unwrap()
    );
    assert_eq!(
        inv.exit_code_name,
        exit["exitCode"]["name"].as_str().unwrap()
    );
    let counts = inv.counts.unwrap();
    assert!(counts.events > events_then);
    assert_eq!(
        counts.events as usize,
        payloads.len() + 3,
        "tool events, their end, two lifecycle"
    );
    assert_eq!(
        inv.build_metadata.get("REPO").map(String::as_str),
        Some("example/repo")
    );
    // Targets paged two at a time: the same as in one page, each test's
    // status as Bazel reported it.
    let mut paged = Vec::new();
    let mut page_token = String::new();
    loop {
        let r = get(alice.clone(), "team-a", 2, page_token).await.unwrap();
        assert!(r.targets.len() <= 2);
        paged.extend(r.targets);
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    assert_eq!(paged, done.targets);
    for (id, s) in json
        .iter()
        .filter_map(|e| Some((&e["id"], e.get("testSummary")?)))
    {
        let label = id["testSummary"]["label"].as_str().unwrap();
        let t = paged.iter().find(|t| t.label == label).unwrap();
        assert_eq!(
            t.test.as_ref().unwrap().status,
            s["overallStatus"].as_str().unwrap()
        );
    }
    // Team B's invocation of the same id is its own, still running.
    let theirs = get(bob.clone(), "team-b", 0, String::new()).await.unwrap();
    let theirs = theirs.invocation.unwrap();
    assert_eq!(theirs.state(), gg::InvocationState::Running);
    assert_eq!(theirs.counts.unwrap().events, 4);
    // Nobody reads another team's.
    let err = get(bob.clone(), "team-a", 0, String::new())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = get(alice.clone(), "", 0, String::new()).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "an empty instance is one more instance: {err:?}"
    );

    // Listing over every instance shows each caller only its own.
    let list = |token: String, instance: &str| {
        let req = gg::ListInvocationsRequest {
            instance_name: instance.into(),
            build_id: a.build.clone(),
            ..Default::default()
        };
        let mut c = client();
        async move {
            c.list_invocations(with_token(req, &token))
                .await
                .map(|r| r.into_inner())
        }
    };
    let mine = list(alice.clone(), "").await.unwrap().invocations;
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0], inv);
    let theirs_listed = list(bob.clone(), "").await.unwrap().invocations;
    assert_eq!(
        theirs_listed
            .iter()
            .map(|i| i.instance_name.as_str())
            .collect::<Vec<_>>(),
        vec!["team-b"]
    );
    assert_eq!(
        list(alice.clone(), "team-b").await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // The console output, in order, as Bazel sent it.
    let progress: String = json
        .iter()
        .filter_map(|e| e.get("progress"))
        .map(|p| {
            format!(
                "{}{}",
                p["stdout"].as_str().unwrap_or(""),
                p["stderr"].as_str().unwrap_or("")
            )
        })
        .collect();
    let mut log = Vec::new();
    let mut offset = 0;
    loop {
        let req = gg::GetLogRequest {
            instance_name: "team-a".into(),
            invocation_id: invocation.clone(),
            offset,
            limit: 100,
        };
        let r = client()
            .get_log(with_token(req, &alice))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.offset, offset);
        assert!(r.data.len() <= 100);
        log.extend_from_slice(&r.data);
        offset = r.next_offset;
        if r.complete {
            break;
        }
        assert!(!r.data.is_empty(), "no progress before the end");
    }
    assert_eq!(String::from_utf8(log).unwrap(), progress);

    // The CLI, with --json.
    std::fs::write(dir.join("alice.token"), &alice).unwrap();
    let server_url = format!("grpc://{}", server.tcp());
    let token_file = dir.join("alice.token").display().to_string();
    let (code, out, err) = run_binary(&[
        "invocations",
        "list",
        "--build-id",
        &a.build,
        "--json",
        "--server",
        &server_url,
        "--token-file",
        &token_file,
    ]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["invocation_id"], invocation.as_str());
    assert_eq!(rows[0]["state"], "failed");
    assert_eq!(rows[0]["instance"], "team-a");
    let (code, out, err) = run_binary(&[
        "invocations",
        "show",
        &invocation,
        "--instance",
        "team-a",
        "--json",
        "--server",
        &server_url,
        "--token-file",
        &token_file,
    ]);
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(shown["targets"].as_array().unwrap().len(), paged.len());
    let flaky = shown["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["label"] == "//:flaky")
        .unwrap();
    assert_eq!(flaky["test"]["status"], "FLAKY");
    assert_eq!(flaky["test"]["runs"].as_array().unwrap().len(), 2);
    let (code, out, err) = run_binary(&[
        "invocations",
        "log",
        &invocation,
        "--instance",
        "team-a",
        "--server",
        &server_url,
        "--token-file",
        &token_file,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, progress);
    let (code, out, err) = run_binary(&[
        "invocations",
        "show",
        &invocation,
        "--instance",
        "team-b",
        "--server",
        &server_url,
        "--token-file",
        &token_file,
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("PermissionDenied"), "{err}");
    server.stop().await;
}

impl Publisher {
    fn clone_ids(&self) -> Publisher {
        Publisher {
            channel: self.channel.clone(),
            token: self.token.clone(),
            project: self.project.clone(),
            build: self.build.clone(),
            invocation: self.invocation.clone(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_read_back_as_bazel_reported_them_memory_store() {
    let dir = tempfile::tempdir().unwrap();
    suite("  store: memory\n", dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_read_back_as_bazel_reported_them_file_store() {
    let dir = tempfile::tempdir().unwrap();
    suite("  store: { file: events.redb }\n", dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invocations_read_back_as_bazel_reported_them_postgres_store() {
    let Some(schema) = pg::fresh_schema("invocations").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    suite(
        &format!("  store: {{ postgres: \"{}\" }}\n", schema.url),
        dir.path(),
    )
    .await;
}

/// With short retention ages, a build whose stream stopped halfway reads as
/// abandoned, and then everything past its age is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_build_is_abandoned_and_old_builds_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = loopback_config(
        "",
        "build-events:\n  store: { file: events.redb }\n  retention: { max-age: 6s, abandoned-after: 2s }\n",
    );
    let server = TestServer::start(&yaml, dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    let a = Publisher {
        channel: ch.clone(),
        token: String::new(),
        project: "team-a".into(),
        build: "retained-build".into(),
        invocation: "retained-inv".into(),
    };
    let payloads = recorded("bazel-4.2.3/test.bin");
    a.tool(&payloads[..payloads.len() / 2], 1, false).await;
    let get = || {
        let mut c = InvocationsClient::new(ch.clone());
        async move {
            c.get_invocation(gg::GetInvocationRequest {
                instance_name: "team-a".into(),
                invocation_id: "retained-inv".into(),
                ..Default::default()
            })
            .await
        }
    };
    let state = get()
        .await
        .unwrap()
        .into_inner()
        .invocation
        .unwrap()
        .state();
    assert_eq!(state, gg::InvocationState::Running);
    let started = std::time::Instant::now();
    let mut abandoned_at = None;
    while started.elapsed() < std::time::Duration::from_secs(30) {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        match get().await {
            Ok(r) => {
                let s = r.into_inner().invocation.unwrap().state();
                if s == gg::InvocationState::Abandoned && abandoned_at.is_none() {
                    abandoned_at = Some(started.elapsed());
                }
            }
            Err(e) => {
                assert_eq!(e.code(), Code::NotFound, "{e:?}");
                let abandoned = abandoned_at.expect("abandoned before it was deleted");
                assert!(
                    abandoned >= std::time::Duration::from_secs(2),
                    "{abandoned:?}"
                );
                assert!(started.elapsed() >= std::time::Duration::from_secs(5));
                server.stop().await;
                return;
            }
        }
    }
    panic!("not deleted within 30 s (abandoned at {abandoned_at:?})");
}
