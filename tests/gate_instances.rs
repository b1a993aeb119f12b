//! The Gate with real services behind it: instance location from the first
//! message (and what prost would really decode), stream guards on later
//! messages, and the verified identity forwarded to an upstream.

mod common;
#[path = "common/jwks_server.rs"]
mod jwks_server;

use std::path::Path;

use bytes::Bytes;
use common::*;
use gridgate::proto::build::bazel::remote::execution::v2 as re;
use gridgate::proto::google::bytestream as bs;
use gridgate::reapi::digest::BlobKey;
use jsonwebtoken::Algorithm;
use jwks_server::{claims, TestKey};
use prost::Message;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::Code;

const AUD: &str = "gridgate";
const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-hs256";

const ACL: &str = r#"
team-a:
  allow:
    - actor: alice
prod:
  allow:
    - actor: release-bot
"#;

fn config(dir: &Path) -> String {
    std::fs::write(dir.join("hmac.secret"), SECRET).unwrap();
    std::fs::write(dir.join("acl.yaml"), ACL).unwrap();
    loopback_config(
        "",
        &format!(
            "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  audience: {AUD}\n  acl-config: acl.yaml\n\
             instances:\n  - name: team-a\n    cas: {{ backend: memory, max-bytes: 16M }}\n  - name: prod\n    cas: {{ backend: memory, max-bytes: 16M }}\n"
        ),
    )
}

fn token(sub: &str) -> String {
    TestKey::hmac(Algorithm::HS256, SECRET).sign(&claims("https://ci.example", AUD, sub))
}

fn string_field(n: u32, s: &str) -> Vec<u8> {
    let mut v = Vec::new();
    prost::encoding::string::encode(n, &s.to_string(), &mut v);
    v
}

const FIND_MISSING: &str =
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";

