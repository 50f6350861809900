//! The control socket (a Unix socket per node) and the status report it serves.
//!
//! Protocol: the client sends one JSON line (`{"command":"status"}`), the node answers with
//! one JSON line and closes. Control plane only: it reads counters with relaxed atomic loads
//! and never touches the data path.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Role;
use crate::lifecycle::runner::{SlotView, VolumeHandle, VolumeSlot};
use crate::volume::stats::{LinkState, QueueStats};
use crate::volume::VolumeShared;

/// Largest request line accepted on the control socket.
pub const MAX_REQUEST: u64 = 64 << 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    /// The volumes serving in a role.
    pub volumes: Vec<VolumeStatus>,
    /// The volumes not serving now: opening, changing role, failed (with why) or stopping.
    #[serde(default)]
    pub not_serving: Vec<NotServing>,
}

/// A volume that serves in no role right now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NotServing {
    pub name: String,
    /// `opening as primary`, `changing role from secondary to primary`, `failed`, `stopping`.
    pub state: String,
    pub error: Option<String>,
}

/// Every volume of the node, serving or not.
pub fn node_status(node: &str, volumes: &[Arc<VolumeSlot>]) -> NodeStatus {
    let mut s = NodeStatus { node: node.to_string(), volumes: Vec::new(), not_serving: Vec::new() };
    for slot in volumes {
        let (state, error) = match slot.view() {
            SlotView::Serving(h) => {
                s.volumes.push(VolumeStatus { group: slot.group.clone(), ..volume_status(&h) });
                continue;
            }
            SlotView::Opening(r) => (format!("opening as {r}"), None),
            SlotView::Changing { from, to: Some(to) } => (format!("changing role from {from} to {to}"), None),
            SlotView::Changing { .. } | SlotView::Stopped => ("stopping".to_string(), None),
            SlotView::Failed(why) => ("failed".to_string(), Some(why)),
        };
        s.not_serving.push(NotServing { name: slot.name.clone(), state, error });
    }
    s
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    /// The consistency group it changes role with (its own name when in none).
    #[serde(default)]
    pub group: String,
    pub uuid: String,
    pub size: u64,
    pub role: Role,
    pub disk_state: String,
    /// Why the disk state is `failed` (the first error; errors latch).
    pub disk_error: Option<String>,
    pub link_state: LinkState,
    pub epoch: u64,
    pub peer: String,
    pub peer_address: String,
    pub requests_in_flight: u64,
    pub requests_held: u64,
    pub local_write_bytes: u64,
    pub local_write_requests: u64,
    pub peer_write_bytes: u64,
    pub peer_write_requests: u64,
    pub read_bytes: u64,
    pub read_requests: u64,
    pub flushes: u64,
    pub reconnects: u64,
    /// Requests that waited for an overlapping request to complete on both nodes.
    pub conflict_waits: u64,
    /// Last PING/PONG round trip in microseconds (primary only; null before the first).
    pub link_rtt_us: Option<f64>,
    pub last_link_error: Option<String>,
    pub ublk_device: Option<String>,
    /// How the primary's device moves a write's data (null without a device): `zero-copy`
    /// (the request's pages registered by ublk, written and sent from there; the kernel
    /// offers it and `payload_checksum = "none"`) or `copy` (into a buffer of ours first).
    #[serde(default)]
    pub write_path: Option<String>,
    /// The current generation (a line of data history).
    pub generation: String,
    /// Regions marked in the write-intent bitmap, and what they cover: the bytes that may
    /// differ from the peer (or are written but not yet cleared).
    pub dirty_regions: u64,
    pub out_of_sync_bytes: u64,
    /// The volume went on alone: writes complete without the peer, which is outdated.
    pub alone: bool,
    /// The sync link: unknown, in-sync, sync-source, sync-target, split-brain, refused.
    pub sync_state: crate::resync::SyncState,
    /// A resync is due or asked for and has not run yet (writes completed alone, regions
    /// found different, an operator's `resync`).
    pub resync_pending: bool,
    pub sync_message: Option<String>,
    /// During a resync: percent done, bytes left, rate (bytes/s) and seconds to go.
    pub resync_percent: Option<f64>,
    pub resync_bytes_left: Option<u64>,
    pub resync_rate_bps: Option<f64>,
    pub resync_eta_s: Option<f64>,
    /// Since the node started.
    pub resynced_bytes: u64,
    /// Of `resynced_bytes`, those sent as zero ranges (read as zeros: holes, discarded parts).
    pub resynced_zero_bytes: u64,
    pub resynced_regions: u64,
    /// Write-intent metadata writes (each shared by a group of cold writes) and the requests
    /// that waited for one.
    pub metadata_writes: u64,
    pub intent_waits: u64,
    pub completed_alone: u64,
    /// The last online verify (primary): regions compared and found different, and whether
    /// it finished (or failed part way).
    pub verify: Option<crate::resync::VerifyInfo>,
    /// The witness (null without one): its address, whether the link is up, the last error
    /// or refusal.
    pub witness_address: Option<String>,
    pub witness_connected: bool,
    pub witness_message: Option<String>,
    /// Primary: what is left of the lease, in ms.
    pub lease_left_ms: Option<u64>,
    /// This node serves no I/O now: no peer and no lease, or another node is primary.
    pub fenced: bool,
    /// The witness named another primary: this node serves nothing in its old epoch.
    pub deposed: bool,
    /// The peer has been missing for longer than `out_of_sync_alert_s`.
    pub out_of_sync_alert: bool,
    pub peer_missing_s: u64,
}

