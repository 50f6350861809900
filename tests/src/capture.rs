//! Runs a child process in its own process group, streams its output to stderr (so that
//! `cargo test -- --nocapture` shows it live) and collects it.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What a finished child left behind.
pub(crate) struct Captured {
    /// `None` when the child ran past its deadline and was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// How long to wait for output still buffered in the pipes after the child exited (a
/// background process the child left behind may hold them open; it is killed first).
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Runs `cmd` to completion or until `deadline`. Each stdout line is echoed to stderr with
/// `prefix`; stderr lines are echoed unchanged. At the deadline the process group gets SIGTERM
/// and, 10 s later, SIGKILL. When the child exits, what is left of its process group is killed.
pub(crate) fn run(mut cmd: Command, prefix: &'static str, deadline: Duration) -> Result<Captured> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    let pgid = child.id() as libc::pid_t;

    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let tx2 = tx.clone();
    thread::spawn(move || pump(stdout, prefix, true, tx));
    thread::spawn(move || pump(stderr, "", false, tx2));

    let start = Instant::now();
    let mut term_sent: Option<Instant> = None;
    let status = loop {
        if let Some(status) = child.try_wait().context("waitpid")? {
            break Some(status);
        }
        let now = Instant::now();
        match term_sent {
            None if now.duration_since(start) >= deadline => {
                kill_group(pgid, libc::SIGTERM);
                term_sent = Some(now);
            }
            Some(t) if now.duration_since(t) >= Duration::from_secs(10) => {
                kill_group(pgid, libc::SIGKILL);
                let _ = child.wait();
                break None;
            }
            _ => {}
        }
        thread::sleep(Duration::from_millis(20));
    };
    let status = if term_sent.is_some() { None } else { status };
    // Daemons a script started in the background must not outlive it (nor hold the pipes).
    kill_group(pgid, libc::SIGKILL);

    let mut out = String::new();
    let mut err = String::new();
    let drain_until = Instant::now() + DRAIN_GRACE;
    let mut open = 2;
    while open > 0 {
        let left = drain_until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((is_stdout, chunk)) => {
                if chunk.is_empty() {
                    open -= 1;
                } else if is_stdout {
                    out.push_str(&chunk);
                } else {
                    err.push_str(&chunk);
                }
            }
            Err(_) => break,
        }
    }
    Ok(Captured { status, stdout: out, stderr: err })
}

/// Reads lines until EOF, echoing and forwarding each; an empty message marks EOF.
fn pump(r: impl Read, prefix: &str, is_stdout: bool, tx: mpsc::Sender<(bool, String)>) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let mut line = String::from_utf8_lossy(&buf).into_owned();
                if !line.ends_with('\n') {
                    line.push('\n');
                }
                eprint!("{prefix}{line}");
                if tx.send((is_stdout, line)).is_err() {
                    break;
                }
            }
        }
    }
    let _ = tx.send((is_stdout, String::new()));
}

fn kill_group(pgid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; pgid is our child's own group.
    unsafe {
        libc::kill(-pgid, sig);
    }
}
