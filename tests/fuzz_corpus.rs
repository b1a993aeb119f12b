//! Replays the kept fuzz corpus on the stable toolchain.
//!
//! Every file in `tests/fuzz/seeds/<target>/` goes through the same check the
//! cargo-fuzz target `<target>` runs (`gridgate::fuzzing::<target>`), so the
//! crashes found by fuzzing stay fixed and the hand-written seeds keep working.
//! A missing or empty seed directory fails the test: it must not pass by
//! replaying nothing. See `tests/fuzz/README.md`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long one input may take here (the fuzzers run with `-timeout=10`).
const SLOW: Duration = Duration::from_secs(10);

fn seeds(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no seeds", dir.display());
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    for file in seeds(target) {
        let data = std::fs::read(&file).unwrap();
        let started = Instant::now();
        if let Err(panic) = std::panic::catch_unwind(|| check(&data)) {
            eprintln!("{target}: {} fails", file.display());
            std::panic::resume_unwind(panic);
        }
        let took = started.elapsed();
        assert!(took < SLOW, "{target}: {} took {took:?}", file.display());
    }
}

#[test]
fn token() {
    replay("token", gridgate::fuzzing::token);
}

#[test]
fn frame() {
    replay("frame", gridgate::fuzzing::frame);
}

#[test]
fn resource_name() {
    replay("resource_name", gridgate::fuzzing::resource_name);
}

#[test]
fn policy() {
    replay("policy", gridgate::fuzzing::policy);
}

#[test]
fn config() {
    replay("config", gridgate::fuzzing::config);
}
