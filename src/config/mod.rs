//! The configuration model: a YAML file whose `server:`, `authorization:`,
//! `monitoring:`, `server-reflection` and `grpc-compression` sections take
//! BuildGrid's own keys, plus gridgate's `instances:`, `build-events:`,
//! `limits:` and `web:`.
//!
//! Loading happens in two steps. The document is parsed and BuildGrid's tags are
//! resolved ([`yaml`]), then deserialized into the `Raw*` types, which refuse
//! unknown keys and wrong types with the key path at fault. [`Config::from_raw`]
//! then checks what types cannot (files exist, addresses parse, settings that
//! contradict each other) and produces the validated [`Config`]. Relative paths
//! are taken from the directory of the config file.
//!
//! Every error is a [`ConfigError`] that names the file, the key path and the
//! reason, e.g. `gridgate.yaml: server[0].credentials.tls-server-key: cannot
//! read certs/server.key: No such file or directory`.

mod authorization;
mod build_events;
mod instances;
mod limits;
mod load;
mod model;
mod monitoring;
mod raw;
mod server;
mod validate;
mod web;
pub mod yaml;

pub use model::*;
pub use validate::parse_algorithm;

use std::fmt;

/// The config `gridgate serve` runs when no `--config` is given: plaintext on
/// loopback, authorization `none`, in-memory stores.
pub const DEFAULT_CONFIG: &str = include_str!("default.yaml");

/// The name shown for the embedded default config in messages.
pub const DEFAULT_CONFIG_NAME: &str = "<embedded default config>";

/// A configuration error: which file, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file (or `<embedded default config>`).
    pub file: String,
    /// The key path, e.g. `server[0].credentials.tls-server-cert`; empty for the whole document.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests;
