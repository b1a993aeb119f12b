//! Upstream instances: `Upstream` forwarding to a second gridgate, to a
//! recording server, to nothing, over TLS, and to a real BuildGrid 0.4.4.
//! The tonic clients are built directly over `Upstream` (a tower service).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bs::byte_stream_client::ByteStreamClient;
use bytes::Bytes;
use common::buildgrid::BuildGrid;
use common::{loopback_config, Certs, TestServer};
use gridgate::config::UpstreamConfig;
use gridgate::gate::admission::Admission;
use gridgate::gate::identity::Identity;
use gridgate::proto::build::bazel::remote::execution::v2 as re;
use gridgate::proto::google::bytestream as bs;
use gridgate::proto::google::longrunning as lro;
use gridgate::reapi::digest::BlobKey;
use gridgate::reapi::upstream::Upstream;
use re::action_cache_client::ActionCacheClient;
use re::capabilities_client::CapabilitiesClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::{Code, Request, Response, Status};

const MIB: usize = 1024 * 1024;

fn upstream_cfg(address: String) -> UpstreamConfig {
    UpstreamConfig {
        address,
        tls: false,
        tls_ca: None,
        tls_client_cert: None,
        tls_client_key: None,
        headers: BTreeMap::new(),
        instance_name: None,
    }
}

fn local_yaml(instance: &str) -> String {
    loopback_config(
        "",
        &format!(
            "authorization:\n  method: none\ninstances:\n  - name: \"{instance}\"\n    cas: {{ backend: memory, max-bytes: 64M }}\n"
        ),
    )
}

fn blob(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn digest(data: &[u8]) -> re::Digest {
    BlobKey::of(data).to_digest()
}

/// Upload, read back, find, batch and action-cache round trips through `up`
/// on instance `instance`.
async fn round_trips(up: Upstream, instance: &str) {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    let caps = CapabilitiesClient::new(up.clone())
        .get_capabilities(re::GetCapabilitiesRequest {
            instance_name: instance.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(caps.cache_capabilities.is_some());

    // ByteStream: a 3 MiB blob in 64 KiB messages, then read back.
    let data = blob(3 * MIB + 5, 1);
    let k = BlobKey::of(&data);
    let wname = format!(
        "{prefix}uploads/6d1c1b7e-0000-4000-8000-000000000001/blobs/{}/{}",
        k.hex(),
        k.size
    );
    let reqs: Vec<bs::WriteRequest> = data
        .chunks(64 * 1024)
        .enumerate()
        .map(|(i, c)| bs::WriteRequest {
            resource_name: if i == 0 { wname.clone() } else { String::new() },
            write_offset: (i * 64 * 1024) as i64,
            finish_write: (i + 1) * 64 * 1024 >= data.len(),
            data: Bytes::copy_from_slice(c),
        })
        .collect();
    let mut bsc = ByteStreamClient::new(up.clone());
    let committed = bsc
        .write(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(committed.committed_size, data.len() as i64);
    let mut s = bsc
        .read(bs::ReadRequest {
            resource_name: format!("{prefix}blobs/{}/{}", k.hex(), k.size),
            read_offset: 0,
            read_limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut back = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        back.extend_from_slice(&m.data);
    }
    assert!(
        back == data,
        "read back {} bytes, wrote {}",
        back.len(),
        data.len()
    );

    // Errors (statuses in trailers) pass through.
    let absent = blob(10, 99);
    let ak = BlobKey::of(&absent);
    let err = async {
        let mut s = bsc
            .read(bs::ReadRequest {
                resource_name: format!("{prefix}blobs/{}/{}", ak.hex(), ak.size),
                read_offset: 0,
                read_limit: 0,
            })
            .await?
            .into_inner();
        while s.message().await?.is_some() {}
        Ok::<(), Status>(())
    }
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // CAS batches.
    let mut cas = ContentAddressableStorageClient::new(up.clone());
    let small = blob(1000, 2);
    let resp = cas
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests: vec![re::batch_update_blobs_request::Request {
                digest: Some(digest(&small)),
                data: small.clone().into(),
                compressor: 0,
            }],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].status.as_ref().map(|s| s.code), Some(0));
    let missing = cas
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: vec![digest(&small), digest(&data), digest(&absent)],
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing, vec![digest(&absent)]);
    let read = cas
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: instance.into(),
            digests: vec![digest(&small)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.responses[0].data, small);

    // Action cache.
    let mut ac = ActionCacheClient::new(up.clone());
    let action = digest(b"an action for the upstream");
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out".into(),
            digest: Some(digest(&small)),
            ..Default::default()
        }],
        exit_code: 0,
        ..Default::default()
    };
    ac.update_action_result(re::UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.clone()),
        action_result: Some(result.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    let got = ac
        .get_action_result(re::GetActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.output_files, result.output_files);
}

