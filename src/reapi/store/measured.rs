//! A [`BlobStore`] that counts what passes through it for the metrics: hits
//! and misses of lookups, bytes of committed uploads. Installed around every
//! local CAS when a metrics output is configured.

use bytes::Bytes;

use std::sync::Arc;

use super::{BlobKey, BlobStore, BlobStream, BlobWriter, StoreError};
use crate::metrics::CasCounters;

/// Counts lookups and stored bytes of `inner` under an instance label.
pub struct Measured {
    inner: Arc<dyn BlobStore>,
    counters: CasCounters,
}

impl Measured {
    pub fn new(inner: Arc<dyn BlobStore>, instance: &str) -> Measured {
        Measured {
            inner,
            counters: CasCounters::new(instance),
        }
    }

    fn lookups(&self, hits: u64, misses: u64) {
        if hits > 0 {
            self.counters.hits.increment(hits);
        }
        if misses > 0 {
            self.counters.misses.increment(misses);
        }
    }
}

#[tonic::async_trait]
impl BlobStore for Measured {
    async fn missing(&self, keys: &[BlobKey]) -> Vec<BlobKey> {
        let missing = self.inner.missing(keys).await;
        let misses = missing.len() as u64;
        self.lookups((keys.len() as u64).saturating_sub(misses), misses);
        missing
    }

    async fn get(&self, key: &BlobKey) -> Result<Option<Bytes>, StoreError> {
        let got = self.inner.get(key).await?;
        let hit = u64::from(got.is_some());
        self.lookups(hit, 1 - hit);
        Ok(got)
    }

    async fn read(
        &self,
        key: &BlobKey,
        offset: u64,
        limit: u64,
    ) -> Result<Option<BlobStream>, StoreError> {
        let got = self.inner.read(key, offset, limit).await?;
        let hit = u64::from(got.is_some());
        self.lookups(hit, 1 - hit);
        Ok(got)
    }

    async fn begin(&self, key: BlobKey) -> Result<Box<dyn BlobWriter>, StoreError> {
        let inner = self.inner.begin(key).await?;
        Ok(Box::new(MeasuredWriter {
            inner,
            bytes_stored: self.counters.bytes_stored.clone(),
        }))
    }

    fn max_bytes(&self) -> u64 {
        self.inner.max_bytes()
    }

    fn used_bytes(&self) -> u64 {
        self.inner.used_bytes()
    }

    fn evictions(&self) -> u64 {
        self.inner.evictions()
    }
}

struct MeasuredWriter {
    inner: Box<dyn BlobWriter>,
    bytes_stored: metrics::Counter,
}

#[tonic::async_trait]
impl BlobWriter for MeasuredWriter {
    async fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.inner.write(data).await
    }

    fn written(&self) -> u64 {
        self.inner.written()
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let bytes = self.inner.written();
        self.inner.commit().await?;
        self.bytes_stored.increment(bytes);
        Ok(())
    }
}
