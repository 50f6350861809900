//! Is the kernel's ublk driver there and usable?
//!
//! ublk needs `ublk_drv` (CONFIG_BLK_DEV_UBLK) and, for what metroblk relies on (user
//! recovery with reissue, FUA and discard parameters, the ioctl-encoded commands), Linux 6.12
//! or newer. Without this check a missing driver would surface as an io_uring errno from deep
//! inside libublk; with it, it is one line that says what to do.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::Error;

/// The ublk control device.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";

/// The oldest kernel metroblk serves ublk devices on (what Debian 12's 6.12 kernels ship).
pub const MIN_KERNEL: (u32, u32) = (6, 12);

/// Checks that this machine can serve ublk devices: the kernel is new enough and
/// /dev/ublk-control exists (after trying `modprobe ublk_drv`) and opens.
pub fn check_driver() -> Result<(), Error> {
    let release = kernel_release();
    let control = Path::new(UBLK_CONTROL);
    if !control.exists() && kernel_is_new_enough(&release) != Some(false) {
        try_modprobe();
        // devtmpfs creates the node at once; udev-managed setups may take a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !control.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let open = if control.exists() {
        Some(OpenOptions::new().read(true).write(true).open(control).map(drop).map_err(|e| e.to_string()))
    } else {
        None
    };
    diagnose(&release, open)
}

/// The verdict for a kernel `release` and the outcome of opening /dev/ublk-control (`None`:
/// it does not exist). Separate from [`check_driver`] so every branch can be tested on any
/// machine.
pub fn diagnose(release: &str, control_open: Option<Result<(), String>>) -> Result<(), Error> {
    if kernel_is_new_enough(release) == Some(false) {
        return Err(Error::KernelTooOld { release: release.to_string() });
    }
    match control_open {
        None => Err(Error::DriverMissing),
        Some(Err(reason)) => Err(Error::ControlNotUsable { reason }),
        Some(Ok(())) => Ok(()),
    }
}

/// `Some(true)` when `release` (as `uname -r` prints it, e.g. "6.12.48+deb12-amd64") is at
/// least [`MIN_KERNEL`], `None` when it cannot be parsed (then the driver check decides).
pub fn kernel_is_new_enough(release: &str) -> Option<bool> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some((major, minor) >= MIN_KERNEL)
}

/// This kernel's release string (`uname -r`), or "unknown".
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain old data; uname fills it and we read NUL-terminated strings
    // from it only when it succeeded.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "unknown".into();
    }
    let bytes: Vec<u8> = uts.release.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn try_modprobe() {
    for m in ["modprobe", "/usr/sbin/modprobe", "/sbin/modprobe"] {
        let ok = Command::new(m)
            .arg("ublk_drv")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            tracing::info!("loaded the ublk_drv module");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MISSING: &str = "ublk: /dev/ublk-control is missing: load the ublk_drv module (modprobe ublk_drv; \
                           Linux 6.12 or newer with CONFIG_BLK_DEV_UBLK)";

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_is_new_enough("6.12.48+deb12-amd64"), Some(true));
        assert_eq!(kernel_is_new_enough("6.18.44-fc-v769"), Some(true));
        assert_eq!(kernel_is_new_enough("7.0.0"), Some(true));
        assert_eq!(kernel_is_new_enough("6.11.0-rc1"), Some(false));
        assert_eq!(kernel_is_new_enough("5.15.0-91-generic"), Some(false));
        assert_eq!(kernel_is_new_enough("weird"), None);
    }

    #[test]
    fn every_verdict_is_one_clear_line() {
        assert_eq!(diagnose("6.12.48", None).unwrap_err().to_string(), MISSING);
        let old = diagnose("6.1.0-28-amd64", Some(Ok(()))).unwrap_err().to_string();
        assert_eq!(
            old,
            "ublk: this kernel is Linux 6.1.0-28-amd64; serving a ublk device needs Linux 6.12 or newer with ublk_drv"
        );
        let denied = diagnose("6.12.48", Some(Err("Permission denied (os error 13)".into()))).unwrap_err().to_string();
        assert!(denied.starts_with("ublk: cannot open /dev/ublk-control: Permission denied"), "{denied}");
        assert!(diagnose("6.12.48", Some(Ok(()))).is_ok());
        for e in [MISSING.to_string(), old, denied] {
            assert!(!e.contains('\n'), "{e:?}");
        }
    }

    /// On a machine without ublk (like the development machines), the real check says so in
    /// one line instead of failing somewhere inside io_uring.
    #[test]
    fn this_machine_without_ublk_gets_the_clear_line() {
        match check_driver() {
            Ok(()) => eprintln!("this machine has ublk; nothing to check"),
            Err(e) => {
                let text = e.to_string();
                assert!(text.starts_with("ublk: "), "{text}");
                assert!(!text.contains('\n'), "{text:?}");
                if !Path::new(UBLK_CONTROL).exists() && kernel_is_new_enough(&kernel_release()) != Some(false) {
                    assert_eq!(text, MISSING);
                }
            }
        }
    }
}
