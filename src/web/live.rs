//! Live pages: who is told when an invocation changes.
//!
//! [`Notifying`] wraps the event store: after a publish stores events, it
//! bumps the version of the invocation they feed (only if someone watches it)
//! and of the listing. A page's event stream ([`super::app`]'s `/live`
//! routes) waits on that version, so a watcher costs nothing between events:
//! no timer, no store read, until a publish wakes it. Events published
//! through another replica (a shared PostgreSQL store) are noticed by a
//! slow re-check of the invocation ([`RECHECK`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};
use regex::Regex;
use tokio::sync::watch;

use crate::bes::event::{Prepared, StreamKey};
use crate::bes::invocation::InvocationKey;
use crate::bes::store::{
    EventFilter, EventStore, InvocationQuery, Outcome, Published, StoreError, StoreStats,
    StoredEvent, StreamInfo, Swept,
};
use crate::proto::gridgate::v1 as gg;

/// How often a watcher reads its invocation again without being told
/// (for events that arrived through another replica).
pub const RECHECK: Duration = Duration::from_secs(20);

/// Versions that watchers wait on.
#[derive(Default)]
pub struct Changes {
    watched: Mutex<HashMap<InvocationKey, watch::Sender<u64>>>,
    listing: watch::Sender<u64>,
}

impl Changes {
    /// A receiver that changes when `key` gets new events.
    pub fn watch(&self, key: &InvocationKey) -> watch::Receiver<u64> {
        let mut map = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        // Forget invocations nobody watches any more.
        map.retain(|_, tx| tx.receiver_count() > 0);
        map.entry(key.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// A receiver that changes when any invocation gets new events.
    pub fn watch_listing(&self) -> watch::Receiver<u64> {
        self.listing.subscribe()
    }

    /// Tells the watchers of `key` and of the listing.
    pub fn changed(&self, key: &InvocationKey) {
        if let Some(tx) = self
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            tx.send_modify(|v| *v += 1);
        }
        if self.listing.receiver_count() > 0 {
            self.listing.send_modify(|v| *v += 1);
        }
    }
}

/// An event store that tells [`Changes`] about what it stored.
pub struct Notifying {
    inner: Arc<dyn EventStore>,
    changes: Arc<Changes>,
}

impl Notifying {
    /// `inner`, telling `changes`.
    pub fn wrap(inner: Arc<dyn EventStore>, changes: Arc<Changes>) -> Arc<dyn EventStore> {
        Arc::new(Notifying { inner, changes })
    }
}

impl EventStore for Notifying {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn publish_events<'a>(
        &'a self,
        events: &'a [Prepared],
    ) -> BoxFuture<'a, Result<Published, StoreError>> {
        async move {
            let published = self.inner.publish_events(events).await?;
            if published.outcomes.contains(&Outcome::Stored) {
                if let Some(key) = events.first().and_then(|e| InvocationKey::of(&e.stream)) {
                    self.changes.changed(&key);
                }
            }
            Ok(published)
        }
        .boxed()
    }

    fn get_stream<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<StreamInfo>, StoreError>> {
        self.inner.get_stream(key)
    }

    fn get_matching_streams<'a>(
        &'a self,
        pattern: &'a Regex,
        instance: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<StreamInfo>, StoreError>> {
        self.inner.get_matching_streams(pattern, instance)
    }

    fn query_events<'a>(
        &'a self,
        key: &'a StreamKey,
        filter: &'a EventFilter,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        self.inner.query_events(key, filter)
    }

    fn query_events_many<'a>(
        &'a self,
        keys: &'a [StreamKey],
        filter: &'a EventFilter,
    ) -> BoxFuture<'a, Result<Vec<Vec<StoredEvent>>, StoreError>> {
        self.inner.query_events_many(keys, filter)
    }

    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }

    fn list_invocations<'a>(
        &'a self,
        query: &'a InvocationQuery,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<gg::Invocation>, StoreError>> {
        self.inner.list_invocations(query, limit)
    }

    fn get_invocation<'a>(
        &'a self,
        key: &'a InvocationKey,
    ) -> BoxFuture<'a, Result<Option<gg::Invocation>, StoreError>> {
        self.inner.get_invocation(key)
    }

    fn get_targets<'a>(
        &'a self,
        key: &'a InvocationKey,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<gg::Target>, StoreError>> {
        self.inner.get_targets(key, after, limit)
    }

    fn sweep<'a>(
        &'a self,
        expire_before: Option<i64>,
        abandon_before: Option<i64>,
        batch: usize,
    ) -> BoxFuture<'a, Result<Swept, StoreError>> {
        self.inner.sweep(expire_before, abandon_before, batch)
    }

    fn get_log<'a>(
        &'a self,
        key: &'a InvocationKey,
        offset: i64,
        limit: usize,
    ) -> BoxFuture<'a, Result<Vec<(i64, Bytes)>, StoreError>> {
        self.inner.get_log(key, offset, limit)
    }

    fn find_invocation<'a>(
        &'a self,
        invocation_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        self.inner.find_invocation(invocation_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_watched_invocations_are_kept_and_told() {
        let c = Changes::default();
        let a = InvocationKey {
            instance: "a".into(),
            invocation_id: "1".into(),
        };
        let b = InvocationKey {
            instance: "b".into(),
            invocation_id: "1".into(),
        };
        let mut rx = c.watch(&a);
        c.changed(&b);
        assert!(!rx.has_changed().unwrap());
        c.changed(&a);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 1);
        drop(rx);
        let _other = c.watch(&b);
        assert_eq!(c.watched.lock().unwrap().len(), 1, "a is forgotten");
    }
}
