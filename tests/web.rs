//! The web listener as a browser or a script uses it: a real gateway on
//! loopback with a JWT + ACL Gate, a build's events published over gRPC, a
//! test log uploaded to the CAS, and the pages and the JSON API read back
//! with a real HTTP client (plaintext and TLS with client certificates).
//!
//! What a build prints (`<script>`, quotes in labels and metadata) must
//! come back as text; a viewer of another team gets exactly the answer an
//! unknown id gets; the API's JSON is the gRPC service's answer.

mod common;

use std::path::Path;

use common::{loopback_config, plain_channel, with_token, Certs, TestServer};
use gridgate::proto::build::bazel::remote::execution::v2 as re;
use gridgate::proto::build_event_stream as bep;
use gridgate::proto::google::devtools::build::v1::{
    build_event, publish_build_event_client::PublishBuildEventClient, BuildEvent,
    OrderedBuildEvent, PublishBuildToolEventStreamRequest, StreamId,
};
use gridgate::proto::gridgate::v1 as gg;
use gridgate::proto::gridgate::v1::invocations_client::InvocationsClient;
use gridgate::server::BoundAddr;
use prost::Message;
use serde_json::Value;
use tonic::transport::Channel;

const SECRET: &[u8] = b"web-tests-secret-0123456789abcdef0123456789";
const LOG: &str =
    "log line <script>alert(\"log\")</script>\n\x1b[31mFAIL\x1b[0m: expected 1 got 2\n";

