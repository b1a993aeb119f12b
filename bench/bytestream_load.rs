//! ByteStream throughput on one connection: writes a blob of SIZE bytes in
//! CHUNK-byte messages (`uploads/UUID/blobs/HASH/SIZE`), reads it back
//! (`blobs/HASH/SIZE`), checks the bytes read, and prints MB/s (10^6 bytes per
//! second) for both. Each repetition uses a different blob, so no server can
//! answer from an earlier upload.
//!
//! ```text
//! cargo run --release --example bytestream_load -- URL INSTANCE [options]
//!   --token FILE      send `authorization: Bearer <contents>`
//!   --size BYTES      blob size (default 104857600 = 100 MiB)
//!   --chunk BYTES     write message size (default 1048576)
//!   --reps N          repetitions (default 3)
//!   --label TEXT      prefix of every printed line
//! ```
//!
//! URL is `http://127.0.0.1:PORT` (plaintext, as the benchmarks use loopback).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use gridgate::proto::google::bytestream as bs;
use gridgate::reapi::digest::BlobKey;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

struct Args {
    url: String,
    instance: String,
    token: Option<String>,
    size: usize,
    chunk: usize,
    reps: usize,
    label: String,
}

fn args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let usage = "usage: bytestream_load URL INSTANCE [--token FILE] [--size BYTES] [--chunk BYTES] [--reps N] [--label TEXT]";
    let url = it.next().context(usage)?;
    let instance = it.next().context(usage)?;
    let mut a = Args {
        url,
        instance,
        token: None,
        size: 100 * 1024 * 1024,
        chunk: 1024 * 1024,
        reps: 3,
        label: "bytestream".into(),
    };
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--token" => {
                a.token = Some(
                    std::fs::read_to_string(&value)
                        .with_context(|| format!("reading {value}"))?
                        .trim()
                        .to_string(),
                )
            }
            "--size" => a.size = value.parse()?,
            "--chunk" => a.chunk = value.parse()?,
            "--reps" => a.reps = value.parse()?,
            "--label" => a.label = value,
            _ => bail!("unknown option {flag}\n{usage}"),
        }
    }
    Ok(a)
}

/// Fast pseudo-random bytes (xorshift), different for each `seed`.
fn blob(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(size);
    out
}

/// Busy and total jiffies of the whole machine (Linux `/proc/stat`), to tell
/// whether a phase had the CPUs to itself or was short of them.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Percent of all CPUs busy between two `cpu_jiffies` readings.
fn busy_pct(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> String {
    match (a, b) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            format!("{:.0}%", (b1 - b0) as f64 * 100.0 / (t1 - t0) as f64)
        }
        _ => "?".into(),
    }
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let channel = Endpoint::from_shared(a.url.clone())?
        .initial_stream_window_size(Some(8 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", a.url))?;
    let auth: Option<MetadataValue<_>> = match &a.token {
        Some(t) => Some(format!("Bearer {t}").parse()?),
        None => None,
    };
    let mut client = bs::byte_stream_client::ByteStreamClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            if let Some(v) = &auth {
                req.metadata_mut().insert("authorization", v.clone());
            }
            Ok(req)
        },
    )
    .max_decoding_message_size(64 * 1024 * 1024)
    .max_encoding_message_size(64 * 1024 * 1024);
    let prefix = if a.instance.is_empty() {
        String::new()
    } else {
        format!("{}/", a.instance)
    };

    let (mut writes, mut reads) = (Vec::new(), Vec::new());
    let run_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    for rep in 1..=a.reps {
        let data = Bytes::from(blob(a.size, run_seed ^ rep as u64));
        let key = BlobKey::of(&data);
        let resource = format!(
            "{prefix}uploads/00000000-0000-4000-8000-{:012x}/blobs/{}/{}",
            (run_seed ^ rep as u64) & 0xffff_ffff_ffff,
            key.hex(),
            key.size
        );
        let chunk = a.chunk;
        let total = data.len();
        let requests = (0..total.div_ceil(chunk)).map(move |i| {
            let start = i * chunk;
            let end = (start + chunk).min(total);
            bs::WriteRequest {
                resource_name: if i == 0 {
                    resource.clone()
                } else {
                    String::new()
                },
                write_offset: start as i64,
                finish_write: end == total,
                data: data.slice(start..end),
            }
        });
        let c0 = cpu_jiffies();
        let t = Instant::now();
        let resp = client
            .write(tokio_stream::iter(requests))
            .await
            .context("Write")?
            .into_inner();
        let write_time = t.elapsed();
        let write_busy = busy_pct(c0, cpu_jiffies());
        if resp.committed_size != a.size as i64 {
            bail!("committed_size {} != {}", resp.committed_size, a.size);
        }

        let c0 = cpu_jiffies();
        let t = Instant::now();
        let mut stream = client
            .read(bs::ReadRequest {
                resource_name: format!("{prefix}blobs/{}/{}", key.hex(), key.size),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .context("Read")?
            .into_inner();
        // Keep the messages (no copy) and verify after the clock stops.
        let mut parts = Vec::new();
        while let Some(msg) = stream.message().await.context("Read stream")? {
            parts.push(msg.data);
        }
        let read_time = t.elapsed();
        let read_busy = busy_pct(c0, cpu_jiffies());
        let mut hasher = gridgate::reapi::digest::Sha256::new();
        let mut got = 0usize;
        for p in &parts {
            got += p.len();
            hasher.update(p);
        }
        if got != a.size || hasher.finish(got as u64) != key {
            bail!("read back {got} bytes that do not match what was written");
        }
        let (w, r) = (mbps(a.size, write_time), mbps(a.size, read_time));
        println!(
            "{} rep={rep}: write {w:.0} MB/s ({:.3} s, CPUs {write_busy} busy), read {r:.0} MB/s ({:.3} s, CPUs {read_busy} busy), {} bytes, chunk {}",
            a.label,
            write_time.as_secs_f64(),
            read_time.as_secs_f64(),
            a.size,
            a.chunk
        );
        writes.push(w);
        reads.push(r);
    }
    println!(
        "{} median: write {:.0} MB/s, read {:.0} MB/s",
        a.label,
        median(writes),
        median(reads)
    );
    Ok(())
}
