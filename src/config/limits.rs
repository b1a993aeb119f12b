//! `limits:`: connection, request and message limits.

use std::time::Duration;

use super::model::*;
use super::raw::*;
use super::validate::*;
use super::ConfigError;

impl Validator {
    pub(super) fn limit_bytes(
        &self,
        key: &str,
        v: Option<&Size>,
        default: usize,
    ) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(size) => {
                let n = size.bytes().map_err(|r| self.err(key, &r))?;
                usize::try_from(n).map_err(|_| self.err(key, "is too large"))
            }
        }
    }

    pub(super) fn limits(&self, l: Option<&RawLimits>) -> Result<LimitsConfig, ConfigError> {
        let d = LimitsConfig::default();
        let Some(l) = l else { return Ok(d) };
        let secs = |v: Option<u64>, dflt: Duration| v.map(Duration::from_secs).unwrap_or(dflt);
        let out = LimitsConfig {
            shutdown_grace: secs(l.shutdown_grace_seconds, d.shutdown_grace),
            tls_handshake_timeout: secs(l.tls_handshake_timeout_seconds, d.tls_handshake_timeout),
            max_concurrent_streams: l.max_concurrent_streams.unwrap_or(d.max_concurrent_streams),
            max_header_list_size: l.max_header_list_bytes.unwrap_or(d.max_header_list_size),
            max_frame_size: l.max_frame_bytes.unwrap_or(d.max_frame_size),
            keepalive_interval: secs(l.keepalive_interval_seconds, d.keepalive_interval),
            keepalive_timeout: secs(l.keepalive_timeout_seconds, d.keepalive_timeout),
            max_message_bytes: l.max_message_bytes.unwrap_or(d.max_message_bytes),
            max_concurrent_requests: l
                .max_concurrent_requests
                .unwrap_or(d.max_concurrent_requests),
            max_connections: l.max_connections.unwrap_or(d.max_connections),
            first_message_timeout: secs(l.first_message_timeout_seconds, d.first_message_timeout),
            idle_connection_timeout: secs(
                l.idle_connection_timeout_seconds,
                d.idle_connection_timeout,
            ),
            max_pending_bytes: self.limit_bytes(
                "limits.max-pending-bytes",
                l.max_pending_bytes.as_ref(),
                d.max_pending_bytes,
            )?,
            max_pending_bytes_per_connection: self.limit_bytes(
                "limits.max-pending-bytes-per-connection",
                l.max_pending_bytes_per_connection.as_ref(),
                d.max_pending_bytes_per_connection,
            )?,
            anonymous_share_percent: l
                .anonymous_share_percent
                .unwrap_or(d.anonymous_share_percent),
            max_instance_name_bytes: l
                .max_instance_name_bytes
                .unwrap_or(d.max_instance_name_bytes),
        };
        if out.idle_connection_timeout.is_zero() {
            return Err(self.err(
                "limits.idle-connection-timeout-seconds",
                "must be at least 1",
            ));
        }
        if !(1..=100).contains(&out.anonymous_share_percent) {
            return Err(self.err(
                "limits.anonymous-share-percent",
                &format!(
                    "must be between 1 and 100, not {}",
                    out.anonymous_share_percent
                ),
            ));
        }
        if !(1..=65536).contains(&out.max_instance_name_bytes) {
            return Err(self.err(
                "limits.max-instance-name-bytes",
                &format!(
                    "must be between 1 and 65536, not {}",
                    out.max_instance_name_bytes
                ),
            ));
        }
        if out.max_pending_bytes < out.max_message_bytes {
            return Err(self.err(
                "limits.max-pending-bytes",
                &format!(
                    "{} is less than limits.max-message-bytes ({}): no first message could be read",
                    out.max_pending_bytes, out.max_message_bytes
                ),
            ));
        }
        if out.max_pending_bytes_per_connection < out.max_message_bytes {
            return Err(self.err(
                "limits.max-pending-bytes-per-connection",
                &format!(
                    "{} is less than limits.max-message-bytes ({}): no first message could be read",
                    out.max_pending_bytes_per_connection, out.max_message_bytes
                ),
            ));
        }
        if out.first_message_timeout.is_zero() {
            return Err(self.err("limits.first-message-timeout-seconds", "must be at least 1"));
        }
        if out.max_concurrent_requests == 0 {
            return Err(self.err("limits.max-concurrent-requests", "must be at least 1"));
        }
        if out.max_connections == 0 {
            return Err(self.err("limits.max-connections", "must be at least 1"));
        }
        if out.max_concurrent_streams == 0 {
            return Err(self.err("limits.max-concurrent-streams", "must be at least 1"));
        }
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&out.max_frame_size) {
            return Err(self.err(
                "limits.max-frame-bytes",
                &format!(
                    "must be between {MIN_FRAME_BYTES} and {MAX_FRAME_BYTES} \
                     (HTTP/2's limits for SETTINGS_MAX_FRAME_SIZE), not {}",
                    out.max_frame_size
                ),
            ));
        }
        if out.tls_handshake_timeout.is_zero() {
            return Err(self.err("limits.tls-handshake-timeout-seconds", "must be at least 1"));
        }
        Ok(out)
    }
}
