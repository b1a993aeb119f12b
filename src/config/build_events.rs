//! `build-events:`: the store, its limits and retention.

use std::time::Duration;

use super::model::*;
use super::raw::*;
use super::validate::*;
use super::ConfigError;

impl Validator {
    pub(super) fn build_events_limits(
        &self,
        b: Option<&RawBuildEvents>,
    ) -> Result<BuildEventsLimits, ConfigError> {
        let mut limits = BuildEventsLimits::default();
        if let Some(size) = b.and_then(|b| b.max_event_bytes.as_ref()) {
            let key = "build-events.max-event-bytes";
            let n = size.bytes().map_err(|r| self.err(key, &r))?;
            if !(1024..=(256 << 20)).contains(&n) {
                return Err(self.err(key, "must be between 1K and 256M"));
            }
            limits.max_event_bytes = n as usize;
        }
        if let Some(r) = b.and_then(|b| b.retention.as_ref()) {
            if let Some(a) = &r.max_age {
                let key = "build-events.retention.max-age";
                limits.max_age = parse_age(a).map_err(|e| self.err(key, &e))?;
            }
            if let Some(a) = &r.abandoned_after {
                let key = "build-events.retention.abandoned-after";
                limits.abandoned_after = parse_age(a).map_err(|e| self.err(key, &e))?;
            }
        }
        Ok(limits)
    }

    pub(super) fn build_events(
        &self,
        b: Option<&RawBuildEvents>,
    ) -> Result<BuildEventsConfig, ConfigError> {
        let Some(b) = b else {
            return Ok(BuildEventsConfig::Memory {
                max_bytes: 256 << 20,
            });
        };
        let max_bytes = b
            .max_bytes
            .as_ref()
            .map(|s| s.bytes())
            .transpose()
            .map_err(|r| self.err("build-events.max-bytes", &r))?;
        let store = match &b.store {
            None => RawStore::Name("memory".into()),
            Some(s) => s.clone(),
        };
        match store {
            RawStore::Name(n) if n == "memory" => Ok(BuildEventsConfig::Memory {
                max_bytes: max_bytes.unwrap_or(256 << 20),
            }),
            RawStore::Name(n) => Err(self.err(
                "build-events.store",
                &format!("unknown store {n:?} (expected memory, {{ file: PATH }} or {{ postgres: URL }})"),
            )),
            RawStore::File { file } => {
                if max_bytes.is_some() {
                    return Err(self.err("build-events.max-bytes", "only applies to the memory store"));
                }
                Ok(BuildEventsConfig::File { path: self.path(&file) })
            }
            RawStore::Postgres { postgres } => {
                if max_bytes.is_some() {
                    return Err(self.err("build-events.max-bytes", "only applies to the memory store"));
                }
                if !(postgres.starts_with("postgres://") || postgres.starts_with("postgresql://")) {
                    return Err(self.err(
                        "build-events.store.postgres",
                        "must be a postgres:// or postgresql:// URL",
                    ));
                }
                Ok(BuildEventsConfig::Postgres { url: postgres })
            }
        }
    }
}

/// An age such as `30d`, `12h`, `90m`, `45s` or `2w`; `none` is None.
pub(super) fn parse_age(text: &str) -> Result<Option<Duration>, String> {
    let t = text.trim();
    if t == "none" {
        return Ok(None);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not an age like 30d, 12h, 90m, 45s or none"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h, d or w")),
    };
    if n == 0 {
        return Err(format!("{text:?} is zero (write none to keep everything)"));
    }
    n.checked_mul(unit_secs)
        .filter(|s| *s <= 100 * 365 * 86_400)
        .map(|s| Some(Duration::from_secs(s)))
        .ok_or_else(|| format!("{text:?} is more than 100 years"))
}
