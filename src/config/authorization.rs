//! `authorization:`: the method, the JWT providers and their keys, the ACL
//! files (BuildGrid's keys and gridgate's own).

use std::collections::HashSet;
use std::time::Duration;

use super::model::*;
use super::raw::*;
use super::validate::*;
use super::ConfigError;

impl Validator {
    pub(super) fn authorization(
        &self,
        a: Option<&RawAuthorization>,
    ) -> Result<AuthorizationConfig, ConfigError> {
        let Some(a) = a else {
            return Ok(AuthorizationConfig {
                method: AuthMethod::None,
                jwt: None,
                acl_config: None,
                acl_match: AclMatch::Whole,
                allow_unauthenticated_instances: Vec::new(),
                allow_localhost_requests: false,
                open_health: true,
                open_reflection: true,
                watch_policy: true,
                jwks_required_at_start: false,
            });
        };
        let k = |s: &str| format!("authorization.{s}");
        let method = match a.method.to_ascii_lowercase().as_str() {
            "none" => AuthMethod::None,
            "jwt" => AuthMethod::Jwt,
            "headers" => AuthMethod::Headers,
            other => {
                return Err(self.err(
                    &k("method"),
                    &format!("unknown method {other:?} (expected none, jwt or headers)"),
                ))
            }
        };
        if a.allow_unauthenticated_instances.is_some() && a.allow_unauthorized_instances.is_some() {
            return Err(self.err(
                &k("allow-unauthorized-instances"),
                "give allow-unauthenticated-instances or its older spelling allow-unauthorized-instances, not both",
            ));
        }
        let unauth = a
            .allow_unauthenticated_instances
            .clone()
            .or_else(|| a.allow_unauthorized_instances.clone())
            .unwrap_or_default();

        if method == AuthMethod::None {
            // Fail closed: settings that only mean something with authentication
            // would be silently ignored by an open endpoint.
            let stray = [
                ("secret", a.secret.is_some()),
                ("jwks-url", a.jwks_url.is_some()),
                ("audience", a.audience.is_some()),
                ("algorithm", a.algorithm.is_some()),
                ("acl-config", a.acl_config.is_some()),
                ("providers", a.providers.is_some()),
                ("allow-unauthenticated-instances", !unauth.is_empty()),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(self.err(
                    &k(key),
                    "has no effect with method none (every call is allowed): remove it, \
                     or choose method jwt or headers",
                ));
            }
        }
        if method != AuthMethod::Jwt {
            for (key, set) in [
                ("secret", a.secret.is_some()),
                ("jwks-url", a.jwks_url.is_some()),
                ("audience", a.audience.is_some()),
                ("algorithm", a.algorithm.is_some()),
                ("providers", a.providers.is_some()),
            ] {
                if set {
                    return Err(self.err(&k(key), "only applies to method jwt"));
                }
            }
        }

        let jwt = if method == AuthMethod::Jwt {
            Some(self.jwt(a)?)
        } else {
            None
        };
        let acl_config = match &a.acl_config {
            None => None,
            Some(p) => {
                let path = self.path(p);
                if !path.exists() {
                    return Err(self.err(
                        &k("acl-config"),
                        &format!("{} does not exist", path.display()),
                    ));
                }
                Some(path)
            }
        };
        let acl_match = match a.acl_match.as_deref() {
            None | Some("whole") => AclMatch::Whole,
            Some("prefix") => AclMatch::Prefix,
            Some(other) => {
                return Err(self.err(
                    &k("acl-match"),
                    &format!("unknown value {other:?} (expected whole or prefix)"),
                ))
            }
        };
        if a.acl_match.is_some() && acl_config.is_none() {
            return Err(self.err(&k("acl-match"), "needs acl-config"));
        }
        Ok(AuthorizationConfig {
            method,
            jwt,
            acl_config,
            acl_match,
            allow_unauthenticated_instances: unauth,
            allow_localhost_requests: a.allow_localhost_requests.unwrap_or(false),
            open_health: a.open_health.unwrap_or(true),
            open_reflection: a.open_reflection.unwrap_or(true),
            watch_policy: a.watch_policy.unwrap_or(true),
            jwks_required_at_start: a.jwks_required_at_start.unwrap_or(false),
        })
    }

