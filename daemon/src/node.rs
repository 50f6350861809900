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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metroblk_ublk::TermSignals;

use crate::config::NodeConfig;
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
    let slots = Arc::new(slots);
    control::serve(&cfg.control_socket, cfg.name.clone(), slots.clone())?;
    if let Some(addr) = cfg.metrics_listen {
        let bound = crate::metrics::serve(addr, cfg.name.clone(), slots.clone())?;
        tracing::info!(node = %cfg.name, "metrics on http://{bound}/metrics");
    }
    tracing::info!(node = %cfg.name, control = %cfg.control_socket.display(), "node running");
    crate::systemd::spawn_watchdog(cfg.control_socket.clone())?;
    crate::systemd::ready(&format!("{} of {} volume(s) open", slots.len() - failed.len(), slots.len()));
    let signal = signals.wait();
    crate::systemd::stopping();
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
