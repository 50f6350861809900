//! Where tests that need ublk run: natively when this machine's kernel has ublk_drv, else in
//! the QEMU VM of [`crate::vm`]. They are never skipped silently: when neither works the
//! test fails with what to install.
//!
//! `METROBLK_TEST_UBLK=native` or `=vm` forces one of the two (`auto`, the default, picks).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::capture;
use crate::vm::{self, VmRun};

/// The ublk control device.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";

/// Where a ublk test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UblkEnv {
    /// On this machine, with bash, as the current user.
    Native,
    /// In the QEMU VM (`tests/vm/run.sh`).
    Vm,
}

/// True when this machine can serve ublk devices: /dev/ublk-control exists and opens, or
/// `modprobe ublk_drv` succeeds and then it does.
pub fn native_ublk_available() -> bool {
    if control_usable() {
        return true;
    }
    let loaded = ["modprobe", "/usr/sbin/modprobe", "/sbin/modprobe"].iter().any(|m| {
        Command::new(m)
            .arg("ublk_drv")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !loaded {
        return false;
    }
    // devtmpfs creates the node at once; give udev-managed setups a moment too.
    for _ in 0..40 {
        if control_usable() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

fn control_usable() -> bool {
    Path::new(UBLK_CONTROL).exists()
        && OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(UBLK_CONTROL).is_ok()
}

/// Picks where ublk tests run (see the module docs for `METROBLK_TEST_UBLK`).
pub fn ublk_env() -> Result<UblkEnv> {
    match std::env::var("METROBLK_TEST_UBLK").as_deref() {
        Ok("native") => {
            if native_ublk_available() {
                Ok(UblkEnv::Native)
            } else {
                bail!("METROBLK_TEST_UBLK=native, but {UBLK_CONTROL} is missing and `modprobe ublk_drv` failed")
            }
        }
        Ok("vm") => Ok(UblkEnv::Vm),
        Ok("auto") | Ok("") | Err(_) => Ok(if native_ublk_available() { UblkEnv::Native } else { UblkEnv::Vm }),
        Ok(other) => bail!("METROBLK_TEST_UBLK={other}: expected native, vm or auto"),
    }
}

/// Runs `script` (bash) where ublk works: natively (in the workspace root, with the same
/// environment variables the VM gives, `METROBLK_IN_VM=0`) or else in the VM. Natively the
/// script runs as the current user, which must be allowed to open /dev/ublk-control, and what
/// it leaves running in its process group is killed when it exits.
///
/// `Err` when neither place can run it (the message says what to install), when it ran past
/// `timeout`, or when the VM failed; a failing script is `Ok` with a non-zero status.
pub fn run_with_ublk(script: &str, timeout: Duration) -> Result<VmRun> {
    match ublk_env()? {
        UblkEnv::Native => run_native(script, timeout),
        UblkEnv::Vm => {
            eprintln!(
                "ublk_env: no native ublk ({UBLK_CONTROL} missing, `modprobe ublk_drv` failed); running in the QEMU VM"
            );
            vm::run_script(script, timeout).map_err(|e| {
                e.context(
                    "this test needs ublk: this machine's kernel has no ublk_drv, so it ran in the QEMU VM, which \
                     failed. Either boot a kernel with ublk_drv (Linux >= 6.12, CONFIG_BLK_DEV_UBLK) or install \
                     what the VM needs: apt-get install qemu-system-x86 busybox-static cpio kmod xz-utils \
                     (tests/vm/prepare.sh installs these itself when run as root)",
                )
            })
        }
    }
}

fn run_native(script: &str, timeout: Duration) -> Result<VmRun> {
    let mut file = tempfile::Builder::new()
        .prefix("metroblk-native-")
        .suffix(".sh")
        .tempfile()
        .context("cannot create a temporary file for the script")?;
    file.write_all(script.as_bytes()).and_then(|()| file.flush()).context("cannot write the script")?;

    let mut cmd = Command::new("bash");
    // Like the VM's console: stderr and stdout in one stream.
    cmd.arg("-c").arg(r#"exec 2>&1; exec bash "$1""#).arg("metroblk-native").arg(file.path());
    cmd.current_dir(vm::workspace_root()).env("METROBLK_IN_VM", "0");
    for (k, v) in vm::script_env() {
        cmd.env(k, v);
    }
    let captured = capture::run(cmd, "native| ", timeout)?;
    let Some(status) = captured.status else {
        return Err(anyhow!(
            "the script ran past its timeout of {timeout:?} and was killed; its output ended with:\n{}",
            vm::tail(&captured.stdout, 40)
        ));
    };
    let status = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    });
    Ok(VmRun { status, output: captured.stdout })
}
