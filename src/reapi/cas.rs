//! `ContentAddressableStorage`: FindMissingBlobs, BatchUpdateBlobs,
//! BatchReadBlobs and GetTree for the local instances.
//!
//! Batch RPCs refuse, as a whole (INVALID_ARGUMENT), requests whose blob bytes
//! total more than `max_batch_total_size_bytes`; a problem with one blob (bad
//! digest, data that does not match it, not found) is that blob's status and
//! the others proceed. Every stored blob is verified (SHA-256 and size) and
//! nothing is stored on a mismatch. The empty blob is always present.
//!
//! GetTree walks the tree breadth-first from the root, skipping directories
//! already seen and omitting subtrees missing from the CAS (as REAPI asks);
//! a missing root is NOT_FOUND. It streams pages of at most `page_size`
//! directories (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`], and never
//! more bytes than a message may carry), each with the token that resumes
//! after it; the token is opaque to clients.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use prost::Message;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};

use super::compression::decompress_bounded;
use super::digest::{check_function, BlobKey};
use super::{invalid, Instance, Instances};
use crate::proto::build::bazel::remote::execution::v2 as re;
use crate::proto::google::rpc;

/// Directories per GetTree page when the client does not say.
pub const DEFAULT_PAGE: usize = 1000;
/// Most directories per GetTree page.
pub const MAX_PAGE: usize = 10_000;

/// The CAS service of the local instances.
pub struct Cas {
    instances: Arc<Instances>,
}

impl Cas {
    /// The service over `instances`.
    pub fn new(instances: Arc<Instances>) -> Cas {
        Cas { instances }
    }
}

/// A `google.rpc.Status` for one blob.
pub(crate) fn blob_status(code: Code, message: String) -> Option<rpc::Status> {
    Some(rpc::Status {
        code: code as i32,
        message,
        details: Vec::new(),
    })
}

fn status_of(e: &Status) -> Option<rpc::Status> {
    blob_status(e.code(), e.message().to_string())
}

