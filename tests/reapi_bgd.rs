//! BuildGrid's own client, `bgd` 0.4.4, against the real gridgate binary over
//! TLS and mTLS with HS256 tokens and an ACL: uploads and downloads that
//! round-trip byte for byte, the action cache, a read-only caller refused with
//! PERMISSION_DENIED, bad tokens refused with UNAUTHENTICATED, and the same
//! through an `upstream` instance whose upstream is a real BuildGrid.
//!
//! `bgd` is installed into a cached venv on first use (see common/buildgrid.rs);
//! without Python or the package index the tests skip, or fail when `CI` is set.

mod common;
#[path = "common/jwks_server.rs"]
mod jwks_server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::buildgrid::{bgd_client, BgdClient, BgdOutput, BuildGrid};
use common::{tls_channel, with_token, Binary, Certs};
use gridgate::proto::build::bazel::remote::execution::v2 as re;
use gridgate::reapi::digest::BlobKey;
use jsonwebtoken::Algorithm;
use jwks_server::{claims, now, TestKey};
use prost::Message;
use tonic::Code;

const AUD: &str = "gridgate";
const SECRET: &[u8] = b"bgd-e2e-secret-0123456789abcdef0123456789";

/// `writer` may do everything on team-a; `reader` only reads.
const ACL: &str = r#"
team-a:
  allow:
    - actor: writer
    - actor: reader
      requests: [GetCapabilities, FindMissingBlobs, BatchReadBlobs, GetTree, Read, GetActionResult]
"#;

/// A gridgate binary with a TLS channel and an mTLS channel, JWT + ACL, and
/// the instance section `instances`.
struct Gate {
    bin: Binary,
    tls: SocketAddr,
    mtls: SocketAddr,
}

fn start_gate(certs: &Certs, instances: &str) -> Gate {
    let dir = certs.dir.path();
    std::fs::write(dir.join("hmac.secret"), SECRET).unwrap();
    std::fs::write(dir.join("acl.yaml"), ACL).unwrap();
    let yaml = format!(
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n{}  - !channel\n    address: \"127.0.0.1:0\"\n{}\
         authorization:\n  method: jwt\n  algorithm: hs256\n  secret: hmac.secret\n  audience: {AUD}\n  acl-config: acl.yaml\n\
         instances:\n{instances}",
        certs.credentials_yaml(false),
        certs.credentials_yaml(true),
    );
    let config = dir.join("gridgate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut bin = Binary::start(&["serve", "--config", config.to_str().unwrap()]);
    let mut tls = None;
    let mut mtls = None;
    for _ in 0..2 {
        let line = bin
            .wait_for_line("listening on ", Duration::from_secs(30))
            .unwrap_or_else(|| panic!("gridgate did not listen; stderr: {:#?}", bin.seen));
        let addr: SocketAddr = line[line.find("listening on ").unwrap() + 13..]
            .split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        if line.contains("client certificates required") {
            mtls = Some(addr);
        } else {
            tls = Some(addr);
        }
    }
    Gate {
        bin,
        tls: tls.expect("a TLS channel"),
        mtls: mtls.expect("an mTLS channel"),
    }
}

fn token(sub: &str, exp_offset: i64, secret: &[u8]) -> String {
    let mut c = claims("https://ci.example", AUD, sub);
    c["exp"] = serde_json::json!(now() as i64 + exp_offset);
    if exp_offset < 0 {
        c["iat"] = serde_json::json!(now() as i64 + exp_offset - 600);
        c["nbf"] = c["iat"].clone();
    }
    TestKey::hmac(Algorithm::HS256, secret).sign(&c)
}

/// A client of one gridgate channel with one token.
struct Caller<'a> {
    bgd: &'a BgdClient,
    work: &'a Path,
    common: Vec<String>,
}

impl<'a> Caller<'a> {
    fn new(
        bgd: &'a BgdClient,
        work: &'a Path,
        certs: &Certs,
        addr: SocketAddr,
        token: &str,
        client_cert: bool,
    ) -> Caller<'a> {
        let token_file = unique(&work.join("token"));
        std::fs::write(&token_file, token).unwrap();
        // The server certificate names localhost; bgd checks it against the URL's host.
        let mut common = vec![
            "--remote".to_string(),
            format!("grpcs://localhost:{}", addr.port()),
            "--server-cert".into(),
            certs.ca.display().to_string(),
            "--auth-token".into(),
            token_file.display().to_string(),
            "--instance-name".into(),
            "team-a".into(),
        ];
        if client_cert {
            common.extend([
                "--client-cert".into(),
                certs.client_cert.display().to_string(),
                "--client-key".into(),
                certs.client_key.display().to_string(),
            ]);
        }
        Caller { bgd, work, common }
    }

    fn cas(&self, args: &[&str]) -> BgdOutput {
        self.bgd.run(self.work, "cas", &self.common, args)
    }

    fn action_cache(&self, args: &[&str]) -> BgdOutput {
        self.bgd.run(self.work, "actioncache", &self.common, args)
    }
}

