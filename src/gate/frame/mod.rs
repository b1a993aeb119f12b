//! gRPC message framing on a request body: reading the first message before
//! the Gate decides, and holding every later message to the same rules.
//!
//! A gRPC message on the wire is a 1-byte compressed flag, a 4-byte big-endian
//! length, then the message; HTTP/2 DATA frames bear no relation to message
//! boundaries. The rule this module keeps: **what the Gate decoded is exactly
//! what the service or upstream receives, and nothing else.**
//!
//! - A compressed message is decoded strictly: one gzip member, one zlib
//!   stream or one zstd frame, and nothing after it. Decoders differ on the
//!   rest (grpc-js, Java, Go and Python read every gzip member, others only the
//!   first), so a message with bytes the decoder did not consume is
//!   INVALID_ARGUMENT.
//! - Messages are passed on as the Gate decoded them: uncompressed (flag 0,
//!   valid whatever `grpc-encoding` says), so no decoder behind the Gate reads
//!   them another way.
//! - A unary (or server-streaming) call carries one message: [`read_first`]
//!   reads its whole body before the Gate decides, and a second message is
//!   INVALID_ARGUMENT, so nothing of such a request is passed on.
//! - On client streams every message is whole and checked before it is passed
//!   on ([`Checked`]); each is held to `limits.max-message-bytes`.
//! - HTTP/2 request trailers are refused on every route: gRPC clients never
//!   send them, and tonic would merge them into the request's metadata (an
//!   `authorization` or `x-request-actor` after the Gate looked).

use std::collections::VecDeque;
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::Status;

/// The `grpc-encoding` of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// No compression.
    Identity,
    /// gzip (RFC 1952), one member.
    Gzip,
    /// zlib (RFC 1950), as gRPC's `deflate`.
    Deflate,
    /// zstd (RFC 8878), one frame.
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

/// Decompresses one message strictly: exactly one gzip member, zlib stream
/// or zstd frame, every input byte consumed, at most `limit` bytes out (a
/// compression bomb costs at most `limit` bytes of memory).
pub fn decompress(encoding: Encoding, data: &[u8], limit: usize) -> Result<Bytes, Status> {
    let cap = limit.saturating_add(1) as u64;
    let mut out = Vec::new();
    let bad = |e: std::io::Error| {
        Status::invalid_argument(format!("cannot decompress the request message: {e}"))
    };
    let rest: &[u8] = match encoding {
        Encoding::Identity => {
            return Err(Status::internal(
                "compressed flag set but no grpc-encoding header",
            ))
        }
        Encoding::Gzip => {
            let mut d = flate2::bufread::GzDecoder::new(data);
            (&mut d).take(cap).read_to_end(&mut out).map_err(bad)?;
            if out.len() > limit {
                return Err(too_large(limit));
            }
            if d.header().is_none() {
                return Err(Status::invalid_argument(
                    "cannot decompress the request message: not gzip",
                ));
            }
            d.into_inner()
        }
        Encoding::Deflate => {
            let mut d = flate2::bufread::ZlibDecoder::new(data);
            (&mut d).take(cap).read_to_end(&mut out).map_err(bad)?;
            if out.len() > limit {
                return Err(too_large(limit));
            }
            d.into_inner()
        }
        Encoding::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(data)
                .map_err(bad)?
                .single_frame();
            (&mut d).take(cap).read_to_end(&mut out).map_err(bad)?;
            if out.len() > limit {
                return Err(too_large(limit));
            }
            d.finish()
        }
    };
    if !rest.is_empty() {
        return Err(Status::invalid_argument(format!(
            "the compressed request message has {} bytes after its end (a second gzip member \
             or zstd frame, or trailing data): refused, as decoders differ on them",
            rest.len()
        )));
    }
    Ok(Bytes::from(out))
}

fn too_large(limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "request message decompresses to more than {limit} bytes (limits.max-message-bytes)"
    ))
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
            "request message of {len} bytes is over the limit of {} bytes (limits.max-message-bytes)",
            limits.max_message
        )));
    }
    Ok(Some((flag == 1, len)))
}

/// A message as the Gate decoded it.
struct Decoded {
    /// The message itself (decompressed).
    message: Bytes,
    /// The message framed as it is passed on: uncompressed.
    framed: Bytes,
}

