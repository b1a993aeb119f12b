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
    check_event, Cursor, EventFilter, EventStore, InvocationQuery, Outcome, Published, Step,
    StoreError, StoreStats, StoredEvent, StreamInfo, Swept,
};
use crate::bes::event::{EventKind, Prepared, StreamKey};
use crate::bes::invocation::{model, InvocationKey};
use crate::proto::gridgate::v1 as gg;

/// Streams by (build_id, invocation_id, component, instance) → [`StreamRecord`].
const STREAMS: TableDefinition<(&str, &str, i32, &str), &[u8]> =
    TableDefinition::new("bes_streams_v2");
/// Schema 1's streams table, keyed without the instance; its rows move to
/// [`STREAMS`] when the file is opened.
const STREAMS_V1: TableDefinition<(&str, &str, i32), &[u8]> = TableDefinition::new("bes_streams");
/// Events by (stream number, sequence number) → [`EventRecord`].
const EVENTS: TableDefinition<(u64, i64), &[u8]> = TableDefinition::new("bes_events");
/// Counters (`next_stream`) and the schema version (`schema`).
const META: TableDefinition<&str, u64> = TableDefinition::new("bes_meta");

/// Invocations by (instance, invocation id) → encoded `gridgate.v1.Invocation`.
const INVOCATIONS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("bes_invocations");
/// The listing order, newest last: (start ms, instance, invocation id).
const LISTING: TableDefinition<(i64, &str, &str), ()> = TableDefinition::new("bes_inv_listing");
/// The same per instance: (instance, start ms, invocation id).
const LISTING_BY_INSTANCE: TableDefinition<(&str, i64, &str), ()> =
    TableDefinition::new("bes_inv_listing_by_instance");
/// Targets by (instance, invocation id, label) → encoded `gridgate.v1.Target`.
const TARGETS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("bes_targets");
/// Streams by the time their last event was stored: (ms, stream number) →
/// the stream's key. A row older than its stream's record is stale (the
/// stream was written since) and is dropped when met.
const STREAM_AGE: TableDefinition<(i64, u64), (&str, &str, i32, &str)> =
    TableDefinition::new("bes_stream_age");
/// Running invocations: (instance, invocation id) → when their last event was stored (ms).
const RUNNING: TableDefinition<(&str, &str), i64> = TableDefinition::new("bes_inv_running");
/// Console output by (instance, invocation id, byte offset) → text.
const LOGS: TableDefinition<(&str, &str, i64), &[u8]> = TableDefinition::new("bes_logs");

/// The schema this code writes: 1 keyed streams without the instance, 2 adds
/// it, 3 adds invocations.
const SCHEMA: u64 = 3;

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
    /// The owner (schema 1; since schema 2 it is part of the key).
    #[prost(string, tag = "2")]
    instance: String,
    #[prost(int64, tag = "3")]
    last_seq: i64,
    #[prost(bool, tag = "4")]
    finished: bool,
    /// When its last event was stored (ms since the epoch; 0 before schema 3).
    #[prost(int64, tag = "5")]
    updated_ms: i64,
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
    // Create the tables so read transactions always find them, and bring an
    // older file to this schema, all in one transaction.
    let txn = db.begin_write().map_err(|e| internal("write", e))?;
    txn.open_table(STREAMS).map_err(|e| internal("table", e))?;
    txn.open_table(EVENTS).map_err(|e| internal("table", e))?;
    let version = {
        let mut meta = txn.open_table(META).map_err(|e| internal("table", e))?;
        let v = meta
            .get("schema")
            .map_err(|e| internal("read", e))?
            .map(|v| v.value());
        // A file without a schema mark is schema 1 (or new: nothing to move).
        let v = v.unwrap_or(1);
        if v > SCHEMA {
            return Err(StoreError::Internal(format!(
                "{} has file store schema {v}; this gridgate knows up to {SCHEMA}",
                path.display()
            )));
        }
        meta.insert("schema", SCHEMA)
            .map_err(|e| internal("write", e))?;
        v
    };
    if version < 2 {
        migrate_v1_streams(&txn)?;
        tracing::info!(path = %path.display(), "build events: file store migrated to schema 2");
    }
    InvocationTables::open(&txn)?;
    txn.open_table(STREAM_AGE)
        .map_err(|e| internal("table", e))?;
    if version < 3 {
        let n = backfill_invocations(&txn)?;
        tracing::info!(path = %path.display(), invocations = n, "build events: file store migrated to schema 3 (invocations indexed)");
    }
    txn.commit().map_err(|e| internal("commit", e))?;
    Ok(db)
}

