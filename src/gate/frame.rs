//! gRPC message framing on a request body: peeking the first message without
//! consuming it, and checking every later message of a client stream.
//!
//! A gRPC message on the wire is a 1-byte compressed flag, a 4-byte big-endian
//! length, then the message; HTTP/2 DATA frames bear no relation to message
//! boundaries. [`peek_first`] reads frames until the first message is whole
//! (within a size cap), decompresses it if its flag says so, and returns it with
//! a body that yields exactly the bytes that were read, then the rest, so the
//! service behind the Gate sees the request untouched. [`Guarded`] wraps a body
//! and runs a check on every complete message as it passes, so later messages
//! of a client stream cannot change the instance the first one was admitted for.

use std::io::Read;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::Status;

/// The `grpc-encoding` of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Zstd,
}

impl Encoding {
    /// Reads `grpc-encoding`; an encoding gridgate cannot read is UNIMPLEMENTED
    /// (the Gate adds `grpc-accept-encoding` to that answer).
    pub fn from_headers(headers: &HeaderMap) -> Result<Encoding, Status> {
        let Some(v) = headers.get("grpc-encoding") else {
            return Ok(Encoding::Identity);
        };
        match v.as_bytes() {
            b"identity" => Ok(Encoding::Identity),
            b"gzip" => Ok(Encoding::Gzip),
            b"deflate" => Ok(Encoding::Deflate),
            b"zstd" => Ok(Encoding::Zstd),
            other => Err(Status::unimplemented(format!(
                "grpc-encoding {:?} is not supported (gzip, deflate, zstd, identity are)",
                String::from_utf8_lossy(&other[..other.len().min(32)])
            ))),
        }
    }
}

/// The encodings the Gate can read, for `grpc-accept-encoding`.
pub const ACCEPT_ENCODING: &str = "gzip,deflate,zstd,identity";

/// Limits for reading messages.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest message on the wire (compressed or not).
    pub max_message: usize,
    /// Largest message after decompression.
    pub max_decompressed: usize,
}

/// Decompresses one message, refusing output beyond `limit` (a compression
/// bomb costs at most `limit` bytes of memory).
pub fn decompress(encoding: Encoding, data: &[u8], limit: usize) -> Result<Bytes, Status> {
    let cap = limit.saturating_add(1) as u64;
    let mut out = Vec::new();
    let result = match encoding {
        Encoding::Identity => {
            return Err(Status::internal(
                "compressed flag set but no grpc-encoding header",
            ))
        }
        Encoding::Gzip => flate2::read::GzDecoder::new(data)
            .take(cap)
            .read_to_end(&mut out),
        Encoding::Deflate => flate2::read::ZlibDecoder::new(data)
            .take(cap)
            .read_to_end(&mut out),
        Encoding::Zstd => match zstd::stream::read::Decoder::new(data) {
            Ok(d) => d.take(cap).read_to_end(&mut out),
            Err(e) => Err(e),
        },
    };
    result.map_err(|e| Status::internal(format!("cannot decompress the request: {e}")))?;
    if out.len() > limit {
        return Err(Status::resource_exhausted(format!(
            "request message decompresses to more than {limit} bytes"
        )));
    }
    Ok(Bytes::from(out))
}

/// Reads a message header at the front of `buf`: (compressed flag, length),
/// or `None` while fewer than 5 bytes have arrived. An invalid flag or a length
/// over the limit is refused before the message is read.
fn message_header(buf: &[u8], limits: Limits) -> Result<Option<(bool, usize)>, Status> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let flag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if flag > 1 {
        return Err(Status::internal(format!(
            "invalid gRPC compressed flag {flag}"
        )));
    }
    if len > limits.max_message {
        return Err(Status::resource_exhausted(format!(
            "request message of {len} bytes is over the limit of {} bytes",
            limits.max_message
        )));
    }
    Ok(Some((flag == 1, len)))
}

/// Splits one complete framed message off the front of `buf`, if there is one.
/// Returns (compressed flag, message bytes).
fn split_message(buf: &mut BytesMut, limits: Limits) -> Result<Option<(bool, Bytes)>, Status> {
    match message_header(buf, limits)? {
        Some((compressed, len)) if buf.len() >= 5 + len => {
            buf.advance(5);
            Ok(Some((compressed, buf.split_to(len).freeze())))
        }
        _ => Ok(None),
    }
}

/// The first message of a request, and the body to hand on.
pub struct Peeked {
    /// The first message, decompressed; `None` for an empty request stream.
    pub message: Option<Bytes>,
    /// The untouched request body.
    pub body: Body,
}

