//! Instance-name rewriting for an upstream whose instance has another name:
//! re-encodes the request messages whose first field names the instance
//! (or, for ByteStream, a resource name that starts with it).
//!
//! The request body is re-framed message by message: each gRPC message is
//! buffered whole (at most [`MAX_MESSAGE`] bytes), decompressed if its flag
//! says so (with the `grpc-encoding` of the request), field 1 is replaced, and
//! the message is sent uncompressed (flag 0 is valid whatever the encoding).
//! Every other field is copied byte for byte.

use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::Status;

use crate::reapi::resource::{self, Access};

/// Largest message rewritten.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// How the request messages name the instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Field 1 is the instance name.
    Instance,
    /// Field 1 is a ByteStream resource name (in later Write messages it may
    /// be absent).
    Resource(Access),
}

fn mode_of(path: &str) -> Option<Mode> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    match (service, method) {
        ("build.bazel.remote.execution.v2.Capabilities", "GetCapabilities")
        | (
            "build.bazel.remote.execution.v2.ContentAddressableStorage",
            "FindMissingBlobs" | "BatchUpdateBlobs" | "BatchReadBlobs" | "GetTree" | "SplitBlob"
            | "SpliceBlob",
        )
        | (
            "build.bazel.remote.execution.v2.ActionCache",
            "GetActionResult" | "UpdateActionResult",
        )
        | ("build.bazel.remote.execution.v2.Execution", "Execute") => Some(Mode::Instance),
        ("google.bytestream.ByteStream", "Read") => Some(Mode::Resource(Access::Read)),
        ("google.bytestream.ByteStream", "Write" | "QueryWriteStatus") => {
            Some(Mode::Resource(Access::Write))
        }
        _ => None,
    }
}

/// Rewrites requests to name the upstream's instance.
#[derive(Debug, Clone)]
pub struct Rewrite {
    /// The instance name the upstream knows.
    pub upstream: String,
}

impl Rewrite {
    /// Wraps the body of `req` so its messages name the upstream instance.
    pub fn apply(&self, mut req: http::Request<Body>) -> Result<http::Request<Body>, Status> {
        let Some(mode) = mode_of(req.uri().path()) else {
            return Ok(req);
        };
        req.headers_mut()
            .remove(crate::reapi::bytestream::RESOURCE_NAME_HEADER);
        let encoding = req
            .headers()
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let upstream = self.upstream.clone();
        Ok(req.map(|inner| {
            Body::new(RewriteBody {
                inner,
                buf: BytesMut::new(),
                mode,
                upstream,
                encoding,
                trailers: None,
                done: false,
            })
        }))
    }
}

/// A request body whose gRPC messages are rewritten one by one.
struct RewriteBody {
    inner: Body,
    buf: BytesMut,
    mode: Mode,
    upstream: String,
    encoding: Option<String>,
    trailers: Option<http::HeaderMap>,
    done: bool,
}

impl RewriteBody {
    /// The next complete message in the buffer, rewritten and framed.
    fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flag = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_MESSAGE {
            return Err(Status::resource_exhausted(format!(
                "message of {len} bytes is too large to rewrite the instance name"
            )));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let raw = self.buf.split_to(len).freeze();
        let msg = match flag {
            0 => raw,
            1 => Bytes::from(decompress(self.encoding.as_deref(), &raw)?),
            f => {
                return Err(Status::internal(format!(
                    "invalid gRPC compression flag {f}"
                )))
            }
        };
        let out = rewrite_message(&msg, self.mode, &self.upstream)?;
        let mut framed = BytesMut::with_capacity(5 + out.len());
        framed.put_u8(0);
        framed.put_u32(out.len() as u32);
        framed.put_slice(&out);
        Ok(Some(framed.freeze()))
    }
}

