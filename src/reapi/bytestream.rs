//! `google.bytestream.ByteStream` over the local instances' CAS: Read, Write
//! and QueryWriteStatus with the REAPI resource-name grammar (see
//! [`super::resource`]).
//!
//! - **Read** streams `read_limit` bytes (0: all) from `read_offset` in chunks
//!   of at most 1 MiB; an offset past the end is OUT_OF_RANGE, a missing blob
//!   NOT_FOUND. `compressed-blobs/zstd` streams the blob zstd-compressed; then
//!   offset and limit count compressed bytes.
//! - **Write** takes the resource name from the first message; later messages
//!   must repeat it or leave it empty, and each `write_offset` must equal the
//!   bytes received so far. The blob is committed only when `finish_write`
//!   arrives and the data's SHA-256 and size match the digest (else
//!   INVALID_ARGUMENT, nothing stored). A stream that ends or breaks before
//!   `finish_write` leaves a partial upload (see [`super::uploads`]) that
//!   `QueryWriteStatus` reports and a new Write with `write_offset` equal to
//!   the committed size continues; `write_offset` 0 starts over. Writing a
//!   blob the CAS already holds returns at once with `committed_size` = size
//!   (-1 for compressed uploads), as REAPI allows. `compressed-blobs/zstd`
//!   uploads are decompressed as they stream, never to more than the declared
//!   size; `committed_size` then counts compressed bytes.
//! - The optional `build.bazel.remote.execution.v2.resource-name` header must
//!   match the message's resource name.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use super::compression::{BoundedDecoder, StreamEncoder};
use super::digest::BlobKey;
use super::resource::{self, Access, Compressor, ResourceName};
use super::uploads::{TakeError, UploadState};
use super::{invalid, Instance, Instances};
use crate::proto::google::bytestream as bs;

/// The metadata header that, when present, must name the same resource.
pub const RESOURCE_NAME_HEADER: &str = "build.bazel.remote.execution.v2.resource-name";

/// The ByteStream service of the local instances.
pub struct ByteStream {
    instances: Arc<Instances>,
}

impl ByteStream {
    /// The service over `instances`.
    pub fn new(instances: Arc<Instances>) -> ByteStream {
        ByteStream { instances }
    }

    /// Parses `name` and finds its instance and blob key.
    fn locate<'a>(
        &self,
        name: &'a str,
        access: Access,
    ) -> Result<(ResourceName<'a>, Arc<Instance>, BlobKey), Status> {
        let r = resource::parse(name, access).map_err(invalid)?;
        let instance = self.instances.get(r.instance)?;
        if let Some(f) = r.digest_function {
            return Err(Status::invalid_argument(format!(
                "digest function {f} is not supported: instance {:?} uses sha256",
                r.instance
            )));
        }
        if let Some(c) = r.compressor {
            if c != Compressor::Zstd {
                return Err(Status::invalid_argument(format!(
                    "compressor {} is not supported (zstd is)",
                    c.as_str()
                )));
            }
        }
        let key = BlobKey::parse(r.hash, r.size).map_err(invalid)?;
        Ok((r, instance, key))
    }
}

fn check_header(metadata: &MetadataMap, name: &str) -> Result<(), Status> {
    match metadata.get(RESOURCE_NAME_HEADER) {
        None => Ok(()),
        Some(v) if v.as_bytes() == name.as_bytes() => Ok(()),
        Some(_) => Err(Status::invalid_argument(format!(
            "header {RESOURCE_NAME_HEADER} differs from the message's resource_name"
        ))),
    }
}

type ReadStream = Pin<Box<dyn Stream<Item = Result<bs::ReadResponse, Status>> + Send>>;

/// How a Write stream ended.
enum Ended {
    /// `finish_write` arrived: commit.
    Finished,
}

/// Why a Write stream failed, and whether its partial upload may be resumed.
struct WriteFailure {
    status: Status,
    resumable: bool,
}

impl WriteFailure {
    fn fatal(status: impl Into<Status>) -> WriteFailure {
        WriteFailure {
            status: status.into(),
            resumable: false,
        }
    }
    fn resumable(status: Status) -> WriteFailure {
        WriteFailure {
            status,
            resumable: true,
        }
    }
}

