//! The decoder and model over streams real Bazel clients recorded
//! (`tests/fixtures/bep/`: `--build_event_binary_file` and, for comparison,
//! `--build_event_json_file` of the same run), compared with what Bazel itself
//! wrote in JSON.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use bytes::Bytes;
use serde_json::Value;

use super::model::{self, apply, Update};
use super::Fact;
use crate::bes::event::{prepare, Prepared, StreamKey};
use crate::proto::google::devtools::build::v1::{
    build_event, BuildEvent, OrderedBuildEvent, StreamId,
};
use crate::proto::gridgate::v1 as gg;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/bep")
        .join(rel)
}

/// The payloads of a `--build_event_binary_file` (varint-delimited BuildEvents).
pub(crate) fn recorded(rel: &str) -> Vec<Bytes> {
    let mut data = Bytes::from(std::fs::read(fixture(rel)).unwrap());
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = prost::decode_length_delimiter(&mut data).unwrap();
        out.push(data.split_to(len));
    }
    out
}

fn stream() -> StreamKey {
    StreamKey {
        build_id: "build".into(),
        invocation_id: "inv".into(),
        component: 3,
        instance: "team-a".into(),
    }
}

/// The events Bazel would publish for these payloads, decoded.
pub(crate) fn tool_stream(payloads: &[Bytes]) -> Vec<Prepared> {
    tool_stream_of(&stream(), payloads, 1_700_000_000)
}

/// The same on the stream `key`, event times from `epoch_seconds` on.
pub(crate) fn tool_stream_of(
    key: &StreamKey,
    payloads: &[Bytes],
    epoch_seconds: i64,
) -> Vec<Prepared> {
    payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let e = OrderedBuildEvent {
                stream_id: Some(StreamId {
                    build_id: key.build_id.clone(),
                    invocation_id: key.invocation_id.clone(),
                    component: key.component,
                }),
                sequence_number: i as i64 + 1,
                event: Some(BuildEvent {
                    event_time: Some(prost_types::Timestamp {
                        seconds: epoch_seconds + i as i64,
                        nanos: 0,
                    }),
                    event: Some(build_event::Event::BazelEvent(prost_types::Any {
                        type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
                        value: p.to_vec(),
                    })),
                }),
            };
            let mut p = prepare(&e, &key.instance, 64 << 20).unwrap();
            p.decode();
            p
        })
        .collect()
}

/// Applies events in batches of `batch`, carrying the state between them as
/// a store does; returns the invocation and every target.
pub(crate) fn build(
    events: &[Prepared],
    batch: usize,
) -> (gg::Invocation, BTreeMap<String, gg::Target>) {
    let mut inv: Option<gg::Invocation> = None;
    let mut targets: BTreeMap<String, gg::Target> = BTreeMap::new();
    let mut log = Vec::new();
    for chunk in events.chunks(batch) {
        let wanted: HashMap<String, gg::Target> = model::labels(chunk)
            .into_iter()
            .filter_map(|l| targets.get(&l).cloned().map(|t| (l, t)))
            .collect();
        let Update {
            invocation,
            targets: changed,
            log: new_log,
            ..
        } = apply(&chunk[0].stream, inv.take(), wanted, chunk).unwrap();
        for (offset, text) in new_log {
            assert_eq!(offset as usize, log.len(), "log offsets are contiguous");
            log.extend_from_slice(&text);
        }
        inv = Some(invocation);
        for t in changed {
            targets.insert(t.label.clone(), t);
        }
    }
    let inv = inv.unwrap();
    assert_eq!(inv.counts.as_ref().unwrap().log_bytes as usize, log.len());
    (inv, targets)
}

/// What Bazel wrote to its JSON file.
struct Json(Vec<Value>);

impl Json {
    fn read(rel: &str) -> Json {
        Json(
            std::fs::read_to_string(fixture(rel))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        )
    }
    fn payloads<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a Value, &'a Value)> + 'a {
        self.0
            .iter()
            .filter_map(move |e| Some((&e["id"], e.get(name)?)))
    }
    fn exit(&self) -> (i64, String) {
        let (_, f) = self.payloads("finished").next().unwrap();
        (
            f["exitCode"]["code"].as_i64().unwrap_or(0),
            f["exitCode"]["name"].as_str().unwrap().to_string(),
        )
    }
}

