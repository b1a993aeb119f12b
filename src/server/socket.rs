//! Listening sockets, TCP or Unix, bound and accepted the same way for the
//! gRPC channels ([`super::listener`]) and the web listener.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::BoundAddr;
use crate::config::ListenAddr;

/// A bound listening socket.
pub(crate) enum Socket {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A Unix socket and its path (removed when serving ends).
    Unix(UnixListener, PathBuf),
}

/// Why a socket could not be bound.
pub(crate) enum BindError {
    /// The operating system refused (address in use, no permission, ...).
    Io(io::Error),
    /// A Unix socket's path holds something that is not a socket.
    NotASocket(PathBuf),
}

/// One accepted connection.
pub(crate) enum Accepted {
    /// A TCP connection (`TCP_NODELAY` set) and its peer.
    Tcp(TcpStream, SocketAddr),
    /// A Unix-socket connection.
    Unix(UnixStream),
}

impl Socket {
    /// Binds `listen`. A socket file left at a Unix path by an earlier run
    /// is replaced; anything else there is refused, never removed.
    pub(crate) async fn bind(listen: &ListenAddr) -> Result<(Socket, BoundAddr), BindError> {
        match listen {
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a).await.map_err(BindError::Io)?;
                let local = l.local_addr().map_err(BindError::Io)?;
                Ok((Socket::Tcp(l), BoundAddr::Tcp(local)))
            }
            ListenAddr::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if !meta.file_type().is_socket() {
                        return Err(BindError::NotASocket(path.clone()));
                    }
                    // A socket file left by an earlier run that did not exit cleanly.
                    let _ = std::fs::remove_file(path);
                }
                let l = UnixListener::bind(path).map_err(BindError::Io)?;
                Ok((Socket::Unix(l, path.clone()), BoundAddr::Unix(path.clone())))
            }
        }
    }

    /// The next connection.
    pub(crate) async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Socket::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Accepted::Tcp(s, peer))
            }
            Socket::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok(Accepted::Unix(s))
            }
        }
    }

    /// Removes a Unix socket's file when serving ends.
    pub(crate) fn remove_file(&self) {
        if let Socket::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}
