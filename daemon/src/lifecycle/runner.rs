//! The I/O around [`Lifecycle`]: one thread per volume executes its commands (open the
//! volume's parts in a role, record a role change, close them) and feeds it the volume's
//! witness client's role changes and the node's stop. What the control socket sees of the
//! volume is its [`VolumeSlot`].
//!
//! A volume's parts in each role:
//! - primary: its ublk device (added, or recovered after a crash; with a witness started only
//!   once unfenced), the engine (queues, links dialled per queue, sync source, write-intent
//!   writer), its witness client, and a listener that answers only the exchange of a peer
//!   that is primary too (so two primaries report their split brain);
//! - secondary: the listener with the links it serves (data and sync) and its witness client.
//!
//! Closing a role ends every thread that holds the volume and then waits until the last
//! reference to its shared state is gone, so the next role opens the metadata and backing
//! file afresh, through the same code as any start: there is one way into each role.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use metroblk_protocol::DiskState;
use metroblk_ublk::{Device, QueueTarget};

use super::parts::{self, PrimaryEngine};
use super::{Change, Closing, Command, Lifecycle, Phase};
use crate::config::RoleGroup;
use crate::config::{Fencing, Role, VolumeConfig, MAX_QUEUES, MAX_QUEUE_DEPTH};
use crate::export::Exports;
use crate::fencing::client::{FenceClient, Group, RoleChange};
use crate::fencing::NodeRole;
use crate::frontend::{self, EngineQueue};
use crate::peer::handoff::LinkHandoff;
use crate::peer::listener::{self, Listener};
use crate::volume::stats::{LinkState, QueueStats};
use crate::volume::VolumeShared;

/// How long a starting volume waits for the witness's record before it falls back to the
/// role in its metadata.
pub const START_QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// At shutdown, in-flight I/O is given this long to complete before the device is left for
/// recovery instead of stopped.
pub const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(2);
/// A primary's in-flight I/O is given this long to drain (or fail) before its device is
/// stopped when the role is lost.
pub const ROLE_LOST_DRAIN_MAX: Duration = Duration::from_secs(3);

/// A serving volume as the control socket reports on it.
pub struct VolumeHandle {
    pub shared: Arc<VolumeShared>,
    pub role: Role,
    pub handoffs: Vec<Arc<LinkHandoff>>,
    pub ublk_device: Option<String>,
}

/// What the control socket sees of one volume, and its way to its group's thread.
pub struct VolumeSlot {
    pub name: String,
    /// The group it changes role with (its own name when in none).
    pub group: String,
    view: Mutex<SlotView>,
    inputs: mpsc::Sender<Input>,
}

/// One volume's state as `status` reports it.
#[derive(Clone)]
pub enum SlotView {
    /// Opening in a role (waiting for the witness, a lease or the device).
    Opening(Role),
    Serving(Arc<VolumeHandle>),
    /// Closing one role to open another (or to stop).
    Changing {
        from: Role,
        to: Option<Role>,
    },
    /// Could not be opened, or its old role could not be released: serves nothing.
    Failed(String),
    Stopped,
}

impl VolumeSlot {
    /// A slot for a volume opened by other means (an in-process engine in tests).
    pub fn serving(handle: VolumeHandle) -> Arc<VolumeSlot> {
        // No thread runs it: an operator's role change is refused (the receiver is gone).
        let (inputs, _) = mpsc::channel();
        let name = handle.shared.config.name.clone();
        Arc::new(VolumeSlot {
            group: name.clone(),
            name,
            view: Mutex::new(SlotView::Serving(Arc::new(handle))),
            inputs,
        })
    }

    /// An operator's role change (`promote`, `demote`), for the group's thread to apply.
    pub fn request_change(&self, change: Change) -> Result<(), String> {
        self.inputs
            .send(Input::Operator(change))
            .map_err(|_| format!("volume {} is not run by this node's volume thread", self.name))
    }

    pub fn view(&self) -> SlotView {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, view: SlotView) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }

    /// The volume's handle while it serves.
    pub fn handle(&self) -> Result<Arc<VolumeHandle>, String> {
        match self.view() {
            SlotView::Serving(h) => Ok(h),
            SlotView::Opening(r) => Err(format!("volume {} is still opening as {r}", self.name)),
            SlotView::Changing { from, to: Some(to) } => {
                Err(format!("volume {} is changing role from {from} to {to}; try again in a moment", self.name))
            }
            SlotView::Changing { .. } | SlotView::Stopped => Err(format!("volume {} is stopping", self.name)),
            SlotView::Failed(why) => Err(format!("volume {} failed: {why}", self.name)),
        }
    }
}

