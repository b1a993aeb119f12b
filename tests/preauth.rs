//! Before authentication: what an attacker who has read the code tries
//! first, against a real server on loopback. Nothing is spent on a stranger:
//! connections must speak, idle ones are closed, unauthenticated callers are
//! refused before any body byte is read, what is buffered before a decision
//! has budgets, open routes and anonymous callers have a bounded share, and
//! log lines stay bounded.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

fn open_config(limits: &str) -> String {
    loopback_config(
        "",
        &format!("authorization:\n  method: none\nlimits:\n{limits}"),
    )
}

/// Reads until the server closes the connection, returning the frame types
/// it sent and when it closed; `None` if it is still open at `limit`. With
/// `polite`, it answers the server's SETTINGS and PINGs as a real HTTP/2
/// client does.
async fn read_until_closed<S>(
    s: &mut S,
    limit: Duration,
    polite: bool,
) -> Option<(Vec<u8>, Instant)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let mut types = Vec::new();
    let mut pos = 0;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
        }
        // Whole frames (the server sends no preface).
        while all.len() >= pos + 9 {
            let len = (usize::from(all[pos]) << 16)
                | (usize::from(all[pos + 1]) << 8)
                | usize::from(all[pos + 2]);
            if all.len() < pos + 9 + len {
                break;
            }
            let (kind, flags) = (all[pos + 3], all[pos + 4]);
            types.push(kind);
            if polite && flags & 1 == 0 {
                if kind == 4 {
                    let _ = s.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await;
                } else if kind == 6 {
                    let mut ack = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                    ack.extend_from_slice(&all[pos + 9..pos + 17]);
                    let _ = s.write_all(&ack).await;
                }
            }
            pos += 9 + len;
        }
    }
    Some((types, Instant::now()))
}

/// A plaintext socket that sends one byte, and a TLS connection that
/// completes its handshake and then says nothing, are both closed when the
/// handshake timeout runs out: the deadline covers everything up to the
/// client's HTTP/2 preface and first SETTINGS.
#[tokio::test]
async fn connections_that_never_speak_are_closed_at_the_handshake_deadline() {
    let certs = Certs::new();
    let yaml = format!(
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: true\n  - !channel\n    address: \"127.0.0.1:0\"\n{}authorization:\n  method: none\nlimits:\n  tls-handshake-timeout-seconds: 1\n",
        certs.credentials_yaml(false)
    );
    let server = TestServer::start(&yaml, certs.dir.path()).await;
    let tcp: Vec<std::net::SocketAddr> = server
        .addrs
        .iter()
        .filter_map(|a| match a {
            gridgate::server::BoundAddr::Tcp(a) => Some(*a),
            _ => None,
        })
        .collect();
    let (plain, tls) = (tcp[0], tcp[1]);

    let started = Instant::now();
    // Plaintext: one byte of the preface, then silence.
    let mut one_byte = tokio::net::TcpStream::connect(plain).await.unwrap();
    one_byte.write_all(b"P").await.unwrap();
    // Plaintext: the whole preface but no SETTINGS.
    let mut preface_only = tokio::net::TcpStream::connect(plain).await.unwrap();
    preface_only.write_all(PREFACE).await.unwrap();
    // TLS: a finished handshake, then silence.
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(&certs.ca).unwrap();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut client = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let socket = tokio::net::TcpStream::connect(tls).await.unwrap();
    let mut silent_tls = connector
        .connect("localhost".try_into().unwrap(), socket)
        .await
        .expect("the TLS handshake itself completes");

    for (name, closed) in [
        (
            "one byte",
            read_until_closed(&mut one_byte, Duration::from_secs(5), false).await,
        ),
        (
            "preface without SETTINGS",
            read_until_closed(&mut preface_only, Duration::from_secs(5), false).await,
        ),
        (
            "silent after TLS",
            read_until_closed(&mut silent_tls, Duration::from_secs(5), false).await,
        ),
    ] {
        let (_, at) = closed.unwrap_or_else(|| panic!("{name}: still open after 5 s"));
        let after = at - started;
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(3),
            "{name}: closed after {after:?}, expected about the 1 s handshake timeout"
        );
    }
    // A client that speaks is served throughout.
    health_check(plain_channel(plain).await).await.unwrap();
    server.stop().await;
}

