//! BuildGrid 0.4.4 as a real upstream for tests: installed on first use into a
//! cache directory (`$GRIDGATE_TEST_CACHE`, else `~/.cache/gridgate-tests`)
//! with `python3 -m venv` and `pip install buildgrid==0.4.4`, then started as
//! `bgd server start CONFIG` on a free loopback port with an in-memory CAS and
//! action cache, no authorization, and the instance names asked for.
//!
//! When Python or the package index is not available, [`BuildGrid::start`]
//! returns `None` after printing why, so the test can skip; with `CI` set it
//! panics instead, so CI cannot pass without having run the test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `bgd server`.
pub(crate) struct BuildGrid {
    child: Child,
    /// Its loopback port (plaintext).
    pub port: u16,
    _dir: tempfile::TempDir,
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GRIDGATE_TEST_CACHE") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("gridgate-tests")
}

/// Skips (returns None) or, with `CI` set, fails.
fn unavailable<T>(why: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
        panic!("BuildGrid 0.4.4 is needed for this test and could not be set up: {why}");
    }
    eprintln!(
        "SKIPPED: BuildGrid 0.4.4 could not be set up ({why}); set CI=1 to make this a failure"
    );
    None
}

/// BuildGrid's own command-line client (`bgd cas`, `bgd actioncache`, ...),
/// installed on first use; `None` if it cannot be set up outside CI.
pub(crate) fn bgd_client() -> Option<BgdClient> {
    match bgd() {
        Ok(exe) => Some(BgdClient { exe }),
        Err(e) => unavailable(&e),
    }
}

/// The `bgd` executable of the cached venv.
pub(crate) struct BgdClient {
    pub exe: PathBuf,
}

/// What one `bgd` run did.
#[derive(Debug)]
pub(crate) struct BgdOutput {
    /// Exit code (`bgd` exits 255 on errors).
    pub code: i32,
    /// stdout and stderr, in that order.
    pub text: String,
}

impl BgdOutput {
    pub(crate) fn ok(&self) -> bool {
        self.code == 0
    }
}

impl BgdClient {
    /// Runs `bgd GROUP COMMON_ARGS... ARGS...` in `cwd` (up to 120 s), e.g.
    /// `run(dir, "cas", &["--remote", url, ...], &["upload-file", "f"])`.
    pub(crate) fn run(
        &self,
        cwd: &std::path::Path,
        group: &str,
        common: &[String],
        args: &[&str],
    ) -> BgdOutput {
        let child = Command::new(&self.exe)
            .arg(group)
            .args(common)
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bgd");
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(out) => out.expect("bgd output"),
            Err(_) => {
                let _ = Command::new("kill").arg(pid.to_string()).status();
                panic!("bgd {group} {args:?} did not finish within 120 s");
            }
        };
        BgdOutput {
            code: out.status.code().unwrap_or(-1),
            text: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

/// The `bgd` executable, installing it on first use.
fn bgd() -> Result<PathBuf, String> {
    let venv = cache_dir().join("venv");
    let bgd = venv.join("bin").join("bgd");
    if bgd.is_file() {
        return Ok(bgd);
    }
    std::fs::create_dir_all(cache_dir())
        .map_err(|e| format!("cannot create {}: {e}", cache_dir().display()))?;
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{what}: cannot run: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ))
        }
    };
    eprintln!("installing BuildGrid 0.4.4 into {} (once)", venv.display());
    run(
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
        "python3 -m venv",
    )?;
    run(
        Command::new(venv.join("bin").join("pip")).args(["install", "-q", "buildgrid==0.4.4"]),
        "pip install buildgrid==0.4.4",
    )?;
    if bgd.is_file() {
        Ok(bgd)
    } else {
        Err(format!("{} missing after install", bgd.display()))
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn config(port: u16, instances: &[&str]) -> String {
    let mut s = format!(
        r#"server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
authorization:
  method: none
monitoring:
  enabled: false
storages:
  - !lru-storage &cas-storage
    size: 256M
caches:
  - !lru-action-cache &ac
    storage: *cas-storage
    max-cached-refs: 10000
    allow-updates: true
    cache-failed-actions: true
instances:
"#
    );
    for name in instances {
        s.push_str(&format!(
            "  - name: \"{name}\"\n    services:\n      - !cas\n        storage: *cas-storage\n      - !bytestream\n        storage: *cas-storage\n      - !action-cache\n        cache: *ac\n"
        ));
    }
    s.push_str("thread-pool-size: 20\n");
    s
}

impl BuildGrid {
    /// Starts BuildGrid serving `instances`; `None` if it cannot be set up
    /// outside CI.
    pub(crate) fn start(instances: &[&str]) -> Option<BuildGrid> {
        let bgd = match bgd() {
            Ok(b) => b,
            Err(e) => return unavailable(&e),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let cfg = dir.path().join("bgd.yml");
        std::fs::write(&cfg, config(port, instances)).expect("write bgd config");
        let log = std::fs::File::create(dir.path().join("bgd.log")).expect("log file");
        let child = Command::new(&bgd)
            .args(["server", "start"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => return unavailable(&format!("cannot start {}: {e}", bgd.display())),
        };
        let mut bg = BuildGrid {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = bg.child.try_wait() {
                let log =
                    std::fs::read_to_string(bg._dir.path().join("bgd.log")).unwrap_or_default();
                panic!("bgd exited with {status}; log:\n{log}");
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(bg);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("bgd did not listen on 127.0.0.1:{port} within 60 s");
    }

    /// `grpc://127.0.0.1:PORT`.
    pub(crate) fn address(&self) -> String {
        format!("grpc://127.0.0.1:{}", self.port)
    }
}

impl Drop for BuildGrid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
