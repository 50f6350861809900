//! `metroblk node run`: one node's daemon, in the foreground.
//!
//! Opens every configured volume in its role, starts the links (the primary dials, the
//! secondary listens), exposes the primary's block device through the ublk frontend, and
//! serves the control socket until SIGINT or SIGTERM.
//!
//! The role: without a witness, the config's. With one (`fencing = "witness"`), the witness's
//! record if it answers at start, else the role the witness last gave this node (kept in the
//! metadata), else the config's preferred role. A role change at run time (the witness
//! promoted this secondary, or names another primary) is recorded in the metadata, and then
//! the node re-executes itself: the fresh process starts in the new role through the same
//! code as any start, so there is one way into each role. A deposed primary first deletes its
//! device (pending I/O fails): its page cache must never see the other site's data.
//!
//! Shutdown: on SIGINT/SIGTERM the primary stops and deletes its ublk device (clean
//! shutdown), unless the device is in use or requests wait for the peer: then it is left for
//! recovery, as after `kill -9` (see [`shut_down_primary`]). After `kill -9` (or a crash) the device stays, quiesced by the kernel with its
//! I/O waiting; the next `node run` finds it by its id and recovers it, so `/dev/ublkbN` never
//! goes away under a mounted filesystem. The id is the volume's `ublk_id`, or, when the driver
//! picked it, the one remembered in `<metadata_file>.ublk-id`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use metroblk_ublk::{Device, QueueTarget, TermSignals};

use crate::config::{Fencing, NodeConfig, Role, VolumeConfig, MAX_QUEUES, MAX_QUEUE_DEPTH};
use crate::control::{self, VolumeHandle};
use crate::fencing::client::RoleChange;
use crate::fencing::NodeRole;
use crate::frontend::{self, EngineQueue};
use crate::peer::listener;
use crate::volume::stats::QueueStats;
use crate::volume::{self, Volume, VolumeShared};

/// Opens a volume as secondary: backing file, shared state, listener.
pub fn start_secondary(cfg: &VolumeConfig, node_name: &str, config_path: &Path) -> Result<VolumeHandle, String> {
    let intent = volume::open_metadata(cfg, node_name, config_path).map_err(|e| e.to_string())?;
    let file = volume::open_backing_file(cfg).map_err(|e| e.to_string())?;
    let shared = Arc::new(VolumeShared {
        config: cfg.clone(),
        node_name: node_name.to_string(),
        geometry: volume::geometry(cfg),
        epoch: AtomicU64::new(intent.superblock().epoch.max(1)),
        fence: crate::fencing::shared::FenceShared::new(cfg),
        file,
        conflicts: volume::conflict::ConflictTable::new(cfg.size),
        disk: volume::disk::DiskHealth::new(intent.superblock().disk_state),
        intent,
        sync: crate::resync::SyncShared::new(cfg.resync_rate_bps),
        // One set of counters per primary queue's link; [0] also holds the link state.
        queue_stats: (0..MAX_QUEUES).map(|_| Arc::new(QueueStats::default())).collect(),
    });
    if shared.intent.superblock().full_resync {
        // `metroblk attach` after a disk failure: the next resync copies every region.
        shared.sync.request(crate::resync::Requested { full: true, checksum: false });
    }
    if shared.fence.enabled {
        delete_orphan_device(cfg, node_name)?;
    }
    listener::start(shared.clone())?;
    SECONDARIES.lock().unwrap_or_else(|p| p.into_inner()).push(shared.clone());
    Ok(VolumeHandle { shared, role: Role::Secondary, handoffs: Vec::new(), ublk_device: None })
}

/// A node that lost its primary role (killed, then replaced) may have left its device, its
/// I/O queued in the kernel: delete it (see `metroblk_ublk::delete_orphan`).
fn delete_orphan_device(cfg: &VolumeConfig, node_name: &str) -> Result<(), String> {
    let id_file = ublk_id_file(cfg);
    let dev_id = if cfg.ublk_id >= 0 { cfg.ublk_id } else { read_ublk_id(&id_file)?.unwrap_or(-1) };
    if dev_id < 0 {
        return Ok(());
    }
    let params = frontend::device_params(cfg, node_name, dev_id);
    match metroblk_ublk::delete_orphan(&params) {
        Ok(_) => Ok(()),
        // Another program's device under that id: not ours to touch.
        Err(metroblk_ublk::Error::NotOurs { .. }) => Ok(()),
        Err(e) => {
            tracing::warn!(volume = %cfg.name, "cannot delete the device a previous primary left: {e}");
            Ok(())
        }
    }
}

/// A primary volume: its ublk device (first, so it is stopped before the engine goes) and
/// its engine.
pub struct Primary {
    pub device: Device,
    pub volume: Volume,
}