/// Reads the first message of `body` without consuming it.
pub async fn peek_first(
    mut body: Body,
    encoding: Encoding,
    limits: Limits,
) -> Result<Peeked, Status> {
    let mut raw = BytesMut::new();
    let mut trailers = None;
    let mut ended = false;
    loop {
        // Look at the message header as soon as there is one, to refuse an
        // oversized message before reading it.
        if let Some((compressed, len)) = message_header(&raw, limits)? {
            if raw.len() >= 5 + len {
                let all = raw.freeze();
                let msg = all.slice(5..5 + len);
                let message = if compressed {
                    decompress(encoding, &msg, limits.max_decompressed)?
                } else {
                    msg
                };
                return Ok(Peeked {
                    message: Some(message),
                    body: Body::new(Replay::new(all, trailers, body, ended)),
                });
            }
        }
        if ended {
            if raw.is_empty() {
                return Ok(Peeked {
                    message: None,
                    body: Body::new(Replay::new(Bytes::new(), trailers, body, true)),
                });
            }
            return Err(Status::internal(
                "request body ended in the middle of a gRPC message",
            ));
        }
        match body.frame().await {
            None => ended = true,
            Some(Err(status)) => return Err(status),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => raw.extend_from_slice(&data),
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    ended = true;
                }
            },
        }
    }
}

/// A body that yields bytes already read, any trailers already read, then the
/// rest of the original body.
struct Replay {
    prefix: Option<Bytes>,
    trailers: Option<HeaderMap>,
    inner: Option<Body>,
}

impl Replay {
    fn new(prefix: Bytes, trailers: Option<HeaderMap>, inner: Body, ended: bool) -> Replay {
        Replay {
            prefix: (!prefix.is_empty()).then_some(prefix),
            trailers,
            inner: (!ended).then_some(inner),
        }
    }
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        match self.inner.as_mut() {
            None => Poll::Ready(None),
            Some(inner) => Pin::new(inner).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.trailers.is_none()
            && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self
            .inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_else(|| SizeHint::with_exact(0));
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        hint.set_lower(hint.lower() + extra);
        if let Some(u) = hint.upper() {
            hint.set_upper(u + extra);
        }
        hint
    }
}

/// Checks one complete (decompressed) message of a client stream.
pub type Check = Box<dyn FnMut(&[u8]) -> Result<(), Status> + Send>;

/// A request body that passes every byte through unchanged and runs a check on
/// each complete message; the first failing check ends the body with its status.
pub struct Guarded {
    inner: Body,
    pending: BytesMut,
    encoding: Encoding,
    limits: Limits,
    check: Check,
    /// A refusal to deliver after the good messages that came before it.
    refusal: Option<Status>,
    failed: bool,
}

impl Guarded {
    /// Wraps `inner`; `check` sees every message, the first included.
    pub fn new(inner: Body, encoding: Encoding, limits: Limits, check: Check) -> Guarded {
        Guarded {
            inner,
            pending: BytesMut::new(),
            encoding,
            limits,
            check,
            refusal: None,
            failed: false,
        }
    }

