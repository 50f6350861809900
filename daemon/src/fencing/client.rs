//! The I/O around [`Fence`]: one thread per replicated volume, with a small tokio runtime
//! for the witness link (control plane). Every tick it feeds the machine what the engine
//! sees (peer links, disk, resyncs), sends what the machine asks, feeds back the answer and
//! publishes the outcome to the queues through [`FenceShared`](super::shared::FenceShared).
//! It also raises the out-of-sync alert, with or without a witness.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metroblk_protocol::witness::{self as wire, Reply, Request, VolumeId};
use metroblk_witness::client::Client;

use super::group::{group_facts, worst_disk, GroupAlone, VolumeFacts};
use super::lease::LeaseClock;
use super::{Answer, Ask, Fence, NodeRole};
use crate::volume::stats::{LinkState, QueueStats};
use crate::volume::VolumeShared;
use metroblk_protocol::DiskState;

/// How often the machine is fed and polled.
pub const TICK: Duration = Duration::from_millis(50);
/// Connecting to the witness gives up after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A request the witness has not answered in this long is lost (never longer than a third
/// of the lease: renewals must not queue up behind a dead connection).
pub const REQUEST_TIMEOUT_MAX: Duration = Duration::from_secs(1);

/// What the node must do about its role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleChange {
    /// The witness made this secondary the primary in `epoch` (recorded in the metadata).
    Promoted { volume: String, epoch: u64 },
    /// Another node is primary in `epoch`: this primary serves nothing more.
    Deposed { volume: String, epoch: u64 },
    /// This primary resigned (its disk failed).
    Resigned { volume: String },
    /// A planned switchover: the peer is primary in `epoch`; this node's copy is up to date.
    HandedOver { volume: String, epoch: u64 },
}

