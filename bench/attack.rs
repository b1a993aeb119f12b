//! Attacks on the pre-authentication path, measured: the gateway's memory and
//! what a well-behaved authenticated client sees while each attack runs.
//!
//! ```text
//! cargo run --release --example attack -- BINARY [ATTACK...]
//! ```
//!
//! Starts BINARY (a gridgate release build, e.g. an older one for a before /
//! after comparison) with a config of its own per attack, runs the attack
//! from this process, and meanwhile a well-behaved client that calls
//! FindMissingBlobs with a valid token (8 calls in flight, each given 5 s).
//! Prints one line per attack: the server's RSS before and at its peak
//! during the attack, and the client's success rate and p50/p99 latency.
//! The configs use only keys every version knows, so an old binary runs
//! them as they are.
//!
//! Attacks (all by default):
//! - `first-messages`: 256 unauthenticated streams on one connection, each
//!   announcing a 4 MiB message and sending 3 MiB of it (point: nothing is
//!   spent on a stranger); `first-messages-open` the same where an instance
//!   is open to anonymous callers;
//! - `watch-flood`: 10 connections x 1000 unauthenticated Health Watch
//!   streams; `header-only` the same with FindMissingBlobs requests that
//!   never send a body, on a server with an open instance;
//! - `silent-connections`: with `max-connections: 64` and a 2 s handshake
//!   timeout, 64 plaintext sockets that send one byte and then nothing; the
//!   client keeps connecting.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use gridgate::proto::build::bazel::remote::execution::v2 as re;
use http_body::Frame;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const SECRET: &str = "0123456789abcdef0123456789abcdef-attack-bench";
const FMB: &str = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
const ATTACK_SECONDS: u64 = 10;

