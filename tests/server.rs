//! The foundation, end to end: channels (plaintext, TLS, mTLS, Unix socket),
//! health, reflection, compression, config errors from the real binary, and a
//! graceful SIGTERM.

mod common;

use std::time::Duration;

use common::*;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn health_over_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&loopback_config("", ""), dir.path()).await;
    let ch = plain_channel(server.tcp()).await;
    assert_eq!(health_check(ch).await.unwrap(), ServingStatus::Serving);
    server.stop().await;
}

#[tokio::test]
async fn health_over_tls() {
    let certs = Certs::new();
    let yaml = loopback_config(&certs.credentials_yaml(false), "");
    let server = TestServer::start(&yaml, certs.dir.path()).await;
    let ch = tls_channel(server.tcp(), &certs.ca, None).await.unwrap();
    assert_eq!(health_check(ch).await.unwrap(), ServingStatus::Serving);

    // A plaintext client gets nothing from a TLS port.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", server.tcp()))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    if let Ok(ch) = plain.connect().await {
        assert!(health_check(ch).await.is_err());
    }
    server.stop().await;
}

#[tokio::test]
async fn mtls_accepts_a_valid_client_certificate_and_refuses_others() {
    let certs = Certs::new();
    let yaml = loopback_config(&certs.credentials_yaml(true), "");
    let server = TestServer::start(&yaml, certs.dir.path()).await;

    let ok = tls_channel(
        server.tcp(),
        &certs.ca,
        Some((&certs.client_cert, &certs.client_key)),
    )
    .await
    .unwrap();
    assert_eq!(health_check(ok).await.unwrap(), ServingStatus::Serving);

    // No client certificate: the handshake is refused. With TLS 1.3 the client
    // may only learn on its first request.
    match tls_channel(server.tcp(), &certs.ca, None).await {
        Err(_) => {}
        Ok(ch) => assert_handshake_refused(health_check(ch).await.unwrap_err()),
    }
    // A certificate from another CA: refused too.
    match tls_channel(
        server.tcp(),
        &certs.ca,
        Some((&certs.rogue_cert, &certs.rogue_key)),
    )
    .await
    {
        Err(_) => {}
        Ok(ch) => assert_handshake_refused(health_check(ch).await.unwrap_err()),
    }
    server.stop().await;
}

/// The server's TLS alert reached the client: the handshake was refused.
fn assert_handshake_refused(err: tonic::Status) {
    let text = format!("{err:?}");
    assert!(
        text.contains("CertificateRequired")
            || text.contains("UnknownCA")
            || text.contains("BadCertificate")
            || text.contains("DecryptError"),
        "{text}"
    );
}

#[tokio::test]
async fn several_channels_tcp_mtls_and_unix_socket() {
    let certs = Certs::new();
    let sock = certs.dir.path().join("gridgate.sock");
    let yaml = format!(
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n{}  - !channel\n    address: \"unix://{}\"\n    insecure-mode: true\n",
        certs.credentials_yaml(true),
        sock.display()
    );
    let server = TestServer::start(&yaml, certs.dir.path()).await;
    assert_eq!(server.addrs.len(), 2);
    let ch = unix_channel(&sock).await;
    assert_eq!(health_check(ch).await.unwrap(), ServingStatus::Serving);
    let ch = tls_channel(
        server.tcp(),
        &certs.ca,
        Some((&certs.client_cert, &certs.client_key)),
    )
    .await
    .unwrap();
    assert_eq!(health_check(ch).await.unwrap(), ServingStatus::Serving);
    server.stop().await;
    assert!(!sock.exists(), "the socket file is removed on shutdown");
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&loopback_config("", ""), dir.path()).await;
    let mut client = ServerReflectionClient::new(plain_channel(server.tcp()).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected response {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.reflection.v1.ServerReflection".to_string()),
        "{names:?}"
    );
    server.stop().await;

    // server-reflection: false turns it off.
    let server = TestServer::start(
        &loopback_config("", "server-reflection: false\n"),
        dir.path(),
    )
    .await;
    let mut client = ServerReflectionClient::new(plain_channel(server.tcp()).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let err = client
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    server.stop().await;
}

#[tokio::test]
async fn gzip_and_zstd_requests_and_responses() {
    use tonic::codec::CompressionEncoding;
    use tonic_health::pb::health_client::HealthClient;
    for (config, enc) in [
        ("grpc-compression: Gzip\n", CompressionEncoding::Gzip),
        ("grpc-compression: zstd\n", CompressionEncoding::Zstd),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start(&loopback_config("", config), dir.path()).await;
        let mut client = HealthClient::new(plain_channel(server.tcp()).await)
            .send_compressed(enc)
            .accept_compressed(enc);
        let resp = client
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
        assert_eq!(resp.into_inner().status(), ServingStatus::Serving);
        server.stop().await;
    }
}

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let p = dir.join("gridgate.yaml");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn bad_configs_fail_with_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: true\n    tls-cert: x\n",
            "server[0].tls-cert: unknown field `tls-cert`",
        ),
        (
            "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: false\n    credentials:\n      tls-server-key: missing.key\n      tls-server-cert: missing.crt\n",
            "server[0].credentials.tls-server-key: cannot read",
        ),
        (
            "server:\n  - !channel\n    address: \"0.0.0.0:0\"\n    insecure-mode: true\n",
            "server[0].address: 0.0.0.0:0 is reachable from other machines but authorization is `none`",
        ),
    ];
    for (text, expected) in cases {
        let path = write_config(dir.path(), text);
        let (code, _, stderr) = run_binary(&["serve", "--config", &path]);
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains(&format!("{path}: {expected}")),
            "expected {expected:?} in:\n{stderr}"
        );
        let (code, _, stderr) = run_binary(&["check-config", &path]);
        assert_eq!(code, 1);
        assert!(stderr.contains(expected), "{stderr}");
    }
}

