//! Instance-name rewriting for an upstream whose instance has another name:
//! re-encodes the request messages that name the instance (field 1 of most
//! REAPI requests, a ByteStream resource name that starts with it, an
//! operation name `INSTANCE/ID`, ListOperations' `name`), and the operation
//! names in responses (Execute, WaitExecution and the Operations service), so
//! that clients only ever see operation names under the public instance, which
//! is where the Gate looks for the instance of a later WaitExecution or
//! GetOperation.
//!
//! Bodies are re-framed message by message with the Gate's own framing
//! ([`crate::gate::frame`]): each gRPC message is buffered whole (at most
//! `limits.max-message-bytes`), decoded (strictly, if its flag says it is
//! compressed), the naming field is replaced, and the message is sent
//! uncompressed (flag 0 is valid whatever the encoding). Every other field is
//! copied byte for byte.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::Status;

use crate::gate::frame::{self, Encoding, Limits};
use crate::gate::scan::{self, Field};
use crate::reapi::resource::{self, Access};

/// How the request messages name the instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Field 1 is the instance name.
    Instance,
    /// Field 1 is a ByteStream resource name (in later Write messages it may
    /// be absent).
    Resource(Access),
    /// Field 1 is an operation name, `INSTANCE/ID`.
    Operation,
    /// ListOperations: field 4 is the instance (BuildGrid's reading).
    ListOperations,
}

/// How the response messages name operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResponseMode {
    /// Each message is an Operation (field 1: its name).
    Operation,
    /// A ListOperationsResponse: field 1 holds the Operations.
    OperationList,
}

/// The request and response modes of an RPC (`None`: passed unchanged).
fn modes_of(path: &str) -> (Option<Mode>, Option<ResponseMode>) {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return (None, None);
    };
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
        ) => (Some(Mode::Instance), None),
        ("build.bazel.remote.execution.v2.Execution", "Execute") => {
            (Some(Mode::Instance), Some(ResponseMode::Operation))
        }
        ("build.bazel.remote.execution.v2.Execution", "WaitExecution")
        | ("google.longrunning.Operations", "GetOperation" | "WaitOperation") => {
            (Some(Mode::Operation), Some(ResponseMode::Operation))
        }
        ("google.longrunning.Operations", "CancelOperation" | "DeleteOperation") => {
            (Some(Mode::Operation), None)
        }
        ("google.longrunning.Operations", "ListOperations") => (
            Some(Mode::ListOperations),
            Some(ResponseMode::OperationList),
        ),
        ("google.bytestream.ByteStream", "Read") => (Some(Mode::Resource(Access::Read)), None),
        ("google.bytestream.ByteStream", "Write" | "QueryWriteStatus") => {
            (Some(Mode::Resource(Access::Write)), None)
        }
        _ => (None, None),
    }
}

#[cfg(test)]
fn mode_of(path: &str) -> Option<Mode> {
    modes_of(path).0
}

/// The instance's name on each side.
#[derive(Debug)]
struct Names {
    /// The name clients use (and the Gate's policy decides on).
    public: String,
    /// The name the upstream knows.
    upstream: String,
}

impl Names {
    /// `INSTANCE/ID` (or `ID` for the unnamed instance).
    fn operation(instance: &str, id: &str) -> String {
        if instance.is_empty() {
            id.to_string()
        } else {
            format!("{instance}/{id}")
        }
    }

    /// The operation's id: what follows the last `/` (the Gate reads the
    /// instance as everything before it).
    fn operation_id(name: &str) -> &str {
        name.rsplit_once('/').map_or(name, |(_, id)| id)
    }

    fn operation_to_upstream(&self, name: &str) -> String {
        Names::operation(&self.upstream, Names::operation_id(name))
    }

    fn operation_to_public(&self, name: &str) -> String {
        Names::operation(&self.public, Names::operation_id(name))
    }
}

/// Rewrites requests to name the upstream's instance, and operation names in
/// responses to name the public one.
#[derive(Debug, Clone)]
pub struct Rewrite {
    names: Arc<Names>,
    limits: Limits,
}

