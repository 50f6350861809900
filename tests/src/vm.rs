//! Runs a bash script as root inside the metroblk test VM: QEMU (TCG) booting a stock Debian
//! 6.12 kernel, which has ublk_drv, over a read-only view of this machine's root filesystem.
//! See `tests/vm/README.md`.
//!
//! Inside the VM:
//! - the whole host filesystem is visible read-only at the same paths (so the binaries cargo
//!   built, e.g. `$METROBLK_BIN_DIR/metroblk`, run unchanged), except /tmp, /var/tmp, /run and
//!   /dev/shm, which are empty tmpfs: write scratch files there;
//! - ublk_drv, loop, ext4, xfs, veth and sch_netem are loaded; network namespaces work; `lo` is up;
//! - the script runs as root with bash, in the workspace root, with HOME=/root,
//!   `METROBLK_IN_VM=1`, `METROBLK_BIN_DIR` (the cargo profile dir holding the test's binaries),
//!   and `RUST_LOG`/`RUST_BACKTRACE` passed through when set; stdin is /dev/null, stdout and
//!   stderr go to the console, which is what [`VmRun::output`] holds.
//!
//! VM runs in one process are serialized (each VM wants the machine's CPUs).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::capture;

/// The result of a script that ran to completion (in the VM or natively).
#[derive(Debug, Clone)]
pub struct VmRun {
    /// The script's exit status (128 + N when a signal N ended it).
    pub status: i32,
    /// Everything the script wrote to stdout and stderr (plus any kernel message that made it
    /// to the console), with the harness's exit marker removed.
    pub output: String,
}

impl VmRun {
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// `Ok(self)` when the script exited 0, else an error that holds the end of its output.
    pub fn check(self) -> Result<Self> {
        if self.success() {
            Ok(self)
        } else {
            bail!("script exited with status {}; its output ended with:\n{}", self.status, tail(&self.output, 40))
        }
    }
}

/// Options of [`run_script_with`]; `VmOptions::new(timeout)` gives the defaults.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// How long the VM may run (boot included; the first `prepare.sh`, which downloads the
    /// kernel, is not counted). QEMU is killed when it runs out.
    pub timeout: Duration,
    /// Guest memory in MiB (default 2048).
    pub mem_mib: u32,
    /// Guest CPUs (default 2).
    pub cpus: u32,
    /// Extra environment variables for the script.
    pub env: Vec<(String, String)>,
    /// Test hook of the harness itself: the first `fail_boots` boots crash the kernel before
    /// the script starts, as a boot that dies under TCG would (run.sh retries up to 3 boots).
    pub fail_boots: u32,
}

impl VmOptions {
    pub fn new(timeout: Duration) -> Self {
        VmOptions { timeout, mem_mib: 2048, cpus: 2, env: Vec::new(), fail_boots: 0 }
    }
}

/// The console line the VM's init prints after the script: `METROBLK_VM_EXIT=<status>`.
const EXIT_MARKER: &str = "METROBLK_VM_EXIT=";

/// Exit status of run.sh when QEMU ran past the timeout.
const RUN_SH_TIMEOUT: i32 = 124;

/// Extra time the Rust side allows run.sh beyond the VM timeout: prepare.sh may download and
/// unpack the kernel package (about 100 MB) the first time.
const PREPARE_ALLOWANCE: Duration = Duration::from_secs(900);

static VM_LOCK: Mutex<()> = Mutex::new(());

/// One VM at a time on the machine, across test processes too: two TCG VMs on a small machine
/// slow each other until their timeouts fire, which reads as a product failure.
const VM_LOCK_FILE: &str = "/tmp/metroblk-vm.lock";

/// Takes the machine-wide VM lock (blocking); it is released when the file is dropped.
fn lock_machine_wide() -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(VM_LOCK_FILE)
        .with_context(|| format!("cannot open the VM lock file {VM_LOCK_FILE}"))?;
    loop {
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            return Ok(file);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).with_context(|| format!("cannot lock {VM_LOCK_FILE}"));
        }
    }
}

/// Runs `script` (bash) as root in a fresh VM with default options; see [`run_script_with`].
pub fn run_script(script: &str, timeout: Duration) -> Result<VmRun> {
    run_script_with(script, &VmOptions::new(timeout))
}

