//! The store conformance suite: the same checks run against the memory, file
//! and PostgreSQL backends.
//!
//! PostgreSQL: `GRIDGATE_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`); each test makes its own schema.
//! When the server cannot be reached the PostgreSQL tests fail if
//! `GRIDGATE_REQUIRE_POSTGRES=1` and are skipped (with a message) otherwise.

use std::sync::Arc;

use regex::Regex;

use super::*;
use crate::bes::event::{prepare, EventKind, Prepared, StreamKey};
use crate::proto::google::devtools::build::v1::{
    build_event, BuildEvent, OrderedBuildEvent, StreamId,
};

/// A stream of team-a.
fn key(build: &str, inv: &str, component: i32) -> StreamKey {
    key_of("team-a", build, inv, component)
}

fn key_of(instance: &str, build: &str, inv: &str, component: i32) -> StreamKey {
    StreamKey {
        build_id: build.into(),
        invocation_id: inv.into(),
        component,
        instance: instance.into(),
    }
}

/// A tool event (`bazel_event`, or `component_stream_finished` when `last`),
/// with event time `seq` seconds after the epoch.
fn ev(k: &StreamKey, seq: i64, last: bool) -> Prepared {
    let event = if last {
        build_event::Event::ComponentStreamFinished(build_event::BuildComponentStreamFinished {
            r#type: 1,
        })
    } else {
        build_event::Event::BazelEvent(prost_types::Any {
            type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
            value: format!("payload {seq}").into_bytes(),
        })
    };
    prepare(
        &OrderedBuildEvent {
            stream_id: Some(StreamId {
                build_id: k.build_id.clone(),
                invocation_id: k.invocation_id.clone(),
                component: k.component,
            }),
            sequence_number: seq,
            event: Some(BuildEvent {
                event_time: Some(prost_types::Timestamp {
                    seconds: seq,
                    nanos: 0,
                }),
                event: Some(event),
            }),
        },
        &k.instance,
        1 << 20,
    )
    .unwrap()
}

fn evs(k: &StreamKey, seqs: std::ops::RangeInclusive<i64>, last: i64) -> Vec<Prepared> {
    seqs.map(|s| ev(k, s, s == last)).collect()
}

fn stored(n: usize) -> Vec<Outcome> {
    vec![Outcome::Stored; n]
}

const DUP: Outcome = Outcome::Duplicate { identical: true };

async fn seqs(store: &dyn EventStore, k: &StreamKey) -> Vec<i64> {
    store
        .query_events(k, &EventFilter::default())
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect()
}

