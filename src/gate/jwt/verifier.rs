//! [`JwtAuthenticator`]: a token in, a verified [`Identity`] out.

use super::*;

/// Readiness shared with the refresh tasks.
pub(super) struct Readiness {
    pub(super) sources: Vec<Arc<JwksSource>>,
    pub(super) tx: watch::Sender<bool>,
}

impl Readiness {
    fn compute(&self) -> bool {
        self.sources.iter().all(|s| s.has_fresh_keys())
    }

    fn update(&self) -> bool {
        let ready = self.compute();
        self.tx.send_if_modified(|current| {
            let changed = *current != ready;
            *current = ready;
            changed
        });
        ready
    }
}

/// Verifies JWTs against the configured providers. See the module documentation.
pub struct JwtAuthenticator {
    providers: Vec<Provider>,
    /// The one provider without an issuer, BuildGrid style.
    single: bool,
    leeway_secs: u64,
    max_lifetime_secs: Option<u64>,
    claims: ClaimMapping,
    cache: Option<Cache<[u8; 32], Arc<CachedToken>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    readiness: Arc<Readiness>,
    started: AtomicBool,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field(
                "providers",
                &self.providers.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// Checks the settings and builds the authenticator. Key sets are not fetched
    /// until [`JwtAuthenticator::start`] (or the first token that needs them).
    pub fn new(settings: JwtSettings) -> Result<Arc<Self>, JwtConfigError> {
        if settings.providers.is_empty() {
            return Err(JwtConfigError::NoProviders);
        }
        let single = settings.providers.len() == 1 && settings.providers[0].issuer.is_none();
        if !single {
            for (i, p) in settings.providers.iter().enumerate() {
                let Some(issuer) = &p.issuer else {
                    return Err(JwtConfigError::IssuerRequired {
                        provider: p.name.clone(),
                    });
                };
                if let Some(other) = settings.providers[..i]
                    .iter()
                    .find(|o| o.issuer.as_ref() == Some(issuer))
                {
                    return Err(JwtConfigError::DuplicateIssuer {
                        first: other.name.clone(),
                        second: p.name.clone(),
                    });
                }
            }
        }
        let leeway_secs = settings.leeway.as_secs();
        let mut providers = Vec::with_capacity(settings.providers.len());
        for p in settings.providers {
            providers.push(build_provider(p, leeway_secs)?);
        }
        let sources: Vec<Arc<JwksSource>> = providers
            .iter()
            .filter_map(|p| match &p.keys {
                ProviderKeys::Jwks(s) => Some(s.clone()),
                ProviderKeys::Static(_) => None,
            })
            .collect();
        let (tx, _) = watch::channel(sources.is_empty());
        let cache = (settings.cache_capacity > 0).then(|| {
            Cache::builder()
                .max_capacity(settings.cache_capacity)
                .expire_after(TokenExpiry)
                .build()
        });
        Ok(Arc::new(JwtAuthenticator {
            providers,
            single,
            leeway_secs,
            max_lifetime_secs: settings.max_lifetime.map(|d| d.as_secs()),
            claims: settings.claims,
            cache,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            readiness: Arc::new(Readiness { sources, tx }),
            started: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
        }))
    }

    /// Fetches every key set once (a failure is logged, not returned) and starts the
    /// refresh tasks. The tasks stop when the authenticator is dropped or
    /// [`JwtAuthenticator::shutdown`] is called. Calling it again does nothing.
    pub async fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let sources = self.readiness.sources.clone();
        let results = futures_util::future::join_all(
            sources.iter().map(|s| async move { s.refresh().await }),
        )
        .await;
        let mut handles = Vec::with_capacity(sources.len());
        for (source, ok) in sources.into_iter().zip(results) {
            if !source.has_fresh_keys() {
                tracing::warn!(
                    provider = source.name(),
                    "no usable key yet; tokens of this provider are refused until a fetch succeeds"
                );
            }
            let readiness = self.readiness.clone();
            let handle = source.spawn_refresher(ok, move || {
                readiness.update();
            });
            handles.push(handle.abort_handle());
        }
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(handles);
        self.readiness.update();
    }

    /// Stops the refresh tasks (the keys fetched so far stay in use).
    pub fn shutdown(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }

    /// Whether every key set provider has a usable key (secret and PEM providers
    /// always do).
    pub fn ready(&self) -> bool {
        self.readiness.update()
    }

