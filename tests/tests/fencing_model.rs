//! Model check of fencing and promotion: the node's [`Fence`] and the witness's [`Registry`],
//! the real pure machines, driven by stateright over every interleaving (BFS, bounded time) of
//! link cuts and heals (A–B, A–witness, B–witness), node crashes and restarts, witness crashes
//! and restarts, a disk failure, application writes and the passing of time (lease expiry).
//!
//! # The rule checked
//! * Never two nodes serving I/O at once, and never two nodes serving in one epoch.
//! * Every node that serves holds every write acknowledged to the application (so nothing
//!   acknowledged is missing from a node that is later promoted and serves).
//! * A node is promoted only when its copy is up to date: when the witness names it primary it
//!   holds every acknowledged write and its disk is up to date as its request said (never an
//!   outdated, inconsistent or failed copy); when its fence takes the promotion it still holds
//!   every acknowledged write. (A disk that fails after the request was sent is a new fault:
//!   `start_role` then keeps the node secondary.)
//! * Liveness, as a bounded-time safety property: with at most one fault of any kind (a cut of
//!   any of the three links, a node crash, a witness crash, a disk failure), in every quiescent
//!   state two leases plus a step after it a primary serves (or would, for the next write: see
//!   [`available`]). Two faults can leave no one serving by design (the witness crashed and the
//!   primary lost; both disks failed), so they are not checked for liveness. The model starts
//!   from the steady state after A's first lease: before it the witness has no record and
//!   promotes no one, so a fault then (A's disk failing) leaves the volume down.
//! * Sometimes-properties (so a vacuous model fails): a promotion, a primary going on alone, a
//!   write acknowledged after a fault.
//!
//! # What is modelled, and how faithfully
//! Two data nodes, A (`alpha`, starts primary at epoch 1) and B (`beta`, secondary), and one
//! witness with no record yet (A's first lease registers the volume). Each node is its `Fence`,
//! its persisted metadata (epoch, role, disk state, peer recorded outdated), its data (a bit per
//! acknowledged-or-not write it holds) and at most one write held in its queues. The glue is
//! what the daemon does around the machines:
//! * a poll is one tick of `fencing/client.rs` `run`: feed peer link, disk, up-to-date, writes
//!   held and the epoch, then `poll_ask`; the request goes to the witness if the node's link to
//!   it is up and it is alive, else the node is answered `Unreachable` (a timeout);
//! * the witness's reply is mapped to an [`Answer`] exactly as `client.rs` `answer_of` does;
//! * a role change (promoted, deposed, resigned) is recorded in the metadata as
//!   `lifecycle/runner.rs` `record_role_change` does and the group reopens in the new role in
//!   the running node (a fresh `Fence::new` from the metadata, no witness query; a primary
//!   whose copy is not up to date fails to open, modelled as a crash). A crash restart goes
//!   through `start_role`: the witness's record if it answers, else the metadata's role, never
//!   primary when not up to date;
//! * the link between the nodes carries replication only between a primary and a secondary
//!   whose epoch is not above the primary's (the handshake), both alive with working disks; a
//!   secondary adopts the primary's epoch from it. A write completes when the fence's I/O mode
//!   allows it: replicated to a connected peer, or alone; otherwise it is held;
//! * a resync (any time a primary and its secondary are connected and differ) copies the
//!   primary's data, makes the secondary up to date and tells the primary's fence
//!   (`handle_peer_in_sync`), as the resync source does.
//!
//! Time moves in steps of [`STEP_MS`] on one global clock; the lease is [`LEASE_MS`] with a
//! drift bound of [`DRIFT_PPM`]. Clock drift is folded in as the design does: the node's lease
//! holds until `t_request + lease × (1 − drift)` by its clock and the witness waits
//! `lease × (1 + drift)` after its grant by its own, so with clocks within the bound both are at
//! most one lease of real time apart; the model runs both with the configured drift on the one
//! clock. With steps of a quarter lease the check is of the protocol's logic, not of the
//! drift margin's arithmetic (tested in `lease.rs` and `registry.rs`). "Maximal progress": time advances only when no message is in flight and no node's
//! poll would change anything, so no node is stalled forever and the bounded liveness check
//! means something. A lost message is noticed within the step (the real timeout is at most a
//! third of a lease; the lease counts from the request, so a late answer only shortens it).