    pub(super) fn jwt(&self, a: &RawAuthorization) -> Result<JwtConfig, ConfigError> {
        let k = |s: &str| format!("authorization.{s}");
        let flat_set = a.secret.is_some()
            || a.jwks_url.is_some()
            || a.algorithm.is_some()
            || a.audience.is_some()
            || a.issuer.is_some();
        let providers = match &a.providers {
            Some(list) => {
                if flat_set {
                    return Err(self.err(
                        &k("providers"),
                        "give either providers: or the flat secret/jwks-url/algorithm/audience/issuer keys, not both",
                    ));
                }
                if list.is_empty() {
                    return Err(self.err(&k("providers"), "is empty"));
                }
                let mut issuers = HashSet::new();
                let mut out = Vec::new();
                for (i, p) in list.iter().enumerate() {
                    let key = format!("authorization.providers[{i}]");
                    let Some(iss) = &p.issuer else {
                        return Err(self.err(
                            &format!("{key}.issuer"),
                            "missing: with several providers each is chosen by the token's iss",
                        ));
                    };
                    if !issuers.insert(iss.clone()) {
                        return Err(self.err(
                            &format!("{key}.issuer"),
                            &format!("issuer {iss:?} appears twice"),
                        ));
                    }
                    out.push(self.provider(
                        &key,
                        p,
                        a.allow_weak_secret.unwrap_or(false),
                        a.jwks_fetch_minutes,
                    )?);
                }
                out
            }
            None => {
                let p = RawProvider {
                    issuer: a.issuer.clone(),
                    secret: a.secret.clone(),
                    jwks_url: a.jwks_url.clone(),
                    audience: a.audience.clone(),
                    algorithm: a.algorithm.clone(),
                    jwks_fetch_minutes: None,
                    jwks_max_staleness_minutes: a.jwks_max_staleness_minutes,
                    jwks_refetch_min_seconds: a.jwks_refetch_min_seconds,
                };
                vec![self.provider(
                    "authorization",
                    &p,
                    a.allow_weak_secret.unwrap_or(false),
                    a.jwks_fetch_minutes,
                )?]
            }
        };
        let claims = match &a.claims {
            None => ClaimsConfig::default(),
            Some(c) => {
                let d = ClaimsConfig::default();
                ClaimsConfig {
                    actor: c.actor.clone().map(|v| v.into_vec()).unwrap_or(d.actor),
                    subject: c.subject.clone().map(|v| v.into_vec()).unwrap_or(d.subject),
                    workflow: c
                        .workflow
                        .clone()
                        .map(|v| v.into_vec())
                        .unwrap_or(d.workflow),
                }
            }
        };
        let leeway = a.leeway_seconds.unwrap_or(60);
        if leeway > MAX_LEEWAY_SECONDS {
            return Err(self.err(
                &k("leeway-seconds"),
                &format!("{leeway} is more than {MAX_LEEWAY_SECONDS} seconds (one day)"),
            ));
        }
        Ok(JwtConfig {
            providers,
            leeway: Duration::from_secs(leeway),
            max_token_lifetime: a
                .max_token_lifetime_minutes
                .map(|m| self.minutes(&k("max-token-lifetime-minutes"), m))
                .transpose()?,
            token_cache_size: a.token_cache_size.unwrap_or(100_000),
            claims,
        })
    }

