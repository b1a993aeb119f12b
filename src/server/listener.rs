//! Listening channels: TCP and Unix sockets, the TLS handshake, and the
//! limit on open connections.
//!
//! Each channel has its own accept loop. Every accepted connection gets a
//! task of its own for its TLS handshake and then its HTTP/2 session
//! ([`super::http2`]), both within the handshake deadline, so a slow or silent
//! client cannot hold up the accept loop or anyone else.

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use tonic::body::Body;
use tower::Service;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::socket::{Accepted, BindError, Socket};
use super::{http2, tls};
use crate::budget::{Budget, Held};
use crate::config::ChannelConfig;
pub use crate::conn::{ConnInfo, ConnLimits, Peer};
use crate::gate::identity::PeerCertificate;

/// The address a channel actually listens on (with the real port for port 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    /// A TCP address, with the port the system chose for port 0.
    Tcp(SocketAddr),
    /// A Unix domain socket path.
    Unix(PathBuf),
}

impl fmt::Display for BoundAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoundAddr::Tcp(a) => write!(f, "{a}"),
            BoundAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
    TlsTcp(Box<TlsStream<TcpStream>>),
    TlsUnix(Box<TlsStream<UnixStream>>),
}

/// One accepted (and, on TLS channels, handshaken) connection: its bytes,
/// what is known about it, and its place under `limits.max-connections`.
pub struct Conn {
    io: Io,
    _open: crate::metrics::OpenConnection,
    _slot: Held,
}

/// Counts open connections (across every channel) against `limits.max-connections`.
pub struct ConnSlots {
    open: Arc<Budget>,
    refused: AtomicU64,
    last_warning: Mutex<Option<std::time::Instant>>,
}

impl ConnSlots {
    /// At most `max` connections open at once.
    pub fn new(max: usize) -> Arc<ConnSlots> {
        Arc::new(ConnSlots {
            open: Budget::new(max),
            refused: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.held()
    }

    /// Counts a refused connection; warns at most every 10 seconds.
    fn refused(&self, channel: &BoundAddr) {
        let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        crate::metrics::connection_refused();
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
            *last = Some(now);
            tracing::warn!(
                channel = %channel,
                max_connections = self.open.max(),
                refused_so_far = total,
                "connection limit reached: closing new connections until some close"
            );
        }
    }
}

macro_rules! delegate {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.get_mut().io {
            Io::Tcp($io) => $e,
            Io::Unix($io) => $e,
            Io::TlsTcp($io) => $e,
            Io::TlsUnix($io) => $e,
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => Pin::new(io).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => Pin::new(io).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, io => Pin::new(io).poll_shutdown(cx))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, io => Pin::new(io).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tcp(io) => io.is_write_vectored(),
            Io::Unix(io) => io.is_write_vectored(),
            Io::TlsTcp(io) => io.is_write_vectored(),
            Io::TlsUnix(io) => io.is_write_vectored(),
        }
    }
}

/// A bound channel, not yet accepting.
pub struct BoundChannel {
    socket: Socket,
    tls: Option<Arc<tls::LiveTls>>,
    /// Where it listens.
    pub addr: BoundAddr,
    /// Whether it requires client certificates.
    pub mtls: bool,
}

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Binding the address failed.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The channel's address as configured.
        address: String,
        /// Why binding failed.
        source: io::Error,
    },
    /// A Unix socket path is taken by something other than a socket, which
    /// is never removed.
    #[error("{address}: {path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The channel's address as configured.
        address: String,
        /// The path that is in the way.
        path: String,
    },
    /// The channel's key, certificate or client CA could not be loaded.
    #[error("{address}: TLS: {source}")]
    Tls {
        /// The channel's address as configured.
        address: String,
        /// What was wrong with the TLS files.
        source: tls::TlsError,
    },
}