    /// Checks the messages `data` completes. On a refusal, returns how many
    /// bytes at the front of `data` belong to messages that passed (they are
    /// still delivered, so the service sees every message before the bad one).
    fn inspect(&mut self, data: &Bytes) -> Result<(), (usize, Status)> {
        let carried = self.pending.len();
        self.pending.extend_from_slice(data);
        let mut passed = 0usize;
        let good_in_frame = |passed: usize| passed.saturating_sub(carried);
        loop {
            let next = split_message(&mut self.pending, self.limits)
                .map_err(|s| (good_in_frame(passed), s))?;
            let Some((compressed, msg)) = next else {
                return Ok(());
            };
            let checked = if compressed {
                decompress(self.encoding, &msg, self.limits.max_decompressed)
                    .and_then(|plain| (self.check)(&plain))
            } else {
                (self.check)(&msg)
            };
            if let Err(status) = checked {
                return Err((good_in_frame(passed), status));
            }
            passed += 5 + msg.len();
        }
    }
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(status) = self.refusal.take() {
            self.failed = true;
            return Poll::Ready(Some(Err(status)));
        }
        if self.failed {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let data = data.clone();
                    if let Err((good, status)) = self.inspect(&data) {
                        if good == 0 {
                            self.failed = true;
                            return Poll::Ready(Some(Err(status)));
                        }
                        self.refusal = Some(status);
                        return Poll::Ready(Some(Ok(Frame::data(data.slice(..good)))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(status)) => Poll::Ready(Some(Err(status))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.refusal.is_none() && (self.failed || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn framed(msg: &[u8], compressed: bool) -> Vec<u8> {
        let mut v = vec![u8::from(compressed)];
        v.extend((msg.len() as u32).to_be_bytes());
        v.extend_from_slice(msg);
        v
    }

    fn body_of(chunks: Vec<Vec<u8>>) -> Body {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Status>(Frame::data(Bytes::from(c))));
        Body::new(StreamBody::new(futures_util::stream::iter(frames)))
    }

    const LIMITS: Limits = Limits {
        max_message: 1024,
        max_decompressed: 4096,
    };

    #[tokio::test]
    async fn peek_across_frames_and_replay_untouched() {
        let mut wire = framed(b"hello", false);
        wire.extend(framed(b"world", false));
        let original = wire.clone();
        // Split at awkward places: inside the header and inside the message.
        let chunks = vec![wire[..2].to_vec(), wire[2..7].to_vec(), wire[7..].to_vec()];
        let peeked = peek_first(body_of(chunks), Encoding::Identity, LIMITS)
            .await
            .unwrap();
        assert_eq!(peeked.message.as_deref(), Some(&b"hello"[..]));
        let all = peeked.body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], &original[..]);
    }

    #[tokio::test]
    async fn empty_stream_and_truncated_message() {
        let peeked = peek_first(body_of(vec![]), Encoding::Identity, LIMITS)
            .await
            .unwrap();
        assert!(peeked.message.is_none());
        let err = peek_first(
            body_of(vec![framed(b"abc", false)[..6].to_vec()]),
            Encoding::Identity,
            LIMITS,
        )
        .await
        .err()
        .unwrap();
        assert_eq!(err.code(), tonic::Code::Internal);
    }

    #[tokio::test]
    async fn a_lying_length_prefix_is_refused_before_reading() {
        let mut head = vec![0u8];
        head.extend((u32::MAX).to_be_bytes());
        let err = peek_first(body_of(vec![head]), Encoding::Identity, LIMITS)
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }

    #[tokio::test]
    async fn gzip_and_zstd_are_decompressed_and_bombs_refused() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"instance").unwrap();
        let gz = gz.finish().unwrap();
        let peeked = peek_first(body_of(vec![framed(&gz, true)]), Encoding::Gzip, LIMITS)
            .await
            .unwrap();
        assert_eq!(peeked.message.as_deref(), Some(&b"instance"[..]));

        let bomb = zstd::encode_all(&vec![0u8; 10 << 20][..], 19).unwrap();
        assert!(bomb.len() < 1024);
        let err = peek_first(body_of(vec![framed(&bomb, true)]), Encoding::Zstd, LIMITS)
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);

        // Compressed flag without an encoding.
        let err = peek_first(body_of(vec![framed(&gz, true)]), Encoding::Identity, LIMITS)
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::Internal);
    }

    #[tokio::test]
    async fn guarded_checks_every_message() {
        let mut wire = framed(b"ok", false);
        wire.extend(framed(b"ok", false));
        wire.extend(framed(b"bad", false));
        let chunks = vec![wire[..3].to_vec(), wire[3..9].to_vec(), wire[9..].to_vec()];
        let check: Check = Box::new(|m: &[u8]| {
            if m == b"ok" {
                Ok(())
            } else {
                Err(Status::permission_denied("changed"))
            }
        });
        let guarded = Guarded::new(body_of(chunks), Encoding::Identity, LIMITS, check);
        let err = guarded.collect().await.err().unwrap();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[tokio::test]
    async fn guarded_delivers_the_good_messages_before_a_refusal() {
        // Three messages in one frame, the third refused: the first two are
        // delivered whole, then the error.
        let mut wire = framed(b"ok", false);
        wire.extend(framed(b"ok", false));
        let good_len = wire.len();
        wire.extend(framed(b"bad", false));
        let check: Check = Box::new(|m: &[u8]| {
            if m == b"ok" {
                Ok(())
            } else {
                Err(Status::invalid_argument("changed"))
            }
        });
        let mut guarded = Guarded::new(
            body_of(vec![wire.clone()]),
            Encoding::Identity,
            LIMITS,
            check,
        );
        let first = guarded.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], &wire[..good_len]);
        let err = guarded.frame().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(guarded.frame().await.is_none());
    }
}
