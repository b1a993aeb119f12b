//! Bazel 2.1.0 as a real BES client: a build streams its events to gridgate
//! (plaintext, then TLS with `--tls_certificate`); the stored streams are then
//! read back with QueryEventStreams and compared with what Bazel wrote to
//! `--build_event_json_file`: the same events, in order, none twice, and
//! Bazel's `--remote_header` credential redacted.
//!
//! Bazel is fetched on first use (see tests/common/bazel.rs); without it the
//! test is skipped, or fails when `CI` is set.

mod common;

use std::path::Path;

use common::bazel::{bazel_binary, Workspace};
use common::{loopback_config, plain_channel, tls_channel, with_token, Certs, TestServer};
use gridgate::proto::build::buildgrid::{
    query_build_events_client::QueryBuildEventsClient, QueryEventStreamsRequest,
};
use gridgate::proto::google::devtools::build::v1::{build_event, OrderedBuildEvent, StreamId};
use prost::Message;
use tonic::transport::Channel;

const TOKEN: &str = "s3cr3t-bazel-token-0123456789";

/// Two genrules, one depending on the other.
const BUILD: &str = "genrule(name = \"hello\", outs = [\"hello.txt\"], cmd = \"echo hello > $@\")\n\
genrule(name = \"world\", srcs = [\":hello\"], outs = [\"world.txt\"], cmd = \"cat $< > $@; echo world >> $@\")\n";