/// The status of one volume, with the texts that only an operator reads (the disk's and the
/// link's last errors, the generation).
pub fn volume_status(h: &VolumeHandle) -> VolumeStatus {
    let mut s = volume_figures(h);
    let v = &h.shared;
    s.disk_error = v.disk.reason();
    s.last_link_error = h.handoffs.iter().find_map(|h| h.last_error()).or_else(|| s.sync_message.clone());
    s.generation = v.intent.superblock().generation.to_string();
    s
}

/// The status of one volume without `disk_error`, `last_link_error` and `generation`: what
/// `/metrics` reads (`metrics.rs`). It loads atomics and takes only control-plane locks (the
/// sync link's info, the witness client's info), never one a queue, replica or bitmap writer
/// thread takes (the disk's error text, a link handoff, the superblock).
pub fn volume_figures(h: &VolumeHandle) -> VolumeStatus {
    let v = &h.shared;
    let c = &v.config;
    let sum = |f: fn(&QueueStats) -> &std::sync::atomic::AtomicU64| -> u64 {
        v.queue_stats.iter().map(|q| QueueStats::get(f(q))).sum()
    };
    let sync = v.sync.info();
    let progress = resync_progress(&sync);
    let link_state = if c.peer.is_none() {
        LinkState::Standalone
    } else if sync.state == crate::resync::SyncState::SyncSource {
        LinkState::SyncSource
    } else if sync.state == crate::resync::SyncState::SyncTarget {
        LinkState::SyncTarget
    } else if h.role == Role::Secondary {
        // The listener keeps the secondary's link state in the first counters.
        v.queue_stats[0].link()
    } else if v.queue_stats.iter().all(|q| q.link() == LinkState::Connected) {
        LinkState::Connected
    } else {
        LinkState::Connecting
    };
    let now = std::time::Instant::now();
    let witness = v.fence.witness_info();
    let missing = v.fence.peer_missing(now);
    let rtts: Vec<u64> = v.queue_stats.iter().map(|q| QueueStats::get(&q.rtt_ns)).filter(|&r| r > 0).collect();
    let link_rtt_us =
        if rtts.is_empty() { None } else { Some(rtts.iter().sum::<u64>() as f64 / rtts.len() as f64 / 1000.0) };
    VolumeStatus {
        name: c.name.clone(),
        group: c.name.clone(),
        uuid: c.uuid.to_string(),
        size: c.size,
        role: h.role,
        disk_state: v.disk.state().to_string(),
        disk_error: None,
        link_state,
        epoch: v.epoch(),
        peer: c.peer.as_ref().map(|p| p.name.clone()).unwrap_or_else(|| "-".into()),
        peer_address: c.peer.as_ref().map(|p| p.address.to_string()).unwrap_or_else(|| "-".into()),
        requests_in_flight: sum(|q| &q.inflight),
        requests_held: sum(|q| &q.held),
        local_write_bytes: sum(|q| &q.local_write_bytes),
        local_write_requests: sum(|q| &q.local_write_requests),
        peer_write_bytes: sum(|q| &q.peer_write_bytes),
        peer_write_requests: sum(|q| &q.peer_write_requests),
        read_bytes: sum(|q| &q.read_bytes),
        read_requests: sum(|q| &q.read_requests),
        flushes: sum(|q| &q.flushes),
        reconnects: sum(|q| &q.reconnects),
        conflict_waits: sum(|q| &q.conflict_waits),
        link_rtt_us,
        last_link_error: None,
        ublk_device: h.ublk_device.clone(),
        write_path: h.ublk_device.is_some().then(|| {
            if v.zero_copy.load(std::sync::atomic::Ordering::Relaxed) { "zero-copy" } else { "copy" }.to_string()
        }),
        generation: String::new(),
        dirty_regions: v.intent.dirty_regions(),
        out_of_sync_bytes: (v.intent.dirty_regions() * v.intent.region_size()).min(c.size),
        alone: v.intent.is_alone(),
        sync_state: sync.state,
        resync_pending: v.intent.resync_needed() || v.sync.is_pending(),
        sync_message: sync.message.clone(),
        resync_percent: progress.map(|p| p.0),
        resync_bytes_left: progress.map(|p| p.1),
        resync_rate_bps: progress.map(|p| p.2),
        resync_eta_s: progress.and_then(|p| p.3),
        resynced_bytes: v.sync.bytes_resynced.load(std::sync::atomic::Ordering::Relaxed),
        resynced_zero_bytes: v.sync.bytes_resynced_as_zeros.load(std::sync::atomic::Ordering::Relaxed),
        resynced_regions: v.sync.regions_resynced.load(std::sync::atomic::Ordering::Relaxed),
        metadata_writes: v.intent.stats.metadata_writes.load(std::sync::atomic::Ordering::Relaxed),
        intent_waits: sum(|q| &q.intent_waits),
        completed_alone: sum(|q| &q.completed_alone),
        verify: sync.verify,
        witness_address: c.witness.as_ref().map(|w| w.address.to_string()),
        witness_connected: witness.connected,
        witness_message: witness.last_refusal.or(witness.last_error),
        lease_left_ms: (c.witness.is_some() && h.role == Role::Primary)
            .then(|| v.fence.lease_left(now).as_millis() as u64),
        fenced: h.role == Role::Primary
            && v.fence.is_fenced(|_| v.queue_stats.iter().all(|q| q.link() == LinkState::Connected)),
        deposed: v.fence.is_deposed(),
        out_of_sync_alert: c.peer.is_some() && !c.out_of_sync_alert.is_zero() && missing >= c.out_of_sync_alert,
        peer_missing_s: missing.as_secs(),
    }
}