/// A connection that spoke but has had no open stream for
/// `limits.idle-connection-timeout-seconds` is sent GOAWAY and closed; one
/// with a stream open is not.
#[tokio::test]
async fn idle_connections_are_sent_goaway_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &open_config("  tls-handshake-timeout-seconds: 1\n  idle-connection-timeout-seconds: 2\n"),
        dir.path(),
    )
    .await;
    let addr = server.tcp();

    let started = Instant::now();
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(PREFACE).await.unwrap();
    idle.write_all(&EMPTY_SETTINGS).await.unwrap();
    // A busy connection: a Health Watch stays open.
    let mut client = tonic_health::pb::health_client::HealthClient::new(plain_channel(addr).await);
    let mut watch = client
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().unwrap();

    let (types, at) = read_until_closed(&mut idle, Duration::from_secs(8), true)
        .await
        .expect("the idle connection is closed");
    let after = at - started;
    assert!(
        after >= Duration::from_millis(1900) && after < Duration::from_secs(5),
        "closed after {after:?}, expected about the 2 s idle timeout (not the 1 s handshake one)"
    );
    assert!(
        types.contains(&7),
        "GOAWAY before the close: frame types {types:?}"
    );

    // The watching connection outlived the idle timeout: its stream is open.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let more = tokio::time::timeout(Duration::from_millis(200), watch.message()).await;
    assert!(
        !matches!(more, Ok(Err(_)) | Ok(Ok(None))),
        "the stream with a call open was closed: {more:?}"
    );
    drop((watch, client));
    server.stop().await;
}

/// With `max-connections: 8`, eight sockets that never speak take every
/// place, but only until the handshake deadline: after it, new clients are
/// served again.
#[tokio::test]
async fn silent_sockets_give_their_places_back_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &open_config("  tls-handshake-timeout-seconds: 1\n  max-connections: 8\n"),
        dir.path(),
    )
    .await;
    let addr = server.tcp();
    let mut squatters = Vec::new();
    for _ in 0..8 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"P").await.unwrap();
        squatters.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Every place is taken: a new client is closed at once.
    let refused = tokio::time::timeout(Duration::from_secs(2), async {
        match plain_channel_result(addr).await {
            Ok(ch) => health_check(ch).await.is_err(),
            Err(_) => true,
        }
    })
    .await
    .unwrap_or(true);
    assert!(
        refused,
        "a ninth connection was served while eight were open"
    );
    // After the deadline the places are free again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    health_check(plain_channel(addr).await)
        .await
        .expect("served once the silent sockets were closed");
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Nothing is spent on a stranger.

#[path = "common/jwks_server.rs"]
mod jwks_server;

use bytes::Bytes;
use http_body::Frame;
use jsonwebtoken::Algorithm;
use jwks_server::{claims, TestKey};
use prost::Message;
use tonic::Code;

use gridgate::proto::build::bazel::remote::execution::v2 as re;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-hs256";
const FMB: &str = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";

fn token() -> String {
    TestKey::hmac(Algorithm::HS256, SECRET).sign(&claims("https://ci.example", "gridgate", "ci"))
}

/// A jwt config in `dir` where `ci` may call everything on `team-a` (a
/// memory CAS) and anonymous callers may call FindMissingBlobs on `public`
/// when `public` is listed in `extra_auth`.
fn jwt_config(dir: &std::path::Path, extra_auth: &str, limits: &str) -> String {
    std::fs::write(dir.join("hmac.secret"), SECRET).unwrap();
    std::fs::write(
        dir.join("acl.yaml"),
        "team-a:\n  allow:\n    - subject: ci\n      requests: [FindMissingBlobs, BatchUpdateBlobs, Write]\npublic:\n  allow:\n    - requests: [FindMissingBlobs]\n",
    )
    .unwrap();
    loopback_config(
        "",
        &format!(
            "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  audience: gridgate\n  acl-config: acl.yaml\n{extra_auth}instances:\n  - name: team-a\n    cas: {{ backend: memory }}\n  - name: public\n    cas: {{ backend: memory }}\nlimits:\n{limits}"
        ),
    )
}