    pub(super) fn provider(
        &self,
        key: &str,
        p: &RawProvider,
        allow_weak_secret: bool,
        default_fetch_minutes: Option<u64>,
    ) -> Result<JwtProviderConfig, ConfigError> {
        let k = |s: &str| format!("{key}.{s}");
        let alg_text = p.algorithm.as_deref().ok_or_else(|| {
            self.err(
                &k("algorithm"),
                "missing: name the signature algorithm the tokens use (e.g. hs256, rs256, es256)",
            )
        })?;
        let algorithm = parse_algorithm(alg_text).ok_or_else(|| {
            self.err(
                &k("algorithm"),
                &format!(
                    "unknown algorithm {alg_text:?} (expected one of hs256, hs384, hs512, rs256, rs384, rs512, ps256, ps384, ps512, es256, es384, eddsa)"
                ),
            )
        })?;
        let is_hmac = matches!(
            algorithm,
            jsonwebtoken::Algorithm::HS256
                | jsonwebtoken::Algorithm::HS384
                | jsonwebtoken::Algorithm::HS512
        );
        let key_at = k(if p.secret.is_some() {
            "secret"
        } else {
            "jwks-url"
        });
        let mut key_file = None;
        let key_source = match (&p.secret, &p.jwks_url) {
            (Some(_), Some(_)) => {
                return Err(self.err(key, "give exactly one of secret or jwks-url, not both"))
            }
            (None, None) => return Err(self.err(
                key,
                "needs a key: secret (a file with the HMAC secret or a PEM public key) or jwks-url",
            )),
            (Some(secret), None) => {
                let path = self.readable_file(&k("secret"), secret)?;
                key_file = Some(path.clone());
                let bytes = std::fs::read(&path).map_err(|e| {
                    self.err(
                        &k("secret"),
                        &format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                if is_hmac {
                    // BuildGrid strips surrounding whitespace from the secret file.
                    let text = String::from_utf8_lossy(&bytes);
                    let trimmed = text.trim().as_bytes().to_vec();
                    if trimmed.is_empty() {
                        return Err(self.err(&k("secret"), &format!("{} is empty", path.display())));
                    }
                    JwtKeyConfig::Secret(trimmed)
                } else {
                    if !bytes.starts_with(b"-----BEGIN")
                        && !String::from_utf8_lossy(&bytes)
                            .trim_start()
                            .starts_with("-----BEGIN")
                    {
                        return Err(self.err(
                            &k("secret"),
                            &format!(
                                "{} is not a PEM public key, which algorithm {alg_text} needs",
                                path.display()
                            ),
                        ));
                    }
                    JwtKeyConfig::PublicKeyPem(bytes)
                }
            }
            (None, Some(urls)) => {
                if is_hmac {
                    return Err(self.err(
                        &k("jwks-url"),
                        &format!("algorithm {alg_text} is HMAC; a JWKS publishes public keys (use secret:)"),
                    ));
                }
                let urls = urls.clone().into_vec();
                if urls.is_empty() {
                    return Err(self.err(&k("jwks-url"), "is empty"));
                }
                // Which URLs a key set may be fetched from is the verifier's
                // rule (gate::jwks::check_url), checked when the Gate is built.
                if let Some(minutes) = p.jwks_fetch_minutes.or(default_fetch_minutes) {
                    if minutes == 0 {
                        return Err(self.err(&k("jwks-fetch-minutes"), "must be at least 1"));
                    }
                }
                JwtKeyConfig::Jwks {
                    urls,
                    refresh: p
                        .jwks_fetch_minutes
                        .or(default_fetch_minutes)
                        .map(|m| self.minutes(&k("jwks-fetch-minutes"), m))
                        .transpose()?,
                    max_staleness: p
                        .jwks_max_staleness_minutes
                        .map(|m| self.minutes(&k("jwks-max-staleness-minutes"), m))
                        .transpose()?,
                    min_refetch_interval: p.jwks_refetch_min_seconds.map(Duration::from_secs),
                }
            }
        };
        let audiences = p.audience.clone().map(|a| a.into_vec()).unwrap_or_default();
        if audiences.iter().any(|a| a.is_empty()) {
            return Err(self.err(&k("audience"), "contains an empty audience"));
        }
        Ok(JwtProviderConfig {
            name: p.issuer.clone().unwrap_or_else(|| "default".to_string()),
            issuer: p.issuer.clone(),
            algorithms: vec![algorithm],
            key: key_source,
            audiences,
            allow_weak_secret,
            key_at,
            key_file,
        })
    }
}