/// The tables an invocation lives in, open in one write transaction.
struct InvocationTables<'t> {
    invocations: redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    listing: redb::Table<'t, (i64, &'static str, &'static str), ()>,
    by_instance: redb::Table<'t, (&'static str, i64, &'static str), ()>,
    targets: redb::Table<'t, (&'static str, &'static str, &'static str), &'static [u8]>,
    logs: redb::Table<'t, (&'static str, &'static str, i64), &'static [u8]>,
    running: redb::Table<'t, (&'static str, &'static str), i64>,
}

fn corrupt(what: &str, e: prost::DecodeError) -> StoreError {
    StoreError::Internal(format!("corrupt {what} record: {e}"))
}

impl<'t> InvocationTables<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Self, StoreError> {
        let t = |e| internal("table", e);
        Ok(InvocationTables {
            invocations: txn.open_table(INVOCATIONS).map_err(t)?,
            listing: txn.open_table(LISTING).map_err(t)?,
            by_instance: txn.open_table(LISTING_BY_INSTANCE).map_err(t)?,
            targets: txn.open_table(TARGETS).map_err(t)?,
            logs: txn.open_table(LOGS).map_err(t)?,
            running: txn.open_table(RUNNING).map_err(t)?,
        })
    }

    /// Applies newly stored events of `stream` to the invocation they feed.
    fn update(&mut self, stream: &StreamKey, stored: &[&Prepared]) -> Result<(), StoreError> {
        let Some(key) = InvocationKey::of(stream) else {
            return Ok(());
        };
        let (i, id) = (key.instance.as_str(), key.invocation_id.as_str());
        let summary = match self
            .invocations
            .get((i, id))
            .map_err(|e| internal("read", e))?
        {
            Some(v) => {
                Some(gg::Invocation::decode(v.value()).map_err(|e| corrupt("invocation", e))?)
            }
            None => None,
        };
        let mut touched = std::collections::HashMap::new();
        for label in model::labels(stored.iter().copied()) {
            if let Some(v) = self
                .targets
                .get((i, id, label.as_str()))
                .map_err(|e| internal("read", e))?
            {
                let t = gg::Target::decode(v.value()).map_err(|e| corrupt("target", e))?;
                touched.insert(label, t);
            }
        }
        let Some(update) = model::apply(stream, summary, touched, stored.iter().copied()) else {
            return Ok(());
        };
        if let Some(start) = update.previous_start {
            self.listing
                .remove((start, i, id))
                .map_err(|e| internal("write", e))?;
            self.by_instance
                .remove((i, start, id))
                .map_err(|e| internal("write", e))?;
        }
        let start = update.invocation.start_time_millis;
        self.listing
            .insert((start, i, id), ())
            .map_err(|e| internal("write", e))?;
        self.by_instance
            .insert((i, start, id), ())
            .map_err(|e| internal("write", e))?;
        self.invocations
            .insert((i, id), update.invocation.encode_to_vec().as_slice())
            .map_err(|e| internal("write", e))?;
        for t in &update.targets {
            self.targets
                .insert((i, id, t.label.as_str()), t.encode_to_vec().as_slice())
                .map_err(|e| internal("write", e))?;
        }
        for (offset, text) in &update.log {
            self.logs
                .insert((i, id, *offset), text.as_ref())
                .map_err(|e| internal("write", e))?;
        }
        if update.invocation.state() == gg::InvocationState::Running {
            self.running
                .insert((i, id), super::now_millis())
                .map_err(|e| internal("write", e))?;
        } else {
            self.running
                .remove((i, id))
                .map_err(|e| internal("write", e))?;
        }
        Ok(())
    }

    /// Deletes an invocation and everything it holds.
    fn delete(&mut self, key: &InvocationKey) -> Result<(), StoreError> {
        let (i, id) = (key.instance.as_str(), key.invocation_id.as_str());
        let w = |e| internal("write", e);
        if let Some(v) = self.invocations.remove((i, id)).map_err(w)? {
            let inv = gg::Invocation::decode(v.value()).map_err(|e| corrupt("invocation", e))?;
            let start = inv.start_time_millis;
            self.listing.remove((start, i, id)).map_err(w)?;
            self.by_instance.remove((i, start, id)).map_err(w)?;
        }
        let rest: Vec<String> = self
            .targets
            .range((i, id, "")..)
            .map_err(|e| internal("read", e))?
            .map_while(|r| {
                let (k, _) = r.ok()?;
                let (ki, kid, label) = k.value();
                (ki == i && kid == id).then(|| label.to_string())
            })
            .collect();
        for label in rest {
            self.targets.remove((i, id, label.as_str())).map_err(w)?;
        }
        self.logs
            .retain_in((i, id, i64::MIN)..=(i, id, i64::MAX), |_, _| false)
            .map_err(w)?;
        self.running.remove((i, id)).map_err(w)?;
        Ok(())
    }
}