/// Builds the workspace against `bes_backend` and checks what was stored.
async fn build_and_compare(
    channel: Channel,
    bes_backend: String,
    extra: Vec<String>,
    bazel: &Path,
    dir: &Path,
) {
    std::fs::create_dir_all(dir).unwrap();
    let json = dir.join("bep.json");
    let mut args = vec![
        "//:world".to_string(),
        format!("--bes_backend={bes_backend}"),
        "--project_id=team-a".into(),
        format!("--build_event_json_file={}", json.display()),
        "--bes_timeout=120s".into(),
        "--spawn_strategy=local".into(),
        format!("--remote_header=Authorization=Bearer {TOKEN}"),
    ];
    args.extend(extra);
    let ws = Workspace::new(bazel.to_path_buf(), BUILD);
    let run = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ws.run("build", &args)
    })
    .await
    .unwrap();
    assert_eq!(run.code, 0, "bazel failed:\n{}", run.text);

    // What Bazel wrote locally: one JSON event per line.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() > 5, "{lines:?}");

    // Bazel's anonymous identity may publish but not read back.
    let err = QueryBuildEventsClient::new(channel.clone())
        .query_event_streams(QueryEventStreamsRequest {
            build_id_pattern: ".".into(),
            instance_name: "team-a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // What gridgate stored, as the team's reader sees it.
    let resp = QueryBuildEventsClient::new(channel)
        .query_event_streams(with_token(
            QueryEventStreamsRequest {
                build_id_pattern: ".".into(),
                instance_name: String::new(),
            },
            &reader_token(),
        ))
        .await
        .unwrap()
        .into_inner();
    let streams: Vec<(StreamId, Vec<OrderedBuildEvent>)> = resp
        .streams
        .into_iter()
        .map(|s| (s.stream_id.unwrap_or_default(), s.events))
        .collect();
    let components: Vec<(i32, bool, usize)> = streams
        .iter()
        .map(|(s, e)| (s.component, s.invocation_id.is_empty(), e.len()))
        .collect();
    assert_eq!(
        streams.len(),
        3,
        "build, invocation and tool streams: {components:?}"
    );
    let build_id = &streams[0].0.build_id;
    assert!(streams.iter().all(|(s, _)| &s.build_id == build_id));
    let kinds = |events: &[OrderedBuildEvent]| -> Vec<String> {
        events
            .iter()
            .map(|e| match e.event.as_ref().and_then(|b| b.event.as_ref()) {
                Some(build_event::Event::BuildEnqueued(_)) => "enqueued".into(),
                Some(build_event::Event::BuildFinished(_)) => "build_finished".into(),
                Some(build_event::Event::InvocationAttemptStarted(_)) => "started".into(),
                Some(build_event::Event::InvocationAttemptFinished(_)) => "attempt_finished".into(),
                Some(build_event::Event::BazelEvent(_)) => "bazel".into(),
                Some(build_event::Event::ComponentStreamFinished(_)) => "stream_finished".into(),
                other => format!("{other:?}"),
            })
            .collect()
    };
    for (s, events) in &streams {
        let seqs: Vec<i64> = events.iter().map(|e| e.sequence_number).collect();
        assert_eq!(
            seqs,
            (1..=events.len() as i64).collect::<Vec<_>>(),
            "{s:?}: consecutive, none twice"
        );
    }
    let by = |component: i32, build_level: bool| {
        streams
            .iter()
            .find(|(s, _)| s.component == component && s.invocation_id.is_empty() == build_level)
            .map(|(_, e)| e.clone())
            .unwrap_or_else(|| panic!("no stream {component}/{build_level} in {components:?}"))
    };
    assert_eq!(kinds(&by(1, true)), vec!["enqueued", "build_finished"]);
    assert_eq!(kinds(&by(1, false)), vec!["started", "attempt_finished"]);
    let tool = by(3, false);
    let tool_kinds = kinds(&tool);
    assert_eq!(
        tool_kinds.last().map(String::as_str),
        Some("stream_finished")
    );
    assert!(
        tool_kinds[..tool_kinds.len() - 1]
            .iter()
            .all(|k| k == "bazel"),
        "{tool_kinds:?}"
    );
    assert_eq!(
        tool.len() - 1,
        lines.len(),
        "one bazel_event per JSON event, plus component_stream_finished"
    );

    // Same order: each stored event's id matches the JSON event's id (its
    // kind, consistently mapped, and the strings and numbers inside it).
    let mut kind_map: std::collections::HashMap<String, u64> = Default::default();
    let mut number_map: std::collections::HashMap<u64, String> = Default::default();
    for (i, (event, line)) in tool.iter().zip(&lines).enumerate() {
        let Some(build_event::Event::BazelEvent(any)) =
            event.event.as_ref().and_then(|b| b.event.as_ref())
        else {
            unreachable!()
        };
        let (number, mut bin_leaves) =
            binary_id(&any.value).unwrap_or_else(|| panic!("event {i}: no id"));
        let id = line["id"]
            .as_object()
            .unwrap_or_else(|| panic!("line {i}: no id"));
        assert_eq!(id.len(), 1, "{id:?}");
        let (key, value) = id.iter().next().unwrap();
        assert_eq!(
            *kind_map.entry(key.clone()).or_insert(number),
            number,
            "event {i}: {key}"
        );
        assert_eq!(
            *number_map.entry(number).or_insert(key.clone()),
            *key,
            "event {i}: {key}"
        );
        let mut json_leaves = Vec::new();
        json_id_leaves(value, &mut json_leaves);
        json_leaves.sort();
        bin_leaves.sort();
        assert_eq!(
            json_leaves, bin_leaves,
            "event {i} ({key}) differs from the JSON file"
        );
    }

    // The credential on Bazel's command line is not stored; the flag is.
    let all: Vec<u8> = streams
        .iter()
        .flat_map(|(_, e)| e.iter().flat_map(|e| e.encode_to_vec()))
        .collect();
    let text = String::from_utf8_lossy(&all);
    assert!(!text.contains(TOKEN), "the token was stored");
    assert!(
        text.contains("--remote_header=Authorization="),
        "the flag name was kept"
    );
    let json_text = std::fs::read_to_string(&json).unwrap();
    assert!(
        json_text.contains(TOKEN),
        "(Bazel's own local file does hold it)"
    );
}

/// Reads a varint.
fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// One field: (number, wire type, payload, varint value).
type Field = (u64, u8, Vec<u8>, u64);

/// Splits a message into its fields.
fn fields(b: &[u8]) -> Option<Vec<Field>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let tag = varint(b, &mut pos)?;
        match tag & 7 {
            0 => out.push((tag >> 3, 0, vec![], varint(b, &mut pos)?)),
            2 => {
                let len = varint(b, &mut pos)? as usize;
                let payload = b.get(pos..pos.checked_add(len)?)?.to_vec();
                pos += len;
                out.push((tag >> 3, 2, payload, 0));
            }
            1 => pos += 8,
            5 => pos += 4,
            _ => return None,
        }
    }
    Some(out)
}

