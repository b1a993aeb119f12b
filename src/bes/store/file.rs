//! The embedded file store: a single-node durable build event store in one
//! [redb](https://docs.rs/redb) database file (`build-events.store: { file: PATH }`).
//!
//! Writes go through one writer thread that commits **group transactions**:
//! it takes every publish request waiting in its queue (from any number of
//! concurrent streams), applies them in arrival order in one write
//! transaction, commits it durably (fsync), and only then answers each
//! request. An event is therefore acknowledged only after it is on disk, and
//! under load one fsync covers many streams' events. Reads use redb's MVCC
//! read transactions on the blocking thread pool and never wait for writes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use prost::Message;
use redb::{Database, ReadableTable, TableDefinition};
use regex::Regex;
use tokio::sync::oneshot;

use super::{
    check_event, EventFilter, EventStore, Outcome, Published, Step, StoreError, StoreStats,
    StoredEvent, StreamInfo,
};
use crate::bes::event::{EventKind, Prepared, StreamKey};

/// Streams by (build_id, invocation_id, component) → [`StreamRecord`].
const STREAMS: TableDefinition<(&str, &str, i32), &[u8]> = TableDefinition::new("bes_streams");
/// Events by (stream number, sequence number) → [`EventRecord`].
const EVENTS: TableDefinition<(u64, i64), &[u8]> = TableDefinition::new("bes_events");
/// Counters (`next_stream`).
const META: TableDefinition<&str, u64> = TableDefinition::new("bes_meta");

/// redb's page cache (its default, 1 GiB, is more than a gateway should hold).
const CACHE_BYTES: usize = 64 << 20;

/// Most publish requests applied in one transaction.
const MAX_GROUP: usize = 512;

/// A stream as stored.
#[derive(Clone, PartialEq, Message)]
struct StreamRecord {
    /// The stream's number (the first half of its events' keys).
    #[prost(uint64, tag = "1")]
    id: u64,
    #[prost(string, tag = "2")]
    instance: String,
    #[prost(int64, tag = "3")]
    last_seq: i64,
    #[prost(bool, tag = "4")]
    finished: bool,
}

/// An event as stored.
#[derive(Clone, PartialEq, Message)]
struct EventRecord {
    #[prost(int32, tag = "1")]
    kind: i32,
    #[prost(int64, optional, tag = "2")]
    time_micros: Option<i64>,
    #[prost(bytes = "bytes", tag = "3")]
    body: Bytes,
}

/// One publish request for the writer thread.
struct Job {
    instance: String,
    events: Vec<Prepared>,
    reply: oneshot::Sender<Result<Published, StoreError>>,
}

#[derive(Default)]
struct Counters {
    stored: AtomicU64,
    duplicates: AtomicU64,
}

/// The file store.
pub struct FileStore {
    db: Arc<Database>,
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<std::thread::JoinHandle<()>>,
    counters: Arc<Counters>,
    path: PathBuf,
}

fn internal(what: &str, e: impl Into<redb::Error>) -> StoreError {
    StoreError::Internal(format!("{what}: {}", e.into()))
}

impl FileStore {
    /// Opens (or creates) the database at `path` and starts its writer. If
    /// another store in this process is still closing the file, waits for it
    /// for a few seconds.
    pub async fn open(path: &Path) -> Result<FileStore, StoreError> {
        let path = path.to_path_buf();
        let p = path.clone();
        let db = tokio::task::spawn_blocking(move || open_db(&p))
            .await
            .map_err(|e| StoreError::Internal(format!("opening the file store: {e}")))??;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let writer = {
            let db = db.clone();
            let counters = counters.clone();
            std::thread::Builder::new()
                .name("bes-file-writer".into())
                .spawn(move || writer(&db, &rx, &counters))
                .map_err(|e| StoreError::Internal(format!("starting the file store writer: {e}")))?
        };
        tracing::info!(path = %path.display(), "build events: file store open");
        Ok(FileStore {
            db,
            jobs: Some(tx),
            writer: Some(writer),
            counters,
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs a read on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Internal(format!("file store read: {e}")))?
    }
}

impl Drop for FileStore {
    fn drop(&mut self) {
        // Closing the queue stops the writer after the requests it holds;
        // joining it releases the file for a store opened next.
        self.jobs.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn open_db(path: &Path) -> Result<Database, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Internal(format!("creating {}: {e}", dir.display())))?;
    }
    let mut waited = Duration::ZERO;
    let db = loop {
        match Database::builder().set_cache_size(CACHE_BYTES).create(path) {
            Ok(db) => break db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if waited < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(50));
                waited += Duration::from_millis(50);
            }
            Err(e) => return Err(internal(&format!("opening {}", path.display()), e)),
        }
    };
    // Create the tables so read transactions always find them.
    let txn = db.begin_write().map_err(|e| internal("write", e))?;
    txn.open_table(STREAMS).map_err(|e| internal("table", e))?;
    txn.open_table(EVENTS).map_err(|e| internal("table", e))?;
    txn.open_table(META).map_err(|e| internal("table", e))?;
    txn.commit().map_err(|e| internal("commit", e))?;
    Ok(db)
}

