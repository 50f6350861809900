//! Model check of a consistency group: two volumes under one witness record, the real pure
//! machines — the group's [`Fence`], its [`GroupAlone`] and [`group_facts`] and its
//! [`Lifecycle`] on each node, the witness's [`Registry`] — driven by stateright over every interleaving (BFS, bounded time)
//! of a dependent-write workload, each volume's own replication link cut and healed (so one
//! member's replication can stop while the other's goes on), the links to the witness cut and
//! healed, the primary's crash, the witness's crash and restart, and the passing of time.
//!
//! # The rule checked
//! * When the secondary site is promoted for the group, it holds one point in time: every
//!   write of volume 1 it holds has the write of volume 0 it depended on (the application
//!   wrote X to volume 0, and only after X completed, Y to volume 1), and every write
//!   acknowledged to the application.
//! * Never two nodes serve at once.
//! * Sometimes-properties (so a vacuous model fails): a promotion; a write acknowledged alone
//!   while the other volume's link was still up (one member's replication stopped alone); a
//!   dependent write replicated while the other volume's write before it was only local.
//!
//! # What is modelled, and how faithfully
//! The glue is `fencing/client.rs` `run` for a group: a poll aggregates the volumes' facts
//! (`group_facts`: present only if every link is, held if any write is), feeds the fence, asks
//! the witness; `GroupAlone` decides per volume whether it may complete writes alone, exactly
//! as `publish` does. A volume's write replicates while its own link is up and completes alone
//! only while the fence's I/O mode is `Alone` and that volume may go alone; otherwise it is
//! held. A resync of a volume (its link up, A primary) copies A's copy of it to B and reports
//! it resynced (`GroupAlone::handle_resynced`; a clean copy: the write-during-copy case is the
//! bitmap's, tested there); the witness hears the peer up to date only when every volume is.
//! The secondary asks to be promoted when any volume's primary is silent (its group is
//! present only if every volume's link is). The workload is sequential, as dependent writes
//! are: at most one write in flight. Data per node and volume is the highest sequence number
//! applied (writes to one volume are in order, each supersedes the one before).
//! A role change (promotion, deposition) goes to the node's [`Lifecycle`] as `runner.rs`
//! feeds it; the runner's record, close and open are separate steps, interleaved with
//! everything else, and a node does I/O only while its lifecycle serves it as primary (the
//! lifecycle's own asserts check that one role's parts are open at a time).

use std::time::Instant;

use metroblk::config::Role;
use metroblk::fencing::group::{group_facts, GroupAlone, VolumeFacts};
use metroblk::fencing::{Answer, Ask, Fence, Io, NodeRole};
use metroblk::lifecycle::{Change, Command, Lifecycle};
use metroblk_protocol::witness::{DiskState, Reply, Request, VolumeId};
use metroblk_tests::model_clock::{instant, lease_clock, A, B, DRIFT_PPM, LEASE_MS, NAMES, STEP_MS};
use metroblk_witness::registry::Registry;
use stateright::{Checker, Model, Property};

const GROUP: &str = "db";
const UUID: &str = "6d657472-6f62-6c6b-0000-000000000002";
/// Volumes in the group.
const VOLUMES: usize = 2;

/// Links: each volume's replication link between the sites, then each node's to the witness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Link {
    Volume(usize),
    Witness(usize),
}

const LINKS: [Link; 4] = [Link::Volume(0), Link::Volume(1), Link::Witness(A), Link::Witness(B)];