fn token(sub: &str) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::default(),
        &serde_json::json!({"sub": sub, "exp": now + 3600}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

/// team-a: ci publishes and uploads, alice (by token or certificate) reads;
/// team-b: bob reads.
fn write_policy(dir: &Path) {
    std::fs::write(dir.join("hmac.secret"), SECRET).unwrap();
    std::fs::write(
        dir.join("acl.yaml"),
        "team-a:\n  allow:\n    - actor: ci\n      requests: [PublishLifecycleEvent, PublishBuildToolEventStream, BatchUpdateBlobs, FindMissingBlobs]\n    - actor: alice\n      requests: [QueryEventStreams, Read]\n    - cert: { cn: alice }\n      requests: [QueryEventStreams, Read]\nteam-b:\n  allow:\n    - actor: ci\n      requests: [PublishLifecycleEvent, PublishBuildToolEventStream]\n    - actor: bob\n      requests: [QueryEventStreams, Read]\n",
    )
    .unwrap();
}

fn config(web: &str) -> String {
    loopback_config(
        "",
        &format!(
            "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  acl-config: acl.yaml\ninstances:\n  - name: team-a\n    cas: {{ backend: memory, max-bytes: 64M }}\n  - name: team-b\n    cas: {{ backend: memory, max-bytes: 64M }}\nbuild-events:\n  store: memory\n{web}"
        ),
    )
}

fn web_url(server: &TestServer, scheme: &str) -> String {
    match server.web.as_ref().expect("web listener") {
        BoundAddr::Tcp(a) => format!("{scheme}://127.0.0.1:{}", a.port()),
        BoundAddr::Unix(_) => panic!("tcp expected"),
    }
}

fn event(id: bep::build_event_id::Id, payload: bep::build_event::Payload) -> Vec<u8> {
    bep::BuildEvent {
        id: Some(bep::BuildEventId { id: Some(id) }),
        payload: Some(payload),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A Bazel test run: a failing test whose label has quotes, a passing one,
/// metadata with a link and markup, console output with a script tag.
fn build_events(uuid: &str, log_uri: &str) -> Vec<Vec<u8>> {
    use bep::build_event::Payload as P;
    use bep::build_event_id::{self as ids, Id};
    let bad = "//web:quote\"d<b>_test".to_string();
    let good = "//web:fine_test".to_string();
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("BRANCH".to_string(), "main\"><img src=x>".to_string());
    metadata.insert("CI_URL".to_string(), "https://ci.example/job/7".to_string());
    let file = |uri: &str| bep::File {
        name: "test.log".into(),
        file: Some(bep::file::File::Uri(uri.into())),
        ..Default::default()
    };
    vec![
        event(
            Id::Started(ids::BuildStartedId {}),
            P::Started(bep::BuildStarted {
                uuid: uuid.into(),
                start_time_millis: 1_760_000_000_000,
                build_tool_version: "2.1.0".into(),
                command: "test".into(),
                ..Default::default()
            }),
        ),
        event(
            Id::Pattern(ids::PatternExpandedId {
                pattern: vec!["//web/...".into()],
            }),
            P::Expanded(Default::default()),
        ),
        event(
            Id::BuildMetadata(ids::BuildMetadataId {}),
            P::BuildMetadata(bep::BuildMetadata { metadata }),
        ),
        event(
            Id::TargetConfigured(ids::TargetConfiguredId {
                label: bad.clone(),
                ..Default::default()
            }),
            P::Configured(bep::TargetConfigured {
                target_kind: "sh_test rule".into(),
                ..Default::default()
            }),
        ),
        event(
            Id::TargetConfigured(ids::TargetConfiguredId {
                label: good.clone(),
                ..Default::default()
            }),
            P::Configured(bep::TargetConfigured {
                target_kind: "sh_test rule".into(),
                ..Default::default()
            }),
        ),
        event(
            Id::Progress(ids::ProgressId { opaque_count: 1 }),
            P::Progress(bep::Progress {
                stderr: "\x1b[32mINFO:\x1b[0m <script>alert('console')</script> done\n".into(),
                ..Default::default()
            }),
        ),
        event(
            Id::TestResult(ids::TestResultId {
                label: bad.clone(),
                run: 1,
                shard: 1,
                attempt: 1,
                ..Default::default()
            }),
            P::TestResult(bep::TestResult {
                status: bep::TestStatus::Failed as i32,
                test_attempt_duration_millis: 1200,
                test_action_output: vec![file(log_uri)],
                ..Default::default()
            }),
        ),
        event(
            Id::TestResult(ids::TestResultId {
                label: good.clone(),
                run: 1,
                shard: 1,
                attempt: 1,
                ..Default::default()
            }),
            P::TestResult(bep::TestResult {
                status: bep::TestStatus::Passed as i32,
                test_attempt_duration_millis: 300,
                ..Default::default()
            }),
        ),
        event(
            Id::TestSummary(ids::TestSummaryId {
                label: bad.clone(),
                ..Default::default()
            }),
            P::TestSummary(bep::TestSummary {
                overall_status: bep::TestStatus::Failed as i32,
                total_run_count: 1,
                ..Default::default()
            }),
        ),
        event(
            Id::TestSummary(ids::TestSummaryId {
                label: good.clone(),
                ..Default::default()
            }),
            P::TestSummary(bep::TestSummary {
                overall_status: bep::TestStatus::Passed as i32,
                total_run_count: 1,
                ..Default::default()
            }),
        ),
        event(
            Id::BuildFinished(ids::BuildFinishedId {}),
            P::Finished(bep::BuildFinished {
                exit_code: Some(bep::build_finished::ExitCode {
                    name: "TESTS_FAILED".into(),
                    code: 3,
                }),
                finish_time_millis: 1_760_000_004_000,
                ..Default::default()
            }),
        ),
    ]
}

/// Publishes one invocation's tool stream to `instance` as `ci`.
async fn publish(ch: &Channel, instance: &str, uuid: &str, payloads: Vec<Vec<u8>>) {
    let stream = StreamId {
        build_id: format!("build-{uuid}"),
        invocation_id: uuid.into(),
        component: 3,
    };
    let n = payloads.len() as i64;
    let mut msgs: Vec<PublishBuildToolEventStreamRequest> = payloads
        .into_iter()
        .enumerate()
        .map(|(i, p)| PublishBuildToolEventStreamRequest {
            ordered_build_event: Some(OrderedBuildEvent {
                stream_id: Some(stream.clone()),
                sequence_number: i as i64 + 1,
                event: Some(BuildEvent {
                    event_time: Some(prost_types::Timestamp {
                        seconds: 1_760_000_000 + i as i64,
                        nanos: 0,
                    }),
                    event: Some(build_event::Event::BazelEvent(prost_types::Any {
                        type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
                        value: p,
                    })),
                }),
            }),
            project_id: instance.into(),
            ..Default::default()
        })
        .collect();
    msgs.push(PublishBuildToolEventStreamRequest {
        ordered_build_event: Some(OrderedBuildEvent {
            stream_id: Some(stream.clone()),
            sequence_number: n + 1,
            event: Some(BuildEvent {
                event_time: None,
                event: Some(build_event::Event::ComponentStreamFinished(
                    build_event::BuildComponentStreamFinished { r#type: 1 },
                )),
            }),
        }),
        project_id: instance.into(),
        ..Default::default()
    });
    let mut acks = PublishBuildEventClient::new(ch.clone())
        .publish_build_tool_event_stream(with_token(tokio_stream::iter(msgs), &token("ci")))
        .await
        .unwrap()
        .into_inner();
    let mut count = 0;
    while acks.message().await.unwrap().is_some() {
        count += 1;
    }
    assert_eq!(count, n + 1);
}

/// Uploads `data` to `instance`'s CAS; returns its bytestream URI.
async fn upload(ch: &Channel, addr: std::net::SocketAddr, instance: &str, data: &[u8]) -> String {
    use aws_lc_rs::digest;
    let hash: String = digest::digest(&digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let req = re::BatchUpdateBlobsRequest {
        instance_name: instance.into(),
        requests: vec![re::batch_update_blobs_request::Request {
            digest: Some(re::Digest {
                hash: hash.clone(),
                size_bytes: data.len() as i64,
            }),
            data: data.to_vec().into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let r =
        re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch.clone())
            .batch_update_blobs(with_token(req, &token("ci")))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.responses[0].status.as_ref().map_or(0, |s| s.code), 0);
    format!(
        "bytestream://127.0.0.1:{}/{instance}/blobs/{hash}/{}",
        addr.port(),
        data.len()
    )
}

struct Page {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn get(client: &reqwest::Client, url: &str, who: Option<&str>) -> Page {
    let mut r = client.get(url);
    if let Some(who) = who {
        r = r.bearer_auth(token(who));
    }
    let r = r.send().await.unwrap();
    Page {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.text().await.unwrap(),
    }
}

/// The text of the element with `id` (up to its first closing tag).
fn element<'a>(body: &'a str, id: &str) -> &'a str {
    let at = body
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("#{id} in {body}"));
    let rest = &body[at..];
    let start = rest.find('>').unwrap() + 1;
    let end = rest[start..].find('<').unwrap() + start;
    &rest[start..end]
}

async fn started() -> (tempfile::TempDir, TestServer, Channel, String) {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path());
    let server = TestServer::start(
        &config("web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: true\n"),
        dir.path(),
    )
    .await;
    let ch = plain_channel(server.tcp()).await;
    let base = web_url(&server, "http");
    (dir, server, ch, base)
}

#[tokio::test]
async fn build_output_renders_as_text_under_a_strict_content_security_policy() {
    let (_dir, server, ch, base) = started().await;
    let uri = upload(&ch, server.tcp(), "team-a", LOG.as_bytes()).await;
    publish(
        &ch,
        "team-a",
        "inv-escape",
        build_events("inv-escape", &uri),
    )
    .await;
    let client = reqwest::Client::new();

    let page = get(
        &client,
        &format!("{base}/invocation/inv-escape"),
        Some("alice"),
    )
    .await;
    assert_eq!(page.status, 200, "{}", page.body);
    let b = &page.body;
    // Nothing the build sent becomes markup.
    assert!(!b.contains("<script>alert"), "{b}");
    assert!(!b.contains("<img src=x>"), "{b}");
    assert!(!b.contains("<b>_test"), "{b}");
    assert!(
        b.contains("&lt;script&gt;alert('console')&lt;/script&gt;"),
        "console escaped"
    );
    assert!(
        b.contains("//web:quote&quot;d&lt;b&gt;_test"),
        "label escaped"
    );
    assert!(
        b.contains("main&quot;&gt;&lt;img src=x&gt;"),
        "metadata escaped"
    );
    assert!(
        b.contains("<a href=\"https://ci.example/job/7\" rel=\"noopener noreferrer nofollow\">")
    );
    // The only script is the site's own file.
    assert_eq!(b.matches("<script").count(), 1);
    assert!(b.contains("<script src=\"/static/live-"));
    // The failed test comes first, with its log from the CAS, colours as classes.
    let problems = b.find("id=\"problems\"").expect("failed tests section");
    let failing = b[problems..].find("quote&quot;d").unwrap() + problems;
    let all_tests = b.find("id=\"tests\"").unwrap();
    assert!(failing < all_tests);
    assert!(b[problems..all_tests]
        .contains("log line &lt;script&gt;alert(&quot;log&quot;)&lt;/script&gt;"));
    assert!(b[problems..all_tests].contains("<span class=\"f1\">FAIL</span>"));
    assert!(
        !b[problems..all_tests].contains("//web:fine_test"),
        "passing tests are not problems"
    );
    assert!(b.contains("TESTS_FAILED (3)"));

    let csp = page.headers["content-security-policy"].to_str().unwrap();
    for part in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline"));
    assert_eq!(page.headers["x-content-type-options"], "nosniff");
    assert_eq!(page.headers["x-frame-options"], "DENY");
    assert_eq!(page.headers["cache-control"], "no-store");
    assert_eq!(page.headers["referrer-policy"], "same-origin");

    // The assets are served, with their types.
    let css_path = b
        .split("href=\"/static/")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let css = get(&client, &format!("{base}/static/{css_path}"), None).await;
    assert_eq!(css.status, 200);
    assert_eq!(css.headers["content-type"], "text/css; charset=utf-8");

    // The blob page shows the log as text too; the raw log is text/plain.
    let blob = get(
        &client,
        &format!("{base}/blob?uri={}", urlencode(&uri)),
        Some("alice"),
    )
    .await;
    assert_eq!(blob.status, 200, "{}", blob.body);
    assert!(blob.body.contains("alert(&quot;log&quot;)"));
    let log = get(
        &client,
        &format!("{base}/invocation/inv-escape/log"),
        Some("alice"),
    )
    .await;
    assert_eq!(log.headers["content-type"], "text/plain; charset=utf-8");
    assert!(log.body.contains("<script>alert('console')</script>"));
    server.stop().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn another_team_gets_the_same_answer_as_for_an_unknown_id() {
    let (_dir, server, ch, base) = started().await;
    let uri = upload(&ch, server.tcp(), "team-a", LOG.as_bytes()).await;
    publish(
        &ch,
        "team-a",
        "inv-private",
        build_events("inv-private", &uri),
    )
    .await;
    let client = reqwest::Client::new();

    let theirs = get(
        &client,
        &format!("{base}/invocation/inv-private"),
        Some("bob"),
    )
    .await;
    let unknown = get(
        &client,
        &format!("{base}/invocation/inv-nothing"),
        Some("bob"),
    )
    .await;
    assert_eq!(theirs.status, 403, "{}", theirs.body);
    assert_eq!(
        (theirs.status, &theirs.body),
        (unknown.status, &unknown.body)
    );
    assert!(element(&theirs.body, "reason").contains("no rule lets you query its instance"));
    assert!(!theirs.body.contains("team-a"), "the instance is not named");
    // The same for the API, the live stream and the log.
    for suffix in ["", "/log"] {
        let a = get(
            &client,
            &format!("{base}/api/v1/invocations/inv-private{suffix}"),
            Some("bob"),
        )
        .await;
        let b = get(
            &client,
            &format!("{base}/api/v1/invocations/inv-nothing{suffix}"),
            Some("bob"),
        )
        .await;
        assert_eq!(a.status, 403);
        assert_eq!((a.status, a.body), (b.status, b.body));
    }
    let a = get(
        &client,
        &format!("{base}/invocation/inv-private/live"),
        Some("bob"),
    )
    .await;
    assert_eq!(a.status, 403);
    // Naming the instance: refused with the Gate's reason, existing or not.
    let named = get(
        &client,
        &format!("{base}/api/v1/invocations/inv-private?instance=team-a"),
        Some("bob"),
    )
    .await;
    let named_unknown = get(
        &client,
        &format!("{base}/api/v1/invocations/inv-nothing?instance=team-a"),
        Some("bob"),
    )
    .await;
    assert_eq!(named.status, 403);
    assert_eq!(named.body, named_unknown.body);
    // Nor can bob read team-a's blobs.
    let blob = get(
        &client,
        &format!("{base}/blob?uri={}", urlencode(&uri)),
        Some("bob"),
    )
    .await;
    assert_eq!(blob.status, 403);
    // Bob's list does not show it; alice's does.
    let list = get(&client, &format!("{base}/invocations"), Some("bob")).await;
    assert_eq!(list.status, 200);
    assert!(!list.body.contains("inv-private"));
    let list = get(&client, &format!("{base}/invocations"), Some("alice")).await;
    assert!(list.body.contains("/invocation/inv-private"));
    // Without credentials: the sign-in page, for both.
    let anon = get(&client, &format!("{base}/invocation/inv-private"), None).await;
    let anon_unknown = get(&client, &format!("{base}/invocation/inv-nothing"), None).await;
    assert_eq!(anon.status, 401);
    assert_eq!(anon.body, anon_unknown.body);
    assert!(anon.body.contains("Sign in"));
    // A bad token is refused with its reason.
    let bad = client
        .get(format!("{base}/invocation/inv-private"))
        .bearer_auth("not.a.token")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    server.stop().await;
}

#[tokio::test]
async fn the_api_answers_what_the_grpc_service_answers() {
    let (_dir, server, ch, base) = started().await;
    let uri = upload(&ch, server.tcp(), "team-a", LOG.as_bytes()).await;
    publish(&ch, "team-a", "inv-api", build_events("inv-api", &uri)).await;
    publish(&ch, "team-b", "inv-api-b", build_events("inv-api-b", "")).await;
    let client = reqwest::Client::new();

    let grpc = InvocationsClient::new(ch.clone())
        .get_invocation(with_token(
            gg::GetInvocationRequest {
                instance_name: "team-a".into(),
                invocation_id: "inv-api".into(),
                ..Default::default()
            },
            &token("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    let page = get(
        &client,
        &format!("{base}/api/v1/invocations/inv-api"),
        Some("alice"),
    )
    .await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.headers["content-type"], "application/json");
    let j: Value = serde_json::from_str(&page.body).unwrap();
    let inv = grpc.invocation.unwrap();
    let ji = &j["invocation"];
    assert_eq!(ji["invocationId"], inv.invocation_id);
    assert_eq!(ji["instanceName"], "team-a");
    assert_eq!(ji["state"], "INVOCATION_STATE_FAILED");
    assert_eq!(ji["exitCode"], inv.exit_code);
    assert_eq!(ji["exitCodeName"], inv.exit_code_name);
    assert_eq!(ji["startTimeMillis"], inv.start_time_millis);
    assert_eq!(ji["durationMillis"], inv.duration_millis);
    assert_eq!(ji["buildMetadata"]["CI_URL"], inv.build_metadata["CI_URL"]);
    let counts = inv.counts.unwrap();
    assert_eq!(ji["counts"]["testsFailed"], counts.tests_failed);
    assert_eq!(ji["counts"]["logBytes"], counts.log_bytes);
    let labels: Vec<&str> = j["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["label"].as_str().unwrap())
        .collect();
    let grpc_labels: Vec<&str> = grpc.targets.iter().map(|t| t.label.as_str()).collect();
    assert_eq!(labels, grpc_labels);
    for (jt, t) in j["targets"].as_array().unwrap().iter().zip(&grpc.targets) {
        let test = t.test.as_ref().unwrap();
        assert_eq!(jt["test"]["status"], test.status);
        assert_eq!(
            jt["test"]["runs"].as_array().unwrap().len(),
            test.runs.len()
        );
        assert_eq!(
            jt["test"]["runs"][0]["testLogUri"],
            test.runs[0].test_log_uri
        );
    }

    // The list: alice sees team-a's only; the same as gRPC.
    let grpc_list = InvocationsClient::new(ch.clone())
        .list_invocations(with_token(
            gg::ListInvocationsRequest::default(),
            &token("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    let list = get(
        &client,
        &format!("{base}/api/v1/invocations"),
        Some("alice"),
    )
    .await;
    let lj: Value = serde_json::from_str(&list.body).unwrap();
    let ids: Vec<&str> = lj["invocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["invocationId"].as_str().unwrap())
        .collect();
    let grpc_ids: Vec<&str> = grpc_list
        .invocations
        .iter()
        .map(|i| i.invocation_id.as_str())
        .collect();
    assert_eq!(ids, grpc_ids);
    assert_eq!(ids, vec!["inv-api"]);
    // Filters narrow as on gRPC.
    let failed = get(
        &client,
        &format!("{base}/api/v1/invocations?state=failed"),
        Some("alice"),
    )
    .await;
    assert!(failed.body.contains("inv-api"));
    let ok = get(
        &client,
        &format!("{base}/api/v1/invocations?state=SUCCEEDED"),
        Some("alice"),
    )
    .await;
    assert!(!ok.body.contains("inv-api"), "{}", ok.body);
    let bad = get(
        &client,
        &format!("{base}/api/v1/invocations?state=maybe"),
        Some("alice"),
    )
    .await;
    assert_eq!(bad.status, 400);

    // The log, in base64 as the proto3 JSON mapping writes bytes.
    let grpc_log = InvocationsClient::new(ch.clone())
        .get_log(with_token(
            gg::GetLogRequest {
                instance_name: "team-a".into(),
                invocation_id: "inv-api".into(),
                ..Default::default()
            },
            &token("alice"),
        ))
        .await
        .unwrap()
        .into_inner();
    let log = get(
        &client,
        &format!("{base}/api/v1/invocations/inv-api/log"),
        Some("alice"),
    )
    .await;
    let lj: Value = serde_json::from_str(&log.body).unwrap();
    use base64::Engine;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(lj["data"].as_str().unwrap())
            .unwrap(),
        grpc_log.data.to_vec()
    );
    assert_eq!(lj["complete"], grpc_log.complete);
    assert_eq!(lj["nextOffset"], grpc_log.next_offset);

    // The list page's filters.
    let page = get(
        &client,
        &format!("{base}/invocations?state=failed&command=test"),
        Some("alice"),
    )
    .await;
    assert!(page.body.contains("/invocation/inv-api"));
    let page = get(
        &client,
        &format!("{base}/invocations?state=succeeded"),
        Some("alice"),
    )
    .await;
    assert!(!page.body.contains("/invocation/inv-api"));
    let page = get(
        &client,
        &format!("{base}/invocations?metadata=BRANCH%3Dnope"),
        Some("alice"),
    )
    .await;
    assert!(!page.body.contains("/invocation/inv-api"));
    let page = get(
        &client,
        &format!("{base}/invocations?instance=team-b"),
        Some("alice"),
    )
    .await;
    assert_eq!(page.status, 403, "naming another team's instance");
    server.stop().await;
}

#[tokio::test]
async fn a_client_certificate_on_the_tls_listener_identifies_the_viewer() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path());
    let web = format!(
        "web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: false\n  credentials:\n    tls-server-key: {}\n    tls-server-cert: {}\n    tls-client-certs: {}\n  client-certificates: optional\n",
        certs.server_key.display(),
        certs.server_cert.display(),
        certs.ca.display()
    );
    let server = TestServer::start(&config(&web), dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    let uri = upload(&ch, server.tcp(), "team-a", LOG.as_bytes()).await;
    publish(&ch, "team-a", "inv-cert", build_events("inv-cert", &uri)).await;
    let base = web_url(&server, "https").replace("127.0.0.1", "localhost");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&certs.ca).unwrap()).unwrap();
    let mut pem = std::fs::read(&certs.client_cert).unwrap();
    pem.extend(std::fs::read(&certs.client_key).unwrap());
    let with_cert = reqwest::Client::builder()
        .tls_certs_only([ca.clone()])
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let page = get(&with_cert, &format!("{base}/invocation/inv-cert"), None).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("certificate <b>alice</b>"));
    assert!(page.headers["strict-transport-security"]
        .to_str()
        .unwrap()
        .contains("max-age"));
    // Optional: a browser without one may connect, and is anonymous.
    let without = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    let page = get(&without, &format!("{base}/invocation/inv-cert"), None).await;
    assert_eq!(page.status, 401);
    server.stop().await;
}

#[tokio::test]
async fn anonymous_viewers_see_only_instances_open_to_them() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path());
    let acl = std::fs::read_to_string(dir.path().join("acl.yaml")).unwrap();
    std::fs::write(
        dir.path().join("acl.yaml"),
        format!("{acl}public:\n  allow:\n    - requests: [QueryEventStreams, PublishBuildToolEventStream]\n"),
    )
    .unwrap();
    let yaml = config("web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: true\n").replace(
        "  acl-config: acl.yaml\n",
        "  acl-config: acl.yaml\n  allow-unauthenticated-instances: [public]\n",
    );
    let server = TestServer::start(&yaml, dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    publish(&ch, "public", "inv-public", build_events("inv-public", "")).await;
    publish(&ch, "team-a", "inv-team", build_events("inv-team", "")).await;
    let base = web_url(&server, "http");
    let client = reqwest::Client::new();
    let page = get(&client, &format!("{base}/invocation/inv-public"), None).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let page = get(&client, &format!("{base}/invocation/inv-team"), None).await;
    assert_eq!(page.status, 401);
    let list = get(&client, &format!("{base}/invocations"), None).await;
    assert_eq!(list.status, 200);
    assert!(list.body.contains("inv-public") && !list.body.contains("inv-team"));
    server.stop().await;
}

#[tokio::test]
async fn a_running_build_streams_updates_to_its_page() {
    let (_dir, server, ch, base) = started().await;
    // Everything but the finish: the invocation is running.
    let mut events = build_events("inv-live", "");
    events.pop();
    let stream = StreamId {
        build_id: "build-live".into(),
        invocation_id: "inv-live".into(),
        component: 3,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<PublishBuildToolEventStreamRequest>(16);
    let msg = |seq: i64, payload: Vec<u8>| PublishBuildToolEventStreamRequest {
        ordered_build_event: Some(OrderedBuildEvent {
            stream_id: Some(stream.clone()),
            sequence_number: seq,
            event: Some(BuildEvent {
                event_time: Some(prost_types::Timestamp {
                    seconds: 1_760_000_000 + seq,
                    nanos: 0,
                }),
                event: Some(build_event::Event::BazelEvent(prost_types::Any {
                    type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
                    value: payload,
                })),
            }),
        }),
        project_id: "team-a".into(),
        ..Default::default()
    };
    tx.send(msg(1, events[0].clone())).await.unwrap();
    let mut client = PublishBuildEventClient::new(ch.clone());
    let call = tokio::spawn(async move {
        let mut acks = client
            .publish_build_tool_event_stream(with_token(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                &token("ci"),
            ))
            .await
            .unwrap()
            .into_inner();
        while acks.message().await.unwrap().is_some() {}
    });
    let http = reqwest::Client::new();
    // Wait for the first event to be stored.
    let mut page = get(&http, &format!("{base}/invocation/inv-live"), Some("alice")).await;
    for _ in 0..50 {
        if page.status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        page = get(&http, &format!("{base}/invocation/inv-live"), Some("alice")).await;
    }
    assert!(
        page.body
            .contains("data-live=\"/invocation/inv-live/live?instance=team-a\""),
        "{}",
        page.body
    );
    let mut live = http
        .get(format!("{base}/invocation/inv-live/live?instance=team-a"))
        .bearer_auth(token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.headers()["content-type"], "text/event-stream");
    let first = live.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("retry:"));
    // A new event wakes the watcher.
    tx.send(msg(2, events[1].clone())).await.unwrap();
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), live.chunk())
        .await
        .expect("an update within 10 s")
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&next).contains("event: update"),
        "{next:?}"
    );
    // The finish ends the stream with `done`.
    let mut seq = 3;
    for e in events.into_iter().skip(2) {
        tx.send(msg(seq, e)).await.unwrap();
        seq += 1;
    }
    tx.send(msg(seq, build_events("inv-live", "").pop().unwrap()))
        .await
        .unwrap();
    let mut text = String::new();
    while let Ok(Ok(Some(c))) =
        tokio::time::timeout(std::time::Duration::from_secs(10), live.chunk()).await
    {
        text.push_str(&String::from_utf8_lossy(&c));
        if text.contains("event: done") {
            break;
        }
    }
    assert!(text.contains("event: done"), "{text}");
    drop(tx);
    let _ = call.await;
    server.stop().await;
}
