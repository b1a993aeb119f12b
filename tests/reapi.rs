//! Black-box tests of the local REAPI instances: a real gateway on loopback,
//! the generated tonic clients.

mod common;

use std::time::Duration;

use bs::byte_stream_client::ByteStreamClient;
use bytes::Bytes;
use common::{loopback_config, plain_channel, TestServer};
use gridgate::proto::build::bazel::remote::execution::v2 as re;
use gridgate::proto::google::bytestream as bs;
use gridgate::reapi::digest::BlobKey;
use re::action_cache_client::ActionCacheClient;
use re::capabilities_client::CapabilitiesClient;
use re::content_addressable_storage_client::ContentAddressableStorageClient;
use tonic::transport::Channel;
use tonic::Code;

const MIB: usize = 1024 * 1024;

fn yaml(disk: &std::path::Path) -> String {
    loopback_config(
        "",
        &format!(
            r#"authorization:
  method: none
instances:
  - name: team-a
    cas: {{ backend: memory, max-bytes: 64M }}
    action-cache: {{ allow-updates: true }}
  - name: ro
    cas: {{ backend: disk, path: {}, max-bytes: 16M }}
    action-cache: {{ allow-updates: false }}
  - name: small
    cas: {{ backend: memory, max-bytes: 1M }}
  - name: ""
    cas: {{ backend: disk, path: {}, max-bytes: 16M }}
"#,
            disk.join("ro").display(),
            disk.join("unnamed").display()
        ),
    )
}

struct Fixture {
    server: TestServer,
    channel: Channel,
    dir: tempfile::TempDir,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&yaml(dir.path()), dir.path()).await;
    let channel = plain_channel(server.tcp()).await;
    Fixture {
        server,
        channel,
        dir,
    }
}