pub struct FenceClient {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FenceClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The volumes that share one witness record, epoch and lease: a consistency group, or a
/// lone volume (a group of one, whose record is the volume's own).
pub struct Group {
    /// The record's name and uuid at the witness.
    pub name: String,
    pub uuid: uuid::Uuid,
    pub members: Vec<Arc<VolumeShared>>,
}

impl Group {
    fn first(&self) -> &VolumeShared {
        &self.members[0]
    }
}

/// Starts the client of a replicated group opened in `role`.
pub fn spawn(
    group: Group,
    role: NodeRole,
    on_change: impl Fn(RoleChange) + Send + 'static,
) -> Result<FenceClient, String> {
    assert!(!group.members.is_empty(), "a group without volumes");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = std::thread::Builder::new()
        .name(format!("fence-{}", group.name))
        .spawn(move || run(group, role, &on_change, stop2))
        .map_err(|e| format!("cannot start the witness client thread: {e}"))?;
    Ok(FenceClient { stop, thread: Some(thread) })
}

fn volume_id(g: &Group) -> VolumeId {
    let v = g.first();
    let peer = v.config.peer.as_ref().map_or(String::new(), |p| p.name.clone());
    VolumeId::new(&g.name, &g.uuid.to_string(), &v.node_name, &peer)
}

/// Is the peer here? Primary: every queue's link is up. Secondary: the primary was heard
/// from lately (`PRIMARY_SILENCE`; a fresh start counts as heard), and its links, once seen,
/// are still open (a primary that closed them left: no need to wait for the silence).
fn peer_present(v: &VolumeShared, role: NodeRole, now: Instant, links_seen: &mut bool) -> bool {
    match role {
        NodeRole::Primary => v.queue_stats.iter().all(|q| q.link() == LinkState::Connected),
        _ => {
            let link_up = v.queue_stats[0].link() == LinkState::Connected;
            *links_seen |= link_up;
            v.fence.primary_heard_recently(now) && (link_up || !*links_seen)
        }
    }
}

struct WitnessLink {
    addr: SocketAddr,
    key: Vec<u8>,
    /// The witness link's TLS (`[volume.witness] transport = "tls"`).
    tls: Option<metroblk_tls::TlsSetup>,
    node: String,
    client: Option<Client>,
    request_timeout: Duration,
}

impl WitnessLink {
    async fn ask(&mut self, g: &Group, req: &Request) -> Result<Reply, String> {
        if self.client.is_none() {
            let c = Client::connect_over(self.addr, &self.node, &self.key, self.tls.as_ref(), CONNECT_TIMEOUT).await?;
            tracing::info!(group = %g.name, witness = %self.addr, "witness link up");
            self.client = Some(c);
            set_info(g, |w| {
                w.connected = true;
                w.last_error = None;
            });
        }
        let client = self.client.as_mut().expect("connected above");
        match client.request(req, self.request_timeout).await {
            Ok(r) => Ok(r),
            Err(e) => {
                self.client = None;
                Err(e)
            }
        }
    }
}

/// The witness link's state, as every member's status shows it.
fn set_info(g: &Group, f: impl Fn(&mut super::shared::WitnessInfo)) {
    for v in &g.members {
        f(&mut v.fence.witness.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// What the client keeps per member of its group for the alert and the secondary's view.
#[derive(Default)]
struct Member {
    links_seen: bool,
    alerted: bool,
}

/// Each member's facts now (the decisions on them are `group.rs`'s, pure).
fn facts(g: &Group, role: NodeRole, now: Instant, members: &mut [Member]) -> Vec<VolumeFacts> {
    g.members
        .iter()
        .zip(members.iter_mut())
        .map(|(v, m)| VolumeFacts {
            peer_present: peer_present(v, role, now, &mut m.links_seen),
            disk: v.disk.state(),
            writes_held: v.queue_stats.iter().any(|q| QueueStats::get(&q.held) > 0),
            epoch: v.epoch(),
        })
        .collect()
}

fn run(g: Group, role: NodeRole, on_change: &dyn Fn(RoleChange), stop: Arc<std::sync::atomic::AtomicBool>) {
    let name = g.name.clone();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(group = %name, "cannot start the witness client runtime: {e}");
            return;
        }
    };
    // A witness configured under another fencing mode (`none`, `hold`) arbitrates nothing:
    // its section is ignored, or its decisions would hold writes that mode lets go on alone.
    let witness =
        g.first().config.witness.clone().filter(|_| g.first().config.fencing == crate::config::Fencing::Witness);
    let (lease, drift_ppm) =
        witness.as_ref().map_or((crate::config::WITNESS_LEASE_DEFAULT, 0), |w| (w.lease, w.drift_ppm));
    let mut fence = Fence::new(
        role,
        g.members.iter().map(|v| v.epoch()).max().unwrap_or(1),
        LeaseClock::new(lease, drift_ppm),
        g.members.iter().all(|v| v.disk.state() == DiskState::UpToDate),
        // The record is the group's: one member that went alone (granted) outdated them all.
        g.members.iter().any(|v| v.intent.superblock().peer_disk_state == Some(DiskState::Outdated)),
    );
    let mut link = witness.as_ref().map(|w| WitnessLink {
        addr: w.address,
        key: w.authkey.clone(),
        tls: w.tls.clone(),
        node: g.first().node_name.clone(),
        client: None,
        request_timeout: REQUEST_TIMEOUT_MAX.min(lease / super::lease::RENEWALS_PER_LEASE),
    });
    let id = volume_id(&g);
    let mut members: Vec<Member> = g.members.iter().map(|_| Member::default()).collect();
    let mut alone = GroupAlone::new(g.members.len());
    let mut last_query = Instant::now();
    let mut was_present = None;
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let each = facts(&g, fence.role(), now, &mut members);
        let group = group_facts(&each);
        for ((v, m), f) in g.members.iter().zip(members.iter_mut()).zip(&each) {
            // The out-of-sync alert (with or without a witness), per volume.
            let missing = v.fence.note_peer(f.peer_present, now);
            if missing >= v.config.out_of_sync_alert && !v.config.out_of_sync_alert.is_zero() {
                if !m.alerted {
                    tracing::warn!(
                        volume = %v.config.name,
                        missing_s = missing.as_secs(),
                        "out of sync: the peer has been missing for longer than {} s (out_of_sync_alert_s)",
                        v.config.out_of_sync_alert.as_secs()
                    );
                    m.alerted = true;
                }
            } else if f.peer_present {
                m.alerted = false;
            }
        }
        if was_present != Some(group.peer_present) {
            fence.handle_peer_link(group.peer_present);
            if group.peer_present {
                for v in &g.members {
                    v.fence.on_peer_connected();
                }
            }
            was_present = Some(group.peer_present);
        }
        let Some(link) = link.as_mut() else {
            std::thread::sleep(TICK);
            continue;
        };
        if group.disk_failed {
            fence.handle_disk_failed();
        }
        fence.handle_up_to_date(group.up_to_date);
        fence.handle_writes_held(group.writes_held);
        fence.observe_epoch(group.epoch);
        alone.handle_alone_allowed(fence.alone_allowed());
        let mut tell = false;
        for (i, v) in g.members.iter().enumerate() {
            let Some(mark) = v.fence.take_peer_in_sync() else { continue };
            // Going alone ends here for this member (this thread alone grants and revokes
            // it with a witness); then, Dekker-style with `WriteIntent::begin_alone`: a write
            // that completed alone since the copy began is not on the peer, so the witness
            // must not hear it is up to date: resync again instead.
            v.intent.revoke_alone();
            let clean = v.intent.alone_attempts() == mark;
            if !clean {
                tracing::info!(volume = %v.config.name, "a write completed alone during the resync: resyncing again before the witness hears the peer is up to date");
                v.intent.set_resync_needed(true);
                v.sync.restart.store(true, Ordering::Release);
            }
            // The witness's record is the group's: it hears the peer is up to date only once
            // every member is.
            tell |= alone.handle_resynced(i, clean);
        }
        if tell {
            fence.handle_peer_in_sync();
        }
        if g.members.iter().any(|v| v.fence.handover_requested.swap(false, Ordering::AcqRel)) {
            fence.handle_handover_request();
        }
        if let Some(ask) = fence.poll_ask(now) {
            let req = request(&fence, ask, &id, &g);
            let answer = match rt.block_on(link.ask(&g, &req)) {
                Ok(reply) => answer_of(&g, &fence, ask, reply),
                Err(e) => {
                    let info = g.first().fence.witness_info();
                    if info.connected || info.last_error.is_none() {
                        tracing::warn!(group = %name, witness = %link.addr, "witness unreachable: {e}");
                    }
                    set_info(&g, |w| {
                        w.connected = false;
                        w.last_error = Some(e.clone());
                    });
                    Answer::Unreachable
                }
            };
            let before = fence.role();
            fence.handle_answer(Instant::now(), answer.clone());
            publish(&g, &fence, &mut alone);
            let outcome = |r: Result<u64, String>| {
                for v in &g.members {
                    *v.fence.handover_outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(r.clone());
                }
            };
            match (before, fence.role(), ask) {
                (NodeRole::Secondary, NodeRole::Primary, _) => {
                    let epoch = fence.epoch();
                    tracing::warn!(group = %name, epoch, "the witness promoted this node: it becomes the primary");
                    on_change(RoleChange::Promoted { volume: name.clone(), epoch });
                }
                (NodeRole::Primary, NodeRole::Deposed, Ask::Handover) => {
                    let epoch = fence.epoch();
                    tracing::warn!(group = %name, epoch, "switchover: the peer is the primary now; this node becomes secondary");
                    outcome(Ok(epoch));
                    on_change(RoleChange::HandedOver { volume: name.clone(), epoch });
                }
                (NodeRole::Primary, NodeRole::Primary, Ask::Handover) => {
                    let why = match &answer {
                        Answer::Unreachable => "the witness did not answer".to_string(),
                        _ => g.first().fence.witness_info().last_refusal.unwrap_or_else(|| "refused".into()),
                    };
                    outcome(Err(why));
                }
                (NodeRole::Primary, NodeRole::Deposed, Ask::Resign) => {
                    tracing::warn!(group = %name, "resigned as primary (a local disk failed); the peer may take over");
                    on_change(RoleChange::Resigned { volume: name.clone() });
                }
                (NodeRole::Primary, NodeRole::Deposed, _) => {
                    let epoch = fence.epoch();
                    tracing::error!(group = %name, epoch, "deposed: the witness names another primary; this node serves nothing more");
                    on_change(RoleChange::Deposed { volume: name.clone(), epoch });
                }
                _ => {}
            }
        } else {
            publish(&g, &fence, &mut alone);
            // A secondary keeps its witness link warm (and its status true): when its primary
            // goes, the Promote goes out on an open connection.
            if fence.role() == NodeRole::Secondary && now >= last_query + lease / super::lease::RENEWALS_PER_LEASE {
                last_query = now;
                match rt.block_on(link.ask(&g, &Request::Query { volume: id.clone() })) {
                    Ok(Reply::Granted { record }) => fence.observe_epoch(record.epoch),
                    Ok(_) => {}
                    Err(e) => set_info(&g, |w| {
                        w.connected = false;
                        w.last_error = Some(e.clone());
                    }),
                }
            }
        }
        std::thread::sleep(TICK);
    }
}

/// The group's disk state as the witness hears it: its worst member's.
fn group_disk(g: &Group) -> DiskState {
    worst_disk(g.members.iter().map(|v| v.disk.state()))
}

fn request(fence: &Fence, ask: Ask, id: &VolumeId, g: &Group) -> Request {
    let (epoch, lease_ms, drift_ppm) =
        (fence.epoch(), fence.lease().lease().as_millis() as u64, fence.lease().drift_ppm());
    let volume = id.clone();
    match ask {
        Ask::Lease => Request::Lease { volume, epoch, lease_ms, drift_ppm },
        Ask::Outdate => Request::Outdate { volume, epoch, lease_ms, drift_ppm },
        Ask::PeerUpToDate => Request::PeerUpToDate { volume, epoch },
        Ask::Promote => Request::Promote { volume, epoch, disk_state: group_disk(g), lease_ms, drift_ppm },
        Ask::Resign => Request::Resign { volume, epoch, disk_state: group_disk(g) },
        Ask::Handover => Request::Handover {
            volume,
            epoch,
            to: g.first().config.peer.as_ref().map_or(String::new(), |p| p.name.clone()),
        },
    }
}

fn answer_of(g: &Group, fence: &Fence, ask: Ask, reply: Reply) -> Answer {
    let node = &g.first().node_name;
    match reply {
        Reply::Granted { record } => {
            if matches!(ask, Ask::Outdate | Ask::Promote | Ask::Resign | Ask::PeerUpToDate) {
                tracing::info!(group = %g.name, ?ask, epoch = record.epoch, "the witness granted");
            }
            set_info(g, |w| w.last_refusal = None);
            Answer::Granted { epoch: record.epoch }
        }
        Reply::Refused { reason, record } => {
            let reason = metroblk_protocol::printable(reason.as_bytes());
            let newer = record
                .as_ref()
                .is_some_and(|r| r.epoch > fence.epoch() || r.primary.as_deref().is_some_and(|p| p != node));
            // A refusal repeated every retry (a lease's milliseconds counting down) is logged
            // once: compare without the numbers.
            let gist = |s: &str| s.chars().filter(|c| !c.is_ascii_digit()).collect::<String>();
            let changed = g.first().fence.witness_info().last_refusal.as_deref().map(gist) != Some(gist(&reason));
            if changed {
                tracing::warn!(group = %g.name, ?ask, "the witness refused: {reason}");
            }
            set_info(g, |w| w.last_refusal = Some(reason.clone()));
            match record {
                Some(r) if newer && fence.role() == NodeRole::Primary => Answer::Deposed { epoch: r.epoch },
                Some(r) if r.epoch > fence.epoch() => Answer::Deposed { epoch: r.epoch },
                _ => Answer::Refused,
            }
        }
        other => {
            tracing::warn!(group = %g.name, ?ask, "unexpected answer from the witness: {other:?}");
            Answer::Refused
        }
    }
}

/// Hands the machine's outcome to every member's queues: one lease, one epoch, one fence for
/// the group.
fn publish(g: &Group, fence: &Fence, alone: &mut GroupAlone) {
    // The answer just handled may have changed the permission (an Outdate granted).
    alone.handle_alone_allowed(fence.alone_allowed());
    for (i, v) in g.members.iter().enumerate() {
        publish_member(v, fence, || alone.may_go_alone(i, v.queue_stats.iter().any(|q| QueueStats::get(&q.held) > 0)));
    }
}

fn publish_member(v: &VolumeShared, fence: &Fence, may_go_alone: impl FnOnce() -> bool) {
    match fence.role() {
        NodeRole::Deposed => {
            if !v.fence.is_deposed() {
                v.fence.depose();
                // The queues fail what they hold or parked (the device goes next).
                v.conflicts.wake_all_queues();
            }
        }
        NodeRole::Primary => {
            v.fence.set_lease_until(fence.lease().valid_until());
            // The witness recorded the peer outdated in this epoch, and no resync since made
            // it up to date: writes may complete alone (while the lease runs: the queues check
            // it). This thread alone changes the permission (`group.rs` decides per member).
            if may_go_alone() {
                if !v.intent.alone_allowed() {
                    v.intent.allow_alone();
                    v.intent.may_complete_alone();
                    v.conflicts.wake_all_queues();
                }
            } else if v.intent.alone_allowed() {
                v.intent.revoke_alone();
            }
        }
        NodeRole::Secondary => {}
    }
    if fence.epoch() > v.epoch() {
        v.epoch.fetch_max(fence.epoch(), Ordering::Relaxed);
        super::persist_epoch(v, fence.epoch());
    }
}

/// Asks the witness for the volume's record at start (None: it has none yet).
/// `record`: the group's name and uuid at the witness.
pub fn query_record(
    cfg: &crate::config::VolumeConfig,
    record: (&str, uuid::Uuid),
    node_name: &str,
    w: &crate::config::WitnessConfig,
    timeout: Duration,
) -> Result<Option<wire::Record>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let peer = cfg.peer.as_ref().map_or(String::new(), |p| p.name.clone());
    let volume = VolumeId::new(record.0, &record.1.to_string(), node_name, &peer);
    rt.block_on(async {
        let mut c = Client::connect_over(w.address, node_name, &w.authkey, w.tls.as_ref(), timeout).await?;
        match c.request(&Request::Query { volume }, timeout).await? {
            Reply::Granted { record } => Ok(Some(record)),
            Reply::Refused { record, .. } => Ok(record),
            other => Err(format!("unexpected answer: {other:?}")),
        }
    })
}
