//! The live policy: the ACL files as a [`Live`] value.
//!
//! The policy in force is swapped atomically (see [`crate::live`]): a request
//! is decided under the policy it took, new ones see the new one. With
//! `watch-policy` a change of the files reloads it; SIGHUP always does. A
//! reload that fails keeps the previous policy and logs the file, line and
//! reason.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::policy::{Policy, PolicyError, PolicyOptions};
use crate::live::{Live, Source};

/// The ACL file or directory, and how it is read.
pub struct PolicyFiles {
    path: PathBuf,
    options: PolicyOptions,
}

impl PolicyFiles {
    /// The ACL file or directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Source for PolicyFiles {
    type Value = Policy;
    type Error = PolicyError;
    const WHAT: &'static str = "policy";
    const RELOADED: &'static str = "policy reloaded";
    const FAILED: &'static str = "policy reload failed; keeping the previous policy";
    const VERSIONED: bool = true;

    fn load(&self) -> Result<Policy, PolicyError> {
        Policy::load(&self.path, &self.options)
    }

    fn files(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }

    fn version(&self, p: &Policy) -> String {
        p.version().to_string()
    }

    fn reloaded(&self, old: &Policy, new: Option<&Policy>) {
        match new {
            Some(p) => crate::metrics::policy_reload(true, old.version(), p.version()),
            None => crate::metrics::policy_reload(false, old.version(), old.version()),
        }
    }
}

/// The policy in force, replaceable at run time.
pub type LivePolicy = Live<PolicyFiles>;

/// Loads the policy at start (an invalid policy here is fatal); with
/// `follow_files` a change of the files reloads it.
pub fn load(
    path: &Path,
    options: PolicyOptions,
    follow_files: bool,
) -> Result<Arc<LivePolicy>, PolicyError> {
    Live::load(
        PolicyFiles {
            path: path.to_path_buf(),
            options,
        },
        "",
        follow_files,
    )
}
