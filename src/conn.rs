//! What is known about one client connection, shared by every request on it:
//! the peer, its verified client certificate, the last token it sent, and its
//! own shares of the budgets that a caller may hold before and while the Gate
//! decides (see [`crate::gate::shares`]).
//!
//! The listener makes one [`ConnInfo`] per accepted connection; the HTTP/2
//! server puts an `Arc<ConnInfo>` into the extensions of every request of that
//! connection and counts its open streams, so that a connection with none for
//! `limits.idle-connection-timeout-seconds` is closed.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::budget::Budget;
use crate::gate::identity::PeerCertificate;
use crate::gate::jwt::ConnectionToken;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A Unix-socket peer (always on this machine).
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

/// The per-connection maxima of a connection's budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Requests on open routes and by anonymous callers in progress at once.
    pub anonymous_requests: usize,
    /// Bytes of first messages buffered before the Gate decided, all callers.
    pub pending_bytes: usize,
    /// The part of `pending_bytes` anonymous callers may hold.
    pub anonymous_pending_bytes: usize,
}

impl ConnLimits {
    /// No limits (for servers without a Gate in front, and tests).
    pub const UNLIMITED: ConnLimits = ConnLimits {
        anonymous_requests: usize::MAX,
        pending_bytes: usize::MAX,
        anonymous_pending_bytes: usize::MAX,
    };
}

/// A connection's own budgets.
#[derive(Debug)]
pub struct ConnShares {
    /// Open-route and anonymous requests in progress on this connection.
    pub anonymous_requests: Arc<Budget>,
    /// First-message bytes buffered before a decision on this connection.
    pub pending_bytes: Arc<Budget>,
    /// The anonymous callers' part of `pending_bytes`.
    pub anonymous_pending_bytes: Arc<Budget>,
}

impl ConnShares {
    fn new(limits: ConnLimits) -> ConnShares {
        ConnShares {
            anonymous_requests: Budget::new(limits.anonymous_requests),
            pending_bytes: Budget::new(limits.pending_bytes),
            anonymous_pending_bytes: Budget::new(limits.anonymous_pending_bytes),
        }
    }
}

/// What is known about a connection; every request carries an `Arc` of it.
#[derive(Debug)]
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
    pub token: ConnectionToken,
    /// The connection's shares of the Gate's budgets.
    pub shares: ConnShares,
    activity: Activity,
}

impl ConnInfo {
    /// A connection's record, with its budgets.
    pub fn new(
        peer: Peer,
        local: bool,
        certificate: Option<Arc<PeerCertificate>>,
        tls: bool,
        limits: ConnLimits,
    ) -> ConnInfo {
        ConnInfo {
            peer,
            local,
            certificate,
            tls,
            token: ConnectionToken::default(),
            shares: ConnShares::new(limits),
            activity: Activity::new(),
        }
    }

    /// Counts a stream as open until the returned guard drops.
    pub fn stream_opened(self: &Arc<Self>) -> OpenStream {
        self.activity.open.fetch_add(1, Ordering::AcqRel);
        OpenStream(self.clone())
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        self.activity.open.load(Ordering::Acquire)
    }

    /// How long the connection has had no open stream (zero while one is open).
    pub fn idle_for(&self) -> Duration {
        if self.open_streams() > 0 {
            return Duration::ZERO;
        }
        let since = Duration::from_millis(self.activity.idle_since_ms.load(Ordering::Acquire));
        self.activity.epoch.elapsed().saturating_sub(since)
    }
}

/// When the connection last became idle.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    open: AtomicUsize,
    /// Milliseconds after `epoch` at which the last open stream ended.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            open: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }
}

/// One open stream of a connection; counted until dropped.
#[derive(Debug)]
pub struct OpenStream(Arc<ConnInfo>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let a = &self.0.activity;
        if a.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = u64::try_from(a.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
            a.idle_since_ms.store(now, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_time_counts_from_the_last_stream() {
        let c = Arc::new(ConnInfo::new(
            Peer::Unix,
            true,
            None,
            false,
            ConnLimits::UNLIMITED,
        ));
        let a = c.stream_opened();
        let b = c.stream_opened();
        assert_eq!(c.open_streams(), 2);
        assert_eq!(c.idle_for(), Duration::ZERO);
        drop(a);
        assert_eq!(c.idle_for(), Duration::ZERO, "one still open");
        drop(b);
        assert_eq!(c.open_streams(), 0);
        std::thread::sleep(Duration::from_millis(30));
        assert!(c.idle_for() >= Duration::from_millis(20));
    }
}