/// (percent, bytes left, rate, eta) of the resync in progress.
fn resync_progress(i: &crate::resync::SyncInfo) -> Option<(f64, u64, f64, Option<f64>)> {
    use crate::resync::SyncState;
    if !matches!(i.state, SyncState::SyncSource | SyncState::SyncTarget) {
        return None;
    }
    let secs = i.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let rate = if secs > 0.0 { i.bytes_done as f64 / secs } else { 0.0 };
    if i.state == SyncState::SyncTarget {
        // The target does not know the total; it reports what it received.
        return Some((0.0, 0, rate, None));
    }
    let left = i.bytes_total.saturating_sub(i.bytes_done);
    let percent = if i.bytes_total == 0 { 100.0 } else { i.bytes_done as f64 * 100.0 / i.bytes_total as f64 };
    let eta = (rate > 0.0).then(|| left as f64 / rate);
    Some((percent, left, rate, eta))
}

/// One request on the control socket.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ControlRequest {
    pub command: String,
    #[serde(default)]
    pub volume: Option<String>,
    #[serde(default)]
    pub full: bool,
    #[serde(default)]
    pub discard_local: bool,
    /// Resync rate limit in bytes per second (0: unlimited).
    #[serde(default)]
    pub rate: Option<u64>,
    #[serde(default)]
    pub checksum: bool,
    /// `promote` / `demote` even where it is unsafe.
    #[serde(default)]
    pub force: bool,
}