impl BoundChannel {
    /// Binds a channel's socket and prepares its TLS acceptor.
    pub async fn bind(channel: &ChannelConfig) -> Result<BoundChannel, ListenError> {
        let tls = match &channel.tls {
            Some(t) => Some(
                tls::load(t, &channel.address).map_err(|source| ListenError::Tls {
                    address: channel.address.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let mtls = channel.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        let (socket, addr) = Socket::bind(&channel.listen).await.map_err(|e| match e {
            BindError::Io(source) => ListenError::Bind {
                address: channel.address.clone(),
                source,
            },
            BindError::NotASocket(path) => ListenError::NotASocket {
                address: channel.address.clone(),
                path: path.display().to_string(),
            },
        })?;
        Ok(BoundChannel {
            socket,
            tls,
            addr,
            mtls,
        })
    }

    /// Whether connections are TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The channel's reloadable TLS settings, if it is a TLS channel.
    pub fn live_tls(&self) -> Option<Arc<tls::LiveTls>> {
        self.tls.clone()
    }

    /// Accepts connections until `stop` turns true and serves each with
    /// `service` (TLS handshakes and HTTP/2 each in the connection's own task,
    /// so a slow client holds up nobody). Connections beyond what `slots`
    /// allows are closed at once. Every connection task holds a clone of
    /// `alive`, so the caller knows when the last one has ended.
    pub async fn accept_loop<S, B>(self, serving: Serving<S>, mut stop: watch::Receiver<bool>)
    where
        S: Service<Request<Body>, Response = Response<B>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
        B: http_body::Body<Data = bytes::Bytes, Error = tonic::Status> + Send + Unpin + 'static,
    {
        let addr = self.addr.clone();
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                a = accept(&self.socket) => a,
            };
            let (io, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the
                    // connections we have, try again shortly.
                    tracing::warn!(channel = %addr, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let at = Instant::now();
            let Some(slot) = serving.slots.open.try_take(1) else {
                drop(io);
                serving.slots.refused(&addr);
                continue;
            };
            let local = match &peer {
                Peer::Tcp(a) => is_loopback(a),
                Peer::Unix => true,
            };
            let tls = self
                .tls
                .as_ref()
                .map(|live| TlsAcceptor::from(live.current()));
            let serving = serving.clone();
            let channel = addr.clone();
            let drain = stop.clone();
            tokio::spawn(async move {
                let _alive = serving.alive.clone();
                let deadline = at + serving.http2.handshake_timeout;
                let (io, certificate, transport) = match tls {
                    None => {
                        let transport = match &io {
                            Io::Unix(_) => "unix",
                            _ => "tcp",
                        };
                        (io, None, transport)
                    }
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout_at(deadline.into(), handshake(acceptor, io));
                        match handshake.await {
                            Ok(Ok((io, cert))) => (io, cert, "tls"),
                            Ok(Err(e)) => {
                                crate::metrics::tls_handshake_failure("error");
                                tracing::info!(channel = %channel, peer = %peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                crate::metrics::tls_handshake_failure("timeout");
                                tracing::info!(channel = %channel, peer = %peer, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                let info = Arc::new(ConnInfo::new(
                    peer,
                    local,
                    certificate.map(Arc::new),
                    transport == "tls",
                    serving.conn_limits,
                ));
                let conn = Conn {
                    io,
                    _open: crate::metrics::OpenConnection::new(transport),
                    _slot: slot,
                };
                http2::serve_connection(conn, info, at, serving.service, serving.http2, drain)
                    .await;
            });
        }
        self.socket.remove_file();
    }
}

/// What every connection of every channel is served with.
pub struct Serving<S> {
    /// The request stack.
    pub service: S,
    /// HTTP/2 settings and connection deadlines.
    pub http2: Arc<http2::Http2Settings>,
    /// Each connection's own budgets.
    pub conn_limits: ConnLimits,
    /// Open connections, against `limits.max-connections`.
    pub slots: Arc<ConnSlots>,
    /// Held by every connection task: when the last clone is gone, every
    /// connection has ended.
    pub alive: mpsc::Sender<()>,
}

impl<S: Clone> Clone for Serving<S> {
    fn clone(&self) -> Self {
        Serving {
            service: self.service.clone(),
            http2: self.http2.clone(),
            conn_limits: self.conn_limits,
            slots: self.slots.clone(),
            alive: self.alive.clone(),
        }
    }
}

fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

async fn accept(socket: &Socket) -> io::Result<(Io, Peer)> {
    Ok(match socket.accept().await? {
        Accepted::Tcp(s, peer) => (Io::Tcp(s), Peer::Tcp(peer)),
        Accepted::Unix(s) => (Io::Unix(s), Peer::Unix),
    })
}

async fn handshake(acceptor: TlsAcceptor, io: Io) -> io::Result<(Io, Option<PeerCertificate>)> {
    Ok(match io {
        Io::Tcp(s) => {
            let tls = acceptor.accept(s).await?;
            let cert = first_cert(tls.get_ref().1);
            (Io::TlsTcp(Box::new(tls)), cert)
        }
        Io::Unix(s) => {
            let tls = acceptor.accept(s).await?;
            let cert = first_cert(tls.get_ref().1);
            (Io::TlsUnix(Box::new(tls)), cert)
        }
        other => (other, None),
    })
}

fn first_cert(conn: &rustls::ServerConnection) -> Option<PeerCertificate> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(tls::peer_certificate)
}
