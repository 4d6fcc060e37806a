//! `tracing` setup: human-readable console output on stderr, and the systemd
//! journal when configured. `RUST_LOG` overrides the configured level; the
//! configured level can be changed at run time ([`set_level`], on reload).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Layer, Registry};

use crate::config::LoggingConfig;

/// Swaps the filter of the installed subscriber.
static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber. Safe to call twice (tests): the second
/// call does nothing.
pub fn init(cfg: &LoggingConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
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
    if tracing_subscriber::registry()
        .with(filter)
        .with(console)
        .with(journald)
        .try_init()
        .is_ok()
    {
        let _ = LEVEL.set(handle);
    }
}

/// Applies a new `logging.level`. `RUST_LOG`, when set, keeps winning (it
/// is the operator's override for this process); `Ok(false)` says so.
pub fn set_level(level: &str) -> Result<bool, String> {
    let filter = EnvFilter::try_new(level).map_err(|e| format!("logging.level {level:?}: {e}"))?;
    if std::env::var_os("RUST_LOG").is_some() {
        return Ok(false);
    }
    match LEVEL.get() {
        Some(h) => h.reload(filter).map(|_| true).map_err(|e| e.to_string()),
        None => Ok(false),
    }
}