/// `resync` and `resume-alone` on one volume; returns the answer's text.
fn volume_command(r: &ControlRequest, volumes: &[Arc<VolumeSlot>]) -> Result<String, String> {
    use std::sync::atomic::Ordering;
    let name = r.volume.as_deref().ok_or("no volume named in the request")?;
    let slot = volumes.iter().find(|s| s.name == name).ok_or_else(|| format!("no volume '{name}' on this node"))?;
    let h = slot.handle()?;
    let v = &h.shared;
    if v.config.peer.is_none() {
        return Err(format!("volume {name} is standalone: it has no peer"));
    }
    match r.command.as_str() {
        "resume-alone" => {
            if h.role != Role::Primary {
                return Err(format!("volume {name} is secondary here; resume-alone is for the primary"));
            }
            if v.fence.enabled {
                return Err(format!(
                    "volume {name} has a witness (fencing = \"witness\"): it decides when the primary goes on alone"
                ));
            }
            v.intent.allow_alone();
            v.intent.may_complete_alone();
            v.conflicts.wake_all_queues();
            Ok(format!(
                "volume {name}: going on alone; held writes complete once the new generation is recorded, and the \
                 peer is resynced when it returns"
            ))
        }
        "resync" => {
            if r.checksum && h.role != Role::Primary {
                return Err(format!("volume {name} is secondary here; run resync --checksum on the primary"));
            }
            if r.discard_local && h.role == Role::Primary {
                return discard_local_on_primary(slot, &h);
            }
            if let Some(rate) = r.rate {
                v.sync.rate_bps.store(rate, Ordering::Relaxed);
            }
            if r.discard_local {
                // Kept in the metadata until the resync from the peer completes: a restart
                // before it does not bring the dropped changes back.
                v.intent.update_superblock(|sb| sb.discard_local = true).map_err(|e| format!("volume {name}: {e}"))?;
                v.sync.discard_local.store(true, Ordering::Release);
            }
            v.sync.request(crate::resync::Requested { full: r.full, checksum: r.checksum });
            // The primary's sync link takes the request up at its next tick; a secondary's
            // flags travel in its next sync hello.
            if h.role == Role::Primary {
                v.sync.restart.store(true, Ordering::Release);
            }
            Ok(if r.discard_local {
                format!(
                    "volume {name}: this node's changes will be dropped; it resyncs from the peer at the next exchange"
                )
            } else if h.role == Role::Primary {
                format!("volume {name}: resync from this node requested")
            } else {
                format!("volume {name}: resync requested (the primary starts it at its next exchange)")
            })
        }
        "promote" | "demote" => {
            // The change applies to the whole group: every member must allow it.
            let mut change = None;
            for other in volumes.iter().filter(|s| s.group == slot.group) {
                let oh = if other.name == slot.name { h.clone() } else { other.handle()? };
                change = Some(operator_role_change(r, &oh)?);
            }
            let change = change.expect("the named volume is in its own group");
            slot.request_change(change)?;
            Ok(format!(
                "volume {name}{}: {}; status shows the new role",
                if slot.group != slot.name { format!(" (group {})", slot.group) } else { String::new() },
                if r.command == "promote" {
                    "becoming primary (epoch + 1, a new generation)"
                } else {
                    "its device is deleted; becoming secondary"
                }
            ))
        }
        "switchover" => {
            if h.role != Role::Primary {
                return Err(format!("volume {name} is secondary here; run switchover on the primary"));
            }
            // The whole group switches over: every member must be serving as primary here.
            let mut group = vec![h.clone()];
            for other in volumes.iter().filter(|s| s.group == slot.group && s.name != slot.name) {
                let oh = other.handle()?;
                if oh.role != Role::Primary {
                    return Err(format!("volume {} of group {} is secondary here", other.name, slot.group));
                }
                group.push(oh);
            }
            let members: Vec<&VolumeShared> = group.iter().map(|h| &*h.shared).collect();
            crate::fencing::switchover::switchover(&members)
        }
        "verify" => {
            if h.role != Role::Primary {
                return Err(format!("volume {name} is secondary here; run verify on the primary"));
            }
            v.sync.verify_requests.fetch_add(1, Ordering::AcqRel);
            v.sync.verify_requested.store(true, Ordering::Release);
            Ok(format!("volume {name}: online verify requested"))
        }
        other => Err(format!("unknown command '{other}'")),
    }
}