/// Every check, against one store. Keys are unique per check (prefixed with
/// `tag`), so the checks can share the store.
pub(crate) async fn conformance(store: Arc<dyn EventStore>, tag: &str) {
    let store = &*store;
    let name = store.backend();
    let b = |s: &str| format!("{tag}-{s}");

    // A stream is created by its event 1 and grows by consecutive numbers.
    let k = key(&b("life"), "inv", 3);
    let p = store.publish_events(&evs(&k, 1..=3, 0)).await.unwrap();
    assert_eq!(p.outcomes, stored(3), "{name}");
    assert_eq!(p.rejection, None);
    let p = store.publish_events(&evs(&k, 4..=6, 6)).await.unwrap();
    assert_eq!(p.outcomes, stored(3), "{name}");
    let info = store.get_stream(&k).await.unwrap().unwrap();
    assert_eq!(
        (info.key.instance.as_str(), info.last_seq, info.finished),
        ("team-a", 6, true),
        "{name}"
    );
    assert_eq!(seqs(store, &k).await, vec![1, 2, 3, 4, 5, 6], "{name}");
    let all = store
        .query_events(&k, &EventFilter::default())
        .await
        .unwrap();
    assert_eq!(all[0].body, ev(&k, 1, false).body, "{name}: bytes kept");
    assert_eq!(all[5].kind, EventKind::ComponentStreamFinished);
    assert_eq!(all[2].time_micros, Some(3_000_000));
    assert_eq!(
        store.get_stream(&key(&b("none"), "", 1)).await.unwrap(),
        None
    );

    // Filters.
    let kr = &k;
    let f = |filter: EventFilter| async move {
        store
            .query_events(kr, &filter)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        f(EventFilter {
            kinds: vec![EventKind::ComponentStreamFinished],
            ..Default::default()
        })
        .await,
        vec![6],
        "{name}"
    );
    assert_eq!(
        f(EventFilter {
            min_seq: Some(2),
            max_seq: Some(4),
            ..Default::default()
        })
        .await,
        vec![2, 3, 4],
        "{name}"
    );
    assert_eq!(
        f(EventFilter {
            since_micros: Some(5_000_000),
            ..Default::default()
        })
        .await,
        vec![5, 6],
        "{name}"
    );
    assert_eq!(
        f(EventFilter {
            until_micros: Some(2_000_000),
            kinds: vec![EventKind::BazelEvent],
            ..Default::default()
        })
        .await,
        vec![1],
        "{name}"
    );

    // Nothing follows a final event.
    let p = store.publish_events(&[ev(&k, 7, false)]).await.unwrap();
    assert_eq!(
        p.rejection,
        Some(Rejection::Finished { last: 6, got: 7 }),
        "{name}"
    );

    // Retransmissions are acknowledged, never stored twice; a different
    // event at a stored number is reported as not identical.
    let k = key(&b("dup"), "inv", 3);
    store.publish_events(&evs(&k, 1..=3, 0)).await.unwrap();
    let p = store.publish_events(&evs(&k, 1..=3, 0)).await.unwrap();
    assert_eq!(p.outcomes, vec![DUP; 3], "{name}");
    let p = store.publish_events(&[ev(&k, 1, true)]).await.unwrap();
    assert_eq!(
        p.outcomes,
        vec![Outcome::Duplicate { identical: false }],
        "{name}"
    );
    // A continuation stream starting at an already stored number.
    let p = store.publish_events(&evs(&k, 2..=5, 0)).await.unwrap();
    assert_eq!(
        p.outcomes,
        vec![DUP, DUP, Outcome::Stored, Outcome::Stored],
        "{name}"
    );
    assert_eq!(seqs(store, &k).await, vec![1, 2, 3, 4, 5], "{name}");

    // Gaps: a new stream must start at 1; a batch stops at its first gap and
    // keeps what came before it.
    let k = key(&b("gap"), "inv", 3);
    let p = store.publish_events(&evs(&k, 2..=3, 0)).await.unwrap();
    assert_eq!(p.outcomes, vec![], "{name}");
    assert_eq!(
        p.rejection,
        Some(Rejection::Gap {
            expected: 1,
            got: 2
        })
    );
    assert_eq!(store.get_stream(&k).await.unwrap(), None, "{name}");
    let batch = vec![
        ev(&k, 1, false),
        ev(&k, 2, false),
        ev(&k, 4, false),
        ev(&k, 5, false),
    ];
    let p = store.publish_events(&batch).await.unwrap();
    assert_eq!(p.outcomes, stored(2), "{name}");
    assert_eq!(
        p.rejection,
        Some(Rejection::Gap {
            expected: 3,
            got: 4
        }),
        "{name}"
    );
    assert_eq!(seqs(store, &k).await, vec![1, 2], "{name}");

    // Streams are keyed by instance: team-b's events for team-a's build id
    // go to team-b's own stream, which starts at 1 like any other; neither
    // stream sees the other's events or learns that it exists.
    let kb_gap = key_of("team-b", &b("gap"), "inv", 3);
    let p = store
        .publish_events(&[ev(&kb_gap, 3, false)])
        .await
        .unwrap();
    assert_eq!(
        p.rejection,
        Some(Rejection::Gap {
            expected: 1,
            got: 3
        }),
        "{name}: the same answer as for a build id never seen"
    );
    let p = store.publish_events(&[ev(&kb_gap, 1, true)]).await.unwrap();
    assert_eq!(p.outcomes, stored(1), "{name}");
    assert_eq!(seqs(store, &k).await, vec![1, 2], "{name}");
    assert_eq!(seqs(store, &kb_gap).await, vec![1], "{name}");
    let mine = store
        .query_events(&kb_gap, &EventFilter::default())
        .await
        .unwrap();
    assert_eq!(mine[0].kind, EventKind::ComponentStreamFinished, "{name}");
    // Squatting: team-b enqueues a build id first, then team-a publishes
    // its whole lifecycle for it; each sees only its own.
    let squat_b = key_of("team-b", &b("squat"), "", 1);
    let squat_a = key(&b("squat"), "", 1);
    let p = store
        .publish_events(&evs(&squat_b, 1..=1, 0))
        .await
        .unwrap();
    assert_eq!(p.outcomes, stored(1), "{name}");
    let p = store
        .publish_events(&evs(&squat_a, 1..=2, 2))
        .await
        .unwrap();
    assert_eq!((p.outcomes, p.rejection), (stored(2), None), "{name}");
    assert_eq!(seqs(store, &squat_a).await, vec![1, 2], "{name}");
    assert_eq!(seqs(store, &squat_b).await, vec![1], "{name}");
    assert!(store.get_stream(&squat_a).await.unwrap().unwrap().finished);
    assert!(!store.get_stream(&squat_b).await.unwrap().unwrap().finished);
    let re = &Regex::new(&format!("^{}", regex::escape(&b("squat")))).unwrap();
    let of = |i| async move {
        store
            .get_matching_streams(re, i)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.key)
            .collect::<Vec<_>>()
    };
    assert_eq!(of(Some("team-a")).await, vec![squat_a.clone()], "{name}");
    assert_eq!(of(Some("team-b")).await, vec![squat_b.clone()], "{name}");
    assert_eq!(
        of(None).await,
        vec![squat_a.clone(), squat_b.clone()],
        "{name}"
    );
    let both = store
        .query_events_many(&[squat_b.clone(), squat_a.clone()], &EventFilter::default())
        .await
        .unwrap();
    assert_eq!(
        both.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1, 2],
        "{name}"
    );

    // Matching streams: the pattern searches `build.component.invocation`.
    let kb = key(&b("match"), "", 1);
    let ki = key_of("team-b", &b("match"), "inv-1", 1);
    let kt = key(&b("match"), "inv-1", 3);
    store.publish_events(&evs(&kb, 1..=1, 0)).await.unwrap();
    store.publish_events(&evs(&ki, 1..=1, 0)).await.unwrap();
    store.publish_events(&evs(&kt, 1..=2, 2)).await.unwrap();
    let re = |p: &str| Regex::new(p).unwrap();
    let found = |p: &'static str, i: Option<&'static str>| {
        let re = re(p);
        async move {
            store
                .get_matching_streams(&re, i)
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.key)
                .collect::<Vec<_>>()
        }
    };
    let tag_re = format!("^{}", regex::escape(&b("match")));
    let tag_re: &'static str = Box::leak(tag_re.into_boxed_str());
    assert_eq!(
        found(tag_re, None).await,
        vec![kb.clone(), ki.clone(), kt.clone()],
        "{name}"
    );
    assert_eq!(
        found(tag_re, Some("team-a")).await,
        vec![kb.clone(), kt.clone()],
        "{name}"
    );
    let tool: &'static str = Box::leak(format!("{tag_re}\\.3\\.inv-1$").into_boxed_str());
    assert_eq!(found(tool, None).await, vec![kt.clone()], "{name}");
    assert!(found(tag_re, Some("team-c")).await.is_empty(), "{name}");

    // Several streams at once: the same as one by one, in the order asked.
    let keys = vec![kt.clone(), key(&b("none"), "x", 3), kb.clone(), ki.clone()];
    for filter in [
        EventFilter::default(),
        EventFilter {
            min_seq: Some(2),
            ..Default::default()
        },
    ] {
        let many = store.query_events_many(&keys, &filter).await.unwrap();
        let mut one = Vec::new();
        for k in &keys {
            one.push(store.query_events(k, &filter).await.unwrap());
        }
        assert_eq!(many, one, "{name}");
    }

    // Concurrent streams all land, each event once.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let k = key(&b(&format!("conc{i}")), "inv", 3);
        let batches: Vec<Vec<Prepared>> = (0..5)
            .map(|j| evs(&k, j * 10 + 1..=j * 10 + 10, 50))
            .collect();
        tasks.push(async move {
            for batch in &batches {
                let p = store.publish_events(batch).await.unwrap();
                assert_eq!(p.outcomes, stored(10));
            }
            k
        });
    }
    for k in futures_util::future::join_all(tasks).await {
        assert_eq!(
            seqs(store, &k).await,
            (1..=50).collect::<Vec<_>>(),
            "{name}"
        );
    }
}