fn fmb(instance: &str) -> Vec<u8> {
    let msg = re::FindMissingBlobsRequest {
        instance_name: instance.into(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut out = vec![0];
    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    out.extend(msg);
    out
}

/// A request body that announces a message of `len` bytes and sends `sent`
/// of them from one shared buffer (so the client spends no memory on it),
/// then waits forever.
fn big_body(len: u32, sent: usize, chunk: &Bytes) -> tonic::body::Body {
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

use futures_util::StreamExt;

/// Sends a raw request and returns its status (or the transport error's text).
async fn send(
    ch: &tonic::transport::Channel,
    path: &str,
    headers: &[(&str, String)],
    body: tonic::body::Body,
) -> Result<(Code, String), String> {
    use tower::{Service, ServiceExt};
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://gate{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let mut ch = ch.clone();
    let resp = ch
        .ready()
        .await
        .map_err(|e| e.to_string())?
        .call(req.body(body).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status_of = |h: &http::HeaderMap| {
        let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
        let msg = h
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .unwrap_or("")
            .to_string();
        Some((Code::from_i32(code), msg))
    };
    if let Some(s) = status_of(resp.headers()) {
        return Ok(s);
    }
    use http_body_util::BodyExt;
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    collected
        .trailers()
        .and_then(status_of)
        .ok_or_else(|| "no grpc-status".into())
}

/// `VmRSS` of a process, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024
}

/// 256 unauthenticated streams on one connection, each sending most of a
/// 4 MiB first message, are refused from their headers without a body byte
/// being read: the gateway's memory does not move. Where anonymous callers
/// may be exempt (an open instance), what they buffer before the decision is
/// held to their share of the pending-bytes budgets, and the rest is told
/// RESOURCE_EXHAUSTED at once.
#[tokio::test]
async fn unauthenticated_first_messages_cost_the_gateway_nothing() {
    let chunk = Bytes::from(vec![0x0au8; 1 << 20]);
    for (exempt, max_growth) in [(false, 40), (true, 40 + 16 + 16)] {
        let dir = tempfile::tempdir().unwrap();
        let extra = if exempt {
            "  allow-unauthenticated-instances: [public]\n"
        } else {
            ""
        };
        // The few that fit their share wait for the rest of their message
        // until the first-message timeout.
        let yaml = jwt_config(
            dir.path(),
            extra,
            "  max-concurrent-streams: 1024\n  first-message-timeout-seconds: 3\n",
        );
        let path = dir.path().join("gridgate.yaml");
        std::fs::write(&path, yaml).unwrap();
        let mut bin = Binary::start(&["serve", "--config", path.to_str().unwrap()]);
        let addr = bin.listening_addr();
        let pid = bin.child.id();
        let ch = plain_channel(addr).await;
        health_check(ch.clone()).await.unwrap();
        let before = rss_mib(pid);
        let started = Instant::now();
        let calls: Vec<_> = (0..256)
            .map(|_| {
                let ch = ch.clone();
                let body = big_body(4 << 20, 3 << 20, &chunk);
                tokio::spawn(async move { send(&ch, FMB, &[], body).await })
            })
            .collect();
        let mut codes = std::collections::BTreeMap::new();
        for c in calls {
            let r = tokio::time::timeout(Duration::from_secs(20), c)
                .await
                .expect("every call is answered")
                .unwrap();
            let code = match r {
                Ok((code, _)) => format!("{code:?}"),
                Err(e) => format!("transport: {e}"),
            };
            *codes.entry(code).or_insert(0) += 1;
        }
        let took = started.elapsed();
        let after = rss_mib(pid);
        eprintln!("exempt {exempt}: {codes:?} in {took:?}, RSS {before} -> {after} MiB");
        if exempt {
            // Anonymous callers buffer at most their share (16 MiB on one
            // connection); those over it are refused at once, the few within
            // it time out waiting for the rest of their message.
            assert!(!codes.contains_key("Ok"), "{codes:?}");
            assert!(
                codes.get("ResourceExhausted").copied().unwrap_or(0) > 200,
                "{codes:?}"
            );
        } else {
            assert_eq!(codes.get("Unauthenticated"), Some(&256), "{codes:?}");
            assert!(
                took < Duration::from_secs(10),
                "refused at once, took {took:?}"
            );
        }
        assert!(
            after < before + max_growth,
            "RSS grew from {before} to {after} MiB"
        );
        // A well-behaved client is served.
        let ok = send(
            &plain_channel(addr).await,
            FMB,
            &[("authorization", format!("Bearer {}", token()))],
            tonic::body::Body::new(http_body_util::Full::new(Bytes::from(fmb("team-a")))),
        )
        .await
        .unwrap();
        assert_eq!(ok.0, Code::Ok, "{ok:?}");
    }
}

/// Opens `per_conn` Health Watch streams on each of `conns` connections;
/// returns the streams that are open and how many were refused with
/// RESOURCE_EXHAUSTED.
async fn flood_watch(
    addr: std::net::SocketAddr,
    conns: usize,
    per_conn: usize,
) -> (
    Vec<tonic::Streaming<tonic_health::pb::HealthCheckResponse>>,
    usize,
) {
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let ch = plain_channel(addr).await;
        for _ in 0..per_conn {
            let mut client = tonic_health::pb::health_client::HealthClient::new(ch.clone());
            tasks.push(tokio::spawn(async move {
                let r = client
                    .watch(tonic_health::pb::HealthCheckRequest::default())
                    .await;
                match r {
                    Ok(s) => {
                        let mut s = s.into_inner();
                        match s.message().await {
                            Ok(Some(_)) => Ok(s),
                            Ok(None) => Err(Code::Ok),
                            Err(e) => Err(e.code()),
                        }
                    }
                    Err(e) => Err(e.code()),
                }
            }));
        }
    }
    let (mut open, mut refused) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(s) => open.push(s),
            Err(Code::ResourceExhausted) => refused += 1,
            Err(other) => panic!("a Watch ended with {other:?}"),
        }
    }
    (open, refused)
}

