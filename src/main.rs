//! The `gridgate` binary: a thin shell over the library's command line.

use clap::Parser;

/// The allocator of the binary (the library leaves the choice to its user):
/// mimalloc's small-object path is several times cheaper than glibc's, and a
/// request through the gateway makes some 60 allocations.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gridgate::cli::run(gridgate::cli::Cli::parse())
}
