//! A [`BlobStore`] that counts what passes through it for the metrics: hits
//! and misses of lookups, bytes of committed uploads. Installed around every
//! local CAS when a metrics output is configured.

use bytes::Bytes;
use futures_util::future::BoxFuture;

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

impl BlobStore for Measured {
    fn missing<'a>(&'a self, keys: &'a [BlobKey]) -> BoxFuture<'a, Vec<BlobKey>> {
        Box::pin(async move {
            let missing = self.inner.missing(keys).await;
            let misses = missing.len() as u64;
            self.lookups((keys.len() as u64).saturating_sub(misses), misses);
            missing
        })
    }

    fn get<'a>(&'a self, key: &'a BlobKey) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let got = self.inner.get(key).await?;
            let hit = u64::from(got.is_some());
            self.lookups(hit, 1 - hit);
            Ok(got)
        })
    }

    fn read<'a>(
        &'a self,
        key: &'a BlobKey,
        offset: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<BlobStream>, StoreError>> {
        Box::pin(async move {
            let got = self.inner.read(key, offset, limit).await?;
            let hit = u64::from(got.is_some());
            self.lookups(hit, 1 - hit);
            Ok(got)
        })
    }

    fn begin<'a>(&'a self, key: BlobKey) -> BoxFuture<'a, Result<Box<dyn BlobWriter>, StoreError>> {
        Box::pin(async move {
            let inner = self.inner.begin(key).await?;
            let writer: Box<dyn BlobWriter> = Box::new(MeasuredWriter {
                inner,
                bytes_stored: self.counters.bytes_stored.clone(),
            });
            Ok(writer)
        })
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

impl BlobWriter for MeasuredWriter {
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.inner.write(data).await })
    }

    fn written(&self) -> u64 {
        self.inner.written()
    }

    fn commit<'a>(self: Box<Self>) -> BoxFuture<'a, Result<(), StoreError>>
    where
        Self: 'a,
    {
        Box::pin(async move {
            let bytes = self.inner.written();
            self.inner.commit().await?;
            self.bytes_stored.increment(bytes);
            Ok(())
        })
    }
}
