//! Bazel 2.1.0 as a real remote-cache client over TLS, on an instance listed in
//! `allow-unauthenticated-instances` whose ACL lets anonymous callers use the
//! cache (Bazel 2.1 sends `--remote_header` only on some RPCs, so anonymous
//! access is how it works with a gate): the first build uploads its outputs,
//! and after `bazel clean` the second build is a remote cache hit for every
//! action. Once on a local instance, once through an `upstream` instance into
//! a real BuildGrid 0.4.4.
//!
//! Bazel is fetched on first use (see common/bazel.rs); without it the tests
//! skip, or fail when `CI` is set.

mod common;

use std::path::PathBuf;

use common::bazel::{bazel_binary, BazelOutput, Workspace};
use common::buildgrid::BuildGrid;
use common::{loopback_config, plain_channel, tls_channel, Certs, TestServer};
use gridgate::proto::build::bazel::remote::execution::v2 as re;
use gridgate::reapi::digest::BlobKey;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::transport::Channel;

/// Three actions (one depending on another), no toolchain needed.
const BUILD: &str = r#"
genrule(name = "alpha", outs = ["alpha.txt"], cmd = "echo alpha > $@")
genrule(name = "beta", srcs = [":alpha"], outs = ["beta.txt"], cmd = "cat $< > $@; echo beta >> $@")
genrule(name = "numbers", outs = ["numbers.txt"], cmd = "seq 1 5000 > $@")
"#;
const ACTIONS: u64 = 3;

/// What the three genrules write.
fn outputs() -> Vec<Vec<u8>> {
    let numbers: String = (1..=5000).map(|i| format!("{i}\n")).collect();
    vec![
        b"alpha\n".to_vec(),
        b"alpha\nbeta\n".to_vec(),
        numbers.into_bytes(),
    ]
}

/// Anonymous callers may use team-a's cache: a rule with only `requests`.
const ACL: &str = r#"
team-a:
  allow:
    - requests: [GetCapabilities, FindMissingBlobs, BatchReadBlobs, BatchUpdateBlobs, GetTree,
                 Read, Write, QueryWriteStatus, GetActionResult, UpdateActionResult]
"#;

fn gate_yaml(certs: &Certs, instance: &str) -> String {
    let dir = certs.dir.path();
    std::fs::write(
        dir.join("hmac.secret"),
        "bazel-e2e-secret-0123456789abcdef0123",
    )
    .unwrap();
    std::fs::write(dir.join("acl.yaml"), ACL).unwrap();
    loopback_config(
        &certs.credentials_yaml(false),
        &format!(
            "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  acl-config: acl.yaml\n  \
             allow-unauthenticated-instances: [team-a]\ninstances:\n{instance}"
        ),
    )
}

/// Builds `//...` against the remote cache at `port` (instance team-a).
async fn build(ws: &std::sync::Arc<Workspace>, port: u16, ca: PathBuf) -> BazelOutput {
    let ws = ws.clone();
    tokio::task::spawn_blocking(move || {
        ws.run(
            "build",
            &[
                &format!("--remote_cache=grpcs://localhost:{port}"),
                &format!("--tls_certificate={}", ca.display()),
                "--remote_instance_name=team-a",
                "--spawn_strategy=local",
                "--remote_timeout=60",
                "//...",
            ],
        )
    })
    .await
    .unwrap()
}

async fn clean(ws: &std::sync::Arc<Workspace>) {
    let ws = ws.clone();
    let out = tokio::task::spawn_blocking(move || ws.run("clean", &[]))
        .await
        .unwrap();
    assert_eq!(out.code, 0, "bazel clean: {}", out.text);
}

/// The blobs of `outputs()` that `instance` behind `channel` does not have.
async fn missing_outputs(channel: Channel, instance: &str) -> Vec<re::Digest> {
    ContentAddressableStorageClient::new(channel)
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: outputs()
                .iter()
                .map(|o| BlobKey::of(o).to_digest())
                .collect(),
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
}

