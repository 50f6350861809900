//! systemd's notify protocol for `metroblk node run` under `Type=notify` (`metroblk@.service`):
//! READY once the node serves (its control socket answers), STOPPING when it shuts down, and
//! the watchdog fed only while the control loop answers. Each is one datagram to
//! `$NOTIFY_SOCKET` (the `sd-notify` crate); without that variable nothing is sent.
//!
//! The watchdog is fed by a thread of its own that asks the node's own control socket for its
//! status every `WATCHDOG_USEC / 3`, and sends `WATCHDOG=1` only when the answer came: a node
//! whose control loop is stuck (and so cannot be operated) is restarted by systemd.

use std::path::PathBuf;
use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd the node serves, with a status line for `systemctl status`.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the node is shutting down.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Starts the watchdog thread when systemd asked for one (`WatchdogSec=`).
pub fn spawn_watchdog(control_socket: PathBuf) -> Result<(), String> {
    let Some(period) = sd_notify::watchdog_enabled() else { return Ok(()) };
    let every = (period / 3).max(Duration::from_millis(100));
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || loop {
            if crate::control::query_status(&control_socket).is_ok() {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
            std::thread::sleep(every);
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the watchdog thread: {e}"))
}
