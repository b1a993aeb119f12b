//! The SHA-256 of an upload, computed while the upload goes on.
//!
//! Small uploads are hashed inline. From [`PIPELINE_MIN`] bytes on, chunks
//! are handed (as reference-counted [`Bytes`], not copies) to a blocking
//! thread that hashes them while the request task receives and stores the
//! next ones, so a large ByteStream Write costs the request task a copy per
//! byte rather than a copy and a hash. The channel is bounded
//! ([`PIPELINE_DEPTH`] chunks), so a slow hasher slows the upload down
//! instead of holding its data.

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::StoreError;
use crate::reapi::digest::{BlobKey, Sha256};

/// Uploads at least this large are hashed on a thread of their own.
pub const PIPELINE_MIN: u64 = 4 * 1024 * 1024;

/// Chunks queued for the hashing thread at most.
pub const PIPELINE_DEPTH: usize = 8;

/// Hashes an upload, inline or on a thread of its own.
pub enum UploadHasher {
    /// Uploads below [`PIPELINE_MIN`]: hashed as the chunks arrive.
    Inline(Sha256),
    /// Larger uploads: chunks go to a blocking task that hashes them while
    /// the next ones are received.
    Pipelined {
        /// Chunks for the hashing task (at most [`PIPELINE_DEPTH`] queued).
        chunks: mpsc::Sender<Bytes>,
        /// The hashing task; it returns the hash when `chunks` closes.
        task: JoinHandle<Sha256>,
    },
}

impl UploadHasher {
    /// A hasher for an upload of `size` bytes (must be called within a tokio runtime).
    pub fn for_size(size: u64) -> UploadHasher {
        if size < PIPELINE_MIN {
            return UploadHasher::Inline(Sha256::new());
        }
        let (chunks, mut rx) = mpsc::channel::<Bytes>(PIPELINE_DEPTH);
        let task = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
            }
            hasher
        });
        UploadHasher::Pipelined { chunks, task }
    }

    /// Adds `data` (no copy when pipelined).
    pub async fn update_bytes(&mut self, data: Bytes) -> Result<(), StoreError> {
        match self {
            UploadHasher::Inline(h) => {
                h.update(&data);
                Ok(())
            }
            UploadHasher::Pipelined { chunks, .. } => chunks
                .send(data)
                .await
                .map_err(|_| StoreError::Io("the upload's hashing thread stopped".into())),
        }
    }

    /// Adds `data` (copied when pipelined).
    pub async fn update(&mut self, data: &[u8]) -> Result<(), StoreError> {
        match self {
            UploadHasher::Inline(h) => {
                h.update(data);
                Ok(())
            }
            UploadHasher::Pipelined { .. } => self.update_bytes(Bytes::copy_from_slice(data)).await,
        }
    }

    /// The key of everything added, given its total length.
    pub async fn finish(self, size: u64) -> Result<BlobKey, StoreError> {
        match self {
            UploadHasher::Inline(h) => Ok(h.finish(size)),
            UploadHasher::Pipelined { chunks, task } => {
                drop(chunks);
                let hasher = task.await.map_err(|e| {
                    StoreError::Io(format!("the upload's hashing thread failed: {e}"))
                })?;
                Ok(hasher.finish(size))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn inline_and_pipelined_agree() {
        let data: Vec<u8> = (0..(PIPELINE_MIN as usize + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let expected = {
            let mut h = Sha256::new();
            h.update(&data);
            h.finish(data.len() as u64)
        };
        for size in [1, PIPELINE_MIN] {
            let mut h = UploadHasher::for_size(size);
            assert_eq!(
                matches!(h, UploadHasher::Pipelined { .. }),
                size >= PIPELINE_MIN
            );
            let (a, b) = data.split_at(1000);
            h.update(a).await.unwrap();
            for chunk in b.chunks(65536) {
                h.update_bytes(Bytes::copy_from_slice(chunk)).await.unwrap();
            }
            assert_eq!(h.finish(data.len() as u64).await.unwrap(), expected);
        }
    }
}