#[tokio::test]
async fn forwards_to_a_second_gridgate() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestServer::start(&local_yaml("main"), dir.path()).await;
    let up = Upstream::new("main", &upstream_cfg(format!("grpc://{}", b.tcp()))).unwrap();
    round_trips(up, "main").await;
    b.stop().await;
}

#[tokio::test]
async fn rewrites_the_instance_name() {
    let dir = tempfile::tempdir().unwrap();
    // The upstream only knows "main" (and then only ""); callers say "team-a".
    let b = TestServer::start(&local_yaml("main"), dir.path()).await;
    let mut cfg = upstream_cfg(format!("grpc://{}", b.tcp()));
    cfg.instance_name = Some("main".into());
    round_trips(Upstream::new("team-a", &cfg).unwrap(), "team-a").await;
    b.stop().await;

    let b = TestServer::start(&local_yaml(""), dir.path()).await;
    let mut cfg = upstream_cfg(format!("grpc://{}", b.tcp()));
    cfg.instance_name = Some(String::new());
    round_trips(Upstream::new("team-a", &cfg).unwrap(), "team-a").await;
    b.stop().await;
}

#[tokio::test]
async fn forwards_over_mtls() {
    let certs = Certs::new();
    let yaml = loopback_config(
        &certs.credentials_yaml(true),
        "authorization:\n  method: none\ninstances:\n  - name: main\n    cas: { backend: memory, max-bytes: 64M }\n",
    );
    let b = TestServer::start(&yaml, certs.dir.path()).await;
    let mut cfg = upstream_cfg(format!("grpcs://localhost:{}", b.tcp().port()));
    cfg.tls = true;
    cfg.tls_ca = Some(certs.ca.clone());
    cfg.tls_client_cert = Some(certs.client_cert.clone());
    cfg.tls_client_key = Some(certs.client_key.clone());
    round_trips(Upstream::new("main", &cfg).unwrap(), "main").await;

    // Without the client certificate the upstream refuses the handshake.
    cfg.tls_client_cert = None;
    cfg.tls_client_key = None;
    let err = CapabilitiesClient::new(Upstream::new("main", &cfg).unwrap())
        .get_capabilities(re::GetCapabilitiesRequest {
            instance_name: "main".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    b.stop().await;
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn an_unreachable_upstream_is_unavailable_without_its_address() {
    let port = closed_port();
    let address = format!("grpc://builder:hunter2@127.0.0.1:{port}");
    let up = Upstream::new("x", &upstream_cfg(address)).unwrap();
    assert_eq!(up.shown_address(), format!("grpc://127.0.0.1:{port}"));
    let err = CapabilitiesClient::new(up)
        .get_capabilities(re::GetCapabilitiesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(err.message(), "upstream for instance x unavailable");
}

/// The real server, an anonymous caller and an upstream that is down: the
/// caller learns the instance only; the server's log has the address without
/// its user-info, and so have `check-config` and a refused config.
#[tokio::test]
async fn an_anonymous_caller_learns_nothing_of_an_unreachable_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let port = closed_port();
    let yaml = loopback_config(
        "",
        &format!(
            "authorization:\n  method: none\ninstances:\n  - name: prod\n    upstream:\n      address: \"grpc://builder:hunter2@127.0.0.1:{port}\"\n"
        ),
    );
    let path = dir.path().join("gridgate.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let path = path.display().to_string();

    let (code, stdout, stderr) = common::run_binary(&["check-config", &path]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(&format!(
            "instance \"prod\": upstream grpc://127.0.0.1:{port}"
        )),
        "{stdout}"
    );
    assert!(
        !stdout.contains("hunter2") && !stdout.contains("builder"),
        "{stdout}"
    );

    let mut server = common::Binary::start(&["serve", "--config", &path]);
    let addr = server.listening_addr();
    let channel = common::plain_channel(addr).await;
    let err = CapabilitiesClient::new(channel)
        .get_capabilities(re::GetCapabilitiesRequest {
            instance_name: "prod".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "upstream for instance prod unavailable");
    let line = server
        .wait_for_line("upstream request failed", Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no log line; stderr: {:#?}", server.seen));
    assert!(line.contains(&format!("grpc://127.0.0.1:{port}")), "{line}");
    assert!(line.contains("prod"), "{line}");
    server.signal("KILL");
    server.wait_exit(Duration::from_secs(10));
    for line in &server.seen {
        assert!(
            !line.contains("hunter2") && !line.contains("builder"),
            "{line}"
        );
    }

    // A refused config names the address without its user-info too.
    std::fs::write(
        &path,
        yaml.replace("grpc://builder:hunter2@", "builder:hunter2@"),
    )
    .unwrap();
    let (code, _, stderr) = common::run_binary(&["check-config", &path]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!(
            "instances[0].upstream.address: \"127.0.0.1:{port}\" needs a scheme"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// A Capabilities server that reports the headers it received (in the error
/// message) and, for instance "slow", never answers.
struct Recorder;

#[tonic::async_trait]
impl re::capabilities_server::Capabilities for Recorder {
    async fn get_capabilities(
        &self,
        request: Request<re::GetCapabilitiesRequest>,
    ) -> Result<Response<re::ServerCapabilities>, Status> {
        if request.get_ref().instance_name == "slow" {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        let mut seen: Vec<String> = request
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some(format!("{}={}", k.as_str(), v.to_str().unwrap_or("?")))
                }
                _ => None,
            })
            .collect();
        seen.sort();
        Err(Status::failed_precondition(seen.join(";")))
    }
}

#[tokio::test]
async fn headers_deadlines_and_identity() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(re::capabilities_server::CapabilitiesServer::new(Recorder))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut cfg = upstream_cfg(format!("grpc://{addr}"));
    cfg.headers
        .insert("x-service-token".into(), "s3cret".into());
    let up = Upstream::new("team-a", &cfg).unwrap();

    let mut req = Request::new(re::GetCapabilitiesRequest {
        instance_name: "team-a".into(),
    });
    req.metadata_mut()
        .insert("authorization", "Bearer caller-token".parse().unwrap());
    req.metadata_mut()
        .insert("x-request-actor", "forged".parse().unwrap());
    req.metadata_mut()
        .insert("x-other", "kept".parse().unwrap());
    let err = CapabilitiesClient::new(up.clone())
        .get_capabilities(req)
        .await
        .unwrap_err();
    let seen = err.message().to_string();
    assert!(seen.contains("x-service-token=s3cret"), "{seen}");
    assert!(seen.contains("x-other=kept"), "{seen}");
    assert!(!seen.contains("authorization"), "{seen}");
    assert!(!seen.contains("forged"), "{seen}");

    // With an admission, its identity is presented.
    let mut req = Request::new(re::GetCapabilitiesRequest {
        instance_name: "team-a".into(),
    });
    let mut identity = Identity::anonymous(None);
    identity.actor = Some("ci-bot".into());
    identity.subject = Some("repo:org/app".into());
    identity.workflow = Some("build".into());
    let mut admission = Admission::anonymous_allow_all(Some("team-a".into()), "GetCapabilities");
    admission.identity = std::sync::Arc::new(identity);
    req.extensions_mut().insert(admission);
    req.metadata_mut()
        .insert("x-request-actor", "forged".parse().unwrap());
    let err = CapabilitiesClient::new(up.clone())
        .get_capabilities(req)
        .await
        .unwrap_err();
    let seen = err.message().to_string();
    assert!(seen.contains("x-request-actor=ci-bot"), "{seen}");
    assert!(seen.contains("x-request-subject=repo:org/app"), "{seen}");
    assert!(seen.contains("x-request-workflow=build"), "{seen}");
    assert!(!seen.contains("forged"), "{seen}");

    // The caller's deadline applies.
    let mut req = Request::new(re::GetCapabilitiesRequest {
        instance_name: "slow".into(),
    });
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let err = CapabilitiesClient::new(up)
        .get_capabilities(req)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(
        err.message(),
        "upstream for instance team-a did not answer before the deadline"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    server.abort();
}

#[tokio::test]
async fn buildgrid_as_the_upstream() {
    let Some(bg) = tokio::task::spawn_blocking(|| BuildGrid::start(&["main"]))
        .await
        .unwrap()
    else {
        return;
    };
    // Same name on both sides.
    round_trips(
        Upstream::new("main", &upstream_cfg(bg.address())).unwrap(),
        "main",
    )
    .await;
    // A public name rewritten to BuildGrid's.
    let mut cfg = upstream_cfg(bg.address());
    cfg.instance_name = Some("main".into());
    round_trips(Upstream::new("team-a", &cfg).unwrap(), "team-a").await;
    drop(bg);
}

/// An upstream serving Execution and Operations for its instance `main`: it
/// names operations `main/op-N`, records every name it is asked about, and
/// notes when an Execute stream is dropped (the caller went away).
#[derive(Clone, Default)]
struct Scheduler {
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The RPCs whose response streams were dropped.
    dropped: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
}

impl Scheduler {
    fn saw(&self, what: String) {
        self.seen.lock().unwrap().push(what);
    }
    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn operation(name: &str, done: bool) -> lro::Operation {
    lro::Operation {
        name: name.into(),
        done,
        ..Default::default()
    }
}

/// Sends its operations, then stays open until dropped.
struct HeldStream {
    rpc: &'static str,
    items: std::collections::VecDeque<lro::Operation>,
    dropped: std::sync::Arc<std::sync::Mutex<Vec<&'static str>>>,
}

impl futures_util::Stream for HeldStream {
    type Item = Result<lro::Operation, Status>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.items.pop_front() {
            Some(op) => std::task::Poll::Ready(Some(Ok(op))),
            None => std::task::Poll::Pending,
        }
    }
}

impl Drop for HeldStream {
    fn drop(&mut self) {
        self.dropped.lock().unwrap().push(self.rpc);
    }
}

#[tonic::async_trait]
impl re::execution_server::Execution for Scheduler {
    type ExecuteStream = HeldStream;
    type WaitExecutionStream = HeldStream;

    async fn execute(
        &self,
        req: Request<re::ExecuteRequest>,
    ) -> Result<Response<HeldStream>, Status> {
        let instance = req.into_inner().instance_name;
        self.saw(format!("Execute {instance}"));
        // The first message at once; the stream then stays open.
        Ok(Response::new(HeldStream {
            rpc: "Execute",
            items: [operation(&format!("{instance}/op-1"), false)].into(),
            dropped: self.dropped.clone(),
        }))
    }

    async fn wait_execution(
        &self,
        req: Request<re::WaitExecutionRequest>,
    ) -> Result<Response<HeldStream>, Status> {
        let name = req.into_inner().name;
        self.saw(format!("WaitExecution {name}"));
        Ok(Response::new(HeldStream {
            rpc: "WaitExecution",
            items: [operation(&name, false), operation(&name, true)].into(),
            dropped: self.dropped.clone(),
        }))
    }
}

#[tonic::async_trait]
impl lro::operations_server::Operations for Scheduler {
    async fn list_operations(
        &self,
        req: Request<lro::ListOperationsRequest>,
    ) -> Result<Response<lro::ListOperationsResponse>, Status> {
        let req = req.into_inner();
        self.saw(format!("ListOperations {} {}", req.name, req.filter));
        Ok(Response::new(lro::ListOperationsResponse {
            operations: vec![
                operation(&format!("{}/op-1", req.name), false),
                operation(&format!("{}/op-2", req.name), true),
            ],
            next_page_token: "page-2".into(),
            ..Default::default()
        }))
    }

    async fn get_operation(
        &self,
        req: Request<lro::GetOperationRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        let name = req.into_inner().name;
        self.saw(format!("GetOperation {name}"));
        Ok(Response::new(operation(&name, true)))
    }

    async fn delete_operation(
        &self,
        req: Request<lro::DeleteOperationRequest>,
    ) -> Result<Response<()>, Status> {
        self.saw(format!("DeleteOperation {}", req.into_inner().name));
        Ok(Response::new(()))
    }

    async fn cancel_operation(
        &self,
        req: Request<lro::CancelOperationRequest>,
    ) -> Result<Response<()>, Status> {
        self.saw(format!("CancelOperation {}", req.into_inner().name));
        Ok(Response::new(()))
    }

    async fn wait_operation(
        &self,
        req: Request<lro::WaitOperationRequest>,
    ) -> Result<Response<lro::Operation>, Status> {
        let name = req.into_inner().name;
        self.saw(format!("WaitOperation {name}"));
        Ok(Response::new(operation(&name, true)))
    }
}

/// Through the whole server: with `instance-name: main`, callers of `team-a`
/// only ever see `team-a/...` operation names, and the upstream only ever
/// sees `main/...`; a caller that goes away cancels the upstream stream.
#[tokio::test]
async fn operation_names_are_rewritten_both_ways_and_cancellation_reaches_the_upstream() {
    use lro::operations_client::OperationsClient;
    use re::execution_client::ExecutionClient;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let scheduler = Scheduler::default();
    let upstream = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(re::execution_server::ExecutionServer::new(
                scheduler.clone(),
            ))
            .add_service(lro::operations_server::OperationsServer::new(
                scheduler.clone(),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let yaml = loopback_config(
        "",
        &format!(
            "authorization:\n  method: none\ninstances:\n  - name: team-a\n    upstream:\n      address: \"grpc://{up_addr}\"\n      instance-name: main\n"
        ),
    );
    let gate = TestServer::start(&yaml, dir.path()).await;
    let channel = common::plain_channel(gate.tcp()).await;
    let mut exec = ExecutionClient::new(channel.clone());
    let mut ops = OperationsClient::new(channel);

    // Execute: the instance goes up as `main`, the operation comes back as team-a's.
    let mut stream = exec
        .execute(re::ExecuteRequest {
            instance_name: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.name, "team-a/op-1");

    // The public name is what the Gate locates the instance by, and what the
    // upstream never sees.
    let mut waited = exec
        .wait_execution(re::WaitExecutionRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let a = waited.message().await.unwrap().unwrap();
    let b = waited.message().await.unwrap().unwrap();
    assert_eq!(
        (a.name.as_str(), b.name.as_str(), b.done),
        ("team-a/op-1", "team-a/op-1", true)
    );
    drop(waited);

    let got = ops
        .get_operation(lro::GetOperationRequest {
            name: "team-a/op-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.name, "team-a/op-1");
    let listed = ops
        .list_operations(lro::ListOperationsRequest {
            name: "team-a".into(),
            filter: "stage = QUEUED".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = listed.operations.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["team-a/op-1", "team-a/op-2"]);
    assert_eq!(listed.next_page_token, "page-2");
    ops.cancel_operation(lro::CancelOperationRequest {
        name: "team-a/op-1".into(),
    })
    .await
    .unwrap();
    ops.wait_operation(lro::WaitOperationRequest {
        name: "team-a/op-1".into(),
        timeout: None,
    })
    .await
    .unwrap();
    ops.delete_operation(lro::DeleteOperationRequest {
        name: "team-a/op-1".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        scheduler.seen(),
        [
            "Execute main",
            "WaitExecution main/op-1",
            "GetOperation main/op-1",
            "ListOperations main stage = QUEUED",
            "CancelOperation main/op-1",
            "WaitOperation main/op-1",
            "DeleteOperation main/op-1",
        ]
    );

    // The Execute stream is still open upstream; dropping it here resets the
    // caller's stream, and gridgate resets the upstream one.
    assert!(!scheduler.dropped.lock().unwrap().contains(&"Execute"));
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !scheduler.dropped.lock().unwrap().contains(&"Execute") {
        assert!(
            Instant::now() < deadline,
            "the upstream Execute stream was not cancelled within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gate.stop().await;
    upstream.abort();
}

/// A TCP relay to `target` whose connections can be cut at once.
struct Relay {
    addr: std::net::SocketAddr,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock().unwrap().push(task);
            }
        });
        Relay {
            addr,
            connections,
            accept,
        }
    }

    /// Drops every relayed connection.
    fn cut(&self) {
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// An upstream connection that breaks in the middle of a response stream
/// reaches the caller as the same UNAVAILABLE, not as the transport's error.
#[tokio::test]
async fn a_connection_that_breaks_mid_stream_names_no_internals() {
    use re::execution_client::ExecutionClient;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(re::execution_server::ExecutionServer::new(
                Scheduler::default(),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let relay = Relay::start(up_addr).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = loopback_config(
        "",
        &format!(
            "authorization:\n  method: none\ninstances:\n  - name: main\n    upstream:\n      address: \"grpc://ci:hunter2@{}\"\n",
            relay.addr
        ),
    );
    let gate = TestServer::start(&yaml, dir.path()).await;
    let mut exec = ExecutionClient::new(common::plain_channel(gate.tcp()).await);
    let mut stream = exec
        .execute(re::ExecuteRequest {
            instance_name: "main".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().name, "main/op-1");
    relay.cut();
    let err = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the break reaches the caller")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(err.message(), "upstream for instance main unavailable");
    gate.stop().await;
    upstream.abort();
}
