//! sd_notify (systemd `Type=notify` / `Type=notify-reload`): readiness,
//! human-readable status, watchdog pings, reload and stop. Each call is a
//! no-op when `NOTIFY_SOCKET` is unset (not under systemd), and a failure
//! to send is logged, never fatal: the node serves either way.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// A line `systemctl status` shows.
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// IPL is done (also ends a reload).
pub fn ready(line: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(line)]);
}

/// A reload starts. systemd ≥ 253 wants the monotonic time with it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading templates"),
        ]),
        Err(e) => tracing::debug!(error = %e, "no monotonic clock for RELOADING"),
    }
}

/// The drain starts.
pub fn stopping(line: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(line)]);
}

/// The node proved it works (see `health::probe`).
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often systemd wants a watchdog ping, if the unit sets `WatchdogSec`.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    sd_notify::watchdog_enabled()
}