/// One step of retention in one write transaction (see [`EventStore::sweep`]).
fn sweep(
    db: &Database,
    expire_before: Option<i64>,
    abandon_before: Option<i64>,
    batch: usize,
) -> Result<Swept, StoreError> {
    let txn = db.begin_write().map_err(|e| internal("write", e))?;
    let mut out = Swept::default();
    {
        let w = |e| internal("write", e);
        let mut streams = txn.open_table(STREAMS).map_err(|e| internal("table", e))?;
        let mut events = txn.open_table(EVENTS).map_err(|e| internal("table", e))?;
        let mut age = txn
            .open_table(STREAM_AGE)
            .map_err(|e| internal("table", e))?;
        let mut inv = InvocationTables::open(&txn)?;
        if let Some(before) = expire_before {
            // (age row, the stream's key as owned strings)
            type Due = ((i64, u64), (String, String, i32, String));
            let mut old: Vec<Due> = Vec::new();
            for row in age
                .range((i64::MIN, 0)..(before, 0))
                .map_err(|e| internal("read", e))?
                .take(batch)
            {
                let (k, v) = row.map_err(|e| internal("read", e))?;
                let (b, iv, c, inst) = v.value();
                old.push((k.value(), (b.into(), iv.into(), c, inst.into())));
            }
            for ((at, id), (b, iv, c, inst)) in old {
                age.remove((at, id)).map_err(w)?;
                let key = (b.as_str(), iv.as_str(), c, inst.as_str());
                let current = match streams.get(key).map_err(|e| internal("read", e))? {
                    Some(v) => StreamRecord::decode(v.value()).map_err(|e| corrupt("stream", e))?,
                    None => continue,
                };
                if current.id != id || current.updated_ms > at {
                    continue; // Written since: a newer row stands for it.
                }
                streams.remove(key).map_err(w)?;
                events
                    .retain_in((id, i64::MIN)..=(id, i64::MAX), |_, _| false)
                    .map_err(w)?;
                if !iv.is_empty() {
                    inv.delete(&InvocationKey {
                        instance: inst.clone(),
                        invocation_id: iv.clone(),
                    })?;
                }
                out.deleted_streams += 1;
            }
        }
        if let Some(before) = abandon_before {
            let mut silent = Vec::new();
            for row in inv.running.iter().map_err(|e| internal("read", e))? {
                let (k, v) = row.map_err(|e| internal("read", e))?;
                if v.value() < before {
                    let (i, id) = k.value();
                    silent.push((i.to_string(), id.to_string()));
                    if silent.len() >= batch {
                        break;
                    }
                }
            }
            for (i, id) in silent {
                inv.running.remove((i.as_str(), id.as_str())).map_err(w)?;
                let Some(v) = inv
                    .invocations
                    .get((i.as_str(), id.as_str()))
                    .map_err(|e| internal("read", e))?
                    .map(|v| v.value().to_vec())
                else {
                    continue;
                };
                let mut summary =
                    gg::Invocation::decode(v.as_slice()).map_err(|e| corrupt("invocation", e))?;
                if model::abandon(&mut summary) {
                    inv.invocations
                        .insert(
                            (i.as_str(), id.as_str()),
                            summary.encode_to_vec().as_slice(),
                        )
                        .map_err(w)?;
                    out.abandoned += 1;
                }
            }
        }
    }
    txn.commit().map_err(|e| internal("commit", e))?;
    Ok(out)
}