impl HttpBody for RewriteBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        loop {
            if let Some(m) = this.next_message()? {
                return Poll::Ready(Some(Ok(Frame::data(m))));
            }
            if this.done {
                if !this.buf.is_empty() {
                    this.buf.clear();
                    return Poll::Ready(Some(Err(Status::internal(
                        "request body ended in the middle of a gRPC message",
                    ))));
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.buf.extend_from_slice(&data),
                    Err(frame) => {
                        this.done = true;
                        this.trailers = frame.into_trailers().ok();
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.buf.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

fn decompress(encoding: Option<&str>, data: &[u8]) -> Result<Vec<u8>, Status> {
    let mut out = Vec::new();
    let limit = MAX_MESSAGE as u64 + 1;
    let result = match encoding {
        Some("gzip") => flate2::read::GzDecoder::new(data)
            .take(limit)
            .read_to_end(&mut out),
        Some("deflate") => flate2::read::ZlibDecoder::new(data)
            .take(limit)
            .read_to_end(&mut out),
        Some("zstd") => {
            zstd::stream::read::Decoder::new(data).and_then(|d| d.take(limit).read_to_end(&mut out))
        }
        other => {
            return Err(Status::unimplemented(format!(
                "compressed message with grpc-encoding {other:?}"
            )))
        }
    };
    result.map_err(|e| Status::internal(format!("cannot decompress the request: {e}")))?;
    if out.len() > MAX_MESSAGE {
        return Err(Status::resource_exhausted(
            "decompressed message is too large to rewrite",
        ));
    }
    Ok(out)
}

/// The fields of a message as (field number, the field's bytes incl. key).
fn fields(msg: &[u8]) -> Result<Vec<(u64, &[u8])>, Status> {
    let bad = || Status::invalid_argument("request is not a valid protobuf message");
    let mut out = Vec::new();
    let mut rest = msg;
    while !rest.is_empty() {
        let start = rest;
        let key = prost::encoding::decode_varint(&mut rest).map_err(|_| bad())?;
        let skip = match key & 7 {
            0 => {
                prost::encoding::decode_varint(&mut rest).map_err(|_| bad())?;
                0
            }
            1 => 8,
            2 => usize::try_from(prost::encoding::decode_varint(&mut rest).map_err(|_| bad())?)
                .map_err(|_| bad())?,
            5 => 4,
            _ => return Err(bad()),
        };
        if rest.len() < skip {
            return Err(bad());
        }
        rest = &rest[skip..];
        let used = start.len() - rest.len();
        out.push((key >> 3, &start[..used]));
    }
    Ok(out)
}

/// The string value of a length-delimited field's bytes (key included).
fn string_value(field: &[u8]) -> Result<&str, Status> {
    let mut rest = field;
    let bad = || Status::invalid_argument("field 1 is not a string");
    prost::encoding::decode_varint(&mut rest).map_err(|_| bad())?;
    prost::encoding::decode_varint(&mut rest).map_err(|_| bad())?;
    std::str::from_utf8(rest).map_err(|_| bad())
}

/// `msg` with field 1 set to `value` (every earlier occurrence removed).
fn with_field1(msg: &[(u64, &[u8])], value: &str) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(value.len() + 8 + msg.iter().map(|f| f.1.len()).sum::<usize>());
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(value.len() as u64, &mut out);
    out.extend_from_slice(value.as_bytes());
    for (n, bytes) in msg {
        if *n != 1 {
            out.extend_from_slice(bytes);
        }
    }
    out
}

fn rewrite_message(msg: &[u8], mode: Mode, upstream: &str) -> Result<Vec<u8>, Status> {
    let fields = fields(msg)?;
    match mode {
        Mode::Instance => Ok(with_field1(&fields, upstream)),
        Mode::Resource(access) => {
            // prost keeps the last occurrence; so does this.
            let Some((_, last)) = fields.iter().rev().find(|(n, _)| *n == 1) else {
                return Ok(msg.to_vec());
            };
            let name = string_value(last)?;
            if name.is_empty() {
                return Ok(msg.to_vec());
            }
            let parsed = resource::parse(name, access)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let rest = &name[parsed.instance.len()..];
            let rest = rest.strip_prefix('/').unwrap_or(rest);
            let renamed = if upstream.is_empty() {
                rest.to_string()
            } else {
                format!("{upstream}/{rest}")
            };
            Ok(with_field1(&fields, &renamed))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::build::bazel::remote::execution::v2 as re;
    use crate::proto::google::bytestream as bs;
    use prost::Message;

    #[test]
    fn rewrites_instance_and_keeps_the_rest() {
        let req = re::FindMissingBlobsRequest {
            instance_name: "team-a".into(),
            blob_digests: vec![re::Digest {
                hash: "ab".into(),
                size_bytes: 3,
            }],
            digest_function: 1,
        };
        let out = rewrite_message(&req.encode_to_vec(), Mode::Instance, "").unwrap();
        let back = re::FindMissingBlobsRequest::decode(&out[..]).unwrap();
        assert_eq!(back.instance_name, "");
        assert_eq!(back.blob_digests, req.blob_digests);
        assert_eq!(back.digest_function, 1);
    }

    #[test]
    fn rewrites_resource_names() {
        let h = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let req = bs::WriteRequest {
            resource_name: format!("team-a/uploads/u/blobs/{h}/0"),
            write_offset: 0,
            finish_write: true,
            data: Bytes::from_static(b"x"),
        };
        let out =
            rewrite_message(&req.encode_to_vec(), Mode::Resource(Access::Write), "main").unwrap();
        let back = bs::WriteRequest::decode(&out[..]).unwrap();
        assert_eq!(back.resource_name, format!("main/uploads/u/blobs/{h}/0"));
        assert_eq!(back.data, req.data);
        let out = rewrite_message(&req.encode_to_vec(), Mode::Resource(Access::Write), "").unwrap();
        let back = bs::WriteRequest::decode(&out[..]).unwrap();
        assert_eq!(back.resource_name, format!("uploads/u/blobs/{h}/0"));
        // A later message without a name is unchanged.
        let later = bs::WriteRequest {
            write_offset: 1,
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(
            rewrite_message(&later, Mode::Resource(Access::Write), "main").unwrap(),
            later
        );
        assert!(rewrite_message(&[0xff], Mode::Instance, "x").is_err());
        assert_eq!(
            mode_of("/google.bytestream.ByteStream/Read"),
            Some(Mode::Resource(Access::Read))
        );
        assert_eq!(mode_of("/google.longrunning.Operations/GetOperation"), None);
    }
}
