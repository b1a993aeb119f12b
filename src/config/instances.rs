//! `instances:`: local CAS and ActionCache instances, and upstream ones.

use super::model::*;
use super::raw::*;
use super::validate::*;
use super::ConfigError;

impl Validator {
    pub(super) fn instance(
        &self,
        key: &str,
        i: &RawInstance,
    ) -> Result<InstanceConfig, ConfigError> {
        use crate::reapi::resource::RESERVED_SEGMENTS;
        if let Some(seg) = i.name.split('/').find(|s| RESERVED_SEGMENTS.contains(s)) {
            return Err(self.err(
                &format!("{key}.name"),
                &format!("instance names may not contain the segment {seg:?} (REAPI reserves it)"),
            ));
        }
        if i.name.starts_with('/') || i.name.ends_with('/') || i.name.contains("//") {
            return Err(self.err(
                &format!("{key}.name"),
                "instance names may not start or end with '/' or contain an empty segment",
            ));
        }
        let backend = match &i.upstream {
            Some(u) => {
                if i.cas.is_some() || i.action_cache.is_some() {
                    return Err(self.err(
                        &format!("{key}.upstream"),
                        "an upstream instance forwards everything: remove cas and action-cache",
                    ));
                }
                let k = format!("{key}.upstream");
                let (tls, rest) = if let Some(r) = u.address.strip_prefix("grpcs://") {
                    (true, r)
                } else if let Some(r) = u.address.strip_prefix("grpc://") {
                    (false, r)
                } else if let Some(r) = u.address.strip_prefix("https://") {
                    (true, r)
                } else if let Some(r) = u.address.strip_prefix("http://") {
                    (false, r)
                } else {
                    return Err(self.err(
                        &format!("{k}.address"),
                        &format!(
                            "{:?} needs a scheme: grpc://host:port (plaintext) or grpcs://host:port (TLS)",
                            without_userinfo(&u.address)
                        ),
                    ));
                };
                if rest.is_empty() || !rest.contains(':') {
                    return Err(self.err(&format!("{k}.address"), "needs host:port"));
                }
                if !tls && (u.tls_ca.is_some() || u.tls_client_cert.is_some()) {
                    return Err(self.err(
                        &format!("{k}.address"),
                        "TLS files are given but the address is plaintext grpc://; use grpcs://",
                    ));
                }
                if u.tls_client_cert.is_some() != u.tls_client_key.is_some() {
                    return Err(self.err(
                        &format!("{k}.tls-client-key"),
                        "tls-client-cert and tls-client-key go together",
                    ));
                }
                let file = |name: &str, v: &Option<String>| {
                    v.as_deref()
                        .map(|p| self.readable_file(&format!("{k}.{name}"), p))
                        .transpose()
                };
                for name in u.headers.keys() {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        return Err(
                            self.err(&format!("{k}.headers.{name}"), "is not a valid header name")
                        );
                    }
                }
                InstanceBackend::Upstream(UpstreamConfig {
                    address: u.address.clone(),
                    tls,
                    tls_ca: file("tls-ca", &u.tls_ca)?,
                    tls_client_cert: file("tls-client-cert", &u.tls_client_cert)?,
                    tls_client_key: file("tls-client-key", &u.tls_client_key)?,
                    headers: u.headers.clone(),
                    instance_name: u.instance_name.clone(),
                })
            }
            None => {
                let cas = match &i.cas {
                    None => CasConfig::Memory { max_bytes: 1 << 30 },
                    Some(c) => {
                        let max_bytes = c
                            .max_bytes
                            .as_ref()
                            .map(|s| s.bytes())
                            .transpose()
                            .map_err(|r| self.err(&format!("{key}.cas.max-bytes"), &r))?;
                        match c.backend.as_str() {
                            "memory" => {
                                if c.path.is_some() {
                                    return Err(self.err(
                                        &format!("{key}.cas.path"),
                                        "only applies to backend disk",
                                    ));
                                }
                                CasConfig::Memory {
                                    max_bytes: max_bytes.unwrap_or(1 << 30),
                                }
                            }
                            "disk" => CasConfig::Disk {
                                path: self.path(c.path.as_deref().ok_or_else(|| {
                                    self.err(
                                        &format!("{key}.cas.path"),
                                        "missing: backend disk needs a directory",
                                    )
                                })?),
                                max_bytes: max_bytes.unwrap_or(10 << 30),
                            },
                            other => {
                                return Err(self.err(
                                    &format!("{key}.cas.backend"),
                                    &format!("unknown backend {other:?} (expected memory or disk)"),
                                ))
                            }
                        }
                    }
                };
                let ac = i.action_cache.clone().unwrap_or_default();
                InstanceBackend::Local {
                    cas,
                    action_cache: ActionCacheConfig {
                        allow_updates: ac.allow_updates.unwrap_or(true),
                        max_entries: ac.max_entries.unwrap_or(1_000_000),
                    },
                }
            }
        };
        Ok(InstanceConfig {
            name: i.name.clone(),
            description: i.description.clone(),
            backend,
        })
    }
}