/// The writer thread: group commits until the queue closes.
fn writer(db: &Database, jobs: &mpsc::Receiver<Job>, counters: &Counters) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        match apply(db, &group) {
            Ok(results) => {
                for (job, out) in group.into_iter().zip(results) {
                    let stored = out
                        .outcomes
                        .iter()
                        .filter(|o| **o == Outcome::Stored)
                        .count();
                    counters.stored.fetch_add(stored as u64, Ordering::Relaxed);
                    counters
                        .duplicates
                        .fetch_add((out.outcomes.len() - stored) as u64, Ordering::Relaxed);
                    let _ = job.reply.send(Ok(out));
                }
            }
            Err(e) => {
                tracing::error!("build events: file store commit failed: {e}");
                for job in group {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Applies a group of publish requests in one durable transaction.
fn apply(db: &Database, group: &[Job]) -> Result<Vec<Published>, StoreError> {
    let txn = db.begin_write().map_err(|e| internal("write", e))?;
    let mut results = Vec::with_capacity(group.len());
    {
        let mut streams = txn.open_table(STREAMS).map_err(|e| internal("table", e))?;
        let mut events = txn.open_table(EVENTS).map_err(|e| internal("table", e))?;
        let mut meta = txn.open_table(META).map_err(|e| internal("table", e))?;
        for job in group {
            let mut out = Published::default();
            let Some(first) = job.events.first() else {
                results.push(out);
                continue;
            };
            // One stream per job: read its record once, write it once.
            let k = &first.stream;
            let key = (k.build_id.as_str(), k.invocation_id.as_str(), k.component);
            let record = match streams.get(key).map_err(|e| internal("read", e))? {
                Some(v) => Some(StreamRecord::decode(v.value()).map_err(|e| {
                    StoreError::Internal(format!("corrupt stream record for {k}: {e}"))
                })?),
                None => None,
            };
            let mut state = record.as_ref().map(|r| StreamInfo {
                key: k.clone(),
                instance: r.instance.clone(),
                last_seq: r.last_seq,
                finished: r.finished,
            });
            let mut id = record.as_ref().map(|r| r.id);
            let mut changed = false;
            for event in &job.events {
                if event.stream != *k {
                    break; // The service sends one stream per call.
                }
                let step = match check_event(&mut state, &job.instance, event) {
                    Ok(s) => s,
                    Err(r) => {
                        out.rejection = Some(r);
                        break;
                    }
                };
                let stream_id = match id {
                    Some(id) => id,
                    None => {
                        let next = meta
                            .get("next_stream")
                            .map_err(|e| internal("read", e))?
                            .map_or(1, |v| v.value());
                        meta.insert("next_stream", next + 1)
                            .map_err(|e| internal("write", e))?;
                        id = Some(next);
                        next
                    }
                };
                if step == Step::Duplicate {
                    let identical = events
                        .get((stream_id, event.seq))
                        .map_err(|e| internal("read", e))?
                        .and_then(|v| EventRecord::decode(v.value()).ok())
                        .is_some_and(|r| r.body == event.body);
                    out.outcomes.push(Outcome::Duplicate { identical });
                    continue;
                }
                let rec = EventRecord {
                    kind: event.kind as i32,
                    time_micros: event.time_micros,
                    body: event.body.clone(),
                };
                events
                    .insert((stream_id, event.seq), rec.encode_to_vec().as_slice())
                    .map_err(|e| internal("write", e))?;
                changed = true;
                out.outcomes.push(Outcome::Stored);
            }
            if let (true, Some(info), Some(id)) = (changed, &state, id) {
                let srec = StreamRecord {
                    id,
                    instance: info.instance.clone(),
                    last_seq: info.last_seq,
                    finished: info.finished,
                };
                streams
                    .insert(key, srec.encode_to_vec().as_slice())
                    .map_err(|e| internal("write", e))?;
            }
            results.push(out);
        }
    }
    txn.commit().map_err(|e| internal("commit", e))?;
    Ok(results)
}

fn stream_info(
    (b, i, c): (&str, &str, i32),
    value: &[u8],
) -> Result<(StreamInfo, u64), StoreError> {
    let r = StreamRecord::decode(value)
        .map_err(|e| StoreError::Internal(format!("corrupt stream record: {e}")))?;
    Ok((
        StreamInfo {
            key: StreamKey {
                build_id: b.to_string(),
                invocation_id: i.to_string(),
                component: c,
            },
            instance: r.instance,
            last_seq: r.last_seq,
            finished: r.finished,
        },
        r.id,
    ))
}

impl EventStore for FileStore {
    fn backend(&self) -> &'static str {
        "file"
    }

    fn publish_events<'a>(
        &'a self,
        instance: &'a str,
        events: &'a [Prepared],
    ) -> BoxFuture<'a, Result<Published, StoreError>> {
        async move {
            let (reply, answer) = oneshot::channel();
            let job = Job {
                instance: instance.to_string(),
                events: events.to_vec(),
                reply,
            };
            self.jobs
                .as_ref()
                .ok_or_else(|| StoreError::Unavailable("the file store is closing".into()))?
                .send(job)
                .map_err(|_| StoreError::Unavailable("the file store writer has stopped".into()))?;
            answer
                .await
                .map_err(|_| StoreError::Internal("the file store writer has stopped".into()))?
        }
        .boxed()
    }

    fn get_stream<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<StreamInfo>, StoreError>> {
        let key = key.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(|e| internal("read", e))?;
            let streams = txn.open_table(STREAMS).map_err(|e| internal("table", e))?;
            let k = (
                key.build_id.as_str(),
                key.invocation_id.as_str(),
                key.component,
            );
            match streams.get(k).map_err(|e| internal("read", e))? {
                Some(v) => Ok(Some(stream_info(k, v.value())?.0)),
                None => Ok(None),
            }
        })
        .boxed()
    }

    fn get_matching_streams<'a>(
        &'a self,
        pattern: &'a Regex,
        instance: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<StreamInfo>, StoreError>> {
        let pattern = pattern.clone();
        let instance = instance.map(str::to_string);
        self.read(move |db| {
            let txn = db.begin_read().map_err(|e| internal("read", e))?;
            let streams = txn.open_table(STREAMS).map_err(|e| internal("table", e))?;
            let mut out = Vec::new();
            for row in streams.iter().map_err(|e| internal("read", e))? {
                let (k, v) = row.map_err(|e| internal("read", e))?;
                let (info, _) = stream_info(k.value(), v.value())?;
                if instance.as_deref().is_none_or(|i| info.instance == i)
                    && pattern.is_match(&info.key.query_key())
                {
                    out.push(info);
                }
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .boxed()
    }

    fn query_events<'a>(
        &'a self,
        key: &'a StreamKey,
        filter: &'a EventFilter,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        let key = key.clone();
        let filter = filter.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(|e| internal("read", e))?;
            let streams = txn.open_table(STREAMS).map_err(|e| internal("table", e))?;
            let events = txn.open_table(EVENTS).map_err(|e| internal("table", e))?;
            let k = (
                key.build_id.as_str(),
                key.invocation_id.as_str(),
                key.component,
            );
            let Some(v) = streams.get(k).map_err(|e| internal("read", e))? else {
                return Ok(Vec::new());
            };
            let (_, id) = stream_info(k, v.value())?;
            let lo = filter.min_seq.unwrap_or(1).max(1);
            let hi = filter.max_seq.unwrap_or(i64::MAX);
            let mut out = Vec::new();
            if lo > hi {
                return Ok(out);
            }
            for row in events
                .range((id, lo)..=(id, hi))
                .map_err(|e| internal("read", e))?
            {
                let (k, v) = row.map_err(|e| internal("read", e))?;
                let r = EventRecord::decode(v.value())
                    .map_err(|e| StoreError::Internal(format!("corrupt event record: {e}")))?;
                let Some(kind) = EventKind::from_number(r.kind) else {
                    continue;
                };
                let e = StoredEvent {
                    seq: k.value().1,
                    kind,
                    time_micros: r.time_micros,
                    body: r.body,
                };
                if filter.accepts(&e) {
                    out.push(e);
                }
            }
            Ok(out)
        })
        .boxed()
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            stored_events: self.counters.stored.load(Ordering::Relaxed),
            duplicate_events: self.counters.duplicates.load(Ordering::Relaxed),
            ..StoreStats::default()
        }
    }
}
