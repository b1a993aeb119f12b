//! Where a local instance keeps its blobs: the [`BlobStore`] trait and its two
//! implementations, [`memory::MemoryStore`] and [`disk::DiskStore`].
//!
//! Both keep a byte budget with least-recently-used eviction (see [`lru`]) and
//! verify every blob they commit: a [`BlobWriter`] hashes what it is given and
//! its `commit` refuses data whose SHA-256 or size differ from the key. The
//! empty blob is always present and never stored.

pub mod disk;
pub mod hasher;
mod lru;
pub mod measured;
pub mod memory;

use futures_util::future::BoxFuture;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;

use super::digest::BlobKey;

/// Largest chunk a store read yields (and ByteStream sends).
pub const CHUNK: usize = 1024 * 1024;

/// A blob's bytes as a stream of chunks of at most [`CHUNK`] bytes.
pub type BlobStream = Pin<Box<dyn Stream<Item = Result<Bytes, StoreError>> + Send>>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data's SHA-256 is not the one in the digest.
    #[error("data does not match digest {expected}: its SHA-256 is {actual}")]
    HashMismatch { expected: BlobKey, actual: String },
    /// The data's length is not the one in the digest.
    #[error("data does not match digest {expected}: got {got} bytes, the digest says {}", expected.size)]
    SizeMismatch { expected: BlobKey, got: u64 },
    /// The blob alone is larger than the store.
    #[error("blob of {size} bytes is larger than this instance's CAS budget of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    /// Uploads in progress hold the whole budget.
    #[error("no room for {wanted} bytes: uploads in progress reserve {reserved} of the CAS budget of {max} bytes; retry later")]
    NoRoom {
        wanted: u64,
        reserved: u64,
        max: u64,
    },
    /// A filesystem operation failed (the path is logged, not returned).
    #[error("CAS disk store: {0}")]
    Io(String),
}

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> tonic::Status {
        match &e {
            StoreError::HashMismatch { .. } | StoreError::SizeMismatch { .. } => {
                tonic::Status::invalid_argument(e.to_string())
            }
            StoreError::TooLarge { .. } | StoreError::NoRoom { .. } => {
                tonic::Status::resource_exhausted(e.to_string())
            }
            StoreError::Io(_) => tonic::Status::internal(e.to_string()),
        }
    }
}

impl From<lru::NoRoom> for StoreError {
    fn from(n: lru::NoRoom) -> StoreError {
        StoreError::NoRoom {
            wanted: n.wanted,
            reserved: n.reserved,
            max: n.max,
        }
    }
}

/// A content-addressed blob store with a byte budget.
pub trait BlobStore: Send + Sync + 'static {
    /// The subset of `keys` not held (the empty blob is always held). Keys that
    /// are held count as used (they move to the back of the eviction order).
    fn missing<'a>(&'a self, keys: &'a [BlobKey]) -> BoxFuture<'a, Vec<BlobKey>>;

    /// A whole blob, for small reads (batch reads, directories, action
    /// results); `None` if absent.
    fn get<'a>(&'a self, key: &'a BlobKey) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>>;

    /// `limit` bytes (0: up to the end) of a blob from `offset` (which the
    /// caller checked is at most the size), as a stream; `None` if absent.
    fn read<'a>(
        &'a self,
        key: &'a BlobKey,
        offset: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<BlobStream>, StoreError>>;

    /// Starts an upload of `key`: reserves its size in the budget (evicting as
    /// needed). Dropping the writer without committing abandons it.
    fn begin<'a>(&'a self, key: BlobKey) -> BoxFuture<'a, Result<Box<dyn BlobWriter>, StoreError>>;

    /// Stores a whole blob, verified.
    fn put<'a>(&'a self, key: BlobKey, data: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if key.is_empty() {
                return verify(&key, &BlobKey::of(data));
            }
            let mut w = self.begin(key).await?;
            w.write(data).await?;
            w.commit().await
        })
    }

    /// The byte budget.
    fn max_bytes(&self) -> u64;

    /// Bytes held by stored blobs now.
    fn used_bytes(&self) -> u64;

    /// Blobs evicted to stay within the budget since start.
    fn evictions(&self) -> u64 {
        0
    }
}

/// An upload in progress: hashes what it is given and stores it on commit
/// only if the hash and size match the key.
pub trait BlobWriter: Send {
    /// Appends bytes; refuses to go past the key's size.
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Appends a reference-counted chunk; writers that can hold on to it
    /// (e.g. to hash it on another thread) avoid a copy.
    fn write_bytes<'a>(&'a mut self, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.write(&data).await })
    }

    /// Bytes written so far.
    fn written(&self) -> u64;

    /// Verifies and stores the blob.
    fn commit<'a>(self: Box<Self>) -> BoxFuture<'a, Result<(), StoreError>>
    where
        Self: 'a;
}

/// Checks that `actual` (the key computed from the data) is `expected`.
pub fn verify(expected: &BlobKey, actual: &BlobKey) -> Result<(), StoreError> {
    if actual.size != expected.size {
        return Err(StoreError::SizeMismatch {
            expected: *expected,
            got: actual.size,
        });
    }
    if actual.hash != expected.hash {
        return Err(StoreError::HashMismatch {
            expected: *expected,
            actual: actual.hex(),
        });
    }
    Ok(())
}

/// Refuses a write that would go past the declared size.
fn check_room(key: &BlobKey, written: u64, more: usize) -> Result<(), StoreError> {
    let total = written.saturating_add(more as u64);
    if total > key.size {
        return Err(StoreError::SizeMismatch {
            expected: *key,
            got: total,
        });
    }
    Ok(())
}

/// A stream over `data[offset..offset+limit]` in chunks of at most [`CHUNK`].
fn slice_stream(data: Bytes, offset: u64, limit: u64) -> BlobStream {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let end = if limit == 0 {
        data.len()
    } else {
        start
            .saturating_add(usize::try_from(limit).unwrap_or(usize::MAX))
            .min(data.len())
    };
    let part = data.slice(start..end);
    let chunks: Vec<Result<Bytes, StoreError>> = (0..part.len())
        .step_by(CHUNK)
        .map(|i| Ok(part.slice(i..(i + CHUNK).min(part.len()))))
        .collect();
    Box::pin(futures_util::stream::iter(chunks))
}