/// Feeds one message's data into the upload.
async fn absorb(state: &mut UploadState, data: bytes::Bytes) -> Result<(), WriteFailure> {
    let len = data.len() as u64;
    match state.decoder.as_mut() {
        None => state
            .writer
            .write_bytes(data)
            .await
            .map_err(WriteFailure::fatal)?,
        Some(dec) => {
            let mut pos = 0;
            loop {
                let out = dec.step(&data, &mut pos).map_err(WriteFailure::fatal)?;
                let full = BoundedDecoder::is_full_step(out.len());
                if !out.is_empty() {
                    state.writer.write(out).await.map_err(WriteFailure::fatal)?;
                }
                if pos >= data.len() && !full {
                    break;
                }
            }
        }
    }
    state.received.fetch_add(len, Ordering::Relaxed);
    Ok(())
}

/// Processes the messages of a Write stream into `state`.
async fn drive(
    state: &mut UploadState,
    name: &str,
    first: bs::WriteRequest,
    stream: &mut Streaming<bs::WriteRequest>,
) -> Result<Ended, WriteFailure> {
    let mut next = Some(first);
    loop {
        let msg = match next.take() {
            Some(m) => m,
            None => match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Err(WriteFailure::resumable(Status::invalid_argument(
                        "the Write stream ended before finish_write; QueryWriteStatus tells how much was received",
                    )))
                }
                Err(e) => return Err(WriteFailure::resumable(e)),
            },
        };
        if !msg.resource_name.is_empty() && msg.resource_name != name {
            return Err(WriteFailure::fatal(Status::invalid_argument(
                "a later Write message names a different resource than the first",
            )));
        }
        let received = state.received.load(Ordering::Relaxed);
        if u64::try_from(msg.write_offset).ok() != Some(received) {
            return Err(WriteFailure::resumable(Status::invalid_argument(format!(
                "write_offset {} does not continue the upload: {received} bytes received so far",
                msg.write_offset
            ))));
        }
        let finish = msg.finish_write;
        absorb(state, msg.data).await?;
        if finish {
            return Ok(Ended::Finished);
        }
    }
}

