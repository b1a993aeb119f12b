//! The web listener's sockets: TCP or a Unix socket, TLS (offering HTTP/2
//! and HTTP/1.1, with client certificates off, optional or required), and
//! HTTP/1.1 and HTTP/2 served by hyper on each connection.
//!
//! Connections are bounded in number; a connection must finish its TLS
//! handshake, and each HTTP/1.1 request its headers, within the handshake
//! timeout; header sizes are bounded as on the gRPC channels.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::sync::{watch, Semaphore};

use super::app::App;
use super::WebConn;
use crate::config::{ClientCertificates, WebConfig};
use crate::server::socket::{Accepted, BindError, Socket};
use crate::server::tls::{self, TlsError};
use crate::server::BoundAddr;

/// How long a connection may take to finish its TLS handshake, and an
/// HTTP/1.1 request its headers.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Open connections at most.
const MAX_CONNECTIONS: usize = 4096;
/// Largest request head (HTTP/1.1 buffer, HTTP/2 header list).
const MAX_HEADERS: usize = 64 * 1024;
/// How long open connections get to finish at shutdown.
const GRACE: Duration = Duration::from_secs(5);

/// Why the web listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The address cannot be bound (in use, no permission, bad path).
    #[error("web.address: cannot listen on {address}: {source}")]
    Bind {
        /// `web.address` as written.
        address: String,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The certificate, key or client CA files do not make a TLS config.
    #[error("web.credentials: {0}")]
    Tls(#[from] TlsError),
    /// Anything else that keeps the listener from starting.
    #[error("web: {0}")]
    Setup(String),
}

/// A bound web listener.
pub(super) struct Listener {
    socket: Socket,
    tls: Option<Arc<ServerConfig>>,
    /// Where it listens.
    pub addr: BoundAddr,
}

/// The rustls config of the web listener: HTTP/2 and HTTP/1.1, client
/// certificates as configured.
fn tls_config(w: &WebConfig) -> Result<Option<Arc<ServerConfig>>, WebError> {
    let Some(t) = &w.tls else {
        return Ok(None);
    };
    let certs = tls::load_certs(&t.cert)?;
    let key = tls::load_key(&t.key)?;
    let builder = ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match (&t.client_ca, w.client_certificates) {
        (Some(ca), ClientCertificates::Optional | ClientCertificates::Required) => {
            let mut roots = RootCertStore::empty();
            for cert in tls::load_certs(ca)? {
                roots.add(cert).map_err(|e| TlsError::File {
                    path: ca.display().to_string(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider());
            if w.client_certificates == ClientCertificates::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().map_err(|e| TlsError::File {
                path: ca.display().to_string(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Rustls(format!("{} and {}: {e}", t.cert.display(), t.key.display()))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

impl Listener {
    /// Binds the socket and loads the TLS files.
    pub(super) async fn bind(w: &WebConfig) -> Result<Listener, WebError> {
        let tls = tls_config(w)?;
        let (socket, addr) = Socket::bind(&w.listen).await.map_err(|e| match e {
            BindError::Io(source) => WebError::Bind {
                address: w.address.clone(),
                source,
            },
            BindError::NotASocket(path) => WebError::Setup(format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            )),
        })?;
        Ok(Listener { socket, tls, addr })
    }

    /// Whether connections are TLS.
    pub(super) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Accepts and serves connections until `stop` turns true; then gives
    /// open connections [`GRACE`] to finish.
    pub(super) async fn serve(self, app: Arc<App>, mut stop: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                a = accept(&self.socket) => a,
            };
            let (io, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "web: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(io);
                continue;
            };
            // Reap finished connection tasks as we go.
            while tasks.try_join_next().is_some() {}
            let tls = self.tls.clone();
            let app = app.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                let _slot = slot;
                match (io, tls) {
                    (Stream::Tcp(s), None) => {
                        serve_conn(
                            s,
                            WebConn {
                                peer,
                                certificate: None,
                                tls: false,
                            },
                            app,
                            stop,
                        )
                        .await
                    }
                    (Stream::Unix(s), None) => {
                        serve_conn(
                            s,
                            WebConn {
                                peer,
                                certificate: None,
                                tls: false,
                            },
                            app,
                            stop,
                        )
                        .await
                    }
                    (Stream::Tcp(s), Some(cfg)) => {
                        if let Some((s, cert)) = handshake(cfg, s).await {
                            serve_conn(
                                s,
                                WebConn {
                                    peer,
                                    certificate: cert,
                                    tls: true,
                                },
                                app,
                                stop,
                            )
                            .await
                        }
                    }
                    (Stream::Unix(s), Some(cfg)) => {
                        if let Some((s, cert)) = handshake(cfg, s).await {
                            serve_conn(
                                s,
                                WebConn {
                                    peer,
                                    certificate: cert,
                                    tls: true,
                                },
                                app,
                                stop,
                            )
                            .await
                        }
                    }
                }
            });
        }
        self.socket.remove_file();
        let _ = tokio::time::timeout(GRACE + Duration::from_secs(1), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(socket: &Socket) -> io::Result<(Stream, String)> {
    Ok(match socket.accept().await? {
        Accepted::Tcp(s, peer) => (Stream::Tcp(s), peer.to_string()),
        Accepted::Unix(s) => (Stream::Unix(s), "unix".into()),
    })
}

async fn handshake<S>(
    config: Arc<ServerConfig>,
    io: S,
) -> Option<(
    tokio_rustls::server::TlsStream<S>,
    Option<Arc<crate::gate::identity::PeerCertificate>>,
)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(HANDSHAKE, acceptor.accept(io)).await {
        Ok(Ok(s)) => {
            let cert = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(tls::peer_certificate)
                .map(Arc::new);
            Some((s, cert))
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "web: TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}

async fn serve_conn<S>(io: S, conn: WebConn, app: Arc<App>, mut stop: watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(conn);
    let service = hyper::service::service_fn(move |req| {
        let app = app.clone();
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(app.handle(req, conn).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE)
        .max_buf_size(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADERS as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let served = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(served);
    tokio::select! {
        _ = served.as_mut() => {}
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {
            served.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(GRACE, served).await;
        }
    }
}
