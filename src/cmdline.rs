//! What the subcommands (`run`, `check`, `call`, `bench`) share: loading the
//! config with the right exit code, and duration arguments. Kept apart from
//! `cli` so the subcommands' modules depend on it, not on each other.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::{Config, Env, LoggingConfig};
use crate::ipl::EX_USAGE;

/// `500ms`, `5s`, `2m`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 5s, 500ms)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("duration {s:?} is too long")),
        _ => Err(format!("bad duration unit in {s:?} (ms, s or m)")),
    }
}

/// IPL step 1: config. Errors are printed plainly (logging is not up yet).
pub fn load_config(dir: &std::path::Path) -> Result<Config, ExitCode> {
    let env = Env::from_env().map_err(|e| {
        eprintln!("beds: {e}");
        ExitCode::from(EX_USAGE)
    })?;
    Config::load(dir, env).map_err(|e| {
        eprintln!(
            "beds: config ({}/beds.toml, env {}): {e}",
            dir.display(),
            env.as_str()
        );
        ExitCode::from(EX_USAGE)
    })
}

/// Config for the one-shot commands, which log only warnings.
pub fn load_quiet(dir: &std::path::Path) -> Result<Config, ExitCode> {
    let config = load_config(dir)?;
    // lapin logs the client connection's own closing races as errors after
    // the answer is in; the commands report their own failures.
    crate::logging::init(&LoggingConfig {
        level: "warn,lapin=off".into(),
        journald: false,
    });
    Ok(config)
}
