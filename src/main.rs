//! The `gridgate` binary: a thin shell over the library's command line.

use clap::Parser;

/// With the `mimalloc` feature, the binary's allocator: its small-object path
/// is several times cheaper than glibc's (a unary call makes some 60
/// allocations), but large ByteStream writes are slower with it; see
/// `Cargo.toml`.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gridgate::cli::run(gridgate::cli::Cli::parse())
}
