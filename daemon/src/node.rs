//! `metroblk node run`: one node's daemon, in the foreground.
//!
//! The node is a list of groups (consistency groups; a volume in none is a group of one),
//! each with a life of its own (`lifecycle/`): one thread per group opens its volumes in
//! their role (the primary's ublk devices and links, the secondary's listeners), serves,
//! changes role when the witness says so, and stops. A role belongs to a group, never to the
//! node: one group's promotion, deposition, resignation or switchover touches no other
//! group's device, links, lease or I/O, and the process never restarts.
//! A volume that cannot be opened (missing disk, bad metadata) is `failed` in `status` while
//! the others serve; a node none of whose volumes could be opened exits with their errors.
//!
//! Shutdown: on SIGINT/SIGTERM every volume closes at once, each within
//! `lifecycle::CLOSE_MAX`. A primary stops and deletes its ublk device (clean shutdown),
//! unless the device is in use or requests wait (held for the peer, parked while fenced):
//! then it is left for recovery, as after `kill -9`: its I/O waits in the kernel and the next
//! `node run` recovers the device by its id and reissues it, so `/dev/ublkbN` never goes away
//! under a mounted filesystem. The id is the volume's `ublk_id`, or, when the driver picked
//! it, the one remembered in `<metadata_file>.ublk-id`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metroblk_ublk::TermSignals;

use crate::config::{NodeConfig, VolumeConfig};
use crate::control;
use crate::lifecycle::runner::{GroupRunner, NodeIdentity, SlotView};

/// Runs the node until SIGINT or SIGTERM. Returns early only on a start-up error.
pub fn run(cfg: NodeConfig) -> Result<(), String> {
    // First, before any thread exists: every thread inherits the blocked signals, and only
    // this one takes them (see metroblk_ublk::signals).
    let signals = TermSignals::block().map_err(|e| e.to_string())?;
    let stopping = Arc::new(AtomicBool::new(false));
    let node = NodeIdentity { name: cfg.name.clone(), config_path: cfg.path.clone(), stopping: stopping.clone() };
    let mut runners = Vec::new();
    for g in cfg.role_groups() {
        runners.push(GroupRunner::spawn(g, node.clone())?);
    }
    // Until every volume got past its checks: a node none of whose volumes opens exits with
    // their errors (one line), as an operator expects of a mistyped config.
    while !runners.iter().all(|r| r.settled.load(Ordering::Acquire)) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let slots: Vec<_> = runners.iter().flat_map(|r| r.slots.iter().cloned()).collect();
    let mut failed: Vec<String> = slots
        .iter()
        .filter_map(|s| match s.view() {
            SlotView::Failed(why) => Some(why),
            _ => None,
        })
        .collect();
    if failed.len() == slots.len() {
        // A group's volumes fail as one: its error once.
        failed.dedup();
        for r in &runners {
            r.stop();
        }
        return Err(failed.join("; "));
    }
    for why in &failed {
        tracing::error!(node = %cfg.name, "{why}; the other volumes serve");
    }
    control::serve(&cfg.control_socket, cfg.name.clone(), Arc::new(slots))?;
    tracing::info!(node = %cfg.name, control = %cfg.control_socket.display(), "node running");
    let signal = signals.wait();
    stopping.store(true, Ordering::Release);
    tracing::info!(node = %cfg.name, signal, "shutting down");
    // Every volume closes at once; each is bounded by lifecycle::CLOSE_MAX.
    for r in &runners {
        r.stop();
    }
    for r in runners {
        r.join();
    }
    let _ = std::fs::remove_file(&cfg.control_socket);
    Ok(())
}

/// `<metadata_file>.ublk-id`: the ublk id the driver picked for this volume on this node.
pub fn ublk_id_file(cfg: &VolumeConfig) -> PathBuf {
    let mut name = cfg.metadata_file.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "metadata".into());
    name.push(".ublk-id");
    cfg.metadata_file.with_file_name(name)
}

/// The remembered id, or `None` when there is none yet.
pub fn read_ublk_id(path: &Path) -> Result<Option<i32>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
    };
    let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
    match line.parse::<i32>() {
        Ok(id) if id >= 0 => Ok(Some(id)),
        _ => Err(format!(
            "{}: '{line}' is not a ublk device id (delete the file to let the driver pick one)",
            path.display()
        )),
    }
}

/// Remembers `id` crash-safely (write a temporary file, fsync, rename, fsync the directory).
pub fn write_ublk_id(path: &Path, id: i32, volume: &str) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("{}: cannot record the ublk device id: {e}", path.display());
    let tmp = path.with_extension("ublk-id.tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(fail)?;
    writeln!(f, "# ublk device id of volume {volume} on this node; a restarted node recovers /dev/ublkb{id}")
        .and_then(|()| writeln!(f, "{id}"))
        .and_then(|()| f.sync_all())
        .map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ublk_id_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol0.meta.ublk-id");
        assert_eq!(read_ublk_id(&path).unwrap(), None);
        write_ublk_id(&path, 7, "vol0").unwrap();
        assert_eq!(read_ublk_id(&path).unwrap(), Some(7));
        std::fs::write(&path, "seven\n").unwrap();
        let e = read_ublk_id(&path).unwrap_err();
        assert!(e.contains("is not a ublk device id") && !e.contains('\n'), "{e}");
    }
}