/// The id of a `build_event_stream.BuildEvent` (field 1): the number of its
/// oneof field and the strings and numbers inside it.
fn binary_id(event: &[u8]) -> Option<(u64, Vec<String>)> {
    let (_, _, id, _) = fields(event)?.into_iter().find(|f| f.0 == 1)?;
    let (number, _, inner, _) = fields(&id)?.into_iter().next()?;
    let mut leaves = Vec::new();
    binary_leaves(&inner, &mut leaves);
    Some((number, leaves))
}

fn binary_leaves(b: &[u8], out: &mut Vec<String>) {
    let Some(fs) = fields(b) else { return };
    for (_, wire, payload, value) in fs {
        if wire == 0 {
            out.push(value.to_string());
            continue;
        }
        let text = std::str::from_utf8(&payload)
            .ok()
            .filter(|t| !t.chars().any(|c| c.is_control() && c != '\n'));
        let nested =
            (text.is_none() || payload.first() == Some(&b'\n')) && fields(&payload).is_some();
        match (nested, text) {
            (false, Some(t)) => out.push(t.to_string()),
            _ => binary_leaves(&payload, out),
        }
    }
}

fn json_id_leaves(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Number(n) => out.push(n.to_string()),
        serde_json::Value::Bool(b) => out.push(u8::from(*b).to_string()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_id_leaves(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| json_id_leaves(x, out)),
        serde_json::Value::Null => {}
    }
}

const SECRET: &[u8] = b"bes-bazel-test-secret-0123456789abcdef";

/// A token for the team's reader (the only identity that may query).
fn reader_token() -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::default(),
        &serde_json::json!({"sub": "reader", "exp": now + 600}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

/// JWT authorization where Bazel (which sends no headers on BES) publishes to
/// team-a anonymously and only the reader may query.
fn gated(dir: &Path) -> String {
    std::fs::write(dir.join("hmac.secret"), SECRET).unwrap();
    std::fs::write(
        dir.join("acl.yaml"),
        "team-a:\n  allow:\n    - requests: [PublishLifecycleEvent, PublishBuildToolEventStream]\n    - actor: reader\n      requests: [QueryEventStreams]\n",
    )
    .unwrap();
    "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  acl-config: acl.yaml\n  allow-unauthenticated-instances: [team-a]\n".to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_2_1_streams_its_build_to_gridgate() {
    let Some(bazel) = tokio::task::spawn_blocking(bazel_binary).await.unwrap() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();

    // Plaintext.
    let server = TestServer::start(&loopback_config("", &gated(dir.path())), dir.path()).await;
    let addr = server.tcp();
    let channel = plain_channel(addr).await;
    let plain = dir.path().join("plain");
    build_and_compare(
        channel,
        format!("grpc://127.0.0.1:{}", addr.port()),
        vec![],
        &bazel,
        &plain,
    )
    .await;
    server.stop().await;

    // TLS, the server checked against --tls_certificate.
    let certs = Certs::new();
    let server = TestServer::start(
        &loopback_config(&certs.credentials_yaml(false), &gated(certs.dir.path())),
        certs.dir.path(),
    )
    .await;
    let addr = server.tcp();
    let channel = tls_channel(addr, &certs.ca, None).await.unwrap();
    let tls = dir.path().join("tls");
    build_and_compare(
        channel,
        format!("grpcs://localhost:{}", addr.port()),
        vec![format!("--tls_certificate={}", certs.ca.display())],
        &bazel,
        &tls,
    )
    .await;
    server.stop().await;
}
