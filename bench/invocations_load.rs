//! Invocation benchmarks, in-process against a store (the store is what the
//! figures measure; the gRPC path is the same with or without decoding):
//!
//! ```text
//! cargo run --release --example invocations_load -- ingest  --store file:/tmp/b.redb
//! cargo run --release --example invocations_load -- queries --store postgres:URL --invocations 1000000 [--through-store 200000]
//! cargo run --release --example invocations_load -- retention --store file:/tmp/r.redb
//! ```
//!
//! - `ingest`: a real recorded Bazel 4.2.3 stream (tests/fixtures/bep), published
//!   as `--streams` concurrent invocations in batches of 50 events, with
//!   decoding on (each event decoded and applied to its invocation, as the
//!   server does) and off (events stored as raw bytes, as before invocations
//!   existed), alternating A/B `--reps` times; events/s of each run.
//! - `queries`: `--invocations` invocations (three events each, through the
//!   store, in `--instances` instances), one build of 10 000 targets, then
//!   ListInvocations newest 50 of one instance, GetInvocation with 1 000
//!   targets a page over all 10 000, and build-id event queries among every
//!   stream: p50/p99 of `--samples` calls each.
//! - `retention`: stores `--invocations` old streams, then deletes them all
//!   with retention batches while ingest goes on; ingest events/s with and
//!   without the deletion running.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use gridgate::bes::event::{prepare, Prepared, StreamKey};
use gridgate::bes::invocation::InvocationKey;
use gridgate::bes::store::{self, EventStore, InvocationQuery};
use gridgate::config::BuildEventsConfig;
use gridgate::proto::build_event_stream as bep;
use gridgate::proto::google::devtools::build::v1::{
    build_event, BuildEvent, OrderedBuildEvent, StreamId,
};
use prost::Message;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Ingest {
        #[arg(long)]
        store: String,
        #[arg(long, default_value_t = 32)]
        streams: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Only this side (`on` or `off`), e.g. to count its instructions
        /// under callgrind.
        #[arg(long)]
        only: Option<String>,
    },
    Queries {
        #[arg(long)]
        store: String,
        #[arg(long, default_value_t = 1_000_000)]
        invocations: usize,
        #[arg(long, default_value_t = 100)]
        instances: usize,
        #[arg(long, default_value_t = 200)]
        samples: usize,
        /// Use the invocations already stored (named as this command names them).
        #[arg(long)]
        no_populate: bool,
        /// PostgreSQL only: store this many through the store and copy them
        /// in SQL (same tables and indexes) up to `--invocations`.
        #[arg(long)]
        through_store: Option<usize>,
    },
    Retention {
        #[arg(long)]
        store: String,
        #[arg(long, default_value_t = 100_000)]
        invocations: usize,
        /// PostgreSQL only: as for `queries`.
        #[arg(long)]
        through_store: Option<usize>,
        /// Store nothing first: every stream already stored is old (e.g.
        /// the million a `queries` run left).
        #[arg(long)]
        no_populate: bool,
    },
}

/// PostgreSQL: copies the invocations (and their streams) of `tag` stored so
/// far until there are about `total`; the copies have no events. Returns how
/// many invocations there are then.
async fn copy_in_sql(store: &str, tag: &str, stored: usize, total: usize) -> usize {
    let Some(url) = store.strip_prefix("postgres:") else {
        return stored;
    };
    let copies = total.div_ceil(stored).saturating_sub(1);
    if copies == 0 {
        return stored;
    }
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let t = Instant::now();
    let n = i64::try_from(copies).expect("copies");
    let streams = client
        .execute(
            &format!(
                "INSERT INTO bes_streams (build_id, invocation_id, component, instance,
                     last_seq, finished, indexed, updated_ms)
                 SELECT build_id || '-c' || g, invocation_id || '-c' || g, component, instance,
                     last_seq, finished, indexed, updated_ms
                 FROM bes_streams, generate_series(1, $1::BIGINT) g
                 WHERE build_id LIKE '{tag}-build-%'"
            ),
            &[&n],
        )
        .await
        .expect("copy streams");
    let invocations = client
        .execute(
            &format!(
                "INSERT INTO bes_invocations (instance, invocation_id, build_id, started_ms, state,
                     user_name, command, patterns, metadata, last_event_ms, updated_ms, body)
                 SELECT instance, invocation_id || '-c' || g, build_id || '-c' || g, started_ms + g,
                     state, user_name, command, patterns, metadata, last_event_ms, updated_ms, body
                 FROM bes_invocations, generate_series(1, $1::BIGINT) g
                 WHERE invocation_id LIKE '{tag}-inv-%'"
            ),
            &[&n],
        )
        .await
        .expect("copy invocations");
    client
        .batch_execute("ANALYZE bes_streams; ANALYZE bes_invocations")
        .await
        .expect("analyze");
    eprintln!(
        "copied in SQL: {streams} streams, {invocations} invocations in {:?}",
        t.elapsed()
    );
    stored + invocations as usize
}

