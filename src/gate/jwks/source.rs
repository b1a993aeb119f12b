//! [`JwksSource`]: one provider's key set URLs, fetched, refreshed and refetched
//! on demand for an unknown `kid`.

use super::*;

/// The keys last fetched from one URL.
#[derive(Default)]
pub(super) struct UrlKeys {
    pub(super) keys: Vec<Arc<VerifyKey>>,
    pub(super) fetched_at: Option<Instant>,
    /// Whether the loss of these keys to staleness was already logged.
    pub(super) stale_logged: bool,
}

/// State changed only by a fetch, under [`JwksSource::fetch_lock`].
pub(super) struct FetchState {
    pub(super) urls: Vec<UrlKeys>,
    pub(super) last_on_demand: Option<Instant>,
}

/// The key set of one provider: fetched, merged, cached and refreshed.
pub struct JwksSource {
    name: String,
    settings: JwksSettings,
    urls: Vec<reqwest::Url>,
    allowed: AlgSet,
    client: reqwest::Client,
    current: RwLock<Arc<KeySet>>,
    /// Held for the length of a fetch; owned so that a fetch runs in its own
    /// task, to the end, whoever of its waiters goes away.
    fetch_lock: Arc<tokio::sync::Mutex<FetchState>>,
    /// How many fetch rounds have begun; a round's number is this count when it began.
    rounds_begun: AtomicU64,
    /// The number of the last completed round (successful or not).
    last_round_done: AtomicU64,
    /// Whether that round fetched every URL.
    last_round_ok: std::sync::atomic::AtomicBool,
    /// Requests waiting in [`JwksSource::refetch_on_demand`].
    refetch_waiters: tokio::sync::Semaphore,
}

impl std::fmt::Debug for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksSource")
            .field("name", &self.name)
            .field("urls", &self.settings.urls)
            .finish_non_exhaustive()
    }
}

