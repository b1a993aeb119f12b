//! The `gridgate` binary: a thin shell over the library's command line.

use clap::Parser;

fn main() -> std::process::ExitCode {
    gridgate::cli::run(gridgate::cli::Cli::parse())
}