fn config(store: &str) -> BuildEventsConfig {
    if let Some(p) = store.strip_prefix("file:") {
        BuildEventsConfig::File { path: p.into() }
    } else if let Some(u) = store.strip_prefix("postgres:") {
        BuildEventsConfig::Postgres { url: u.into() }
    } else {
        BuildEventsConfig::Memory {
            max_bytes: 16 << 30,
        }
    }
}

fn recorded() -> Vec<Bytes> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bep/bazel-4.2.3/test.bin"
    );
    let mut data = Bytes::from(std::fs::read(path).expect("fixture"));
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = prost::decode_length_delimiter(&mut data).expect("delimited");
        out.push(data.split_to(len));
    }
    out
}

fn event(key: &StreamKey, seq: i64, payload: &[u8], decode: bool) -> Prepared {
    let e = OrderedBuildEvent {
        stream_id: Some(StreamId {
            build_id: key.build_id.clone(),
            invocation_id: key.invocation_id.clone(),
            component: key.component,
        }),
        sequence_number: seq,
        event: Some(BuildEvent {
            event_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + seq,
                nanos: 0,
            }),
            event: Some(build_event::Event::BazelEvent(prost_types::Any {
                type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
                value: payload.to_vec(),
            })),
        }),
    };
    let mut p = prepare(&e, &key.instance, 64 << 20).expect("prepare");
    if decode {
        p.decode();
    }
    p
}

fn key(instance: &str, n: usize, tag: &str) -> StreamKey {
    StreamKey {
        build_id: format!("{tag}-build-{n:08}"),
        invocation_id: format!("{tag}-inv-{n:08}"),
        component: 3,
        instance: instance.into(),
    }
}