/// Splits one complete message off the front of `buf`, decoded.
fn split_message(
    buf: &mut BytesMut,
    encoding: Encoding,
    limits: Limits,
) -> Result<Option<Decoded>, Status> {
    let Some((compressed, len)) = message_header(buf, limits)? else {
        return Ok(None);
    };
    if buf.len() < 5 + len {
        return Ok(None);
    }
    let framed = buf.split_to(5 + len).freeze();
    if !compressed {
        return Ok(Some(Decoded {
            message: framed.slice(5..),
            framed,
        }));
    }
    let message = decompress(encoding, &framed[5..], limits.max_decompressed)?;
    Ok(Some(Decoded {
        framed: reframe(&message),
        message,
    }))
}

/// Splits one complete message off the front of `buf` and decodes it (the
/// one decoder: strict decompression within `limits`); `None` until a whole
/// message is there.
pub fn next_message(
    buf: &mut BytesMut,
    encoding: Encoding,
    limits: Limits,
) -> Result<Option<Bytes>, Status> {
    Ok(split_message(buf, encoding, limits)?.map(|d| d.message))
}

/// `message` framed uncompressed.
pub fn reframe(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// `status` as the trailers that end a gRPC response (`grpc-status`, and
/// `grpc-message` percent-encoded as tonic encodes it).
pub fn status_trailers(status: &Status) -> HeaderMap {
    let mut headers = status.clone().into_http::<Body>().into_parts().0.headers;
    headers.remove(http::header::CONTENT_TYPE);
    headers
}

fn trailers_refused() -> Status {
    Status::invalid_argument(
        "request trailers are not accepted (gRPC clients send none; they could carry credentials)",
    )
}

fn second_message() -> Status {
    Status::invalid_argument("this RPC takes one request message; the request carried more")
}

/// How many messages a request of a route carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cardinality {
    /// Unary and server-streaming calls: one message (or none, the default).
    One,
    /// Client and bidirectional streams.
    Many,
}

/// The first message of a request, and the rest of the request to hand on.
pub struct FirstMessage {
    /// The first message, decoded; `None` for an empty request stream.
    pub message: Option<Bytes>,
    rest: Checked,
}

impl FirstMessage {
    /// The request body as it is passed on: the first message as the Gate
    /// decoded it, then every later one, each checked with `check` first.
    pub fn into_body(self, check: Option<Check>, slot: Option<RefusalSlot>) -> Body {
        let mut rest = self.rest;
        rest.check = check;
        rest.slot = slot;
        // Later messages read together with the first are checked now.
        if let Err(status) = rest.drain_pending() {
            rest.fail(status);
        }
        Body::new(rest)
    }
}

/// Reads the first message of `body` before the Gate decides. For a route
/// that carries [`Cardinality::One`] message the whole body is read (a second
/// message is INVALID_ARGUMENT, so nothing of it is passed on); for streams,
/// up to the end of the first message. Every byte is offered to `pending`
/// (the budgets of bytes buffered before a decision) before it is kept; a
/// refusal from it ends the read.
pub async fn read_first(
    mut body: Body,
    encoding: Encoding,
    limits: Limits,
    cardinality: Cardinality,
    mut pending: impl FnMut(usize) -> Result<(), Status>,
) -> Result<FirstMessage, Status> {
    let mut raw = BytesMut::new();
    let mut first: Option<Decoded> = None;
    let mut ended = false;
    loop {
        if first.is_none() {
            first = split_message(&mut raw, encoding, limits)?;
        }
        if first.is_some() && cardinality == Cardinality::One && !raw.is_empty() {
            return Err(second_message());
        }
        match (&first, cardinality, ended) {
            (Some(_), Cardinality::Many, _) | (Some(_), Cardinality::One, true) => break,
            (None, _, true) => {
                if raw.is_empty() {
                    break;
                }
                return Err(Status::internal(
                    "request body ended in the middle of a gRPC message",
                ));
            }
            _ => {}
        }
        match body.frame().await {
            None => ended = true,
            Some(Err(status)) => return Err(status),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    pending(data.len())?;
                    raw.extend_from_slice(&data);
                }
                Err(_) => return Err(trailers_refused()),
            },
        }
    }
    let (message, framed) = match first {
        Some(d) => (Some(d.message), Some(d.framed)),
        None => (None, None),
    };
    let mut rest = Checked::new(body, encoding, limits, cardinality, None);
    if ended {
        rest.inner = None;
    }
    rest.seen = usize::from(framed.is_some());
    rest.ready.extend(framed);
    rest.pending = raw;
    Ok(FirstMessage { message, rest })
}

