//! Build Event Service load client: the same client drives gridgate and
//! BuildGrid (any server of `google.devtools.build.v1.PublishBuildEvent` and
//! `build.buildgrid.QueryBuildEvents`).
//!
//! ```text
//! cargo run --release --example bes_load -- ingest --server grpc://127.0.0.1:50051 --streams 64 --events 2000
//! cargo run --release --example bes_load -- query  --server grpc://127.0.0.1:50051 --streams 10000 --queries 200
//! ```
//!
//! `ingest`: K concurrent PublishBuildToolEventStream calls (one connection
//! each, like separate Bazel clients), each sending N events with sequence
//! numbers 1..N (`bazel_event` Any of `--payload` bytes; the last is
//! `component_stream_finished`) without waiting for acks, as Bazel does; every
//! ack is checked (in order, right numbers). Reports events/s from the first
//! send to the last ack, as ../shared/bench/buildgrid/bes_load.py does.
//!
//! `query`: stores `--streams` small streams (3 events each), then times
//! `--queries` QueryEventStreams calls each selecting one stream by build id
//! (so every call searches all stored stream keys), and one query returning
//! every stored stream (gridgate's streaming query with `--streaming`,
//! BuildGrid's unary one otherwise).
//!
//! Requests are built before the clock starts: the server is measured, not
//! protobuf building.

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use gridgate::proto::build::buildgrid::{
    query_build_events_client::QueryBuildEventsClient, QueryEventStreamsRequest,
};
use gridgate::proto::google::devtools::build::v1::{
    build_event, publish_build_event_client::PublishBuildEventClient, stream_id::BuildComponent,
    BuildEvent, OrderedBuildEvent, PublishBuildToolEventStreamRequest, StreamId,
};
use gridgate::proto::gridgate::v1 as gg;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(about = "Build Event Service load client (ingestion and query)")]
struct Cli {
    /// grpc://HOST:PORT of the server.
    #[arg(long, default_value = "grpc://127.0.0.1:50051", global = true)]
    server: String,
    /// project_id sent with every event.
    #[arg(long, default_value = "bench-project", global = true)]
    project: String,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Concurrent tool event streams.
    Ingest {
        /// Concurrent streams (one connection each).
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Events per stream (the last is component_stream_finished).
        #[arg(long, default_value_t = 20000)]
        events: i64,
        /// Bytes of each bazel_event payload.
        #[arg(long, default_value_t = 500)]
        payload: usize,
    },
    /// Queries over many stored streams.
    Query {
        /// Streams to store first.
        #[arg(long, default_value_t = 10000)]
        streams: usize,
        /// Selective queries to time.
        #[arg(long, default_value_t = 200)]
        queries: usize,
        /// Use gridgate.v1.BuildEvents (streamed) for the query of everything.
        #[arg(long)]
        streaming: bool,
        /// Skip storing (the streams are there from an earlier run).
        #[arg(long)]
        no_setup: bool,
    },
}

async fn channel(server: &str) -> Result<Channel, String> {
    let url = server.replacen("grpc://", "http://", 1);
    Endpoint::from_shared(url)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .connect()
        .await
        .map_err(|e| format!("connect {server}: {e}"))
}

fn requests(
    build: &str,
    inv: &str,
    n: i64,
    payload: usize,
    project: &str,
) -> Vec<PublishBuildToolEventStreamRequest> {
    let stream = StreamId {
        build_id: build.into(),
        invocation_id: inv.into(),
        component: BuildComponent::Tool as i32,
    };
    let body: Vec<u8> = (0..payload)
        .map(|i| b"0123456789abcdef"[(i * 7 + 3) % 16])
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (1..=n)
        .map(|seq| {
            let event = if seq == n {
                build_event::Event::ComponentStreamFinished(
                    build_event::BuildComponentStreamFinished { r#type: 1 },
                )
            } else {
                build_event::Event::BazelEvent(prost_types::Any {
                    type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
                    value: body.clone(),
                })
            };
            PublishBuildToolEventStreamRequest {
                ordered_build_event: Some(OrderedBuildEvent {
                    stream_id: Some(stream.clone()),
                    sequence_number: seq,
                    event: Some(BuildEvent {
                        event_time: Some(prost_types::Timestamp {
                            seconds: now.as_secs() as i64,
                            nanos: now.subsec_nanos() as i32,
                        }),
                        event: Some(event),
                    }),
                }),
                project_id: project.into(),
                ..Default::default()
            }
        })
        .collect()
}

/// Publishes one stream; returns the number of acks (all checked).
async fn publish(
    ch: Channel,
    reqs: Vec<PublishBuildToolEventStreamRequest>,
) -> Result<usize, String> {
    let n = reqs.len();
    let mut client = PublishBuildEventClient::new(ch);
    let mut acks = client
        .publish_build_tool_event_stream(tokio_stream::iter(reqs))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut next = 1;
    while let Some(ack) = acks.next().await {
        let ack = ack.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
        if ack.sequence_number != next {
            return Err(format!("ack {} where {next} was due", ack.sequence_number));
        }
        next += 1;
    }
    if next as usize != n + 1 {
        return Err(format!("{} acks for {n} events", next - 1));
    }
    Ok(n)
}

async fn ingest(cli: &Cli, streams: usize, events: i64, payload: usize) -> Result<(), String> {
    let build = format!("bes-load-{}", std::process::id());
    let mut work = Vec::new();
    for i in 0..streams {
        let reqs = requests(&build, &format!("inv-{i}"), events, payload, &cli.project);
        work.push((channel(&cli.server).await?, reqs));
    }
    let req_bytes = work
        .first()
        .and_then(|(_, r)| r.first())
        .map_or(0, |r| r.encoded_len());
    let t0 = Instant::now();
    let tasks: Vec<_> = work
        .into_iter()
        .map(|(ch, reqs)| tokio::spawn(publish(ch, reqs)))
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| e.to_string())??;
    }
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "BES publish streams={streams} n={events}/stream req~{req_bytes}B: {:.0} events/s ({total} acks, {wall:.2}s)",
        total as f64 / wall
    );
    Ok(())
}

