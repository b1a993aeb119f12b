//! ByteStream uploads that can be resumed: a Write stream that ends (or
//! breaks) before `finish_write` leaves its partial upload here, under its
//! resource name, so the client can ask `QueryWriteStatus` how much arrived and
//! continue from there with a new Write.
//!
//! Bounded three ways: at most [`MAX_PAUSED`] paused uploads per instance (the
//! oldest is dropped first), each dropped after [`IDLE`] without activity, and
//! every upload's bytes are reserved in the store's byte budget (see
//! `store::lru`), so partial uploads can never hold more than the budget.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::compression::BoundedDecoder;
use super::store::BlobWriter;

/// Paused uploads kept per instance.
pub const MAX_PAUSED: usize = 1024;

/// How long a paused upload is kept without activity.
pub const IDLE: Duration = Duration::from_secs(600);

/// The state of one upload between Write messages.
pub struct UploadState {
    /// Where the (decompressed) bytes go.
    pub writer: Box<dyn BlobWriter>,
    /// For `compressed-blobs`: the decoder, mid-stream.
    pub decoder: Option<BoundedDecoder>,
    /// Bytes received in the resource's encoding (what `committed_size` reports).
    pub received: Arc<AtomicU64>,
}

enum Slot {
    /// A Write stream is using it; the counter tracks its progress.
    Active(Arc<AtomicU64>),
    Paused(UploadState, Instant),
}

/// Why an upload cannot be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeError {
    /// Another Write stream for the same resource is in progress.
    Busy,
}

/// The partial uploads of one instance, by resource name.
#[derive(Default)]
pub struct Uploads {
    slots: Mutex<HashMap<String, Slot>>,
}

impl Uploads {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the paused upload for `name` (marking it active), `Ok(None)` when
    /// there is none (the caller starts one and must [`Uploads::activate`] it).
    pub fn take(&self, name: &str) -> Result<Option<UploadState>, TakeError> {
        let mut slots = self.lock();
        expire(&mut slots);
        match slots.remove(name) {
            None => Ok(None),
            Some(Slot::Active(c)) => {
                slots.insert(name.to_string(), Slot::Active(c));
                Err(TakeError::Busy)
            }
            Some(Slot::Paused(state, _)) => {
                slots.insert(name.to_string(), Slot::Active(state.received.clone()));
                Ok(Some(state))
            }
        }
    }

    /// Marks `name` active with a new upload's progress counter.
    pub fn activate(&self, name: &str, received: Arc<AtomicU64>) -> Result<(), TakeError> {
        let mut slots = self.lock();
        if matches!(slots.get(name), Some(Slot::Active(_))) {
            return Err(TakeError::Busy);
        }
        // A paused one would be replaced; `take` already removed it.
        slots.insert(name.to_string(), Slot::Active(received));
        Ok(())
    }

    /// Parks an upload whose stream ended before it finished.
    pub fn pause(&self, name: &str, state: UploadState) {
        let mut slots = self.lock();
        slots.insert(name.to_string(), Slot::Paused(state, Instant::now()));
        expire(&mut slots);
        let paused = slots
            .values()
            .filter(|s| matches!(s, Slot::Paused(..)))
            .count();
        if paused > MAX_PAUSED {
            let oldest = slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Paused(_, t) => Some((*t, k.clone())),
                    Slot::Active(_) => None,
                })
                .min();
            if let Some((_, k)) = oldest {
                slots.remove(&k);
            }
        }
    }

    /// Forgets `name` (finished, failed or restarted).
    pub fn finish(&self, name: &str) {
        self.lock().remove(name);
    }

    /// How many bytes of `name` arrived, if it is known.
    pub fn received(&self, name: &str) -> Option<u64> {
        let mut slots = self.lock();
        expire(&mut slots);
        match slots.get(name)? {
            Slot::Active(c) => Some(c.load(Ordering::Relaxed)),
            Slot::Paused(s, _) => Some(s.received.load(Ordering::Relaxed)),
        }
    }
}

/// Drops paused uploads idle for longer than [`IDLE`] (their writers give
/// back their reservations and temporary files).
fn expire(slots: &mut HashMap<String, Slot>) {
    slots.retain(|_, s| match s {
        Slot::Paused(_, t) => t.elapsed() < IDLE,
        Slot::Active(_) => true,
    });
}