enum Input {
    Role(RoleChange),
    Operator(Change),
    Stop,
}

/// One group's thread (a lone volume is a group of one) and the way to reach it.
pub struct GroupRunner {
    /// One per volume of the group, in config order.
    pub slots: Vec<Arc<VolumeSlot>>,
    inputs: mpsc::Sender<Input>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Set once the first open got past its checks (or failed): what `node run` waits for
    /// before it reports the node started.
    pub settled: Arc<AtomicBool>,
}

/// Where the node's volumes come from.
#[derive(Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub config_path: std::path::PathBuf,
    /// The node is stopping: an open that waits (for a lease, the witness) gives up.
    pub stopping: Arc<AtomicBool>,
}

impl GroupRunner {
    /// Starts the group's thread: it decides the role at start and opens the volumes in it.
    pub fn spawn(group: RoleGroup, node: NodeIdentity) -> Result<GroupRunner, String> {
        assert!(!group.volumes.is_empty(), "a group without volumes");
        let (inputs, rx) = mpsc::channel();
        let slots: Vec<Arc<VolumeSlot>> = group
            .volumes
            .iter()
            .map(|v| {
                Arc::new(VolumeSlot {
                    name: v.name.clone(),
                    group: group.name.clone(),
                    view: Mutex::new(SlotView::Opening(v.role)),
                    inputs: inputs.clone(),
                })
            })
            .collect();
        let settled = Arc::new(AtomicBool::new(false));
        let thread = {
            let (slots, inputs, settled) = (slots.clone(), inputs.clone(), settled.clone());
            std::thread::Builder::new()
                .name(format!("group-{}", group.name))
                .spawn(move || run(group, node, slots, inputs, rx, settled))
                .map_err(|e| format!("cannot start the thread of a volume: {e}"))?
        };
        Ok(GroupRunner { slots, inputs, thread: Some(thread), settled })
    }

    /// Asks the group to stop (close its role and end its thread).
    pub fn stop(&self) {
        let _ = self.inputs.send(Input::Stop);
    }

    /// Waits for the group's thread to end (after [`Self::stop`]).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A role's open parts: every volume of the group in that role, and the group's witness
/// client.
enum Parts {
    /// `exchanges`: the listeners that answer a peer that is primary too (the exchange only).
    Primary {
        primaries: Vec<Primary>,
        client: Option<FenceClient>,
        exchanges: Vec<Listener>,
        exports: Exports,
    },
    Secondary {
        secondaries: Vec<Secondary>,
        client: Option<FenceClient>,
        exports: Exports,
    },
}

impl Parts {
    fn shared(&self) -> Vec<Arc<VolumeShared>> {
        match self {
            Parts::Primary { primaries, .. } => primaries.iter().map(|p| p.volume.shared.clone()).collect(),
            Parts::Secondary { secondaries, .. } => secondaries.iter().map(|s| s.shared.clone()).collect(),
        }
    }

