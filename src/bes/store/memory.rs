//! The in-memory build event store (the default, as in BuildGrid), bounded by
//! a byte budget (`build-events.max-bytes`).
//!
//! When an event does not fit, whole streams are evicted: finished streams
//! first, the one that finished longest ago first; then unfinished streams,
//! the one idle longest first (never the stream being written). An event that
//! does not fit even in an empty store is refused ([`Rejection::Full`]).
//! Evictions are counted in [`StoreStats::evicted_streams`] and logged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use regex::Regex;

use super::{
    check_event, now_millis, Cursor, EventFilter, EventStore, InvocationQuery, Outcome, Published,
    Rejection, Step, StoreError, StoreStats, StoredEvent, StreamInfo, Swept,
};
use crate::bes::event::{Prepared, StreamKey};
use crate::bes::invocation::{model, InvocationKey};
use crate::proto::gridgate::v1 as gg;

/// Bytes charged per stream and per event on top of their payloads, for the
/// bookkeeping around them.
const STREAM_OVERHEAD: u64 = 256;
const EVENT_OVERHEAD: u64 = 64;
/// Streams retention deletes per hold of the store's lock.
const SWEEP_STEP: usize = 10;

/// The in-memory store.
pub struct MemoryStore {
    budget: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<StreamKey, Stream>,
    /// Finished streams by the tick they finished at.
    finished: BTreeMap<u64, StreamKey>,
    /// Unfinished streams by the tick of their last event.
    active: BTreeMap<u64, StreamKey>,
    tick: u64,
    bytes: u64,
    stats: StoreStats,
    invocations: HashMap<InvocationKey, Invocation>,
    /// Every invocation by its listing position.
    listing: BTreeSet<Cursor>,
}

/// An invocation as the memory store keeps it.
#[derive(Default)]
struct Invocation {
    /// When its last event was stored (ms since the epoch).
    updated_ms: i64,
    summary: gg::Invocation,
    targets: BTreeMap<String, gg::Target>,
    log: Vec<(i64, Bytes)>,
}

struct Stream {
    info: StreamInfo,
    /// [`StreamKey::query_key`], kept for queries.
    query_key: String,
    events: Vec<StoredEvent>,
    bytes: u64,
    /// Its key in `finished` or `active`.
    tick: u64,
    /// When its last event was stored (ms since the epoch).
    updated_ms: i64,
}