/// `promote` and `demote` without a witness (the disaster-recovery runbook, or a planned move
/// by hand): checked here for one volume of the group, applied by the group's thread
/// (`lifecycle/`).
fn operator_role_change(r: &ControlRequest, h: &VolumeHandle) -> Result<crate::lifecycle::Change, String> {
    use crate::lifecycle::Change;
    let v = &h.shared;
    let name = &v.config.name;
    let peer = v.config.peer.as_ref().map_or("-", |p| p.name.as_str());
    if v.fence.enabled {
        return Err(format!(
            "volume {name} has a witness: it decides the roles (a secondary is promoted when its primary is lost); \
             for a planned move run switchover on the primary"
        ));
    }
    let sum = |f: fn(&QueueStats) -> &std::sync::atomic::AtomicU64| -> u64 {
        v.queue_stats.iter().map(|q| QueueStats::get(f(q))).sum()
    };
    let change = if r.command == "promote" {
        if h.role == Role::Primary {
            return Err(format!("volume {name} is already primary here"));
        }
        if v.queue_stats[0].link() == LinkState::Connected {
            return Err(format!("volume {name}: the primary {peer} is connected; demote it there first"));
        }
        let disk = v.disk.state();
        if disk != metroblk_protocol::DiskState::UpToDate && !r.force {
            return Err(format!(
                "volume {name}: this copy is {disk}: it misses writes; --force makes it the data from now on (what the \
                 peer has beyond it is dropped at the next resync)"
            ));
        }
        Change::PromotedByOperator { forced: r.force }
    } else {
        if h.role == Role::Secondary {
            return Err(format!("volume {name} is already secondary here"));
        }
        let (held, parked) = (sum(|q| &q.held), sum(|q| &q.parked));
        if held + parked > 0 {
            return Err(format!(
                "volume {name}: {held} writes wait for the peer and {parked} are parked; they would be lost (resume-alone \
                 or bring the peer back first)"
            ));
        }
        if let Some(dev) = h.ublk_device.as_deref().filter(|d| device_in_use(d)) {
            if !r.force {
                return Err(format!(
                    "volume {name}: {dev} is in use (mounted or held open exclusively); unmount it first, or --force \
                     (its pending I/O fails)"
                ));
            }
        }
        let linked = v.queue_stats.iter().all(|q| q.link() == LinkState::Connected);
        let in_sync = v.sync.info().state == crate::resync::SyncState::InSync
            && !v.intent.is_alone()
            && !v.intent.resync_needed();
        if !(r.force || linked && in_sync) {
            return Err(format!(
                "volume {name}: the peer {peer} is not connected and in sync, so this node holds writes it lacks; \
                 --force demotes anyway (promote the peer only after a resync from here)"
            ));
        }
        Change::DemotedByOperator { discard_local: false }
    };
    Ok(change)
}

/// `resync --discard-local` on a primary (the split-brain runbook, no witness): this node's
/// changes are dropped, so it stops serving them: the volume's thread demotes it (its device
/// deleted) and the secondary it becomes is resynced from the peer, whose changes win.
fn discard_local_on_primary(slot: &VolumeSlot, h: &VolumeHandle) -> Result<String, String> {
    let v = &h.shared;
    let name = &v.config.name;
    if v.fence.enabled {
        return Err(format!(
            "volume {name} is primary here and has a witness, which decides the roles; run --discard-local on the \
             secondary"
        ));
    }
    if let Some(dev) = h.ublk_device.as_deref().filter(|d| device_in_use(d)) {
        return Err(format!(
            "volume {name}: {dev} is in use (mounted or held open exclusively); its data is about to be dropped: stop \
             its users and unmount it first"
        ));
    }
    slot.request_change(crate::lifecycle::Change::DemotedByOperator { discard_local: true })?;
    Ok(format!(
        "volume {name}: this node's changes will be dropped: its device is deleted, it becomes secondary and is \
         resynced from the peer"
    ))
}