#[tokio::test]
async fn a_second_instance_name_hidden_after_an_allowed_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&config(dir.path()), dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    let auth = [("authorization", format!("Bearer {}", token("alice")))];

    // Plain request for team-a: admitted, answered by the CAS.
    let ok = raw_unary(
        ch.clone(),
        FIND_MISSING,
        Bytes::from(string_field(1, "team-a")),
        &auth,
    )
    .await
    .unwrap();
    assert!(re::FindMissingBlobsResponse::decode(ok).is_ok());

    // team-a first, prod second: prost decodes "prod", and so does the Gate.
    let mut msg = string_field(1, "team-a");
    msg.extend(string_field(1, "prod"));
    let err = raw_unary(ch.clone(), FIND_MISSING, Bytes::from(msg), &auth)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("prod"), "{err:?}");

    // prod first, team-a second: prost decodes "team-a"; admitted.
    let mut msg = string_field(1, "prod");
    msg.extend(string_field(1, "team-a"));
    assert!(raw_unary(ch.clone(), FIND_MISSING, Bytes::from(msg), &auth)
        .await
        .is_ok());

    // The instance field with the wrong wire type: refused like prost would.
    let err = raw_unary(
        ch.clone(),
        FIND_MISSING,
        Bytes::from_static(&[0x08, 0x01]),
        &auth,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_write_whose_later_message_changes_the_resource_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&config(dir.path()), dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    let blob = |fill: u8| vec![fill; 3 * 1024 * 1024];
    let name = |inst: &str, uuid: &str, data: &[u8]| {
        let d = BlobKey::of(data).to_digest();
        format!("{inst}/uploads/{uuid}/blobs/{}/{}", d.hash, d.size_bytes)
    };

    let write = |first: String, later: String, data: Vec<u8>| {
        let ch = ch.clone();
        async move {
            let chunks: Vec<bs::WriteRequest> = data
                .chunks(1024 * 1024)
                .enumerate()
                .map(|(i, c)| bs::WriteRequest {
                    resource_name: if i == 0 { first.clone() } else { later.clone() },
                    write_offset: (i * 1024 * 1024) as i64,
                    finish_write: (i + 1) * 1024 * 1024 >= data.len(),
                    data: Bytes::copy_from_slice(c),
                })
                .collect();
            let mut client = bs::byte_stream_client::ByteStreamClient::new(ch);
            client
                .write(with_token(tokio_stream::iter(chunks), &token("alice")))
                .await
        }
    };
    // Later messages repeating the name, or leaving it empty: fine.
    let first = blob(7);
    let resp = write(name("team-a", "u1", &first), String::new(), first.clone())
        .await
        .unwrap();
    assert_eq!(resp.into_inner().committed_size, first.len() as i64);
    // A later message switching to prod: refused, nothing stored on prod.
    let second = blob(8);
    let d = BlobKey::of(&second).to_digest();
    let err = write(
        name("team-a", "u2", &second),
        name("prod", "u2", &second),
        second.clone(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let mut cas = ContentAddressableStorageClient::new(ch.clone());
    let req = re::FindMissingBlobsRequest {
        instance_name: "prod".into(),
        blob_digests: vec![d.clone()],
        digest_function: 0,
    };
    let missing = cas
        .find_missing_blobs(with_token(req, &token("release-bot")))
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests;
    assert_eq!(missing, vec![d]);
    server.stop().await;
}

#[tokio::test]
async fn gzip_compressed_requests_are_located_too() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&config(dir.path()), dir.path()).await;
    let mut cas = ContentAddressableStorageClient::new(plain_channel(server.tcp()).await)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let req = |inst: &str| re::FindMissingBlobsRequest {
        instance_name: inst.into(),
        ..Default::default()
    };
    assert!(cas
        .find_missing_blobs(with_token(req("team-a"), &token("alice")))
        .await
        .is_ok());
    let err = cas
        .find_missing_blobs(with_token(req("prod"), &token("alice")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    server.stop().await;
}

#[tokio::test]
async fn the_verified_identity_is_what_an_upstream_sees() {
    // The upstream trusts x-request-* headers (BuildGrid's `headers` method) and
    // lets only actor alice use its instance.
    let up_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        up_dir.path().join("acl.yaml"),
        "main:\n  allow:\n    - actor: alice\n",
    )
    .unwrap();
    let upstream = TestServer::start(
        &loopback_config(
            "",
            "authorization:\n  method: headers\n  acl-config: acl.yaml\ninstances:\n  - name: main\n    cas: { backend: memory, max-bytes: 16M }\n",
        ),
        up_dir.path(),
    )
    .await;

    // The front gate verifies JWTs and forwards team-a to the upstream's main.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hmac.secret"), SECRET).unwrap();
    std::fs::write(dir.path().join("acl.yaml"), "team-a:\n  allow: all\n").unwrap();
    let front = TestServer::start(
        &loopback_config(
            "",
            &format!(
                "authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  acl-config: acl.yaml\n\
                 instances:\n  - name: team-a\n    upstream: {{ address: \"grpc://{}\", instance-name: main }}\n",
                upstream.tcp()
            ),
        ),
        dir.path(),
    )
    .await;
    let mut cas = ContentAddressableStorageClient::new(plain_channel(front.tcp()).await);
    let req = || re::FindMissingBlobsRequest {
        instance_name: "team-a".into(),
        ..Default::default()
    };
    // alice's token: the upstream sees actor alice.
    assert!(cas
        .find_missing_blobs(with_token(req(), &token("alice")))
        .await
        .is_ok());
    // mallory forges x-request-actor: alice; the gate replaces it with mallory.
    let mut forged = with_token(req(), &token("mallory"));
    forged
        .metadata_mut()
        .insert("x-request-actor", "alice".parse().unwrap());
    let err = cas.find_missing_blobs(forged).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("main"),
        "the upstream refused: {err:?}"
    );
    front.stop().await;
    upstream.stop().await;
}