/// Two publishers racing on one stream (two replicas receiving the same
/// retransmitted events): every event stored once, in order.
pub(crate) async fn racing_publishers(a: Arc<dyn EventStore>, b: Arc<dyn EventStore>, tag: &str) {
    let k = key(&format!("{tag}-race"), "inv", 3);
    let events = evs(&k, 1..=60, 60);
    let run = |store: Arc<dyn EventStore>, events: Vec<Prepared>| async move {
        let mut next = 0;
        while next < events.len() {
            let end = (next + 7).min(events.len());
            let p = store.publish_events(&events[next..end]).await.unwrap();
            assert_eq!(p.rejection, None);
            next = end;
        }
    };
    tokio::join!(run(a.clone(), events.clone()), run(b.clone(), events));
    assert_eq!(seqs(&*a, &k).await, (1..=60).collect::<Vec<_>>());
    assert_eq!(seqs(&*b, &k).await, (1..=60).collect::<Vec<_>>());
}

#[tokio::test]
async fn memory_store_conformance() {
    conformance(Arc::new(memory::MemoryStore::new(64 << 20)), "mem").await;
    let one = Arc::new(memory::MemoryStore::new(64 << 20));
    racing_publishers(one.clone(), one, "mem").await;
}

#[tokio::test]
async fn memory_store_evicts_oldest_finished_streams_first() {
    let store = memory::MemoryStore::new(8 * 1024);
    let done = |i: i64| key(&format!("done{i}"), "inv", 3);
    // Three finished streams, then one still running.
    for i in 0..3 {
        store
            .publish_events(&evs(&done(i), 1..=3, 3))
            .await
            .unwrap();
    }
    let running = key("running", "inv", 3);
    store
        .publish_events(&evs(&running, 1..=2, 0))
        .await
        .unwrap();
    assert_eq!(store.stats().evicted_streams, 0);
    // Fill until something must go.
    let big = key("big", "inv", 3);
    let mut seq = 1;
    while store.stats().evicted_streams < 2 {
        let p = store.publish_events(&[ev(&big, seq, false)]).await.unwrap();
        assert_eq!(p.outcomes, stored(1));
        seq += 1;
    }
    // The oldest finished went first, then the next; the running stream stays.
    assert!(store.get_stream(&done(0)).await.unwrap().is_none());
    assert!(store.get_stream(&done(1)).await.unwrap().is_none());
    assert!(store.get_stream(&done(2)).await.unwrap().is_some());
    assert!(store.get_stream(&running).await.unwrap().is_some());
    let stats = store.stats();
    assert!(stats.bytes <= 8 * 1024, "{stats:?}");
    // One event larger than the whole budget is refused.
    let huge = key("huge", "inv", 3);
    let mut e = ev(&huge, 1, false);
    e.body = vec![0u8; 9000].into();
    let p = store.publish_events(&[e]).await.unwrap();
    assert_eq!(p.rejection, Some(Rejection::Full { budget: 8 * 1024 }));
    // Refused in the middle of a batch: what came before stays, consistently.
    let mut batch = evs(&huge, 1..=3, 0);
    batch[1].body = vec![0u8; 9000].into();
    let p = store.publish_events(&batch).await.unwrap();
    assert_eq!(p.outcomes, stored(1));
    assert_eq!(p.rejection, Some(Rejection::Full { budget: 8 * 1024 }));
    let info = store.get_stream(&huge).await.unwrap().unwrap();
    assert_eq!((info.key.instance.as_str(), info.last_seq), ("team-a", 1));
    let p = store.publish_events(&evs(&huge, 2..=3, 3)).await.unwrap();
    assert_eq!(p.outcomes, stored(2));
    assert!(store.get_stream(&huge).await.unwrap().unwrap().finished);
}