/// Whether something holds the block device exclusively (a mounted filesystem, device mapper).
fn device_in_use(path: &str) -> bool {
    metroblk_ublk::device_in_use(Path::new(path))
}

/// Sends one request to a running node and returns its answer.
pub fn request(path: &Path, req: &ControlRequest) -> Result<serde_json::Value, String> {
    let conn = UnixStream::connect(path)
        .map_err(|e| format!("cannot reach the node at {}: {e} (is `metroblk node run` running?)", path.display()))?;
    // A switchover drains I/O and waits for the witness: seconds, bounded by its own limits.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(15)));
    let mut w = &conn;
    let line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    writeln!(w, "{line}").map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(&conn).read_line(&mut answer).map_err(|e| format!("no answer from {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&answer).map_err(|e| format!("bad answer from node: {e}"))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(format!("node answered: {e}"));
    }
    Ok(v)
}

/// Serves the control socket on a background thread. A stale socket file from a crashed
/// daemon is replaced; a live one (another daemon answering) is an error, and so is anything
/// at that path that is not a socket: a mistyped path must never delete someone's file.
pub fn serve(path: &Path, node: String, volumes: Arc<Vec<Arc<VolumeSlot>>>) -> Result<(), String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!(
                "control socket {} exists and is not a socket; refusing to replace it (fix node.control_socket)",
                path.display()
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!("control socket {} is in use by another running node", path.display()));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale control socket {}: {e}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind control socket {}: {e}", path.display()))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = handle(conn, &node, &volumes);
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn handle(conn: UnixStream, node: &str, volumes: &[Arc<VolumeSlot>]) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(std::io::Read::take(&conn, MAX_REQUEST)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(r) if r.command == "status" => serde_json::to_value(node_status(node, volumes)).unwrap_or_default(),
        Ok(r) => match volume_command(&r, volumes) {
            Ok(text) => serde_json::json!({ "ok": text }),
            Err(e) => serde_json::json!({ "error": e }),
        },
        Err(e) => serde_json::json!({"error": format!("malformed request: {e}")}),
    };
    let mut w = &conn;
    writeln!(w, "{reply}")
}

/// Asks a running node for its status.
pub fn query_status(path: &PathBuf) -> Result<NodeStatus, String> {
    let conn = UnixStream::connect(path)
        .map_err(|e| format!("cannot reach the node at {}: {e} (is `metroblk node run` running?)", path.display()))?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut w = &conn;
    writeln!(w, "{{\"command\":\"status\"}}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(|e| format!("no answer from {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("bad answer from node: {e}"))?;
    if let Some(e) = v.get("error") {
        return Err(format!("node answered: {e}"));
    }
    serde_json::from_value(v).map_err(|e| format!("bad answer from node: {e}"))
}

/// What the table calls the regions marked in the bitmap. In sync (and not alone, no resync
/// due) they are regions both nodes received but that the cleaner has not yet seen flushed on
/// both (it clears them within 5–10 s; a `mkfs` discard marks the whole device): calling them
/// "out of sync" next to "in-sync" reads as a contradiction. Otherwise they are what the next
/// resync copies. The JSON keeps one field, `out_of_sync_bytes`, for both.
fn marked_label(sync_state: crate::resync::SyncState, alone: bool, resync_pending: bool) -> &'static str {
    if sync_state == crate::resync::SyncState::InSync && !alone && !resync_pending {
        "awaiting flush on both nodes"
    } else {
        "out of sync"
    }
}