async fn query(
    cli: &Cli,
    streams: usize,
    queries: usize,
    streaming: bool,
    no_setup: bool,
) -> Result<(), String> {
    let prefix = "bes-query";
    if !no_setup {
        let t0 = Instant::now();
        let mut pending = Vec::new();
        let chans: Vec<Channel> = {
            let mut v = Vec::new();
            for _ in 0..16 {
                v.push(channel(&cli.server).await?);
            }
            v
        };
        for i in 0..streams {
            let reqs = requests(&format!("{prefix}-{i:06}"), "inv", 3, 200, &cli.project);
            pending.push(tokio::spawn(publish(chans[i % chans.len()].clone(), reqs)));
            if pending.len() >= 64 {
                for t in pending.drain(..) {
                    t.await.map_err(|e| e.to_string())??;
                }
            }
        }
        for t in pending {
            t.await.map_err(|e| e.to_string())??;
        }
        println!(
            "BES query setup: stored {streams} streams x 3 events in {:.2}s",
            t0.elapsed().as_secs_f64()
        );
    }
    let ch = channel(&cli.server).await?;
    let mut q = QueryBuildEventsClient::new(ch.clone()).max_decoding_message_size(1 << 30);
    let mut lat = Vec::with_capacity(queries);
    let t0 = Instant::now();
    for i in 0..queries {
        let target = (i * 7919) % streams.max(1);
        let t = Instant::now();
        let resp = q
            .query_event_streams(QueryEventStreamsRequest {
                build_id_pattern: format!("^{prefix}-{target:06}\\."),
                instance_name: String::new(),
            })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        lat.push(t.elapsed());
        if resp.streams.len() != 1 || resp.streams[0].events.len() != 3 {
            return Err(format!("query {target}: {} streams", resp.streams.len()));
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    println!(
        "BES QueryEventStreams one-of-{streams}: {:.0} queries/s p50 {:.2} ms p99 {:.2} ms ({queries} queries)",
        queries as f64 / wall,
        pct(0.5),
        pct(0.99)
    );
    let t = Instant::now();
    let (found, events) = if streaming {
        let mut s = gg::build_events_client::BuildEventsClient::new(ch)
            .query_event_streams(gg::QueryEventStreamsRequest {
                build_id_pattern: format!("^{prefix}-"),
                ..Default::default()
            })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let (mut found, mut events) = (0, 0);
        while let Some(c) = s
            .message()
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        {
            found += usize::from(c.stream_complete);
            events += c.events.len();
        }
        (found, events)
    } else {
        let resp = q
            .query_event_streams(QueryEventStreamsRequest {
                build_id_pattern: format!("^{prefix}-"),
                instance_name: String::new(),
            })
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        let events = resp.streams.iter().map(|s| s.events.len()).sum();
        (resp.streams.len(), events)
    };
    println!(
        "BES QueryEventStreams all ({}): {found} streams, {events} events in {:.0} ms",
        if streaming {
            "gridgate.v1 streaming"
        } else {
            "unary"
        },
        t.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Ingest {
            streams,
            events,
            payload,
        } => ingest(&cli, streams, events, payload).await,
        Mode::Query {
            streams,
            queries,
            streaming,
            no_setup,
        } => query(&cli, streams, queries, streaming, no_setup).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
