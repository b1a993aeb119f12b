//! The live policy and its hot reload.
//!
//! The policy in force is an `Arc<Policy>` swapped atomically: a request takes
//! its own reference when it is decided, so in-flight requests finish under the
//! policy they started with while new ones see the new one. A reload happens
//! when the ACL files change (checked every second by size and modification
//! time, so it works for a single file, a directory, and editors that replace
//! files) or on SIGHUP. A reload that fails keeps the previous policy and logs
//! the file, line and reason.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use super::policy::{Policy, PolicyError, PolicyOptions};

/// The policy in force, replaceable at run time.
pub struct LivePolicy {
    path: PathBuf,
    options: PolicyOptions,
    current: RwLock<Arc<Policy>>,
}

/// A fingerprint of the ACL files: (path, size, mtime) of each.
type Stamp = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn stamp(path: &Path) -> Stamp {
    let mut files = Vec::new();
    let mut push = |p: PathBuf| {
        if let Ok(m) = std::fs::metadata(&p) {
            files.push((p, m.len(), m.modified().ok()));
        }
    };
    if path.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            for e in entries.flatten() {
                push(e.path());
            }
        }
    } else {
        push(path.to_path_buf());
    }
    files.sort();
    files
}

impl LivePolicy {
    /// Loads the policy at start; an invalid policy here is fatal.
    pub fn load(path: &Path, options: PolicyOptions) -> Result<Arc<LivePolicy>, PolicyError> {
        let policy = Policy::load(path, &options)?;
        Ok(Arc::new(LivePolicy {
            path: path.to_path_buf(),
            options,
            current: RwLock::new(Arc::new(policy)),
        }))
    }

    /// The policy in force now.
    pub fn current(&self) -> Arc<Policy> {
        match self.current.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Loads the files again; on success the new policy replaces the old one.
    pub fn reload(&self) -> Result<Arc<Policy>, PolicyError> {
        let policy = Arc::new(Policy::load(&self.path, &self.options)?);
        let mut slot = match self.current.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *slot = policy.clone();
        Ok(policy)
    }

    fn reload_and_log(&self, why: &str) {
        let old = self.current().version().to_string();
        let result = self.reload();
        match &result {
            Ok(p) => crate::metrics::policy_reload(true, &old, p.version()),
            Err(_) => crate::metrics::policy_reload(false, &old, &old),
        }
        match result {
            Ok(p) if p.version() != old => tracing::info!(
                path = %self.path.display(),
                version = p.version(),
                previous = %old,
                trigger = why,
                "policy reloaded"
            ),
            Ok(_) => tracing::debug!(trigger = why, "policy unchanged"),
            Err(e) => tracing::error!(
                trigger = why,
                version = %old,
                "policy reload failed; keeping the previous policy: {e}"
            ),
        }
    }

    /// Reloads on SIGHUP and, with `poll`, when the files change, until the
    /// returned task is aborted.
    pub fn spawn_watcher(self: &Arc<Self>, poll: Option<Duration>) -> tokio::task::JoinHandle<()> {
        let live = self.clone();
        tokio::spawn(async move {
            let mut triggers = Triggers::new(poll);
            let mut last = stamp(&live.path);
            loop {
                let trigger = triggers.next().await;
                let now = stamp(&live.path);
                if trigger == Trigger::Sighup || now != last {
                    last = now;
                    live.reload_and_log(trigger.as_str());
                }
            }
        })
    }
}

/// Why files are looked at again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The poll interval passed: reload if the files changed.
    Poll,
    /// SIGHUP: reload now.
    Sighup,
}

impl Trigger {
    /// For log lines: `file change` or `SIGHUP`.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Poll => "file change",
            Trigger::Sighup => "SIGHUP",
        }
    }
}

/// SIGHUP and, optionally, a poll interval: what file-backed settings (policy
/// files, TLS certificates) reload on.
pub struct Triggers {
    hup: Option<tokio::signal::unix::Signal>,
    tick: Option<tokio::time::Interval>,
}

impl Triggers {
    /// Listens for SIGHUP from now on; polls every `poll` when given.
    pub fn new(poll: Option<Duration>) -> Triggers {
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let tick = poll.map(|p| {
            let mut tick = tokio::time::interval(p);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        Triggers { hup, tick }
    }

    /// Waits for the next SIGHUP or poll tick.
    pub async fn next(&mut self) -> Trigger {
        let hup = async {
            match self.hup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        let tick = async {
            match self.tick.as_mut() {
                Some(t) => t.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick => Trigger::Poll,
            _ = hup => Trigger::Sighup,
        }
    }
}
