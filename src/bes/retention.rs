//! Retention (`build-events.retention`): streams past `max-age` are deleted
//! with their events and invocations, and unfinished invocations silent for
//! `abandoned-after` are marked abandoned, in every store.
//!
//! A background task sweeps now and then (a tenth of the shorter age, between
//! one second and a minute, with jitter so that replicas sharing a database do
//! not sweep in step). Each sweep deletes in small batches, each its own short
//! transaction, with a pause between batches: ingest never waits for more than
//! one batch, PostgreSQL's autovacuum gets dead rows in small amounts, the
//! file store's freed pages are reused by later writes, and the memory store's
//! budget is freed at once. What was deleted and marked is counted in
//! `gridgate_bes_retention_total`.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use super::store::{now_millis, EventStore, Swept};
use crate::config::BuildEventsLimits;

/// Streams deleted (or invocations marked) per transaction.
pub const BATCH: usize = 100;

/// A random fraction in [0, 1) (no cryptographic quality needed).
fn jitter() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_millis() as u64);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// How long between sweeps, before jitter.
fn period(limits: &BuildEventsLimits) -> Option<Duration> {
    let shortest = [limits.max_age, limits.abandoned_after]
        .into_iter()
        .flatten()
        .min()?;
    Some((shortest / 10).clamp(Duration::from_secs(1), Duration::from_secs(60)))
}

/// One whole sweep: batches until nothing more is due. Returns the totals.
pub async fn sweep(store: &dyn EventStore, limits: &BuildEventsLimits) -> Swept {
    let now = now_millis();
    let before = |age: Option<Duration>| {
        age.map(|a| now.saturating_sub(i64::try_from(a.as_millis()).unwrap_or(i64::MAX)))
    };
    let (expire, abandon) = (before(limits.max_age), before(limits.abandoned_after));
    let mut total = Swept::default();
    loop {
        match store.sweep(expire, abandon, BATCH).await {
            Ok(s) => {
                total.deleted_streams += s.deleted_streams;
                total.abandoned += s.abandoned;
                crate::metrics::bes_retention(store.backend(), s.deleted_streams, s.abandoned);
                if s.deleted_streams < BATCH as u64 && s.abandoned < BATCH as u64 {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(
                    "build events retention: {} (trying again at the next sweep)",
                    crate::gate::audit::bounded(&e.to_string())
                );
                break;
            }
        }
        // Let ingest have the store between batches.
        tokio::time::sleep(Duration::from_millis(10 + (40.0 * jitter()) as u64)).await;
    }
    if total != Swept::default() {
        tracing::info!(
            deleted_streams = total.deleted_streams,
            abandoned_invocations = total.abandoned,
            "build events retention"
        );
    }
    total
}

/// Starts the retention task, unless nothing is to be retained. The task
/// ends when the store is dropped (it holds it only while sweeping, so a
/// file store closed by a stopping server is released).
pub fn spawn(store: &Arc<dyn EventStore>, limits: BuildEventsLimits) {
    let Some(period) = period(&limits) else {
        return;
    };
    let store = Arc::downgrade(store);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period.mul_f64(0.8 + 0.4 * jitter())).await;
            let Some(store) = store.upgrade() else {
                return;
            };
            sweep(&*store, &limits).await;
        }
    });
}
