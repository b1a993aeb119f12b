//! Serving one client connection with hyper's HTTP/2 server: the settings
//! gridgate advertises, the deadline by which a client must have spoken, the
//! close of idle connections, and the graceful drain at shutdown.
//!
//! A connection must speak. The handshake deadline
//! (`limits.tls-handshake-timeout-seconds`, counted from the accept) runs
//! until the client's HTTP/2 connection preface and its first SETTINGS frame
//! have arrived, on plaintext and TLS alike: a socket that sends one byte, or
//! a TLS session that completes its handshake and then stays silent, is
//! closed when it runs out, and gives its place under `limits.max-connections`
//! back. After that, a connection with no open stream for
//! `limits.idle-connection-timeout-seconds` is sent GOAWAY and closed.
//!
//! Every request of a connection carries an `Arc<ConnInfo>` in its
//! extensions; its response body holds the connection's open-stream count
//! until hyper drops it (the stream ended or was reset).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tonic::body::Body;
use tonic::Status;
use tower::{Service, ServiceExt};

use crate::conn::{ConnInfo, OpenStream};

/// The HTTP/2 preface every client sends first (RFC 9113, section 3.4).
const PREFACE_LEN: usize = 24;
/// An HTTP/2 frame header.
const FRAME_HEADER_LEN: usize = 9;
/// How long an idle connection sent GOAWAY may take to finish closing.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The HTTP/2 settings and connection deadlines, from `limits:`.
#[derive(Debug, Clone)]
pub struct Http2Settings {
    /// Until the preface and first SETTINGS have arrived, from the accept.
    pub handshake_timeout: Duration,
    /// A connection without an open stream this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 keepalive pings.
    pub keepalive_interval: Duration,
    /// An unanswered ping closes the connection after this.
    pub keepalive_timeout: Duration,
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE as advertised. The Gate enforces the
    /// configured `max-header-list-bytes` itself, so that a caller over it
    /// gets a gRPC status rather than HTTP 431; this is the hard ceiling
    /// above it (see [`header_list_ceiling`]).
    pub max_header_list_size: u32,
    /// SETTINGS_MAX_FRAME_SIZE.
    pub max_frame_size: u32,
}

/// The header list size hyper accepts, given the configured limit: four
/// times it, at least 1 MiB. Headers beyond the configured limit but under
/// this are refused by the Gate with RESOURCE_EXHAUSTED naming the limit;
/// hyper itself never decodes more than this per request.
pub fn header_list_ceiling(configured: u32) -> u32 {
    configured.saturating_mul(4).max(1 << 20)
}

/// A connection whose preface the server watches for.
pub trait Watched: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Watched for T {}

/// Serves one connection until it closes, the client stays silent past its
/// deadline, it is idle too long, or `drain` turns true (then GOAWAY, and
/// the open streams may finish).
pub async fn serve_connection<I, S, B>(
    io: I,
    info: Arc<ConnInfo>,
    accepted: Instant,
    service: S,
    settings: Arc<Http2Settings>,
    mut drain: watch::Receiver<bool>,
) where
    I: Watched,
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes, Error = Status> + Send + Unpin + 'static,
{
    let spoke = Arc::new(AtomicBool::new(false));
    let io = PrefaceWatch::new(io, spoke.clone());
    let conn_info = info.clone();
    let hyper_service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let stream = conn_info.stream_opened();
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(conn_info.clone());
        let call = service.clone().oneshot(req);
        async move {
            let resp = match call.await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(resp.map(|inner| Tracked {
                inner,
                _stream: stream,
                ended: false,
            }))
        }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(settings.max_header_list_size)
        .max_frame_size(settings.max_frame_size)
        // gRPC clients do not read `date`; encoding it costs on every response.
        .auto_date_header(false);
    let conn = builder.serve_connection(TokioIo::new(io), hyper_service);
    tokio::pin!(conn);

    let handshake_deadline =
        tokio::time::sleep_until((accepted + settings.handshake_timeout).into());
    tokio::pin!(handshake_deadline);
    let mut handshake_pending = true;
    let idle_check = tokio::time::sleep(settings.idle_timeout);
    tokio::pin!(idle_check);
    let mut closing = false;
    let mut idle_closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %info.peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = &mut handshake_deadline, if handshake_pending => {
                handshake_pending = false;
                if !spoke.load(Ordering::Acquire) {
                    tracing::info!(
                        peer = %info.peer,
                        timeout_seconds = settings.handshake_timeout.as_secs(),
                        "no HTTP/2 preface and SETTINGS before the handshake timeout; closed"
                    );
                    return;
                }
            }
            _ = &mut idle_check, if !closing || idle_closing => {
                if idle_closing {
                    // GOAWAY went out a while ago and the client did not
                    // answer its ping: with no stream open, nothing is lost.
                    tracing::debug!(peer = %info.peer, "idle connection did not finish its GOAWAY; closed");
                    return;
                }
                let idle = info.idle_for();
                if idle >= settings.idle_timeout {
                    tracing::debug!(peer = %info.peer, idle_seconds = idle.as_secs(), "idle connection closed");
                    closing = true;
                    idle_closing = true;
                    conn.as_mut().graceful_shutdown();
                    idle_check.as_mut().reset((Instant::now() + IDLE_CLOSE_GRACE).into());
                } else {
                    let left = settings.idle_timeout - idle;
                    idle_check.as_mut().reset((Instant::now() + left).into());
                }
            }
            changed = drain.wait_for(|d| *d), if !closing => {
                closing = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                } else {
                    // The server is gone without a drain: close now.
                    return;
                }
            }
        }
    }
}