/// What to do with the response of a rewritten request.
pub struct ResponseRewrite {
    mode: ResponseMode,
    names: Arc<Names>,
    limits: Limits,
}

impl Rewrite {
    /// Between the public instance `public` and the upstream's `upstream`;
    /// messages are held to `limits`.
    pub fn new(public: &str, upstream: &str, limits: Limits) -> Rewrite {
        Rewrite {
            names: Arc::new(Names {
                public: public.to_string(),
                upstream: upstream.to_string(),
            }),
            limits,
        }
    }

    /// Wraps the body of `req` so its messages name the upstream instance;
    /// also says how the response must be rewritten, if at all.
    pub fn apply(
        &self,
        mut req: http::Request<Body>,
    ) -> Result<(http::Request<Body>, Option<ResponseRewrite>), Status> {
        let (mode, response) = modes_of(req.uri().path());
        let response = response.map(|mode| ResponseRewrite {
            mode,
            names: self.names.clone(),
            limits: self.limits,
        });
        let Some(mode) = mode else {
            return Ok((req, response));
        };
        req.headers_mut()
            .remove(crate::reapi::bytestream::RESOURCE_NAME_HEADER);
        let encoding = Encoding::from_headers(req.headers())?;
        let names = self.names.clone();
        let limits = self.limits;
        let req = req.map(|inner| {
            Body::new(RewriteBody::new(
                inner,
                encoding,
                limits,
                Box::new(move |msg| rewrite_message(msg, mode, &names)),
            ))
        });
        Ok((req, response))
    }
}

impl ResponseRewrite {
    /// Wraps the body of `resp` so its operation names are the public ones.
    pub fn apply(self, resp: http::Response<Body>) -> http::Response<Body> {
        let ResponseRewrite {
            mode,
            names,
            limits,
        } = self;
        let encoding = match Encoding::from_headers(resp.headers()) {
            Ok(e) => e,
            Err(status) => return status.into_http(),
        };
        resp.map(|inner| {
            Body::new(RewriteBody::new(
                inner,
                encoding,
                limits,
                Box::new(move |msg| rewrite_response(msg, mode, &names)),
            ))
        })
    }
}

/// Rewrites one (uncompressed) message.
type Rewriter = Box<dyn Fn(&[u8]) -> Result<Vec<u8>, Status> + Send + Sync>;

/// A body whose gRPC messages are rewritten one by one.
struct RewriteBody {
    inner: Body,
    buf: BytesMut,
    rewrite: Rewriter,
    encoding: Encoding,
    limits: Limits,
    trailers: Option<http::HeaderMap>,
    done: bool,
}

impl RewriteBody {
    fn new(inner: Body, encoding: Encoding, limits: Limits, rewrite: Rewriter) -> RewriteBody {
        RewriteBody {
            inner,
            buf: BytesMut::new(),
            rewrite,
            encoding,
            limits,
            trailers: None,
            done: false,
        }
    }

    /// The next complete message in the buffer, rewritten and framed.
    fn next_message(&mut self) -> Result<Option<Bytes>, Status> {
        match frame::next_message(&mut self.buf, self.encoding, self.limits)? {
            None => Ok(None),
            Some(msg) => Ok(Some(frame::reframe(&(self.rewrite)(&msg)?))),
        }
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

/// The fields of a message (see [`scan::fields`]).
fn fields(msg: &[u8]) -> Result<Vec<Field<'_>>, Status> {
    scan::fields(msg)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            Status::invalid_argument(format!("request is not a valid protobuf message: {e}"))
        })
}

/// The payload of a length-delimited field.
fn payload<'a>(field: &Field<'a>) -> Result<&'a [u8], Status> {
    if field.wire != 2 {
        return Err(Status::invalid_argument("a field is not length-delimited"));
    }
    Ok(field.payload)
}

/// The last occurrence of string field `number` (prost keeps the last one).
fn last_string<'a>(fields: &[Field<'a>], number: u64) -> Result<Option<&'a str>, Status> {
    match fields.iter().rev().find(|f| f.number == number) {
        Some(f) => std::str::from_utf8(payload(f)?)
            .map(Some)
            .map_err(|_| Status::invalid_argument("a name field is not a string")),
        None => Ok(None),
    }
}

