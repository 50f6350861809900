//! `metroblk resync` and `metroblk resume-alone`: operator commands sent to a running node's
//! control socket. `resync --wait` follows the progress: a bar on a terminal, a plain line
//! every few seconds otherwise.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::{Keys, NodeConfig};
use crate::control::{self, ControlRequest, VolumeStatus};
use crate::resync::SyncState;

/// What `metroblk resync` was asked to do.
#[derive(Debug, Default)]
pub struct ResyncArgs {
    pub full: bool,
    pub checksum: bool,
    pub discard_local: bool,
    pub rate: Option<u64>,
    pub wait: bool,
}

fn socket_of(config: &Path) -> Result<std::path::PathBuf, String> {
    Ok(NodeConfig::load_with(config, Keys::Skip).map_err(|e| e.to_string())?.control_socket)
}

fn volume_status(socket: &Path, volume: &str) -> Result<VolumeStatus, String> {
    let s = control::query_status(&socket.to_path_buf())?;
    s.volumes.into_iter().find(|v| v.name == volume).ok_or_else(|| format!("the node has no volume '{volume}'"))
}

pub fn resume_alone(config: &Path, volume: &str) -> Result<String, String> {
    let socket = socket_of(config)?;
    let req = ControlRequest { command: "resume-alone".into(), volume: Some(volume.into()), ..Default::default() };
    let answer = control::request(&socket, &req)?;
    Ok(answer.get("ok").and_then(|v| v.as_str()).unwrap_or("done").to_string())
}

/// `metroblk switchover`: asks the primary to hand its role to the peer.
pub fn switchover(config: &Path, volume: &str) -> Result<String, String> {
    let socket = socket_of(config)?;
    let req = ControlRequest { command: "switchover".into(), volume: Some(volume.into()), ..Default::default() };
    let answer = control::request(&socket, &req)?;
    Ok(answer.get("ok").and_then(|v| v.as_str()).unwrap_or("done").to_string())
}

/// `metroblk promote` / `demote` (no witness): asks the node, then waits until the volume
/// serves in its new role (or the node says why not).
pub fn change_role(config: &Path, volume: &str, promote: bool, force: bool) -> Result<String, String> {
    let socket = socket_of(config)?;
    let command = if promote { "promote" } else { "demote" };
    let req = ControlRequest { command: command.into(), volume: Some(volume.into()), force, ..Default::default() };
    let answer = control::request(&socket, &req)?;
    let text = answer.get("ok").and_then(|v| v.as_str()).unwrap_or("requested").to_string();
    let want = if promote { crate::config::Role::Primary } else { crate::config::Role::Secondary };
    wait_for_role(&socket, volume, want, text)
}