/// The whole story against a gate on `port`; `check_cas` tells whether the
/// outputs are in the cache behind it (and before the first build, that they
/// are not).
async fn cold_then_warm<F, Fut>(bazel: PathBuf, port: u16, certs: &Certs, check_cas: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<re::Digest>>,
{
    assert_eq!(check_cas().await.len(), outputs().len(), "cache not empty");
    let ws = std::sync::Arc::new(Workspace::new(bazel, BUILD));

    let cold = build(&ws, port, certs.ca.clone()).await;
    assert_eq!(cold.code, 0, "first build failed:\n{}", cold.text);
    let (total, kinds) = cold
        .processes()
        .unwrap_or_else(|| panic!("no process summary:\n{}", cold.text));
    assert_eq!(total, ACTIONS, "{kinds:?}");
    assert!(
        !kinds.iter().any(|(_, k)| k.contains("remote cache hit")),
        "a cold cache hit: {kinds:?}"
    );
    assert!(
        !cold.text.contains("WARNING: Writing to Remote Cache")
            && !cold.text.contains("Failed to store"),
        "uploads failed:\n{}",
        cold.text
    );
    assert_eq!(check_cas().await, vec![], "outputs not uploaded");
    for (o, name) in outputs().iter().zip(["alpha", "beta", "numbers"]) {
        let local = std::fs::read(ws.path().join(format!("bazel-bin/{name}.txt"))).unwrap();
        assert_eq!(&local, o, "{name}");
    }

    clean(&ws).await;
    assert!(!ws.path().join("bazel-bin/alpha.txt").exists());
    let warm = build(&ws, port, certs.ca.clone()).await;
    assert_eq!(warm.code, 0, "second build failed:\n{}", warm.text);
    let (total, kinds) = warm
        .processes()
        .unwrap_or_else(|| panic!("no process summary:\n{}", warm.text));
    assert_eq!(
        (total, kinds.clone()),
        (ACTIONS, vec![(ACTIONS, "remote cache hit".to_string())]),
        "second build:\n{}",
        warm.text
    );
    // The outputs came back from the cache.
    for (o, name) in outputs().iter().zip(["alpha", "beta", "numbers"]) {
        let local = std::fs::read(ws.path().join(format!("bazel-bin/{name}.txt"))).unwrap();
        assert_eq!(&local, o, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_remote_cache_on_a_local_instance() {
    let Some(bazel) = bazel_binary() else { return };
    let certs = Certs::new();
    let yaml = gate_yaml(
        &certs,
        "  - name: team-a\n    cas: { backend: memory, max-bytes: 64M }\n    action-cache: { allow-updates: true }\n",
    );
    let server = TestServer::start(&yaml, certs.dir.path()).await;
    let port = server.tcp().port();
    let ch = tls_channel(server.tcp(), &certs.ca, None).await.unwrap();
    cold_then_warm(bazel, port, &certs, || {
        missing_outputs(ch.clone(), "team-a")
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_remote_cache_through_an_upstream_buildgrid() {
    let Some(bazel) = bazel_binary() else { return };
    let Some(bg) = tokio::task::spawn_blocking(|| BuildGrid::start(&["main"]))
        .await
        .unwrap()
    else {
        return;
    };
    let certs = Certs::new();
    let yaml = gate_yaml(
        &certs,
        &format!(
            "  - name: team-a\n    upstream:\n      address: \"{}\"\n      instance-name: main\n",
            bg.address()
        ),
    );
    let server = TestServer::start(&yaml, certs.dir.path()).await;
    let port = server.tcp().port();
    // Checked in BuildGrid itself, under its own instance name.
    let bg_addr = format!("127.0.0.1:{}", bg.port).parse().unwrap();
    let ch = plain_channel(bg_addr).await;
    cold_then_warm(bazel, port, &certs, || missing_outputs(ch.clone(), "main")).await;
    server.stop().await;
    drop(bg);
}
