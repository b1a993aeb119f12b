//! Settings loaded from files and replaced while gridgate serves: the one
//! reload mechanism, used by the ACL policy and by every TLS channel.
//!
//! A [`Live<S>`] holds the value its [`Source`] loaded, as an `Arc` swapped
//! atomically: a user takes its own reference (a request is decided under one
//! policy, a handshake uses one certificate), so what is in flight finishes
//! with what it started with while new work sees the new value. A reload that
//! fails (a half-written file, a key that does not match its certificate) is
//! logged with the file and reason, and the previous value is kept.
//!
//! [`spawn_reloader`] is the one place reloads are triggered: SIGHUP reloads
//! everything; every second the files' fingerprint (path, size and modification
//! time of each, a directory's entries included, so it works for editors that
//! replace files) is compared and a changed value is reloaded, for the values
//! that follow their files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

/// What a [`Live`] value is loaded from.
pub trait Source: Send + Sync + 'static {
    /// The loaded value.
    type Value: Send + Sync + 'static;
    /// Why loading failed (logged, with the file).
    type Error: std::fmt::Display;

    /// What it is, for log lines: `policy`, `TLS`.
    const WHAT: &'static str;
    /// The log message of a reload that took.
    const RELOADED: &'static str;
    /// The log message of a reload that failed (the error follows it).
    const FAILED: &'static str;

    /// Loads the value from the files.
    fn load(&self) -> Result<Self::Value, Self::Error>;

    /// The files (or directories) it is loaded from.
    fn files(&self) -> Vec<PathBuf>;

    /// A short version of a value for log lines (a policy's version, a
    /// certificate's path).
    fn version(&self, value: &Self::Value) -> String;

    /// Whether [`Source::version`] changes with the contents, so that a
    /// reload to the same version is only worth a debug line.
    const VERSIONED: bool = false;

    /// Told after every reload attempt (`new` is `None` when it failed), for metrics.
    fn reloaded(&self, _old: &Self::Value, _new: Option<&Self::Value>) {}
}

/// A fingerprint of files: (path, size, modification time) of each.
type Stamp = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    let mut files = Vec::new();
    let mut push = |p: &Path| {
        if let Ok(m) = std::fs::metadata(p) {
            files.push((p.to_path_buf(), m.len(), m.modified().ok()));
        }
    };
    for path in paths {
        if path.is_dir() {
            if let Ok(entries) = std::fs::read_dir(path) {
                for e in entries.flatten() {
                    push(&e.path());
                }
            }
        } else {
            push(path);
        }
    }
    files.sort();
    files
}

/// A value loaded from files, replaceable at run time.
pub struct Live<S: Source> {
    source: S,
    /// A name for log lines (a channel's address); empty when there is one.
    name: String,
    /// Whether a change of the files reloads it (SIGHUP always does).
    follow_files: bool,
    current: RwLock<Arc<S::Value>>,
    stamp: Mutex<Stamp>,
}

impl<S: Source> Live<S> {
    /// Loads the value at start; an error here is the caller's to report.
    pub fn load(source: S, name: &str, follow_files: bool) -> Result<Arc<Live<S>>, S::Error> {
        let stamp = stamp(&source.files());
        let value = source.load()?;
        Ok(Arc::new(Live {
            source,
            name: name.to_string(),
            follow_files,
            current: RwLock::new(Arc::new(value)),
            stamp: Mutex::new(stamp),
        }))
    }

    /// The value in force now.
    pub fn current(&self) -> Arc<S::Value> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What it is loaded from.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// Loads the files again; on success the new value replaces the old one.
    pub fn reload(&self) -> Result<Arc<S::Value>, S::Error> {
        let value = Arc::new(self.source.load()?);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = value.clone();
        Ok(value)
    }

    /// Whether the files changed since the last look (and records them).
    fn changed(&self) -> bool {
        let now = stamp(&self.source.files());
        let mut last = self.stamp.lock().unwrap_or_else(PoisonError::into_inner);
        if *last == now {
            return false;
        }
        *last = now;
        true
    }

