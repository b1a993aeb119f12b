//! Web listener benchmarks, against a gateway in this process on loopback
//! (JWT + ACL Gate, the pages read by a real HTTP client):
//!
//! ```text
//! cargo run --release --example web_bench -- page --targets 10000 --tests 1000
//! cargo run --release --example web_bench -- list --postgres postgres://postgres@127.0.0.1:5432/test --invocations 1000000
//! cargo run --release --example web_bench -- idle --watchers 200 --seconds 60
//! ```
//!
//! - `page`: one build of `--targets` targets, `--tests` of them tests (1 %
//!   of those failed, each with a test log URI), 1 MiB of console output,
//!   published over gRPC into the memory store; then `--samples` GETs of
//!   its page: p50/p90/p99 of the time to the last byte, the page's weight
//!   and its weight before the console output.
//! - `list`: `--seed` invocations published through the PostgreSQL store,
//!   copied in SQL up to `--invocations` rows (same tables and indexes; the
//!   copies' bodies keep the original's id), in 100 instances the viewer may
//!   query; then `--samples` GETs of `/invocations` (newest 50), of one
//!   instance's newest 50, and of the second page.
//! - `idle`: a running build, `--watchers` live pages (server-sent event
//!   streams) open on it; the process's CPU time over `--seconds` with
//!   nothing published, then one event published and the time until every
//!   watcher was told.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use gridgate::bes::event::{prepare, Prepared, StreamKey};
use gridgate::bes::store::{self, EventStore};
use gridgate::config::{BuildEventsConfig, Config};
use gridgate::proto::build_event_stream as bep;
use gridgate::proto::google::devtools::build::v1::{
    build_event, publish_build_event_client::PublishBuildEventClient, BuildEvent,
    OrderedBuildEvent, PublishBuildToolEventStreamRequest, StreamId,
};
use gridgate::server::{BoundAddr, Gateway};
use prost::Message;