/// The invocation gridgate builds against the JSON Bazel wrote.
fn compare(dir: &str, name: &str) -> (gg::Invocation, BTreeMap<String, gg::Target>) {
    let events = tool_stream(&recorded(&format!("{dir}/{name}.bin")));
    let json = Json::read(&format!("{dir}/{name}.json"));
    let (inv, targets) = build(&events, events.len());
    // The same whatever the batches were.
    for batch in [1, 7] {
        let (i, t) = build(&events, batch);
        assert_eq!(
            (&i, &t),
            (&inv, &targets),
            "{dir}/{name} in batches of {batch}"
        );
    }
    assert_eq!(inv.counts.as_ref().unwrap().undecodable_events, 0);

    let (_, started) = json.payloads("started").next().unwrap();
    assert_eq!(inv.command, started["command"].as_str().unwrap());
    assert_eq!(
        inv.start_time_millis.to_string(),
        started["startTimeMillis"].as_str().unwrap()
    );
    assert_eq!(
        inv.bazel_version,
        started["buildToolVersion"].as_str().unwrap_or("")
    );
    let (code, exit_name) = json.exit();
    assert_eq!(
        (i64::from(inv.exit_code), inv.exit_code_name.clone()),
        (code, exit_name)
    );
    let (id, _) = json.payloads("expanded").next().unwrap();
    let patterns: Vec<&str> = id["pattern"]["pattern"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(inv.patterns, patterns);
    let (_, md) = json.payloads("buildMetadata").next().unwrap();
    for (k, v) in md["metadata"].as_object().unwrap() {
        assert_eq!(
            inv.build_metadata.get(k).map(String::as_str),
            v.as_str(),
            "{k}"
        );
    }
    let (_, ws) = json.payloads("workspaceStatus").next().unwrap();
    for item in ws["item"].as_array().unwrap() {
        match item["key"].as_str() {
            Some("BUILD_USER") => assert_eq!(Some(inv.user.as_str()), item["value"].as_str()),
            Some("BUILD_HOST") => assert_eq!(Some(inv.host.as_str()), item["value"].as_str()),
            _ => {}
        }
    }
    // Every target Bazel completed, with its success.
    for (id, c) in json.payloads("completed") {
        let label = id["targetCompleted"]["label"].as_str().unwrap();
        let t = &targets[label];
        assert!(t.completed, "{label}");
        assert_eq!(
            t.success,
            c["success"].as_bool().unwrap_or(false),
            "{label}"
        );
    }
    for (id, c) in json.payloads("configured") {
        let label = id["targetConfigured"]["label"].as_str().unwrap();
        assert_eq!(
            targets[label].kind,
            c["targetKind"].as_str().unwrap(),
            "{label}"
        );
    }
    // Every test summary, and every attempt Bazel reported.
    let mut results: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, r) in json.payloads("testResult") {
        let label = id["testResult"]["label"].as_str().unwrap();
        *results.entry(label).or_default() += 1;
        let run = targets[label]
            .test
            .as_ref()
            .unwrap()
            .runs
            .iter()
            .find(|x| {
                i64::from(x.attempt) == id["testResult"]["attempt"].as_i64().unwrap_or(0)
                    && i64::from(x.shard) == id["testResult"]["shard"].as_i64().unwrap_or(0)
                    && i64::from(x.run) == id["testResult"]["run"].as_i64().unwrap_or(0)
            })
            .unwrap_or_else(|| panic!("{label} {id}"));
        assert_eq!(
            run.status,
            r["status"].as_str().unwrap_or("NO_STATUS"),
            "{label}"
        );
        let log = r["testActionOutput"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "test.log")
            .and_then(|f| f["uri"].as_str())
            .unwrap_or("");
        assert_eq!(run.test_log_uri, log, "{label}");
    }
    let mut summaries = 0;
    for (id, s) in json.payloads("testSummary") {
        summaries += 1;
        let label = id["testSummary"]["label"].as_str().unwrap();
        let test = targets[label].test.as_ref().unwrap();
        assert_eq!(test.status, s["overallStatus"].as_str().unwrap(), "{label}");
        assert_eq!(test.runs.len(), results[label], "{label}");
    }
    let counts = inv.counts.unwrap();
    assert_eq!(counts.tests as usize, summaries);
    assert_eq!(counts.events as usize, events.len());
    // Console output, in order.
    let progress: usize = json
        .payloads("progress")
        .map(|(_, p)| {
            p["stdout"].as_str().map_or(0, str::len) + p["stderr"].as_str().map_or(0, str::len)
        })
        .sum();
    assert_eq!(counts.log_bytes as usize, progress);
    (inv, targets)
}

