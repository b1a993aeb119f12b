//! What every section's validation shares: the file and directory it is
//! read from, errors that name the file and the key, paths, durations.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ConfigError;

/// The longest duration a `*-minutes` key may give: 100 years.
pub(super) const MAX_MINUTES: u64 = 100 * 365 * 24 * 60;

/// The largest `leeway-seconds`: one day. The token checks compute `now - leeway`,
/// which a leeway beyond the current time would overflow.
pub(super) const MAX_LEEWAY_SECONDS: u64 = 86_400;

/// Checks raw sections and resolves paths; carries the file name for errors.
pub(super) struct Validator {
    pub(super) file: String,
    pub(super) base: PathBuf,
}

impl Validator {
    pub(super) fn err(&self, key: &str, reason: &str) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A duration given in minutes. More than [`MAX_MINUTES`] is refused: it would
    /// overflow (`minutes * 60`, and the clock arithmetic done with it).
    pub(super) fn minutes(&self, key: &str, minutes: u64) -> Result<Duration, ConfigError> {
        if minutes > MAX_MINUTES {
            return Err(self.err(
                key,
                &format!("{minutes} is more than {MAX_MINUTES} minutes (100 years)"),
            ));
        }
        Ok(Duration::from_secs(minutes * 60))
    }

    pub(super) fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// Resolves a path that must name a readable file.
    pub(super) fn readable_file(&self, key: &str, p: &str) -> Result<PathBuf, ConfigError> {
        let path = self.path(p);
        // Checked before opening: opening a FIFO would block.
        if path.exists() && !path.is_file() {
            return Err(self.err(key, &format!("{} is not a file", path.display())));
        }
        match std::fs::File::open(&path) {
            Ok(_) => Ok(path),
            Err(e) => Err(self.err(key, &format!("cannot read {}: {e}", path.display()))),
        }
    }
}

/// Parses BuildGrid's lower-case algorithm names (upper case accepted too).
pub fn parse_algorithm(s: &str) -> Option<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm::*;
    Some(match s.to_ascii_lowercase().as_str() {
        "hs256" => HS256,
        "hs384" => HS384,
        "hs512" => HS512,
        "rs256" => RS256,
        "rs384" => RS384,
        "rs512" => RS512,
        "ps256" => PS256,
        "ps384" => PS384,
        "ps512" => PS512,
        "es256" => ES256,
        "es384" => ES384,
        "eddsa" | "ed25519" => EdDSA,
        _ => return None,
    })
}