    fn reload_and_log(&self, trigger: Trigger) {
        let old = self.current();
        let before = self.source.version(&old);
        let result = self.reload();
        self.source
            .reloaded(&old, result.as_ref().ok().map(|v| &**v));
        let what = S::WHAT;
        let trigger = trigger.as_str();
        let name = self.name.as_str();
        match result {
            Ok(new) => {
                let version = self.source.version(&new);
                if S::VERSIONED && version == before {
                    tracing::debug!(what, name, trigger, "{what} unchanged");
                } else {
                    tracing::info!(
                        what,
                        name,
                        version = %version,
                        previous = %before,
                        trigger,
                        "{}",
                        S::RELOADED
                    );
                }
            }
            Err(e) => tracing::error!(
                what,
                name,
                version = %before,
                trigger,
                "{}: {e}",
                S::FAILED
            ),
        }
    }
}

/// A [`Live`] value of any kind, as the reloader sees it.
pub trait Reload: Send + Sync {
    /// Reloads on SIGHUP; on a poll, when the files changed and it follows them.
    fn check(&self, trigger: Trigger);
}

impl<S: Source> Reload for Live<S> {
    fn check(&self, trigger: Trigger) {
        // `changed` also records the files' state for the next poll.
        let changed = self.changed();
        match trigger {
            Trigger::Sighup => self.reload_and_log(trigger),
            Trigger::Poll if changed && self.follow_files => self.reload_and_log(trigger),
            Trigger::Poll => {}
        }
    }
}

/// Why files are looked at again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The poll interval passed: reload what changed.
    Poll,
    /// SIGHUP: reload everything now.
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

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_secs(1);

/// Reloads `values` on SIGHUP and when their files change, until the task is
/// aborted. With nothing to reload it still takes SIGHUP (which would
/// otherwise end the process) and says so.
pub fn spawn_reloader(values: Vec<Arc<dyn Reload>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hup_signal = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let trigger = tokio::select! {
                _ = tick.tick() => Trigger::Poll,
                _ = hup_signal => Trigger::Sighup,
            };
            if trigger == Trigger::Sighup && values.is_empty() {
                tracing::info!("SIGHUP: nothing to reload (no policy files, no TLS channel)");
            }
            for v in &values {
                v.check(trigger);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Text(PathBuf);

    impl Source for Text {
        type Value = String;
        type Error = String;
        const WHAT: &'static str = "text";
        const RELOADED: &'static str = "text reloaded";
        const FAILED: &'static str = "text reload failed";
        fn load(&self) -> Result<String, String> {
            let t = std::fs::read_to_string(&self.0).map_err(|e| e.to_string())?;
            if t.starts_with("bad") {
                return Err(format!("{}: bad", self.0.display()));
            }
            Ok(t)
        }
        fn files(&self) -> Vec<PathBuf> {
            vec![self.0.clone()]
        }
        fn version(&self, v: &String) -> String {
            v.clone()
        }
    }

    #[test]
    fn follows_files_keeps_the_old_value_on_failure_and_reloads_on_sighup() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("t");
        std::fs::write(&path, "one").unwrap();
        let live = Live::load(Text(path.clone()), "", true).unwrap();
        live.check(Trigger::Poll);
        assert_eq!(*live.current(), "one");
        std::fs::write(&path, "two!").unwrap();
        live.check(Trigger::Poll);
        assert_eq!(*live.current(), "two!");
        std::fs::write(&path, "bad file").unwrap();
        live.check(Trigger::Poll);
        assert_eq!(*live.current(), "two!", "a failed reload keeps the value");

        let fixed = Live::load(Text(path.clone()), "", false);
        assert!(fixed.is_err(), "a bad file at start is an error");
        std::fs::write(&path, "three").unwrap();
        let fixed = Live::load(Text(path.clone()), "", false).unwrap();
        std::fs::write(&path, "four!").unwrap();
        fixed.check(Trigger::Poll);
        assert_eq!(
            *fixed.current(),
            "three",
            "not following files: only SIGHUP"
        );
        fixed.check(Trigger::Sighup);
        assert_eq!(*fixed.current(), "four!");
    }
}