/// Opens a volume as primary and serves it as a ublk device: adds the device (or recovers
/// the one a killed daemon left), opens the engine with as many queues as the device has,
/// and starts one queue thread per queue driving the engine on libublk's ring.
///
/// `before_serving` runs once the engine exists and before the device serves; with a witness
/// the device is started only once the fence is lifted (a lease, or the peer), so a restarted
/// primary that may have been replaced serves nothing, not even the kernel's partition scan.
pub fn start_primary(
    cfg: &VolumeConfig,
    node_name: &str,
    config_path: &Path,
    stopping: &AtomicBool,
    before_serving: impl FnOnce(&Arc<VolumeShared>) -> Result<(), String>,
) -> Result<Primary, String> {
    let err = |e: &dyn std::fmt::Display| format!("volume {}: {e}", cfg.name);
    // Before the device exists: a node without usable metadata serves nothing, and neither
    // does one whose copy is not up to date.
    let intent = volume::open_metadata(cfg, node_name, config_path).map_err(|e| e.to_string())?;
    let disk_state = intent.superblock().disk_state;
    if disk_state != volume::disk::DiskState::UpToDate {
        return Err(format!(
            "volume {}: this node's copy is {disk_state} ({}), so it cannot be the primary; start it as the \
             secondary and let a resync from the peer finish",
            cfg.name,
            match disk_state {
                volume::disk::DiskState::Inconsistent => "a resync to it did not finish",
                volume::disk::DiskState::Failed => "its disk failed",
                _ => "it misses writes the peer has",
            }
        ));
    }
    let id_file = ublk_id_file(cfg);
    let remembered = if cfg.ublk_id >= 0 { None } else { read_ublk_id(&id_file)? };
    let dev_id = if cfg.ublk_id >= 0 { cfg.ublk_id } else { remembered.unwrap_or(-1) };
    let params = frontend::device_params(cfg, node_name, dev_id);
    let device = match Device::open(&params) {
        Ok(d) => d,
        Err(metroblk_ublk::Error::NotOurs { dev_id }) if remembered.is_some() => {
            tracing::warn!(
                volume = %cfg.name,
                "the remembered ublk id {dev_id} ({}) now belongs to another device; letting the driver pick a new one",
                id_file.display()
            );
            let mut fresh = params.clone();
            fresh.dev_id = -1;
            Device::open(&fresh).map_err(|e| err(&e))?
        }
        Err(e) => return Err(err(&e)),
    };
    if cfg.ublk_id < 0 && remembered != Some(device.dev_id()) {
        write_ublk_id(&id_file, device.dev_id(), &cfg.name)?;
    }
    // A recovered device keeps the geometry it was created with; the engine's tables are
    // bounded by the config limits.
    if device.queues() > MAX_QUEUES || device.depth() > MAX_QUEUE_DEPTH {
        return Err(err(&format!(
            "{} has {} queues of depth {}, beyond the limits of {MAX_QUEUES} queues and depth {MAX_QUEUE_DEPTH}",
            device.path().display(),
            device.queues(),
            device.depth()
        )));
    }
    let volume = Volume::open_primary_with(cfg, node_name, device.queues(), intent).map_err(|e| e.to_string())?;
    before_serving(&volume.shared)?;
    wait_until_unfenced(&volume, stopping);
    let mut device = device;
    device
        .start(|qid, depth| Box::new(EngineQueue::new(volume.queue(qid, depth))) as Box<dyn QueueTarget>)
        .map_err(|e| err(&e))?;
    tracing::info!(
        volume = %cfg.name,
        device = %device.path().display(),
        recovered = device.is_recovery(),
        "primary serving its block device"
    );
    Ok(Primary { device, volume })
}

