//! Counted budgets: connections, requests in progress, bytes buffered before
//! a decision. One type for every "at most N held at once" limit.
//!
//! A [`Budget`] is a counter with a maximum; [`Budget::try_take`] either
//! takes units at once or refuses (nothing ever waits on a budget: a caller
//! over its share is answered RESOURCE_EXHAUSTED, not queued). What was
//! taken is a [`Held`], returned on drop, so no path can leak a unit.
//!
//! ```
//! use gridgate::budget::Budget;
//! let slots = Budget::new(2);
//! let a = slots.try_take(1).unwrap();
//! let _b = slots.try_take(1).unwrap();
//! assert!(slots.try_take(1).is_none());
//! drop(a);
//! assert!(slots.try_take(1).is_some());
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// At most `max` units held at once.
#[derive(Debug)]
pub struct Budget {
    held: AtomicUsize,
    max: usize,
}

impl Budget {
    /// A budget of `max` units.
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            held: AtomicUsize::new(0),
            max,
        })
    }

    /// The maximum.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Units held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Takes `n` units, or `None` when that would exceed the maximum.
    pub fn try_take(self: &Arc<Self>, n: usize) -> Option<Held> {
        self.reserve(n).then(|| Held {
            budget: self.clone(),
            n,
        })
    }

    fn reserve(&self, n: usize) -> bool {
        let mut now = self.held.load(Ordering::Relaxed);
        loop {
            let Some(next) = now.checked_add(n).filter(|&v| v <= self.max) else {
                return false;
            };
            match self
                .held
                .compare_exchange_weak(now, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => now = actual,
            }
        }
    }
}

/// Units taken from a [`Budget`]; given back on drop.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    n: usize,
}

impl Held {
    /// Takes `n` more units from the same budget; `false` (and nothing
    /// taken) when that would exceed its maximum.
    pub fn try_grow(&mut self, n: usize) -> bool {
        let ok = self.budget.reserve(n);
        if ok {
            self.n += n;
        }
        ok
    }

    /// The units held.
    pub fn units(&self) -> usize {
        self.n
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.n > 0 {
            self.budget.held.fetch_sub(self.n, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_and_gives_back() {
        let b = Budget::new(10);
        let mut h = b.try_take(4).unwrap();
        assert!(h.try_grow(6));
        assert_eq!(b.held(), 10);
        assert!(!h.try_grow(1), "over the maximum");
        assert_eq!(h.units(), 10);
        assert!(b.try_take(1).is_none());
        drop(h);
        assert_eq!(b.held(), 0);
        assert!(b.try_take(10).is_some());
        assert!(b.try_take(11).is_none());
    }

    #[test]
    fn never_overflows() {
        let b = Budget::new(usize::MAX);
        let _h = b.try_take(usize::MAX - 1).unwrap();
        assert!(b.try_take(2).is_none());
    }

    #[test]
    fn concurrent_takers_never_exceed_the_maximum() {
        let b = Budget::new(100);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for _ in 0..1000 {
                        if let Some(h) = b.try_take(1) {
                            assert!(b.held() <= 100);
                            held.push(h);
                        }
                        if held.len() > 20 {
                            held.clear();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.held(), 0);
    }
}
