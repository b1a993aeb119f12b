//! Listening channels: TCP and Unix sockets, the TLS handshake, and what is
//! known about each connection ([`ConnInfo`], attached to every request).
//!
//! Each channel has its own accept loop. TLS handshakes run in their own tasks
//! with a timeout, so a slow or silent client cannot hold up the accept loop;
//! finished connections are handed to the HTTP/2 server through one queue.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

use super::tls;
use crate::config::{ChannelConfig, ListenAddr};
use crate::gate::identity::PeerCertificate;

/// The address a channel actually listens on (with the real port for port 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    Tcp(SocketAddr),
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

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    Unix,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// What is known about a connection; tonic puts it in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The remote peer.
    pub peer: Peer,
    /// Loopback TCP or a Unix socket.
    pub local: bool,
    /// The verified client certificate (channels with `tls-client-certs`).
    pub certificate: Option<Arc<PeerCertificate>>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The last bearer token verified on this connection (never logged).
    pub token: Arc<crate::gate::jwt::ConnectionToken>,
}

enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
    TlsTcp(Box<TlsStream<TcpStream>>),
    TlsUnix(Box<TlsStream<UnixStream>>),
}

impl Io {
    /// Waits until a TCP peer sent its first bytes (or closed). Unix-socket
    /// peers are local and not waited for.
    async fn first_bytes(&self) -> io::Result<()> {
        match self {
            Io::Tcp(s) => s.peek(&mut [0u8; 1]).await.map(|_| ()),
            _ => Ok(()),
        }
    }
}

/// One accepted (and, on TLS channels, handshaken) connection.
pub struct Conn {
    io: Io,
    info: ConnInfo,
    _open: crate::metrics::OpenConnection,
    _slot: ConnSlot,
}

/// Counts open connections (across every channel) against `limits.max-connections`.
pub struct ConnSlots {
    open: AtomicUsize,
    max: usize,
    refused: AtomicU64,
    last_warning: Mutex<Option<std::time::Instant>>,
}

impl ConnSlots {
    pub fn new(max: usize) -> Arc<ConnSlots> {
        Arc::new(ConnSlots {
            open: AtomicUsize::new(0),
            max,
            refused: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn try_take(self: &Arc<Self>) -> Option<ConnSlot> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnSlot(self.clone()))
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
                max_connections = self.max,
                refused_so_far = total,
                "connection limit reached: closing new connections until some close"
            );
        }
    }
}

/// One open connection's place under the limit; released on drop.
pub struct ConnSlot(Arc<ConnSlots>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
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

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
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
    #[error("cannot listen on {address}: {source}")]
    Bind { address: String, source: io::Error },
    #[error("{address}: {path} exists and is not a socket; refusing to replace it")]
    NotASocket { address: String, path: String },
    #[error("{address}: TLS: {source}")]
    Tls {
        address: String,
        source: tls::TlsError,
    },
}

impl BoundChannel {
    /// Binds a channel's socket and prepares its TLS acceptor.
    pub async fn bind(channel: &ChannelConfig) -> Result<BoundChannel, ListenError> {
        let tls = match &channel.tls {
            Some(t) => Some(tls::LiveTls::load(t).map_err(|source| ListenError::Tls {
                address: channel.address.clone(),
                source,
            })?),
            None => None,
        };
        let mtls = channel.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        let bind_err = |source| ListenError::Bind {
            address: channel.address.clone(),
            source,
        };
        let (socket, addr) = match &channel.listen {
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a).await.map_err(bind_err)?;
                let local = l.local_addr().map_err(bind_err)?;
                (Socket::Tcp(l), BoundAddr::Tcp(local))
            }
            ListenAddr::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if !meta.file_type().is_socket() {
                        return Err(ListenError::NotASocket {
                            address: channel.address.clone(),
                            path: path.display().to_string(),
                        });
                    }
                    // A socket file left by an earlier run that did not exit cleanly.
                    let _ = std::fs::remove_file(path);
                }
                let l = UnixListener::bind(path).map_err(bind_err)?;
                (Socket::Unix(l, path.clone()), BoundAddr::Unix(path.clone()))
            }
        };
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

    /// Accepts connections until `stop` turns true, sending each finished
    /// connection to `out`. Connections beyond what `slots` allows are closed
    /// at once.
    pub async fn accept_loop(
        self,
        out: mpsc::Sender<Conn>,
        mut stop: watch::Receiver<bool>,
        handshake_timeout: Duration,
        slots: Arc<ConnSlots>,
    ) {
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
            let Some(slot) = slots.try_take() else {
                drop(io);
                slots.refused(&addr);
                continue;
            };
            let local = match &peer {
                Peer::Tcp(a) => is_loopback(a),
                Peer::Unix => true,
            };
            match &self.tls {
                None => {
                    let transport = match &self.socket {
                        Socket::Tcp(_) => "tcp",
                        Socket::Unix(..) => "unix",
                    };
                    let out = out.clone();
                    let channel = addr.clone();
                    tokio::spawn(async move {
                        // A client that connects and sends nothing would hold
                        // its connection (and a place under max-connections)
                        // forever: it gets the handshake timeout to start.
                        if tokio::time::timeout(handshake_timeout, io.first_bytes())
                            .await
                            .is_err()
                        {
                            tracing::info!(channel = %channel, peer = %peer, "no request before the handshake timeout; closed");
                            return;
                        }
                        let conn = Conn {
                            io,
                            info: ConnInfo {
                                peer,
                                local,
                                certificate: None,
                                tls: false,
                                token: Arc::default(),
                            },
                            _open: crate::metrics::OpenConnection::new(transport),
                            _slot: slot,
                        };
                        let _ = out.send(conn).await;
                    });
                }
                Some(live) => {
                    let acceptor = TlsAcceptor::from(live.current());
                    let out = out.clone();
                    let channel = addr.clone();
                    tokio::spawn(async move {
                        let handshake = tokio::time::timeout(
                            handshake_timeout,
                            handshake(acceptor, io, peer.clone(), local, slot),
                        );
                        match handshake.await {
                            Ok(Ok(conn)) => {
                                let _ = out.send(conn).await;
                            }
                            Ok(Err(e)) => {
                                crate::metrics::tls_handshake_failure("error");
                                tracing::info!(channel = %channel, peer = %peer, error = %e, "TLS handshake failed");
                            }
                            Err(_) => {
                                crate::metrics::tls_handshake_failure("timeout");
                                tracing::info!(channel = %channel, peer = %peer, "TLS handshake timed out");
                            }
                        }
                    });
                }
            }
        }
        if let Socket::Unix(_, path) = &self.socket {
            let _ = std::fs::remove_file(path);
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
    match socket {
        Socket::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Io::Tcp(s), Peer::Tcp(peer)))
        }
        Socket::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            Ok((Io::Unix(s), Peer::Unix))
        }
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    io: Io,
    peer: Peer,
    local: bool,
    slot: ConnSlot,
) -> io::Result<Conn> {
    let (io, certs) = match io {
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
    };
    Ok(Conn {
        io,
        info: ConnInfo {
            peer,
            local,
            certificate: certs.map(Arc::new),
            tls: true,
            token: Arc::default(),
        },
        _open: crate::metrics::OpenConnection::new("tls"),
        _slot: slot,
    })
}

fn first_cert(conn: &rustls::ServerConnection) -> Option<PeerCertificate> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(tls::peer_certificate)
}
