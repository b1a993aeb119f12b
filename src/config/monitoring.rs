//! `monitoring:` (BuildGrid's StatsD/JSON output) and `metrics:` (the
//! Prometheus endpoint).

use std::time::Duration;

use super::model::*;
use super::raw::*;
use super::validate::*;
use super::ConfigError;

impl Validator {
    pub(super) fn monitoring(
        &self,
        m: Option<&RawMonitoring>,
    ) -> Result<MonitoringConfig, ConfigError> {
        let d = RawMonitoring::default();
        let m = m.unwrap_or(&d);
        let endpoint_type = m.endpoint_type.clone().unwrap_or_else(|| "stdout".into());
        if !["stdout", "file", "socket", "udp", "silent"].contains(&endpoint_type.as_str()) {
            return Err(self.err(
                "monitoring.endpoint-type",
                &format!("unknown value {endpoint_type:?} (expected stdout, file, socket, udp or silent)"),
            ));
        }
        let format = m
            .serialization_format
            .clone()
            .unwrap_or_else(|| "statsd".into());
        match format.as_str() {
            "statsd" | "json" => {}
            "binary" => {
                return Err(self.err(
                    "monitoring.serialization-format",
                    "binary (BuildGrid's protobuf monitoring records) is not supported; use statsd or json",
                ))
            }
            other => {
                return Err(self.err(
                    "monitoring.serialization-format",
                    &format!("unknown value {other:?} (expected statsd or json)"),
                ))
            }
        }
        let tag_format = m.tag_format.clone().unwrap_or_else(|| "none".into());
        if !["none", "influx-statsd", "dogstatsd", "graphite"].contains(&tag_format.as_str()) {
            return Err(self.err(
                "monitoring.tag-format",
                &format!("unknown value {tag_format:?} (expected none, influx-statsd, dogstatsd or graphite)"),
            ));
        }
        if matches!(endpoint_type.as_str(), "file" | "socket" | "udp")
            && m.endpoint_location.is_none()
            && m.enabled.unwrap_or(false)
        {
            return Err(self.err(
                "monitoring.endpoint-location",
                &format!("missing: endpoint-type {endpoint_type} needs a location"),
            ));
        }
        if let (true, "udp", Some(location)) = (
            m.enabled.unwrap_or(false),
            endpoint_type.as_str(),
            m.endpoint_location.as_deref(),
        ) {
            let port_ok = location
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(self.err(
                    "monitoring.endpoint-location",
                    &format!("{location:?} is not host:port (e.g. 127.0.0.1:8125)"),
                ));
            }
        }
        let mut prefix = m.metric_prefix.clone().unwrap_or_default();
        while prefix.ends_with('.') {
            prefix.pop();
        }
        if !prefix.is_empty() {
            prefix.push('.');
        }
        Ok(MonitoringConfig {
            enabled: m.enabled.unwrap_or(false),
            endpoint_type,
            endpoint_location: m.endpoint_location.clone(),
            serialization_format: format,
            metric_prefix: prefix,
            tag_format,
            additional_tags: m.additional_tags.clone().unwrap_or_default(),
            period: Duration::from_secs(m.period_seconds.unwrap_or(5).max(1)),
        })
    }
}