#[test]
fn a_tls_key_that_is_not_a_key_refuses_to_start() {
    let certs = Certs::new();
    // The key file exists but holds a certificate.
    let text = format!(
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: false\n    credentials:\n      tls-server-key: {}\n      tls-server-cert: {}\n",
        certs.server_cert.display(),
        certs.server_cert.display()
    );
    let path = write_config(certs.dir.path(), &text);
    let (code, _, stderr) = run_binary(&["serve", "--config", &path]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no usable PEM private key"), "{stderr}");
}

#[test]
fn check_config_prints_a_summary() {
    let certs = Certs::new();
    let text = format!(
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n{}instances:\n  - name: team-a\n    cas: {{ backend: memory, max-bytes: 1073741824 }}\n    action-cache: {{ allow-updates: true }}\nbuild-events:\n  store: memory\n",
        certs.credentials_yaml(true)
    );
    let path = write_config(certs.dir.path(), &text);
    let (code, stdout, stderr) = run_binary(&["check-config", &path]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("TLS, client certificates required"),
        "{stdout}"
    );
    assert!(
        stdout.contains("instance \"team-a\": memory CAS 1073741824 bytes"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}

#[test]
fn dev_certs_makes_a_working_set() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let (code, stdout, stderr) = run_binary(&[
        "dev",
        "certs",
        "--out",
        out.to_str().unwrap(),
        "--client",
        "ci-bot",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ci-bot"), "{stdout}");
    for f in [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "ci-bot.crt",
        "ci-bot.key",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("server.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "private keys are not world-readable");
    // Refuses to overwrite without --force.
    let (code, _, stderr) = run_binary(&["dev", "certs", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--force"), "{stderr}");

    // And the set works for mTLS against the real binary.
    let text = "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: false\n    credentials:\n      tls-server-key: certs/server.key\n      tls-server-cert: certs/server.crt\n      tls-client-certs: certs/ca.crt\n";
    let path = write_config(dir.path(), text);
    let mut bin = Binary::start(&["serve", "--config", &path]);
    let addr = bin.listening_addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        let ch = tls_channel(
            addr,
            &out.join("ca.crt"),
            Some((&out.join("ci-bot.crt"), &out.join("ci-bot.key"))),
        )
        .await
        .unwrap();
        health_check(ch).await.unwrap()
    });
    assert_eq!(status, ServingStatus::Serving);
}

#[test]
fn default_serve_warns_that_the_endpoint_is_open() {
    // The embedded default listens on 127.0.0.1:50051; only check it when free.
    if std::net::TcpListener::bind("127.0.0.1:50051").is_err() {
        eprintln!("port 50051 busy; skipping the embedded-default check");
        return;
    }
    let mut bin = Binary::start(&["serve"]);
    let addr = bin.listening_addr();
    assert_eq!(addr, "127.0.0.1:50051".parse().unwrap());
    let warn = bin
        .wait_for_line("endpoint is open", Duration::from_secs(10))
        .expect("open-endpoint warning");
    assert!(warn.contains("WARN"), "{warn}");
    bin.signal("INT");
    assert_eq!(bin.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn sigterm_drains_an_open_stream_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: true\nlimits:\n  shutdown-grace-seconds: 3\n",
    );
    let mut bin = Binary::start(&["serve", "--config", &path]);
    let addr = bin.listening_addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _open_stream = rt.block_on(async {
        let ch = plain_channel(addr).await;
        let mut client = tonic_health::pb::health_client::HealthClient::new(ch);
        // Watch is a server stream that stays open.
        let mut watch = client
            .watch(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        let first = watch.next().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);

        bin.signal("TERM");
        // The open stream is still served while draining: it is told the
        // server is going away.
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let next = watch.next().await.expect("stream open").expect("ok");
                if next.status() == ServingStatus::NotServing {
                    break;
                }
                assert_eq!(next.status(), ServingStatus::Serving);
            }
        })
        .await;
        assert!(drained.is_ok(), "NOT_SERVING while draining");
        // New connections are refused once draining started.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let fresh = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .connect()
            .await;
        assert!(fresh.is_err(), "listener closed during drain");
        watch
    });
    // The stream is still open, so the server waits out the 3 s grace period and exits 0.
    let code = bin.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(0), "stderr: {:#?}", bin.seen);
    assert!(
        bin.seen.iter().any(|l| l.contains("grace period")),
        "{:#?}",
        bin.seen
    );
}

#[test]
fn check_config_refuses_an_rsa_key_too_small_to_verify_with() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("rs1024.pem"),
        include_str!("keys/rs1024.pub.pem"),
    )
    .unwrap();
    let path = write_config(
        dir.path(),
        "server:\n  - !channel\n    address: \"127.0.0.1:0\"\n    insecure-mode: true\nauthorization:\n  method: jwt\n  algorithm: rs256\n  secret: rs1024.pem\n",
    );
    let expected = format!(
        "{path}: authorization.secret: {}: RSA key of 1024 bits; at least 2048 are needed",
        dir.path().join("rs1024.pem").display()
    );
    let (code, _, stderr) = run_binary(&["check-config", &path]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
    // serve refuses to start (rather than answering every token "bad signature").
    let mut serve = Binary::start(&["serve", "--config", &path]);
    assert!(
        serve
            .wait_for_line(&expected, Duration::from_secs(20))
            .is_some(),
        "{:#?}",
        serve.seen
    );
    assert_eq!(serve.wait_exit(Duration::from_secs(20)), Some(1));
}