/// Publishes `streams` copies of the recorded stream concurrently; events/s.
async fn ingest_once(store: &Arc<dyn EventStore>, streams: usize, decode: bool, tag: &str) -> f64 {
    let payloads = recorded();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..streams {
        let store = store.clone();
        let payloads = payloads.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let k = key("team-a", s, &tag);
            // Prepared (and decoded) inside the timed part: that is the cost.
            let mut seq = 1;
            for chunk in payloads.chunks(50) {
                let batch: Vec<Prepared> = chunk
                    .iter()
                    .map(|p| {
                        let e = event(&k, seq, p, decode);
                        seq += 1;
                        e
                    })
                    .collect();
                store.publish_events(&batch).await.expect("publish");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    (streams * payloads.len()) as f64 / started.elapsed().as_secs_f64()
}

fn pct(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, v: Vec<Duration>) {
    println!(
        "{name}: p50 {:.2} ms, p99 {:.2} ms ({} calls)",
        pct(v.clone(), 0.5).as_secs_f64() * 1e3,
        pct(v.clone(), 0.99).as_secs_f64() * 1e3,
        v.len()
    );
}

/// A small stream of one invocation: BuildStarted, a pattern, BuildFinished.
fn small_stream(k: &StreamKey, n: usize) -> Vec<Prepared> {
    let started = bep::BuildEvent {
        id: Some(bep::BuildEventId {
            id: Some(bep::build_event_id::Id::Started(Default::default())),
        }),
        payload: Some(bep::build_event::Payload::Started(bep::BuildStarted {
            uuid: k.invocation_id.clone(),
            start_time_millis: 1_700_000_000_000 + n as i64 * 1000,
            command: if n.is_multiple_of(2) {
                "build".into()
            } else {
                "test".into()
            },
            build_tool_version: "4.2.3".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let pattern = bep::BuildEvent {
        id: Some(bep::BuildEventId {
            id: Some(bep::build_event_id::Id::Pattern(
                bep::build_event_id::PatternExpandedId {
                    pattern: vec![format!("//pkg{}/...", n % 1000)],
                },
            )),
        }),
        payload: Some(bep::build_event::Payload::Expanded(Default::default())),
        ..Default::default()
    };
    let finished = bep::BuildEvent {
        id: Some(bep::BuildEventId {
            id: Some(bep::build_event_id::Id::BuildFinished(Default::default())),
        }),
        payload: Some(bep::build_event::Payload::Finished(bep::BuildFinished {
            exit_code: Some(bep::build_finished::ExitCode {
                name: "SUCCESS".into(),
                code: 0,
            }),
            finish_time_millis: 1_700_000_000_000 + n as i64 * 1000 + 500,
            ..Default::default()
        })),
        ..Default::default()
    };
    [started, pattern, finished]
        .iter()
        .enumerate()
        .map(|(i, e)| event(k, i as i64 + 1, &e.encode_to_vec(), true))
        .collect()
}

/// One build of `targets` targets (configured and completed).
fn big_build(k: &StreamKey, targets: usize) -> Vec<Prepared> {
    let mut out = Vec::new();
    let mut seq = 1;
    for t in 0..targets {
        let label = format!("//big/pkg{}:target{t}", t % 100);
        for completed in [false, true] {
            let e = bep::BuildEvent {
                id: Some(bep::BuildEventId {
                    id: Some(if completed {
                        bep::build_event_id::Id::TargetCompleted(
                            bep::build_event_id::TargetCompletedId {
                                label: label.clone(),
                                ..Default::default()
                            },
                        )
                    } else {
                        bep::build_event_id::Id::TargetConfigured(
                            bep::build_event_id::TargetConfiguredId {
                                label: label.clone(),
                                ..Default::default()
                            },
                        )
                    }),
                }),
                payload: Some(if completed {
                    bep::build_event::Payload::Completed(bep::TargetComplete {
                        success: true,
                        ..Default::default()
                    })
                } else {
                    bep::build_event::Payload::Configured(bep::TargetConfigured {
                        target_kind: "genrule rule".into(),
                        ..Default::default()
                    })
                }),
                ..Default::default()
            };
            out.push(event(k, seq, &e.encode_to_vec(), true));
            seq += 1;
        }
    }
    out
}

async fn populate(store: &Arc<dyn EventStore>, n: usize, instances: usize, tag: &str) {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let store = store.clone();
        let next = next.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let k = key(&format!("team-{}", i % instances), i, &tag);
                store
                    .publish_events(&small_stream(&k, i))
                    .await
                    .expect("publish");
                if i.is_multiple_of(100_000) && i > 0 {
                    eprintln!("  {i} invocations stored, {:?}", started.elapsed());
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    eprintln!("stored {n} invocations in {:?}", started.elapsed());
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Cmd::Ingest {
            store: s,
            streams,
            reps,
            only,
        } => {
            let store = store::open(&config(&s)).await.expect("store");
            if let Some(side) = only {
                let decode = side == "on";
                for r in 0..reps {
                    let a = ingest_once(&store, streams, decode, &format!("{side}{r}")).await;
                    println!("rep {r}: decoding {side} {a:.0} events/s");
                }
                return;
            }
            let mut on = Vec::new();
            let mut off = Vec::new();
            for r in 0..reps {
                let a = ingest_once(&store, streams, false, &format!("off{r}")).await;
                let b = ingest_once(&store, streams, true, &format!("on{r}")).await;
                println!("rep {r}: decoding off {a:.0} events/s, on {b:.0} events/s");
                off.push(a);
                on.push(b);
            }
            off.sort_by(f64::total_cmp);
            on.sort_by(f64::total_cmp);
            let (a, b) = (off[off.len() / 2], on[on.len() / 2]);
            println!(
                "{} median: off {a:.0} events/s, on {b:.0} events/s, cost {:.1} %",
                store.backend(),
                (1.0 - b / a) * 100.0
            );
        }
        Cmd::Queries {
            store: s,
            invocations,
            instances,
            samples,
            no_populate,
            through_store,
        } => {
            let store = store::open(&config(&s)).await.expect("store");
            let direct = through_store.unwrap_or(invocations).min(invocations);
            let mut total = invocations;
            if !no_populate {
                populate(&store, direct, instances, "q").await;
                total = copy_in_sql(&s, "q", direct, invocations).await;
            }
            let invocations = direct;
            let big = key("team-0", usize::MAX >> 1, "big");
            let t = Instant::now();
            for chunk in big_build(&big, 10_000).chunks(500) {
                store.publish_events(chunk).await.expect("publish");
            }
            eprintln!("stored a build of 10 000 targets in {:?}", t.elapsed());
            let mut list = Vec::new();
            for i in 0..samples {
                let q = InvocationQuery {
                    instance: Some(format!("team-{}", i % instances)),
                    ..Default::default()
                };
                let t = Instant::now();
                let got = store.list_invocations(&q, 50).await.expect("list");
                list.push(t.elapsed());
                assert_eq!(got.len(), 50.min(invocations / instances));
            }
            report("ListInvocations newest 50 of one instance", list);
            let ik = InvocationKey::of(&big).expect("key");
            let mut get = Vec::new();
            let mut page = Vec::new();
            for _ in 0..samples.min(50) {
                let t = Instant::now();
                store
                    .get_invocation(&ik)
                    .await
                    .expect("get")
                    .expect("stored");
                let mut after: Option<String> = None;
                let mut n = 0;
                loop {
                    let p0 = Instant::now();
                    let targets = store
                        .get_targets(&ik, after.as_deref(), 1000)
                        .await
                        .expect("targets");
                    page.push(p0.elapsed());
                    n += targets.len();
                    match targets.last() {
                        Some(l) if targets.len() == 1000 => after = Some(l.label.clone()),
                        _ => break,
                    }
                }
                get.push(t.elapsed());
                assert_eq!(n, 10_000);
            }
            report("GetInvocation of a 10 000-target build, all 10 pages", get);
            report("GetInvocation one page of 1 000 targets", page);
            let mut whole = Vec::new();
            for _ in 0..samples.min(50) {
                let t = Instant::now();
                store
                    .get_invocation(&ik)
                    .await
                    .expect("get")
                    .expect("stored");
                let targets = store.get_targets(&ik, None, 10_000).await.expect("targets");
                whole.push(t.elapsed());
                assert_eq!(targets.len(), 10_000);
            }
            report(
                "GetInvocation of a 10 000-target build, one page of 10 000",
                whole,
            );
            let mut byid = Vec::new();
            for i in 0..samples {
                let n = (i * 7919) % invocations;
                let re = regex::Regex::new(&format!("^q-build-{n:08}\\.")).expect("re");
                let t = Instant::now();
                let found = store.get_matching_streams(&re, None).await.expect("match");
                byid.push(t.elapsed());
                assert_eq!(found.len(), 1);
            }
            report(
                &format!(
                    "build-id event query among {} streams",
                    total.max(invocations) + 1
                ),
                byid,
            );
        }
        Cmd::Retention {
            store: s,
            invocations,
            through_store,
            no_populate,
        } => {
            let store = store::open(&config(&s)).await.expect("store");
            if !no_populate {
                let direct = through_store.unwrap_or(invocations).min(invocations);
                populate(&store, direct, 10, "old").await;
                copy_in_sql(&s, "old", direct, invocations).await;
            }
            // Ingest alone, for as long as the deletion is likely to take a
            // tenth of, before and after it: the store grows with every run,
            // so the runs during the deletion are compared with both.
            let alone = |tag: &'static str| {
                let store = store.clone();
                async move {
                    let t = Instant::now();
                    let mut runs = Vec::new();
                    while runs.len() < 5 || t.elapsed() < Duration::from_secs(10) {
                        runs.push(
                            ingest_once(&store, 16, true, &format!("{tag}{}", runs.len())).await,
                        );
                    }
                    runs.iter().sum::<f64>() / runs.len() as f64
                }
            };
            let before = alone("before").await;
            println!("ingest without retention, before: {before:.0} events/s");
            // Everything stored so far is old; what ingest stores now is not.
            let cutoff = store::now_millis() + 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
            let sweeper = {
                let store = store.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let mut deleted = 0;
                    loop {
                        let s = store.sweep(Some(cutoff), None, 100).await.expect("sweep");
                        deleted += s.deleted_streams;
                        if s.deleted_streams == 0 {
                            return (deleted, t.elapsed());
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            };
            let mut during = Vec::new();
            let mut r = 0;
            while !sweeper.is_finished() {
                during.push(ingest_once(&store, 16, true, &format!("during{r}")).await);
                r += 1;
            }
            let (deleted, took) = sweeper.await.expect("sweeper");
            println!("retention deleted {deleted} streams in {took:?}");
            let after = alone("after").await;
            println!("ingest without retention, after: {after:.0} events/s");
            let base = (before + after) / 2.0;
            let avg = during.iter().sum::<f64>() / during.len().max(1) as f64;
            println!(
                "ingest while deleting: {avg:.0} events/s over {} runs ({:+.1} % against before and after)",
                during.len(),
                (avg / base - 1.0) * 100.0
            );
        }
    }
}