fn token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({"sub": "ci", "aud": "gridgate", "iat": now, "exp": now + 3600});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn config(dir: &Path, open_instance: bool, limits: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("hmac.secret"), SECRET).unwrap();
    std::fs::write(
        dir.join("acl.yaml"),
        "team-a:\n  allow:\n    - subject: ci\n      requests: [FindMissingBlobs]\npublic:\n  allow:\n    - requests: [FindMissingBlobs]\n",
    )
    .unwrap();
    let open = if open_instance {
        "  allow-unauthenticated-instances: [public]\n"
    } else {
        ""
    };
    let yaml = format!(
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: true\nauthorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  audience: gridgate\n  acl-config: acl.yaml\n{open}instances:\n  - name: team-a\n    cas: {{ backend: memory }}\n  - name: public\n    cas: {{ backend: memory }}\nlimits:\n  shutdown-grace-seconds: 1\n{limits}"
    );
    let path = dir.join("gridgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

struct Server {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Server {
    fn start(binary: &str, config: &Path) -> Server {
        use std::io::BufRead;
        let mut child = Command::new(binary)
            .args(["serve", "--config", config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "warn,gridgate=info")
            .spawn()
            .expect("start the gateway");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(i) = line.find("listening on ") {
                    let addr = line[i + 13..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the gateway says where it listens")
            .parse()
            .unwrap();
        Server { child, addr }
    }

    fn rss_mib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            / 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn channel(addr: std::net::SocketAddr) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

fn fmb(instance: &str) -> Bytes {
    let msg = re::FindMissingBlobsRequest {
        instance_name: instance.into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut out = vec![0];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend(msg);
    Bytes::from(out)
}

/// One raw request; its grpc-status, or None when it failed in transport.
async fn send(
    ch: &Channel,
    path: &str,
    auth: Option<&str>,
    body: tonic::body::Body,
) -> Option<Code> {
    use tower::{Service, ServiceExt};
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://gate{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = auth {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let mut ch = ch.clone();
    let resp = ch
        .ready()
        .await
        .ok()?
        .call(req.body(body).unwrap())
        .await
        .ok()?;
    let code = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(Code::from_i32)
    };
    if let Some(c) = code(resp.headers()) {
        return Some(c);
    }
    use http_body_util::BodyExt;
    let collected = resp.into_body().collect().await.ok()?;
    collected.trailers().and_then(code)
}

/// What the well-behaved client saw.
#[derive(Default)]
struct Seen {
    ok: usize,
    failed: usize,
    latencies: Vec<Duration>,
}

/// Calls FindMissingBlobs on team-a with a valid token, 8 at a time, until
/// `stop`, opening a new connection whenever one fails.
async fn well_behaved(addr: std::net::SocketAddr, stop: Arc<AtomicBool>) -> Seen {
    let token = token();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            let token = token.clone();
            tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut ch: Option<Channel> = None;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = tokio::time::timeout(Duration::from_secs(5), async {
                        if ch.is_none() {
                            ch = channel(addr).await.ok();
                        }
                        let c = ch.as_ref()?;
                        let body = tonic::body::Body::new(http_body_util::Full::new(fmb("team-a")));
                        send(c, FMB, Some(&token), body).await
                    })
                    .await;
                    seen.latencies.push(t.elapsed());
                    match ok {
                        Ok(Some(Code::Ok)) => seen.ok += 1,
                        _ => {
                            seen.failed += 1;
                            ch = None;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                seen
            })
        })
        .collect();
    let mut all = Seen::default();
    for w in workers {
        let s = w.await.unwrap();
        all.ok += s.ok;
        all.failed += s.failed;
        all.latencies.extend(s.latencies);
    }
    all.latencies.sort();
    all
}

fn pct(v: &[Duration], p: usize) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// Keeps the attack's connections and streams open until dropped.
type Held = Vec<Box<dyn std::any::Any + Send>>;

/// A request body announcing `len` bytes and sending `sent` of them from
/// `chunk`, then nothing more.
fn partial_body(len: u32, sent: usize, chunk: &Bytes) -> tonic::body::Body {
    let mut head = vec![0u8];
    head.extend_from_slice(&len.to_be_bytes());
    let mut frames = vec![Ok::<_, tonic::Status>(Frame::data(Bytes::from(head)))];
    let mut left = sent;
    while left > 0 {
        let n = left.min(chunk.len());
        frames.push(Ok(Frame::data(chunk.slice(..n))));
        left -= n;
    }
    let stream = futures_util::stream::iter(frames).chain(futures_util::stream::pending());
    tonic::body::Body::new(http_body_util::StreamBody::new(stream))
}

async fn attack(name: &str, addr: std::net::SocketAddr, held: &mut Held) {
    match name {
        "first-messages" | "first-messages-open" => {
            let chunk = Bytes::from(vec![0x0au8; 1 << 20]);
            let ch = channel(addr).await.unwrap();
            for _ in 0..256 {
                let ch = ch.clone();
                let body = partial_body(4 << 20, 3 << 20, &chunk);
                held.push(Box::new(tokio::spawn(async move {
                    send(&ch, FMB, None, body).await
                })));
            }
            held.push(Box::new(ch));
        }
        "watch-flood" => {
            for _ in 0..10 {
                let Ok(ch) = channel(addr).await else {
                    continue;
                };
                for _ in 0..1000 {
                    let mut client = tonic_health::pb::health_client::HealthClient::new(ch.clone());
                    held.push(Box::new(tokio::spawn(async move {
                        if let Ok(s) = client
                            .watch(tonic_health::pb::HealthCheckRequest::default())
                            .await
                        {
                            let mut s = s.into_inner();
                            let _ = s.message().await;
                            std::future::pending::<()>().await;
                        }
                    })));
                }
                held.push(Box::new(ch));
            }
        }
        "header-only" => {
            for _ in 0..10 {
                let Ok(ch) = channel(addr).await else {
                    continue;
                };
                for _ in 0..1000 {
                    let ch = ch.clone();
                    let body = tonic::body::Body::new(http_body_util::StreamBody::new(
                        futures_util::stream::pending::<Result<Frame<Bytes>, tonic::Status>>(),
                    ));
                    held.push(Box::new(tokio::spawn(async move {
                        send(&ch, FMB, None, body).await
                    })));
                }
                held.push(Box::new(ch));
            }
        }
        "silent-connections" => {
            for _ in 0..64 {
                if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                    let _ = s.write_all(b"P").await;
                    held.push(Box::new(s));
                }
            }
        }
        other => panic!("unknown attack {other}"),
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let binary = args.next().expect("usage: attack BINARY [ATTACK...]");
    let mut attacks: Vec<String> = args.collect();
    if attacks.is_empty() {
        attacks = [
            "first-messages",
            "first-messages-open",
            "watch-flood",
            "header-only",
            "silent-connections",
        ]
        .map(String::from)
        .to_vec();
    }
    for name in attacks {
        let dir = tempfile::tempdir().unwrap();
        let (open, limits) = match name.as_str() {
            "first-messages-open" | "header-only" => (true, ""),
            // A short handshake timeout, so that what happens after it shows
            // within the run.
            "silent-connections" => (
                false,
                "  max-connections: 64\n  tls-handshake-timeout-seconds: 2\n",
            ),
            _ => (false, ""),
        };
        let server = Server::start(&binary, &config(dir.path(), open, limits));
        // Warm up: one call.
        let ch = channel(server.addr).await.unwrap();
        let body = tonic::body::Body::new(http_body_util::Full::new(fmb("team-a")));
        assert_eq!(
            send(&ch, FMB, Some(&token()), body).await,
            Some(Code::Ok),
            "warm-up call"
        );
        drop(ch);
        let rss_before = server.rss_mib();
        let stop = Arc::new(AtomicBool::new(false));
        let mut held: Held = Vec::new();
        attack(&name, server.addr, &mut held).await;
        let client = tokio::spawn(well_behaved(server.addr, stop.clone()));
        let mut peak = rss_before;
        let end = Instant::now() + Duration::from_secs(ATTACK_SECONDS);
        while Instant::now() < end {
            peak = peak.max(server.rss_mib());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let seen = client.await.unwrap();
        let total = seen.ok + seen.failed;
        println!(
            "{name:<20} RSS {rss_before:>5} -> peak {peak:>5} MiB   client {:>5}/{:<5} OK ({:5.1} %)  p50 {:>8.1?}  p99 {:>8.1?}",
            seen.ok,
            total,
            100.0 * seen.ok as f64 / total.max(1) as f64,
            pct(&seen.latencies, 50),
            pct(&seen.latencies, 99),
        );
        drop(held);
        drop(server);
    }
}
