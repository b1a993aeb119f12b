//! Observability end to end, on the real binary: the Prometheus endpoint
//! scraped over HTTP, BuildGrid's monitoring output received on a UDP socket
//! the test holds, and JSON log and audit lines with request ids.

mod common;
#[path = "common/jwks_server.rs"]
mod jwks_server;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use gridgate::proto::build::bazel::remote::execution::v2 as re;
use gridgate::reapi::digest::BlobKey;
use jsonwebtoken::Algorithm;
use jwks_server::{claims, JwksServer, TestKey};
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const ISS: &str = "https://ci.example";
const AUD: &str = "gridgate";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-hs256";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// One Prometheus sample: name and labels.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition format (the lines that are samples).
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = value.parse().expect("sample value");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                // Label values in these tests contain no commas or quotes.
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').expect("label pair");
                    labels.insert(k.to_string(), v.trim_matches('"').to_string());
                }
                (n.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The sum of the samples of `name` that carry all of `labels` (0 if none).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

async fn scrape(addr: std::net::SocketAddr) -> Vec<Sample> {
    let resp = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    parse(&resp.text().await.unwrap())
}

/// The address from the "Prometheus endpoint on http://ADDR/metrics" line.
fn metrics_addr(bin: &mut Binary) -> std::net::SocketAddr {
    let line = bin
        .wait_for_line("Prometheus endpoint on http://", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no metrics line: {:#?}", bin.seen));
    let rest = &line[line.find("http://").unwrap() + 7..];
    rest.split('/').next().unwrap().parse().unwrap()
}

async fn check(
    addr: std::net::SocketAddr,
    token: Option<&str>,
) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
    let mut client = HealthClient::new(plain_channel(addr).await);
    let req = match token {
        Some(t) => with_token(HealthCheckRequest::default(), t),
        None => tonic::Request::new(HealthCheckRequest::default()),
    };
    client.check(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_counters_move_by_exactly_the_calls_made() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "hmac.secret",
        std::str::from_utf8(SECRET).unwrap(),
    );
    write(
        dir.path(),
        "acl.yaml",
        "\"\":\n  allow:\n    - actor: alice\nteam-a:\n  allow:\n    - actor: alice\n",
    );
    let config = write(
        dir.path(),
        "gridgate.yaml",
        &loopback_config(
            "",
            &format!(
                "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  audience: {AUD}\n  open-health: false\n  acl-config: acl.yaml\n  watch-policy: false\n\
                 instances:\n  - name: team-a\n    cas: {{ backend: memory, max-bytes: 1M }}\n\
                 metrics:\n  address: \"127.0.0.1:0\"\n"
            ),
        ),
    );
    let mut bin = Binary::start(&["serve", "--config", &config]);
    let addr = bin.listening_addr();
    let maddr = metrics_addr(&mut bin);
    let key = TestKey::hmac(Algorithm::HS256, SECRET);
    let alice = key.sign(&claims(ISS, AUD, "alice"));
    let bob = key.sign(&claims(ISS, AUD, "bob"));

    let before = scrape(maddr).await;
    let health = [
        ("service", "grpc.health.v1.Health"),
        ("method", "Check"),
        ("instance", ""),
    ];
    let rpc = |samples: &[Sample], code: &str| {
        let mut labels = health.to_vec();
        labels.push(("code", code));
        value(samples, "gridgate_rpc_requests_total", &labels)
    };
    let decisions = |samples: &[Sample], outcome: &str, reason: &str| {
        value(
            samples,
            "gridgate_gate_decisions_total",
            &[("outcome", outcome), ("reason", reason)],
        )
    };

    // 3 admitted, 2 without credentials, 1 denied by the policy, 1 unrouted.
    for _ in 0..3 {
        check(addr, Some(&alice)).await.unwrap();
    }
    for _ in 0..2 {
        assert_eq!(
            check(addr, None).await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
    assert_eq!(
        check(addr, Some(&bob)).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let unrouted = raw_unary(
        plain_channel(addr).await,
        "/no.such.Service/Call",
        bytes::Bytes::new(),
        &[],
    )
    .await
    .unwrap_err();
    assert_eq!(unrouted.code(), Code::Unimplemented);

    // CAS on team-a: two misses, one upload of 5 bytes, then one hit and one miss.
    let mut cas = ContentAddressableStorageClient::new(plain_channel(addr).await);
    let hello = BlobKey::of(b"hello").to_digest();
    let other = BlobKey::of(b"other").to_digest();
    let missing = cas
        .find_missing_blobs(with_token(
            re::FindMissingBlobsRequest {
                instance_name: "team-a".into(),
                blob_digests: vec![hello.clone(), other.clone()],
                ..Default::default()
            },
            &alice,
        ))
        .await
        .unwrap();
    assert_eq!(missing.into_inner().missing_blob_digests.len(), 2);
    cas.batch_update_blobs(with_token(
        re::BatchUpdateBlobsRequest {
            instance_name: "team-a".into(),
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(hello.clone()),
                data: bytes::Bytes::from_static(b"hello"),
                ..Default::default()
            }],
            ..Default::default()
        },
        &alice,
    ))
    .await
    .unwrap();
    cas.find_missing_blobs(with_token(
        re::FindMissingBlobsRequest {
            instance_name: "team-a".into(),
            blob_digests: vec![hello, other],
            ..Default::default()
        },
        &alice,
    ))
    .await
    .unwrap();

    let after = scrape(maddr).await;
    let delta = |f: &dyn Fn(&[Sample]) -> f64| f(&after) - f(&before);
    assert_eq!(delta(&|s| rpc(s, "OK")), 3.0);
    assert_eq!(delta(&|s| rpc(s, "UNAUTHENTICATED")), 2.0);
    assert_eq!(delta(&|s| rpc(s, "PERMISSION_DENIED")), 1.0);
    assert_eq!(
        delta(&|s| value(
            s,
            "gridgate_rpc_requests_total",
            &[("service", "unknown"), ("code", "UNIMPLEMENTED")]
        )),
        1.0
    );
    // The latency histogram counts the same calls.
    let mut ok_labels = health.to_vec();
    ok_labels.push(("code", "OK"));
    assert_eq!(
        delta(&|s| value(s, "gridgate_rpc_duration_seconds_count", &ok_labels)),
        3.0
    );
    assert_eq!(delta(&|s| decisions(s, "allow", "rule")), 3.0 + 3.0);
    assert_eq!(delta(&|s| decisions(s, "unauthenticated", "missing")), 2.0);
    assert_eq!(delta(&|s| decisions(s, "deny", "no_rule")), 1.0);
    assert_eq!(delta(&|s| decisions(s, "unrouted", "no_route")), 1.0);
    // Every token presented (3 + 1 health, 3 CAS) was looked up once; alice's
    // first was a miss, and so was bob's.
    let hits = delta(&|s| value(s, "gridgate_token_cache_total", &[("result", "hit")]));
    let misses = delta(&|s| value(s, "gridgate_token_cache_total", &[("result", "miss")]));
    assert_eq!(hits + misses, 7.0, "hits {hits} misses {misses}");
    assert_eq!(misses, 2.0);
    // CAS.
    let team_a = [("instance", "team-a")];
    assert_eq!(
        delta(&|s| value(s, "gridgate_cas_bytes_stored_total", &team_a)),
        5.0
    );
    assert_eq!(
        delta(&|s| value(
            s,
            "gridgate_cas_lookups_total",
            &[("instance", "team-a"), ("result", "miss")]
        )),
        3.0
    );
    assert_eq!(
        delta(&|s| value(
            s,
            "gridgate_cas_lookups_total",
            &[("instance", "team-a"), ("result", "hit")]
        )),
        1.0
    );
    assert_eq!(
        delta(&|s| value(
            s,
            "gridgate_rpc_requests_total",
            &[
                ("method", "FindMissingBlobs"),
                ("instance", "team-a"),
                ("code", "OK")
            ]
        )),
        2.0
    );
    // Connections: every call above made its own.
    assert!(delta(&|s| value(s, "gridgate_connections_total", &[("transport", "tcp")])) >= 8.0);

    // A policy reload on SIGHUP: counted, and the version in force changes.
    let version_before: Vec<String> = after
        .iter()
        .filter(|s| s.name == "gridgate_policy_info" && s.value == 1.0)
        .map(|s| s.labels["version"].clone())
        .collect();
    assert_eq!(version_before.len(), 1, "{version_before:?}");
    write(
        dir.path(),
        "acl.yaml",
        "\"\":\n  allow:\n    - actor: bob\n",
    );
    bin.signal("HUP");
    assert!(tokio::task::block_in_place(|| bin
        .wait_for_line("policy reloaded", Duration::from_secs(10))
        .is_some()));
    let reloaded = scrape(maddr).await;
    assert_eq!(
        value(
            &reloaded,
            "gridgate_policy_reloads_total",
            &[("result", "success")]
        ),
        1.0
    );
    let version_after: Vec<&Sample> = reloaded
        .iter()
        .filter(|s| s.name == "gridgate_policy_info" && s.value == 1.0)
        .collect();
    assert_eq!(version_after.len(), 1);
    assert_ne!(version_after[0].labels["version"], version_before[0]);

    // Instance labels stay bounded: refused calls naming made-up instances
    // are all counted under "(other)".
    for i in 0..5 {
        let _ = cas
            .find_missing_blobs(with_token(
                re::FindMissingBlobsRequest {
                    instance_name: format!("made-up-{i}"),
                    ..Default::default()
                },
                &alice,
            ))
            .await;
    }
    let last = scrape(maddr).await;
    assert!(!last.iter().any(|s| s
        .labels
        .get("instance")
        .is_some_and(|i| i.starts_with("made-up"))));
    assert_eq!(
        value(
            &last,
            "gridgate_rpc_requests_total",
            &[("instance", "(other)"), ("code", "PERMISSION_DENIED")]
        ),
        5.0
    );

    // Other paths are 404.
    let resp = reqwest::get(format!("http://{maddr}/")).await.unwrap();
    assert_eq!(resp.status(), 404);
    bin.signal("TERM");
    assert_eq!(
        tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10))),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_fetches_and_keys_are_measured() {
    let key = TestKey::rsa(Algorithm::RS256, "k1");
    let jwks = JwksServer::start(&[&key]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "gridgate.yaml",
        &loopback_config(
            "",
            &format!(
                "authorization:\n  method: jwt\n  algorithm: rs256\n  jwks-url: \"{}\"\n  audience: {AUD}\nmetrics:\n  address: \"127.0.0.1:0\"\n",
                jwks.url()
            ),
        ),
    );
    let mut bin = Binary::start(&["serve", "--config", &config]);
    let _addr = bin.listening_addr();
    let maddr = metrics_addr(&mut bin);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = scrape(maddr).await;
        let fetched = value(&s, "gridgate_jwks_fetches_total", &[("result", "success")]);
        if fetched >= 1.0 {
            assert_eq!(value(&s, "gridgate_jwks_keys", &[]), 1.0);
            let age = value(&s, "gridgate_jwks_last_success_age_seconds", &[]);
            assert!((0.0..60.0).contains(&age), "age {age}");
            assert_eq!(
                value(&s, "gridgate_jwks_fetches_total", &[("result", "failure")]),
                0.0
            );
            break;
        }
        assert!(Instant::now() < deadline, "no JWKS fetch counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts the binary with `monitoring:` sending to a UDP socket of the test,
/// makes one health check, and returns the datagrams' lines that mention it.
fn statsd_lines(tag_format: &str, serialization: &str) -> Vec<String> {
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "gridgate.yaml",
        &loopback_config(
            "",
            &format!(
                "monitoring:\n  enabled: true\n  endpoint-type: udp\n  endpoint-location: \"{}\"\n  serialization-format: {serialization}\n  metric-prefix: gg\n  tag-format: {tag_format}\n  additional-tags: {{ env: test }}\n  period-seconds: 1\n",
                sink.local_addr().unwrap()
            ),
        ),
    );
    let mut bin = Binary::start(&["serve", "--config", &config]);
    let addr = bin.listening_addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        check(addr, None).await.unwrap();
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        if let Ok(n) = sink.recv(&mut buf) {
            assert!(n <= 1432, "datagram of {n} bytes");
            let text = std::str::from_utf8(&buf[..n]).unwrap();
            lines.extend(text.lines().map(str::to_string));
            if lines.iter().any(|l| l.contains("rpc_duration")) {
                break;
            }
        }
    }
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(Duration::from_secs(10)), Some(0));
    lines.retain(|l| l.contains("gg.gridgate_rpc_"));
    assert!(!lines.is_empty(), "no RPC lines for {tag_format}");
    lines
}

#[test]
fn statsd_lines_over_udp_in_each_tag_format() {
    let find = |lines: &[String], needle: &str| -> String {
        lines
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle} in {lines:#?}"))
            .clone()
    };
    let none = statsd_lines("none", "statsd");
    assert_eq!(
        find(&none, "requests_total"),
        "gg.gridgate_rpc_requests_total:1|c"
    );
    let timer = find(&none, "rpc_duration");
    assert!(timer.starts_with("gg.gridgate_rpc_duration_ms:"), "{timer}");
    assert!(timer.ends_with("|ms"), "{timer}");

    let influx = statsd_lines("influx-statsd", "statsd");
    assert_eq!(
        find(&influx, "requests_total"),
        "gg.gridgate_rpc_requests_total,service=grpc.health.v1.Health,method=Check,instance=,code=OK,env=test:1|c"
    );
    let dog = statsd_lines("dogstatsd", "statsd");
    assert_eq!(
        find(&dog, "requests_total"),
        "gg.gridgate_rpc_requests_total:1|c|#service:grpc.health.v1.Health,method:Check,instance:,code:OK,env:test"
    );
    let graphite = statsd_lines("graphite", "statsd");
    assert_eq!(
        find(&graphite, "requests_total"),
        "gg.gridgate_rpc_requests_total;service=grpc.health.v1.Health;method=Check;instance=;code=OK;env=test:1|c"
    );
    let json = statsd_lines("none", "json");
    let record: serde_json::Value = serde_json::from_str(&find(&json, "requests_total")).unwrap();
    assert_eq!(record["name"], "gg.gridgate_rpc_requests_total");
    assert_eq!(record["type"], "counter");
    assert_eq!(record["value"], 1.0);
    assert_eq!(record["tags"]["code"], "OK");
    assert_eq!(record["tags"]["env"], "test");
}

#[test]
fn json_logs_and_the_audit_file_carry_request_ids() {
    use base64::Engine;
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "hmac.secret",
        std::str::from_utf8(SECRET).unwrap(),
    );
    let config = write(
        dir.path(),
        "gridgate.yaml",
        &loopback_config(
            "",
            &format!(
                "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  audience: {AUD}\n  open-health: false\n"
            ),
        ),
    );
    let audit = dir.path().join("audit.jsonl");
    let mut bin = Binary::start(&[
        "--log-format",
        "json",
        "serve",
        "--config",
        &config,
        "--audit-log",
        audit.to_str().unwrap(),
    ]);
    let addr = bin.listening_addr();
    let key = TestKey::hmac(Algorithm::HS256, SECRET);
    let alice = key.sign(&claims(ISS, AUD, "alice"));
    let metadata = re::RequestMetadata {
        tool_details: Some(re::ToolDetails {
            tool_name: "bazel".into(),
            tool_version: "2.1.0".into(),
        }),
        tool_invocation_id: "inv-7".into(),
        ..Default::default()
    };
    let metadata = base64::engine::general_purpose::STANDARD.encode(metadata.encode_to_vec());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (given, generated) = rt.block_on(async {
        let mut client = HealthClient::new(plain_channel(addr).await);
        let mut req = with_token(HealthCheckRequest::default(), &alice);
        req.metadata_mut()
            .insert("x-request-id", "build-42-step-1".parse().unwrap());
        req.metadata_mut().insert_bin(
            "build.bazel.remote.execution.v2.requestmetadata-bin",
            tonic::metadata::MetadataValue::from_bytes(
                &base64::engine::general_purpose::STANDARD
                    .decode(&metadata)
                    .unwrap(),
            ),
        );
        let resp = client.check(req).await.unwrap();
        let given = resp
            .metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        // Refused without a token; the refusal carries a generated id.
        let err = client
            .check(HealthCheckRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        let generated = err
            .metadata()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        (given, generated)
    });
    assert_eq!(given, "build-42-step-1");
    assert_eq!(generated.len(), 32, "{generated}");
    assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));

    // The audit file has one JSON line per decision, with the ids.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect();
        if lines.len() >= 2 || Instant::now() > deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let allowed = &lines[0];
    assert_eq!(allowed["request_id"], "build-42-step-1");
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["actor"], "alice");
    assert_eq!(allowed["tool"], "bazel/2.1.0");
    assert_eq!(allowed["invocation"], "inv-7");
    assert_eq!(lines[1]["request_id"], generated.as_str());
    assert_eq!(lines[1]["decision"], "deny");
    // Neither the token nor its signature is in the file.
    let text = std::fs::read_to_string(&audit).unwrap();
    let signature = alice.rsplit('.').next().unwrap();
    assert!(!text.contains(signature));

    // stderr is JSON too, and the audit lines went to the file instead.
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(Duration::from_secs(10)), Some(0));
    for line in &bin.seen {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_ne!(v["target"], "gridgate::audit", "{line}");
    }
    assert!(bin.seen.iter().any(|l| l.contains("listening on")));
}