/// A well-behaved authenticated client: `n` FindMissingBlobs calls, 8 at a
/// time; returns (successes, p99 latency).
async fn well_behaved(addr: std::net::SocketAddr, n: usize) -> (usize, Duration) {
    let ch = plain_channel(addr).await;
    let token = token();
    let mut latencies = Vec::new();
    let mut ok = 0;
    for _ in 0..n / 8 {
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let ch = ch.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    let t = Instant::now();
                    let body = tonic::body::Body::new(http_body_util::Full::new(Bytes::from(fmb(
                        "team-a",
                    ))));
                    let r = send(
                        &ch,
                        FMB,
                        &[("authorization", format!("Bearer {token}"))],
                        body,
                    )
                    .await;
                    (r, t.elapsed())
                })
            })
            .collect();
        for c in calls {
            let (r, took) = c.await.unwrap();
            latencies.push(took);
            if matches!(r, Ok((Code::Ok, _))) {
                ok += 1;
            }
        }
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    (ok, p99)
}

/// Open routes (Health Watch) and anonymous callers hold at most their
/// share of requests in progress, in total and per connection, so a flood
/// of them never takes the service from an authenticated client: with small
/// limits and with the defaults.
#[tokio::test]
async fn a_flood_of_watch_streams_leaves_authenticated_callers_served() {
    for (limits, conns, per_conn, expected_open) in [
        (
            "  max-concurrent-requests: 64\n  max-concurrent-streams: 32\n",
            10,
            32,
            16,
        ),
        ("", 12, 300, 2500),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start(&jwt_config(dir.path(), "", limits), dir.path()).await;
        let addr = server.tcp();
        let started = Instant::now();
        let (open, refused) = flood_watch(addr, conns, per_conn).await;
        eprintln!(
            "limits {limits:?}: {} Watch streams open, {refused} refused, in {:?}",
            open.len(),
            started.elapsed()
        );
        assert_eq!(
            open.len(),
            expected_open,
            "open routes hold their share exactly"
        );
        assert_eq!(open.len() + refused, conns * per_conn);
        let (ok, p99) = well_behaved(addr, 200).await;
        eprintln!("  well-behaved client during the flood: {ok}/200 OK, p99 {p99:?}");
        assert_eq!(
            ok, 200,
            "the authenticated client was refused during the flood"
        );
        drop(open);
        server.stop().await;
    }
}

