//! The Gate: the one place a request is admitted.
//!
//! [`Gate`] is built once from the config at start-up (the route table, the
//! token verifier, the live policy); [`GateLayer`] puts it in front of every
//! service. See [`layer`] for the request path.

pub mod admission;
mod admit;
pub mod audit;
pub mod authn;
pub mod decide;
pub mod explain;
pub mod frame;
pub mod identity;
pub mod jwks;
pub mod jwt;
pub mod layer;
pub mod policy;
pub mod refusal;
pub mod reload;
pub mod route;
pub mod scan;
pub mod shares;

use std::collections::HashSet;
use std::sync::Arc;

pub use admission::{Admission, Authorizer};
pub use layer::GateLayer;

use crate::config::{
    AclMatch, AuthMethod, AuthorizationConfig, Config, JwtConfig, JwtKeyConfig, LimitsConfig,
};
use identity::Identity;
use reload::LivePolicy;

/// Why the Gate could not be set up from the config.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The token verifier refused its settings.
    #[error("authorization: {0}")]
    Jwt(#[from] jwt::JwtConfigError),
    /// The verifier refused the key material at one config key.
    #[error("{key}: {reason}")]
    Key {
        /// The config key path, e.g. `authorization.jwks-url[0]`.
        key: String,
        /// Why, in the verifier's words.
        reason: String,
    },
    /// The ACL file does not load.
    #[error("authorization.acl-config: {0}")]
    Policy(#[from] policy::PolicyError),
}

/// Names the config key of a key the verifier refused, where the error says
/// which one it is (providers have unique names: `default` or their issuer).
fn at_key(c: &JwtConfig, e: jwt::JwtConfigError) -> GateError {
    let find = |name: &str| c.providers.iter().find(|p| p.name == name);
    match &e {
        jwt::JwtConfigError::RsaKeySize { provider, source } => {
            if let Some(p) = find(provider) {
                let file = p.key_file.as_deref().unwrap_or(std::path::Path::new(""));
                return GateError::Key {
                    key: p.key_at.clone(),
                    reason: format!("{}: {source}", file.display()),
                };
            }
        }
        jwt::JwtConfigError::Jwks {
            provider,
            source: jwks::JwksConfigError::BadUrl { url, reason },
        } => {
            if let Some(p) = find(provider) {
                if let JwtKeyConfig::Jwks { urls, .. } = &p.key {
                    if let Some(i) = urls.iter().position(|u| u == url) {
                        return GateError::Key {
                            key: format!("{}[{i}]", p.key_at),
                            reason: format!("{url:?}: {reason}"),
                        };
                    }
                }
            }
        }
        _ => {}
    }
    GateError::Jwt(e)
}

/// Everything the Gate needs to admit requests, built once at start.
pub struct Gate {
    pub(crate) routes: route::RouteTable,
    pub(crate) method: AuthMethod,
    pub(crate) jwt: Option<Arc<jwt::JwtAuthenticator>>,
    pub(crate) policy: Option<Arc<LivePolicy>>,
    pub(crate) unauthenticated_instances: HashSet<String>,
    pub(crate) allow_localhost: bool,
    pub(crate) open_health: bool,
    pub(crate) open_reflection: bool,
    pub(crate) limits: frame::Limits,
    pub(crate) first_message_timeout: std::time::Duration,
    pub(crate) max_header_list: usize,
    pub(crate) max_instance_name: usize,
    pub(crate) shares: shares::Shares,
    decider: Arc<decide::Decider>,
}

/// Maps the config's JWT section onto the verifier's settings.
pub fn jwt_settings(c: &JwtConfig) -> jwt::JwtSettings {
    let providers = c
        .providers
        .iter()
        .map(|p| jwt::ProviderSettings {
            name: p.name.clone(),
            issuer: p.issuer.clone(),
            algorithms: p.algorithms.clone(),
            key: match &p.key {
                JwtKeyConfig::Secret(s) => jwt::KeySource::Secret(s.clone()),
                JwtKeyConfig::PublicKeyPem(pem) => jwt::KeySource::PublicKeyPem(pem.clone()),
                JwtKeyConfig::Jwks {
                    urls,
                    refresh,
                    max_staleness,
                    min_refetch_interval,
                } => jwt::KeySource::Jwks(jwks::JwksSettings {
                    urls: urls.clone(),
                    refresh: refresh.unwrap_or(jwks::JwksSettings::DEFAULT_REFRESH),
                    max_staleness: Some(
                        max_staleness.unwrap_or(jwks::JwksSettings::DEFAULT_MAX_STALENESS),
                    ),
                    min_refetch_interval: min_refetch_interval
                        .unwrap_or(jwks::JwksSettings::DEFAULT_MIN_REFETCH_INTERVAL),
                    timeout: jwks::JwksSettings::DEFAULT_TIMEOUT,
                }),
            },
            audiences: p.audiences.clone(),
            allow_weak_secret: p.allow_weak_secret,
        })
        .collect();
    jwt::JwtSettings {
        providers,
        leeway: c.leeway,
        max_lifetime: c.max_token_lifetime,
        cache_capacity: c.token_cache_size,
        claims: jwt::ClaimMapping {
            actor: c.claims.actor.clone(),
            subject: c.claims.subject.clone(),
            workflow: c.claims.workflow.clone(),
        },
    }
}

/// The policy options the config asks for.
pub fn policy_options(a: &AuthorizationConfig) -> policy::PolicyOptions {
    policy::PolicyOptions {
        match_mode: match a.acl_match {
            AclMatch::Whole => policy::MatchMode::Whole,
            AclMatch::Prefix => policy::MatchMode::Prefix,
        },
    }
}

impl Gate {
    /// Builds the Gate: validates the JWT settings (weak secrets, key kinds),
    /// loads the policy (an invalid policy is fatal here). Key sets are not
    /// fetched yet: call [`Gate::start`].
    pub fn from_config(config: &Config) -> Result<Gate, GateError> {
        Gate::new(&config.authorization, &config.limits)
    }

    /// Builds the Gate from its own sections: `authorization:` and `limits:`.
    pub fn new(a: &AuthorizationConfig, l: &LimitsConfig) -> Result<Gate, GateError> {
        let jwt = match (&a.method, &a.jwt) {
            (AuthMethod::Jwt, Some(c)) => {
                Some(jwt::JwtAuthenticator::new(jwt_settings(c)).map_err(|e| at_key(c, e))?)
            }
            _ => None,
        };
        let policy = match (&a.method, &a.acl_config) {
            (AuthMethod::None, _) | (_, None) => None,
            (_, Some(path)) => Some(reload::load(path, policy_options(a), a.watch_policy)?),
        };
        if let Some(p) = &policy {
            let current = p.current();
            tracing::info!(
                path = %a.acl_config.as_deref().unwrap_or(std::path::Path::new("")).display(),
                version = current.version(),
                instances = current.instances().len(),
                "policy loaded"
            );
        }
        let decider = Arc::new(decide::Decider::new(a.method, policy.clone()));
        let max = l.max_message_bytes;
        Ok(Gate {
            routes: route::RouteTable::new(),
            method: a.method,
            jwt,
            policy,
            unauthenticated_instances: a.allow_unauthenticated_instances.iter().cloned().collect(),
            allow_localhost: a.allow_localhost_requests,
            open_health: a.open_health,
            open_reflection: a.open_reflection,
            limits: frame::Limits {
                max_message: max,
                max_decompressed: max,
            },
            first_message_timeout: l.first_message_timeout,
            max_header_list: l.max_header_list_size as usize,
            max_instance_name: l.max_instance_name_bytes,
            shares: shares::Shares::new(l),
            decider,
        })
    }

    /// Starts the background work: the first key-set fetch and its refresh.
    /// (Policy reloads are the server's reloader's: see [`crate::live`].)
    pub async fn start(&self) {
        if let Some(jwt) = &self.jwt {
            jwt.start().await;
        }
    }

    /// Whether every key set has arrived (health reports NOT_SERVING before).
    pub fn subscribe_ready(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.jwt.as_ref().map(|j| j.subscribe_ready())
    }

    /// The live policy, if ACLs are configured.
    pub fn policy(&self) -> Option<&Arc<LivePolicy>> {
        self.policy.as_ref()
    }

    /// The token verifier, with `method: jwt`.
    pub fn jwt(&self) -> Option<&Arc<jwt::JwtAuthenticator>> {
        self.jwt.as_ref()
    }

    /// Counts an admitted request's decision (`gridgate_gate_decisions_total`).
    pub(crate) fn count_allowed(&self, label: &'static str) {
        crate::metrics::gate_decision("allow", label);
    }

    /// The (service, RPC) labels of a path, for the metrics of requests the
    /// Gate did not see (those shed before it).
    pub fn labels(&self, path: &str) -> Option<(&'static str, &'static str)> {
        self.routes.get(path).map(|r| (r.service, r.rpc))
    }

    pub(crate) fn clone_authorizer(&self) -> Arc<dyn Authorizer> {
        self.decider.clone()
    }

    /// The one decision (see [`decide`]): may `identity` call `rpc` on
    /// `instance` (`None`: a query over every instance)?
    pub fn decide(
        &self,
        instance: Option<&str>,
        rpc: &str,
        identity: &Identity,
    ) -> decide::Verdict {
        self.decider.decide(instance, rpc, identity)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Some(j) = &self.jwt {
            j.shutdown();
        }
    }
}

#[cfg(test)]
mod tests;