#[test]
fn monitoring_to_a_file_and_a_unix_socket() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("metrics.log");
    let sock = dir.path().join("statsd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    for (kind, location) in [("file", &file), ("socket", &sock)] {
        let config = write(
            dir.path(),
            &format!("{kind}.yaml"),
            &loopback_config(
                "",
                &format!(
                    "monitoring:\n  enabled: true\n  endpoint-type: {kind}\n  endpoint-location: \"{}\"\n  metric-prefix: gg\n  period-seconds: 1\n",
                    location.display()
                ),
            ),
        );
        let mut bin = Binary::start(&["serve", "--config", &config]);
        let addr = bin.listening_addr();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            check(addr, None).await.unwrap();
        });
        let want = "gg.gridgate_rpc_requests_total:1|c";
        let deadline = Instant::now() + Duration::from_secs(10);
        match kind {
            "file" => loop {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                if text.lines().any(|l| l == want) {
                    break;
                }
                assert!(Instant::now() < deadline, "no {want} in {text}");
                std::thread::sleep(Duration::from_millis(100));
            },
            _ => {
                let (stream, _) = listener.accept().unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let found = BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                    .any(|l| l == want);
                assert!(found, "no {want} on the socket");
            }
        }
        bin.signal("TERM");
        assert_eq!(bin.wait_exit(Duration::from_secs(10)), Some(0));
    }
}
