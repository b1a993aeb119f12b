//! One view of every message: what the Gate decoded and authorized is exactly
//! what the service or the upstream receives. The upstream here is a
//! recording gRPC server that decodes what it is sent the way grpc-js, Java,
//! Go and Python do (every gzip member), so a request that shows the Gate
//! one instance and the upstream another would be seen.

mod common;
#[path = "common/jwks_server.rs"]
mod jwks_server;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http_body::Frame;
use http_body_util::BodyExt;
use jsonwebtoken::Algorithm;
use jwks_server::{claims, TestKey};
use prost::Message;
use tonic::Code;

use gridgate::proto::build::bazel::remote::execution::v2 as re;
use gridgate::proto::google::bytestream as bs;
use gridgate::proto::google::devtools::build::v1 as bes;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-hs256";
const BATCH_READ: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs";
const WRITE: &str = "/google.bytestream.ByteStream/Write";
const LIFECYCLE: &str = "/google.devtools.build.v1.PublishBuildEvent/PublishLifecycleEvent";

/// One request as the recording upstream saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    /// The `:authority` the upstream was sent.
    authority: String,
    headers: http::HeaderMap,
    /// Every message, decoded as grpc-js would (all gzip members).
    messages: Vec<Vec<u8>>,
    /// Whether any message arrived compressed.
    compressed: bool,
    trailers: Option<http::HeaderMap>,
}

