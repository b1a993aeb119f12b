//! No one caller takes the service from the others: the budgets a request
//! draws on before and while the Gate decides.
//!
//! - **Requests in progress.** Open routes (health, reflection) and anonymous
//!   callers (on an `allow-unauthenticated-instances` entry, or loopback with
//!   `allow-localhost-requests`) together hold at most
//!   `limits.anonymous-share-percent` of `limits.max-concurrent-requests`,
//!   and of `limits.max-concurrent-streams` on each connection. A flood of
//!   Health Watch streams or anonymous calls leaves the rest to everyone else.
//! - **Bytes before a decision.** The first message of a request is buffered
//!   before the Gate decides (it names the instance). What all requests buffer
//!   so is bounded by `limits.max-pending-bytes` in total and
//!   `limits.max-pending-bytes-per-connection` per connection; anonymous
//!   callers get `anonymous-share-percent` of each. Past a budget the request
//!   is answered RESOURCE_EXHAUSTED at once.
//!
//! A caller without valid credentials that cannot be exempt is refused from
//! its headers alone and draws on nothing (see [`super::layer`]).

use std::sync::Arc;

use crate::budget::{Budget, Held};
use crate::config::LimitsConfig;
use crate::conn::ConnInfo;

use super::refusal::Refusal;

/// The Gate's own budgets, across every connection.
#[derive(Debug)]
pub struct Shares {
    anonymous_requests: Arc<Budget>,
    pending_bytes: Arc<Budget>,
    anonymous_pending_bytes: Arc<Budget>,
}

impl Shares {
    /// The budgets `limits:` asks for.
    pub fn new(limits: &LimitsConfig) -> Shares {
        Shares {
            anonymous_requests: Budget::new(limits.anonymous_share(limits.max_concurrent_requests)),
            pending_bytes: Budget::new(limits.max_pending_bytes),
            anonymous_pending_bytes: Budget::new(limits.anonymous_share(limits.max_pending_bytes)),
        }
    }

    /// A place for an open-route or anonymous request, held to its end.
    pub fn anonymous_place(&self, conn: Option<&ConnInfo>) -> Result<AnonymousPlace, Refusal> {
        let total = self
            .anonymous_requests
            .try_take(1)
            .ok_or(Refusal::AnonymousShare {
                scope: "in total",
                max: self.anonymous_requests.max(),
            })?;
        let on_conn = match conn {
            None => None,
            Some(c) => Some(c.shares.anonymous_requests.try_take(1).ok_or(
                Refusal::AnonymousShare {
                    scope: "on this connection",
                    max: c.shares.anonymous_requests.max(),
                },
            )?),
        };
        Ok(AnonymousPlace {
            _total: total,
            _on_conn: on_conn,
        })
    }

    /// The budgets for the bytes one request buffers before its decision.
    pub fn pending(&self, conn: Option<&Arc<ConnInfo>>, anonymous: bool) -> Pending {
        let mut budgets = Vec::with_capacity(4);
        budgets.push((self.pending_bytes.clone(), "max-pending-bytes", false));
        if let Some(c) = conn {
            budgets.push((
                c.shares.pending_bytes.clone(),
                "max-pending-bytes-per-connection",
                false,
            ));
        }
        if anonymous {
            budgets.push((
                self.anonymous_pending_bytes.clone(),
                "max-pending-bytes",
                true,
            ));
            if let Some(c) = conn {
                budgets.push((
                    c.shares.anonymous_pending_bytes.clone(),
                    "max-pending-bytes-per-connection",
                    true,
                ));
            }
        }
        Pending {
            held: budgets
                .into_iter()
                .filter_map(|(b, key, anonymous)| Some((b.try_take(0)?, b.max(), key, anonymous)))
                .collect(),
        }
    }
}

/// An open-route or anonymous request's place under its share.
#[derive(Debug)]
pub struct AnonymousPlace {
    _total: Held,
    _on_conn: Option<Held>,
}

/// Bytes a request buffered before its decision; given back on drop.
#[derive(Debug)]
pub struct Pending {
    held: Vec<(Held, usize, &'static str, bool)>,
}

impl Pending {
    /// Counts `n` more bytes, or the refusal of the first budget it would exceed.
    pub fn take(&mut self, n: usize) -> Result<(), Refusal> {
        for (held, max, key, anonymous) in &mut self.held {
            if !held.try_grow(n) {
                return Err(Refusal::PendingBytes {
                    key,
                    max: *max,
                    anonymous: *anonymous,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{ConnLimits, Peer};

    fn limits() -> LimitsConfig {
        LimitsConfig {
            max_concurrent_requests: 8,
            max_pending_bytes: 1000,
            max_pending_bytes_per_connection: 400,
            anonymous_share_percent: 25,
            ..LimitsConfig::default()
        }
    }

    fn conn() -> Arc<ConnInfo> {
        Arc::new(ConnInfo::new(
            Peer::Unix,
            true,
            None,
            false,
            ConnLimits {
                anonymous_requests: 1,
                pending_bytes: 400,
                anonymous_pending_bytes: 100,
            },
        ))
    }

    #[test]
    fn anonymous_requests_have_a_share_in_total_and_per_connection() {
        let shares = Shares::new(&limits());
        let (a, b) = (conn(), conn());
        let first = shares.anonymous_place(Some(&a)).unwrap();
        assert!(matches!(
            shares.anonymous_place(Some(&a)),
            Err(Refusal::AnonymousShare {
                scope: "on this connection",
                ..
            })
        ));
        let _second = shares.anonymous_place(Some(&b)).unwrap();
        assert!(matches!(
            shares.anonymous_place(None),
            Err(Refusal::AnonymousShare {
                scope: "in total",
                max: 2
            })
        ));
        drop(first);
        assert!(shares.anonymous_place(Some(&a)).is_ok());
    }

    #[test]
    fn pending_bytes_are_bounded_and_anonymous_callers_get_less() {
        let shares = Shares::new(&limits());
        let c = conn();
        let mut anon = shares.pending(Some(&c), true);
        anon.take(100).unwrap();
        assert!(matches!(
            anon.take(1),
            Err(Refusal::PendingBytes {
                key: "max-pending-bytes-per-connection",
                anonymous: true,
                ..
            })
        ));
        let mut known = shares.pending(Some(&c), false);
        known.take(299).unwrap();
        assert!(matches!(
            known.take(2),
            Err(Refusal::PendingBytes {
                key: "max-pending-bytes-per-connection",
                anonymous: false,
                ..
            })
        ));
        drop((anon, known));
        let mut other = shares.pending(None, false);
        other.take(1000).unwrap();
        assert!(matches!(
            shares.pending(None, false).take(1),
            Err(Refusal::PendingBytes {
                key: "max-pending-bytes",
                ..
            })
        ));
    }
}