enum NodeEvent {
    Signal(&'static str),
    Role(RoleChange),
}

/// How long a starting node waits for the witness's record before it falls back to the
/// role in its metadata.
pub const START_QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// The role a volume starts in (see the module doc).
pub fn start_role(cfg: &VolumeConfig, node_name: &str, config_path: &Path) -> Result<Role, String> {
    let Some(w) = cfg.witness.as_ref().filter(|_| cfg.fencing == Fencing::Witness) else {
        return Ok(cfg.role);
    };
    let metadata = volume::open_metadata(cfg, node_name, config_path).map_err(|e| e.to_string())?;
    let sb = metadata.superblock();
    let local = sb.role.unwrap_or(cfg.role);
    let asked = crate::fencing::client::query_record(cfg, node_name, w, START_QUERY_TIMEOUT);
    let role = match &asked {
        Ok(Some(r)) if r.primary.as_deref() == Some(node_name) => Role::Primary,
        Ok(Some(r)) if r.primary.is_some() => Role::Secondary,
        // Nobody is primary (the last one resigned): wait as secondary to be promoted.
        Ok(Some(_)) => Role::Secondary,
        Ok(None) => local,
        Err(e) => {
            tracing::warn!(volume = %cfg.name, "the witness did not answer at start ({e}); starting as {local}, the role this node last held");
            local
        }
    };
    if role == Role::Primary && sb.disk_state != volume::disk::DiskState::UpToDate {
        tracing::warn!(volume = %cfg.name, disk = %sb.disk_state, "this copy is not up to date: starting as secondary");
        return Ok(Role::Secondary);
    }
    if let Ok(Some(r)) = &asked {
        // The witness's epoch is the current one: a node coming back adopts it at once, so it
        // refuses the deposed primary from the start and shows the epoch it serves in.
        if role == Role::Secondary && r.epoch > sb.epoch {
            metadata.update_superblock(|sb| sb.epoch = sb.epoch.max(r.epoch)).map_err(|e| e.to_string())?;
        }
    }
    tracing::info!(volume = %cfg.name, %role, witness = ?asked.as_ref().ok().map(|r| r.as_ref().map(|r| (r.epoch, r.primary.clone()))), "role at start");
    Ok(role)
}

/// With a witness: waits until this primary holds a lease or has its peer (see
/// [`start_primary`]). A stop request ends the wait.
fn wait_until_unfenced(volume: &Volume, stopping: &AtomicBool) {
    let v = &volume.shared;
    if !v.fence.enabled {
        return;
    }
    let start = Instant::now();
    let mut said = false;
    while !stopping.load(Ordering::Acquire) && !v.fence.is_deposed() {
        let peer = v.queue_stats.iter().all(|q| q.link() == crate::volume::stats::LinkState::Connected);
        if peer || v.fence.lease_valid(Instant::now()) {
            return;
        }
        if !said && start.elapsed() > Duration::from_secs(1) {
            tracing::warn!(volume = %v.config.name, "waiting for a lease from the witness or the peer before serving the block device");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the node until SIGINT or SIGTERM. Returns early only on a start-up error.
pub fn run(cfg: NodeConfig) -> Result<(), String> {
    // First, before any thread exists: every thread inherits the blocked signals, and only
    // this one takes them (see metroblk_ublk::signals).
    let signals = TermSignals::block().map_err(|e| e.to_string())?;
    let (events, event_rx) = mpsc::channel::<NodeEvent>();
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let (events, stopping) = (events.clone(), stopping.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = signals.wait();
                stopping.store(true, Ordering::Release);
                let _ = events.send(NodeEvent::Signal(sig));
            })
            .map_err(|e| e.to_string())?;
    }
    let mut handles = Vec::new();
    let mut primaries = Vec::new();
    let mut clients = Vec::new();
    for v in &cfg.volumes {
        let role = start_role(v, &cfg.name, &cfg.path)?;
        let on_change = {
            let events = events.clone();
            move |c: RoleChange| {
                let _ = events.send(NodeEvent::Role(c));
            }
        };
        match role {
            Role::Secondary => {
                let h = start_secondary(v, &cfg.name, &cfg.path)?;
                clients.push(crate::fencing::client::spawn(h.shared.clone(), NodeRole::Secondary, on_change)?);
                handles.push(h);
            }
            Role::Primary => {
                let p = start_primary(v, &cfg.name, &cfg.path, &stopping, |shared| {
                    if shared.config.peer.is_some() {
                        clients.push(crate::fencing::client::spawn(shared.clone(), NodeRole::Primary, on_change)?);
                    }
                    Ok(())
                })?;
                handles.push(VolumeHandle {
                    shared: p.volume.shared.clone(),
                    role: Role::Primary,
                    handoffs: p.volume.handoffs().to_vec(),
                    ublk_device: Some(p.device.path().display().to_string()),
                });
                primaries.push(p);
            }
        }
    }
    control::serve(&cfg.control_socket, cfg.name.clone(), Arc::new(handles))?;
    tracing::info!(node = %cfg.name, control = %cfg.control_socket.display(), "node running");
    let change = match event_rx.recv() {
        Ok(NodeEvent::Signal(signal)) => {
            tracing::info!(node = %cfg.name, signal, "shutting down");
            drop(clients);
            for p in primaries {
                shut_down_primary(p);
            }
            let _ = std::fs::remove_file(&cfg.control_socket);
            return Ok(());
        }
        Ok(NodeEvent::Role(change)) => change,
        Err(_) => return Err("every event source of the node ended".into()),
    };
    // A role change: record it, give up what the old role held, start afresh.
    drop(clients);
    let volume = match &change {
        RoleChange::Promoted { volume, .. }
        | RoleChange::Deposed { volume, .. }
        | RoleChange::Resigned { volume }
        | RoleChange::HandedOver { volume, .. } => volume.clone(),
    };
    for p in primaries {
        if p.volume.shared.config.name == volume {
            record_role_change(&p.volume.shared, &change);
            // The queues fail what they held or parked (deposed); STOP_DEV waits for it.
            let v = &p.volume.shared;
            let start = Instant::now();
            while v.queue_stats.iter().map(|q| QueueStats::get(&q.inflight)).sum::<u64>() > 0
                && start.elapsed() < Duration::from_secs(3)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            tracing::warn!(volume = %volume, device = %p.device.path().display(), "deleting the block device of a primary that lost its role (pending I/O fails)");
            if let Err(e) = p.device.stop() {
                tracing::error!(volume = %volume, "{e}");
            }
            drop(p.volume);
        } else {
            shut_down_primary(p);
        }
    }
    if let Some(v) = secondaries_by_name(&volume) {
        record_role_change(&v, &change);
    }
    let _ = std::fs::remove_file(&cfg.control_socket);
    if matches!(change, RoleChange::HandedOver { .. }) {
        // Lets the control thread answer the operator's `switchover` before the exec.
        std::thread::sleep(Duration::from_millis(50));
    }
    re_exec()
}

/// Records a role change in the volume's metadata before the node starts in its new role.
fn record_role_change(v: &VolumeShared, change: &RoleChange) {
    let r = v.intent.update_superblock(|sb| match change {
        RoleChange::Promoted { epoch, .. } => {
            sb.epoch = sb.epoch.max(*epoch);
            sb.role = Some(Role::Primary);
            // A new line of history: the old primary's writes after our last one are not in it.
            sb.new_generation(uuid::Uuid::new_v4());
            sb.peer_disk_state = Some(volume::disk::DiskState::Outdated);
        }
        RoleChange::Deposed { epoch, .. } => {
            sb.epoch = sb.epoch.max(*epoch);
            sb.role = Some(Role::Secondary);
            // The new primary has writes this copy lacks.
            sb.disk_state = volume::disk::DiskState::Outdated;
        }
        RoleChange::Resigned { .. } => {
            sb.role = Some(Role::Secondary);
            sb.disk_state = volume::disk::DiskState::Failed;
        }
        RoleChange::HandedOver { epoch, .. } => {
            // Drained and in sync: this copy stays up to date.
            sb.epoch = sb.epoch.max(*epoch);
            sb.role = Some(Role::Secondary);
        }
    });
    match r {
        Ok(sb) => {
            tracing::info!(volume = %v.config.name, epoch = sb.epoch, role = ?sb.role, generation = %sb.generation, "role change recorded")
        }
        Err(e) => tracing::error!(volume = %v.config.name, "cannot record the role change: {e}"),
    }
}

/// The running secondaries, for [`run`]'s role change.
fn secondaries_by_name(name: &str) -> Option<Arc<VolumeShared>> {
    SECONDARIES.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|v| v.config.name == name).cloned()
}

static SECONDARIES: std::sync::Mutex<Vec<Arc<VolumeShared>>> = std::sync::Mutex::new(Vec::new());

/// Replaces this process with a fresh `metroblk` of the same arguments.
fn re_exec() -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let _argv0 = args.next();
    tracing::info!("restarting in the new role");
    let err = std::process::Command::new("/proc/self/exe").args(args).exec();
    Err(format!("cannot restart the node in its new role: {err}"))
}