    /// Each volume's handle, in the group's order.
    fn handles(&self, role: Role) -> Vec<VolumeHandle> {
        match self {
            Parts::Primary { primaries, .. } => primaries
                .iter()
                .map(|p| VolumeHandle {
                    shared: p.volume.shared.clone(),
                    role,
                    handoffs: p.volume.handoffs().to_vec(),
                    ublk_device: Some(p.device.path().display().to_string()),
                })
                .collect(),
            Parts::Secondary { secondaries, .. } => secondaries
                .iter()
                .map(|s| VolumeHandle { shared: s.shared.clone(), role, handoffs: Vec::new(), ublk_device: None })
                .collect(),
        }
    }
}

fn set_all(slots: &[Arc<VolumeSlot>], view: SlotView) {
    for s in slots {
        s.set(view.clone());
    }
}

fn run(
    group: RoleGroup,
    node: NodeIdentity,
    slots: Vec<Arc<VolumeSlot>>,
    inputs: mpsc::Sender<Input>,
    rx: mpsc::Receiver<Input>,
    settled: Arc<AtomicBool>,
) {
    let name = group.name.clone();
    let role = match start_role(&group, &node.name, &node.config_path) {
        Ok(r) => r,
        Err(e) => {
            set_all(&slots, SlotView::Failed(e));
            settled.store(true, Ordering::Release);
            // Stays until the node stops, so `status` can say why.
            while let Ok(input) = rx.recv() {
                if matches!(input, Input::Stop) {
                    break;
                }
            }
            set_all(&slots, SlotView::Stopped);
            return;
        }
    };
    let mut life = Lifecycle::new(role);
    let mut parts: Option<Parts> = None;
    let mut leaked: Vec<Weak<VolumeShared>> = Vec::new();
    // The operator's `resync --discard-local` demoted this primary: the secondary it opens
    // as next drops its changes.
    let mut discard_local = false;
    loop {
        while let Some(command) = life.poll_command() {
            match command {
                Command::Open(role) => {
                    set_all(&slots, SlotView::Opening(role));
                    let on_change = {
                        let inputs = inputs.clone();
                        move |c: RoleChange| {
                            let _ = inputs.send(Input::Role(c));
                        }
                    };
                    let opened = open(&group, &node, role, on_change, &settled, std::mem::take(&mut discard_local));
                    match opened {
                        Ok(p) => {
                            for (slot, h) in slots.iter().zip(p.handles(role)) {
                                slot.set(SlotView::Serving(Arc::new(h)));
                            }
                            parts = Some(p);
                            life.handle_opened(Instant::now());
                        }
                        Err(e) => {
                            if settled.load(Ordering::Acquire) {
                                // Not the node's first open: nobody else reports it.
                                tracing::error!(group = %name, "cannot open as {role}: {e}");
                            }
                            set_all(&slots, SlotView::Failed(e));
                            life.handle_open_failed();
                        }
                    }
                    settled.store(true, Ordering::Release);
                }
                Command::Record(change) => {
                    discard_local = matches!(change, Change::DemotedByOperator { discard_local: true });
                    if let Some(p) = &parts {
                        for v in p.shared() {
                            record_role_change(&v, change);
                        }
                    }
                }
                Command::Close { role, how, deadline } => {
                    let to = match life.phase() {
                        Phase::Closing { then: super::Then::Open(r), .. } => Some(r),
                        _ => None,
                    };
                    set_all(&slots, SlotView::Changing { from: role, to });
                    let p = parts.take().expect("a close comes only with open parts");
                    match close(p, how, deadline) {
                        Ok(()) => life.handle_closed(),
                        Err((why, weak)) => {
                            tracing::error!(group = %name, "cannot release the {role} role: {why}; the group serves nothing until the node restarts");
                            leaked.extend(weak);
                            set_all(&slots, SlotView::Failed(format!("its {role} role could not be released: {why}")));
                            life.handle_close_failed();
                        }
                    }
                }
            }
        }
        match life.phase() {
            Phase::Stopped => {
                set_all(&slots, SlotView::Stopped);
                return;
            }
            Phase::Failed | Phase::Serving(_) => {}
            other => unreachable!("no command pending while {other:?}"),
        }
        let Ok(input) = rx.recv() else {
            life.handle_stop(Instant::now());
            continue;
        };
        match input {
            Input::Stop => life.handle_stop(Instant::now()),
            Input::Role(c) => {
                let change = match c {
                    RoleChange::Promoted { epoch, .. } => Change::Promoted { epoch },
                    RoleChange::Deposed { epoch, .. } => Change::Deposed { epoch },
                    RoleChange::Resigned { .. } => Change::Resigned,
                    RoleChange::HandedOver { epoch, .. } => Change::HandedOver { epoch },
                };
                if !life.handle_role_change(Instant::now(), change) {
                    tracing::info!(group = %name, ?change, phase = ?life.phase(), "a stale role change: ignored");
                }
            }
            Input::Operator(change) => {
                tracing::warn!(group = %name, ?change, "role change asked by the operator");
                if !life.handle_role_change(Instant::now(), change) {
                    tracing::warn!(group = %name, ?change, phase = ?life.phase(), "the operator's role change does not apply now: ignored");
                }
            }
        }
    }
}

/// Opens every volume of the group in `role`, with the group's witness client. A volume that
/// cannot be opened fails the group's open (what was opened is closed again): a group serves
/// as one or not at all.
fn open(
    group: &RoleGroup,
    node: &NodeIdentity,
    role: Role,
    on_change: impl Fn(RoleChange) + Send + 'static,
    settled: &AtomicBool,
    discard_local: bool,
) -> Result<Parts, String> {
    let replicated = group.volumes[0].peer.is_some();
    let record = |members: Vec<Arc<VolumeShared>>| Group { name: group.name.clone(), uuid: group.uuid, members };
    // Export: first removes what an earlier run of this node left in configfs.
    let exports = Exports::open(group, &node.name)?;
    match role {
        Role::Secondary => {
            let mut secondaries = Vec::new();
            for cfg in &group.volumes {
                let secondary = start_secondary(cfg, &node.name, &node.config_path)?;
                if discard_local || secondary.shared.intent.superblock().discard_local {
                    // `resync --discard-local` (on the primary that became this secondary, or
                    // before a restart): the first exchange drops this copy's changes. The
                    // metadata keeps it until the resync from the peer completes.
                    secondary.shared.sync.discard_local.store(true, Ordering::Release);
                    tracing::warn!(volume = %cfg.name, "this node's changes are dropped at the first exchange: it resyncs from the peer");
                }
                secondaries.push(secondary);
            }
            let members = secondaries.iter().map(|s| s.shared.clone()).collect();
            let client = crate::fencing::client::spawn(record(members), NodeRole::Secondary, on_change)?;
            Ok(Parts::Secondary { secondaries, client: Some(client), exports })
        }
        Role::Primary => {
            let mut prepared = Vec::new();
            for cfg in &group.volumes {
                prepared.push(prepare_primary(cfg, &node.name, &node.config_path)?);
            }
            let client = if replicated {
                let members = prepared.iter().map(|p| p.volume.shared.clone()).collect();
                Some(crate::fencing::client::spawn(record(members), NodeRole::Primary, on_change)?)
            } else {
                None
            };
            // Past the checks: what follows waits for a lease or the peer.
            settled.store(true, Ordering::Release);
            let mut primaries = Vec::new();
            for p in prepared {
                primaries.push(serve_primary(p, &node.stopping)?);
            }
            // Two nodes that both hold the volume as primary (an operator promoted one while
            // the other went on alone) must still meet and report the split brain: each
            // dials the other's listen address, so a primary answers there too.
            let exchanges = primaries
                .iter()
                .filter(|p| p.volume.shared.config.peer.is_some())
                .filter_map(|p| {
                    listener::start_serving(p.volume.shared.clone(), listener::Serving::PrimaryExchange)
                        .map_err(|e| {
                            tracing::warn!(volume = %p.volume.shared.config.name, "{e}; a peer that is primary too will not be answered")
                        })
                        .ok()
                })
                .collect();
            // Export: now serving as primary.
            exports.serve(
                &primaries
                    .iter()
                    .map(|p| (p.volume.shared.config.name.clone(), p.device.path(), Arc::downgrade(&p.volume.shared)))
                    .collect::<Vec<_>>(),
            );
            Ok(Parts::Primary { primaries, client, exchanges, exports })
        }
    }
}

/// Closes a role's parts and waits until nothing holds the group's volumes any more. On
/// failure, returns why and the volumes that could not be released.
fn close(parts: Parts, how: Closing, deadline: Instant) -> Result<(), (String, Vec<Weak<VolumeShared>>)> {
    let weak: Vec<Weak<VolumeShared>> = parts.shared().iter().map(Arc::downgrade).collect();
    let mut left_for_recovery = false;
    match parts {
        Parts::Primary { primaries, client, exchanges, mut exports } => {
            // Export: stopping being primary. Role lost: it withdraws while the device stops
            // (ending its sessions waits for the I/O the stop fails). Shutdown: it goes down
            // first, so the device is no longer in use when the shutdown looks.
            exports.begin_close(how);
            if how == Closing::Shutdown {
                if let Err(e) = exports.finish_close((Instant::now() + SHUTDOWN_DRAIN_MAX).min(deadline)) {
                    tracing::warn!("{e}");
                }
            }
            for l in exchanges {
                if let Err(e) = l.stop(deadline) {
                    tracing::error!("{e}");
                }
            }
            // The client first: no role change or lease renewal after this point.
            drop(client);
            // Every volume's I/O is failed or left at once (not one after the other): the
            // group gives up its role as one.
            match how {
                Closing::RoleLost => {
                    let stops: Vec<_> = primaries.into_iter().map(|p| stop_deposed_primary(p, deadline)).collect();
                    if let Err(e) = exports.finish_close(deadline) {
                        tracing::error!("{e}");
                    }
                    for r in stops {
                        r.map_err(|e| (e, weak.clone()))?;
                    }
                }
                Closing::Shutdown => {
                    for p in primaries {
                        left_for_recovery |= !shut_down_primary(p);
                    }
                }
            }
        }
        Parts::Secondary { secondaries, client, mut exports } => {
            exports.begin_close(how);
            if let Err(e) = exports.finish_close(deadline) {
                tracing::error!("{e}");
            }
            drop(client);
            for Secondary { shared, listener } in secondaries {
                drop(shared);
                listener.stop(deadline).map_err(|e| (e, weak.clone()))?;
            }
        }
    }
    if left_for_recovery {
        // Their threads serve until the process exits.
        return Ok(());
    }
    for w in &weak {
        wait_released(w, deadline).map_err(|e| (e, weak.clone()))?;
    }
    Ok(())
}

/// Waits until every thread let go of the volume (so the next role can open its files).
fn wait_released(weak: &Weak<VolumeShared>, deadline: Instant) -> Result<(), String> {
    while weak.strong_count() > 0 {
        if Instant::now() >= deadline {
            return Err(format!("{} references to the volume remain after the deadline", weak.strong_count()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// A primary that lost its role (deposed, resigned, handed over): its queues fail what
/// they held or parked (the fence is latched deposed); the device is deleted once the rest
/// drained, or at the drain limit (what is still pending then fails): its page cache must
/// never see the other site's data.
fn stop_deposed_primary(p: Primary, deadline: Instant) -> Result<(), String> {
    let v = p.volume.shared.clone();
    let name = v.config.name.clone();
    let drain_until = (Instant::now() + ROLE_LOST_DRAIN_MAX).min(deadline);
    while v.queue_stats.iter().map(|q| QueueStats::get(&q.inflight)).sum::<u64>() > 0 && Instant::now() < drain_until {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(v);
    tracing::warn!(volume = %name, device = %p.device.path().display(), "deleting the block device of a primary that lost its role (pending I/O fails)");
    // STOP_DEV waits for the kernel's requests in flight, which the queues end (failed, as
    // the fence is latched): bounded, but on a thread of its own so the deadline holds.
    let Primary { device, volume } = p;
    let (done, stopped) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("stop-{name}"))
        .spawn(move || {
            let r = device.stop().map_err(|e| e.to_string());
            drop(volume);
            let _ = done.send(r);
        })
        .map_err(|e| format!("cannot start a thread to stop the device: {e}"))?;
    match stopped.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            // The device may be gone or not; the engine is closed either way.
            tracing::error!(volume = %name, "{e}");
            Ok(())
        }
        Err(_) => Err("the device did not stop before the deadline".into()),
    }
}

/// Stops and deletes the primary's device at shutdown, except when that would hurt:
/// - requests wait for the peer (held), were parked while fenced, are still in flight after
///   [`SHUTDOWN_DRAIN_MAX`], or could be parked (a witness-fenced volume without a lease):
///   stopping would fail them (the driver ends what is left of a stopped device with errors),
///   or wait for ever;
/// - the device is in use (mounted, or held by device mapper, md, swap): deleting it would
///   pull it from under its user.
///
/// Then the device is left in place, exactly as after `kill -9`: its I/O waits in the kernel
/// and the next start recovers it (and reissues what was in flight). Returns whether the
/// device was stopped (false: left for recovery; its threads run until the process exits).
fn shut_down_primary(p: Primary) -> bool {
    let name = p.volume.shared.config.name.clone();
    let sum = |f: fn(&QueueStats) -> &std::sync::atomic::AtomicU64| -> u64 {
        p.volume.shared.queue_stats.iter().map(|q| QueueStats::get(f(q))).sum()
    };
    let v = &p.volume.shared;
    let peer = v.config.peer.as_ref().map_or("-", |p| p.name.as_str());
    // STOP_DEV waits for every request the kernel handed the queues: it is issued only once
    // none is in flight and none can be parked for good (a witness-fenced volume without a
    // lease parks what arrives). A request that is neither held nor parked yet may still be
    // waiting for a peer that is gone (its link loss not yet detected): the drain is bounded.
    let drain_until = Instant::now() + SHUTDOWN_DRAIN_MAX;
    let why = loop {
        let (held, parked, inflight) = (sum(|q| &q.held), sum(|q| &q.parked), sum(|q| &q.inflight));
        if held > 0 || parked > 0 {
            break Some(format!(
                "requests wait for peer {peer} ({held} held, {parked} parked while fenced or switching)"
            ));
        }
        if v.fence.enabled && !v.fence.lease_valid(Instant::now()) {
            break Some("the volume holds no lease (I/O arriving now would be parked)".to_string());
        }
        if inflight == 0 {
            break None;
        }
        if Instant::now() >= drain_until {
            break Some(format!(
                "{inflight} requests in flight did not complete within {} ms (the peer {peer} may be gone)",
                SHUTDOWN_DRAIN_MAX.as_millis()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let why = if why.is_some() {
        why
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
        return false;
    }
    let path = p.device.path();
    match p.device.stop() {
        Ok(()) => tracing::info!(volume = %name, device = %path.display(), "device stopped and deleted"),
        Err(e) => tracing::error!(volume = %name, "{e}"),
    }
    drop(p.volume);
    true
}

/// Records a role change in the volume's metadata before the old role closes.
fn record_role_change(v: &VolumeShared, change: Change) {
    let r = v.intent.update_superblock(|sb| match change {
        Change::Promoted { epoch } => {
            sb.epoch = sb.epoch.max(epoch);
            sb.role = Some(Role::Primary);
            // A new line of history: the old primary's writes after our last one are not in it.
            sb.new_generation(uuid::Uuid::new_v4());
            sb.peer_disk_state = Some(DiskState::Outdated);
        }
        Change::Deposed { epoch } => {
            sb.epoch = sb.epoch.max(epoch);
            sb.role = Some(Role::Secondary);
            // The new primary has writes this copy lacks.
            sb.disk_state = DiskState::Outdated;
        }
        Change::Resigned => {
            sb.role = Some(Role::Secondary);
            sb.disk_state = DiskState::Failed;
        }
        Change::HandedOver { epoch } => {
            // Drained and in sync: this copy stays up to date.
            sb.epoch = sb.epoch.max(epoch);
            sb.role = Some(Role::Secondary);
        }
        Change::PromotedByOperator { forced } => {
            // A higher epoch: the old primary's writes, should it still be running, are
            // refused here (the fencing token) and a new line of history starts.
            sb.epoch = sb.epoch.max(1) + 1;
            sb.role = Some(Role::Primary);
            sb.new_generation(uuid::Uuid::new_v4());
            sb.peer_disk_state = Some(DiskState::Outdated);
            if forced {
                // The operator's word: this copy is the data from now on.
                sb.disk_state = DiskState::UpToDate;
            }
        }
        Change::DemotedByOperator { discard_local } => {
            sb.role = Some(Role::Secondary);
            if discard_local {
                // The operator dropped this copy's changes: it misses the peer's.
                sb.disk_state = DiskState::Outdated;
                sb.discard_local = true;
            }
        }
    });
    match r {
        Ok(sb) => {
            tracing::info!(volume = %v.config.name, epoch = sb.epoch, role = ?sb.role, generation = %sb.generation, "role change recorded")
        }
        Err(e) => tracing::error!(volume = %v.config.name, "cannot record the role change: {e}"),
    }
}

/// A secondary volume: its shared state and the listener serving the primary's links.
pub struct Secondary {
    pub shared: Arc<VolumeShared>,
    pub listener: Listener,
}

/// Opens a volume as secondary: backing file, shared state, listener.
pub fn start_secondary(cfg: &VolumeConfig, node_name: &str, config_path: &Path) -> Result<Secondary, String> {
    let intent = parts::open_metadata(cfg, node_name, config_path)?;
    // One set of counters per primary queue's link; [0] also holds the link state.
    let shared = parts::open_shared(cfg, node_name, intent, MAX_QUEUES)?;
    if shared.intent.superblock().full_resync {
        // `metroblk attach` after a disk failure: the next resync copies every region.
        shared.sync.request(crate::resync::Requested { full: true, checksum: false });
    }
    if shared.fence.enabled {
        delete_orphan_device(cfg, node_name)?;
    }
    let listener = listener::start(shared.clone())?;
    Ok(Secondary { shared, listener })
}

/// A node that lost its primary role (killed, then replaced) may have left its device, its
/// I/O queued in the kernel: delete it (see `metroblk_ublk::delete_orphan`).
fn delete_orphan_device(cfg: &VolumeConfig, node_name: &str) -> Result<(), String> {
    let id_file = frontend::ublk_id_file(cfg);
    let dev_id = if cfg.ublk_id >= 0 { cfg.ublk_id } else { frontend::read_ublk_id(&id_file)?.unwrap_or(-1) };
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
    pub volume: PrimaryEngine,
}

/// A primary before it serves: the device added (or found for recovery) and the engine open.
pub struct PreparedPrimary {
    device: Device,
    volume: PrimaryEngine,
}

/// Opens a volume as primary up to serving: adds the device (or finds the one a killed
/// daemon left, for recovery) and opens the engine with as many queues as the device has.
/// Nothing is served yet; [`serve_primary`] starts the queues.
pub fn prepare_primary(cfg: &VolumeConfig, node_name: &str, config_path: &Path) -> Result<PreparedPrimary, String> {
    let err = |e: &dyn std::fmt::Display| format!("volume {}: {e}", cfg.name);
    // Before the device exists: a node without usable metadata serves nothing, and neither
    // does one whose copy is not up to date.
    let intent = parts::open_metadata(cfg, node_name, config_path)?;
    let disk_state = intent.superblock().disk_state;
    if disk_state != DiskState::UpToDate {
        return Err(format!(
            "volume {}: this node's copy is {disk_state} ({}), so it cannot be the primary; start it as the \
             secondary and let a resync from the peer finish",
            cfg.name,
            match disk_state {
                DiskState::Inconsistent => "a resync to it did not finish",
                DiskState::Failed => "its disk failed",
                _ => "it misses writes the peer has",
            }
        ));
    }
    let id_file = frontend::ublk_id_file(cfg);
    let remembered = if cfg.ublk_id >= 0 { None } else { frontend::read_ublk_id(&id_file)? };
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
        frontend::write_ublk_id(&id_file, device.dev_id(), &cfg.name)?;
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
    // Only a recovered device can disagree: one is added in zero copy only where the payload
    // goes unchecked (`frontend::device_params`), and a recovered one keeps its mode.
    if device.zero_copy() && cfg.payload_checksum.sends_crc() {
        return Err(err(&format!(
            "{} runs in zero copy (it was created with payload_checksum = \"none\"), which cannot compute \
             the crc32c that payload_checksum = \"crc32c\" asks for; set it back to \"none\" until the device \
             is stopped and created again",
            device.path().display()
        )));
    }
    let volume = PrimaryEngine::open_with(cfg, node_name, device.queues(), intent)?;
    // Before the queues are made: they take their data path from it.
    volume.shared.zero_copy.store(device.zero_copy(), std::sync::atomic::Ordering::Relaxed);
    Ok(PreparedPrimary { device, volume })
}

/// Starts serving a prepared primary's device: one queue thread per queue driving the
/// engine on libublk's ring. With a witness the device is started only once the fence is
/// lifted (a lease, or the peer): the witness client must be running already. So a
/// restarted primary that may have been replaced serves nothing, not even the kernel's
/// partition scan.
pub fn serve_primary(p: PreparedPrimary, stopping: &AtomicBool) -> Result<Primary, String> {
    let PreparedPrimary { mut device, volume } = p;
    let name = volume.shared.config.name.clone();
    wait_until_unfenced(&volume, stopping);
    device
        .start(|qid, depth| Box::new(EngineQueue::new(volume.queue(qid, depth))) as Box<dyn QueueTarget>)
        .map_err(|e| format!("volume {name}: {e}"))?;
    tracing::info!(
        volume = %name,
        device = %device.path().display(),
        recovered = device.is_recovery(),
        "primary serving its block device"
    );
    Ok(Primary { device, volume })
}

/// The role a group starts in. A standalone volume (no peer): the config's. Without a
/// witness: the role an operator last gave it (`promote`, `demote`, `resync --discard-local`,
/// kept in each volume's metadata), else the config's. With one (`fencing = "witness"`), the
/// witness's record of the group if it answers at start, else the role the witness last gave
/// this node (kept in the metadata), else the config's preferred role; primary then only if
/// every volume's copy is up to date. Without a witness a copy that is not up to date is not
/// demoted quietly: asked to be primary, it is refused in one line.
pub fn start_role(group: &RoleGroup, node_name: &str, config_path: &Path) -> Result<Role, String> {
    let first = &group.volumes[0];
    if first.peer.is_none() {
        return Ok(first.role);
    }
    let mut metadata = Vec::new();
    for cfg in &group.volumes {
        metadata.push(parts::open_metadata(cfg, node_name, config_path)?);
    }
    let local =
        if metadata.iter().zip(&group.volumes).all(|(m, c)| m.superblock().role.unwrap_or(c.role) == Role::Primary) {
            Role::Primary
        } else {
            Role::Secondary
        };
    let Some(w) = first.witness.as_ref().filter(|_| first.fencing == Fencing::Witness) else {
        // Without a witness the role is the operator's: the last `promote`/`demote` (or
        // `resync --discard-local`) recorded in the metadata, else the config's. A copy that
        // is not up to date and is asked to be primary is refused by `prepare_primary` in one
        // line: the operator asked for it, so nothing starts in another role behind their back.
        if local != first.role {
            tracing::info!(group = %group.name, role = %local, config = %first.role, "starting in the role an operator last gave this node, not the config's");
        }
        return Ok(local);
    };
    let asked =
        crate::fencing::client::query_record(first, (&group.name, group.uuid), node_name, w, START_QUERY_TIMEOUT);
    let role = match &asked {
        Ok(Some(r)) if r.primary.as_deref() == Some(node_name) => Role::Primary,
        Ok(Some(r)) if r.primary.is_some() => Role::Secondary,
        // Nobody is primary (the last one resigned): wait as secondary to be promoted.
        Ok(Some(_)) => Role::Secondary,
        Ok(None) => local,
        Err(e) => {
            tracing::warn!(group = %group.name, "the witness did not answer at start ({e}); starting as {local}, the role this node last held");
            local
        }
    };
    if role == Role::Primary && !up_to_date(group, &metadata) {
        return Ok(Role::Secondary);
    }
    if let Ok(Some(r)) = &asked {
        // The witness's epoch is the current one: a node coming back adopts it at once, so it
        // refuses the deposed primary from the start and shows the epoch it serves in.
        for m in &metadata {
            if role == Role::Secondary && r.epoch > m.superblock().epoch {
                m.update_superblock(|sb| sb.epoch = sb.epoch.max(r.epoch)).map_err(|e| e.to_string())?;
            }
        }
    }
    tracing::info!(group = %group.name, %role, witness = ?asked.as_ref().ok().map(|r| r.as_ref().map(|r| (r.epoch, r.primary.clone()))), "role at start");
    Ok(role)
}

/// Whether every volume's copy of the group is up to date here (else, with the reason, no).
fn up_to_date(group: &RoleGroup, metadata: &[Arc<crate::bitmap::WriteIntent>]) -> bool {
    match metadata.iter().zip(&group.volumes).find(|(m, _)| m.superblock().disk_state != DiskState::UpToDate) {
        Some((m, c)) => {
            tracing::warn!(group = %group.name, volume = %c.name, disk = %m.superblock().disk_state, "this copy is not up to date: starting as secondary");
            false
        }
        None => true,
    }
}

/// With a witness: waits until this primary holds a lease or has its peer (see
/// [`start_primary`]). A stop request ends the wait.
fn wait_until_unfenced(volume: &PrimaryEngine, stopping: &AtomicBool) {
    let v = &volume.shared;
    if !v.fence.enabled {
        return;
    }
    let start = Instant::now();
    let mut said = false;
    while !stopping.load(Ordering::Acquire) && !v.fence.is_deposed() {
        let peer = v.queue_stats.iter().all(|q| q.link() == LinkState::Connected);
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