/// The human-readable status table.
pub fn render(s: &NodeStatus) -> String {
    let mut out = format!("node {}\n", s.node);
    for v in &s.volumes {
        out += &format!(
            "  volume {}{}  role {}  disk {}  link {}  epoch {}\n",
            v.name,
            if v.group.is_empty() || v.group == v.name { String::new() } else { format!(" (group {})", v.group) },
            v.role,
            v.disk_state,
            v.link_state,
            v.epoch
        );
        out += &format!("    peer {} at {}", v.peer, v.peer_address);
        if let Some(rtt) = v.link_rtt_us {
            out += &format!("  rtt {rtt:.0} us");
        }
        out += "\n";
        out += &format!(
            "    in flight {}  held {}  written locally {} req / {} B  to peer {} req / {} B  reads {}  flushes {}\n",
            v.requests_in_flight,
            v.requests_held,
            v.local_write_requests,
            v.local_write_bytes,
            v.peer_write_requests,
            v.peer_write_bytes,
            v.read_requests,
            v.flushes
        );
        if let Some(d) = &v.ublk_device {
            out += &format!("    device {d}  write path {}\n", v.write_path.as_deref().unwrap_or("-"));
        }
        if let Some(e) = &v.disk_error {
            out += &format!("    disk error: {e}\n");
        }
        if let Some(e) = &v.last_link_error {
            out += &format!("    last link error: {e}\n");
        }
        out += &format!(
            "    sync {}  {} {} B ({} regions)  generation {}{}\n",
            v.sync_state,
            marked_label(v.sync_state, v.alone, v.resync_pending),
            v.out_of_sync_bytes,
            v.dirty_regions,
            v.generation,
            if v.alone { "  (going on alone: the peer is outdated)" } else { "" }
        );
        if let Some(p) = v.resync_percent {
            out += &format!(
                "    resync {p:.1}% done, {} B left, {:.1} MiB/s, eta {}\n",
                v.resync_bytes_left.unwrap_or(0),
                v.resync_rate_bps.unwrap_or(0.0) / (1 << 20) as f64,
                v.resync_eta_s.map_or("-".to_string(), |e| format!("{e:.0} s"))
            );
        }
        if let Some(vi) = &v.verify {
            out += &format!(
                "    verify: {} regions checked, {} differ{}\n",
                vi.regions_checked,
                vi.regions_differing,
                if vi.failed {
                    " (failed part way)"
                } else if vi.done {
                    ""
                } else {
                    " (running)"
                }
            );
        }
        if let Some(m) = &v.sync_message {
            out += &format!("    sync: {m}\n");
        }
        if let Some(w) = &v.witness_address {
            out += &format!(
                "    witness {w} {}{}{}{}\n",
                if v.witness_connected { "connected" } else { "unreachable" },
                v.lease_left_ms.map_or(String::new(), |l| format!("  lease left {l} ms")),
                if v.deposed {
                    "  DEPOSED (another node is primary)"
                } else if v.fenced {
                    "  FENCED (no peer, no lease: I/O stopped)"
                } else {
                    ""
                },
                v.witness_message.as_ref().map_or(String::new(), |m| format!("  ({m})"))
            );
        }
        if v.out_of_sync_alert {
            out += &format!("    ALERT: out of sync, the peer has been missing for {} s\n", v.peer_missing_s);
        }
    }
    for n in &s.not_serving {
        out += &format!("  volume {}  {}\n", n.name, n.state.to_uppercase());
        if let Some(e) = &n.error {
            out += &format!("    error: {e}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::marked_label;
    use crate::resync::SyncState;

    #[test]
    fn marked_regions_are_out_of_sync_unless_in_sync_and_linked() {
        assert_eq!(marked_label(SyncState::InSync, false, false), "awaiting flush on both nodes");
        assert_eq!(marked_label(SyncState::InSync, true, false), "out of sync");
        assert_eq!(marked_label(SyncState::InSync, false, true), "out of sync");
        for state in [
            SyncState::Unknown,
            SyncState::SyncSource,
            SyncState::SyncTarget,
            SyncState::SplitBrain,
            SyncState::Refused,
        ] {
            assert_eq!(marked_label(state, false, false), "out of sync", "{state}");
        }
    }
}