use std::time::Instant;

use metroblk::fencing::{Answer, Ask, Fence, Io, NodeRole};
use metroblk_protocol::witness::{DiskState, Reply, Request, VolumeId};
use metroblk_tests::model_clock::{base, instant, lease_clock, A, B, DRIFT_PPM, LEASE_MS, NAMES, STEP_MS};
use metroblk_witness::registry::Registry;
use stateright::{Checker, Model, Property};

const VOLUME: &str = "vol0";
const UUID: &str = "6d657472-6f62-6c6b-0000-000000000001";

fn volume() -> VolumeId {
    VolumeId::new(VOLUME, UUID, NAMES[A], NAMES[B])
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Link {
    Ab,
    Aw,
    Bw,
}

const LINKS: [Link; 3] = [Link::Ab, Link::Aw, Link::Bw];

/// What the node keeps in its metadata across restarts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Meta {
    epoch: u64,
    primary: bool,
    disk: DiskState,
    /// `peer_disk_state == Outdated`: it completed writes alone (or was promoted).
    peer_outdated: bool,
}

/// A message between a node and the witness (one per node: a fence asks one thing at a time).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Flight {
    /// What `client.rs` `request` puts in the request, as it was when sent.
    Request { ask: Ask, epoch: u64, disk: DiskState },
    /// What `answer_of` reads of the reply.
    Reply(Gist),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Gist {
    Granted {
        epoch: u64,
    },
    /// The record sent with a refusal: its epoch and primary (a node index).
    Refused {
        record: Option<(u64, Option<usize>)>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Node {
    alive: bool,
    fence: Fence,
    meta: Meta,
    /// The writes this copy holds, one bit per write.
    data: u8,
    /// A write waiting in the queues (its bit).
    held: Option<u8>,
    flight: Option<Flight>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    now: u8,
    nodes: [Node; 2],
    /// Up or down, indexed like [`LINKS`].
    links: [bool; 3],
    witness: Registry,
    witness_alive: bool,
    /// Writes issued so far (write `k` is bit `1 << k`).
    writes: u8,
    /// The writes acknowledged to the application.
    acked: u8,
    faults: u8,
    /// The step of the last fault.
    fault_at: u8,
    /// Bit `e`: the node served I/O in epoch `e`.
    served_epochs: [u32; 2],
    promotions: u8,
    /// A node was promoted that lacked an acknowledged write or was not recorded up to date.
    bad_promotion: bool,
    went_alone: bool,
    acked_after_fault: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    Poll(usize),
    WitnessHandles(usize),
    Deliver(usize),
    /// A request or reply lost (link down, witness dead): the node times out.
    Lose(usize),
    Write(usize),
    Resync,
    Tick,
    Cut(Link),
    Heal(Link),
    Crash(usize),
    Restart(usize),
    WitnessCrash,
    WitnessRestart,
    DiskFails(usize),
}

struct FencingModel {
    /// Last step of time explored.
    steps_max: u8,
    faults_max: u8,
    writes_max: u8,
}

/// Steps after the last fault by which a primary must serve: two leases and one step.
const SETTLE_STEPS: u8 = (2 * LEASE_MS / STEP_MS + 1) as u8;

fn witness_link(s: &State, i: usize) -> bool {
    s.links[1 + i]
}

fn reachable(s: &State, i: usize) -> bool {
    witness_link(s, i) && s.witness_alive
}

/// The primary of a working replication link between the nodes, if there is one.
fn connected(s: &State) -> Option<usize> {
    let [a, b] = &s.nodes;
    if !s.links[0] || !a.alive || !b.alive || a.meta.disk == DiskState::Failed || b.meta.disk == DiskState::Failed {
        return None;
    }
    (0..2).find(|&p| {
        let (pr, se) = (&s.nodes[p].fence, &s.nodes[1 - p].fence);
        pr.role() == NodeRole::Primary && se.role() == NodeRole::Secondary && se.epoch() <= pr.epoch()
    })
}

/// The node serves I/O now: replicating to a connected peer, or alone.
fn serving(s: &State, i: usize) -> bool {
    let n = &s.nodes[i];
    if !n.alive || n.meta.disk == DiskState::Failed {
        return false;
    }
    match n.fence.io(instant(s.now)) {
        Io::Replicate => connected(s) == Some(i),
        Io::Alone => true,
        Io::Hold | Io::Fenced => false,
    }
}

/// A primary serves, or holds with its lease and no write waiting: the next write is held only
/// for the Outdate round trip.
fn available(s: &State) -> bool {
    (0..2).any(|i| {
        let n = &s.nodes[i];
        serving(s, i)
            || (n.alive
                && n.held.is_none()
                && n.meta.disk != DiskState::Failed
                && n.fence.io(instant(s.now)) == Io::Hold)
    })
}

/// `client.rs` `request`.
fn request(ask: Ask, epoch: u64, disk: DiskState, i: usize) -> Request {
    let volume = volume();
    let (lease_ms, drift_ppm) = (LEASE_MS, DRIFT_PPM);
    match ask {
        Ask::Lease => Request::Lease { volume, epoch, lease_ms, drift_ppm },
        Ask::Outdate => Request::Outdate { volume, epoch, lease_ms, drift_ppm },
        Ask::PeerUpToDate => Request::PeerUpToDate { volume, epoch },
        Ask::Promote => Request::Promote { volume, epoch, disk_state: disk, lease_ms, drift_ppm },
        Ask::Resign => Request::Resign { volume, epoch, disk_state: disk },
        Ask::Handover => Request::Handover { volume, epoch, to: NAMES[1 - i].to_owned() },
    }
}

/// `client.rs` `answer_of`.
fn answer_of(fence: &Fence, i: usize, gist: &Gist) -> Answer {
    match *gist {
        Gist::Granted { epoch } => Answer::Granted { epoch },
        Gist::Refused { record } => {
            let newer = record.is_some_and(|(epoch, primary)| epoch > fence.epoch() || primary.is_some_and(|p| p != i));
            match record {
                Some((epoch, _)) if newer && fence.role() == NodeRole::Primary => Answer::Deposed { epoch },
                Some((epoch, _)) if epoch > fence.epoch() => Answer::Deposed { epoch },
                _ => Answer::Refused,
            }
        }
    }
}

fn index_of(name: &str) -> usize {
    NAMES.iter().position(|n| *n == name).expect("one of the two nodes")
}

/// A crash restart: `lifecycle/runner.rs` `start_role` and the fresh fence of `client.rs` `run`.
fn restart(s: &mut State, i: usize) {
    let asked = reachable(s, i).then(|| s.witness.record(VOLUME)).flatten();
    let n = &mut s.nodes[i];
    let mut primary = match asked {
        Some(r) => r.primary.as_deref() == Some(NAMES[i]),
        None => n.meta.primary,
    };
    if primary && n.meta.disk != DiskState::UpToDate {
        primary = false;
    }
    let role = if primary { NodeRole::Primary } else { NodeRole::Secondary };
    n.alive = true;
    n.fence =
        Fence::new(role, n.meta.epoch.max(1), lease_clock(), n.meta.disk == DiskState::UpToDate, n.meta.peer_outdated);
    n.held = None;
    n.flight = None;
}

/// `lifecycle/runner.rs` after a role change: the group reopens in the change's target role,
/// in the running node, with a fresh fence from the metadata (no witness query). A primary
/// whose copy is not up to date fails to open and serves nothing until the node restarts:
/// modelled as a crash (a later restart goes through `start_role`).
fn reopen(s: &mut State, i: usize, primary: bool) {
    let n = &mut s.nodes[i];
    n.held = None;
    n.flight = None;
    if primary && n.meta.disk != DiskState::UpToDate {
        n.alive = false;
        return;
    }
    let role = if primary { NodeRole::Primary } else { NodeRole::Secondary };
    n.fence =
        Fence::new(role, n.meta.epoch.max(1), lease_clock(), n.meta.disk == DiskState::UpToDate, n.meta.peer_outdated);
}

/// Feeds an answer to node `i`'s fence, then does what `client.rs` `run` and the lifecycle do
/// with the outcome (publish the epoch, record a role change and reopen in the new role).
fn answer(s: &mut State, i: usize, ask: Ask, answer: Answer) {
    let now = instant(s.now);
    let acked = s.acked;
    let n = &mut s.nodes[i];
    let before = n.fence.role();
    n.fence.handle_answer(now, answer);
    n.meta.epoch = n.meta.epoch.max(n.fence.epoch());
    match (before, n.fence.role(), ask) {
        (NodeRole::Secondary, NodeRole::Primary, _) => {
            let epoch = n.fence.take_promotion().expect("a promotion");
            // Its disk may have failed since the witness granted (checked there): then its
            // primary role fails to open. Its data cannot have fallen behind.
            if n.data & acked != acked {
                s.bad_promotion = true;
            }
            s.promotions += 1;
            let n = &mut s.nodes[i];
            n.meta.epoch = n.meta.epoch.max(epoch);
            n.meta.primary = true;
            n.meta.peer_outdated = true;
            reopen(s, i, true);
        }
        (NodeRole::Primary, NodeRole::Deposed, Ask::Resign) => {
            n.meta.primary = false;
            n.meta.disk = DiskState::Failed;
            reopen(s, i, false);
        }
        (NodeRole::Primary, NodeRole::Deposed, Ask::Handover) => unreachable!("no switchover in the model"),
        (NodeRole::Primary, NodeRole::Deposed, _) => {
            n.meta.primary = false;
            n.meta.disk = DiskState::Outdated;
            reopen(s, i, false);
        }
        _ => {}
    }
}

impl FencingModel {
    fn poll(&self, s: &State, i: usize) -> Option<State> {
        if !s.nodes[i].alive {
            return None;
        }
        let mut n = s.clone();
        let now = instant(s.now);
        let conn = connected(s);
        let peer_epoch = s.nodes[1 - i].fence.epoch();
        let reach = reachable(s, i);
        let node = &mut n.nodes[i];
        node.fence.handle_peer_link(conn.is_some());
        if node.meta.disk == DiskState::Failed {
            node.fence.handle_disk_failed();
        }
        node.fence.handle_up_to_date(node.meta.disk == DiskState::UpToDate);
        node.fence.handle_writes_held(node.held.is_some());
        if conn == Some(1 - i) {
            // The secondary adopts the primary's epoch from its frames.
            node.meta.epoch = node.meta.epoch.max(peer_epoch);
        }
        node.fence.observe_epoch(node.meta.epoch);
        if let Some(ask) = node.fence.poll_ask(now) {
            if reach {
                node.flight = Some(Flight::Request { ask, epoch: node.fence.epoch(), disk: node.meta.disk });
            } else {
                answer(&mut n, i, ask, Answer::Unreachable);
            }
        }
        (n != *s).then_some(n)
    }

    /// Nothing in flight and no poll would change anything: the states where time may pass
    /// (within a step the nodes and the witness are still exchanging what the step brought).
    fn quiescent(&self, s: &State) -> bool {
        (0..2).all(|i| s.nodes[i].flight.is_none() && self.poll(s, i).is_none())
    }

    fn fault(&self, s: &State) -> State {
        let mut n = s.clone();
        n.faults += 1;
        n.fault_at = s.now;
        n
    }
}

impl Model for FencingModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let node = |primary: bool| {
            let meta = Meta { epoch: 1, primary, disk: DiskState::UpToDate, peer_outdated: false };
            let role = if primary { NodeRole::Primary } else { NodeRole::Secondary };
            Node {
                alive: true,
                fence: Fence::new(role, 1, lease_clock(), true, false),
                meta,
                data: 0,
                held: None,
                flight: None,
            }
        };
        // The steady state: A has registered the volume with its first lease and replicates to
        // B. (Before the first lease the witness has no record and promotes no one.)
        let (mut a, mut b) = (node(true), node(false));
        let mut witness = Registry::new();
        a.fence.handle_peer_link(true);
        b.fence.handle_peer_link(true);
        let ask = a.fence.poll_ask(instant(0)).expect("a first lease");
        let d = witness.handle(0, NAMES[A], &request(ask, 1, DiskState::UpToDate, A));
        let Reply::Granted { record } = d.reply else { panic!("the first lease is granted: {:?}", d.reply) };
        a.fence.handle_answer(instant(0), Answer::Granted { epoch: record.epoch });
        vec![State {
            now: 0,
            nodes: [a, b],
            links: [true; 3],
            witness,
            witness_alive: true,
            writes: 0,
            acked: 0,
            faults: 0,
            fault_at: 0,
            served_epochs: [0; 2],
            promotions: 0,
            bad_promotion: false,
            went_alone: false,
            acked_after_fault: false,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for i in 0..2 {
            let n = &s.nodes[i];
            if self.poll(s, i).is_some() {
                actions.push(Action::Poll(i));
            }
            match &n.flight {
                Some(Flight::Request { .. }) => {
                    actions.push(if reachable(s, i) { Action::WitnessHandles(i) } else { Action::Lose(i) });
                }
                Some(Flight::Reply(_)) => {
                    actions.push(if witness_link(s, i) { Action::Deliver(i) } else { Action::Lose(i) });
                }
                None => {}
            }
            if n.alive && n.fence.role() == NodeRole::Primary && (n.held.is_some() || s.writes < self.writes_max) {
                actions.push(Action::Write(i));
            }
        }
        if connected(s).is_some() {
            actions.push(Action::Resync);
        }
        if s.now < self.steps_max && self.quiescent(s) {
            actions.push(Action::Tick);
        }
        if s.faults < self.faults_max {
            for (k, link) in LINKS.into_iter().enumerate() {
                actions.push(if s.links[k] { Action::Cut(link) } else { Action::Heal(link) });
            }
            for i in 0..2 {
                actions.push(if s.nodes[i].alive { Action::Crash(i) } else { Action::Restart(i) });
                if s.nodes[i].alive && s.nodes[i].meta.disk != DiskState::Failed {
                    actions.push(Action::DiskFails(i));
                }
            }
            actions.push(if s.witness_alive { Action::WitnessCrash } else { Action::WitnessRestart });
        }
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        let now_ms = s.now as u64 * STEP_MS;
        let mut n = match action {
            Action::Poll(i) => self.poll(s, i)?,
            Action::WitnessHandles(i) => {
                let Some(Flight::Request { ask, epoch, disk }) = s.nodes[i].flight.clone() else { return None };
                let mut n = s.clone();
                let before = n.witness.record(VOLUME);
                let d = n.witness.handle(now_ms, NAMES[i], &request(ask, epoch, disk, i));
                let after = n.witness.record(VOLUME);
                let primary_of =
                    |r: &Option<metroblk_protocol::witness::Record>| r.as_ref().and_then(|r| r.primary.clone());
                if ask == Ask::Promote && primary_of(&after) != primary_of(&before) {
                    // The promotion proper: the witness names this node primary.
                    let node = &n.nodes[i];
                    // Its disk as the request said (it may have failed since it was sent:
                    // then `start_role` keeps it secondary).
                    if node.data & n.acked != n.acked || disk != DiskState::UpToDate {
                        n.bad_promotion = true;
                    }
                }
                let gist = match d.reply {
                    Reply::Granted { record } => Gist::Granted { epoch: record.epoch },
                    Reply::Refused { record, .. } => {
                        Gist::Refused { record: record.map(|r| (r.epoch, r.primary.as_deref().map(index_of))) }
                    }
                    other => panic!("unexpected reply {other:?}"),
                };
                n.nodes[i].flight = Some(Flight::Reply(gist));
                n
            }
            Action::Deliver(i) | Action::Lose(i) => {
                let mut n = s.clone();
                let flight = n.nodes[i].flight.take()?;
                let ask = n.nodes[i].fence.in_flight().expect("a message in flight is the fence's ask");
                let a = match (&flight, action) {
                    (Flight::Reply(gist), Action::Deliver(_)) => answer_of(&n.nodes[i].fence, i, gist),
                    _ => Answer::Unreachable,
                };
                answer(&mut n, i, ask, a);
                n
            }
            Action::Write(i) => {
                let mut n = s.clone();
                let io = s.nodes[i].fence.io(instant(s.now));
                // The queues replicate whenever their link is up, whatever the fence last saw
                // (`queue.rs`: alone only while the link is down).
                let replicate = connected(s) == Some(i);
                let (bit, fresh) = match s.nodes[i].held {
                    Some(bit) => (bit, false),
                    None => (1u8 << s.writes, true),
                };
                if fresh {
                    n.writes += 1;
                }
                if s.nodes[i].meta.disk == DiskState::Failed {
                    // The write fails (an I/O error), nothing is acknowledged.
                    n.nodes[i].held = None;
                    return Some(n);
                }
                if replicate || io == Io::Alone {
                    n.nodes[i].data |= bit;
                    if replicate {
                        n.nodes[1 - i].data |= bit;
                    } else {
                        // The bitmap writer records the peer outdated before the first write alone.
                        n.nodes[i].meta.peer_outdated = true;
                        n.went_alone = true;
                    }
                    n.nodes[i].held = None;
                    n.acked |= bit;
                    n.acked_after_fault |= s.faults > 0;
                } else if io == Io::Fenced || !fresh {
                    return None;
                } else {
                    n.nodes[i].held = Some(bit);
                }
                n
            }
            Action::Resync => {
                let p = connected(s)?;
                let q = 1 - p;
                let mut n = s.clone();
                n.nodes[q].data = s.nodes[p].data;
                n.nodes[q].meta.disk = DiskState::UpToDate;
                n.nodes[p].meta.peer_outdated = false;
                n.nodes[p].fence.handle_peer_in_sync();
                if n == *s {
                    return None;
                }
                n
            }
            Action::Tick => {
                let mut n = s.clone();
                n.now += 1;
                n
            }
            Action::Cut(link) | Action::Heal(link) => {
                let mut n = self.fault(s);
                let k = LINKS.iter().position(|l| *l == link).expect("a link");
                n.links[k] = matches!(action, Action::Heal(_));
                n
            }
            Action::Crash(i) => {
                let mut n = self.fault(s);
                let node = &mut n.nodes[i];
                node.alive = false;
                node.held = None;
                node.flight = None;
                node.fence = Fence::new(NodeRole::Secondary, 1, lease_clock(), false, false);
                n
            }
            Action::Restart(i) => {
                let mut n = self.fault(s);
                restart(&mut n, i);
                n
            }
            Action::WitnessCrash => {
                let mut n = self.fault(s);
                n.witness_alive = false;
                n
            }
            Action::WitnessRestart => {
                let mut n = self.fault(s);
                n.witness_alive = true;
                n.witness = Registry::from_state(s.witness.to_state(), now_ms).expect("the witness's own state");
                n
            }
            Action::DiskFails(i) => {
                let mut n = self.fault(s);
                n.nodes[i].meta.disk = DiskState::Failed;
                n
            }
        };
        for i in 0..2 {
            if serving(&n, i) {
                n.served_epochs[i] |= 1 << n.nodes[i].fence.epoch().min(31);
            }
        }
        Some(n)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("never two nodes serve at once", |_, s: &State| !(serving(s, A) && serving(s, B))),
            Property::always("never two nodes serve in one epoch", |_, s: &State| {
                s.served_epochs[A] & s.served_epochs[B] == 0
            }),
            Property::always("a serving node holds every acknowledged write", |_, s: &State| {
                (0..2).all(|i| !serving(s, i) || s.nodes[i].data & s.acked == s.acked)
            }),
            Property::always("only an up-to-date node is promoted", |_, s: &State| !s.bad_promotion),
            Property::always("a single fault leaves a primary serving within two leases", |m, s: &State| {
                s.faults > 1 || s.now < s.fault_at + SETTLE_STEPS || !m.quiescent(s) || available(s)
            }),
            Property::sometimes("a promotion", |_, s: &State| s.promotions > 0),
            Property::sometimes("a primary goes on alone", |_, s: &State| s.went_alone),
            Property::sometimes("a write is acknowledged after a fault", |_, s: &State| s.acked_after_fault),
        ]
    }
}

/// One line per step of a counterexample.
fn describe(s: &State) -> String {
    let node = |i: usize| {
        let n = &s.nodes[i];
        if !n.alive {
            return format!("{}: down", NAMES[i]);
        }
        format!(
            "{}: {:?} e{} io={:?} lease_until={:?} peer_outdated={} meta(e{} {} {} peer_outdated={}) data={:#b} held={:?} flight={:?}",
            NAMES[i],
            n.fence.role(),
            n.fence.epoch(),
            n.fence.io(instant(s.now)),
            n.fence.lease().valid_until().map(|t| t.duration_since(base()).as_millis()),
            n.fence.peer_outdated(),
            n.meta.epoch,
            if n.meta.primary { "primary" } else { "secondary" },
            n.meta.disk,
            n.meta.peer_outdated,
            n.data,
            n.held,
            n.flight,
        )
    };
    let rec = s.witness.record(VOLUME).map(|r| (r.epoch, r.primary, r.disk_states));
    let lease_left = s.witness.status(s.now as u64 * STEP_MS).first().map(|v| v.lease_left_ms);
    format!(
        "t={}ms links(ab,aw,bw)={:?} witness {} {:?} lease_left={:?} acked={:#b}\n      {}\n      {}",
        s.now as u64 * STEP_MS,
        s.links,
        if s.witness_alive { "up" } else { "down" },
        rec,
        lease_left,
        s.acked,
        node(A),
        node(B)
    )
}

fn check(model: FencingModel) {
    let bounds = format!(
        "time <= {} ms in steps of {STEP_MS} ms, lease {LEASE_MS} ms, drift {DRIFT_PPM} ppm, faults <= {}, writes <= {}",
        model.steps_max as u64 * STEP_MS,
        model.faults_max,
        model.writes_max
    );
    let started = Instant::now();
    let checker = model.checker().threads(2).spawn_bfs().join();
    let summary = format!(
        "fencing model ({bounds}): {} states explored, {} unique, max depth {}, in {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed().as_secs_f64()
    );
    println!("{summary}");
    let mut failed = Vec::new();
    for p in checker.model().properties() {
        let found = checker.discovery(p.name);
        match (p.expectation, found) {
            (stateright::Expectation::Sometimes, None) => failed.push(format!("no example of \"{}\"", p.name)),
            (stateright::Expectation::Sometimes, Some(_)) => {}
            (_, Some(path)) => {
                let mut trace = format!("counterexample to \"{}\":\n", p.name);
                for (state, action) in path.into_vec() {
                    trace.push_str(&format!("  {}\n", describe(&state)));
                    if let Some(a) = action {
                        trace.push_str(&format!("  -> {a:?}\n"));
                    }
                }
                failed.push(trace);
            }
            (_, None) => {}
        }
    }
    assert!(failed.is_empty(), "{summary}\n{}", failed.join("\n"));
}

#[test]
fn fencing_and_promotion_hold_over_every_interleaving() {
    check(FencingModel { steps_max: 14, faults_max: 2, writes_max: 2 });
}

/// Replays `script` through the model: each action must be enabled; `None` runs the step out
/// (polls and messages until quiescent) and lets time pass `n` steps.
fn replay(model: &FencingModel, script: &[(Option<Action>, u8)]) -> State {
    let mut s = model.init_states().remove(0);
    for &(action, steps) in script {
        if let Some(a) = action {
            let mut enabled = Vec::new();
            model.actions(&s, &mut enabled);
            assert!(enabled.contains(&a), "{a:?} is not enabled in\n{}", describe(&s));
            s = model.next_state(&s, a).unwrap_or(s);
        }
        for _ in 0..steps {
            while !model.quiescent(&s) {
                let mut enabled = Vec::new();
                model.actions(&s, &mut enabled);
                let a = *enabled
                    .iter()
                    .find(|a| {
                        matches!(a, Action::Poll(_) | Action::WitnessHandles(_) | Action::Deliver(_) | Action::Lose(_))
                    })
                    .expect("something to do");
                s = model.next_state(&s, a).expect("a change");
            }
            s = model.next_state(&s, Action::Tick).expect("time passes");
        }
    }
    s
}

/// A primary that resynced its peer and restarts before telling the witness (found by this
/// model, five faults deep, past the exhaustive bound): the fresh fence did not know the peer
/// was outdated at the witness and never told it, so the up-to-date secondary was never
/// promoted. Fixed: every in-sync exchange (the restarted primary's first one included) is
/// reported to the witness (`Fence::handle_peer_in_sync`).
#[test]
fn a_secondary_resynced_before_the_primary_restarts_can_be_promoted() {
    let model = FencingModel { steps_max: u8::MAX, faults_max: u8::MAX, writes_max: 1 };
    let s = replay(
        &model,
        &[
            (Some(Action::Cut(Link::Ab)), 1),
            // A holds the write, has B outdated by the witness, and completes it alone.
            (Some(Action::Write(A)), 1),
            (Some(Action::Write(A)), 1),
            (Some(Action::Heal(Link::Ab)), 0),
            (Some(Action::Poll(A)), 0),
            (Some(Action::Poll(B)), 0),
            // The resync ends; A crashes before its fence asks PeerUpToDate.
            (Some(Action::Resync), 0),
            (Some(Action::Crash(A)), 0),
            (Some(Action::Restart(A)), 0),
            // The restarted primary's sync link: an exchange that finds the peer in sync.
            (Some(Action::Resync), 4),
            (Some(Action::Crash(A)), 3 * SETTLE_STEPS),
        ],
    );
    assert_eq!(s.nodes[B].data & s.acked, s.acked, "B holds every acknowledged write");
    assert!(s.promotions > 0, "B, up to date, is never promoted:\n{}", describe(&s));
}

/// The same history without the restart: the primary tells the witness and the secondary is
/// promoted when the primary is lost.
#[test]
fn a_secondary_resynced_and_told_is_promoted_when_the_primary_is_lost() {
    let model = FencingModel { steps_max: u8::MAX, faults_max: u8::MAX, writes_max: 1 };
    let s = replay(
        &model,
        &[
            (Some(Action::Cut(Link::Ab)), 1),
            (Some(Action::Write(A)), 1),
            (Some(Action::Write(A)), 1),
            (Some(Action::Heal(Link::Ab)), 0),
            (Some(Action::Poll(A)), 0),
            (Some(Action::Poll(B)), 0),
            (Some(Action::Resync), 4),
            (Some(Action::Crash(A)), 3 * SETTLE_STEPS),
        ],
    );
    assert!(s.went_alone && s.promotions == 1, "{}", describe(&s));
    assert_eq!(s.nodes[B].data & s.acked, s.acked);
    assert!(serving(&s, B), "{}", describe(&s));
}

/// Deeper in faults, shorter in time: three faults within 2 s of model time and one write
/// (the two-fault run above covers 3.5 s and two writes), so that it runs in every CI.
#[test]
fn fencing_and_promotion_hold_with_three_faults() {
    check(FencingModel { steps_max: 8, faults_max: 3, writes_max: 1 });
}

/// A resync ends and the link drops before the fence tells the witness (found by this model,
/// five faults deep): the fence still had the peer outdated, so the primary completed a write
/// alone; when the link returned it told the witness the peer was up to date, and the copy
/// without that write was later promoted: an acknowledged write lost. Fixed: a resync ends
/// going alone until the witness outdates the peer again (`Fence::alone_allowed`), so that
/// write is held, never acknowledged alone; a new outdate voids the old report.
#[test]
fn a_write_alone_after_a_resync_is_never_lost_by_a_promotion() {
    let model = FencingModel { steps_max: u8::MAX, faults_max: u8::MAX, writes_max: 2 };
    let s = replay(
        &model,
        &[
            // A goes on alone (the witness outdates B), the link returns.
            (Some(Action::Cut(Link::Ab)), 1),
            (Some(Action::Write(A)), 1),
            (Some(Action::Write(A)), 1),
            (Some(Action::Heal(Link::Ab)), 0),
            (Some(Action::Poll(A)), 0),
            (Some(Action::Poll(B)), 0),
            // The resync ends, and the link drops before A's fence is polled.
            (Some(Action::Resync), 0),
            (Some(Action::Cut(Link::Ab)), 0),
            (Some(Action::Poll(A)), 0),
            (Some(Action::Write(A)), 0),
            (Some(Action::Heal(Link::Ab)), 1),
            // A is lost; B is promoted once A's lease ran out.
            (Some(Action::Crash(A)), 3 * SETTLE_STEPS),
        ],
    );
    assert_eq!(s.acked & 0b1, 0b1, "the first write was acknowledged:\n{}", describe(&s));
    assert!(!s.bad_promotion, "B was promoted without an acknowledged write:\n{}", describe(&s));
    assert!(s.promotions == 1 && serving(&s, B), "{}", describe(&s));
    assert_eq!(s.nodes[B].data & s.acked, s.acked, "B holds every acknowledged write:\n{}", describe(&s));
}