/// `path` or `path-N`, whichever does not exist yet.
fn unique(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    let mut n = 0;
    while p.exists() {
        n += 1;
        p = PathBuf::from(format!("{}-{n}", path.display()));
    }
    p
}

fn data(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// `HASH/SIZE`, as bgd prints and parses digests.
fn digest_string(bytes: &[u8]) -> String {
    let k = BlobKey::of(bytes);
    format!("{}/{}", k.hex(), k.size)
}

/// Writes files of these sizes into `dir`; returns (name, contents).
fn files(dir: &Path, prefix: &str, sizes: &[usize]) -> Vec<(String, Vec<u8>)> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let name = format!("{prefix}-{i}.bin");
            let bytes = data(n, n as u32 ^ (i as u32 * 7919) ^ prefix.len() as u32);
            std::fs::write(dir.join(&name), &bytes).unwrap();
            (name, bytes)
        })
        .collect()
}

/// Uploads `files` with `up`, checks bgd reported each digest, downloads them
/// with `down` into new paths and compares byte for byte.
fn round_trip(up: &Caller, down: &Caller, files: &[(String, Vec<u8>)]) {
    let mut args = vec!["upload-file"];
    args.extend(files.iter().map(|(n, _)| n.as_str()));
    let out = up.cas(&args);
    assert!(out.ok(), "upload failed: {out:?}");
    for (name, bytes) in files {
        let pushed = format!(
            "Pushed path=[{name}] with digest=[{}]",
            digest_string(bytes)
        );
        assert!(out.text.contains(&pushed), "no {pushed:?} in {out:?}");
    }
    let mut args = vec!["download-file".to_string()];
    for (name, bytes) in files {
        args.push(digest_string(bytes));
        args.push(
            unique(&down.work.join(format!("back-{name}")))
                .display()
                .to_string(),
        );
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = down.cas(&argv);
    assert!(out.ok(), "download failed: {out:?}");
    for (i, (name, bytes)) in files.iter().enumerate() {
        let back =
            std::fs::read(&args[2 + 2 * i]).unwrap_or_else(|e| panic!("{name}: {e}; {out:?}"));
        assert!(
            back == *bytes,
            "{name}: {} bytes back, {} sent",
            back.len(),
            bytes.len()
        );
    }
}

/// The status gridgate gives a direct FindMissingBlobs/BatchUpdateBlobs call,
/// to tie bgd's (code-less) message to a status code.
async fn direct_batch_update(gate: &Gate, certs: &Certs, token: &str) -> tonic::Status {
    let ch = tls_channel(gate.tls, &certs.ca, None).await.unwrap();
    let blob = b"direct".to_vec();
    re::content_addressable_storage_client::ContentAddressableStorageClient::new(ch)
        .batch_update_blobs(with_token(
            re::BatchUpdateBlobsRequest {
                instance_name: "team-a".into(),
                requests: vec![re::batch_update_blobs_request::Request {
                    digest: Some(BlobKey::of(&blob).to_digest()),
                    data: blob.into(),
                    compressor: 0,
                }],
                digest_function: 0,
            },
            token,
        ))
        .await
        .unwrap_err()
}

/// A read-only caller's upload is refused (PERMISSION_DENIED); bad tokens
/// are UNAUTHENTICATED. bgd maps PERMISSION_DENIED to its PermissionDeniedError
/// and prints only the status message, so the message is checked here, and tied
/// to the status code by the same call made directly.
async fn refusals(gate: &Gate, certs: &Certs, bgd: &BgdClient, work: &Path, small: &[u8]) {
    let reader_token = token("reader", 600, SECRET);
    let reader = Caller::new(bgd, work, certs, gate.tls, &reader_token, false);
    std::fs::write(work.join("denied.bin"), data(5000, 42)).unwrap();
    let out = reader.cas(&["upload-file", "denied.bin"]);
    assert!(!out.ok(), "a read-only caller uploaded: {out:?}");
    let reason = "no rule allows BatchUpdateBlobs on instance team-a";
    assert!(out.text.contains(reason), "{out:?}");
    assert!(!out.text.contains("UNAUTHENTICATED"), "{out:?}");
    let direct = direct_batch_update(gate, certs, &reader_token).await;
    assert_eq!(direct.code(), Code::PermissionDenied, "{direct:?}");
    assert_eq!(direct.message(), reason);
    // The same reader may read what the writer stored.
    let back = unique(&work.join("reader-back.bin"));
    let out = reader.cas(&[
        "download-file",
        &digest_string(small),
        back.to_str().unwrap(),
    ]);
    assert!(out.ok(), "reader download: {out:?}");
    assert!(std::fs::read(&back).unwrap() == small);

    // Signed with another secret.
    let forged = Caller::new(
        bgd,
        work,
        certs,
        gate.tls,
        &token("writer", 600, b"another-secret-0123456789abcdef0123"),
        false,
    );
    let out = forged.cas(&["upload-file", "denied.bin"]);
    assert!(!out.ok(), "{out:?}");
    assert!(out.text.contains("StatusCode.UNAUTHENTICATED"), "{out:?}");
    // Expired (beyond the leeway).
    let expired = Caller::new(
        bgd,
        work,
        certs,
        gate.tls,
        &token("writer", -3600, SECRET),
        false,
    );
    let back = unique(&work.join("expired-back.bin"));
    let out = expired.cas(&[
        "download-file",
        &digest_string(small),
        back.to_str().unwrap(),
    ]);
    assert!(!out.ok(), "{out:?}");
    assert!(out.text.contains("StatusCode.UNAUTHENTICATED"), "{out:?}");
    assert!(out.text.contains("expired"), "{out:?}");
    assert!(!back.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bgd_through_local_instances() {
    let Some(bgd) = bgd_client() else { return };
    let certs = Certs::new();
    let gate = start_gate(
        &certs,
        "  - name: team-a\n    cas: { backend: memory, max-bytes: 64M }\n    action-cache: { allow-updates: true }\n",
    );
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let writer_token = token("writer", 600, SECRET);

    // TLS + token: a small file (BatchUpdateBlobs/BatchReadBlobs), a 5 MiB one
    // (ByteStream Write/Read: above the 4 MiB batch limit), and a serialized
    // ActionResult naming the small file, for the action cache below (a result
    // whose outputs are not all in the CAS would be a cache miss).
    let mut tls_files = files(work, "tls", &[3000, 5 * 1024 * 1024 + 17]);
    let result = re::ActionResult {
        output_files: vec![re::OutputFile {
            path: "out/hello.txt".into(),
            digest: Some(BlobKey::of(&tls_files[0].1).to_digest()),
            is_executable: true,
            ..Default::default()
        }],
        exit_code: 0,
        ..Default::default()
    };
    std::fs::write(work.join("result.pb"), result.encode_to_vec()).unwrap();
    tls_files.push(("result.pb".into(), result.encode_to_vec()));
    let writer = Caller::new(&bgd, work, &certs, gate.tls, &writer_token, false);
    round_trip(&writer, &writer, &tls_files);

    // mTLS: client certificate and token.
    let mtls_writer = Caller::new(&bgd, work, &certs, gate.mtls, &writer_token, true);
    round_trip(
        &mtls_writer,
        &mtls_writer,
        &files(work, "mtls", &[70_000, 4 * 1024 * 1024 + 1]),
    );

    // Action cache: update from the ActionResult in the CAS, then get it back.
    let action = digest_string(b"a bgd action");
    let out = writer.action_cache(&["update", &action, &digest_string(&result.encode_to_vec())]);
    assert!(out.ok(), "action-cache update: {out:?}");
    let out = writer.action_cache(&["get", "--json", &action]);
    assert!(out.ok(), "action-cache get: {out:?}");
    let json = &out.text[out
        .text
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in {out:?}"))..];
    let got: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(got["outputFiles"][0]["path"], "out/hello.txt", "{json}");
    assert_eq!(got["outputFiles"][0]["isExecutable"], true, "{json}");
    assert_eq!(
        got["outputFiles"][0]["digest"]["hash"],
        BlobKey::of(&tls_files[0].1).hex(),
        "{json}"
    );

    refusals(&gate, &certs, &bgd, work, &tls_files[0].1).await;
    drop(gate.bin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bgd_through_an_upstream_buildgrid() {
    let Some(bgd) = bgd_client() else { return };
    let Some(bg) = BuildGrid::start(&["main"]) else {
        return;
    };
    let certs = Certs::new();
    // Public name team-a, BuildGrid's name main.
    let gate = start_gate(
        &certs,
        &format!(
            "  - name: team-a\n    upstream:\n      address: \"{}\"\n      instance-name: main\n",
            bg.address()
        ),
    );
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let writer_token = token("writer", 600, SECRET);
    let writer = Caller::new(&bgd, work, &certs, gate.tls, &writer_token, false);
    let up_files = files(work, "up", &[1234, 5 * 1024 * 1024 + 3]);
    round_trip(&writer, &writer, &up_files);
    let mtls_writer = Caller::new(&bgd, work, &certs, gate.mtls, &writer_token, true);
    round_trip(&mtls_writer, &mtls_writer, &files(work, "up-mtls", &[99]));

    // The blobs are really in BuildGrid, under its own instance name.
    let direct = work.join("direct-from-buildgrid.bin");
    let out = bgd.run(
        work,
        "cas",
        &[
            "--remote".into(),
            format!("http://127.0.0.1:{}", bg.port),
            "--instance-name".into(),
            "main".into(),
        ],
        &[
            "download-file",
            &digest_string(&up_files[1].1),
            direct.to_str().unwrap(),
        ],
    );
    assert!(out.ok(), "{out:?}");
    assert!(std::fs::read(&direct).unwrap() == up_files[1].1);

    refusals(&gate, &certs, &bgd, work, &up_files[0].1).await;
    drop(gate.bin);
    drop(bg);
}