impl MemoryStore {
    /// An empty store holding at most `budget` bytes.
    pub fn new(budget: u64) -> MemoryStore {
        MemoryStore {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps inconsistent in
        // a way that matters more than losing the store, so keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, events: &[Prepared]) -> Published {
        let mut out = Published::default();
        let Some(first) = events.first() else {
            return out;
        };
        // One stream per call: its state is read once and indexed once.
        let key = &first.stream;
        let mut inner = self.lock();
        let mut state = inner.streams.get(key).map(|s| s.info.clone());
        let mut stored_any = false;
        let mut stored: Vec<&Prepared> = Vec::new();
        for event in events {
            if event.stream != *key {
                break; // The service sends one stream per call.
            }
            let step = match check_event(&mut state, event) {
                Ok(step) => step,
                Err(r) => {
                    out.rejection = Some(r);
                    break;
                }
            };
            if step == Step::Duplicate {
                let identical = inner
                    .streams
                    .get(key)
                    .and_then(|s| s.events.get(usize::try_from(event.seq - 1).ok()?))
                    .is_some_and(|e| e.body == event.body);
                inner.stats.duplicate_events += 1;
                out.outcomes.push(Outcome::Duplicate { identical });
                continue;
            }
            let cost = event.body.len() as u64
                + event.fact.weight()
                + EVENT_OVERHEAD
                + if step == Step::Create {
                    STREAM_OVERHEAD + (key.build_id.len() + key.instance.len()) as u64 * 2
                } else {
                    0
                };
            if cost > self.budget || !inner.make_room(cost, self.budget, key) {
                out.rejection = Some(Rejection::Full {
                    budget: self.budget,
                });
                // The stream's state stays as stored so far.
                if let Some(info) = &mut state {
                    info.last_seq = event.seq - 1;
                    info.finished = false;
                }
                break;
            }
            inner.append(key, event, cost);
            stored_any = true;
            stored.push(event);
            out.outcomes.push(Outcome::Stored);
        }
        if let (true, Some(info)) = (stored_any, state) {
            inner.index(key, info);
            inner.update_invocation(key, &stored);
        }
        out
    }
}

impl Inner {
    /// Applies newly stored events to the invocation they feed.
    fn update_invocation(&mut self, stream: &StreamKey, stored: &[&Prepared]) {
        let Some(key) = InvocationKey::of(stream) else {
            return;
        };
        // The summary and the touched targets are moved out and back in
        // (under the store's lock, so no reader sees them missing), not
        // cloned: a batch costs what it changes, not the invocation's size.
        let (summary, touched) = match self.invocations.get_mut(&key) {
            Some(inv) => {
                let touched = model::labels(stored.iter().copied())
                    .into_iter()
                    .filter_map(|l| {
                        let t = inv.targets.remove(&l)?;
                        Some((l, t))
                    })
                    .collect();
                (Some(std::mem::take(&mut inv.summary)), touched)
            }
            None => (None, HashMap::new()),
        };
        let had = summary.as_ref().map(Cursor::of);
        let Some(update) = model::apply(stream, summary, touched, stored.iter().copied()) else {
            return;
        };
        let inv = self.invocations.entry(key).or_default();
        inv.updated_ms = now_millis();
        let now = Cursor::of(&update.invocation);
        if had.as_ref() != Some(&now) {
            if let Some(had) = &had {
                self.listing.remove(had);
            }
            self.listing.insert(now);
        }
        inv.summary = update.invocation;
        for t in update.targets {
            inv.targets.insert(t.label.clone(), t);
        }
        inv.log.extend(update.log);
    }

    /// Forgets the invocation a stream fed (its stream is gone); returns it.
    fn drop_invocation(&mut self, stream: &StreamKey) -> Option<Invocation> {
        let inv = InvocationKey::of(stream).and_then(|k| self.invocations.remove(&k))?;
        self.listing.remove(&Cursor::of(&inv.summary));
        Some(inv)
    }

    /// Removes a stream and the invocation it fed, taking their bytes off
    /// the budget; returns them (for the caller to free).
    fn remove_stream(&mut self, key: &StreamKey) -> Option<(Stream, Option<Invocation>)> {
        let s = self.streams.remove(key)?;
        let inv = self.drop_invocation(key);
        self.finished.remove(&s.tick);
        self.active.remove(&s.tick);
        self.bytes -= s.bytes;
        Some((s, inv))
    }

    /// Deletes up to `batch` streams last written before `before`, oldest
    /// first (ticks follow write order, so each queue is oldest first);
    /// returns what it removed, to be freed once the lock is released.
    fn expire(&mut self, before: i64, batch: usize) -> Vec<(Stream, Option<Invocation>)> {
        let mut victims = Vec::new();
        for queue in [&self.finished, &self.active] {
            for k in queue.values() {
                if victims.len() >= batch {
                    break;
                }
                match self.streams.get(k) {
                    Some(s) if s.updated_ms < before => victims.push(k.clone()),
                    _ => break,
                }
            }
        }
        victims.truncate(batch);
        victims
            .iter()
            .filter_map(|k| self.remove_stream(k))
            .collect()
    }

    /// Marks running invocations silent since before `before` abandoned.
    fn abandon(&mut self, before: i64, batch: usize) -> u64 {
        let mut n = 0;
        for inv in self.invocations.values_mut() {
            if n as usize >= batch {
                break;
            }
            if inv.updated_ms < before && model::abandon(&mut inv.summary) {
                n += 1;
            }
        }
        n
    }

