//! Limits that keep the gateway responsive under pressure: requests beyond
//! `limits.max-concurrent-requests` are shed at once, connections beyond
//! `limits.max-connections` are closed at once, and both recover when load
//! goes down; the memory stores stay within their budgets under a flood of
//! streams; a slow key server does not stall or weaken token checks.

mod common;

use std::time::Duration;

use common::*;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn config(limits: &str) -> String {
    loopback_config(
        "",
        &format!("authorization:\n  method: none\nlimits:\n{limits}"),
    )
}

/// Opens a Health Watch stream (it stays open until dropped) and waits for
/// its first message, so that it is surely in progress.
async fn open_watch(
    addr: std::net::SocketAddr,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    let mut client = HealthClient::new(plain_channel(addr).await);
    let mut watch = client
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    watch.next().await.unwrap().unwrap();
    watch
}

#[tokio::test]
async fn requests_beyond_the_limit_are_shed_at_once_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    // The whole limit for Health Watch streams (an open route): this test is
    // about the total, not the open routes' share of it.
    let server = TestServer::start(
        &config("  max-concurrent-requests: 2\n  anonymous-share-percent: 100\n"),
        dir.path(),
    )
    .await;
    let addr = server.tcp();
    let first = open_watch(addr).await;
    let second = open_watch(addr).await;

    // A third call is refused without waiting for a slot.
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        health_check(plain_channel(addr).await),
    )
    .await
    .expect("shed at once, not queued")
    .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("limit of 2"), "{refused:?}");
    assert!(refused.metadata().get("x-request-id").is_some());

    // Ending one stream frees its place.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match health_check(plain_channel(addr).await).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert!(std::time::Instant::now() < deadline, "never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    drop(second);
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&config("  max-connections: 2\n"), dir.path()).await;
    let addr = server.tcp();
    let one = plain_channel(addr).await;
    let two = plain_channel(addr).await;
    health_check(one.clone()).await.unwrap();
    health_check(two.clone()).await.unwrap();

    // A third connection is closed before HTTP/2 starts.
    let third = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await;
    match third {
        Err(_) => {}
        Ok(ch) => {
            // The client sees its connection closed under it.
            let e = health_check(ch).await.unwrap_err();
            assert!(
                matches!(e.code(), Code::Unavailable | Code::Cancelled),
                "{e:?}"
            );
        }
    }
    // The connections already open keep working.
    health_check(one.clone()).await.unwrap();

    // Closing one makes room.
    drop(two);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let attempt = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(1))
            .connect()
            .await;
        if let Ok(ch) = attempt {
            if health_check(ch).await.is_ok() {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no room after a close"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[test]
fn tls_certificates_reload_without_dropping_connections() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let live_cert = dir.path().join("live.crt");
    let live_key = dir.path().join("live.key");
    std::fs::copy(&certs.server_cert, &live_cert).unwrap();
    std::fs::copy(&certs.server_key, &live_key).unwrap();
    // The replacement: another CA's server certificate.
    let next_ca = gridgate::devcerts::DevCa::new("next CA").unwrap();
    let next = next_ca.server(&[]).unwrap();
    let next_ca_path = dir.path().join("next-ca.crt");
    std::fs::write(&next_ca_path, &next_ca.pair().cert_pem).unwrap();

    let config = dir.path().join("gridgate.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: false\n    credentials:\n      tls-server-key: {}\n      tls-server-cert: {}\nauthorization:\n  method: none\n",
            live_key.display(),
            live_cert.display()
        ),
    )
    .unwrap();
    let mut bin = Binary::start(&["serve", "--config", config.to_str().unwrap()]);
    let addr = bin.listening_addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let old = rt.block_on(async {
        let ch = tls_channel(addr, &certs.ca, None).await.unwrap();
        health_check(ch.clone()).await.unwrap();
        ch
    });

    // A changed file is picked up without a signal (the key first, as a
    // rotation tool may write them: the half-written pair is refused and the
    // old certificate kept).
    std::fs::write(&live_key, &next.key_pem).unwrap();
    std::fs::write(&live_cert, &next.cert_pem).unwrap();
    let line = bin
        .wait_for_line("TLS certificate reloaded", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no reload: {:#?}", bin.seen));
    assert!(line.contains("file change"), "{line}");
    rt.block_on(async {
        // New handshakes get the new certificate...
        let fresh = tls_channel(addr, &next_ca_path, None).await.unwrap();
        health_check(fresh).await.unwrap();
        assert!(
            tls_channel(addr, &certs.ca, None).await.is_err(),
            "the old certificate is no longer served"
        );
        // ...and the connection made before the reload is still open (a
        // reconnect would have to trust the new CA, which `old` does not).
        health_check(old.clone()).await.unwrap();
    });

    // A broken file: logged, the current certificate stays in use.
    std::fs::write(&live_cert, "not a certificate").unwrap();
    let line = bin
        .wait_for_line("TLS reload failed", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no failure logged: {:#?}", bin.seen));
    assert!(line.contains("live.crt"), "{line}");
    rt.block_on(async {
        let fresh = tls_channel(addr, &next_ca_path, None).await.unwrap();
        health_check(fresh).await.unwrap();
    });

    // SIGHUP reloads on demand.
    std::fs::write(&live_cert, &next.cert_pem).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    bin.signal("HUP");
    let line = bin
        .wait_for_line("trigger=\"SIGHUP\"", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no SIGHUP reload: {:#?}", bin.seen));
    assert!(line.contains("TLS certificate reloaded"), "{line}");
    drop(old);
    bin.signal("TERM");
    assert_eq!(bin.wait_exit(Duration::from_secs(10)), Some(0));
}

#[path = "common/jwks_server.rs"]
mod jwks_server;

/// With `jwks-required-at-start: true` a key server that is down, answers
/// garbage or an empty key set at start-up stops gridgate from starting; by
/// default gridgate starts, NOT_SERVING, and refuses tokens until keys arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_faults_at_start_up_follow_the_configured_choice() {
    use jsonwebtoken::Algorithm;
    use jwks_server::{claims, Behavior, JwksServer, TestKey};
    let key = TestKey::rsa(Algorithm::RS256, "k1");
    let jwks = JwksServer::start(&[&key]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = |required: bool| {
        let path = dir.path().join(format!("gridgate-{required}.yaml"));
        std::fs::write(
            &path,
            loopback_config(
                "",
                &format!(
                    "authorization:\n  method: jwt\n  algorithm: rs256\n  jwks-url: \"{}\"\n  audience: gridgate\n  jwks-required-at-start: {required}\n",
                    jwks.url()
                ),
            ),
        )
        .unwrap();
        path.display().to_string()
    };
    let required = config(true);
    let faults = [
        ("HTTP 500", Behavior::Status(500)),
        ("garbage", Behavior::Garbage),
        ("an empty key set", Behavior::Empty),
        ("no answer", Behavior::Hang),
    ];
    for (what, fault) in faults {
        jwks.set_behavior(fault);
        let mut bin = Binary::start(&["serve", "--config", &required]);
        let code = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(30)));
        assert_eq!(code, Some(1), "{what}: {:#?}", bin.seen);
        assert!(
            bin.seen
                .iter()
                .any(|l| l.contains("jwks-required-at-start")),
            "{what}: {:#?}",
            bin.seen
        );
    }

    // The default: start anyway, refuse tokens, recover when keys arrive.
    jwks.set_behavior(Behavior::Status(500));
    let lenient = config(false);
    let mut bin = Binary::start(&["serve", "--config", &lenient]);
    let addr = tokio::task::block_in_place(|| bin.listening_addr());
    let token = key.sign(&claims("https://ci.example", "gridgate", "ci"));
    let refused = raw_unary(
        plain_channel(addr).await,
        "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
        bytes::Bytes::new(),
        &[("authorization", format!("Bearer {token}"))],
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    jwks.set_behavior(Behavior::Serve);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = raw_unary(
            plain_channel(addr).await,
            "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
            bytes::Bytes::new(),
            &[("authorization", format!("Bearer {token}"))],
        )
        .await;
        match attempt {
            // Admitted: the Gate let it through to the service (which has
            // no unnamed instance here and says so).
            Ok(_) => break,
            Err(e) if e.code() != Code::Unauthenticated => {
                assert!(e.message().contains("unknown instance"), "{e:?}");
                break;
            }
            Err(_) => {
                assert!(std::time::Instant::now() < deadline, "keys never arrived");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Sends one raw HTTP/2 gRPC request (headers and body bytes as given) and
/// returns the grpc-status, from the headers or the trailers.
async fn raw_call(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<(Code, String), String> {
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};
    let mut ch = plain_channel(addr).await;
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from(body),
        )))
        .unwrap();
    let resp = ch
        .ready()
        .await
        .map_err(|e| e.to_string())?
        .call(req)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let status_of = |h: &http::HeaderMap| {
        let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
        let msg = h
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .unwrap_or("")
            .to_string();
        Some((Code::from_i32(code), msg))
    };
    if let Some(s) = status_of(&parts.headers) {
        return Ok(s);
    }
    let collected = body.collect().await.map_err(|e| e.to_string())?;
    collected
        .trailers()
        .and_then(status_of)
        .ok_or_else(|| "no grpc-status".to_string())
}

fn frame(compressed: bool, declared_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(compressed)];
    out.extend_from_slice(&declared_len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const FMB: &str = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";

fn cas_config() -> String {
    loopback_config(
        "",
        "authorization:\n  method: none\ninstances:\n  - name: team-a\n    cas: { backend: memory, max-bytes: 1M }\n",
    )
}

/// Hostile bodies and headers are answered with a status, quickly, and the
/// server keeps serving others.
#[tokio::test]
async fn hostile_requests_get_a_status_and_the_server_stays_responsive() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&cas_config(), dir.path()).await;
    let addr = server.tcp();
    let within = |d| Duration::from_secs(d);

    // A gzip bomb: 64 MiB of zeros (16 times the message limit) in a few
    // hundred KiB.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        gz.write_all(&zeros).unwrap();
    }
    let gzip_bomb = gz.finish().unwrap();
    // The same as zstd.
    let zstd_bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
    for (encoding, bomb) in [("gzip", gzip_bomb), ("zstd", zstd_bomb)] {
        let (code, msg) = tokio::time::timeout(
            within(10),
            raw_call(
                addr,
                FMB,
                &[("grpc-encoding", encoding.into())],
                frame(true, bomb.len() as u32, &bomb),
            ),
        )
        .await
        .expect("answered")
        .unwrap();
        assert!(
            matches!(code, Code::ResourceExhausted | Code::InvalidArgument),
            "{encoding} bomb: {code:?} {msg}"
        );
    }

    // A length prefix that promises more than the body holds.
    let (code, msg) = tokio::time::timeout(
        within(10),
        raw_call(addr, FMB, &[], frame(false, 1 << 20, b"\x0a\x06team-a")),
    )
    .await
    .expect("answered")
    .unwrap();
    assert_ne!(code, Code::Ok, "lying prefix: {msg}");

    // A length prefix beyond the message limit, with no body behind it.
    let (code, msg) = tokio::time::timeout(
        within(10),
        raw_call(addr, FMB, &[], frame(false, u32::MAX, b"")),
    )
    .await
    .expect("answered")
    .unwrap();
    assert!(
        matches!(
            code,
            Code::ResourceExhausted | Code::InvalidArgument | Code::Internal
        ),
        "huge prefix: {code:?} {msg}"
    );

    // Metadata beyond the header list limit (16 KiB by default): a 64 KiB
    // token, and 5000 small headers. The client gets an error, not a hang.
    let big = format!("Bearer {}", "a".repeat(64 * 1024));
    let r = tokio::time::timeout(
        within(10),
        raw_call(addr, FMB, &[("authorization", big)], frame(false, 0, b"")),
    )
    .await
    .expect("answered");
    assert!(!matches!(r, Ok((Code::Ok, _))), "{r:?}");
    let many: Vec<(String, String)> = (0..5000)
        .map(|i| (format!("x-h-{i}"), "v".to_string()))
        .collect();
    let refs: Vec<(&str, String)> = many.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let r = tokio::time::timeout(within(10), raw_call(addr, FMB, &refs, frame(false, 0, b"")))
        .await
        .expect("answered");
    assert!(!matches!(r, Ok((Code::Ok, _))), "{r:?}");

    // A request whose client gives up at once does no harm.
    for _ in 0..20 {
        let call = raw_call(addr, FMB, &[], frame(false, 8, b"\x0a\x06team-a"));
        let _ = tokio::time::timeout(Duration::from_micros(50), call).await;
    }

    // Everyone else is still served.
    let ok = raw_call(addr, FMB, &[], frame(false, 8, b"\x0a\x06team-a"))
        .await
        .unwrap();
    assert_eq!(ok.0, Code::Ok, "{ok:?}");
    health_check(plain_channel(addr).await).await.unwrap();
    server.stop().await;
}

/// A client that connects and never speaks is closed after the handshake
/// timeout (plaintext and TLS alike), so idle sockets cannot pile up; others
/// are served meanwhile.
#[tokio::test]
async fn silent_connections_are_closed_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let server =
        TestServer::start(&config("  tls-handshake-timeout-seconds: 1\n"), dir.path()).await;
    let addr = server.tcp();
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    health_check(plain_channel(addr).await).await.unwrap();
    for mut s in silent {
        // The server's own SETTINGS may come first; then the close (EOF or
        // a reset, either ends read_to_end).
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("closed by the server within the timeout")
            .ok();
    }
    server.stop().await;
}

/// `limits.max-concurrent-streams` bounds the streams of one connection
/// (HTTP/2 SETTINGS): a client's extra stream waits for a free one, and other
/// connections are not held up.
#[tokio::test]
async fn streams_beyond_the_per_connection_limit_wait_for_a_free_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &config("  max-concurrent-streams: 2\n  anonymous-share-percent: 100\n"),
        dir.path(),
    )
    .await;
    let addr = server.tcp();
    let ch = plain_channel(addr).await;
    let open = |ch: tonic::transport::Channel| async move {
        let mut client = HealthClient::new(ch);
        let mut watch = client
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        watch.next().await.unwrap().unwrap();
        watch
    };
    let first = open(ch.clone()).await;
    let _second = open(ch.clone()).await;
    // The third stream on this connection has to wait...
    let third = tokio::spawn(health_check(ch.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "a third stream ran beside two");
    // ...while another connection is served at once.
    tokio::time::timeout(
        Duration::from_secs(2),
        health_check(plain_channel(addr).await),
    )
    .await
    .expect("other connections are not held up")
    .unwrap();
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("runs once a stream is free")
        .unwrap()
        .unwrap();
    drop(_second);
    server.stop().await;
}

/// A client that opens a call and trickles its first message (here: a few
/// bytes, then nothing) is answered DEADLINE_EXCEEDED after
/// `limits.first-message-timeout-seconds`, and frees its place.
#[tokio::test]
async fn a_trickled_first_message_times_out() {
    use http_body_util::StreamBody;
    use tower::{Service, ServiceExt};
    let dir = tempfile::tempdir().unwrap();
    let yaml = cas_config().replace(
        "authorization:",
        "limits:\n  first-message-timeout-seconds: 1\n  max-concurrent-requests: 1\nauthorization:",
    );
    let server = TestServer::start(&yaml, dir.path()).await;
    let addr = server.tcp();
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >(4);
    // The frame header promises 8 bytes; 3 come, then the client goes quiet.
    tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(
        b"\x00\x00\x00\x00\x08\x0a\x06t",
    ))))
    .await
    .unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{FMB}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
        .unwrap();
    let mut ch = plain_channel(addr).await;
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(10), ch.ready().await.unwrap().call(req))
        .await
        .expect("answered")
        .unwrap();
    let code = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32);
    assert_eq!(code, Some(Code::DeadlineExceeded), "{resp:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(tx);
    // Its place (max-concurrent-requests: 1) is free again.
    let ok = raw_call(addr, FMB, &[], frame(false, 8, b"\x0a\x06team-a"))
        .await
        .unwrap();
    assert_eq!(ok.0, Code::Ok, "{ok:?}");
    server.stop().await;
}