fn link_index(l: Link) -> usize {
    LINKS.iter().position(|x| *x == l).expect("a link")
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Flight {
    Request(Ask),
    Reply(Answer),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Node {
    alive: bool,
    fence: Fence,
    alone: GroupAlone,
    /// Per volume: whether it may complete writes alone (what `publish` last set).
    may_go_alone: [bool; VOLUMES],
    /// Per volume: the highest write applied to this copy.
    data: [u8; VOLUMES],
    flight: Option<Flight>,
    /// The group's lifecycle on this node (`lifecycle/`): a role change closes the old role's
    /// parts and opens the new one's, a step at a time; only a serving primary does I/O.
    life: Lifecycle,
}

/// The application's next write: `seq` on `volume` (X on 0, then Y of the same seq on 1).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    now: u8,
    nodes: [Node; 2],
    links: [bool; 4],
    witness: Registry,
    witness_alive: bool,
    seq: u8,
    volume: usize,
    /// The write in flight is held (waits for the peer or a decision).
    held: bool,
    /// Per volume: the highest write acknowledged to the application.
    acked: [u8; VOLUMES],
    faults: u8,
    promoted: bool,
    /// B was promoted without one point in time (a Y without its X) or without an acked write.
    bad_promotion: bool,
    alone_beside_a_live_link: bool,
    dependent_ahead: bool,
    both_served: bool,
    /// The promoted node's lifecycle closed its secondary parts and serves as primary.
    promoted_serves: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Action {
    Poll(usize),
    WitnessHandles(usize),
    Deliver(usize),
    Lose(usize),
    Write,
    Resync(usize),
    /// Node `i`'s group runner executes its lifecycle's next command.
    Lifecycle(usize),
    Tick,
    Cut(Link),
    Heal(Link),
    CrashA,
    WitnessCrash,
    WitnessRestart,
}

struct GroupModel {
    steps_max: u8,
    faults_max: u8,
    writes_max: u8,
}

fn request(ask: Ask, epoch: u64, i: usize) -> Request {
    let volume = VolumeId::new(GROUP, UUID, NAMES[i], NAMES[1 - i]);
    let (lease_ms, drift_ppm) = (LEASE_MS, DRIFT_PPM);
    let disk_state = DiskState::UpToDate;
    match ask {
        Ask::Lease => Request::Lease { volume, epoch, lease_ms, drift_ppm },
        Ask::Outdate => Request::Outdate { volume, epoch, lease_ms, drift_ppm },
        Ask::PeerUpToDate => Request::PeerUpToDate { volume, epoch },
        Ask::Promote => Request::Promote { volume, epoch, disk_state, lease_ms, drift_ppm },
        Ask::Resign => Request::Resign { volume, epoch, disk_state },
        Ask::Handover => Request::Handover { volume, epoch, to: NAMES[1 - i].to_owned() },
    }
}

/// `client.rs` `answer_of`.
fn answer_of(fence: &Fence, i: usize, reply: &Reply) -> Answer {
    match reply {
        Reply::Granted { record } => Answer::Granted { epoch: record.epoch },
        Reply::Refused { record, .. } => {
            let newer = record
                .as_ref()
                .is_some_and(|r| r.epoch > fence.epoch() || r.primary.as_deref().is_some_and(|p| p != NAMES[i]));
            match record {
                Some(r) if newer && fence.role() == NodeRole::Primary => Answer::Deposed { epoch: r.epoch },
                Some(r) if r.epoch > fence.epoch() => Answer::Deposed { epoch: r.epoch },
                _ => Answer::Refused,
            }
        }
        other => panic!("unexpected reply {other:?}"),
    }
}

/// Volume `v`'s link carries replication: both nodes alive, A primary, B secondary.
fn volume_linked(s: &State, v: usize) -> bool {
    let [a, b] = &s.nodes;
    s.links[link_index(Link::Volume(v))]
        && a.alive
        && b.alive
        && a.fence.role() == NodeRole::Primary
        && b.fence.role() == NodeRole::Secondary
}

fn reachable(s: &State, i: usize) -> bool {
    s.links[link_index(Link::Witness(i))] && s.witness_alive
}

/// Node `i` serves I/O now.
fn serving(s: &State, i: usize) -> bool {
    let n = &s.nodes[i];
    if !n.alive || n.fence.role() != NodeRole::Primary || n.life.serving() != Some(Role::Primary) {
        return false;
    }
    match n.fence.io(instant(s.now)) {
        Io::Replicate => i == A && (0..VOLUMES).all(|v| volume_linked(s, v)),
        Io::Alone => true,
        Io::Hold | Io::Fenced => false,
    }
}

impl GroupModel {
    fn poll(&self, s: &State, i: usize) -> Option<State> {
        if !s.nodes[i].alive || s.nodes[i].fence.role() == NodeRole::Deposed {
            return None;
        }
        let mut n = s.clone();
        let now = instant(s.now);
        let facts: Vec<VolumeFacts> = (0..VOLUMES)
            .map(|v| VolumeFacts {
                peer_present: volume_linked(s, v),
                disk: DiskState::UpToDate,
                writes_held: i == A && s.held && s.volume == v,
                epoch: s.nodes[i].fence.epoch(),
            })
            .collect();
        let g = group_facts(&facts);
        let reach = reachable(s, i);
        let node = &mut n.nodes[i];
        node.fence.handle_peer_link(g.peer_present);
        node.fence.handle_up_to_date(g.up_to_date);
        node.fence.handle_writes_held(g.writes_held);
        node.alone.handle_alone_allowed(node.fence.alone_allowed());
        if node.fence.role() == NodeRole::Primary {
            for (v, f) in facts.iter().enumerate() {
                node.may_go_alone[v] = node.alone.may_go_alone(v, f.writes_held);
            }
        }
        if node.flight.is_none() {
            if let Some(ask) = node.fence.poll_ask(now) {
                if reach {
                    node.flight = Some(Flight::Request(ask));
                } else {
                    let before = node.fence.role();
                    node.fence.handle_answer(now, Answer::Unreachable);
                    debug_assert_eq!(before, node.fence.role());
                }
            }
        }
        (n != *s).then_some(n)
    }

    fn quiescent(&self, s: &State) -> bool {
        (0..2).all(|i| s.nodes[i].flight.is_none() && self.poll(s, i).is_none())
    }

    fn fault(&self, s: &State) -> State {
        let mut n = s.clone();
        n.faults += 1;
        n
    }

    /// Feeds node `i` the answer to its ask; a promotion is where the property is checked.
    fn answer(&self, s: &mut State, i: usize, a: Answer) {
        let now = instant(s.now);
        let before = s.nodes[i].fence.role();
        s.nodes[i].fence.handle_answer(now, a);
        let (after, epoch) = (s.nodes[i].fence.role(), s.nodes[i].fence.epoch());
        // `client.rs` raises the role change; the group's runner feeds it to the lifecycle.
        let change = match (before, after) {
            (NodeRole::Secondary, NodeRole::Primary) => Some(Change::Promoted { epoch }),
            (NodeRole::Primary, NodeRole::Deposed) => Some(Change::Deposed { epoch }),
            _ => None,
        };
        if let Some(c) = change {
            let applied = s.nodes[i].life.handle_role_change(now, c);
            assert!(applied, "node {i}: {c:?} while {:?}", s.nodes[i].life.phase());
        }
        if before == NodeRole::Secondary && after == NodeRole::Primary {
            s.promoted = true;
            let d = s.nodes[i].data;
            // One point in time: a Y of seq k (volume 1) only with its X (volume 0, seq >= k).
            if d[1] > d[0] || d[0] < s.acked[0] || d[1] < s.acked[1] {
                s.bad_promotion = true;
            }
        }
    }
}

impl Model for GroupModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let node = |primary: bool| Node {
            alive: true,
            fence: Fence::new(
                if primary { NodeRole::Primary } else { NodeRole::Secondary },
                1,
                lease_clock(),
                true,
                false,
            ),
            alone: GroupAlone::new(VOLUMES),
            may_go_alone: [false; VOLUMES],
            data: [0; VOLUMES],
            flight: None,
            life: {
                let mut life = Lifecycle::new(if primary { Role::Primary } else { Role::Secondary });
                assert!(matches!(life.poll_command(), Some(Command::Open(_))));
                life.handle_opened(instant(0));
                life
            },
        };
        let (mut a, mut b) = (node(true), node(false));
        let mut witness = Registry::new();
        a.fence.handle_peer_link(true);
        b.fence.handle_peer_link(true);
        let ask = a.fence.poll_ask(instant(0)).expect("a first lease");
        let d = witness.handle(0, NAMES[A], &request(ask, 1, A));
        let Reply::Granted { record } = d.reply else { panic!("the first lease is granted: {:?}", d.reply) };
        a.fence.handle_answer(instant(0), Answer::Granted { epoch: record.epoch });
        vec![State {
            now: 0,
            nodes: [a, b],
            links: [true; 4],
            witness,
            witness_alive: true,
            seq: 1,
            volume: 0,
            held: false,
            acked: [0; VOLUMES],
            faults: 0,
            promoted: false,
            bad_promotion: false,
            alone_beside_a_live_link: false,
            dependent_ahead: false,
            both_served: false,
            promoted_serves: false,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for i in 0..2 {
            if self.poll(s, i).is_some() {
                actions.push(Action::Poll(i));
            }
            match &s.nodes[i].flight {
                Some(Flight::Request(_)) => {
                    actions.push(if reachable(s, i) { Action::WitnessHandles(i) } else { Action::Lose(i) })
                }
                Some(Flight::Reply(_)) => actions.push(if s.links[link_index(Link::Witness(i))] {
                    Action::Deliver(i)
                } else {
                    Action::Lose(i)
                }),
                None => {}
            }
        }
        let a = &s.nodes[A];
        if a.alive
            && a.fence.role() == NodeRole::Primary
            && a.life.serving() == Some(Role::Primary)
            && !s.promoted
            && s.seq <= self.writes_max
        {
            actions.push(Action::Write);
        }
        for i in 0..2 {
            if s.nodes[i].alive && s.nodes[i].life.clone().poll_command().is_some() {
                actions.push(Action::Lifecycle(i));
            }
        }
        for v in 0..VOLUMES {
            let (a, b) = (&s.nodes[A], &s.nodes[B]);
            if volume_linked(s, v) && (b.data[v] < a.data[v] || (a.fence.alone_allowed() && !a.alone.is_resynced(v))) {
                actions.push(Action::Resync(v));
            }
        }
        if s.now < self.steps_max && self.quiescent(s) {
            actions.push(Action::Tick);
        }
        if s.faults < self.faults_max && !s.promoted {
            for (k, link) in LINKS.into_iter().enumerate() {
                actions.push(if s.links[k] { Action::Cut(link) } else { Action::Heal(link) });
            }
            if s.nodes[A].alive {
                actions.push(Action::CrashA);
            }
            actions.push(if s.witness_alive { Action::WitnessCrash } else { Action::WitnessRestart });
        }
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        let now_ms = s.now as u64 * STEP_MS;
        let mut n = match action {
            Action::Poll(i) => self.poll(s, i)?,
            Action::WitnessHandles(i) => {
                let Some(Flight::Request(ask)) = s.nodes[i].flight.clone() else { return None };
                let mut n = s.clone();
                let d = n.witness.handle(now_ms, NAMES[i], &request(ask, n.nodes[i].fence.epoch(), i));
                let a = answer_of(&n.nodes[i].fence, i, &d.reply);
                n.nodes[i].flight = Some(Flight::Reply(a));
                n
            }
            Action::Deliver(i) | Action::Lose(i) => {
                let mut n = s.clone();
                let a = match (n.nodes[i].flight.take()?, action) {
                    (Flight::Reply(a), Action::Deliver(_)) => a,
                    _ => Answer::Unreachable,
                };
                self.answer(&mut n, i, a);
                n
            }
            Action::Write => {
                let mut n = s.clone();
                let v = s.volume;
                let a = &s.nodes[A];
                let alone = a.fence.io(instant(s.now)) == Io::Alone && a.may_go_alone[v];
                // The queues replicate whenever their link is up (`queue.rs`), as in
                // `fencing_model.rs`.
                let replicate = volume_linked(s, v);
                if replicate || alone {
                    n.nodes[A].data[v] = s.seq;
                    if replicate {
                        n.nodes[B].data[v] = s.seq;
                        // Y replicated while its X is only on A (X went alone).
                        n.dependent_ahead |= v == 1 && s.nodes[B].data[0] < s.seq;
                    } else {
                        n.alone_beside_a_live_link |= volume_linked(s, 1 - v);
                    }
                    n.acked[v] = s.seq;
                    n.held = false;
                    if v == 0 {
                        n.volume = 1;
                    } else {
                        n.volume = 0;
                        n.seq += 1;
                    }
                } else if s.held {
                    return None;
                } else {
                    n.held = true;
                }
                n
            }
            Action::Resync(v) => {
                let mut n = s.clone();
                n.nodes[B].data[v] = s.nodes[A].data[v];
                let all = n.nodes[A].alone.handle_resynced(v, true);
                if all {
                    n.nodes[A].fence.handle_peer_in_sync();
                }
                n
            }
            Action::Lifecycle(i) => {
                let mut n = s.clone();
                let life = &mut n.nodes[i].life;
                match life.poll_command()? {
                    // The metadata records the role; the model's copy is its fence.
                    Command::Record(_) => {}
                    Command::Close { .. } => life.handle_closed(),
                    Command::Open(_) => life.handle_opened(instant(s.now)),
                }
                n.promoted_serves |= i == B && n.nodes[B].life.serving() == Some(Role::Primary);
                n
            }
            Action::Tick => {
                let mut n = s.clone();
                n.now += 1;
                n
            }
            Action::Cut(l) | Action::Heal(l) => {
                let mut n = self.fault(s);
                n.links[link_index(l)] = matches!(action, Action::Heal(_));
                n
            }
            Action::CrashA => {
                let mut n = self.fault(s);
                n.nodes[A].alive = false;
                n.nodes[A].flight = None;
                n.held = false;
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
        };
        n.both_served |= serving(&n, A) && serving(&n, B);
        Some(n)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "the promoted site holds one point in time and every acknowledged write",
                |_, s: &State| !s.bad_promotion,
            ),
            Property::always("never two nodes serve at once", |_, s: &State| !s.both_served),
            Property::sometimes("a promotion", |_, s: &State| s.promoted),
            Property::sometimes(
                "the promoted node serves after its lifecycle reopened it as primary",
                |_, s: &State| s.promoted_serves,
            ),
            Property::sometimes("a write completes alone while the other volume's link is up", |_, s: &State| {
                s.alone_beside_a_live_link
            }),
            Property::sometimes("a dependent write replicated while its X is only local", |_, s: &State| {
                s.dependent_ahead
            }),
        ]
    }
}

#[test]
fn a_group_fails_over_at_one_point_in_time_over_every_interleaving() {
    let model = GroupModel { steps_max: 12, faults_max: 2, writes_max: 2 };
    let started = Instant::now();
    let checker = model.checker().threads(2).spawn_bfs().join();
    let summary = format!(
        "group model (time <= {} ms, faults <= 2, writes <= 2 per volume): {} states, {} unique, max depth {}, {:.1} s",
        12 * STEP_MS,
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed().as_secs_f64()
    );
    println!("{summary}");
    let mut failed = Vec::new();
    for p in checker.model().properties() {
        match (p.expectation, checker.discovery(p.name)) {
            (stateright::Expectation::Sometimes, None) => failed.push(format!("no example of \"{}\"", p.name)),
            (stateright::Expectation::Sometimes, Some(_)) | (_, None) => {}
            (_, Some(path)) => {
                let mut trace = format!("counterexample to \"{}\":\n", p.name);
                for (state, action) in path.into_vec() {
                    trace.push_str(&format!(
                        "  t={} links={:?} seq={} v={} held={} acked={:?} A={:?}/{:?} data {:?} B={:?} data {:?}\n",
                        state.now,
                        state.links,
                        state.seq,
                        state.volume,
                        state.held,
                        state.acked,
                        state.nodes[A].fence.role(),
                        state.nodes[A].fence.io(instant(state.now)),
                        state.nodes[A].data,
                        state.nodes[B].fence.role(),
                        state.nodes[B].data
                    ));
                    if let Some(a) = action {
                        trace.push_str(&format!("  -> {a:?}\n"));
                    }
                }
                failed.push(trace);
            }
        }
    }
    assert!(failed.is_empty(), "{summary}\n{}", failed.join("\n"));
}
