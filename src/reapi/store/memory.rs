//! A blob store in memory, with a byte budget and least-recently-used
//! eviction.
//!
//! Uploads reserve their declared size in the budget before they receive data
//! and buffer into memory that the reservation accounts for, so stored blobs
//! plus uploads in progress never exceed the budget. Stored blobs are copied
//! out of request buffers (never kept as slices of a larger message), so the
//! budget counts what is really held. A read hands out a reference-counted
//! slice: a blob evicted while a read streams it is freed when the read ends.

use futures_util::future::BoxFuture;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};

use super::hasher::UploadHasher;
use super::lru::Lru;
use super::{check_room, slice_stream, verify, BlobStore, BlobStream, BlobWriter, StoreError};
use crate::reapi::digest::BlobKey;

/// An in-memory blob store.
#[derive(Clone)]
pub struct MemoryStore {
    lru: Arc<Mutex<Lru<Bytes>>>,
}

impl MemoryStore {
    /// An empty store holding at most `max_bytes`.
    pub fn new(max_bytes: u64) -> MemoryStore {
        MemoryStore {
            lru: Arc::new(Mutex::new(Lru::new(max_bytes))),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lru<Bytes>> {
        // A panic while holding the lock cannot leave the index inconsistent
        // in a way that matters more than losing the store; keep serving.
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlobStore for MemoryStore {
    fn missing<'a>(&'a self, keys: &'a [BlobKey]) -> BoxFuture<'a, Vec<BlobKey>> {
        Box::pin(async move {
            let mut lru = self.lock();
            keys.iter()
                .filter(|k| !k.is_empty() && lru.touch(k).is_none())
                .copied()
                .collect()
        })
    }

    fn get<'a>(&'a self, key: &'a BlobKey) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            if key.is_empty() {
                return Ok(Some(Bytes::new()));
            }
            Ok(self.lock().touch(key).map(|b| b.clone()))
        })
    }

    fn read<'a>(
        &'a self,
        key: &'a BlobKey,
        offset: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<BlobStream>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .get(key)
                .await?
                .map(|data| slice_stream(data, offset, limit)))
        })
    }

    fn begin<'a>(&'a self, key: BlobKey) -> BoxFuture<'a, Result<Box<dyn BlobWriter>, StoreError>> {
        Box::pin(async move {
            let max = self.max_bytes();
            if key.size > max {
                return Err(StoreError::TooLarge {
                    size: key.size,
                    max,
                });
            }
            // Evicted blobs are dropped here, outside any await.
            drop(self.lock().reserve(key.size)?);
            // The declared size is reserved in the budget, so the buffer can be
            // allocated once instead of growing (and copying) as chunks arrive.
            let capacity = usize::try_from(key.size).unwrap_or(0);
            let writer: Box<dyn BlobWriter> = Box::new(MemoryWriter {
                store: self.clone(),
                key,
                buf: BytesMut::with_capacity(capacity),
                hasher: Some(UploadHasher::for_size(key.size)),
                reserved: true,
            });
            Ok(writer)
        })
    }

    fn max_bytes(&self) -> u64 {
        self.lock().max()
    }

    fn used_bytes(&self) -> u64 {
        self.lock().used()
    }

    fn evictions(&self) -> u64 {
        self.lock().evictions()
    }
}

/// An upload into a [`MemoryStore`].
struct MemoryWriter {
    store: MemoryStore,
    key: BlobKey,
    buf: BytesMut,
    /// `None` once committed.
    hasher: Option<UploadHasher>,
    /// Whether the reservation is still held (released on drop).
    reserved: bool,
}

impl BlobWriter for MemoryWriter {
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            check_room(&self.key, self.buf.len() as u64, data.len())?;
            self.hasher_mut()?.update(data).await?;
            self.buf.extend_from_slice(data);
            Ok(())
        })
    }

    fn write_bytes<'a>(&'a mut self, data: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            check_room(&self.key, self.buf.len() as u64, data.len())?;
            self.buf.extend_from_slice(&data);
            self.hasher_mut()?.update_bytes(data).await
        })
    }

    fn written(&self) -> u64 {
        self.buf.len() as u64
    }

    fn commit<'a>(mut self: Box<Self>) -> BoxFuture<'a, Result<(), StoreError>>
    where
        Self: 'a,
    {
        Box::pin(async move {
            let size = self.buf.len() as u64;
            let hasher = self
                .hasher
                .take()
                .ok_or_else(|| StoreError::Io("upload already finished".into()))?;
            let actual = hasher.finish(size).await?;
            verify(&self.key, &actual)?;
            let data = std::mem::take(&mut self.buf).freeze();
            self.reserved = false;
            // A concurrent upload of the same blob may have won; either way the
            // blob is stored and the reservation is settled.
            let _ = self.store.lock().insert_reserved(self.key, data);
            Ok(())
        })
    }
}

impl MemoryWriter {
    fn hasher_mut(&mut self) -> Result<&mut UploadHasher, StoreError> {
        self.hasher
            .as_mut()
            .ok_or_else(|| StoreError::Io("upload already finished".into()))
    }
}

impl Drop for MemoryWriter {
    fn drop(&mut self) {
        if self.reserved {
            self.store.lock().release(self.key.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn round_trip_and_budget() {
        let store = MemoryStore::new(10);
        let a = BlobKey::of(b"aaaa");
        store.put(a, b"aaaa").await.unwrap();
        assert_eq!(store.get(&a).await.unwrap().unwrap(), &b"aaaa"[..]);
        let b = BlobKey::of(b"bbbbbb");
        store.put(b, b"bbbbbb").await.unwrap();
        let c = BlobKey::of(b"cc");
        store.put(c, b"cc").await.unwrap();
        // a was least recently used and is gone; the budget holds.
        assert_eq!(store.missing(&[a, b, c]).await, vec![a]);
        assert!(store.used_bytes() <= 10);
        let big = BlobKey::of(b"0123456789x");
        assert!(matches!(
            store.put(big, b"0123456789x").await,
            Err(StoreError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn refuses_wrong_data() {
        let store = MemoryStore::new(100);
        let k = BlobKey::of(b"right");
        assert!(matches!(
            store.put(k, b"wrong").await,
            Err(StoreError::HashMismatch { .. })
        ));
        assert!(store.put(k, b"righ").await.is_err());
        assert!(store.put(k, b"rightt").await.is_err());
        assert_eq!(store.used_bytes(), 0);
        assert_eq!(store.lock().reserved(), 0);
    }

    #[tokio::test]
    async fn reads_ranges() {
        let store = MemoryStore::new(100);
        let k = BlobKey::of(b"0123456789");
        store.put(k, b"0123456789").await.unwrap();
        let s = store.read(&k, 3, 4).await.unwrap().unwrap();
        let parts: Vec<Bytes> = s.map(|r| r.unwrap()).collect().await;
        assert_eq!(parts.concat(), b"3456");
    }
}
