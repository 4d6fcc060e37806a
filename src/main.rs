//! The `beds` binary: parse the command line, then hand over to `cli::run`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    beds::cli::run(beds::cli::Cli::parse())
}
