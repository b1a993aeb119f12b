//! Bazel 2.1.0 as a real remote-cache client in tests, fetched on first use
//! with `npm pack @bazel/bazel-linux_x64@2.1.0` into
//! `$GRIDGATE_TEST_CACHE/bazel-2.1.0` (else `~/.cache/gridgate-tests/bazel-2.1.0`),
//! and a throwaway [`Workspace`] to build in.
//!
//! When Bazel cannot be had (no npm, not x86_64 Linux, the fetch fails),
//! [`bazel_binary`] panics when `CI` is set, and otherwise returns `None` after
//! printing why, so the test skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const PACKAGE: &str = "@bazel/bazel-linux_x64@2.1.0";
const TARBALL: &str = "bazel-bazel-linux_x64-2.1.0.tgz";
const BINARY: &str = "bazel-2.1.0-linux-x86_64";

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GRIDGATE_TEST_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(std::env::temp_dir, PathBuf::from);
    home.join(".cache").join("gridgate-tests")
}

fn unavailable(why: &str) -> Option<PathBuf> {
    if std::env::var_os("CI").is_some() {
        panic!("Bazel 2.1.0 is needed for this test and could not be set up: {why}");
    }
    eprintln!("SKIPPED: Bazel 2.1.0 could not be set up ({why}); set CI=1 to make this a failure");
    None
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The Bazel 2.1.0 binary, fetched on first use.
pub(crate) fn bazel_binary() -> Option<PathBuf> {
    if !(cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")) {
        return unavailable("the npm package is for x86_64 Linux");
    }
    let dir = cache_dir().join("bazel-2.1.0");
    let binary = dir.join("package").join(BINARY);
    if is_executable(&binary) {
        return Some(binary);
    }
    match fetch(&dir) {
        Ok(()) if is_executable(&binary) => Some(binary),
        Ok(()) => unavailable(&format!("{} missing after unpacking", binary.display())),
        Err(why) => unavailable(&why),
    }
}

/// `npm pack` and unpack in a private directory, then rename it into place, so
/// that tests fetching at the same time never see half a download.
fn fetch(dir: &Path) -> Result<(), String> {
    let parent = dir.parent().ok_or("no cache directory")?;
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let work = parent.join(format!(".bazel-fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd
            .current_dir(&work)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{what}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    eprintln!(
        "fetching Bazel 2.1.0 (npm pack {PACKAGE}) into {}",
        dir.display()
    );
    run(Command::new("npm").args(["pack", PACKAGE]), "npm pack")?;
    run(Command::new("tar").args(["xzf", TARBALL]), "tar")?;
    run(
        Command::new("chmod")
            .arg("+x")
            .arg(work.join("package").join(BINARY)),
        "chmod",
    )?;
    let _ = std::fs::remove_file(work.join(TARBALL));
    match std::fs::rename(&work, dir) {
        Ok(()) => Ok(()),
        Err(_) if is_executable(&dir.join("package").join(BINARY)) => {
            // Another test got there first.
            let _ = std::fs::remove_dir_all(&work);
            Ok(())
        }
        Err(e) => Err(format!("moving into {}: {e}", dir.display())),
    }
}

/// What one Bazel command did.
#[derive(Debug)]
pub(crate) struct BazelOutput {
    pub code: i32,
    /// stdout then stderr (Bazel reports progress and results on stderr).
    pub text: String,
}

impl BazelOutput {
    /// The counts of Bazel's `INFO: N processes: ...` summary: the total and
    /// each kind (`remote cache hit`, `linux-sandbox`, `local`, ...).
    pub(crate) fn processes(&self) -> Option<(u64, Vec<(u64, String)>)> {
        let line = self
            .text
            .lines()
            .find(|l| l.starts_with("INFO: ") && l.contains(" process"))?;
        let rest = line.strip_prefix("INFO: ")?;
        let (total, kinds) = rest.split_once(':').unwrap_or((rest, ""));
        let total = total.split_whitespace().next()?.parse().ok()?;
        let kinds = kinds
            .trim()
            .trim_end_matches('.')
            .split(',')
            .filter_map(|k| {
                let (n, what) = k.trim().split_once(' ')?;
                Some((n.parse().ok()?, what.to_string()))
            })
            .collect();
        Some((total, kinds))
    }
}

/// A Bazel workspace in a temporary directory, with its own output user root
/// and home directory; every command runs with `--batch` (no server left behind).
pub(crate) struct Workspace {
    pub bazel: PathBuf,
    dir: tempfile::TempDir,
}

impl Workspace {
    /// A workspace with an empty WORKSPACE file and this BUILD file.
    pub(crate) fn new(bazel: PathBuf, build: &str) -> Workspace {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["ws", "home", "root"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        std::fs::write(dir.path().join("ws/WORKSPACE"), "").expect("WORKSPACE");
        std::fs::write(dir.path().join("ws/BUILD"), build).expect("BUILD");
        Workspace { bazel, dir }
    }

    /// The workspace directory.
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.path().join("ws")
    }

    /// Runs `bazel --batch ... COMMAND ARGS...` in the workspace (10 minutes at most).
    pub(crate) fn run(&self, command: &str, args: &[&str]) -> BazelOutput {
        let root = self.dir.path().join("root");
        let child = Command::new(&self.bazel)
            .args([
                "--batch",
                "--nosystem_rc",
                "--nohome_rc",
                "--noworkspace_rc",
            ])
            .arg(format!("--output_user_root={}", root.display()))
            .arg(command)
            .args(args)
            .current_dir(self.path())
            .env("HOME", self.dir.path().join("home"))
            .env_remove("BAZELISK_SKIP_WRAPPER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bazel");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(out) => out.expect("bazel output"),
            Err(_) => {
                let _ = Command::new("kill").arg(pid.to_string()).status();
                panic!("bazel {command} {args:?} did not finish within 10 minutes");
            }
        };
        BazelOutput {
            code: out.status.code().unwrap_or(-1),
            text: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        // Bazel leaves read-only directories in its output base.
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
