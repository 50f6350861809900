//! Errors of the ublk frontend: each is one line that says what is wrong and, where the user
//! can fix it, how.

use libublk::UblkError;

use crate::driver::UBLK_CONTROL;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "ublk: {UBLK_CONTROL} is missing: load the ublk_drv module (modprobe ublk_drv; Linux 6.12 or newer with \
         CONFIG_BLK_DEV_UBLK)"
    )]
    DriverMissing,
    #[error("ublk: this kernel is Linux {release}; serving a ublk device needs Linux 6.12 or newer with ublk_drv")]
    KernelTooOld { release: String },
    #[error("ublk: cannot open {UBLK_CONTROL}: {reason} (serving a ublk device needs root or CAP_SYS_ADMIN)")]
    ControlNotUsable { reason: String },
    #[error("ublk: invalid device parameters: {0}")]
    Params(String),
    /// The device with this id exists but was not created for this target (its owner tag
    /// differs): it belongs to someone else.
    #[error(
        "ublk: /dev/ublkb{dev_id} already exists and belongs to another device (not created for this volume): \
         choose another ublk id"
    )]
    NotOurs { dev_id: i32 },
    #[error("ublk: /dev/ublkb{dev_id} is served by another running process (pid {pid})")]
    InUse { dev_id: i32, pid: i32 },
    #[error("ublk: /dev/ublkb{dev_id}: {message}")]
    Device { dev_id: i32, message: String },
    #[error("ublk: /dev/ublkb{dev_id}: {op} failed: {reason}")]
    Command { dev_id: i32, op: &'static str, reason: String },
    #[error("ublk: {op} failed: {reason}")]
    Setup { op: &'static str, reason: String },
    #[error("ublk: {0}")]
    Signals(String),
}

impl Error {
    pub(crate) fn command(dev_id: i32, op: &'static str, e: UblkError) -> Error {
        Error::Command { dev_id, op, reason: describe(&e) }
    }
}

/// libublk's error as text (its Display says "io_uring IO failure" without the errno).
pub(crate) fn describe(e: &UblkError) -> String {
    match e {
        UblkError::UringIOError(errno) | UblkError::OtherError(errno) => errno_text(*errno),
        UblkError::IOError(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// `-ENOENT` or `ENOENT` as "No such file or directory (os error 2)".
pub(crate) fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno.abs()).to_string()
}