/// Schema 2 → 3: builds the invocations of the events already stored, stream
/// by stream, as ingest would have. Returns the number of streams read.
fn backfill_invocations(txn: &redb::WriteTransaction) -> Result<u64, StoreError> {
    let streams = txn.open_table(STREAMS).map_err(|e| internal("table", e))?;
    let events = txn.open_table(EVENTS).map_err(|e| internal("table", e))?;
    let mut age = txn
        .open_table(STREAM_AGE)
        .map_err(|e| internal("table", e))?;
    let mut tables = InvocationTables::open(txn)?;
    let now = super::now_millis();
    let mut n = 0;
    for row in streams.iter().map_err(|e| internal("read", e))? {
        let (k, v) = row.map_err(|e| internal("read", e))?;
        let (info, id) = stream_info(k.value(), v.value())?;
        // Its age counts from now: when it was written is not recorded.
        age.insert((now, id), db_key(&info.key))
            .map_err(|e| internal("write", e))?;
        if InvocationKey::of(&info.key).is_none() {
            continue;
        }
        n += 1;
        // In pieces, so a long stream never sits in memory whole.
        let mut next = 1;
        loop {
            let mut batch = Vec::new();
            for row in events
                .range((id, next)..=(id, i64::MAX))
                .map_err(|e| internal("read", e))?
                .take(1000)
            {
                let (k, v) = row.map_err(|e| internal("read", e))?;
                let r = EventRecord::decode(v.value()).map_err(|e| corrupt("event", e))?;
                let Some(kind) = EventKind::from_number(r.kind) else {
                    continue;
                };
                let mut p = Prepared {
                    stream: info.key.clone(),
                    seq: k.value().1,
                    kind,
                    time_micros: r.time_micros,
                    body: r.body,
                    fact: crate::bes::invocation::Fact::Nothing,
                    publisher: None,
                };
                p.decode();
                next = p.seq + 1;
                batch.push(p);
            }
            if batch.is_empty() {
                break;
            }
            let refs: Vec<&Prepared> = batch.iter().collect();
            tables.update(&info.key, &refs)?;
        }
    }
    Ok(n)
}