#[tokio::test]
async fn file_store_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.redb");
    let store = Arc::new(file::FileStore::open(&path).await.unwrap());
    conformance(store.clone(), "file").await;
    racing_publishers(store.clone(), store.clone(), "file").await;
    // Everything committed is there after reopening.
    let k = key("file-life", "inv", 3);
    drop(store);
    let store = file::FileStore::open(&path).await.unwrap();
    assert_eq!(seqs(&store, &k).await, vec![1, 2, 3, 4, 5, 6]);
    let p = store
        .publish_events(&evs(&key("after", "i", 3), 1..=2, 0))
        .await
        .unwrap();
    assert_eq!(p.outcomes, stored(2));
}

/// A fresh schema on the test PostgreSQL, or None (skip) when it cannot be
/// reached and `GRIDGATE_REQUIRE_POSTGRES` is not 1.
pub(crate) async fn postgres_schema(test: &str) -> Option<(String, impl Drop)> {
    let base = std::env::var("GRIDGATE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let required = std::env::var("GRIDGATE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
    let connected = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio_postgres::connect(&base, tokio_postgres::NoTls),
    )
    .await;
    let (client, conn) = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) if !required => {
            eprintln!("skipping {test}: PostgreSQL at {base} unreachable: {e}");
            return None;
        }
        Err(_) if !required => {
            eprintln!("skipping {test}: PostgreSQL at {base} did not answer");
            return None;
        }
        Ok(Err(e)) => panic!("PostgreSQL at {base} is required (GRIDGATE_REQUIRE_POSTGRES=1): {e}"),
        Err(_) => panic!(
            "PostgreSQL at {base} is required (GRIDGATE_REQUIRE_POSTGRES=1) and did not answer"
        ),
    };
    tokio::spawn(conn);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let schema = format!("t_{test}_{}_{nanos}", std::process::id());
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    struct DropSchema(String, String);
    impl Drop for DropSchema {
        fn drop(&mut self) {
            let (base, schema) = (self.0.clone(), self.1.clone());
            // Best effort, on its own thread so no runtime is needed.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(async {
                        if let Ok((c, conn)) =
                            tokio_postgres::connect(&base, tokio_postgres::NoTls).await
                        {
                            tokio::spawn(conn);
                            let _ = c
                                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                                .await;
                        }
                    });
                }
            })
            .join();
        }
    }
    Some((url, DropSchema(base, schema)))
}