#[tonic::async_trait]
impl bs::byte_stream_server::ByteStream for ByteStream {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: Request<bs::ReadRequest>,
    ) -> Result<Response<ReadStream>, Status> {
        check_header(request.metadata(), &request.get_ref().resource_name)?;
        let req = request.into_inner();
        let (r, instance, key) = self.locate(&req.resource_name, Access::Read)?;
        if req.read_offset < 0 {
            return Err(Status::out_of_range(format!(
                "read_offset {} is negative",
                req.read_offset
            )));
        }
        if req.read_limit < 0 {
            return Err(Status::invalid_argument(format!(
                "read_limit {} is negative",
                req.read_limit
            )));
        }
        let offset = req.read_offset as u64;
        let limit = req.read_limit as u64;
        let not_found = || Status::not_found(format!("blob {key} not found"));
        if r.compressor.is_none() {
            if offset > key.size {
                return Err(Status::out_of_range(format!(
                    "read_offset {offset} is past the end of the {}-byte blob",
                    key.size
                )));
            }
            let stream = instance
                .store
                .read(&key, offset, limit)
                .await?
                .ok_or_else(not_found)?;
            let out = stream.map(|chunk| {
                chunk
                    .map(|data| bs::ReadResponse { data })
                    .map_err(Status::from)
            });
            return Ok(Response::new(Box::pin(out)));
        }
        let mut stream = instance
            .store
            .read(&key, 0, 0)
            .await?
            .ok_or_else(not_found)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut enc = match StreamEncoder::new() {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(Status::internal(format!("zstd: {e}")))).await;
                    return;
                }
            };
            let mut window = Window {
                skip: offset,
                left: if limit == 0 { u64::MAX } else { limit },
                seen: 0,
            };
            let mut done = false;
            while !done {
                let compressed = match stream.next().await {
                    Some(Ok(chunk)) => enc.push(&chunk),
                    Some(Err(e)) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                    None => {
                        done = true;
                        enc.finish()
                    }
                };
                let compressed = match compressed {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("zstd: {e}")))).await;
                        return;
                    }
                };
                let part = window.take(&compressed);
                if !part.is_empty()
                    && tx
                        .send(Ok(bs::ReadResponse {
                            data: bytes::Bytes::copy_from_slice(part),
                        }))
                        .await
                        .is_err()
                {
                    return;
                }
                if window.left == 0 {
                    return;
                }
            }
            if offset > window.seen {
                let _ = tx
                    .send(Err(Status::out_of_range(format!(
                        "read_offset {offset} is past the end of the {}-byte compressed blob",
                        window.seen
                    ))))
                    .await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn write(
        &self,
        request: Request<Streaming<bs::WriteRequest>>,
    ) -> Result<Response<bs::WriteResponse>, Status> {
        let metadata = request.metadata().clone();
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty Write stream"))?;
        if first.resource_name.is_empty() {
            return Err(Status::invalid_argument(
                "the first Write message must carry resource_name",
            ));
        }
        let name = first.resource_name.clone();
        check_header(&metadata, &name)?;
        let (r, instance, key) = self.locate(&name, Access::Write)?;
        let compressed = r.compressor.is_some();
        let done = |size: i64| {
            Ok(Response::new(bs::WriteResponse {
                committed_size: size,
            }))
        };
        let full_size = i64::try_from(key.size).unwrap_or(i64::MAX);

        if instance.store.missing(&[key]).await.is_empty() {
            instance.uploads.finish(&name);
            return done(if compressed { -1 } else { full_size });
        }

        let busy = || Status::aborted(format!("another Write to {name} is in progress"));
        let resumed = instance
            .uploads
            .take(&name)
            .map_err(|TakeError::Busy| busy())?;
        let mut state = match resumed {
            Some(s) if first.write_offset != 0 => s,
            restart => {
                // Nothing to resume, or write_offset 0: start over.
                drop(restart);
                let received = Arc::new(AtomicU64::new(0));
                let writer = match instance.store.begin(key).await {
                    Ok(w) => w,
                    Err(e) => {
                        instance.uploads.finish(&name);
                        return Err(e.into());
                    }
                };
                let decoder = if compressed {
                    Some(BoundedDecoder::new(key.size)?)
                } else {
                    None
                };
                instance.uploads.finish(&name);
                instance
                    .uploads
                    .activate(&name, received.clone())
                    .map_err(|TakeError::Busy| busy())?;
                UploadState {
                    writer,
                    decoder,
                    received,
                }
            }
        };

        match drive(&mut state, &name, first, &mut stream).await {
            Ok(Ended::Finished) => {
                instance.uploads.finish(&name);
                if let Some(dec) = &state.decoder {
                    dec.finish()?;
                }
                let received = state.received.load(Ordering::Relaxed);
                state.writer.commit().await?;
                done(if compressed {
                    i64::try_from(received).unwrap_or(i64::MAX)
                } else {
                    full_size
                })
            }
            Err(f) => {
                if f.resumable {
                    instance.uploads.pause(&name, state);
                } else {
                    instance.uploads.finish(&name);
                }
                Err(f.status)
            }
        }
    }

    async fn query_write_status(
        &self,
        request: Request<bs::QueryWriteStatusRequest>,
    ) -> Result<Response<bs::QueryWriteStatusResponse>, Status> {
        let name = request.into_inner().resource_name;
        let (r, instance, key) = self.locate(&name, Access::Write)?;
        if instance.store.missing(&[key]).await.is_empty() {
            let size = if r.compressor.is_some() {
                -1
            } else {
                i64::try_from(key.size).unwrap_or(i64::MAX)
            };
            return Ok(Response::new(bs::QueryWriteStatusResponse {
                committed_size: size,
                complete: true,
            }));
        }
        match instance.uploads.received(&name) {
            Some(n) => Ok(Response::new(bs::QueryWriteStatusResponse {
                committed_size: i64::try_from(n).unwrap_or(i64::MAX),
                complete: false,
            })),
            None => Err(Status::not_found(format!(
                "no upload in progress for {name}"
            ))),
        }
    }
}

/// The `[offset, offset + limit)` window of a stream produced piecewise.
struct Window {
    skip: u64,
    left: u64,
    seen: u64,
}

impl Window {
    /// The part of `chunk` (the next piece of the stream) inside the window.
    fn take<'a>(&mut self, chunk: &'a [u8]) -> &'a [u8] {
        let len = chunk.len() as u64;
        self.seen += len;
        let start = self.skip.min(len);
        self.skip -= start;
        let end = start + (len - start).min(self.left);
        self.left -= end - start;
        &chunk[start as usize..end as usize]
    }
}
