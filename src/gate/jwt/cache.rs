//! Verified tokens kept: per connection, and by the token's digest until its `exp`.

use super::*;

/// The last token a connection sent, verified: see
/// [`JwtAuthenticator::authenticate_on_connection`].
#[derive(Default)]
pub struct ConnectionToken {
    held: std::sync::Mutex<Option<Arc<HeldToken>>>,
}

pub(super) struct HeldToken {
    pub(super) token: Box<str>,
    pub(super) entry: Arc<CachedToken>,
    pub(super) identity: Arc<Identity>,
}

impl ConnectionToken {
    pub(super) fn get(&self) -> Option<Arc<HeldToken>> {
        match self.held.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(super) fn set(&self, held: Arc<HeldToken>) {
        match self.held.lock() {
            Ok(mut g) => *g = Some(held),
            Err(poisoned) => *poisoned.into_inner() = Some(held),
        }
    }
}

impl fmt::Debug for ConnectionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token.
        f.write_str("ConnectionToken")
    }
}

pub(super) struct CachedToken {
    pub(super) identity: Identity,
    pub(super) provider: usize,
    pub(super) key: KeyRef,
    /// The token's `exp` (at most [`MAX_CACHE_TTL`] after insertion), on the monotonic clock.
    pub(super) valid_until: Instant,
}

pub(super) struct TokenExpiry;

impl moka::Expiry<[u8; 32], Arc<CachedToken>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<CachedToken>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.valid_until.saturating_duration_since(created_at))
    }
}