/// Schema 1 → 2: streams keyed by their instance too (the owner recorded in
/// each stream's record). Event keys (stream number, seq) do not change.
fn migrate_v1_streams(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    {
        let old = txn
            .open_table(STREAMS_V1)
            .map_err(|e| internal("table", e))?;
        let mut new = txn.open_table(STREAMS).map_err(|e| internal("table", e))?;
        for row in old.iter().map_err(|e| internal("read", e))? {
            let (k, v) = row.map_err(|e| internal("read", e))?;
            let (b, i, c) = k.value();
            let r = StreamRecord::decode(v.value())
                .map_err(|e| StoreError::Internal(format!("corrupt stream record: {e}")))?;
            new.insert((b, i, c, r.instance.as_str()), v.value())
                .map_err(|e| internal("write", e))?;
        }
    }
    txn.delete_table(STREAMS_V1)
        .map_err(|e| internal("table", e))?;
    Ok(())
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
                tracing::error!(
                    "build events: file store commit failed: {}",
                    crate::gate::audit::bounded(&e.to_string())
                );
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
        let mut invocations = InvocationTables::open(&txn)?;
        let mut age = txn
            .open_table(STREAM_AGE)
            .map_err(|e| internal("table", e))?;
        for job in group {
            let mut out = Published::default();
            let mut stored: Vec<&Prepared> = Vec::new();
            let Some(first) = job.events.first() else {
                results.push(out);
                continue;
            };
            // One stream per job: read its record once, write it once.
            let k = &first.stream;
            let key = db_key(k);
            let record = match streams.get(key).map_err(|e| internal("read", e))? {
                Some(v) => Some(StreamRecord::decode(v.value()).map_err(|e| {
                    StoreError::Internal(format!("corrupt stream record for {k}: {e}"))
                })?),
                None => None,
            };
            let mut state = record.as_ref().map(|r| StreamInfo {
                key: k.clone(),
                last_seq: r.last_seq,
                finished: r.finished,
            });
            let mut id = record.as_ref().map(|r| r.id);
            let mut changed = false;
            for event in &job.events {
                if event.stream != *k {
                    break; // The service sends one stream per call.
                }
                let step = match check_event(&mut state, event) {
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
                stored.push(event);
                out.outcomes.push(Outcome::Stored);
            }
            if let (true, Some(info), Some(id)) = (changed, &state, id) {
                let now = super::now_millis();
                if let Some(r) = &record {
                    age.remove((r.updated_ms, id))
                        .map_err(|e| internal("write", e))?;
                }
                age.insert((now, id), key)
                    .map_err(|e| internal("write", e))?;
                let srec = StreamRecord {
                    id,
                    instance: String::new(),
                    last_seq: info.last_seq,
                    finished: info.finished,
                    updated_ms: now,
                };
                streams
                    .insert(key, srec.encode_to_vec().as_slice())
                    .map_err(|e| internal("write", e))?;
                invocations.update(k, &stored)?;
            }
            results.push(out);
        }
    }
    txn.commit().map_err(|e| internal("commit", e))?;
    Ok(results)
}

/// A stream's key in [`STREAMS`].
fn db_key(k: &StreamKey) -> (&str, &str, i32, &str) {
    (
        k.build_id.as_str(),
        k.invocation_id.as_str(),
        k.component,
        k.instance.as_str(),
    )
}

