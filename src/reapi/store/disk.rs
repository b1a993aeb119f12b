//! A blob store in a directory, with a byte budget, least-recently-used
//! eviction and crash-safe writes.
//!
//! Layout: `{path}/cas/{first two hex digits}/{sha256 hex}-{size}`; sharding by
//! hash prefix keeps directories small. An upload streams into a temporary
//! file `.tmp-…` in the blob's shard directory (same filesystem), hashing as it
//! goes; on commit the file is fsynced, the digest verified, and only then
//! renamed into place (and the directory fsynced), so a crash leaves either the
//! whole verified blob or nothing but a temporary file. Temporary files are
//! deleted on start.
//!
//! The index lives in memory and is rebuilt on start by scanning the shard
//! directories: files whose name is not a digest or whose length differs from
//! the size in their name are deleted (contents are not re-hashed, which would
//! make start-up proportional to the store size; the rename-after-verify
//! protocol is what guarantees contents). Access order across restarts is
//! approximated by file modification times: a read refreshes a blob's mtime
//! when it is more than [`TOUCH_INTERVAL`] old. Reads stream from the file in
//! chunks; nothing reads a whole large blob into memory except
//! [`BlobStore::get`], which callers use only for small blobs.
//!
//! Filesystem namespace changes (rename into place, delete on eviction) happen
//! under the index lock, so an eviction can never delete a blob that a
//! concurrent upload has just put back.

use futures_util::future::BoxFuture;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::lru::Lru;
use super::{check_room, verify, BlobStore, BlobStream, BlobWriter, StoreError, CHUNK};
use crate::reapi::digest::{BlobKey, Sha256};

/// How stale a blob's mtime may get before a read refreshes it.
pub const TOUCH_INTERVAL: Duration = Duration::from_secs(60);

const TMP_PREFIX: &str = ".tmp-";

/// What the index keeps per blob.
struct DiskEntry {
    /// When the file's mtime was last refreshed.
    touched: Instant,
}

struct Inner {
    root: PathBuf,
    lru: Mutex<Lru<DiskEntry>>,
    tmp_counter: AtomicU64,
}

/// A blob store in a directory.
#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
}

/// Why a disk store could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("CAS directory {path}: {what}: {source}")]
pub struct OpenError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: io::Error,
}

impl DiskStore {
    /// Opens (creating if needed) the store in `path` with a budget of
    /// `max_bytes`, rebuilding the index from the files there and evicting the
    /// least recently used ones if they exceed the budget.
    pub fn open(path: &Path, max_bytes: u64) -> Result<DiskStore, OpenError> {
        let root = path.join("cas");
        let err = |what: &'static str| {
            let path = root.clone();
            move |source| OpenError { path, what, source }
        };
        fs::create_dir_all(&root).map_err(err("cannot create"))?;
        let mut found: Vec<(SystemTime, BlobKey)> = Vec::new();
        for shard in fs::read_dir(&root).map_err(err("cannot list"))? {
            let shard = shard.map_err(err("cannot list"))?;
            if !shard.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let shard_path = shard.path();
            let entries = match fs::read_dir(&shard_path) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("CAS: skipping {}: {e}", shard_path.display());
                    continue;
                }
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let path = entry.path();
                let meta = match entry.metadata() {
                    Ok(m) if m.is_file() => m,
                    _ => continue,
                };
                let key = parse_file_name(&name);
                match key {
                    Some(key)
                        if meta.len() == key.size
                            && shard_name(&key) == shard.file_name().to_string_lossy() =>
                    {
                        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        let atime = meta.accessed().unwrap_or(SystemTime::UNIX_EPOCH);
                        found.push((mtime.max(atime), key));
                    }
                    _ => {
                        if !name.starts_with(TMP_PREFIX) {
                            tracing::warn!(
                                "CAS: removing {}: not a blob of the length its name says",
                                path.display()
                            );
                        }
                        let _ = fs::remove_file(&path);
                    }
                }
            }
        }
        found.sort();
        let store = DiskStore {
            inner: Arc::new(Inner {
                root,
                lru: Mutex::new(Lru::new(max_bytes)),
                tmp_counter: AtomicU64::new(0),
            }),
        };
        {
            let mut lru = store.lock();
            let now = Instant::now();
            for (_, key) in found {
                for (gone, _) in lru.insert_loaded(key, DiskEntry { touched: now }) {
                    let _ = fs::remove_file(store.blob_path(&gone));
                }
            }
            tracing::info!(
                "CAS {}: {} blobs, {} of {} bytes",
                store.inner.root.display(),
                lru.len(),
                lru.used(),
                lru.max()
            );
        }
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Lru<DiskEntry>> {
        self.inner.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shard_dir(&self, key: &BlobKey) -> PathBuf {
        self.inner.root.join(shard_name(key))
    }

    fn blob_path(&self, key: &BlobKey) -> PathBuf {
        self.shard_dir(key)
            .join(format!("{}-{}", key.hex(), key.size))
    }

    /// Marks `key` used; returns whether it is stored. Refreshes the mtime
    /// when stale.
    fn touch(&self, key: &BlobKey) -> bool {
        let refresh = {
            let mut lru = self.lock();
            match lru.touch(key) {
                None => return false,
                Some(e) if e.touched.elapsed() > TOUCH_INTERVAL => {
                    e.touched = Instant::now();
                    true
                }
                Some(_) => false,
            }
        };
        if refresh {
            let path = self.blob_path(key);
            // Best effort: only the order after a restart depends on it.
            let _ = fs::File::options()
                .write(true)
                .open(path)
                .and_then(|f| f.set_modified(SystemTime::now()));
        }
        true
    }

    /// Deletes evicted blobs' files; called with the lock held.
    fn delete_evicted(&self, evicted: Vec<(BlobKey, DiskEntry)>) {
        for (key, _) in evicted {
            let path = self.blob_path(&key);
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("CAS: cannot delete evicted {}: {e}", path.display());
                }
            }
        }
    }
}