    /// Evicts streams until `cost` more bytes fit; false if they cannot.
    fn make_room(&mut self, cost: u64, budget: u64, writing: &StreamKey) -> bool {
        while self.bytes + cost > budget {
            let victim = self
                .finished
                .iter()
                .chain(self.active.iter())
                .find(|(_, k)| *k != writing)
                .map(|(_, k)| k.clone());
            let Some(victim) = victim else { return false };
            if let Some((s, _)) = self.remove_stream(&victim) {
                self.stats.evicted_streams += 1;
                tracing::info!(
                    stream = %victim,
                    instance = %crate::gate::audit::bounded(&s.info.key.instance),
                    events = s.events.len(),
                    bytes = s.bytes,
                    finished = s.info.finished,
                    evicted_total = self.stats.evicted_streams,
                    "build event store full: evicted a stream"
                );
            }
        }
        true
    }

    /// Appends an event to its stream (creating the stream).
    fn append(&mut self, key: &StreamKey, event: &Prepared, cost: u64) {
        let stream = match self.streams.get_mut(key) {
            Some(s) => s,
            None => {
                self.tick += 1;
                let tick = self.tick;
                self.active.insert(tick, key.clone());
                self.streams.entry(key.clone()).or_insert(Stream {
                    info: StreamInfo {
                        key: key.clone(),
                        last_seq: 0,
                        finished: false,
                    },
                    query_key: key.query_key(),
                    events: Vec::new(),
                    bytes: 0,
                    tick,
                    updated_ms: now_millis(),
                })
            }
        };
        stream.bytes += cost;
        stream.updated_ms = now_millis();
        stream.events.push(StoredEvent {
            seq: event.seq,
            kind: event.kind,
            time_micros: event.time_micros,
            body: event.body.clone(),
        });
        self.bytes += cost;
        self.stats.stored_events += 1;
    }