impl JwksSource {
    /// A key set source for the provider `name`, keeping keys usable with `allowed`.
    /// Checks the settings; fetches nothing yet.
    pub fn new(
        name: &str,
        settings: JwksSettings,
        allowed: AlgSet,
    ) -> Result<Self, JwksConfigError> {
        if settings.urls.is_empty() {
            return Err(JwksConfigError::NoUrls);
        }
        let urls = settings
            .urls
            .iter()
            .map(|u| {
                check_url(u).map_err(|reason| JwksConfigError::BadUrl {
                    url: u.clone(),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if settings.refresh.is_zero() {
            return Err(JwksConfigError::ZeroDuration(
                "the key set refresh interval",
            ));
        }
        if settings.timeout.is_zero() {
            return Err(JwksConfigError::ZeroDuration("the key set fetch timeout"));
        }
        if settings.max_staleness.is_some_and(|d| d.is_zero()) {
            return Err(JwksConfigError::ZeroDuration(
                "the key set maximum staleness",
            ));
        }
        let redirect = reqwest::redirect::Policy::custom(|attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if let Err(reason) = check_parsed_url(attempt.url()) {
                attempt.error(reason)
            } else {
                attempt.follow()
            }
        });
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(redirect)
            .user_agent(concat!("gridgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| JwksConfigError::Client(e.to_string()))?;
        let url_count = urls.len();
        Ok(JwksSource {
            name: name.to_owned(),
            current: RwLock::new(Arc::new(KeySet {
                generation: 0,
                keys: Vec::new(),
                fetched_at: vec![None; url_count],
                max_staleness: settings.max_staleness,
            })),
            fetch_lock: Arc::new(tokio::sync::Mutex::new(FetchState {
                urls: (0..url_count).map(|_| UrlKeys::default()).collect(),
                last_on_demand: None,
            })),
            settings,
            urls,
            allowed,
            client,
            rounds_begun: AtomicU64::new(0),
            last_round_done: AtomicU64::new(0),
            last_round_ok: std::sync::atomic::AtomicBool::new(false),
            refetch_waiters: tokio::sync::Semaphore::new(MAX_REFETCH_WAITERS),
        })
    }

    /// The provider name this source belongs to.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The settings of this source.
    pub fn settings(&self) -> &JwksSettings {
        &self.settings
    }

    /// The current snapshot of the keys.
    pub fn current(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the key with this fingerprint is in the set and may still be used at `now`.
    pub fn contains_fresh(&self, fingerprint: &[u8; 32], now: Instant) -> bool {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_fresh(fingerprint, now)
    }

    /// Whether some key is usable now.
    pub fn has_fresh_keys(&self) -> bool {
        self.current().has_fresh_keys(Instant::now())
    }

    /// Fetches every URL now (waiting for a fetch under way first). Returns whether
    /// every URL was fetched successfully.
    pub async fn refresh(&self) -> bool {
        let mut state = self.fetch_lock.lock().await;
        self.fetch_all(&mut state).await
    }

    /// Sets this provider's gauges: usable keys, and seconds since the last
    /// successful fetch of any of its URLs (-1 before the first).
    pub fn sample_metrics(&self) {
        let now = Instant::now();
        let set = self.current();
        let keys = set.fresh_keys(now).count();
        let age = set
            .fetched_at
            .iter()
            .flatten()
            .map(|at| now.saturating_duration_since(*at).as_secs_f64())
            .reduce(f64::min)
            .unwrap_or(-1.0);
        crate::metrics::jwks_gauges(&self.name, keys, age);
    }

    /// Fetches the key set again because a token named a `kid` it does not
    /// have (or the set has no usable key), at most once per
    /// [`JwksSettings::min_refetch_interval`] (the hold-off). Returns whether
    /// a fetch that answers the call completed (the caller should then look
    /// at the keys again): one that began after the call began, or one under
    /// way then if it failed or the caller does not `wait`. Concurrent
    /// callers share that fetch.
    ///
    /// Inside the hold-off, a caller with `wait` waits for the next permitted
    /// fetch (at most the hold-off, then the fetch itself); without `wait` it
    /// gets `false` at once. Beyond [`MAX_REFETCH_WAITERS`] callers at once,
    /// `false` at once too.
    pub async fn refetch_on_demand(self: &Arc<Self>, wait: bool) -> bool {
        let Ok(_waiting) = self.refetch_waiters.try_acquire() else {
            tracing::debug!(provider = %self.name, "too many requests waiting for a key set fetch");
            return false;
        };
        let done_before = self.last_round_done.load(Ordering::Acquire);
        let begun_before = self.rounds_begun.load(Ordering::Acquire);
        loop {
            let mut state = self.fetch_lock.clone().lock_owned().await;
            let done = self.last_round_done.load(Ordering::Acquire);
            // A fetch that began after this call answers it. One already
            // under way does too for an empty set, and for an unknown kid
            // when it failed (the key server is in trouble: another fetch
            // would double the wait for nothing); when it succeeded it may
            // have asked before the new key was published, so the caller
            // waits for the next.
            let under_way_answers = !wait || !self.last_round_ok.load(Ordering::Acquire);
            if done > begun_before || (under_way_answers && done > done_before) {
                return true;
            }
            let now = Instant::now();
            let next_permitted = state
                .last_on_demand
                .map(|at| at + self.settings.min_refetch_interval)
                .filter(|next| *next > now);
            if let Some(next) = next_permitted {
                if !wait {
                    return false;
                }
                drop(state);
                tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
                continue;
            }
            state.last_on_demand = Some(now);
            tracing::debug!(provider = %self.name, "unknown key id: fetching the key set again");
            // In its own task: a caller that goes away (or its deadline) must
            // not cancel the fetch the other waiters wait for.
            let this = self.clone();
            let fetch = tokio::spawn(async move {
                let mut state = state;
                this.fetch_all(&mut state).await;
            });
            let _ = fetch.await;
            return true;
        }
    }

    async fn fetch_all(&self, state: &mut FetchState) -> bool {
        let round = self.rounds_begun.fetch_add(1, Ordering::AcqRel) + 1;
        let results =
            futures_util::future::join_all(self.urls.iter().map(|url| self.fetch_one(url.clone())))
                .await;
        let now = Instant::now();
        let mut all_ok = true;
        for ((url, slot), result) in self.urls.iter().zip(state.urls.iter_mut()).zip(results) {
            crate::metrics::jwks_fetch(&self.name, result.is_ok());
            match result {
                Ok(keys) => {
                    slot.keys = keys;
                    slot.fetched_at = Some(now);
                    slot.stale_logged = false;
                }
                Err(error) => {
                    all_ok = false;
                    tracing::warn!(
                        provider = %self.name,
                        url = %url,
                        reason = %error,
                        "key set fetch failed; keeping the previous keys"
                    );
                }
            }
        }
        self.publish(state);
        self.last_round_ok.store(all_ok, Ordering::Release);
        self.last_round_done.store(round, Ordering::Release);
        all_ok
    }

    /// Builds a new snapshot from the per-URL keys.
    fn publish(&self, state: &FetchState) {
        let mut guard = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let keys: Vec<(usize, Arc<VerifyKey>)> = state
            .urls
            .iter()
            .enumerate()
            .flat_map(|(i, u)| u.keys.iter().map(move |k| (i, k.clone())))
            .collect();
        let same = keys.len() == guard.keys.len()
            && keys
                .iter()
                .zip(guard.keys.iter())
                .all(|((ia, a), (ib, b))| ia == ib && a.fingerprint == b.fingerprint);
        let generation = if same {
            guard.generation
        } else {
            guard.generation + 1
        };
        *guard = Arc::new(KeySet {
            generation,
            keys,
            fetched_at: state.urls.iter().map(|u| u.fetched_at).collect(),
            max_staleness: self.settings.max_staleness,
        });
    }

    async fn fetch_one(&self, url: reqwest::Url) -> Result<Vec<Arc<VerifyKey>>, FetchError> {
        let url_text = url.to_string();
        let mut response = self
            .client
            .get(url)
            .header(
                reqwest::header::ACCEPT,
                "application/json, application/jwk-set+json",
            )
            .send()
            .await
            .map_err(|e| FetchError::Http(error_chain(&e)))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
        {
            return Err(FetchError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::Http(error_chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body, self.allowed, url_text.as_str())
    }

    /// When the next URL's keys become stale, if that is in the future.
    fn next_stale_deadline(&self, now: Instant) -> Option<Instant> {
        let max = self.settings.max_staleness?;
        let set = self.current();
        set.fetched_at
            .iter()
            .flatten()
            .map(|at| *at + max)
            .filter(|deadline| *deadline > now)
            .min()
    }

    fn log_stale(&self) {
        let Ok(mut state) = self.fetch_lock.try_lock() else {
            return;
        };
        let Some(max) = self.settings.max_staleness else {
            return;
        };
        let now = Instant::now();
        for (url, slot) in self.urls.iter().zip(state.urls.iter_mut()) {
            let stale = slot
                .fetched_at
                .is_some_and(|at| now.saturating_duration_since(at) > max);
            if stale && !slot.stale_logged && !slot.keys.is_empty() {
                slot.stale_logged = true;
                tracing::warn!(
                    provider = %self.name,
                    url = %url,
                    max_staleness_secs = max.as_secs(),
                    "keys not refreshed within the maximum staleness; no longer used"
                );
            }
        }
    }

    /// Starts the task that refreshes the keys every [`JwksSettings::refresh`]
    /// (sooner after a failure) and calls `on_change` after every fetch and whenever
    /// keys become stale. `last_ok` says whether the last fetch succeeded.
    pub fn spawn_refresher(
        self: Arc<Self>,
        last_ok: bool,
        on_change: impl Fn() + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut failures: u32 = if last_ok { 0 } else { 1 };
            let mut next_fetch = Instant::now() + self.retry_delay(failures);
            loop {
                let now = Instant::now();
                let wake = self
                    .next_stale_deadline(now)
                    .map_or(next_fetch, |deadline| deadline.min(next_fetch));
                tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
                if Instant::now() >= next_fetch {
                    let ok = self.refresh().await;
                    failures = if ok { 0 } else { failures.saturating_add(1) };
                    next_fetch = Instant::now() + self.retry_delay(failures);
                } else {
                    // Woken at a staleness deadline: let the stale keys' sleep end.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                self.log_stale();
                on_change();
            }
        })
    }

    fn retry_delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return self.settings.refresh;
        }
        let backoff = FIRST_RETRY.saturating_mul(1u32 << (failures - 1).min(16));
        backoff.min(self.settings.refresh)
    }
}

/// An error and its sources, on one line.
pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
