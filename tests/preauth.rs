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