/// A memory figure of a process from `/proc/PID/status`, in bytes: `VmHWM:`
/// (the peak resident set so far) or `VmRSS:` (the current one).
fn proc_memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kib * 1024
}

const MIB: u64 = 1 << 20;

fn rand_u64() -> u64 {
    u64::from_le_bytes(jwks_server::random_bytes(8).try_into().unwrap())
}

/// Uploads `data` on one ByteStream Write call to `team-a`, in 64 KiB
/// messages as Bazel does; returns the committed size.
async fn write_blob(
    ch: tonic::transport::Channel,
    data: bytes::Bytes,
) -> Result<i64, tonic::Status> {
    use gridgate::proto::google::bytestream as bs;
    use gridgate::reapi::digest::BlobKey;
    let key = BlobKey::of(&data);
    let name = format!(
        "team-a/uploads/{:016x}/blobs/{}/{}",
        rand_u64(),
        key.hex(),
        key.size
    );
    let chunk = 64 * 1024;
    let messages: Vec<bs::WriteRequest> = (0..data.len())
        .step_by(chunk)
        .map(|offset| {
            let end = (offset + chunk).min(data.len());
            bs::WriteRequest {
                resource_name: if offset == 0 {
                    name.clone()
                } else {
                    String::new()
                },
                write_offset: offset as i64,
                finish_write: end == data.len(),
                data: data.slice(offset..end),
            }
        })
        .collect();
    bs::byte_stream_client::ByteStreamClient::new(ch)
        .write(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner().committed_size)
}

