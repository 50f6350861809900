//! `metroblk switchover`: a planned role swap, on the primary's control thread.
//!
//! 1. Check: this node is primary with a witness, the peer is connected and in sync.
//! 2. Park new I/O (it waits, never fails: `FenceShared::switching`) and wait until nothing
//!    is in flight: every write the application saw complete is on both nodes. An exported
//!    volume's portal closes and its service address goes (`export/`) before step 3.
//! 3. Ask the witness (through the client thread) to hand the role to the peer: epoch + 1.
//! 4. Answer the operator; the volume (alone: the node's other volumes are untouched) then
//!    records its new role, deletes its device (I/O that arrived during the switch fails: the
//!    volume now lives on the peer) and serves as secondary, in the running process. The peer sees its primary leave, is confirmed primary by the witness (the
//!    handover already made it so) and starts serving.
//!
//! A refusal or a timeout before step 3 un-parks the I/O: nothing changed.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::resync::SyncState;
use crate::volume::stats::{LinkState, QueueStats};
use crate::volume::VolumeShared;

/// Longest wait for in-flight I/O to drain before the switchover gives up.
pub const DRAIN_MAX: Duration = Duration::from_secs(3);
/// Longest wait for the witness's answer.
pub const HANDOVER_WAIT_MAX: Duration = Duration::from_millis(1500);

/// Runs steps 1–3 for every volume of the group (`members`, the volume named first); returns
/// the operator's answer. A group switches over as one: every member parks and drains before
/// the witness is asked, so the peer takes over one point in time.
pub fn switchover(members: &[&VolumeShared]) -> Result<String, String> {
    let v = members[0];
    let name = &v.config.name;
    let peer = v.config.peer.as_ref().map_or("-", |p| p.name.as_str());
    if !v.fence.enabled {
        return Err(format!("volume {name} has no witness: a switchover needs one to record the new primary"));
    }
    for m in members {
        let name = &m.config.name;
        if m.fence.is_deposed() {
            return Err(format!("volume {name}: this node is no longer the primary"));
        }
        if !m.queue_stats.iter().all(|q| q.link() == LinkState::Connected) {
            return Err(format!("volume {name}: the peer {peer} is not connected"));
        }
        if m.sync.info().state != SyncState::InSync || m.intent.is_alone() || m.intent.resync_needed() {
            return Err(format!(
                "volume {name}: the peer {peer} is not in sync yet (see status); try again after the resync"
            ));
        }
    }
    let start = Instant::now();
    for m in members {
        *m.fence.handover_outcome.lock().unwrap_or_else(|p| p.into_inner()) = None;
        m.fence.switching.store(true, Ordering::Release);
    }
    let sum = |f: fn(&QueueStats) -> &std::sync::atomic::AtomicU64| -> u64 {
        members.iter().flat_map(|m| m.queue_stats.iter()).map(|q| QueueStats::get(f(q))).sum()
    };
    let give_up = |why: String| {
        for m in members {
            m.fence.switching.store(false, Ordering::Release);
            m.conflicts.wake_all_queues();
        }
        Err(why)
    };
    while sum(|q| &q.inflight) > sum(|q| &q.parked) || sum(|q| &q.held) > 0 {
        if start.elapsed() > DRAIN_MAX {
            return give_up(format!(
                "volume {name}: in-flight I/O did not drain in {} s; nothing changed",
                DRAIN_MAX.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Exports withdraw while switching (`export/`): the service address must be gone before
    // the handover, after which the parked I/O fails here and the peer takes the address.
    while members.iter().any(|m| m.fence.export_address_held.load(Ordering::Acquire)) {
        if start.elapsed() > DRAIN_MAX {
            return give_up(format!(
                "volume {name}: the export did not withdraw its service address in {} s; nothing changed",
                DRAIN_MAX.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let drained = start.elapsed();
    let others = if members.len() > 1 {
        format!(
            " with its group ({})",
            members[1..].iter().map(|m| m.config.name.as_str()).collect::<Vec<_>>().join(", ")
        )
    } else {
        String::new()
    };
    v.fence.handover_requested.store(true, Ordering::Release);
    let asked = Instant::now();
    loop {
        if let Some(outcome) = v.fence.handover_outcome.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return match outcome {
                Ok(epoch) => Ok(format!(
                    "volume {name}{others}: handed over to {peer} in epoch {epoch} (drained in {} ms, witness answered in {} ms); \
                     this node deletes its device and serves the volume as secondary",
                    drained.as_millis(),
                    asked.elapsed().as_millis()
                )),
                Err(why) => give_up(format!("volume {name}: the witness refused the switchover: {why}; nothing changed")),
            };
        }
        if asked.elapsed() > HANDOVER_WAIT_MAX {
            // The request may still be granted later: then the volume becomes secondary.
            return Err(format!(
                "volume {name}: no answer from the witness in {} ms; I/O stays parked until it answers (see status)",
                HANDOVER_WAIT_MAX.as_millis()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