#[tonic::async_trait]
impl re::content_addressable_storage_server::ContentAddressableStorage for Cas {
    async fn find_missing_blobs(
        &self,
        request: Request<re::FindMissingBlobsRequest>,
    ) -> Result<Response<re::FindMissingBlobsResponse>, Status> {
        let req = request.into_inner();
        let instance = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function).map_err(invalid)?;
        let keys = req
            .blob_digests
            .iter()
            .map(|d| BlobKey::parse(&d.hash, d.size_bytes))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let missing = instance.store.missing(&keys).await;
        // `missing` is a subsequence of `keys`: answer with the request's own
        // digests (no re-encoding), in order.
        let mut next = missing.iter().peekable();
        let missing_blob_digests = req
            .blob_digests
            .into_iter()
            .zip(&keys)
            .filter(|(_, k)| {
                let hit = next.peek() == Some(k);
                if hit {
                    next.next();
                }
                hit
            })
            .map(|(d, _)| d)
            .collect();
        Ok(Response::new(re::FindMissingBlobsResponse {
            missing_blob_digests,
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<re::BatchUpdateBlobsRequest>,
    ) -> Result<Response<re::BatchUpdateBlobsResponse>, Status> {
        let req = request.into_inner();
        let instance = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function).map_err(invalid)?;
        let total: u64 = req.requests.iter().map(|r| r.data.len() as u64).sum();
        if total > self.instances.max_batch_bytes {
            return Err(Status::invalid_argument(format!(
                "BatchUpdateBlobs carries {total} bytes of blobs, more than max_batch_total_size_bytes {}; use ByteStream Write for large blobs",
                self.instances.max_batch_bytes
            )));
        }
        let mut responses = Vec::with_capacity(req.requests.len());
        for r in &req.requests {
            let status = match update_one(&instance, r).await {
                Ok(()) => blob_status(Code::Ok, String::new()),
                Err(e) => status_of(&e),
            };
            responses.push(re::batch_update_blobs_response::Response {
                digest: r.digest.clone(),
                status,
            });
        }
        Ok(Response::new(re::BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<re::BatchReadBlobsRequest>,
    ) -> Result<Response<re::BatchReadBlobsResponse>, Status> {
        let req = request.into_inner();
        let instance = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function).map_err(invalid)?;
        let total: u64 = req
            .digests
            .iter()
            .map(|d| u64::try_from(d.size_bytes).unwrap_or(0))
            .fold(0, u64::saturating_add);
        if total > self.instances.max_batch_bytes {
            return Err(Status::invalid_argument(format!(
                "BatchReadBlobs asks for {total} bytes, more than max_batch_total_size_bytes {}; use ByteStream Read for large blobs",
                self.instances.max_batch_bytes
            )));
        }
        let mut responses = Vec::with_capacity(req.digests.len());
        for d in &req.digests {
            let (data, status) = match BlobKey::parse(&d.hash, d.size_bytes) {
                Err(e) => (
                    Default::default(),
                    blob_status(Code::InvalidArgument, e.to_string()),
                ),
                Ok(key) => match instance.store.get(&key).await {
                    Ok(Some(data)) => (data, blob_status(Code::Ok, String::new())),
                    Ok(None) => (
                        Default::default(),
                        blob_status(Code::NotFound, format!("blob {key} not found")),
                    ),
                    Err(e) => (Default::default(), status_of(&Status::from(e))),
                },
            };
            responses.push(re::batch_read_blobs_response::Response {
                digest: Some(d.clone()),
                data,
                compressor: re::compressor::Value::Identity as i32,
                status,
            });
        }
        Ok(Response::new(re::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = Pin<Box<dyn Stream<Item = Result<re::GetTreeResponse, Status>> + Send>>;

    async fn get_tree(
        &self,
        request: Request<re::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let req = request.into_inner();
        let instance = self.instances.get(&req.instance_name)?;
        check_function(req.digest_function).map_err(invalid)?;
        let root = BlobKey::from_digest(req.root_digest.as_ref()).map_err(invalid)?;
        let page_size = match req.page_size {
            n if n < 0 => return Err(Status::invalid_argument("page_size is negative")),
            0 => DEFAULT_PAGE,
            n => (n as usize).min(MAX_PAGE),
        };
        let skip = if req.page_token.is_empty() {
            0
        } else {
            decode_token(&req.page_token, &root).ok_or_else(|| {
                Status::invalid_argument("page_token is not one this server gave for this root")
            })?
        };
        if instance.store.missing(&[root]).await.contains(&root) {
            return Err(Status::not_found(format!(
                "root directory {root} not found"
            )));
        }
        let max_bytes = self
            .instances
            .max_message_bytes
            .saturating_sub(super::BATCH_OVERHEAD.min(self.instances.max_message_bytes / 2));
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let mut walk = TreeWalk::new(root);
            let mut index = 0usize;
            let mut page = Vec::new();
            let mut page_bytes = 0usize;
            loop {
                let next = match walk.next(&instance).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let Some(dir) = next else { break };
                index += 1;
                if index <= skip {
                    continue;
                }
                let len = dir.encoded_len() + 8;
                if !page.is_empty() && (page.len() >= page_size || page_bytes + len > max_bytes) {
                    let resp = re::GetTreeResponse {
                        directories: std::mem::take(&mut page),
                        next_page_token: encode_token(&root, index - 1),
                    };
                    page_bytes = 0;
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
                page_bytes += len;
                page.push(dir);
            }
            let _ = tx
                .send(Ok(re::GetTreeResponse {
                    directories: page,
                    next_page_token: String::new(),
                }))
                .await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn split_blob(
        &self,
        _request: Request<re::SplitBlobRequest>,
    ) -> Result<Response<re::SplitBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SplitBlob is not supported (split_blob_support is false)",
        ))
    }

    async fn splice_blob(
        &self,
        _request: Request<re::SpliceBlobRequest>,
    ) -> Result<Response<re::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented(
            "SpliceBlob is not supported (splice_blob_support is false)",
        ))
    }
}

/// Verifies and stores one blob of a batch.
async fn update_one(
    instance: &Instance,
    r: &re::batch_update_blobs_request::Request,
) -> Result<(), Status> {
    let key = BlobKey::from_digest(r.digest.as_ref()).map_err(invalid)?;
    let decompressed;
    let data: &[u8] = match re::compressor::Value::try_from(r.compressor) {
        Ok(re::compressor::Value::Identity) => &r.data,
        Ok(re::compressor::Value::Zstd) => {
            decompressed = decompress_bounded(&r.data, key.size)?;
            &decompressed
        }
        _ => {
            return Err(Status::invalid_argument(format!(
                "compressor {} is not supported (IDENTITY and ZSTD are)",
                r.compressor
            )))
        }
    };
    instance.store.put(key, data).await?;
    Ok(())
}

/// Breadth-first walk over a tree's directories, each directory once;
/// directories missing from the CAS are skipped.
struct TreeWalk {
    queue: VecDeque<BlobKey>,
    seen: HashSet<BlobKey>,
}

impl TreeWalk {
    fn new(root: BlobKey) -> TreeWalk {
        TreeWalk {
            queue: VecDeque::from([root]),
            seen: HashSet::from([root]),
        }
    }

    async fn next(&mut self, instance: &Instance) -> Result<Option<re::Directory>, Status> {
        while let Some(key) = self.queue.pop_front() {
            let Some(data) = instance.store.get(&key).await? else {
                continue;
            };
            let dir = re::Directory::decode(data).map_err(|e| {
                Status::invalid_argument(format!("blob {key} in the tree is not a Directory: {e}"))
            })?;
            for child in &dir.directories {
                let child = BlobKey::from_digest(child.digest.as_ref()).map_err(|e| {
                    Status::invalid_argument(format!("directory {key} has a bad child digest: {e}"))
                })?;
                if self.seen.insert(child) {
                    self.queue.push_back(child);
                }
            }
            return Ok(Some(dir));
        }
        Ok(None)
    }
}

/// The token resuming a walk of `root` after `index` directories.
fn encode_token(root: &BlobKey, index: usize) -> String {
    format!("{}{:x}", &root.hex()[..16], index)
}

fn decode_token(token: &str, root: &BlobKey) -> Option<usize> {
    let rest = token.strip_prefix(&root.hex()[..16])?;
    usize::from_str_radix(rest, 16).ok()
}
