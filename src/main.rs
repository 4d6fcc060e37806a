//! The `beds` binary: parse the command line, then hand over to `cli::run`.

use clap::Parser;

/// Stack reserved for every thread (virtual memory, committed only as used).
/// AMQP header tables are parsed (lapin's IO thread) and freed (runtime
/// workers) recursively; a client can nest them as deep as one frame allows
/// (~20,000 levels), which overflows the default 2 MiB and would abort the
/// process on every redelivery.
const MIN_STACK: &str = "268435456";

fn main() -> std::process::ExitCode {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // Before any thread exists: std reads it once, at the first spawn.
        std::env::set_var("RUST_MIN_STACK", MIN_STACK);
    }
    beds::cli::run(beds::cli::Cli::parse())
}