/// Runs `script` (bash) as root in a fresh VM and returns its exit status and output.
///
/// A VM that dies before the script starts (kernel panic or oops while booting, init failure)
/// is booted again by run.sh, up to 3 boots, and the output says so; a script that started is
/// never run twice. `Err` means the harness failed, not the script: the VM could not be
/// prepared or started, it died without reporting the script's status 3 boots in a row, or
/// it ran past the timeout. A script that fails is `Ok` with a non-zero [`VmRun::status`].
pub fn run_script_with(script: &str, opts: &VmOptions) -> Result<VmRun> {
    let run_sh = vm_dir().join("run.sh");
    if !run_sh.is_file() {
        bail!("VM harness {} is missing", run_sh.display());
    }
    let mut file = tempfile::Builder::new()
        .prefix("metroblk-vm-")
        .suffix(".sh")
        .tempfile()
        .context("cannot create a temporary file for the VM script")?;
    file.write_all(script.as_bytes()).and_then(|()| file.flush()).context("cannot write the VM script")?;

    let timeout_s = opts.timeout.as_secs_f64().ceil().max(1.0) as u64;
    let mut cmd = Command::new("bash");
    cmd.arg(&run_sh)
        .arg(file.path())
        .arg("--timeout")
        .arg(timeout_s.to_string())
        .arg("--mem")
        .arg(opts.mem_mib.to_string())
        .arg("--cpus")
        .arg(opts.cpus.to_string())
        .arg("--workdir")
        .arg(workspace_root())
        .arg("--fail-boots")
        .arg(opts.fail_boots.to_string());
    for (k, v) in script_env().into_iter().chain(opts.env.iter().cloned()) {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    cmd.env("METROBLK_VM_QUIET", "1");

    let _serialized = VM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let _machine_wide = lock_machine_wide()?;
    let captured = capture::run(cmd, "vm| ", Duration::from_secs(timeout_s) + PREPARE_ALLOWANCE)?;
    drop(_machine_wide);
    drop(_serialized);

    let rc = captured.status.and_then(|s| s.code());
    if let Some((status, output)) = split_exit_marker(&captured.stdout) {
        return Ok(VmRun { status, output });
    }
    let why = match (captured.status, rc) {
        (None, _) | (_, Some(RUN_SH_TIMEOUT)) => format!("the VM ran past its timeout of {timeout_s} s and was killed"),
        _ => format!(
            "the VM stopped without reporting the script's exit status ({} exited with {})",
            run_sh.display(),
            rc.map_or_else(|| "a signal".to_owned(), |c| c.to_string())
        ),
    };
    Err(anyhow!(
        "{why}\nharness messages:\n{}\nconsole output ended with:\n{}",
        tail(&captured.stderr, 20),
        tail(&captured.stdout, 40)
    ))
}

/// Finds the last `METROBLK_VM_EXIT=<n>` line; returns n and the output before it (without
/// the empty line the init prints ahead of the marker when the output ended with a newline).
fn split_exit_marker(console: &str) -> Option<(i32, String)> {
    let mut pos = 0;
    let mut found = None;
    for line in console.split_inclusive('\n') {
        if let Some(n) = line.trim_end().strip_prefix(EXIT_MARKER).and_then(|n| n.parse::<i32>().ok()) {
            found = Some((n, pos));
        }
        pos += line.len();
    }
    let (status, at) = found?;
    let mut output = console[..at].to_owned();
    if output.ends_with("\n\n") || output == "\n" {
        output.pop();
    }
    Some((status, output))
}

/// The environment every test script gets, in the VM and natively.
pub(crate) fn script_env() -> Vec<(String, String)> {
    let mut env = Vec::new();
    if let Some(dir) = bin_dir() {
        env.push(("METROBLK_BIN_DIR".to_owned(), dir.display().to_string()));
    }
    for k in ["RUST_LOG", "RUST_BACKTRACE"] {
        if let Ok(v) = std::env::var(k) {
            env.push((k.to_owned(), v));
        }
    }
    env
}

/// The workspace root (`/work/main` in a checkout there): scripts run in it.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `tests/vm`, where prepare.sh and run.sh live.
pub fn vm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm")
}

/// The cargo profile directory (`<target>/debug` or `<target>/release`) of the running test
/// binary, which holds the workspace's binaries (e.g. `metroblk`) once they are built.
pub fn bin_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Integration tests live in <profile>/deps; examples in <profile>/examples.
    if matches!(dir.file_name().and_then(|n| n.to_str()), Some("deps" | "examples")) {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// The last `n` lines of `s`.
pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_marker_is_split_off() {
        assert_eq!(split_exit_marker("a\nb\n\nMETROBLK_VM_EXIT=7\n"), Some((7, "a\nb\n".to_owned())));
        assert_eq!(split_exit_marker("a\nMETROBLK_VM_EXIT=0\n"), Some((0, "a\n".to_owned())));
        assert_eq!(split_exit_marker("\nMETROBLK_VM_EXIT=3\n"), Some((3, String::new())));
        assert_eq!(
            split_exit_marker("METROBLK_VM_EXIT=1\nx\n\nMETROBLK_VM_EXIT=2\n"),
            Some((2, "METROBLK_VM_EXIT=1\nx\n".to_owned()))
        );
        assert_eq!(split_exit_marker("booting\nMETROBLK_VM_ERROR: no 9p\n"), None);
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("1\n2\n3\n", 2), "2\n3");
        assert_eq!(tail("1", 5), "1");
    }
}