/// `msg` with field `number` set to `value` (every earlier occurrence removed).
fn with_field(msg: &[Field<'_>], number: u32, value: &[u8]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(value.len() + 8 + msg.iter().map(|f| f.raw.len()).sum::<usize>());
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(value.len() as u64, &mut out);
    out.extend_from_slice(value);
    for f in msg {
        if f.number != u64::from(number) {
            out.extend_from_slice(f.raw);
        }
    }
    out
}

fn rewrite_message(msg: &[u8], mode: Mode, names: &Names) -> Result<Vec<u8>, Status> {
    let fields = fields(msg)?;
    match mode {
        Mode::Instance => Ok(with_field(&fields, 1, names.upstream.as_bytes())),
        Mode::ListOperations => Ok(with_field(&fields, 4, names.upstream.as_bytes())),
        Mode::Operation => match last_string(&fields, 1)? {
            Some(name) => Ok(with_field(
                &fields,
                1,
                names.operation_to_upstream(name).as_bytes(),
            )),
            None => Ok(msg.to_vec()),
        },
        Mode::Resource(access) => {
            let Some(name) = last_string(&fields, 1)? else {
                return Ok(msg.to_vec());
            };
            if name.is_empty() {
                return Ok(msg.to_vec());
            }
            let parsed = resource::parse(name, access)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let rest = &name[parsed.instance.len()..];
            let rest = rest.strip_prefix('/').unwrap_or(rest);
            let renamed = if names.upstream.is_empty() {
                rest.to_string()
            } else {
                format!("{}/{rest}", names.upstream)
            };
            Ok(with_field(&fields, 1, renamed.as_bytes()))
        }
    }
}

/// An Operation with its name under the public instance.
fn public_operation(msg: &[u8], names: &Names) -> Result<Vec<u8>, Status> {
    let fields = fields(msg)?;
    match last_string(&fields, 1)? {
        Some(name) if !name.is_empty() => Ok(with_field(
            &fields,
            1,
            names.operation_to_public(name).as_bytes(),
        )),
        _ => Ok(msg.to_vec()),
    }
}

fn rewrite_response(msg: &[u8], mode: ResponseMode, names: &Names) -> Result<Vec<u8>, Status> {
    match mode {
        ResponseMode::Operation => public_operation(msg, names),
        ResponseMode::OperationList => {
            let mut out = Vec::with_capacity(msg.len() + 64);
            for f in fields(msg)? {
                if f.number != 1 {
                    out.extend_from_slice(f.raw);
                    continue;
                }
                let op = public_operation(payload(&f)?, names)?;
                prost::encoding::encode_key(
                    1,
                    prost::encoding::WireType::LengthDelimited,
                    &mut out,
                );
                prost::encoding::encode_varint(op.len() as u64, &mut out);
                out.extend_from_slice(&op);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::build::bazel::remote::execution::v2 as re;
    use crate::proto::google::bytestream as bs;
    use crate::proto::google::longrunning as lro;
    use prost::Message;

    fn names(public: &str, upstream: &str) -> Names {
        Names {
            public: public.into(),
            upstream: upstream.into(),
        }
    }

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
        let out =
            rewrite_message(&req.encode_to_vec(), Mode::Instance, &names("team-a", "")).unwrap();
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
        let out = rewrite_message(
            &req.encode_to_vec(),
            Mode::Resource(Access::Write),
            &names("team-a", "main"),
        )
        .unwrap();
        let back = bs::WriteRequest::decode(&out[..]).unwrap();
        assert_eq!(back.resource_name, format!("main/uploads/u/blobs/{h}/0"));
        assert_eq!(back.data, req.data);
        let out = rewrite_message(
            &req.encode_to_vec(),
            Mode::Resource(Access::Write),
            &names("team-a", ""),
        )
        .unwrap();
        let back = bs::WriteRequest::decode(&out[..]).unwrap();
        assert_eq!(back.resource_name, format!("uploads/u/blobs/{h}/0"));
        // A later message without a name is unchanged.
        let later = bs::WriteRequest {
            write_offset: 1,
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(
            rewrite_message(
                &later,
                Mode::Resource(Access::Write),
                &names("team-a", "main")
            )
            .unwrap(),
            later
        );
        assert!(rewrite_message(&[0xff], Mode::Instance, &names("a", "x")).is_err());
        assert_eq!(
            mode_of("/google.bytestream.ByteStream/Read"),
            Some(Mode::Resource(Access::Read))
        );
        assert_eq!(
            mode_of("/google.longrunning.Operations/GetOperation"),
            Some(Mode::Operation)
        );
        assert_eq!(mode_of("/grpc.health.v1.Health/Check"), None);
    }

    #[test]
    fn operation_names_in_requests_name_the_upstream() {
        for (public, upstream, asked, sent) in [
            ("team-a", "", "team-a/op-1", "op-1"),
            ("team-a", "main", "team-a/op-1", "main/op-1"),
            ("", "main", "op-1", "main/op-1"),
            ("team-a/x", "a/b", "team-a/x/op-1", "a/b/op-1"),
        ] {
            let n = names(public, upstream);
            let req = lro::GetOperationRequest { name: asked.into() };
            let out = rewrite_message(&req.encode_to_vec(), Mode::Operation, &n).unwrap();
            assert_eq!(
                lro::GetOperationRequest::decode(&out[..]).unwrap().name,
                sent
            );
        }
        let req = lro::ListOperationsRequest {
            name: "team-a".into(),
            filter: "stage=QUEUED".into(),
            page_size: 5,
            page_token: "t".into(),
            ..Default::default()
        };
        let out = rewrite_message(
            &req.encode_to_vec(),
            Mode::ListOperations,
            &names("team-a", ""),
        )
        .unwrap();
        let back = lro::ListOperationsRequest::decode(&out[..]).unwrap();
        assert_eq!(back.name, "");
        assert_eq!(
            (
                back.filter.as_str(),
                back.page_size,
                back.page_token.as_str()
            ),
            ("stage=QUEUED", 5, "t")
        );
    }

    #[test]
    fn operation_names_in_responses_name_the_public_instance() {
        let n = names("team-a", "");
        let op = lro::Operation {
            name: "8f2e-uuid".into(),
            done: true,
            metadata: Some(prost_types::Any {
                type_url: "x".into(),
                value: vec![1, 2, 3],
            }),
            result: None,
        };
        let out = rewrite_response(&op.encode_to_vec(), ResponseMode::Operation, &n).unwrap();
        let back = lro::Operation::decode(&out[..]).unwrap();
        assert_eq!(back.name, "team-a/8f2e-uuid");
        assert_eq!((back.done, back.metadata), (true, op.metadata.clone()));

        let n = names("team-a", "main");
        let list = lro::ListOperationsResponse {
            operations: vec![
                lro::Operation {
                    name: "main/op-1".into(),
                    ..Default::default()
                },
                lro::Operation {
                    name: "main/op-2".into(),
                    done: true,
                    ..Default::default()
                },
            ],
            next_page_token: "next".into(),
            unreachable: vec!["elsewhere".into()],
        };
        let out = rewrite_response(&list.encode_to_vec(), ResponseMode::OperationList, &n).unwrap();
        let back = lro::ListOperationsResponse::decode(&out[..]).unwrap();
        let got: Vec<_> = back
            .operations
            .iter()
            .map(|o| (o.name.as_str(), o.done))
            .collect();
        assert_eq!(got, [("team-a/op-1", false), ("team-a/op-2", true)]);
        assert_eq!(back.next_page_token, "next");
        assert_eq!(back.unreachable, ["elsewhere"]);
        // A name-less operation stays as it is; garbage is an error, not a panic.
        let empty = lro::Operation::default().encode_to_vec();
        assert_eq!(
            rewrite_response(&empty, ResponseMode::Operation, &n).unwrap(),
            empty
        );
        assert!(rewrite_response(&[0x0a, 0x05, 1], ResponseMode::OperationList, &n).is_err());
    }
}
