//! `tracing` setup: human-readable console output on stderr, and the systemd
//! journal when configured. `RUST_LOG` overrides the configured level.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::LoggingConfig;

/// Installs the global subscriber. Safe to call twice (tests): the second
/// call does nothing.
pub fn init(cfg: &LoggingConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let console = fmt::layer().with_writer(std::io::stderr).with_target(false);
    let journald = if cfg.journald {
        match tracing_journald::layer() {
            Ok(l) => Some(l.boxed()),
            Err(e) => {
                eprintln!("journald unavailable ({e}); logging to the console only");
                None
            }
        }
    } else {
        None
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(console)
        .with(journald)
        .try_init();
}