fn blob(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

fn digest(data: &[u8]) -> re::Digest {
    BlobKey::of(data).to_digest()
}

fn read_name(instance: &str, data: &[u8]) -> String {
    let k = BlobKey::of(data);
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!("{prefix}blobs/{}/{}", k.hex(), k.size)
}

fn write_name(instance: &str, uuid: &str, data: &[u8]) -> String {
    let k = BlobKey::of(data);
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!("{prefix}uploads/{uuid}/blobs/{}/{}", k.hex(), k.size)
}

/// Write requests for `data` in chunks, starting at `from`.
fn write_requests(
    name: &str,
    data: &[u8],
    from: usize,
    chunk: usize,
    finish: bool,
) -> Vec<bs::WriteRequest> {
    let mut out = Vec::new();
    let mut offset = from;
    loop {
        let end = (offset + chunk).min(data.len());
        let last = end == data.len();
        out.push(bs::WriteRequest {
            resource_name: if offset == from {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: offset as i64,
            finish_write: last && finish,
            data: Bytes::copy_from_slice(&data[offset..end]),
        });
        offset = end;
        if last {
            return out;
        }
    }
}

async fn write(ch: &Channel, reqs: Vec<bs::WriteRequest>) -> Result<i64, tonic::Status> {
    let mut c = ByteStreamClient::new(ch.clone());
    c.write(tokio_stream::iter(reqs))
        .await
        .map(|r| r.into_inner().committed_size)
}

async fn read(ch: &Channel, name: &str, offset: i64, limit: i64) -> Result<Vec<u8>, tonic::Status> {
    let mut c = ByteStreamClient::new(ch.clone());
    let mut s = c
        .read(bs::ReadRequest {
            resource_name: name.to_string(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        assert!(m.data.len() <= MIB, "chunks are at most 1 MiB");
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}

async fn missing(ch: &Channel, instance: &str, digests: Vec<re::Digest>) -> Vec<re::Digest> {
    ContentAddressableStorageClient::new(ch.clone())
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: digests,
            digest_function: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .missing_blob_digests
}

async fn batch_update(
    ch: &Channel,
    instance: &str,
    blobs: Vec<(re::Digest, Vec<u8>)>,
) -> Result<Vec<(re::Digest, i32)>, tonic::Status> {
    let resp = ContentAddressableStorageClient::new(ch.clone())
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests: blobs
                .into_iter()
                .map(|(d, data)| re::batch_update_blobs_request::Request {
                    digest: Some(d),
                    data: data.into(),
                    compressor: 0,
                })
                .collect(),
            digest_function: 0,
        })
        .await?
        .into_inner();
    Ok(resp
        .responses
        .into_iter()
        .map(|r| {
            (
                r.digest.unwrap_or_default(),
                r.status.map(|s| s.code).unwrap_or(-1),
            )
        })
        .collect())
}

#[tokio::test]
async fn capabilities_tell_the_truth_per_instance() {
    let f = start().await;
    let mut c = CapabilitiesClient::new(f.channel.clone());
    let caps = |name: &str| re::GetCapabilitiesRequest {
        instance_name: name.into(),
    };
    let a = c
        .get_capabilities(caps("team-a"))
        .await
        .unwrap()
        .into_inner();
    let cache = a.cache_capabilities.unwrap();
    assert_eq!(
        cache.digest_functions,
        vec![re::digest_function::Value::Sha256 as i32]
    );
    assert!(
        cache
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert!(cache.max_batch_total_size_bytes > 3 * MIB as i64);
    assert!(cache.max_batch_total_size_bytes < 4 * MIB as i64);
    assert!(cache
        .supported_compressors
        .contains(&(re::compressor::Value::Zstd as i32)));
    let exec = a.execution_capabilities.unwrap();
    assert!(!exec.exec_enabled);
    let (low, high) = (a.low_api_version.unwrap(), a.high_api_version.unwrap());
    assert_eq!((low.major, low.minor), (2, 0));
    assert_eq!((high.major, high.minor), (2, 3));

    let ro = c.get_capabilities(caps("ro")).await.unwrap().into_inner();
    assert!(
        !ro.cache_capabilities
            .unwrap()
            .action_cache_update_capabilities
            .unwrap()
            .update_enabled
    );
    assert!(c.get_capabilities(caps("")).await.is_ok());

    let err = c.get_capabilities(caps("nope")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("unknown instance"),
        "{}",
        err.message()
    );
    f.server.stop().await;
}

#[tokio::test]
async fn unknown_instance_everywhere() {
    let f = start().await;
    let data = b"x".to_vec();
    let err = ContentAddressableStorageClient::new(f.channel.clone())
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: "nope".into(),
            blob_digests: vec![digest(&data)],
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = read(&f.channel, &read_name("nope", &data), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = write(
        &f.channel,
        write_requests(&write_name("nope", "u", &data), &data, 0, 10, true),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = ActionCacheClient::new(f.channel.clone())
        .get_action_result(re::GetActionResultRequest {
            instance_name: "nope".into(),
            action_digest: Some(digest(&data)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    f.server.stop().await;
}

#[tokio::test]
async fn cas_batches_round_trip_and_verify() {
    let f = start().await;
    let ch = &f.channel;
    let a = blob(1000, 1);
    let b = blob(20_000, 2);
    let empty: Vec<u8> = Vec::new();
    assert!(
        missing(ch, "team-a", vec![digest(&empty)]).await.is_empty(),
        "the empty blob is always present"
    );
    assert_eq!(
        missing(ch, "team-a", vec![digest(&a), digest(&b)])
            .await
            .len(),
        2
    );

    // One good blob, one whose data does not match its digest.
    let wrong = blob(1000, 9);
    let statuses = batch_update(
        ch,
        "team-a",
        vec![(digest(&a), a.clone()), (digest(&b), wrong)],
    )
    .await
    .unwrap();
    assert_eq!(statuses[0].1, Code::Ok as i32);
    assert_eq!(statuses[1].1, Code::InvalidArgument as i32);
    assert_eq!(
        missing(ch, "team-a", vec![digest(&a), digest(&b)]).await,
        vec![digest(&b)]
    );

    // Right hash, wrong size.
    let mut d = digest(&b);
    d.size_bytes += 1;
    let statuses = batch_update(ch, "team-a", vec![(d, b.clone())])
        .await
        .unwrap();
    assert_eq!(statuses[0].1, Code::InvalidArgument as i32);

    let resp = ContentAddressableStorageClient::new(ch.clone())
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: "team-a".into(),
            digests: vec![digest(&a), digest(&b), digest(&empty)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.responses[0].data, a);
    assert_eq!(
        resp.responses[0].status.as_ref().unwrap().code,
        Code::Ok as i32
    );
    assert_eq!(
        resp.responses[1].status.as_ref().unwrap().code,
        Code::NotFound as i32
    );
    assert_eq!(
        resp.responses[2].status.as_ref().unwrap().code,
        Code::Ok as i32
    );

    // Over the batch limit as a whole.
    let big = blob(3 * MIB + 1000 * 1024, 3);
    let err = batch_update(ch, "team-a", vec![(digest(&big), big.clone())])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = ContentAddressableStorageClient::new(ch.clone())
        .batch_read_blobs(re::BatchReadBlobsRequest {
            instance_name: "team-a".into(),
            digests: vec![digest(&big), digest(&big)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A malformed digest is refused.
    let err = ContentAddressableStorageClient::new(ch.clone())
        .find_missing_blobs(re::FindMissingBlobsRequest {
            instance_name: "team-a".into(),
            blob_digests: vec![re::Digest {
                hash: "zz".into(),
                size_bytes: 1,
            }],
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    f.server.stop().await;
}

#[tokio::test]
async fn bytestream_round_trip_offsets_and_limits() {
    let f = start().await;
    let ch = &f.channel;
    for instance in ["team-a", ""] {
        let data = blob(3 * MIB + 123, 4);
        let committed = write(
            ch,
            write_requests(
                &write_name(instance, "u1", &data),
                &data,
                0,
                64 * 1024,
                true,
            ),
        )
        .await
        .unwrap();
        assert_eq!(committed, data.len() as i64);
        let name = read_name(instance, &data);
        assert_eq!(read(ch, &name, 0, 0).await.unwrap(), data);
        assert_eq!(read(ch, &name, 10, 0).await.unwrap(), &data[10..]);
        assert_eq!(read(ch, &name, 10, 5).await.unwrap(), &data[10..15]);
        assert_eq!(
            read(ch, &name, MIB as i64 - 3, MIB as i64 + 7)
                .await
                .unwrap(),
            &data[MIB - 3..2 * MIB + 4]
        );
        assert!(read(ch, &name, data.len() as i64, 0)
            .await
            .unwrap()
            .is_empty());
        let err = read(ch, &name, data.len() as i64 + 1, 0).await.unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange);
        let err = read(ch, &name, 0, -1).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        // Writing it again short-circuits.
        let committed = write(
            ch,
            write_requests(
                &write_name(instance, "u2", &data),
                &data[..10],
                0,
                10,
                false,
            ),
        )
        .await
        .unwrap();
        assert_eq!(committed, data.len() as i64);
    }
    let absent = blob(10, 5);
    let err = read(ch, &read_name("team-a", &absent), 0, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = read(ch, "team-a/blobs/nothex/3", 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    f.server.stop().await;
}

#[tokio::test]
async fn bytestream_write_refuses_wrong_data() {
    let f = start().await;
    let ch = &f.channel;
    for instance in ["team-a", "ro"] {
        let data = blob(200_000, 6);
        let mut wrong = data.clone();
        wrong[100_000] ^= 1;
        let name = write_name(instance, "bad", &data);
        let err = write(ch, write_requests(&name, &wrong, 0, 50_000, true))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("SHA-256"), "{}", err.message());
        assert_eq!(missing(ch, instance, vec![digest(&data)]).await.len(), 1);
        // Too many bytes.
        let mut long = data.clone();
        long.push(0);
        let err = write(ch, write_requests(&name, &long, 0, 50_000, true))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        // Too few.
        let err = write(ch, write_requests(&name, &data[..1000], 0, 500, true))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(missing(ch, instance, vec![digest(&data)]).await.len(), 1);
    }
    // A later message naming another resource.
    let data = blob(1000, 7);
    let mut reqs = write_requests(&write_name("team-a", "x", &data), &data, 0, 100, true);
    reqs[3].resource_name = write_name("team-a", "y", &data);
    let err = write(ch, reqs).await.unwrap_err();
    // The Gate refuses it first (PERMISSION_DENIED); the service checks too
    // (INVALID_ARGUMENT) for servers without a gate in front.
    assert!(
        matches!(err.code(), Code::PermissionDenied | Code::InvalidArgument),
        "{err:?}"
    );
    assert!(
        err.message().contains("different resource"),
        "{}",
        err.message()
    );
    // The disk store left no temporary files behind.
    let leftovers: Vec<_> = walk(&f.dir.path().join("ro"))
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    f.server.stop().await;
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn partial_writes_resume() {
    let f = start().await;
    let ch = &f.channel;
    for instance in ["team-a", "ro"] {
        let data = blob(2 * MIB + 17, 8);
        let name = write_name(instance, "resume-1", &data);
        let mut bsc = ByteStreamClient::new(ch.clone());
        let q = || bs::QueryWriteStatusRequest {
            resource_name: name.clone(),
        };
        assert_eq!(
            bsc.query_write_status(q()).await.unwrap_err().code(),
            Code::NotFound
        );

        // The first 1 MiB, then the stream ends without finish_write.
        let part = write_requests(&name, &data[..MIB], 0, 256 * 1024, false);
        let err = write(ch, part).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let st = bsc.query_write_status(q()).await.unwrap().into_inner();
        assert_eq!((st.committed_size, st.complete), (MIB as i64, false));

        // A wrong offset is refused and the partial upload kept.
        let err = write(ch, write_requests(&name, &data, 1000, 4096, true))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            bsc.query_write_status(q())
                .await
                .unwrap()
                .into_inner()
                .committed_size,
            MIB as i64
        );

        // Resume from the committed size.
        let committed = write(ch, write_requests(&name, &data, MIB, 300 * 1024, true))
            .await
            .unwrap();
        assert_eq!(committed, data.len() as i64);
        let st = bsc.query_write_status(q()).await.unwrap().into_inner();
        assert_eq!((st.committed_size, st.complete), (data.len() as i64, true));
        assert_eq!(
            read(ch, &read_name(instance, &data), 0, 0).await.unwrap(),
            data
        );

        // write_offset 0 on a partial upload starts over.
        let other = blob(100_000, 9);
        let name2 = write_name(instance, "resume-2", &other);
        let _ = write(ch, write_requests(&name2, &other[..5000], 0, 1000, false)).await;
        let committed = write(ch, write_requests(&name2, &other, 0, 30_000, true))
            .await
            .unwrap();
        assert_eq!(committed, other.len() as i64);
    }
    f.server.stop().await;
}

#[tokio::test]
async fn compressed_blobs_zstd() {
    let f = start().await;
    let ch = &f.channel;
    for instance in ["team-a", "ro"] {
        let data: Vec<u8> = blob(MIB + 5, 10).iter().map(|b| b % 4).collect();
        let k = BlobKey::of(&data);
        let z = zstd::bulk::compress(&data, 3).unwrap();
        let name = format!(
            "{instance}/uploads/z1/compressed-blobs/zstd/{}/{}",
            k.hex(),
            k.size
        );
        let committed = write(ch, write_requests(&name, &z, 0, 7000, true))
            .await
            .unwrap();
        assert_eq!(committed, z.len() as i64);
        assert_eq!(
            read(ch, &read_name(instance, &data), 0, 0).await.unwrap(),
            data
        );
        let rname = format!("{instance}/compressed-blobs/zstd/{}/{}", k.hex(), k.size);
        let got = read(ch, &rname, 0, 0).await.unwrap();
        assert_eq!(zstd::bulk::decompress(&got, data.len()).unwrap(), data);
        // Offset and limit count compressed bytes.
        let part = read(ch, &rname, 3, 10).await.unwrap();
        assert_eq!(part, &got[3..13]);
        // Writing it again: -1 for a compressed upload of a blob already there.
        let name = format!(
            "{instance}/uploads/z2/compressed-blobs/zstd/{}/{}",
            k.hex(),
            k.size
        );
        assert_eq!(
            write(ch, write_requests(&name, &z, 0, 7000, true))
                .await
                .unwrap(),
            -1
        );

        // Data that decompresses to more than declared is refused.
        let small = vec![1u8; 1000];
        let bomb = zstd::bulk::compress(&vec![0u8; 8 * MIB], 3).unwrap();
        let sk = BlobKey::of(&small);
        let name = format!(
            "{instance}/uploads/z3/compressed-blobs/zstd/{}/{}",
            sk.hex(),
            sk.size
        );
        let err = write(ch, write_requests(&name, &bomb, 0, 7000, true))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().contains("more than the declared"),
            "{}",
            err.message()
        );
        // Garbage.
        let err = write(ch, write_requests(&name, b"not zstd at all", 0, 7000, true))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    // An unsupported compressor.
    let err = read(
        ch,
        &format!("team-a/compressed-blobs/brotli/{}/0", BlobKey::EMPTY.hex()),
        0,
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    f.server.stop().await;
}

#[tokio::test]
async fn memory_store_evicts_within_its_budget() {
    let f = start().await;
    let ch = &f.channel;
    // "small" holds 1 MiB: five 300 KiB blobs cannot all stay.
    let blobs: Vec<Vec<u8>> = (0..5).map(|i| blob(300 * 1024, 20 + i)).collect();
    for b in &blobs {
        let committed = write(
            ch,
            write_requests(&write_name("small", "e", b), b, 0, 64 * 1024, true),
        )
        .await
        .unwrap();
        assert_eq!(committed, b.len() as i64);
    }
    let gone = missing(ch, "small", blobs.iter().map(|b| digest(b)).collect()).await;
    assert_eq!(
        gone,
        vec![digest(&blobs[0]), digest(&blobs[1])],
        "least recently used first"
    );
    // Using blob 2 keeps it; the next upload evicts blob 3 instead.
    assert!(missing(ch, "small", vec![digest(&blobs[2])])
        .await
        .is_empty());
    let next = blob(300 * 1024, 40);
    write(
        ch,
        write_requests(&write_name("small", "e", &next), &next, 0, 64 * 1024, true),
    )
    .await
    .unwrap();
    let gone = missing(ch, "small", blobs[2..].iter().map(|b| digest(b)).collect()).await;
    assert_eq!(gone, vec![digest(&blobs[3])]);
    // Larger than the whole budget.
    let huge = blob(MIB + 1, 41);
    let err = write(
        ch,
        write_requests(&write_name("small", "h", &huge), &huge, 0, 64 * 1024, true),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    f.server.stop().await;
}

#[tokio::test]
async fn disk_store_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = yaml(dir.path());
    let data = blob(2 * MIB + 3, 50);
    let small = blob(100, 51);
    {
        let server = TestServer::start(&config, dir.path()).await;
        let ch = plain_channel(server.tcp()).await;
        write(
            &ch,
            write_requests(&write_name("ro", "r", &data), &data, 0, MIB, true),
        )
        .await
        .unwrap();
        batch_update(&ch, "", vec![(digest(&small), small.clone())])
            .await
            .unwrap();
        server.stop().await;
    }
    let server = TestServer::start(&config, dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    assert!(missing(&ch, "ro", vec![digest(&data)]).await.is_empty());
    assert!(missing(&ch, "", vec![digest(&small)]).await.is_empty());
    assert_eq!(
        read(&ch, &read_name("ro", &data), 0, 0).await.unwrap(),
        data
    );
    // Blobs are sharded by hash prefix.
    let k = BlobKey::of(&data);
    assert!(dir
        .path()
        .join("ro/cas")
        .join(&k.hex()[..2])
        .join(format!("{}-{}", k.hex(), k.size))
        .is_file());
    server.stop().await;
}

#[tokio::test]
async fn action_cache_round_trip_and_read_only() {
    let f = start().await;
    let ch = &f.channel;
    let mut ac = ActionCacheClient::new(ch.clone());
    let action = digest(b"some action");
    let get = |instance: &str| re::GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.clone()),
        ..Default::default()
    };
    assert_eq!(
        ac.get_action_result(get("team-a"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    let out = blob(5000, 60);
    batch_update(ch, "team-a", vec![(digest(&out), out.clone())])
        .await
        .unwrap();
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out/a".into(),
            digest: Some(digest(&out)),
            ..Default::default()
        }],
        exit_code: 0,
        stdout_raw: Bytes::from_static(b"hello"),
        ..Default::default()
    };
    let update = |instance: &str, result: re::ActionResult| re::UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.clone()),
        action_result: Some(result),
        ..Default::default()
    };
    ac.update_action_result(update("team-a", result.clone()))
        .await
        .unwrap();
    assert_eq!(
        ac.get_action_result(get("team-a"))
            .await
            .unwrap()
            .into_inner(),
        result
    );

    // A result whose outputs are not in the CAS is not a hit.
    let dangling = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out/b".into(),
            digest: Some(digest(b"never uploaded")),
            ..Default::default()
        }],
        ..Default::default()
    };
    let other = digest(b"other action");
    ac.update_action_result(re::UpdateActionResultRequest {
        instance_name: "team-a".into(),
        action_digest: Some(other.clone()),
        action_result: Some(dangling),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = ac
        .get_action_result(re::GetActionResultRequest {
            instance_name: "team-a".into(),
            action_digest: Some(other),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // allow-updates: false answers as BuildGrid does.
    let err = ac
        .update_action_result(update("ro", result))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(err.message(), "Updating cache not allowed");
    assert_eq!(
        ac.get_action_result(get("ro")).await.unwrap_err().code(),
        Code::NotFound
    );
    f.server.stop().await;
}

#[tokio::test]
async fn get_tree_pages() {
    use prost::Message;
    let f = start().await;
    let ch = &f.channel;
    // root -> 30 children, each with one shared grandchild.
    let leaf = re::Directory::default().encode_to_vec();
    let leaf_d = digest(&leaf);
    let mut uploads = vec![(leaf_d.clone(), leaf.clone())];
    let mut root = re::Directory::default();
    for i in 0..30 {
        let child = re::Directory {
            directories: vec![re::DirectoryNode {
                name: "leaf".into(),
                digest: Some(leaf_d.clone()),
            }],
            files: vec![re::FileNode {
                name: format!("f{i}"),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        root.directories.push(re::DirectoryNode {
            name: format!("d{i}"),
            digest: Some(digest(&child)),
        });
        uploads.push((digest(&child), child));
    }
    // One child is missing from the CAS: it is omitted.
    let absent = uploads.pop().unwrap();
    let root = root.encode_to_vec();
    uploads.push((digest(&root), root.clone()));
    batch_update(ch, "team-a", uploads).await.unwrap();

    let mut cas = ContentAddressableStorageClient::new(ch.clone());
    let mut all = Vec::new();
    let mut token = String::new();
    let mut calls = 0;
    loop {
        let mut s = cas
            .get_tree(re::GetTreeRequest {
                instance_name: "team-a".into(),
                root_digest: Some(digest(&root)),
                page_size: 7,
                page_token: token.clone(),
                digest_function: 0,
            })
            .await
            .unwrap()
            .into_inner();
        calls += 1;
        // Take one page per call, then continue with its token.
        let page = s.message().await.unwrap().unwrap();
        assert!(page.directories.len() <= 7);
        all.extend(page.directories);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    // root + 29 children + the shared leaf once.
    assert_eq!(all.len(), 31);
    assert_eq!(calls, 5);
    assert!(!all.iter().any(|d| digest(&d.encode_to_vec()) == absent.0));

    let err = cas
        .get_tree(re::GetTreeRequest {
            instance_name: "team-a".into(),
            root_digest: Some(digest(&root)),
            page_size: 7,
            page_token: "garbage".into(),
            digest_function: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = cas
        .get_tree(re::GetTreeRequest {
            instance_name: "team-a".into(),
            root_digest: Some(digest(b"no such root")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    f.server.stop().await;
}

#[tokio::test]
async fn concurrent_uploads_stay_within_the_memory_budget() {
    let f = start().await;
    let ch = f.channel.clone();
    let mut tasks = Vec::new();
    for i in 0..24u8 {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move {
            let b = blob(200 * 1024, 100 + i);
            let r = write(
                &ch,
                write_requests(
                    &write_name("small", &format!("c{i}"), &b),
                    &b,
                    0,
                    32 * 1024,
                    true,
                ),
            )
            .await;
            match r {
                Ok(n) => assert_eq!(n, b.len() as i64),
                Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap();
    }
    // At most 1 MiB / 200 KiB = 5 of them are held.
    let held = 24
        - missing(
            &ch,
            "small",
            (0..24u8)
                .map(|i| digest(&blob(200 * 1024, 100 + i)))
                .collect(),
        )
        .await
        .len();
    assert!((1..=5).contains(&held), "{held}");
    f.server.stop().await;
}