/// Where a [`Checked`] body reports its refusal, so that whoever forwards
/// the body (an upstream) can answer the caller with it rather than with
/// the transport error the cut-off stream causes. The Gate puts one into
/// the extensions of every client-streaming request it admits.
#[derive(Debug, Clone, Default)]
pub struct RefusalSlot(std::sync::Arc<std::sync::OnceLock<Status>>);

impl RefusalSlot {
    /// The refusal, once the body was refused.
    pub fn get(&self) -> Option<&Status> {
        self.0.get()
    }

    fn set(&self, status: &Status) {
        let _ = self.0.set(Status::new(status.code(), status.message()));
    }
}

/// Checks one complete (decoded) message of a client stream.
pub type Check = Box<dyn FnMut(&[u8]) -> Result<(), Status> + Send>;

/// A request body that passes on only whole messages, decoded by the Gate,
/// after its check: the first refusal ends the body with its status (the
/// messages before it are delivered). Request trailers are refused; a route
/// of one message refuses a second.
pub struct Checked {
    /// Decoded messages ready to pass on.
    ready: VecDeque<Bytes>,
    inner: Option<Body>,
    pending: BytesMut,
    encoding: Encoding,
    limits: Limits,
    cardinality: Cardinality,
    check: Option<Check>,
    /// Messages seen so far (including those read before the decision).
    seen: usize,
    /// A refusal to deliver after the messages that came before it.
    refusal: Option<Status>,
    /// Where the refusal is also reported.
    slot: Option<RefusalSlot>,
}

impl Checked {
    /// Wraps a whole request body (nothing of it read yet).
    pub fn new(
        inner: Body,
        encoding: Encoding,
        limits: Limits,
        cardinality: Cardinality,
        check: Option<Check>,
    ) -> Checked {
        Checked {
            ready: VecDeque::new(),
            inner: Some(inner),
            pending: BytesMut::new(),
            encoding,
            limits,
            cardinality,
            check,
            seen: 0,
            refusal: None,
            slot: None,
        }
    }

    /// Decodes and checks the messages now complete in `pending`.
    fn drain_pending(&mut self) -> Result<(), Status> {
        while let Some(d) = split_message(&mut self.pending, self.encoding, self.limits)? {
            if self.cardinality == Cardinality::One && self.seen >= 1 {
                return Err(second_message());
            }
            if let Some(check) = self.check.as_mut() {
                check(&d.message)?;
            }
            self.seen += 1;
            self.ready.push_back(d.framed);
        }
        Ok(())
    }

    fn fail(&mut self, status: Status) {
        self.inner = None;
        self.pending.clear();
        if let Some(slot) = &self.slot {
            slot.set(&status);
        }
        self.refusal = Some(status);
    }
}

impl HttpBody for Checked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(m) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(m))));
            }
            if let Some(status) = this.refusal.take() {
                return Poll::Ready(Some(Err(status)));
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.inner = None;
                    if !this.pending.is_empty() {
                        this.fail(Status::internal(
                            "request body ended in the middle of a gRPC message",
                        ));
                    }
                }
                Poll::Ready(Some(Err(status))) => this.fail(status),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if this.pending.is_empty() && this.cardinality == Cardinality::Many {
                            // Most frames carry whole messages or a part of one.
                            this.pending = BytesMut::from(data);
                        } else {
                            this.pending.extend_from_slice(&data);
                        }
                        if let Err(status) = this.drain_pending() {
                            this.fail(status);
                        }
                    }
                    Err(_) => this.fail(trailers_refused()),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && self.refusal.is_none() && self.inner.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, self.ready.len()) {
            (None, _) => SizeHint::with_exact(self.ready.iter().map(|b| b.len() as u64).sum()),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests;