fn shard_name(key: &BlobKey) -> String {
    key.hex()[..2].to_string()
}

fn parse_file_name(name: &str) -> Option<BlobKey> {
    let (hash, size) = name.split_once('-')?;
    let size: i64 = size.parse().ok()?;
    BlobKey::parse(hash, size).ok()
}

fn io_error(what: &str, path: &Path, e: io::Error) -> StoreError {
    tracing::error!("CAS: {what} {}: {e}", path.display());
    StoreError::Io(format!("{what}: {e}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io(format!("background task failed: {e}")))?
}

impl BlobStore for DiskStore {
    fn missing<'a>(&'a self, keys: &'a [BlobKey]) -> BoxFuture<'a, Vec<BlobKey>> {
        Box::pin(async move {
            keys.iter()
                .filter(|k| !k.is_empty() && !self.touch(k))
                .copied()
                .collect()
        })
    }

    fn get<'a>(&'a self, key: &'a BlobKey) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            if key.is_empty() {
                return Ok(Some(Bytes::new()));
            }
            if !self.touch(key) {
                return Ok(None);
            }
            let path = self.blob_path(key);
            match tokio::fs::read(&path).await {
                Ok(data) => Ok(Some(Bytes::from(data))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_error("cannot read", &path, e)),
            }
        })
    }

    fn read<'a>(
        &'a self,
        key: &'a BlobKey,
        offset: u64,
        limit: u64,
    ) -> BoxFuture<'a, Result<Option<BlobStream>, StoreError>> {
        Box::pin(async move {
            if key.is_empty() {
                let empty: BlobStream = Box::pin(futures_util::stream::empty());
                return Ok(Some(empty));
            }
            if !self.touch(key) {
                return Ok(None);
            }
            let path = self.blob_path(key);
            // An open file stays readable even if the blob is evicted meanwhile.
            let mut file = match tokio::fs::File::open(&path).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_error("cannot open", &path, e)),
            };
            file.seek(io::SeekFrom::Start(offset))
                .await
                .map_err(|e| io_error("cannot seek", &path, e))?;
            let available = key.size.saturating_sub(offset);
            let remaining = if limit == 0 {
                available
            } else {
                limit.min(available)
            };
            let stream = futures_util::stream::unfold(
                (file, remaining, path),
                |(mut file, remaining, path)| async move {
                    if remaining == 0 {
                        return None;
                    }
                    let want = remaining.min(CHUNK as u64) as usize;
                    let mut buf = BytesMut::zeroed(want);
                    let mut filled = 0;
                    while filled < want {
                        match file.read(&mut buf[filled..]).await {
                            Ok(0) => break,
                            Ok(n) => filled += n,
                            Err(e) => {
                                return Some((
                                    Err(io_error("cannot read", &path, e)),
                                    (file, 0, path),
                                ))
                            }
                        }
                    }
                    if filled == 0 {
                        let e = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "blob file is shorter than its size",
                        );
                        return Some((Err(io_error("cannot read", &path, e)), (file, 0, path)));
                    }
                    buf.truncate(filled);
                    Some((Ok(buf.freeze()), (file, remaining - filled as u64, path)))
                },
            );
            let stream: BlobStream = Box::pin(stream);
            Ok(Some(stream))
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
            let store = self.clone();
            let dir = self.shard_dir(&key);
            let n = self.inner.tmp_counter.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!(
                "{TMP_PREFIX}{}-{}-{}-{n}",
                key.hex(),
                key.size,
                std::process::id()
            ));
            let tmp_path = tmp.clone();
            let file = blocking(move || {
                {
                    let mut lru = store.lock();
                    let evicted = lru.reserve(key.size)?;
                    store.delete_evicted(evicted);
                }
                let created = fs::create_dir_all(&dir).and_then(|_| {
                    fs::File::options()
                        .write(true)
                        .create_new(true)
                        .open(&tmp_path)
                });
                created.map_err(|e| {
                    store.lock().release(key.size);
                    io_error("cannot create", &tmp_path, e)
                })
            })
            .await?;
            let writer: Box<dyn BlobWriter> = Box::new(DiskWriter {
                store: self.clone(),
                key,
                tmp,
                file: Some(tokio::fs::File::from_std(file)),
                hasher: Sha256::new(),
                written: 0,
                pending: true,
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

/// An upload into a [`DiskStore`]: a temporary file until committed.
struct DiskWriter {
    store: DiskStore,
    key: BlobKey,
    tmp: PathBuf,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    written: u64,
    /// Whether the reservation and temporary file are still ours to clean up.
    pending: bool,
}

impl BlobWriter for DiskWriter {
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            check_room(&self.key, self.written, data.len())?;
            let file = self
                .file
                .as_mut()
                .ok_or_else(|| StoreError::Io("upload already finished".into()))?;
            file.write_all(data)
                .await
                .map_err(|e| io_error("cannot write", &self.tmp, e))?;
            self.hasher.update(data);
            self.written += data.len() as u64;
            Ok(())
        })
    }

    fn written(&self) -> u64 {
        self.written
    }

    fn commit<'a>(mut self: Box<Self>) -> BoxFuture<'a, Result<(), StoreError>>
    where
        Self: 'a,
    {
        Box::pin(async move {
            let actual = std::mem::take(&mut self.hasher).finish(self.written);
            verify(&self.key, &actual)?;
            let mut file = self
                .file
                .take()
                .ok_or_else(|| StoreError::Io("upload already finished".into()))?;
            file.flush()
                .await
                .map_err(|e| io_error("cannot flush", &self.tmp, e))?;
            file.sync_all()
                .await
                .map_err(|e| io_error("cannot fsync", &self.tmp, e))?;
            drop(file);
            let store = self.store.clone();
            let key = self.key;
            let tmp = self.tmp.clone();
            // From here on the blocking task owns the temporary file and the
            // reservation, whatever happens to this future.
            self.pending = false;
            blocking(move || {
                let dest = store.blob_path(&key);
                let mut lru = store.lock();
                if let Err(e) = fs::rename(&tmp, &dest) {
                    lru.release(key.size);
                    drop(lru);
                    let _ = fs::remove_file(&tmp);
                    return Err(io_error("cannot rename into place", &dest, e));
                }
                let _ = lru.insert_reserved(
                    key,
                    DiskEntry {
                        touched: Instant::now(),
                    },
                );
                drop(lru);
                if let Some(dir) = dest.parent() {
                    let _ = fs::File::open(dir).and_then(|d| d.sync_all());
                }
                Ok(())
            })
            .await
        })
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        if self.pending {
            self.file = None;
            let _ = fs::remove_file(&self.tmp);
            self.store.lock().release(self.key.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn survives_reopen_and_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let a = BlobKey::of(b"aaaa");
        let b = BlobKey::of(b"bbbb");
        {
            let store = DiskStore::open(dir.path(), 10).unwrap();
            store.put(a, b"aaaa").await.unwrap();
            store.put(b, b"bbbb").await.unwrap();
            assert!(store.put(BlobKey::of(b"zz"), b"zy").await.is_err());
        }
        // A leftover temporary file and a corrupt blob are cleaned up.
        let shard = dir.path().join("cas").join(&a.hex()[..2]);
        fs::write(shard.join(".tmp-junk"), b"x").unwrap();
        let store = DiskStore::open(dir.path(), 10).unwrap();
        assert!(!shard.join(".tmp-junk").exists());
        assert!(store.missing(&[a, b]).await.is_empty());
        let s = store.read(&b, 1, 2).await.unwrap().unwrap();
        let got: Vec<Bytes> = s.map(|r| r.unwrap()).collect().await;
        assert_eq!(got.concat(), b"bb");
        let c = BlobKey::of(b"cccc");
        store.put(c, b"cccc").await.unwrap();
        assert!(store.used_bytes() <= 10);
        assert_eq!(store.missing(&[a, b, c]).await.len(), 1);
        // Reopening with a smaller budget evicts down to it.
        drop(store);
        let store = DiskStore::open(dir.path(), 4).unwrap();
        assert_eq!(store.used_bytes(), 4);
    }
}