/// Header-only requests that never send a body: without credentials they
/// are refused at once; where anonymous callers may be exempt they wait for
/// their first message within the anonymous share, not everyone's.
#[tokio::test]
async fn header_only_requests_wait_within_their_callers_share() {
    for exempt in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let extra = if exempt {
            "  allow-unauthenticated-instances: [public]\n"
        } else {
            ""
        };
        let server = TestServer::start(
            &jwt_config(
                dir.path(),
                extra,
                "  max-concurrent-requests: 64\n  max-concurrent-streams: 32\n",
            ),
            dir.path(),
        )
        .await;
        let addr = server.tcp();
        let mut held = Vec::new();
        let mut codes = std::collections::BTreeMap::new();
        for _ in 0..10 {
            let ch = plain_channel(addr).await;
            for _ in 0..32 {
                let ch = ch.clone();
                held.push(tokio::spawn(async move {
                    let body = tonic::body::Body::new(http_body_util::StreamBody::new(
                        futures_util::stream::pending::<Result<Frame<Bytes>, tonic::Status>>(),
                    ));
                    send(&ch, FMB, &[], body).await
                }));
            }
        }
        // Those refused are answered at once; the rest wait.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut waiting = Vec::new();
        for h in held {
            if h.is_finished() {
                let code = match h.await.unwrap() {
                    Ok((c, _)) => format!("{c:?}"),
                    Err(e) => e,
                };
                *codes.entry(code).or_insert(0) += 1;
            } else {
                waiting.push(h);
            }
        }
        eprintln!(
            "exempt {exempt}: {} waiting, answered {codes:?}",
            waiting.len()
        );
        if exempt {
            assert_eq!(waiting.len(), 16, "the anonymous share of 64 is 16");
            assert_eq!(
                codes.get("ResourceExhausted"),
                Some(&(320 - 16)),
                "{codes:?}"
            );
        } else {
            assert!(waiting.is_empty());
            assert_eq!(codes.get("Unauthenticated"), Some(&320), "{codes:?}");
        }
        let (ok, p99) = well_behaved(addr, 200).await;
        eprintln!("  well-behaved client: {ok}/200 OK, p99 {p99:?}");
        assert_eq!(ok, 200);
        for w in waiting {
            w.abort();
        }
        server.stop().await;
    }
}