/// A gRPC server on loopback that records every request and answers each
/// with one empty message and status OK.
struct Recorder {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let log = log.clone();
                            async move {
                                let (parts, mut body) = req.into_parts();
                                let gzip = parts
                                    .headers
                                    .get("grpc-encoding")
                                    .is_some_and(|v| v == "gzip");
                                let mut raw = Vec::new();
                                let mut trailers = None;
                                while let Some(frame) = body.frame().await {
                                    let Ok(frame) = frame else { break };
                                    match frame.into_data() {
                                        Ok(d) => raw.extend_from_slice(&d),
                                        Err(f) => trailers = f.into_trailers().ok(),
                                    }
                                }
                                let (mut messages, mut compressed, mut pos) =
                                    (Vec::new(), false, 0);
                                while raw.len() >= pos + 5 {
                                    let len = u32::from_be_bytes(
                                        raw[pos + 1..pos + 5].try_into().unwrap(),
                                    ) as usize;
                                    if raw.len() < pos + 5 + len {
                                        break;
                                    }
                                    let payload = &raw[pos + 5..pos + 5 + len];
                                    if raw[pos] == 1 && gzip {
                                        compressed = true;
                                        let mut out = Vec::new();
                                        flate2::read::MultiGzDecoder::new(payload)
                                            .read_to_end(&mut out)
                                            .unwrap();
                                        messages.push(out);
                                    } else {
                                        messages.push(payload.to_vec());
                                    }
                                    pos += 5 + len;
                                }
                                log.lock().unwrap().push(Seen {
                                    path: parts.uri.path().to_string(),
                                    authority: parts
                                        .uri
                                        .authority()
                                        .map(|a| a.to_string())
                                        .unwrap_or_default(),
                                    headers: parts.headers,
                                    messages,
                                    compressed,
                                    trailers,
                                });
                                let mut end = http::HeaderMap::new();
                                end.insert("grpc-status", "0".parse().unwrap());
                                // Execute answers with an Operation of 200 KB
                                // (its metadata), so that rewriting its name on
                                // the way back meets the message limit.
                                let reply = if parts.uri.path().ends_with("/Execute") {
                                    let op = gridgate::proto::google::longrunning::Operation {
                                        name: "main/op-1".into(),
                                        metadata: Some(prost_types::Any {
                                            type_url: "type.googleapis.com/x".into(),
                                            value: vec![7; 200_000],
                                        }),
                                        done: false,
                                        result: None,
                                    };
                                    Bytes::from(framed(false, &op.encode_to_vec()))
                                } else {
                                    Bytes::from_static(&[0, 0, 0, 0, 0])
                                };
                                let frames = vec![
                                    Ok::<_, std::convert::Infallible>(Frame::data(reply)),
                                    Ok(Frame::trailers(end)),
                                ];
                                let body = http_body_util::StreamBody::new(
                                    futures_util::stream::iter(frames),
                                );
                                Ok::<_, std::convert::Infallible>(
                                    http::Response::builder()
                                        .header("content-type", "application/grpc")
                                        .body(body)
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
                });
            }
        });
        Recorder { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The instance names (field 1 of REAPI requests, the prefix of
    /// ByteStream resource names) in every message the upstream decoded.
    fn instances(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.seen() {
            for m in &s.messages {
                if s.path == WRITE {
                    let w = bs::WriteRequest::decode(&m[..]).unwrap();
                    if !w.resource_name.is_empty() {
                        out.push(w.resource_name.split('/').next().unwrap().to_string());
                    }
                } else {
                    out.push(
                        re::BatchReadBlobsRequest::decode(&m[..])
                            .unwrap()
                            .instance_name,
                    );
                }
            }
        }
        out
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn framed(compressed: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(compressed)];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn batch_read(instance: &str) -> Vec<u8> {
    re::BatchReadBlobsRequest {
        instance_name: instance.into(),
        digests: vec![re::Digest {
            hash: "a".repeat(64),
            size_bytes: 3,
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

/// Two gzip members in one compressed message: the first names `shown`, the
/// second `hidden` (a decoder that reads every member takes the second).
fn two_members(shown: Vec<u8>, hidden: Vec<u8>) -> Vec<u8> {
    let mut both = gzip(&shown);
    both.extend(gzip(&hidden));
    both
}

/// Sends one raw gRPC request (body frames as given, trailers too) and
/// returns its grpc-status and message.
async fn call(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    chunks: Vec<Vec<u8>>,
    trailers: Option<http::HeaderMap>,
) -> (Code, String) {
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
    let mut frames: Vec<Result<Frame<Bytes>, tonic::Status>> = chunks
        .into_iter()
        .map(|c| Ok(Frame::data(Bytes::from(c))))
        .collect();
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    let body = tonic::body::Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )));
    let resp = ch
        .ready()
        .await
        .unwrap()
        .call(req.body(body).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let status_of = |h: &http::HeaderMap| {
        let code = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
        let msg = h
            .get("grpc-message")
            .map(|m| percent_decode(m.as_bytes()))
            .unwrap_or_default();
        Some((Code::from_i32(code), msg))
    };
    if let Some(s) = status_of(&parts.headers) {
        return s;
    }
    match body.collect().await {
        Ok(c) => c
            .trailers()
            .and_then(status_of)
            .unwrap_or((Code::Unknown, "no grpc-status".into())),
        Err(e) => (e.code(), e.message().to_string()),
    }
}

/// grpc-message is percent-encoded.
fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' && i + 2 < v.len() {
            if let Ok(b) =
                u8::from_str_radix(std::str::from_utf8(&v[i + 1..i + 3]).unwrap_or("zz"), 16)
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(v[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Setup {
    _dir: tempfile::TempDir,
    upstream: Recorder,
    server: TestServer,
    token: String,
}

/// gridgate with instances `x`, `y` and `public` forwarded to one recording
/// upstream; the caller `ci` may BatchReadBlobs, Write and publish build
/// events on `x` only; anonymous callers may BatchReadBlobs on `public`.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Recorder::start().await;
    std::fs::write(dir.path().join("hmac.secret"), SECRET).unwrap();
    std::fs::write(
        dir.path().join("acl.yaml"),
        "x:\n  allow:\n    - subject: ci\n      requests: [BatchReadBlobs, Write, PublishLifecycleEvent]\npublic:\n  allow:\n    - requests: [BatchReadBlobs]\n",
    )
    .unwrap();
    let up = format!(
        "    upstream: {{ address: \"grpc://{}\" }}\n",
        upstream.addr
    );
    let yaml = loopback_config(
        "",
        &format!(
            "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  audience: gridgate\n  acl-config: acl.yaml\n  allow-unauthenticated-instances: [public]\ninstances:\n  - name: x\n{up}  - name: y\n{up}  - name: public\n{up}  - name: team-a\n    cas: {{ backend: memory }}\n"
        ),
    );
    let server = TestServer::start(&yaml, dir.path()).await;
    let token = TestKey::hmac(Algorithm::HS256, SECRET).sign(&claims(
        "https://ci.example",
        "gridgate",
        "ci",
    ));
    Setup {
        _dir: dir,
        upstream,
        server,
        token,
    }
}

fn bearer(token: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {token}"))
}

/// A gzip message of two members, the first naming an instance the caller
/// may use and the second another: refused (INVALID_ARGUMENT) on a unary
/// route, for an authenticated caller and an anonymous one, and nothing
/// reaches the upstream; an honest gzip request goes through, decoded.
#[tokio::test]
async fn a_second_gzip_member_never_reaches_another_instance() {
    let s = setup().await;
    let addr = s.server.tcp();
    let gz = ("grpc-encoding", "gzip".to_string());

    let smuggled = two_members(batch_read("x"), batch_read("y"));
    let (code, msg) = call(
        addr,
        BATCH_READ,
        &[bearer(&s.token), gz.clone()],
        vec![framed(true, &smuggled)],
        None,
    )
    .await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("after its end"), "{msg}");

    let anonymous = two_members(batch_read("public"), batch_read("y"));
    let (code, msg) = call(
        addr,
        BATCH_READ,
        std::slice::from_ref(&gz),
        vec![framed(true, &anonymous)],
        None,
    )
    .await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    // Trailing bytes after one member are refused the same way.
    let mut trailing = gzip(&batch_read("x"));
    trailing.extend_from_slice(b"\x0a\x01y");
    let (code, msg) = call(
        addr,
        BATCH_READ,
        &[bearer(&s.token), gz.clone()],
        vec![framed(true, &trailing)],
        None,
    )
    .await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(
        s.upstream.seen().is_empty(),
        "the upstream saw {:?}",
        s.upstream.seen()
    );

    // An honest compressed request reaches the upstream as the Gate decoded it.
    let (code, msg) = call(
        addr,
        BATCH_READ,
        &[bearer(&s.token), gz.clone()],
        vec![framed(true, &gzip(&batch_read("x")))],
        None,
    )
    .await;
    assert_eq!(code, Code::Ok, "{msg}");
    let (code, msg) = call(
        addr,
        BATCH_READ,
        &[gz],
        vec![framed(true, &gzip(&batch_read("public")))],
        None,
    )
    .await;
    assert_eq!(code, Code::Ok, "{msg}");
    assert_eq!(s.upstream.instances(), ["x", "public"]);
    assert!(
        s.upstream.seen().iter().all(|r| !r.compressed),
        "forwarded as decoded (uncompressed)"
    );
    s.server.stop().await;
}

/// A ByteStream Write admitted for `x` whose later message is two gzip
/// members (the second naming `y`'s upload) ends INVALID_ARGUMENT, and no
/// message naming `y` ever reaches the upstream.
#[tokio::test]
async fn a_write_cannot_smuggle_a_later_message_into_another_instance() {
    let s = setup().await;
    let addr = s.server.tcp();
    let hash = "b".repeat(64);
    let first = bs::WriteRequest {
        resource_name: format!("x/uploads/00000000-0000-0000-0000-000000000001/blobs/{hash}/6"),
        write_offset: 0,
        finish_write: false,
        data: Bytes::from_static(b"abc"),
    }
    .encode_to_vec();
    let shown = bs::WriteRequest {
        write_offset: 3,
        finish_write: true,
        data: Bytes::from_static(b"def"),
        ..Default::default()
    }
    .encode_to_vec();
    let hidden = bs::WriteRequest {
        resource_name: format!("y/uploads/00000000-0000-0000-0000-000000000002/blobs/{hash}/6"),
        write_offset: 3,
        finish_write: true,
        data: Bytes::from_static(b"def"),
    }
    .encode_to_vec();
    let (code, msg) = call(
        addr,
        WRITE,
        &[bearer(&s.token), ("grpc-encoding", "gzip".into())],
        vec![
            framed(false, &first),
            framed(true, &two_members(shown, hidden)),
        ],
        None,
    )
    .await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    let instances = s.upstream.instances();
    assert!(
        !instances.iter().any(|i| i == "y"),
        "the upstream saw a message for y: {instances:?}"
    );
    s.server.stop().await;
}

/// A build event published with two gzip members (the second naming another
/// team's project) is refused, and nothing of it is stored.
#[tokio::test]
async fn a_build_event_cannot_smuggle_another_project() {
    let s = setup().await;
    let addr = s.server.tcp();
    let event = |project: &str| {
        bes::PublishLifecycleEventRequest {
            project_id: project.into(),
            build_event: Some(bes::OrderedBuildEvent {
                stream_id: Some(bes::StreamId {
                    build_id: "smuggled-build".into(),
                    invocation_id: String::new(),
                    component: 1,
                }),
                sequence_number: 1,
                event: Some(bes::BuildEvent {
                    event_time: Some(prost_types::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 0,
                    }),
                    event: Some(bes::build_event::Event::BuildEnqueued(
                        bes::build_event::BuildEnqueued { details: None },
                    )),
                }),
            }),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let smuggled = two_members(event("x"), event("y"));
    let (code, msg) = call(
        addr,
        LIFECYCLE,
        &[bearer(&s.token), ("grpc-encoding", "gzip".into())],
        vec![framed(true, &smuggled)],
        None,
    )
    .await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    // The same event, honestly compressed, is taken.
    let (code, msg) = call(
        addr,
        LIFECYCLE,
        &[bearer(&s.token), ("grpc-encoding", "gzip".into())],
        vec![framed(true, &gzip(&event("x")))],
        None,
    )
    .await;
    assert_eq!(code, Code::Ok, "{msg}");
    s.server.stop().await;
}

/// A unary call with a second message is INVALID_ARGUMENT and nothing of
/// it is forwarded, whether the second message arrives with the first or after.
#[tokio::test]
async fn a_unary_call_with_a_second_message_is_refused_whole() {
    let s = setup().await;
    let addr = s.server.tcp();
    for chunks in [
        vec![[
            framed(false, &batch_read("x")),
            framed(false, &batch_read("y")),
        ]
        .concat()],
        vec![
            framed(false, &batch_read("x")),
            framed(false, &batch_read("y")),
        ],
        vec![framed(false, &batch_read("x")), vec![0, 0]],
    ] {
        let (code, msg) = call(addr, BATCH_READ, &[bearer(&s.token)], chunks, None).await;
        assert_eq!(code, Code::InvalidArgument, "{msg}");
    }
    assert!(
        s.upstream.seen().is_empty(),
        "the upstream saw {:?}",
        s.upstream.seen()
    );
    s.server.stop().await;
}

/// HTTP/2 request trailers (which tonic would merge into the metadata) are
/// refused on every route, local and upstream, and never forwarded.
#[tokio::test]
async fn request_trailers_are_refused_and_never_forwarded() {
    let s = setup().await;
    let addr = s.server.tcp();
    let forged = || {
        let mut t = http::HeaderMap::new();
        t.insert("authorization", "Bearer stolen".parse().unwrap());
        t.insert("x-request-actor", "admin".parse().unwrap());
        t.insert("x-request-subject", "admin".parse().unwrap());
        t
    };
    // Upstream route.
    let (code, msg) = call(
        addr,
        BATCH_READ,
        &[bearer(&s.token)],
        vec![framed(false, &batch_read("x"))],
        Some(forged()),
    )
    .await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    // An upstream client stream: the message before the trailers may pass,
    // the trailers never do.
    let write = bs::WriteRequest {
        resource_name: format!(
            "x/uploads/00000000-0000-0000-0000-000000000003/blobs/{}/3",
            "c".repeat(64)
        ),
        finish_write: true,
        data: Bytes::from_static(b"abc"),
        ..Default::default()
    }
    .encode_to_vec();
    let (code, msg) = call(
        addr,
        WRITE,
        &[bearer(&s.token)],
        vec![framed(false, &write)],
        Some(forged()),
    )
    .await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    for seen in s.upstream.seen() {
        assert!(
            seen.trailers.is_none(),
            "trailers reached the upstream: {seen:?}"
        );
        assert_ne!(
            seen.headers.get("x-request-actor").map(|v| v.as_bytes()),
            Some(&b"admin"[..])
        );
    }
    // Local routes: a CAS instance, and the open health route.
    let fmb = re::FindMissingBlobsRequest {
        instance_name: "team-a".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let (code, msg) = call(
        addr,
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
        &[bearer(&s.token)],
        vec![framed(false, &fmb)],
        Some(forged()),
    )
    .await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    let (code, msg) = call(
        addr,
        "/grpc.health.v1.Health/Check",
        &[],
        vec![framed(false, b"")],
        Some(forged()),
    )
    .await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    s.server.stop().await;
}

/// Every message on every path is held to `limits.max-message-bytes`,
/// later messages of a client stream and messages on a rewritten upstream
/// instance included.
#[tokio::test]
async fn later_and_rewritten_messages_are_held_to_the_message_limit() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Recorder::start().await;
    let yaml = loopback_config(
        "",
        &format!(
            "authorization:\n  method: none\nlimits:\n  max-message-bytes: 65536\n  max-pending-bytes: 1M\n  max-pending-bytes-per-connection: 1M\ninstances:\n  - name: x\n    upstream: {{ address: \"grpc://{}\", instance-name: main }}\n",
            upstream.addr
        ),
    );
    let server = TestServer::start(&yaml, dir.path()).await;
    let hash = "d".repeat(64);
    let msg = |offset: i64, data: Vec<u8>, name: bool| {
        bs::WriteRequest {
            resource_name: if name {
                format!("x/uploads/00000000-0000-0000-0000-000000000004/blobs/{hash}/200000")
            } else {
                String::new()
            },
            write_offset: offset,
            finish_write: false,
            data: data.into(),
        }
        .encode_to_vec()
    };
    let (code, text) = call(
        server.tcp(),
        WRITE,
        &[],
        vec![
            framed(false, &msg(0, vec![1; 1000], true)),
            framed(false, &msg(1000, vec![2; 100_000], false)),
        ],
        None,
    )
    .await;
    assert_eq!(code, Code::ResourceExhausted, "{text}");
    assert!(text.contains("limits.max-message-bytes"), "{text}");
    // The upstream never saw the large message.
    for seen in upstream.seen() {
        assert!(
            seen.messages.iter().all(|m| m.len() <= 65536),
            "{:?}",
            seen.messages.len()
        );
    }
    // A compressed later message that decompresses past the limit.
    let (code, text) = call(
        server.tcp(),
        WRITE,
        &[("grpc-encoding", "gzip".into())],
        vec![
            framed(false, &msg(0, vec![1; 1000], true)),
            framed(true, &gzip(&msg(1000, vec![0; 200_000], false))),
        ],
        None,
    )
    .await;
    assert_eq!(code, Code::ResourceExhausted, "{text}");
    // A response message of the rewritten instance over the limit (an
    // Operation of 200 KB coming back from Execute) is refused too, not
    // buffered whole.
    let execute = re::ExecuteRequest {
        instance_name: "x".into(),
        ..Default::default()
    }
    .encode_to_vec();
    let (code, text) = call(
        server.tcp(),
        "/build.bazel.remote.execution.v2.Execution/Execute",
        &[],
        vec![framed(false, &execute)],
        None,
    )
    .await;
    assert_eq!(code, Code::ResourceExhausted, "{text}");
    server.stop().await;
}

/// User-info in an upstream address is never sent upstream (it would go in
/// `:authority`).
#[tokio::test]
async fn upstream_user_info_is_never_sent() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Recorder::start().await;
    let yaml = loopback_config(
        "",
        &format!(
            "authorization:\n  method: none\ninstances:\n  - name: x\n    upstream: {{ address: \"grpc://builder:hunter2@{}\" }}\n",
            upstream.addr
        ),
    );
    let server = TestServer::start(&yaml, dir.path()).await;
    let (code, msg) = call(
        server.tcp(),
        BATCH_READ,
        &[],
        vec![framed(false, &batch_read("x"))],
        None,
    )
    .await;
    assert_eq!(code, Code::Ok, "{msg}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].authority.contains("hunter2") && !seen[0].authority.contains('@'),
        "{:?}",
        seen[0].authority
    );
    assert!(seen[0]
        .headers
        .values()
        .all(|v| !String::from_utf8_lossy(v.as_bytes()).contains("hunter2")));
    server.stop().await;
}