#[tokio::test]
async fn postgres_store_conformance() {
    let Some((url, _schema)) = postgres_schema("conformance").await else {
        return;
    };
    let store = Arc::new(postgres::PostgresStore::connect(&url).await.unwrap());
    conformance(store.clone(), "pg").await;
    // Two replicas: two stores (pools) on one database, racing on one stream.
    let other = Arc::new(postgres::PostgresStore::connect(&url).await.unwrap());
    racing_publishers(store, other, "pg").await;
}

/// The invocation index, against one store: recorded Bazel streams
/// published in batches read back exactly as the model builds them in one
/// go; listing order, filters and paging; targets and console output paged;
/// retransmissions not counted twice; instances kept apart.
pub(crate) async fn invocations_conformance(store: Arc<dyn EventStore>, tag: &str) {
    use crate::bes::invocation::tests::{build, recorded, tool_stream_of};
    use crate::bes::invocation::InvocationKey;
    use crate::proto::gridgate::v1 as gg;

    let store = &*store;
    let name = store.backend();
    let runs = [
        ("bazel-2.1.0/build.bin", "team-a"),
        ("bazel-2.1.0/test.bin", "team-a"),
        ("bazel-4.2.3/build.bin", "team-a"),
        ("bazel-4.2.3/test.bin", "team-a"),
        ("bazel-4.2.3/test.bin", "team-b"),
    ];
    let mut expected = Vec::new();
    for (n, (file, instance)) in runs.iter().enumerate() {
        // team-b reuses team-a's last invocation id and build id.
        let n = if *instance == "team-b" { n - 1 } else { n };
        let k = key_of(
            instance,
            &format!("{tag}-inv-b{n}"),
            &format!("{tag}-inv-{n}"),
            3,
        );
        let events = tool_stream_of(&k, &recorded(file), 1_700_000_000 + n as i64 * 1000);
        for batch in events.chunks(10) {
            let p = store.publish_events(batch).await.unwrap();
            assert_eq!(p.outcomes, stored(batch.len()), "{name} {file}");
        }
        // A retransmission changes nothing.
        let p = store.publish_events(&events[..5]).await.unwrap();
        assert_eq!(p.outcomes, vec![DUP; 5], "{name}");
        let (inv, targets) = build(&events, events.len());
        let ikey = InvocationKey::of(&k).unwrap();
        assert_eq!(
            store.get_invocation(&ikey).await.unwrap().as_ref(),
            Some(&inv),
            "{name} {file}"
        );
        // Targets page by label.
        let mut paged = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store.get_targets(&ikey, after.as_deref(), 2).await.unwrap();
            assert!(page.len() <= 2);
            let Some(last) = page.last() else { break };
            after = Some(last.label.clone());
            paged.extend(page);
        }
        assert_eq!(
            paged,
            targets.into_values().collect::<Vec<_>>(),
            "{name} {file}"
        );
        // The console output, whole and from the middle of a chunk.
        let log_bytes = inv.counts.as_ref().unwrap().log_bytes as usize;
        let chunks = store.get_log(&ikey, 0, 1 << 30).await.unwrap();
        let whole: Vec<u8> = chunks.iter().flat_map(|(_, t)| t.to_vec()).collect();
        assert_eq!(whole.len(), log_bytes, "{name} {file}");
        assert_eq!(chunks.first().map(|c| c.0), (log_bytes > 0).then_some(0));
        if let Some((offset, text)) = chunks.get(1).filter(|(_, t)| t.len() > 1) {
            let from = store.get_log(&ikey, offset + 1, 1).await.unwrap();
            assert_eq!(from.first(), Some(&(*offset, text.clone())), "{name}");
        }
        expected.push(inv);
    }

    // Newest first (the Bazel 4 runs were recorded after the Bazel 2.1 runs).
    let list = |q: InvocationQuery, limit: usize| async move {
        store
            .list_invocations(&q, limit)
            .await
            .unwrap()
            .into_iter()
            .filter(|i| i.invocation_id.starts_with(tag))
            .collect::<Vec<_>>()
    };
    let mut newest: Vec<gg::Invocation> = expected.clone();
    newest.sort_by_key(|i| std::cmp::Reverse(Cursor::of(i)));
    let mine = |instance: &str| InvocationQuery {
        instance: Some(instance.into()),
        ..Default::default()
    };
    let team_a: Vec<_> = newest
        .iter()
        .filter(|i| i.instance_name == "team-a")
        .cloned()
        .collect();
    assert_eq!(list(mine("team-a"), 100).await, team_a, "{name}");
    assert_eq!(list(mine("team-b"), 100).await.len(), 1, "{name}");
    assert_eq!(
        list(InvocationQuery::default(), 1000).await,
        newest,
        "{name}"
    );
    // Paged by cursor, one at a time, the same list.
    let mut paged = Vec::new();
    let mut q = mine("team-a");
    loop {
        let page = store.list_invocations(&q, 1).await.unwrap();
        let Some(last) = page.last() else { break };
        q.after = Some(Cursor::of(last));
        paged.extend(
            page.into_iter()
                .filter(|i| i.invocation_id.starts_with(tag)),
        );
    }
    assert_eq!(paged, team_a, "{name}");
    // Filters.
    let by = |f: &dyn Fn(&mut InvocationQuery)| {
        let mut q = mine("team-a");
        f(&mut q);
        q
    };
    let tests = list(by(&|q| q.command = Some("test".into())), 100).await;
    assert_eq!(tests.len(), 2, "{name}");
    assert!(tests.iter().all(|i| i.command == "test"));
    let failed = list(by(&|q| q.state = Some(gg::InvocationState::Failed)), 100).await;
    assert_eq!(failed.len(), 4, "{name}");
    assert!(
        list(by(&|q| q.state = Some(gg::InvocationState::Running)), 100)
            .await
            .is_empty()
    );
    let user = expected[0].user.clone();
    assert_eq!(
        list(by(&|q| q.user = Some(user.clone())), 100).await.len(),
        4
    );
    assert!(list(by(&|q| q.user = Some("nobody".into())), 100)
        .await
        .is_empty());
    assert_eq!(
        list(by(&|q| q.pattern = Some(":sharded".into())), 100)
            .await
            .len(),
        2,
        "{name}"
    );
    let md = |k: &str, v: &str| (k.to_string(), v.to_string());
    assert_eq!(
        list(
            by(&|q| q.metadata = vec![md("REPO", "example/repo"), md("COMMIT", "abc123")]),
            100
        )
        .await
        .len(),
        4,
        "{name}"
    );
    assert!(list(by(&|q| q.metadata = vec![md("REPO", "other")]), 100)
        .await
        .is_empty());
    let b = expected[1].build_id.clone();
    assert_eq!(
        list(by(&|q| q.build_id = Some(b.clone())), 100).await,
        vec![expected[1].clone()]
    );
    let t = expected[2].start_time_millis;
    let since = list(by(&|q| q.started_after = Some(t)), 100).await;
    assert!(since.iter().all(|i| i.start_time_millis >= t) && !since.is_empty());
    let before = list(by(&|q| q.started_before = Some(t)), 100).await;
    assert!(before.iter().all(|i| i.start_time_millis < t));
    assert_eq!(since.len() + before.len(), team_a.len(), "{name}");
    // By id alone: every instance that holds it, in name order.
    let found = |id: String| async move { store.find_invocation(&id).await.unwrap() };
    assert_eq!(
        found(format!("{tag}-inv-3")).await,
        vec!["team-a".to_string(), "team-b".to_string()],
        "{name}"
    );
    assert_eq!(
        found(format!("{tag}-inv-0")).await,
        vec!["team-a".to_string()]
    );
    assert!(found(format!("{tag}-inv-none")).await.is_empty(), "{name}");
}