/// Reads through to the connection and notes when the client's preface and
/// first frame (SETTINGS, which the preface must be followed by) are in.
struct PrefaceWatch<I> {
    io: I,
    /// The first bytes: the preface and the first frame's header.
    head: [u8; PREFACE_LEN + FRAME_HEADER_LEN],
    seen: usize,
    spoke: Arc<AtomicBool>,
    done: bool,
}

impl<I> PrefaceWatch<I> {
    fn new(io: I, spoke: Arc<AtomicBool>) -> PrefaceWatch<I> {
        PrefaceWatch {
            io,
            head: [0; PREFACE_LEN + FRAME_HEADER_LEN],
            seen: 0,
            spoke,
            done: false,
        }
    }

    fn note(&mut self, bytes: &[u8]) {
        let room = self.head.len().saturating_sub(self.seen);
        let copy = room.min(bytes.len());
        if copy > 0 {
            self.head[self.seen..self.seen + copy].copy_from_slice(&bytes[..copy]);
        }
        self.seen = self.seen.saturating_add(bytes.len());
        if self.seen >= self.head.len() {
            let h = &self.head[PREFACE_LEN..];
            let frame_len =
                (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            if self.seen >= self.head.len() + frame_len {
                self.done = true;
                self.spoke.store(true, Ordering::Release);
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PrefaceWatch<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if !self.done {
            if let Poll::Ready(Ok(())) = &polled {
                let new = &buf.filled()[before..];
                self.note(new);
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for PrefaceWatch<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A response body that keeps its stream counted as open until dropped. A
/// body that fails after the response began ends with its status as
/// trailers, as gRPC clients expect, rather than with a reset stream.
struct Tracked<B> {
    inner: B,
    _stream: OpenStream,
    ended: bool,
}

impl<B> HttpBody for Tracked<B>
where
    B: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(status))) => {
                self.ended = true;
                let trailers = crate::gate::frame::status_trailers(&status);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_and_first_settings_frame_make_a_client_spoken() {
        let spoke = Arc::new(AtomicBool::new(false));
        let mut w = PrefaceWatch::new((), spoke.clone());
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // SETTINGS with one 6-byte setting.
        wire.extend([0, 0, 6, 4, 0, 0, 0, 0, 0]);
        wire.extend([0, 3, 0, 0, 0, 100]);
        for b in &wire[..wire.len() - 1] {
            w.note(std::slice::from_ref(b));
            assert!(!spoke.load(Ordering::Acquire));
        }
        w.note(&wire[wire.len() - 1..]);
        assert!(spoke.load(Ordering::Acquire));
    }

    #[test]
    fn one_byte_is_not_speaking() {
        let spoke = Arc::new(AtomicBool::new(false));
        let mut w = PrefaceWatch::new((), spoke.clone());
        w.note(b"P");
        assert!(!spoke.load(Ordering::Acquire));
    }

    #[test]
    fn the_ceiling_is_above_the_configured_limit() {
        assert_eq!(header_list_ceiling(16 * 1024), 1 << 20);
        assert_eq!(header_list_ceiling(1 << 20), 4 << 20);
        assert_eq!(header_list_ceiling(u32::MAX), u32::MAX);
    }
}