/// Publishes one tool event stream of `events` events (the last one finishes
/// the stream) with `payload` in each, reading the acks as they come; returns
/// how many were acknowledged, in order.
async fn publish_tool_stream(
    ch: tonic::transport::Channel,
    build_id: String,
    events: i64,
    payload: Vec<u8>,
) -> Result<i64, tonic::Status> {
    use gridgate::proto::google::devtools::build::v1::{
        build_event, publish_build_event_client::PublishBuildEventClient, BuildEvent,
        OrderedBuildEvent, PublishBuildToolEventStreamRequest, StreamId,
    };
    let stream = StreamId {
        build_id,
        invocation_id: "invocation".into(),
        component: 3, // TOOL
    };
    let requests = (1..=events).map(move |seq| {
        let event = if seq == events {
            build_event::Event::ComponentStreamFinished(build_event::BuildComponentStreamFinished {
                r#type: 1,
            })
        } else {
            build_event::Event::BazelEvent(prost_types::Any {
                type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
                value: payload.clone(),
            })
        };
        PublishBuildToolEventStreamRequest {
            ordered_build_event: Some(OrderedBuildEvent {
                stream_id: Some(stream.clone()),
                sequence_number: seq,
                event: Some(BuildEvent {
                    event_time: None,
                    event: Some(event),
                }),
            }),
            project_id: "team-a".into(),
            ..Default::default()
        }
    });
    let mut acks = PublishBuildEventClient::new(ch)
        .publish_build_tool_event_stream(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut acked = 0;
    while let Some(ack) = acks.message().await? {
        acked += 1;
        assert_eq!(ack.sequence_number, acked, "acks in order");
    }
    Ok(acked)
}

/// A flood of concurrent uploads and build event streams, many times larger
/// than the stores' budgets, from several connections at once: every call is
/// answered (stored, or refused with a status that says why), the process's
/// peak memory stays within the budgets plus a fixed overhead, and the
/// gateway keeps serving afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bes_and_cas_memory_stay_within_budget_under_a_flood_of_streams() {
    use gridgate::proto::build::bazel::remote::execution::v2 as re;
    use gridgate::proto::google::bytestream as bs;
    use gridgate::proto::gridgate::v1 as gg;
    use gridgate::reapi::digest::BlobKey;
    use jwks_server::random_bytes;

    const CAS_BUDGET: u64 = 32 * MIB;
    const BES_BUDGET: u64 = 16 * MIB;
    const CALLS: usize = 200; // of each kind
    const BLOB_BYTES: usize = 1 << 20;
    const EVENTS: i64 = 512;
    const EVENT_PAYLOAD: usize = 2048; // about 1 MiB per build event stream
    const CONNECTIONS: usize = 8;
    const CALL_LIMIT: Duration = Duration::from_secs(180);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gridgate.yaml");
    std::fs::write(
        &config,
        loopback_config(
            "",
            "authorization:\n  method: none\ninstances:\n  - name: team-a\n    cas: { backend: memory, max-bytes: 32M }\nbuild-events:\n  store: memory\n  max-bytes: 16M\n",
        ),
    )
    .unwrap();
    let mut bin = Binary::start(&["serve", "--config", config.to_str().unwrap()]);
    let addr = tokio::task::block_in_place(|| bin.listening_addr());
    let pid = bin.child.id();
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(plain_channel(addr).await);
    }
    health_check(channels[0].clone()).await.unwrap();
    let idle_rss = proc_memory(pid, "VmRSS:");

    // Everything at once: 200 uploads of distinct random 1 MiB blobs and 200
    // event streams of 512 events, spread over the connections.
    let started = std::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut blobs = Vec::new();
    for i in 0..CALLS {
        let blob = bytes::Bytes::from(random_bytes(BLOB_BYTES));
        blobs.push(BlobKey::of(&blob));
        let ch = channels[i % CONNECTIONS].clone();
        calls.spawn(async move {
            let result = tokio::time::timeout(CALL_LIMIT, write_blob(ch, blob)).await;
            (
                "Write",
                result.map(|r| r.map(|size| size == BLOB_BYTES as i64)),
            )
        });
        let ch = channels[(i + CONNECTIONS / 2) % CONNECTIONS].clone();
        let build = format!("flood-{i}-{:x}", rand_u64());
        calls.spawn(async move {
            let publish = publish_tool_stream(ch, build, EVENTS, random_bytes(EVENT_PAYLOAD));
            let result = tokio::time::timeout(CALL_LIMIT, publish).await;
            ("Publish", result.map(|r| r.map(|acked| acked == EVENTS)))
        });
    }
    let mut outcomes: std::collections::HashMap<(&str, Code), usize> = Default::default();
    let mut messages = Vec::new();
    while let Some(joined) = calls.join_next().await {
        let (rpc, result) = joined.unwrap();
        let code = match result {
            Err(_) => panic!("a {rpc} call got no answer within {CALL_LIMIT:?}"),
            Ok(Ok(complete)) => {
                assert!(complete, "{rpc} ended OK without storing everything");
                Code::Ok
            }
            Ok(Err(status)) => {
                messages.push(format!("{rpc}: {:?} {}", status.code(), status.message()));
                status.code()
            }
        };
        *outcomes.entry((rpc, code)).or_default() += 1;
    }
    let flood_time = started.elapsed();
    let peak = proc_memory(pid, "VmHWM:");
    eprintln!(
        "flood of {} calls answered in {flood_time:?}: {outcomes:?}; server RSS idle {} MiB, peak {} MiB",
        2 * CALLS,
        idle_rss / MIB,
        peak / MIB
    );

    // Uploads are stored, or refused at once when uploads in progress hold
    // the whole CAS budget (Bazel retries RESOURCE_EXHAUSTED). Event streams
    // are stored, or end when the store had to evict them to take newer
    // events (or, for a stream that alone outgrows the budget, when it is
    // full).
    for ((rpc, code), count) in &outcomes {
        let allowed = match *rpc {
            "Write" => matches!(code, Code::Ok | Code::ResourceExhausted),
            _ => matches!(
                code,
                Code::Ok | Code::FailedPrecondition | Code::ResourceExhausted
            ),
        };
        assert!(allowed, "{count} {rpc} calls ended {code:?}: {messages:#?}");
    }
    for m in &messages {
        assert!(
            (m.starts_with("Write: ResourceExhausted") && m.contains("CAS budget"))
                || (m.starts_with("Publish: FailedPrecondition") && m.contains("evicted"))
                || (m.starts_with("Publish: ResourceExhausted") && m.contains("max-bytes")),
            "{m}"
        );
    }
    assert!(outcomes.contains_key(&("Write", Code::Ok)), "{outcomes:?}");
    assert!(
        outcomes.contains_key(&("Publish", Code::Ok)),
        "{outcomes:?}"
    );

    // What the stores hold is within their budgets.
    let missing = re::content_addressable_storage_client::ContentAddressableStorageClient::new(
        channels[0].clone(),
    )
    .find_missing_blobs(re::FindMissingBlobsRequest {
        instance_name: "team-a".into(),
        blob_digests: blobs.iter().map(BlobKey::to_digest).collect(),
        digest_function: 0,
    })
    .await
    .unwrap()
    .into_inner()
    .missing_blob_digests
    .len();
    let held = (CALLS - missing) as u64;
    assert!(held * BLOB_BYTES as u64 <= CAS_BUDGET, "{held} blobs held");
    let mut chunks = gg::build_events_client::BuildEventsClient::new(channels[0].clone())
        .query_event_streams(gg::QueryEventStreamsRequest {
            build_id_pattern: "^flood-".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut event_bytes = 0;
    while let Some(chunk) = chunks.message().await.unwrap() {
        event_bytes += chunk
            .events
            .iter()
            .map(|e| prost::Message::encoded_len(e) as u64)
            .sum::<u64>();
    }
    assert!(
        event_bytes <= BES_BUDGET,
        "{event_bytes} bytes of events held"
    );
    eprintln!(
        "held afterwards: {held} blobs, {} KiB of build events",
        event_bytes / 1024
    );

    // The peak resident memory of the whole process: the budgets plus what
    // it takes besides them. Measured with this test (debug build, 2 cores,
    // the other tests of this file running beside it): 28 MiB idle, peaks of
    // 109-111 MiB, so 61-63 MiB over the 48 MiB of budgets: the idle process,
    // and the in-flight state of 400 streams on 8 connections (HTTP/2
    // windows of 1 MiB per connection, decode buffers, BES read-ahead,
    // allocator slack). Uploads alone peaked at 80 MiB, event streams alone
    // at 71 MiB. The bound allows about twice the measured overhead; a store
    // that kept every blob or every event (200 MiB each) cannot stay under it.
    const OVERHEAD: u64 = 120 * MIB;
    assert!(
        peak < CAS_BUDGET + BES_BUDGET + OVERHEAD,
        "peak RSS {} MiB over the budgets of {} MiB + {} MiB",
        peak / MIB,
        (CAS_BUDGET + BES_BUDGET) / MIB,
        OVERHEAD / MIB
    );

    // Still serving: a new blob is stored and read back whole, health answers.
    let last = bytes::Bytes::from(random_bytes(BLOB_BYTES));
    let size = write_blob(channels[1].clone(), last.clone()).await.unwrap();
    assert_eq!(size, BLOB_BYTES as i64);
    let key = BlobKey::of(&last);
    let mut read = bs::byte_stream_client::ByteStreamClient::new(channels[2].clone())
        .read(bs::ReadRequest {
            resource_name: format!("team-a/blobs/{}/{}", key.hex(), key.size),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(part) = read.message().await.unwrap() {
        back.extend_from_slice(&part.data);
    }
    assert!(back == last, "the blob read back differs");
    assert_eq!(
        health_check(plain_channel(addr).await).await.unwrap(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    drop(channels);
    bin.signal("TERM");
    let code = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(30)));
    assert_eq!(code, Some(0), "{:#?}", bin.seen);
}

/// After start-up the key server turns slow (each answer takes longer than
/// gridgate's fetch time limit): tokens of the keys already fetched keep
/// being accepted without waiting for it, a token naming an unknown `kid` is
/// refused within about the fetch time limit, and once the key server answers
/// again with a rotated key set, the new key is accepted and the old one no
/// longer is. Tokens signed by keys the issuer never published, or not signed
/// at all, are refused throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_key_server_after_start_up_keeps_cached_keys_working() {
    use jsonwebtoken::Algorithm;
    use jwks_server::{claims, unsigned_token, Behavior, JwksServer, TestKey};
    use std::time::Instant;

    // The time limit of one key set fetch (`JwksSettings::DEFAULT_TIMEOUT`;
    // the config has no key for it).
    const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
    // A call that needs no fetch is answered well within this.
    const PROMPT: Duration = Duration::from_secs(3);

    let k1 = TestKey::rsa(Algorithm::RS256, "k1");
    let k2 = TestKey::rsa(Algorithm::RS256, "k2");
    // Keys the issuer never publishes, under the kids it does use.
    let forged_k1 = TestKey::rsa(Algorithm::RS256, "k1");
    let forged_k2 = TestKey::rsa(Algorithm::RS256, "k2");
    let jwks = JwksServer::start(&[&k1]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gridgate.yaml");
    std::fs::write(
        &config,
        loopback_config(
            "",
            &format!(
                "authorization:\n  method: jwt\n  algorithm: rs256\n  jwks-url: \"{}\"\n  audience: gridgate\n  jwks-refetch-min-seconds: 1\ninstances:\n  - name: team-a\n    cas: {{ backend: memory, max-bytes: 1M }}\n",
                jwks.url()
            ),
        ),
    )
    .unwrap();
    let mut bin = Binary::start(&["serve", "--config", config.to_str().unwrap()]);
    let addr = tokio::task::block_in_place(|| bin.listening_addr());
    let ch = plain_channel(addr).await;

    // Each token has its own subject, so that none is answered from the
    // verified-token cache unless the test means it to be.
    let serial = std::sync::atomic::AtomicU64::new(0);
    let token = |key: &TestKey| {
        let n = serial.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        key.sign(&claims(
            "https://ci.example",
            "gridgate",
            &format!("ci-{n}"),
        ))
    };
    let unsigned = || {
        unsigned_token(
            &serde_json::json!({"alg": "none", "kid": "k1"}),
            &claims("https://ci.example", "gridgate", "nobody"),
            "",
        )
    };
    // FindMissingBlobs on team-a: OK once the Gate admits the caller.
    let call = |token: String| {
        let ch = ch.clone();
        async move {
            raw_unary(
                ch,
                FMB,
                bytes::Bytes::from_static(b"\x0a\x06team-a"),
                &[("authorization", format!("Bearer {token}"))],
            )
            .await
            .map(|_| ())
        }
    };
    let accepted = |token: String, what: &'static str| {
        let call = call(token);
        async move {
            tokio::time::timeout(PROMPT, call)
                .await
                .unwrap_or_else(|_| panic!("{what}: not answered within {PROMPT:?}"))
                .unwrap_or_else(|e| panic!("{what}: refused: {e:?}"));
        }
    };
    let refused = |token: String, what: &'static str| {
        let call = call(token);
        async move {
            let e = tokio::time::timeout(PROMPT, call)
                .await
                .unwrap_or_else(|_| panic!("{what}: not answered within {PROMPT:?}"))
                .expect_err(what);
            assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        }
    };

    // Start-up: health is SERVING once the key set has arrived. (Waiting on
    // health rather than on a token: a token refused before that would spend
    // the rate-limited refetch the unknown kid below is meant to trigger.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while health_check(ch.clone()).await.ok()
        != Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    {
        assert!(Instant::now() < deadline, "keys never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cached = token(&k1);
    accepted(cached.clone(), "k1 token").await;
    refused(token(&forged_k1), "forged k1 token").await;
    refused(unsigned(), "unsigned token").await;

    // The key server turns slow. Unknown kids (k2 is not published yet, the
    // forged one never will be) trigger one fetch, which they share.
    jwks.set_behavior(Behavior::Delay(FETCH_TIMEOUT * 3));
    let fetches_before = jwks.requests();
    let slow_started = Instant::now();
    let unknown = tokio::spawn(call(token(&k2)));
    let forged_unknown = tokio::spawn(call(token(&forged_k2)));
    assert!(
        jwks.wait_for_requests(fetches_before + 1, Duration::from_secs(10))
            .await,
        "an unknown kid triggers a fetch"
    );
    // While that fetch hangs, the cached key is used without waiting for it.
    accepted(token(&k1), "k1 token during a slow fetch").await;
    assert!(
        !unknown.is_finished(),
        "the fetch ended before its time limit: {:?}",
        slow_started.elapsed()
    );
    accepted(cached.clone(), "cached k1 token during a slow fetch").await;
    refused(token(&forged_k1), "forged k1 token during a slow fetch").await;
    refused(unsigned(), "unsigned token during a slow fetch").await;
    for (task, what) in [(unknown, "k2 token"), (forged_unknown, "forged k2 token")] {
        let e = tokio::time::timeout(FETCH_TIMEOUT * 2, task)
            .await
            .unwrap_or_else(|_| panic!("{what}: held by the slow fetch"))
            .unwrap()
            .expect_err(what);
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        let waited = slow_started.elapsed();
        eprintln!(
            "{what} with an unknown kid refused after {waited:?}: {}",
            e.message()
        );
        assert!(
            waited < FETCH_TIMEOUT + Duration::from_secs(5),
            "{what}: held {waited:?}"
        );
    }
    assert_eq!(
        jwks.requests(),
        fetches_before + 1,
        "the two unknown kids shared one fetch"
    );
    // The fetch failed; the keys fetched before are kept.
    accepted(token(&k1), "k1 token after a failed fetch").await;
    accepted(cached.clone(), "cached k1 token after a failed fetch").await;

    // The issuer rotates to k2 and the key server is fast again: a k2 token
    // brings the new key set (at most one refetch a second).
    jwks.set_keys(&[&k2]);
    jwks.set_behavior(Behavior::Serve);
    let rotated = Instant::now();
    let deadline = rotated + Duration::from_secs(30);
    while let Err(e) = call(token(&k2)).await {
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(
            Instant::now() < deadline,
            "the rotated key was never accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("rotated key accepted after {:?}", rotated.elapsed());
    accepted(token(&k2), "k2 token").await;
    // k1 left the key set: its tokens, cached ones included, are refused.
    refused(cached, "cached k1 token after the rotation").await;
    refused(token(&k1), "k1 token after the rotation").await;
    refused(token(&forged_k2), "forged k2 token").await;
    refused(token(&forged_k1), "forged k1 token").await;
    refused(unsigned(), "unsigned token").await;

    bin.signal("TERM");
    let code = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    assert_eq!(code, Some(0), "{:#?}", bin.seen);
}