fn stream_info(
    (b, i, c, instance): (&str, &str, i32, &str),
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
                instance: instance.to_string(),
            },
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
        events: &'a [Prepared],
    ) -> BoxFuture<'a, Result<Published, StoreError>> {
        async move {
            let (reply, answer) = oneshot::channel();
            let job = Job {
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
            let k = db_key(&key);
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
            // Keys are ordered by build id: an anchored pattern's literal
            // prefix reads only the range of build ids that start with it.
            let prefix = super::build_id_prefix(pattern.as_str());
            let rows = match &prefix {
                Some(p) => streams.range((p.as_str(), "", i32::MIN, "")..),
                None => streams.iter(),
            }
            .map_err(|e| internal("read", e))?;
            for row in rows {
                let (k, v) = row.map_err(|e| internal("read", e))?;
                if prefix
                    .as_deref()
                    .is_some_and(|p| !k.value().0.starts_with(p))
                {
                    break;
                }
                let (info, _) = stream_info(k.value(), v.value())?;
                if instance.as_deref().is_none_or(|i| info.key.instance == i)
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
            let k = db_key(&key);
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

    fn sweep<'a>(
        &'a self,
        expire_before: Option<i64>,
        abandon_before: Option<i64>,
        batch: usize,
    ) -> BoxFuture<'a, Result<Swept, StoreError>> {
        // Its own small write transaction: the writer thread's next group
        // waits for it at most one batch long.
        self.read(move |db| sweep(db, expire_before, abandon_before, batch))
            .boxed()
    }

    fn list_invocations<'a>(
        &'a self,
        query: &'a InvocationQuery,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<gg::Invocation>, StoreError>> {
        let query = query.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(|e| internal("read", e))?;
            let invocations = txn
                .open_table(INVOCATIONS)
                .map_err(|e| internal("table", e))?;
            let mut out = Vec::new();
            let mut take = |inst: &str, id: &str| -> Result<bool, StoreError> {
                if let Some(v) = invocations
                    .get((inst, id))
                    .map_err(|e| internal("read", e))?
                {
                    let inv =
                        gg::Invocation::decode(v.value()).map_err(|e| corrupt("invocation", e))?;
                    if query.matches(&inv) {
                        out.push(inv);
                    }
                }
                Ok(out.len() < limit)
            };
            // Newest first, from the position after the cursor; the start
            // time bounds narrow the range scanned.
            let hi = query
                .started_before
                .map_or(i64::MAX, |t| t.saturating_sub(1));
            let lo = query.started_after.unwrap_or(i64::MIN);
            if let Some(instance) = &query.instance {
                let table = txn
                    .open_table(LISTING_BY_INSTANCE)
                    .map_err(|e| internal("table", e))?;
                // Rows at the cursor's start time are checked one by one.
                let top = query.after.as_ref().map_or(hi, |c| c.start_millis.min(hi));
                let range = table
                    .range(
                        (instance.as_str(), lo, "")..(instance.as_str(), top.saturating_add(1), ""),
                    )
                    .map_err(|e| internal("read", e))?;
                for row in range.rev() {
                    let (k, _) = row.map_err(|e| internal("read", e))?;
                    let (inst, start, id) = k.value();
                    let c = Cursor {
                        start_millis: start,
                        instance: inst.to_string(),
                        invocation_id: id.to_string(),
                    };
                    if !query.is_after(&c) {
                        continue;
                    }
                    if !take(inst, id)? {
                        break;
                    }
                }
            } else {
                let table = txn.open_table(LISTING).map_err(|e| internal("table", e))?;
                let top = query.after.as_ref().map_or(hi, |c| c.start_millis.min(hi));
                for row in table
                    .range((lo, "", "")..(top.saturating_add(1), "", ""))
                    .map_err(|e| internal("read", e))?
                    .rev()
                {
                    let (k, _) = row.map_err(|e| internal("read", e))?;
                    let (start, inst, id) = k.value();
                    let c = Cursor {
                        start_millis: start,
                        instance: inst.to_string(),
                        invocation_id: id.to_string(),
                    };
                    if !query.is_after(&c) {
                        continue;
                    }
                    if !take(inst, id)? {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .boxed()
    }

    fn get_invocation<'a>(
        &'a self,
        key: &'a InvocationKey,
    ) -> BoxFuture<'a, Result<Option<gg::Invocation>, StoreError>> {
        let key = key.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(|e| internal("read", e))?;
            let t = txn
                .open_table(INVOCATIONS)
                .map_err(|e| internal("table", e))?;
            match t
                .get((key.instance.as_str(), key.invocation_id.as_str()))
                .map_err(|e| internal("read", e))?
            {
                Some(v) => Ok(Some(
                    gg::Invocation::decode(v.value()).map_err(|e| corrupt("invocation", e))?,
                )),
                None => Ok(None),
            }
        })
        .boxed()
    }

    fn find_invocation<'a>(
        &'a self,
        invocation_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        let id = invocation_id.to_string();
        self.read(move |db| {
            let txn = db.begin_read().map_err(|e| internal("read", e))?;
            let t = txn
                .open_table(INVOCATIONS)
                .map_err(|e| internal("table", e))?;
            // Skip from instance to instance (keys are (instance, id)): one
            // seek past each instance's ids and one lookup per instance.
            let first_after = |inst: Option<&str>| -> Result<Option<String>, StoreError> {
                let range = match inst {
                    None => t.range::<(&str, &str)>(..),
                    Some(i) => t.range((i, "\u{10FFFF}\u{10FFFF}\u{10FFFF}\u{10FFFF}")..),
                }
                .map_err(|e| internal("read", e))?;
                for row in range {
                    let (k, _) = row.map_err(|e| internal("read", e))?;
                    let (other, _) = k.value();
                    if Some(other) != inst {
                        return Ok(Some(other.to_string()));
                    }
                }
                Ok(None)
            };
            let mut out = Vec::new();
            let mut next = first_after(None)?;
            while let Some(inst) = next {
                if t.get((inst.as_str(), id.as_str()))
                    .map_err(|e| internal("read", e))?
                    .is_some()
                {
                    out.push(inst.clone());
                }
                next = first_after(Some(&inst))?;
            }
            Ok(out)
        })
        .boxed()
    }

    fn get_targets<'a>(
        &'a self,
        key: &'a InvocationKey,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<gg::Target>, StoreError>> {
        let key = key.clone();
        let after = after.map(str::to_string);
        self.read(move |db| {
            let txn = db.begin_read().map_err(|e| internal("read", e))?;
            let t = txn.open_table(TARGETS).map_err(|e| internal("table", e))?;
            let (i, id) = (key.instance.as_str(), key.invocation_id.as_str());
            let from = after.as_deref().unwrap_or("");
            let mut out = Vec::new();
            for row in t.range((i, id, from)..).map_err(|e| internal("read", e))? {
                let (k, v) = row.map_err(|e| internal("read", e))?;
                let (ki, kid, label) = k.value();
                if ki != i || kid != id || out.len() >= limit {
                    break;
                }
                if after.as_deref() == Some(label) {
                    continue;
                }
                out.push(gg::Target::decode(v.value()).map_err(|e| corrupt("target", e))?);
            }
            Ok(out)
        })
        .boxed()
    }

    fn get_log<'a>(
        &'a self,
        key: &'a InvocationKey,
        offset: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(i64, Bytes)>, StoreError>> {
        let key = key.clone();
        self.read(move |db| {
            let txn = db.begin_read().map_err(|e| internal("read", e))?;
            let t = txn.open_table(LOGS).map_err(|e| internal("table", e))?;
            let (i, id) = (key.instance.as_str(), key.invocation_id.as_str());
            // The chunk holding `offset` starts at or before it.
            let start = t
                .range((i, id, i64::MIN)..=(i, id, offset))
                .map_err(|e| internal("read", e))?
                .next_back()
                .transpose()
                .map_err(|e| internal("read", e))?
                .map_or(offset, |(k, _)| k.value().2);
            let mut out = Vec::new();
            let mut bytes = 0;
            for row in t
                .range((i, id, start)..=(i, id, i64::MAX))
                .map_err(|e| internal("read", e))?
            {
                if bytes >= limit {
                    break;
                }
                let (k, v) = row.map_err(|e| internal("read", e))?;
                bytes += v.value().len();
                out.push((k.value().2, Bytes::copy_from_slice(v.value())));
            }
            Ok(out)
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file written by schema 1 (streams keyed without their instance)
    /// opens with every stream and event where it was, now under its owner.
    #[tokio::test]
    async fn a_schema_1_file_is_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut streams = txn.open_table(STREAMS_V1).unwrap();
                let mut events = txn.open_table(EVENTS).unwrap();
                let mut meta = txn.open_table(META).unwrap();
                for (n, (build, owner)) in [("b1", "team-a"), ("b2", "team-b")].iter().enumerate() {
                    let id = n as u64 + 1;
                    let rec = StreamRecord {
                        id,
                        instance: owner.to_string(),
                        last_seq: 2,
                        finished: n == 0,
                        updated_ms: 0,
                    };
                    streams
                        .insert((*build, "inv", 3), rec.encode_to_vec().as_slice())
                        .unwrap();
                    for seq in 1..=2 {
                        let e = EventRecord {
                            kind: EventKind::BazelEvent as i32,
                            time_micros: Some(seq),
                            body: Bytes::from(format!("{build} {seq}")),
                        };
                        events
                            .insert((id, seq), e.encode_to_vec().as_slice())
                            .unwrap();
                    }
                }
                meta.insert("next_stream", 3).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = FileStore::open(&path).await.unwrap();
        let key = |b: &str, i: &str| StreamKey {
            build_id: b.into(),
            invocation_id: "inv".into(),
            component: 3,
            instance: i.into(),
        };
        let a = store
            .get_stream(&key("b1", "team-a"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((a.last_seq, a.finished), (2, true));
        assert!(store
            .get_stream(&key("b1", "team-b"))
            .await
            .unwrap()
            .is_none());
        let events = store
            .query_events(&key("b2", "team-b"), &EventFilter::default())
            .await
            .unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].body, Bytes::from("b2 2"));
        let all = store
            .get_matching_streams(&Regex::new("").unwrap(), None)
            .await
            .unwrap();
        assert_eq!(all.len(), 2);
        // The stream counter carried over (and a second open changes
        // nothing): a new stream gets a fresh number.
        drop(store);
        let store = FileStore::open(&path).await.unwrap();
        let ev = crate::bes::event::Prepared {
            stream: key("b3", "team-a"),
            seq: 1,
            kind: EventKind::BazelEvent,
            time_micros: None,
            body: Bytes::from_static(b"new"),
            fact: crate::bes::invocation::Fact::Nothing,
            publisher: None,
        };
        let p = store.publish_events(&[ev]).await.unwrap();
        assert_eq!(p.outcomes, vec![Outcome::Stored]);
        let old = store
            .query_events(&key("b1", "team-a"), &EventFilter::default())
            .await
            .unwrap();
        assert_eq!(old.len(), 2, "the new stream did not take an old number");
    }
}

#[cfg(test)]
mod backfill_tests {
    use super::*;
    use crate::bes::invocation::tests::{build, recorded, tool_stream_of};

    /// A schema 2 file (events, no invocations) gets the invocations of its
    /// stored events built when it is opened.
    #[tokio::test]
    async fn a_schema_2_file_gets_its_invocations_built_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.redb");
        let k = StreamKey {
            build_id: "b".into(),
            invocation_id: "inv".into(),
            component: 3,
            instance: "team-a".into(),
        };
        let events = tool_stream_of(&k, &recorded("bazel-4.2.3/test.bin"), 1_700_000_000);
        {
            let store = FileStore::open(&path).await.unwrap();
            for batch in events.chunks(50) {
                store.publish_events(batch).await.unwrap();
            }
        }
        // Back to what schema 2 wrote: no invocation tables.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(INVOCATIONS).unwrap();
            txn.delete_table(LISTING).unwrap();
            txn.delete_table(LISTING_BY_INSTANCE).unwrap();
            txn.delete_table(TARGETS).unwrap();
            txn.delete_table(LOGS).unwrap();
            txn.open_table(META).unwrap().insert("schema", 2).unwrap();
            txn.commit().unwrap();
        }
        let store = FileStore::open(&path).await.unwrap();
        let key = InvocationKey::of(&k).unwrap();
        let (inv, targets) = build(&events, events.len());
        assert_eq!(store.get_invocation(&key).await.unwrap(), Some(inv));
        let stored = store.get_targets(&key, None, 1000).await.unwrap();
        assert_eq!(stored, targets.into_values().collect::<Vec<_>>());
    }
}