/// Stops and deletes the primary's device (clean shutdown), except when that would hurt:
/// - requests wait for the peer: stopping would fail them (the driver ends what is left of a
///   stopped device with errors);
/// - the device is in use (mounted, or held by device mapper, md, swap): deleting it would
///   pull it from under its user.
///
/// Then the device is left in place, exactly as after `kill -9`: its I/O waits in the kernel
/// and the next start recovers it (and reissues what was in flight).
fn shut_down_primary(p: Primary) {
    let name = p.volume.shared.config.name.clone();
    let held: u64 = p.volume.shared.queue_stats.iter().map(|q| QueueStats::get(&q.held)).sum();
    let why = if held > 0 {
        Some(format!(
            "requests wait for peer {} ({held} held)",
            p.volume.shared.config.peer.as_ref().map_or("-", |p| p.name.as_str())
        ))
    } else if p.device.in_use() {
        Some("the device is in use (mounted or held open exclusively)".to_string())
    } else {
        None
    };
    if let Some(why) = why {
        tracing::warn!(
            volume = %name,
            device = %p.device.path().display(),
            "{why}: leaving the device in place for the next start to recover"
        );
        p.device.abandon();
        // The queue threads keep serving until the process exits; so does the engine.
        std::mem::forget(p.volume);
        return;
    }
    let path = p.device.path();
    match p.device.stop() {
        Ok(()) => tracing::info!(volume = %name, device = %path.display(), "device stopped and deleted"),
        Err(e) => tracing::error!(volume = %name, "{e}"),
    }
    drop(p.volume);
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