const SECRET: &[u8] = b"web-bench-secret-0123456789abcdef0123456789";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Page {
        #[arg(long, default_value_t = 10_000)]
        targets: usize,
        #[arg(long, default_value_t = 1_000)]
        tests: usize,
        #[arg(long, default_value_t = 50)]
        samples: usize,
    },
    List {
        #[arg(long)]
        postgres: String,
        #[arg(long, default_value_t = 1_000_000)]
        invocations: usize,
        #[arg(long, default_value_t = 10_000)]
        seed: usize,
        #[arg(long, default_value_t = 200)]
        samples: usize,
    },
    Idle {
        #[arg(long, default_value_t = 200)]
        watchers: usize,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn token() -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::default(),
        &serde_json::json!({"sub": "alice", "exp": now + 36_000}),
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

/// A gateway with a web listener; every instance `team-N` (N < 100) lets
/// alice publish and query.
async fn gateway(dir: &std::path::Path, store: &str) -> (Gateway, std::net::SocketAddr, String) {
    std::fs::write(dir.join("hmac.secret"), SECRET).unwrap();
    let mut acl = String::new();
    for i in 0..100 {
        acl.push_str(&format!(
            "team-{i}:\n  allow:\n    - actor: alice\n      requests: [PublishLifecycleEvent, PublishBuildToolEventStream, QueryEventStreams]\n"
        ));
    }
    std::fs::write(dir.join("acl.yaml"), acl).unwrap();
    let yaml = format!(
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: true\n\
         authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  acl-config: acl.yaml\n\
         build-events:\n  store: {store}\n\
         web:\n  address: \"127.0.0.1:0\"\n  insecure-mode: true\n"
    );
    let config = Config::parse(&yaml, "bench.yaml", dir).expect("config");
    let g = Gateway::bind(config).await.expect("bind");
    let grpc = match &g.local_addrs()[0] {
        BoundAddr::Tcp(a) => *a,
        _ => unreachable!(),
    };
    let web = match g.web_addr() {
        Some(BoundAddr::Tcp(a)) => format!("http://{a}"),
        _ => unreachable!(),
    };
    (g, grpc, web)
}

fn bep_event(id: bep::build_event_id::Id, payload: bep::build_event::Payload) -> Vec<u8> {
    bep::BuildEvent {
        id: Some(bep::BuildEventId { id: Some(id) }),
        payload: Some(payload),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The payloads of one big build.
fn big_build(uuid: &str, targets: usize, tests: usize) -> Vec<Vec<u8>> {
    use bep::build_event::Payload as P;
    use bep::build_event_id::{self as ids, Id};
    let mut out = vec![bep_event(
        Id::Started(ids::BuildStartedId {}),
        P::Started(bep::BuildStarted {
            uuid: uuid.into(),
            start_time_millis: 1_760_000_000_000,
            command: "test".into(),
            build_tool_version: "7.4.1".into(),
            ..Default::default()
        }),
    )];
    for t in 0..targets {
        let label = format!("//big/pkg{}:target_{t}", t % 100);
        let test = t < tests;
        out.push(bep_event(
            Id::TargetConfigured(ids::TargetConfiguredId {
                label: label.clone(),
                ..Default::default()
            }),
            P::Configured(bep::TargetConfigured {
                target_kind: if test {
                    "sh_test rule".into()
                } else {
                    "genrule rule".into()
                },
                ..Default::default()
            }),
        ));
        if test {
            let failed = t % 100 == 7;
            let status = if failed {
                bep::TestStatus::Failed
            } else {
                bep::TestStatus::Passed
            } as i32;
            out.push(bep_event(
                Id::TestResult(ids::TestResultId {
                    label: label.clone(),
                    run: 1,
                    shard: 1,
                    attempt: 1,
                    ..Default::default()
                }),
                P::TestResult(bep::TestResult {
                    status,
                    test_attempt_duration_millis: 1234,
                    test_action_output: vec![bep::File {
                        name: "test.log".into(),
                        file: Some(bep::file::File::Uri(format!(
                            "bytestream://cache.example/team-0/blobs/{:064x}/100",
                            t
                        ))),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            ));
            out.push(bep_event(
                Id::TestSummary(ids::TestSummaryId {
                    label: label.clone(),
                    ..Default::default()
                }),
                P::TestSummary(bep::TestSummary {
                    overall_status: status,
                    total_run_count: 1,
                    ..Default::default()
                }),
            ));
        }
        out.push(bep_event(
            Id::TargetCompleted(ids::TargetCompletedId {
                label,
                ..Default::default()
            }),
            P::Completed(bep::TargetComplete {
                success: !(test && t % 100 == 7),
                ..Default::default()
            }),
        ));
    }
    let line = "\x1b[32mINFO:\x1b[0m [1,234 / 5,678] Testing //big/pkg1:target_1; 3s linux-sandbox ... (8 actions running)\n";
    let mut log = String::new();
    while log.len() < 1 << 20 {
        log.push_str(line);
    }
    for chunk in log.as_bytes().chunks(64 * 1024) {
        out.push(bep_event(
            Id::Progress(ids::ProgressId {
                opaque_count: out.len() as i32,
            }),
            P::Progress(bep::Progress {
                stderr: String::from_utf8_lossy(chunk).into_owned(),
                ..Default::default()
            }),
        ));
    }
    out
}

fn message(
    stream: &StreamId,
    instance: &str,
    seq: i64,
    event: build_event::Event,
) -> PublishBuildToolEventStreamRequest {
    PublishBuildToolEventStreamRequest {
        ordered_build_event: Some(OrderedBuildEvent {
            stream_id: Some(stream.clone()),
            sequence_number: seq,
            event: Some(BuildEvent {
                event_time: Some(prost_types::Timestamp {
                    seconds: 1_760_000_000 + seq,
                    nanos: 0,
                }),
                event: Some(event),
            }),
        }),
        project_id: instance.into(),
        ..Default::default()
    }
}

fn bazel(payload: Vec<u8>) -> build_event::Event {
    build_event::Event::BazelEvent(prost_types::Any {
        type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
        value: payload,
    })
}

/// Publishes payloads as one stream (finished when `finish`).
async fn publish(
    grpc: std::net::SocketAddr,
    instance: &str,
    uuid: &str,
    payloads: Vec<Vec<u8>>,
    finish: bool,
) {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stream = StreamId {
        build_id: format!("b-{uuid}"),
        invocation_id: uuid.into(),
        component: 3,
    };
    let n = payloads.len() as i64;
    let mut msgs: Vec<_> = payloads
        .into_iter()
        .enumerate()
        .map(|(i, p)| message(&stream, instance, i as i64 + 1, bazel(p)))
        .collect();
    if finish {
        msgs.push(message(
            &stream,
            instance,
            n + 1,
            build_event::Event::ComponentStreamFinished(
                build_event::BuildComponentStreamFinished { r#type: 1 },
            ),
        ));
    }
    let mut req = tonic::Request::new(tokio_stream::iter(msgs));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token()).parse().unwrap(),
    );
    let mut acks = PublishBuildEventClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .publish_build_tool_event_stream(req)
        .await
        .unwrap()
        .into_inner();
    while acks.message().await.unwrap().is_some() {}
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut v: Vec<Duration>) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name}: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms ({} samples)",
        ms(pct(&mut v, 0.5)),
        ms(pct(&mut v, 0.9)),
        ms(pct(&mut v, 0.99)),
        v.len()
    );
}

async fn time_gets(client: &reqwest::Client, url: &str, samples: usize) -> (Vec<Duration>, String) {
    let mut times = Vec::with_capacity(samples);
    let mut body = String::new();
    for _ in 0..samples {
        let t = Instant::now();
        let r = client.get(url).bearer_auth(token()).send().await.unwrap();
        assert!(r.status().is_success(), "{url}: {}", r.status());
        body = r.text().await.unwrap();
        times.push(t.elapsed());
    }
    (times, body)
}

/// utime + stime of this process.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    match Cli::parse().command {
        Cmd::Page {
            targets,
            tests,
            samples,
        } => {
            let (g, grpc, web) = gateway(dir.path(), "memory").await;
            let serving = tokio::spawn(g.serve(std::future::pending()));
            let t = Instant::now();
            let payloads = big_build("big", targets, tests);
            let events = payloads.len();
            publish(grpc, "team-0", "big", payloads, true).await;
            println!(
                "published {events} events ({targets} targets, {tests} tests) in {:?}",
                t.elapsed()
            );
            let url = format!("{web}/invocation/big");
            let _ = time_gets(&client, &url, 3).await;
            let (times, body) = time_gets(&client, &url, samples).await;
            report(
                &format!("GET /invocation/<id> ({targets} targets, {tests} tests)"),
                times,
            );
            let before = body.find("<section id=\"console\"").unwrap_or(body.len());
            println!(
                "page weight: {} bytes in all, {} bytes before the console output ({} targets on the first page of the table)",
                body.len(),
                before,
                body.matches("<td class=\"label\">").count()
            );
            serving.abort();
        }
        Cmd::List {
            postgres,
            invocations,
            seed,
            samples,
        } => {
            let schema = format!("web_bench_{}", std::process::id());
            let (pg, conn) = tokio_postgres::connect(&postgres, tokio_postgres::NoTls)
                .await
                .expect("PostgreSQL");
            tokio::spawn(conn);
            pg.batch_execute(&format!("CREATE SCHEMA {schema}"))
                .await
                .unwrap();
            let sep = if postgres.contains('?') { '&' } else { '?' };
            let url = format!("{postgres}{sep}options=-c%20search_path%3D{schema}");
            let st = store::open(&BuildEventsConfig::Postgres { url: url.clone() })
                .await
                .expect("store");
            let t = Instant::now();
            seed_invocations(&st, seed).await;
            println!(
                "published {seed} invocations through the store in {:?}",
                t.elapsed()
            );
            let t = Instant::now();
            let copies = invocations.div_ceil(seed).saturating_sub(1);
            pg.batch_execute(&format!(
                "INSERT INTO {schema}.bes_invocations
                   (instance, invocation_id, build_id, started_ms, state, user_name, command,
                    patterns, metadata, last_event_ms, updated_ms, body)
                 SELECT instance, invocation_id || '-copy-' || g, build_id, started_ms - g * 3600000,
                        state, user_name, command, patterns, metadata, last_event_ms, updated_ms, body
                 FROM {schema}.bes_invocations, generate_series(1, {copies}) AS g;
                 ANALYZE {schema}.bes_invocations;"
            ))
            .await
            .unwrap();
            let rows: i64 = pg
                .query_one(
                    &format!("SELECT count(*) FROM {schema}.bes_invocations"),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            println!("copied in SQL to {rows} invocations in {:?}", t.elapsed());
            let (g, _grpc, web) = gateway(dir.path(), &format!("{{ postgres: \"{url}\" }}")).await;
            let serving = tokio::spawn(g.serve(std::future::pending()));
            for (name, path) in [
                (
                    "GET /invocations (newest 50, every instance)",
                    "/invocations".to_string(),
                ),
                (
                    "GET /invocations?instance=team-7 (newest 50 of one)",
                    "/invocations?instance=team-7".to_string(),
                ),
                (
                    "GET /invocations?state=succeeded&command=build",
                    "/invocations?state=succeeded&command=build".to_string(),
                ),
            ] {
                let u = format!("{web}{path}");
                let _ = time_gets(&client, &u, 3).await;
                let (times, body) = time_gets(&client, &u, samples).await;
                report(name, times);
                if path == "/invocations" {
                    let next = body
                        .split("href=\"/invocations?")
                        .nth(1)
                        .and_then(|s| s.split('"').next())
                        .map(|s| s.replace("&amp;", "&"));
                    if let Some(next) = next {
                        let u = format!("{web}/invocations?{next}");
                        let (times, _) = time_gets(&client, &u, samples).await;
                        report("GET /invocations, the second page", times);
                    }
                    println!("list page weight: {} bytes", body.len());
                }
            }
            serving.abort();
            pg.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await
                .unwrap();
        }
        Cmd::Idle { watchers, seconds } => {
            let (g, grpc, web) = gateway(dir.path(), "memory").await;
            let serving = tokio::spawn(g.serve(std::future::pending()));
            let mut payloads = big_build("live", 10, 5);
            let last = payloads.split_off(payloads.len() - 1);
            publish(grpc, "team-0", "live", payloads, false).await;
            let mut streams = Vec::new();
            for _ in 0..watchers {
                let mut r = client
                    .get(format!("{web}/invocation/live/live"))
                    .bearer_auth(token())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let _ = r.chunk().await.unwrap();
                streams.push(r);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let before = cpu_time();
            let t = Instant::now();
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            let idle = cpu_time() - before;
            println!(
                "{watchers} live pages open, idle {:?}: process CPU time {:?} ({:.3} ms per watcher per minute)",
                t.elapsed(),
                idle,
                idle.as_secs_f64() * 1000.0 / watchers as f64 * 60.0 / seconds as f64
            );
            // One more event (published on the same stream id, seq after the others).
            let before = cpu_time();
            let t = Instant::now();
            let stream = StreamId {
                build_id: "b-live".into(),
                invocation_id: "live".into(),
                component: 3,
            };
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let seq = big_build("live", 10, 5).len() as i64;
            let mut req = tonic::Request::new(tokio_stream::iter(vec![message(
                &stream,
                "team-0",
                seq,
                bazel(last[0].clone()),
            )]));
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", token()).parse().unwrap(),
            );
            let mut acks = PublishBuildEventClient::new(ch)
                .publish_build_tool_event_stream(req)
                .await
                .unwrap()
                .into_inner();
            while acks.message().await.unwrap().is_some() {}
            let mut told = 0;
            for s in &mut streams {
                while let Ok(Ok(Some(c))) =
                    tokio::time::timeout(Duration::from_secs(30), s.chunk()).await
                {
                    if String::from_utf8_lossy(&c).contains("event:") {
                        told += 1;
                        break;
                    }
                }
            }
            println!(
                "one event published: {told}/{watchers} watchers told in {:?}, process CPU time {:?}",
                t.elapsed(),
                cpu_time() - before
            );
            serving.abort();
        }
    }
}

/// `n` small invocations (started, pattern, finished) in 100 instances.
async fn seed_invocations(st: &Arc<dyn EventStore>, n: usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let st = st.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let key = StreamKey {
                    build_id: format!("seed-build-{i:08}"),
                    invocation_id: format!("seed-inv-{i:08}"),
                    component: 3,
                    instance: format!("team-{}", i % 100),
                };
                st.publish_events(&small(&key, i)).await.expect("publish");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn small(k: &StreamKey, n: usize) -> Vec<Prepared> {
    use bep::build_event::Payload as P;
    use bep::build_event_id::{self as ids, Id};
    let mut md = std::collections::HashMap::new();
    md.insert(
        "BRANCH".to_string(),
        if n.is_multiple_of(3) {
            "main".into()
        } else {
            format!("feature-{}", n % 50)
        },
    );
    md.insert("COMMIT".to_string(), format!("{:040x}", n));
    let payloads = [
        bep_event(
            Id::Started(ids::BuildStartedId {}),
            P::Started(bep::BuildStarted {
                uuid: k.invocation_id.clone(),
                start_time_millis: 1_760_000_000_000 + n as i64 * 1000,
                command: if n.is_multiple_of(2) {
                    "build".into()
                } else {
                    "test".into()
                },
                build_tool_version: "7.4.1".into(),
                ..Default::default()
            }),
        ),
        bep_event(
            Id::Pattern(ids::PatternExpandedId {
                pattern: vec![format!("//pkg{}/...", n % 1000)],
            }),
            P::Expanded(Default::default()),
        ),
        bep_event(
            Id::BuildMetadata(ids::BuildMetadataId {}),
            P::BuildMetadata(bep::BuildMetadata { metadata: md }),
        ),
        bep_event(
            Id::BuildFinished(ids::BuildFinishedId {}),
            P::Finished(bep::BuildFinished {
                exit_code: Some(bep::build_finished::ExitCode {
                    name: "SUCCESS".into(),
                    code: 0,
                }),
                finish_time_millis: 1_760_000_000_000 + n as i64 * 1000 + 900,
                ..Default::default()
            }),
        ),
    ];
    payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let e = OrderedBuildEvent {
                stream_id: Some(StreamId {
                    build_id: k.build_id.clone(),
                    invocation_id: k.invocation_id.clone(),
                    component: k.component,
                }),
                sequence_number: i as i64 + 1,
                event: Some(BuildEvent {
                    event_time: Some(prost_types::Timestamp {
                        seconds: 1_760_000_000 + n as i64,
                        nanos: 0,
                    }),
                    event: Some(bazel(p.clone())),
                }),
            };
            let mut p = prepare(&e, &k.instance, 64 << 20).expect("prepare");
            p.decode();
            p
        })
        .collect()
}