#[test]
fn a_bazel_4_test_run_decodes_to_what_bazel_reported() {
    test_run("bazel-4.2.3");
}

#[test]
fn a_bazel_2_1_test_run_decodes_to_what_bazel_reported() {
    let inv = test_run("bazel-2.1.0");
    assert_eq!(inv.bazel_version, "2.1.0");
}

#[test]
fn a_bazel_4_failing_genrule_decodes_to_what_bazel_reported() {
    failing_genrule("bazel-4.2.3");
}

#[test]
fn a_bazel_2_1_failing_genrule_decodes_to_what_bazel_reported() {
    failing_genrule("bazel-2.1.0");
}

/// `bazel test` of passing, failing, flaky, timed-out and sharded tests.
fn test_run(dir: &str) -> gg::Invocation {
    let (inv, targets) = compare(dir, "test");
    assert_eq!(inv.state(), gg::InvocationState::Failed);
    let status = |l: &str| targets[l].test.as_ref().unwrap().status.clone();
    assert_eq!(status("//:passes"), "PASSED");
    assert_eq!(status("//:fails"), "FAILED");
    assert_eq!(status("//:flaky"), "FLAKY");
    assert_eq!(status("//:slow"), "TIMEOUT");
    let sharded = targets["//:sharded"].test.as_ref().unwrap();
    assert_eq!(sharded.shard_count, 2);
    assert!(sharded.runs.iter().any(|r| r.shard == 1));
    let flaky = targets["//:flaky"].test.as_ref().unwrap();
    assert_eq!(flaky.runs.len(), 2, "two attempts");
    assert!(
        flaky.runs[0].test_log_uri.starts_with("file://")
            || flaky.runs[0].test_log_uri.starts_with("bytestream://")
    );
    let c = inv.counts.unwrap();
    assert_eq!(
        (c.tests, c.tests_passed, c.tests_flaky, c.tests_failed),
        (5, 2, 1, 2)
    );
    assert!(
        inv.keywords.is_empty(),
        "keywords come with the request, not the events"
    );
    assert!(inv.command_line.iter().any(|w| w == "test"));
    inv
}

/// `bazel build --keep_going` of a genrule that works and one that fails.
fn failing_genrule(dir: &str) {
    let (inv, targets) = compare(dir, "build");
    assert_eq!(inv.state(), gg::InvocationState::Failed);
    let broken = &targets["//:broken"];
    assert!(!broken.success);
    assert_eq!(broken.action_failures.len(), 1, "{broken:?}");
    let a = &broken.action_failures[0];
    let json = Json::read(&format!("{dir}/build.json"));
    let (_, action) = json.payloads("action").next().unwrap();
    assert_eq!(a.mnemonic, action["type"].as_str().unwrap());
    assert_eq!(
        i64::from(a.exit_code),
        action["exitCode"].as_i64().unwrap_or(0)
    );
    assert_eq!(a.stderr_uri, action["stderr"]["uri"].as_str().unwrap());
    assert!(targets["//:fine"].success);
    assert_eq!(inv.counts.unwrap().targets_failed, 1);
}

#[test]
fn an_event_that_does_not_decode_is_counted_not_fatal() {
    let mut events = tool_stream(&recorded("bazel-4.2.3/build.bin")[..3]);
    let mut junk = tool_stream(&[Bytes::from_static(&[0xff, 0xff, 0xff])]);
    junk[0].seq = 4;
    assert_eq!(junk[0].fact, Fact::Undecodable);
    events.append(&mut junk);
    let (inv, _) = build(&events, 2);
    let c = inv.counts.unwrap();
    assert_eq!((c.events, c.undecodable_events), (4, 1));
    assert_eq!(inv.state(), gg::InvocationState::Running);
}
