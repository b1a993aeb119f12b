//! Shared support for gridgate's black-box tests: throwaway certificates, a real
//! gateway on a loopback port (in-process or as the real binary), and real gRPC
//! clients over plaintext, TLS and mTLS.
#![allow(dead_code)]

pub(crate) mod bazel;
pub(crate) mod buildgrid;
pub(crate) mod pg;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use gridgate::config::Config;
use gridgate::devcerts::DevCa;
use gridgate::server::{BoundAddr, Gateway};
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Certificates written to a temporary directory.
pub(crate) struct Certs {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate signed by `ca` (CN alice, SANs alice.example and a SPIFFE URI).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate from an unrelated CA.
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
    /// The CA behind `ca`, for more client certificates.
    pub authority: DevCa,
}

impl Certs {
    pub(crate) fn new() -> Certs {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = DevCa::new("test CA").expect("ca");
        let other = DevCa::new("rogue CA").expect("rogue ca");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            p
        };
        let server = ca.server(&[]).expect("server cert");
        let client = ca
            .client(
                "alice",
                &["alice.example", "URI:spiffe://example.org/ci/alice"],
            )
            .expect("client cert");
        let rogue = other.client("mallory", &[]).expect("rogue cert");
        Certs {
            ca: write("ca.crt", &ca.pair().cert_pem),
            server_cert: write("server.crt", &server.cert_pem),
            server_key: write("server.key", &server.key_pem),
            client_cert: write("alice.crt", &client.cert_pem),
            client_key: write("alice.key", &client.key_pem),
            rogue_cert: write("mallory.crt", &rogue.cert_pem),
            rogue_key: write("mallory.key", &rogue.key_pem),
            dir,
            authority: ca,
        }
    }

    /// A client certificate from `ca` with this subject (attributes in
    /// certificate order), written as `NAME.crt` / `NAME.key`.
    pub(crate) fn client_with_subject(
        &self,
        name: &str,
        subject: &[(rcgen::DnType, &str)],
    ) -> (PathBuf, PathBuf) {
        let mut dn = rcgen::DistinguishedName::new();
        for (kind, value) in subject {
            dn.push(kind.clone(), *value);
        }
        let pair = self
            .authority
            .client_with_subject(dn, &[])
            .expect("client cert");
        let cert = self.dir.path().join(format!("{name}.crt"));
        let key = self.dir.path().join(format!("{name}.key"));
        std::fs::write(&cert, &pair.cert_pem).expect("write");
        std::fs::write(&key, &pair.key_pem).expect("write");
        (cert, key)
    }

    /// A `credentials:` block for a TLS channel (with client CA when `mtls`).
    pub(crate) fn credentials_yaml(&self, mtls: bool) -> String {
        let mut s = format!(
            "    insecure-mode: false\n    credentials:\n      tls-server-key: {}\n      tls-server-cert: {}\n",
            self.server_key.display(),
            self.server_cert.display()
        );
        if mtls {
            s.push_str(&format!("      tls-client-certs: {}\n", self.ca.display()));
        }
        s
    }
}

/// A gateway running in this process on loopback.
pub(crate) struct TestServer {
    pub addrs: Vec<BoundAddr>,
    /// The web listener's address, when `web:` is configured.
    pub web: Option<BoundAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), gridgate::server::ServerError>>>,
}

impl TestServer {
    /// Parses `yaml` (relative paths from `dir`), binds and serves it.
    pub(crate) async fn start(yaml: &str, dir: &Path) -> TestServer {
        let config = Config::parse(yaml, "test.yaml", dir).expect("config");
        TestServer::start_config(config).await
    }

    pub(crate) async fn start_config(config: Config) -> TestServer {
        let gateway = Gateway::bind(config).await.expect("bind");
        let addrs = gateway.local_addrs();
        let web = gateway.web_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(async move {
            let _ = stopped.await;
        }));
        TestServer {
            addrs,
            web,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The first TCP address.
    pub(crate) fn tcp(&self) -> std::net::SocketAddr {
        self.addrs
            .iter()
            .find_map(|a| match a {
                BoundAddr::Tcp(a) => Some(*a),
                _ => None,
            })
            .expect("a TCP channel")
    }

    /// Stops it and waits for it to finish.
    pub(crate) async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A single-channel config on 127.0.0.1:0 with the given channel extras and the rest.
pub(crate) fn loopback_config(channel_extra: &str, rest: &str) -> String {
    let channel = if channel_extra.is_empty() {
        "    insecure-mode: true\n".to_string()
    } else {
        channel_extra.to_string()
    };
    format!("server:\n  - !channel\n    address: \"127.0.0.1:0\"\n{channel}{rest}")
}

/// A plaintext channel to `addr`, or the connection error.
pub(crate) async fn plain_channel_result(
    addr: std::net::SocketAddr,
) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A plaintext channel to `addr`.
pub(crate) async fn plain_channel(addr: std::net::SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect")
}

/// A TLS channel to `addr` trusting `ca`, optionally presenting a client certificate.
pub(crate) async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).expect("ca")))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).expect("cert"),
            std::fs::read(key).expect("key"),
        ));
    }
    Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .expect("endpoint")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A plaintext channel over a Unix socket.
pub(crate) async fn unix_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("unix connect")
}

/// Calls grpc.health.v1.Health/Check for the whole server.
pub(crate) async fn health_check(
    channel: Channel,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, tonic::Status> {
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(resp.into_inner().status())
}

/// The real `gridgate` binary, started with arguments, its stderr collected.
pub(crate) struct Binary {
    pub child: Child,
    lines: std_mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Binary {
    pub(crate) fn start(args: &[&str]) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gridgate"))
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gridgate");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Binary {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `needle`, returning it.
    pub(crate) fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits for the "listening on ADDR" line and returns ADDR.
    pub(crate) fn listening_addr(&mut self) -> std::net::SocketAddr {
        let line = self
            .wait_for_line("listening on ", Duration::from_secs(30))
            .unwrap_or_else(|| panic!("no listening line; stderr so far: {:#?}", self.seen));
        let rest = &line[line.find("listening on ").expect("marker") + "listening on ".len()..];
        rest.split_whitespace()
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("cannot parse address from {line:?}"))
    }

    /// Sends a signal to the process.
    pub(crate) fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for exit, with a timeout; returns the exit code.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                while let Ok(line) = self.lines.try_recv() {
                    self.seen.push(line);
                }
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion; returns (exit code, stdout, stderr).
pub(crate) fn run_binary(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gridgate"))
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run gridgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A codec that sends and receives raw message bytes, for requests a typed
/// client cannot express (a repeated field, a malformed message).
#[derive(Debug, Clone, Default)]
pub(crate) struct RawCodec;

pub(crate) struct RawEncoder;
pub(crate) struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<bytes::Bytes>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// Calls a unary RPC by path with raw message bytes and optional metadata.
pub(crate) async fn raw_unary(
    channel: Channel,
    path: &'static str,
    message: bytes::Bytes,
    metadata: &[(&'static str, String)],
) -> Result<bytes::Bytes, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(message);
    for (k, v) in metadata {
        req.metadata_mut()
            .insert(*k, v.parse().expect("metadata value"));
    }
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(req, path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

/// A request with `authorization: Bearer TOKEN`.
pub(crate) fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("token is ASCII"),
    );
    req
}