#[tokio::test]
async fn memory_store_invocations() {
    invocations_conformance(Arc::new(memory::MemoryStore::new(64 << 20)), "mem").await;
}

#[tokio::test]
async fn file_store_invocations() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        file::FileStore::open(&dir.path().join("e.redb"))
            .await
            .unwrap(),
    );
    invocations_conformance(store, "file").await;
}

#[tokio::test]
async fn postgres_store_invocations() {
    let Some((url, _schema)) = postgres_schema("invocations").await else {
        return;
    };
    let store = Arc::new(postgres::PostgresStore::connect(&url).await.unwrap());
    invocations_conformance(store, "pg").await;
}

/// Retention against one store: streams past their age go with their events
/// and invocations, in batches; a silent unfinished invocation is marked
/// abandoned and runs again when its stream speaks.
pub(crate) async fn retention_conformance(store: Arc<dyn EventStore>, tag: &str) {
    use crate::bes::invocation::tests::{recorded, tool_stream_of};
    use crate::bes::invocation::InvocationKey;
    use crate::proto::gridgate::v1 as gg;

    let store = &*store;
    let name = store.backend();
    let payloads = recorded("bazel-4.2.3/build.bin");
    let keys: Vec<StreamKey> = (0..5)
        .map(|i| key(&format!("{tag}-ret-{i}"), &format!("{tag}-ret-inv-{i}"), 3))
        .collect();
    for k in &keys {
        let events = tool_stream_of(k, &payloads, 1_700_000_000);
        store.publish_events(&events).await.unwrap();
    }
    // A half-published invocation: running.
    let open = key(
        &format!("{tag}-ret-open"),
        &format!("{tag}-ret-open-inv"),
        3,
    );
    let events = tool_stream_of(&open, &payloads, 1_700_000_000);
    let half = events.len() / 2;
    store.publish_events(&events[..half]).await.unwrap();
    let open_inv = InvocationKey::of(&open).unwrap();
    let state = |k: &InvocationKey| {
        let k = k.clone();
        async move { store.get_invocation(&k).await.unwrap().map(|i| i.state()) }
    };
    assert_eq!(state(&open_inv).await, Some(gg::InvocationState::Running));

    // Nothing is due yet.
    let past = now_millis() - 60_000;
    let s = store.sweep(Some(past), Some(past), 2).await.unwrap();
    assert_eq!(s, Swept::default(), "{name}");

    // Abandon: the running one only; finished ones stay as they are.
    let soon = now_millis() + 60_000;
    let s = store.sweep(None, Some(soon), 100).await.unwrap();
    assert!(s.abandoned >= 1, "{name}: {s:?}");
    assert_eq!(state(&open_inv).await, Some(gg::InvocationState::Abandoned));
    let done = InvocationKey::of(&keys[0]).unwrap();
    assert_eq!(state(&done).await, Some(gg::InvocationState::Failed));
    // Its stream speaks again: running again.
    store.publish_events(&events[half..half + 1]).await.unwrap();
    assert_eq!(state(&open_inv).await, Some(gg::InvocationState::Running));

    // Expire everything written so far, two streams per batch.
    let mut deleted = 0;
    loop {
        let s = store.sweep(Some(soon), None, 2).await.unwrap();
        assert!(s.deleted_streams <= 2, "{name}: {s:?}");
        if s.deleted_streams == 0 {
            break;
        }
        deleted += s.deleted_streams;
    }
    assert!(deleted >= 6, "{name}: {deleted}");
    for k in keys.iter().chain([&open]) {
        assert_eq!(store.get_stream(k).await.unwrap(), None, "{name}");
        assert!(seqs(store, k).await.is_empty(), "{name}");
        let ik = InvocationKey::of(k).unwrap();
        assert_eq!(store.get_invocation(&ik).await.unwrap(), None, "{name}");
        assert!(
            store.get_targets(&ik, None, 10).await.unwrap().is_empty(),
            "{name}"
        );
        assert!(
            store.get_log(&ik, 0, 1 << 20).await.unwrap().is_empty(),
            "{name}"
        );
    }
    let listed = store
        .list_invocations(&InvocationQuery::default(), 1000)
        .await
        .unwrap();
    assert!(
        !listed
            .iter()
            .any(|i| i.invocation_id.starts_with(&format!("{tag}-ret"))),
        "{name}"
    );
    // A stream of the same key starts afresh.
    let again = tool_stream_of(&keys[0], &payloads, 1_700_000_000);
    let p = store.publish_events(&again[..3]).await.unwrap();
    assert_eq!(p.outcomes, stored(3), "{name}");
}

#[tokio::test]
async fn memory_store_retention() {
    let store = Arc::new(memory::MemoryStore::new(64 << 20));
    retention_conformance(store.clone(), "mem").await;
    // Deleting frees the budget.
    store
        .sweep(Some(now_millis() + 60_000), None, 1000)
        .await
        .unwrap();
    assert_eq!(store.stats().bytes, 0);
}

#[tokio::test]
async fn file_store_retention() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        file::FileStore::open(&dir.path().join("r.redb"))
            .await
            .unwrap(),
    );
    retention_conformance(store, "file").await;
}

#[tokio::test]
async fn postgres_store_retention() {
    let Some((url, _schema)) = postgres_schema("retention").await else {
        return;
    };
    let store = Arc::new(postgres::PostgresStore::connect(&url).await.unwrap());
    retention_conformance(store, "pg").await;
}
