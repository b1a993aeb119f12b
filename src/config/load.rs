//! Loading a config: the document parsed, BuildGrid's tags resolved, the
//! `Raw*` types deserialized, then every section validated into [`Config`],
//! and the summary `gridgate check-config` prints.

use std::collections::HashSet;
use std::path::Path;

use super::model::*;
use super::raw::*;
use super::validate::Validator;
use super::{yaml, ConfigError, DEFAULT_CONFIG, DEFAULT_CONFIG_NAME};

impl Config {
    /// Loads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: name.clone(),
            key: String::new(),
            reason: format!("cannot read the config file: {e}"),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Config::parse(&text, &name, base)
    }

    /// The embedded default config.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME, Path::new("."))
    }

    /// Parses and validates a config document; `name` is used in errors and
    /// relative paths are resolved against `base`.
    pub fn parse(text: &str, name: &str, base: &Path) -> Result<Config, ConfigError> {
        let err = |key: String, reason: String| ConfigError {
            file: name.to_string(),
            key,
            reason,
        };
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("line {} column {}: ", l.line(), l.column()))
                .unwrap_or_default();
            err(String::new(), format!("{at}invalid YAML: {e}"))
        })?;
        if doc.is_null() {
            return Err(err(String::new(), "the config is empty".into()));
        }
        if let Some(map) = doc.as_mapping() {
            for key in BUILDGRID_SERVICE_KEYS {
                if map.contains_key(key) {
                    return Err(err(
                        key.to_string(),
                        "is a BuildGrid service definition; gridgate declares its stores and \
                         upstreams under instances: and build-events: (see the README's config reference). \
                         Keep only server:, authorization:, monitoring:, server-reflection and grpc-compression \
                         from a BuildGrid config"
                            .to_string(),
                    ));
                }
            }
        }
        let doc = yaml::resolve_tags(doc, "", base).map_err(|(k, r)| err(k, r))?;
        let raw: RawConfig = serde_path_to_error::deserialize(doc).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { String::new() } else { key };
            err(key, e.into_inner().to_string())
        })?;
        Config::from_raw(raw, name, base)
    }

    fn from_raw(raw: RawConfig, name: &str, base: &Path) -> Result<Config, ConfigError> {
        let v = Validator {
            file: name.to_string(),
            base: base.to_path_buf(),
        };
        let mut ignored = Vec::new();
        if let Some(n) = raw.thread_pool_size {
            ignored.push((
                "thread-pool-size".to_string(),
                format!("{n}: gridgate runs on an async runtime; use limits.max-concurrent-streams to bound concurrency"),
            ));
        }
        if raw.grpc_server_options.is_some() {
            ignored.push((
                "grpc-server-options".to_string(),
                "C-core channel arguments do not apply; see the limits: section".to_string(),
            ));
        }

        if raw.server.is_empty() {
            return Err(v.err(
                "server",
                "at least one channel is needed, e.g. `- !channel { address: \"127.0.0.1:50051\", insecure-mode: true }`",
            ));
        }
        let channels = raw
            .server
            .iter()
            .enumerate()
            .map(|(i, c)| v.channel(&format!("server[{i}]"), c))
            .collect::<Result<Vec<_>, _>>()?;

        let authorization = v.authorization(raw.authorization.as_ref())?;
        if authorization.method == AuthMethod::None {
            for (i, c) in channels.iter().enumerate() {
                if !c.listen.is_local() && !c.allow_open {
                    return Err(v.err(
                        &format!("server[{i}].address"),
                        &format!(
                            "{} is reachable from other machines but authorization is `none`: \
                             configure authorization, or set `allow-open: true` on this channel \
                             to serve an open endpoint on purpose",
                            c.address
                        ),
                    ));
                }
            }
        }

        let monitoring = v.monitoring(raw.monitoring.as_ref())?;
        let compression = match raw.grpc_compression.as_deref() {
            None => Compression::None,
            Some(s) => match s.to_ascii_lowercase().as_str() {
                "nocompression" | "none" => Compression::None,
                "gzip" => Compression::Gzip,
                "deflate" => Compression::Deflate,
                "zstd" => Compression::Zstd,
                other => {
                    return Err(v.err(
                        "grpc-compression",
                        &format!(
                        "unknown value {other:?} (expected NoCompression, Gzip, Deflate or Zstd)"
                    ),
                    ))
                }
            },
        };

        let mut names = HashSet::new();
        let mut instances = Vec::new();
        for (i, inst) in raw.instances.iter().enumerate() {
            let key = format!("instances[{i}]");
            if !names.insert(inst.name.clone()) {
                return Err(v.err(
                    &format!("{key}.name"),
                    &format!("instance {:?} is declared twice", inst.name),
                ));
            }
            instances.push(v.instance(&key, inst)?);
        }
        for name in &authorization.allow_unauthenticated_instances {
            if !names.contains(name) && !raw.instances.is_empty() {
                ignored.push((
                    "authorization.allow-unauthenticated-instances".into(),
                    format!("{name:?} is not a declared instance"),
                ));
            }
        }

        let build_events = v.build_events(raw.build_events.as_ref())?;
        let build_events_limits = v.build_events_limits(raw.build_events.as_ref())?;
        let limits = v.limits(raw.limits.as_ref())?;
        let metrics = match &raw.metrics {
            None => None,
            Some(m) => Some(MetricsEndpointConfig {
                address: m.address.parse().map_err(|_| {
                    v.err(
                        "metrics.address",
                        &format!(
                            "{:?} is not an IP address and port (e.g. 127.0.0.1:9464)",
                            m.address
                        ),
                    )
                })?,
            }),
        };

        let web = v.web(raw.web.as_ref(), authorization.method)?;

        Ok(Config {
            source: name.to_string(),
            description: raw.description,
            channels,
            authorization,
            monitoring,
            server_reflection: raw.server_reflection.unwrap_or(true),
            compression,
            instances,
            build_events,
            build_events_limits,
            limits,
            metrics,
            web,
            ignored,
        })
    }

    /// A human-readable summary, printed by `gridgate check-config`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "config: {}", self.source);
        for c in &self.channels {
            let tls = match &c.tls {
                None => "plaintext".to_string(),
                Some(t) if t.client_ca.is_some() => format!(
                    "TLS, client certificates required (CA {})",
                    t.client_ca.as_deref().unwrap_or(Path::new("")).display()
                ),
                Some(_) => "TLS".to_string(),
            };
            let _ = writeln!(s, "listen: {} ({tls})", c.address);
        }
        if let Some(w) = &self.web {
            let tls = match (&w.tls, w.client_certificates) {
                (None, _) => "plaintext",
                (Some(_), ClientCertificates::Required) => "TLS, client certificates required",
                (Some(_), ClientCertificates::Optional) => "TLS, client certificates optional",
                (Some(_), ClientCertificates::Off) => "TLS",
            };
            let sign_in = match &w.oidc {
                Some(o) => format!(", OpenID Connect sign-in with {}", o.issuer),
                None => String::new(),
            };
            let _ = writeln!(
                s,
                "web: {} ({tls}{sign_in}); Bazel: --bes_results_url={}/invocation/",
                w.address,
                w.public_url.as_deref().unwrap_or("<web.public-url>")
            );
        }
        let a = &self.authorization;
        let method = match a.method {
            AuthMethod::None => "none (open endpoint)".to_string(),
            AuthMethod::Headers => "headers (trusted proxy)".to_string(),
            AuthMethod::Jwt => {
                let jwt = a.jwt.as_ref();
                let providers = jwt
                    .map(|j| {
                        j.providers
                            .iter()
                            .map(|p| {
                                let key = match &p.key {
                                    JwtKeyConfig::Secret(_) => "HMAC secret".to_string(),
                                    JwtKeyConfig::PublicKeyPem(_) => "PEM public key".to_string(),
                                    JwtKeyConfig::Jwks { urls, .. } => {
                                        format!("JWKS {}", urls.join(", "))
                                    }
                                };
                                let algs: Vec<String> =
                                    p.algorithms.iter().map(|a| format!("{a:?}")).collect();
                                format!("{} [{}; {key}]", p.name, algs.join(","))
                            })
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_default();
                format!("jwt: {providers}")
            }
        };
        let _ = writeln!(s, "authorization: {method}");
        if let Some(acl) = &a.acl_config {
            let _ = writeln!(
                s,
                "acl-config: {} ({} matching)",
                acl.display(),
                match a.acl_match {
                    AclMatch::Whole => "whole-value",
                    AclMatch::Prefix => "prefix (BuildGrid)",
                }
            );
        }
        if !a.allow_unauthenticated_instances.is_empty() {
            let _ = writeln!(
                s,
                "unauthenticated instances: {:?}",
                a.allow_unauthenticated_instances
            );
        }
        for i in &self.instances {
            let what = match &i.backend {
                InstanceBackend::Local { cas, action_cache } => {
                    let cas = match cas {
                        CasConfig::Memory { max_bytes } => format!("memory CAS {max_bytes} bytes"),
                        CasConfig::Disk { path, max_bytes } => {
                            format!("disk CAS {} {max_bytes} bytes", path.display())
                        }
                    };
                    format!(
                        "{cas}, action cache {}",
                        if action_cache.allow_updates {
                            "read-write"
                        } else {
                            "read-only"
                        }
                    )
                }
                InstanceBackend::Upstream(u) => format!("upstream {}", u.shown_address()),
            };
            let _ = writeln!(s, "instance {:?}: {what}", i.name);
        }
        let bes = match &self.build_events {
            BuildEventsConfig::Memory { max_bytes } => format!("memory ({max_bytes} bytes)"),
            BuildEventsConfig::File { path } => format!("file {}", path.display()),
            BuildEventsConfig::Postgres { .. } => "postgres".to_string(),
        };
        let _ = writeln!(
            s,
            "build events: {bes}, events up to {} bytes",
            self.build_events_limits.max_event_bytes
        );
        let _ = writeln!(
            s,
            "reflection: {}, compression: {:?}",
            if self.server_reflection { "on" } else { "off" },
            self.compression
        );
        for (k, note) in &self.ignored {
            let _ = writeln!(s, "note: {k}: {note}");
        }
        s
    }
}