/// Log lines stay bounded whatever a client sends: an instance name over
/// `limits.max-instance-name-bytes` is INVALID_ARGUMENT, and every
/// client-controlled value on an audit line is cut (the instance, the
/// caller's claims, the reason).
#[tokio::test]
async fn a_request_never_writes_more_than_a_few_kib_of_log() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = jwt_config(
        dir.path(),
        "  allow-unauthenticated-instances: [public]\n",
        "  max-concurrent-streams: 100\n",
    );
    let path = dir.path().join("gridgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut bin = Binary::start(&[
        "serve",
        "--config",
        path.to_str().unwrap(),
        "--audit-log",
        audit.to_str().unwrap(),
    ]);
    let addr = bin.listening_addr();
    let ch = plain_channel(addr).await;
    let huge = "x".repeat(1 << 20);
    let long = "y".repeat(500);
    let key = TestKey::hmac(Algorithm::HS256, SECRET);
    let mut long_claims = claims("https://ci.example", "gridgate", &"s".repeat(6000));
    long_claims["act"] = serde_json::json!("a".repeat(3000));
    let long_token = key.sign(&long_claims);
    let mut sent = 0usize;
    type Case<'a> = (Vec<(&'a str, String)>, Vec<u8>, Code);
    let cases: Vec<Case> = vec![
        (vec![], fmb(&huge), Code::InvalidArgument),
        (
            vec![("authorization", format!("Bearer {}", token()))],
            fmb(&huge),
            Code::InvalidArgument,
        ),
        (vec![], fmb(&long), Code::Unauthenticated),
        (
            vec![("authorization", format!("Bearer {}", token()))],
            fmb(&long),
            Code::PermissionDenied,
        ),
        (
            vec![("authorization", format!("Bearer {long_token}"))],
            fmb("team-a"),
            Code::PermissionDenied,
        ),
        (
            vec![("authorization", format!("Bearer {long_token}"))],
            fmb(&long),
            Code::PermissionDenied,
        ),
    ];
    for (headers, body, expected) in cases {
        for _ in 0..4 {
            sent += body.len() + headers.iter().map(|(_, v)| v.len()).sum::<usize>();
            let (code, msg) = send(
                &ch,
                FMB,
                &headers,
                tonic::body::Body::new(http_body_util::Full::new(Bytes::from(body.clone()))),
            )
            .await
            .unwrap();
            assert_eq!(code, expected, "{msg}");
            if code == Code::InvalidArgument {
                assert!(msg.contains("limits.max-instance-name-bytes"), "{msg}");
            }
        }
    }
    // Let the audit writer flush.
    tokio::time::sleep(Duration::from_millis(300)).await;
    bin.signal("TERM");
    bin.wait_exit(Duration::from_secs(10));
    let log = std::fs::read_to_string(&audit).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let longest = lines.iter().map(|l| l.len()).max().unwrap_or(0);
    eprintln!(
        "{} audit lines, {} bytes for {sent} bytes sent; longest line {longest}",
        lines.len(),
        log.len()
    );
    assert!(longest < 4096, "an audit line of {longest} bytes");
    assert!(
        log.len() < 24 * 4096,
        "the audit log grew by {} bytes",
        log.len()
    );
    assert!(!log.contains(&long), "an instance name was logged whole");
    assert!(!log.contains(&"s".repeat(1000)), "a claim was logged whole");
}

/// Headers over `limits.max-header-list-bytes` get a gRPC status naming the
/// limit (RESOURCE_EXHAUSTED), not an HTTP 431 that clients show as UNKNOWN.
#[tokio::test]
async fn oversized_header_lists_get_a_grpc_status_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&jwt_config(dir.path(), "", ""), dir.path()).await;
    let mut client = re::content_addressable_storage_client::ContentAddressableStorageClient::new(
        plain_channel(server.tcp()).await,
    );
    let request = || re::FindMissingBlobsRequest {
        instance_name: "team-a".into(),
        ..Default::default()
    };
    // A 20 KiB token.
    let mut req = tonic::Request::new(request());
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", "a".repeat(20 << 10)).parse().unwrap(),
    );
    let err = client.find_missing_blobs(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("limits.max-header-list-bytes"),
        "{err:?}"
    );
    // 2000 small headers.
    let mut req = tonic::Request::new(request());
    for i in 0..2000 {
        req.metadata_mut().insert(
            tonic::metadata::MetadataKey::from_bytes(format!("x-h-{i}").as_bytes()).unwrap(),
            "v".parse().unwrap(),
        );
    }
    let err = client.find_missing_blobs(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Within the limit, the same client is served.
    let ok = client
        .find_missing_blobs(tonic::Request::new(request()).tap_token())
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    server.stop().await;
}

trait TapToken {
    fn tap_token(self) -> Self;
}

impl<T> TapToken for tonic::Request<T> {
    fn tap_token(mut self) -> Self {
        self.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token()).parse().unwrap(),
        );
        self
    }
}