    /// Records a stream's new state and moves it to the young end of its
    /// eviction queue.
    fn index(&mut self, key: &StreamKey, info: StreamInfo) {
        self.tick += 1;
        let tick = self.tick;
        let Some(stream) = self.streams.get_mut(key) else {
            return;
        };
        self.finished.remove(&stream.tick);
        self.active.remove(&stream.tick);
        stream.tick = tick;
        let finished = info.finished;
        stream.info = info;
        if finished {
            self.finished.insert(tick, key.clone());
        } else {
            self.active.insert(tick, key.clone());
        }
    }
}

impl EventStore for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn publish_events<'a>(
        &'a self,
        events: &'a [Prepared],
    ) -> BoxFuture<'a, Result<Published, StoreError>> {
        let out = self.publish(events);
        async move { Ok(out) }.boxed()
    }

    fn get_stream<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<StreamInfo>, StoreError>> {
        let out = self.lock().streams.get(key).map(|s| s.info.clone());
        async move { Ok(out) }.boxed()
    }

    fn get_matching_streams<'a>(
        &'a self,
        pattern: &'a Regex,
        instance: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<StreamInfo>, StoreError>> {
        let mut out: Vec<StreamInfo> = self
            .lock()
            .streams
            .values()
            .filter(|s| instance.is_none_or(|i| s.info.key.instance == i))
            .filter(|s| pattern.is_match(&s.query_key))
            .map(|s| s.info.clone())
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        async move { Ok(out) }.boxed()
    }

    fn query_events<'a>(
        &'a self,
        key: &'a StreamKey,
        filter: &'a EventFilter,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        let out = self
            .lock()
            .streams
            .get(key)
            .map(|s| {
                s.events
                    .iter()
                    .filter(|e| filter.accepts(e))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        async move { Ok(out) }.boxed()
    }

    fn stats(&self) -> StoreStats {
        let inner = self.lock();
        StoreStats {
            streams: inner.streams.len() as u64,
            bytes: inner.bytes,
            ..inner.stats.clone()
        }
    }

    fn sweep<'a>(
        &'a self,
        expire_before: Option<i64>,
        abandon_before: Option<i64>,
        batch: usize,
    ) -> BoxFuture<'a, Result<Swept, StoreError>> {
        let mut out = Swept::default();
        if let Some(before) = expire_before {
            // A few streams per hold of the lock, freed after it is
            // released: ingest waits for one short step, never for a batch.
            while (out.deleted_streams as usize) < batch {
                let want = (batch - out.deleted_streams as usize).min(SWEEP_STEP);
                let removed = self.lock().expire(before, want);
                out.deleted_streams += removed.len() as u64;
                let done = removed.len() < want;
                drop(removed);
                if done {
                    break;
                }
            }
        }
        if let Some(before) = abandon_before {
            out.abandoned = self.lock().abandon(before, batch);
        }
        async move { Ok(out) }.boxed()
    }

    fn list_invocations<'a>(
        &'a self,
        query: &'a InvocationQuery,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<gg::Invocation>, StoreError>> {
        let inner = self.lock();
        let upper = match &query.after {
            Some(a) => std::ops::Bound::Excluded(a.clone()),
            None => std::ops::Bound::Unbounded,
        };
        let out: Vec<gg::Invocation> = inner
            .listing
            .range((std::ops::Bound::Unbounded, upper))
            .rev()
            .filter_map(|c| {
                let key = InvocationKey {
                    instance: c.instance.clone(),
                    invocation_id: c.invocation_id.clone(),
                };
                inner.invocations.get(&key).map(|i| &i.summary)
            })
            .filter(|i| query.matches(i))
            .take(limit)
            .cloned()
            .collect();
        drop(inner);
        async move { Ok(out) }.boxed()
    }

    fn get_invocation<'a>(
        &'a self,
        key: &'a InvocationKey,
    ) -> BoxFuture<'a, Result<Option<gg::Invocation>, StoreError>> {
        let out = self.lock().invocations.get(key).map(|i| i.summary.clone());
        async move { Ok(out) }.boxed()
    }

    fn find_invocation<'a>(
        &'a self,
        invocation_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        // A scan: the memory store holds what fits its byte budget.
        let mut out: Vec<String> = self
            .lock()
            .invocations
            .keys()
            .filter(|k| k.invocation_id == invocation_id)
            .map(|k| k.instance.clone())
            .collect();
        out.sort_unstable();
        async move { Ok(out) }.boxed()
    }

    fn get_targets<'a>(
        &'a self,
        key: &'a InvocationKey,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<gg::Target>, StoreError>> {
        let inner = self.lock();
        let out = inner
            .invocations
            .get(key)
            .map(|i| {
                let from = match after {
                    Some(a) => std::ops::Bound::Excluded(a),
                    None => std::ops::Bound::Unbounded,
                };
                i.targets
                    .range::<str, _>((from, std::ops::Bound::Unbounded))
                    .take(limit)
                    .map(|(_, t)| t.clone())
                    .collect()
            })
            .unwrap_or_default();
        drop(inner);
        async move { Ok(out) }.boxed()
    }

    fn get_log<'a>(
        &'a self,
        key: &'a InvocationKey,
        offset: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(i64, Bytes)>, StoreError>> {
        let inner = self.lock();
        let out = inner
            .invocations
            .get(key)
            .map(|i| {
                // The first chunk holding `offset`, then on until `limit`.
                let first = i.log.partition_point(|(o, t)| o + t.len() as i64 <= offset);
                let mut bytes = 0;
                i.log[first..]
                    .iter()
                    .take_while(|(_, t)| {
                        let more = bytes < limit;
                        bytes += t.len();
                        more
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        drop(inner);
        async move { Ok(out) }.boxed()
    }
}
