//! systemd's notify protocol for `syncd run` (a `Type=notify` unit): `READY=1` once the first
//! pass has run (or failed, and retry has begun), a `STATUS=` line per pass, and `WATCHDOG=1`
//! while the daemon makes progress, so a hung pass is caught. Without `NOTIFY_SOCKET` (not under
//! systemd) every call does nothing.
//!
//! Progress is what [`crate::progress::moves`] counts: each change the apply takes up, each
//! object the stream delivers, and every read, write or fetch charged to the throttles. The daemon's loop pings the watchdog when no pass runs, or when the running pass
//! moved the counter since the last ping; a pass stuck without progress for `WatchdogSec` is
//! stopped by systemd (and restarted, with `Restart=`). Only the main process may notify
//! (`NotifyAccess=main`, the default): a trigger's own notifications are ignored.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog (half of `WatchdogSec`), when systemd asks for it.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| (d / 2).max(Duration::from_millis(10)))
}