/// Waits until `volume` serves as `want` (after an operator's role change), or says why not.
fn wait_for_role(socket: &Path, volume: &str, want: crate::config::Role, text: String) -> Result<String, String> {
    let deadline = std::time::Instant::now() + crate::lifecycle::CLOSE_MAX + ROLE_CHANGE_OPEN_MAX;
    loop {
        let status = control::query_status(&socket.to_path_buf())?;
        if status.volumes.iter().any(|v| v.name == volume && v.role == want) {
            return Ok(format!("{text}\nvolume {volume}: {want} now"));
        }
        if let Some(n) = status.not_serving.iter().find(|n| n.name == volume && n.state == "failed") {
            return Err(format!("volume {volume}: {}", n.error.as_deref().unwrap_or("failed")));
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "volume {volume}: not {want} after {} s (see status and the node's log)",
                (crate::lifecycle::CLOSE_MAX + ROLE_CHANGE_OPEN_MAX).as_secs()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// How long `promote`/`demote` give the new role to open after the old one closed.
const ROLE_CHANGE_OPEN_MAX: std::time::Duration = std::time::Duration::from_secs(10);

pub fn resync(config: &Path, volume: &str, args: &ResyncArgs) -> Result<(), String> {
    let socket = socket_of(config)?;
    let req = ControlRequest {
        command: "resync".into(),
        volume: Some(volume.into()),
        full: args.full,
        discard_local: args.discard_local,
        rate: args.rate,
        checksum: args.checksum,
        force: false,
    };
    let answer = control::request(&socket, &req)?;
    let text = answer.get("ok").and_then(|v| v.as_str()).unwrap_or("requested").to_string();
    if args.discard_local && text.contains("becomes secondary") {
        // A primary is demoted first (its device deleted), then resynced from the peer.
        println!("{}", wait_for_role(&socket, volume, crate::config::Role::Secondary, text)?);
    } else {
        println!("{text}");
    }
    if !args.wait {
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    let mut last_line = Instant::now() - Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let v = volume_status(&socket, volume)?;
        match v.sync_state {
            SyncState::SyncSource | SyncState::SyncTarget => {
                let pct = v.resync_percent.unwrap_or(0.0);
                let rate = v.resync_rate_bps.unwrap_or(0.0) / (1 << 20) as f64;
                let eta = v.resync_eta_s.map_or("-".to_string(), |e| format!("{e:.0} s"));
                if tty {
                    let filled = (pct / 100.0 * 40.0) as usize;
                    print!(
                        "\r[{}{}] {pct:5.1}%  {} B left  {rate:.1} MiB/s  eta {eta}   ",
                        "#".repeat(filled.min(40)),
                        " ".repeat(40 - filled.min(40)),
                        v.resync_bytes_left.unwrap_or(0)
                    );
                    let _ = std::io::stdout().flush();
                } else if last_line.elapsed() >= Duration::from_secs(3) {
                    println!(
                        "resync {pct:.1}% done, {} B left, {rate:.1} MiB/s, eta {eta}",
                        v.resync_bytes_left.unwrap_or(0)
                    );
                    last_line = Instant::now();
                }
            }
            // In sync, and nothing asked for or due is still to run (this command's own request
            // included: the sync link takes it up within half a second).
            SyncState::InSync if !v.resync_pending && !v.alone => {
                if tty {
                    println!();
                }
                println!(
                    "volume {volume}: in sync ({} B resynced since the node started, {} B of them as zero ranges)",
                    v.resynced_bytes, v.resynced_zero_bytes
                );
                return Ok(());
            }
            SyncState::SplitBrain | SyncState::Refused => {
                return Err(format!(
                    "volume {volume}: {}: {}",
                    v.sync_state,
                    v.sync_message.unwrap_or_else(|| "see the node's log".into())
                ));
            }
            _ => {}
        }
    }
}

/// `metroblk verify`: compares every region's hash with the peer's (online: applications keep
/// writing), waits for the result, and prints how many regions differed. Differing regions are
/// marked dirty and resynced at once.
pub fn verify(config: &Path, volume: &str) -> Result<u64, String> {
    let socket = socket_of(config)?;
    // The request is taken at the sync link's next tick; a result from an earlier verify
    // must not be taken for this one. Each verify records the request count it started at, so
    // one that started after this count was read answers (one that starts between this read
    // and the request below also does: it began a moment before the request). Waiting to see
    // it running first, as before, hung for good when a small volume's verify ran start to
    // finish between two polls.
    let before = volume_status(&socket, volume)?.verify.map_or(0, |vi| vi.request);
    let req = ControlRequest { command: "verify".into(), volume: Some(volume.into()), ..Default::default() };
    control::request(&socket, &req)?;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let v = volume_status(&socket, volume)?;
        match v.verify {
            Some(vi) if vi.request > before && vi.failed => {
                return Err(format!(
                    "volume {volume}: verify failed after {} regions (see the log)",
                    vi.regions_checked
                ))
            }
            Some(vi) if vi.request > before && vi.done => {
                println!(
                    "volume {volume}: {} regions checked, {} differ{}",
                    vi.regions_checked,
                    vi.regions_differing,
                    if vi.regions_differing > 0 { " (marked out of sync; a resync copies them)" } else { "" }
                );
                return Ok(vi.regions_differing);
            }
            _ => {}
        }
    }
}