    /// Watches [`JwtAuthenticator::ready`], for the health service. Updated after
    /// every key set fetch and when keys become stale.
    pub fn subscribe_ready(&self) -> watch::Receiver<bool> {
        self.readiness.update();
        self.readiness.tx.subscribe()
    }

    /// Sets the gauges of every JWKS provider (key count, age of the keys).
    pub fn sample_metrics(&self) {
        for source in &self.readiness.sources {
            source.sample_metrics();
        }
    }

    /// Cache hits and misses so far.
    pub fn cache_stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Verifies a token (without the `Bearer ` prefix) and returns who it identifies.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let Some(cache) = &self.cache else {
            return self.verify(token).await.map(|(identity, _)| identity);
        };
        self.cached_entry(cache, token)
            .await
            .map(|entry| entry.identity.clone())
    }

    /// The cache entry for a token: from the cache when still valid, else
    /// verified and cached.
    async fn cached_entry(
        &self,
        cache: &Cache<[u8; 32], Arc<CachedToken>>,
        token: &str,
    ) -> Result<Arc<CachedToken>, AuthError> {
        let digest = jwks::sha256(token.as_bytes());
        if let Some(entry) = cache.get(&digest) {
            if self.still_valid(&entry) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                crate::metrics::token_cache(true);
                return Ok(entry);
            }
            cache.invalidate(&digest);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        crate::metrics::token_cache(false);
        let (_, entry) = self.verify(token).await?;
        let entry = Arc::new(entry);
        if entry.valid_until > Instant::now() {
            cache.insert(digest, entry.clone());
        }
        Ok(entry)
    }

    /// Like [`JwtAuthenticator::authenticate`], reusing what `slot` (one per
    /// connection) holds when the connection sends the same token again: then
    /// only the expiry and the key's presence in the key set are checked, with
    /// no hashing and no shared-cache lookup. The identity is returned with
    /// `certificate` attached.
    pub async fn authenticate_on_connection(
        &self,
        token: &str,
        slot: &ConnectionToken,
        certificate: Option<&Arc<crate::gate::identity::PeerCertificate>>,
    ) -> Result<Arc<Identity>, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let Some(cache) = &self.cache else {
            let mut identity = self.verify(token).await?.0;
            identity.certificate = certificate.cloned();
            return Ok(Arc::new(identity));
        };
        if let Some(held) = slot.get() {
            if *held.token == *token && self.still_valid(&held.entry) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                crate::metrics::token_cache(true);
                return Ok(held.identity.clone());
            }
        }
        let entry = self.cached_entry(cache, token).await?;
        let mut identity = entry.identity.clone();
        identity.certificate = certificate.cloned();
        let identity = Arc::new(identity);
        slot.set(Arc::new(HeldToken {
            token: token.into(),
            entry,
            identity: identity.clone(),
        }));
        Ok(identity)
    }

    /// Whether a cached token may still be accepted: not expired, and its key still
    /// in the provider's key set.
    fn still_valid(&self, entry: &CachedToken) -> bool {
        let now = Instant::now();
        if entry.valid_until <= now {
            return false;
        }
        match (&self.providers[entry.provider].keys, &entry.key) {
            (ProviderKeys::Static(_), KeyRef::Static) => true,
            (ProviderKeys::Jwks(source), KeyRef::Jwks(fingerprint)) => {
                source.contains_fresh(fingerprint, now)
            }
            _ => false,
        }
    }

    async fn verify(&self, token: &str) -> Result<(Identity, CachedToken), AuthError> {
        let parts = split_token(token)?;
        let header: RawHeader = decode_part(parts.header)?;
        match &header.crit {
            None => {}
            Some(Value::Array(list)) if list.is_empty() => return Err(AuthError::Malformed),
            Some(_) => return Err(AuthError::CriticalHeader),
        }
        let alg = Algorithm::from_str(&header.alg).map_err(|_| AuthError::AlgorithmNotAllowed)?;
        let kid = header.kid.as_deref();
        if kid.is_some_and(|k| k.len() > jwks::MAX_KID_BYTES) {
            return Err(AuthError::KidTooLong);
        }

        let index = self.select_provider(parts.payload)?;
        let provider = &self.providers[index];
        if !provider.algorithms.contains(alg) {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        let Some(validation) = provider
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
        else {
            return Err(AuthError::AlgorithmNotAllowed);
        };

        let candidates = match &provider.keys {
            ProviderKeys::Static(key) => vec![key.clone()],
            ProviderKeys::Jwks(source) => find_keys(source, kid, alg).await?,
        };

        let mut result = Err(AuthError::UnknownKey);
        for key in candidates.iter().take(MAX_CANDIDATE_KEYS) {
            result = jsonwebtoken::decode::<StrictClaims>(token, &key.key, validation)
                .map(|data| (data.claims.0, key))
                .map_err(|e| AuthError::from_library(&e));
            if !matches!(result, Err(AuthError::BadSignature)) {
                break;
            }
        }
        let (claims, key) = match result {
            Ok(found) => found,
            Err(error) => {
                tracing::debug!(provider = %provider.name, reason = %error, "token refused");
                return Err(error);
            }
        };

        let exp = self.check_claims(provider, &claims)?;
        let remaining = exp.saturating_sub(jsonwebtoken::get_current_timestamp());
        let valid_until = Instant::now() + Duration::from_secs(remaining).min(MAX_CACHE_TTL);
        let identity = self.identity(provider, claims);
        let entry = CachedToken {
            identity: identity.clone(),
            provider: index,
            key: match &provider.keys {
                ProviderKeys::Static(_) => KeyRef::Static,
                ProviderKeys::Jwks(_) => KeyRef::Jwks(key.fingerprint),
            },
            valid_until,
        };
        Ok((identity, entry))
    }

    fn select_provider(&self, payload: &str) -> Result<usize, AuthError> {
        if self.single {
            return Ok(0);
        }
        // Unverified: only to choose the provider; the issuer is verified after the
        // signature, by the provider's Validation.
        let unverified: IssuerOnly = decode_part(payload)?;
        let issuer = unverified.iss.ok_or(AuthError::MissingIssuer)?;
        self.providers
            .iter()
            .position(|p| p.issuer.as_deref() == Some(issuer.as_str()))
            .ok_or(AuthError::UnknownIssuer)
    }

    /// The checks the library does not do. Returns `exp`.
    fn check_claims(
        &self,
        provider: &Provider,
        claims: &Map<String, Value>,
    ) -> Result<u64, AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        let exp = numeric_claim(claims, "exp")?.ok_or(AuthError::NoExpiry)?;
        let iat = numeric_claim(claims, "iat")?;
        let nbf = numeric_claim(claims, "nbf")?;
        if iat.is_some_and(|iat| iat > now.saturating_add(self.leeway_secs)) {
            return Err(AuthError::IssuedInFuture);
        }
        if let Some(max) = self.max_lifetime_secs {
            let start = iat.or(nbf).unwrap_or(now);
            if exp.saturating_sub(start) > max {
                return Err(AuthError::LifetimeExceeded);
            }
        }
        if let Some(issuer) = &provider.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(issuer.as_str()) {
                return Err(AuthError::IssuerMismatch);
            }
        }
        Ok(exp)
    }

    fn identity(&self, provider: &Provider, claims: Map<String, Value>) -> Identity {
        identity_from_claims(
            &self.claims,
            claims,
            provider.audiences.first().map(String::as_str),
        )
    }
}

impl Drop for JwtAuthenticator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Finds the keys of a key set that may verify a token, refetching once if the
/// `kid` is unknown (waiting out the refetch hold-off if need be, so that a
/// new key is found) or the set is empty (not waiting: the key server is
/// down, and the periodic refresh retries).
pub(super) async fn find_keys(
    source: &Arc<JwksSource>,
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<Vec<Arc<VerifyKey>>, AuthError> {
    let mut refetched = false;
    loop {
        let selection = source.current().select(kid, alg, Instant::now());
        let (error, wait) = match selection {
            Selection::Found(keys) => return Ok(keys),
            Selection::AlgorithmMismatch => return Err(AuthError::KeyAlgorithmMismatch),
            Selection::Ambiguous => return Err(AuthError::AmbiguousKey),
            Selection::NoKeyForAlgorithm => return Err(AuthError::UnknownKey),
            Selection::UnknownKid => (AuthError::UnknownKey, true),
            Selection::NoKeys => (AuthError::NoKeys, false),
        };
        if refetched || !source.refetch_on_demand(wait).await {
            return Err(error);
        }
        refetched = true;
    }
}
