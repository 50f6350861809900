//! Every sequence of events up to a depth, against the rules in the module doc.

use super::*;

/// The runner as the machine sees it: executes one open or close at a time.
#[derive(Clone, Debug)]
struct Sim {
    l: Lifecycle,
    /// The open or close being executed (its outcome not yet fed back).
    running: Option<Command>,
    /// Every command issued, in order.
    log: Vec<Command>,
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Succeed,
    Fail,
    Change(Change),
    Stop,
}

const STEPS: [Step; 10] = [
    Step::Succeed,
    Step::Fail,
    Step::Change(Change::Promoted { epoch: 2 }),
    Step::Change(Change::Deposed { epoch: 2 }),
    Step::Change(Change::Resigned),
    Step::Change(Change::HandedOver { epoch: 2 }),
    Step::Change(Change::PromotedByOperator { forced: false }),
    Step::Change(Change::DemotedByOperator { discard_local: true }),
    Step::Stop,
    Step::Stop,
];

impl Sim {
    fn new(role: Role) -> Sim {
        let mut s = Sim { l: Lifecycle::new(role), running: None, log: Vec::new() };
        s.drain();
        s
    }

    fn drain(&mut self) {
        while let Some(c) = self.l.poll_command() {
            self.log.push(c.clone());
            match c {
                Command::Record(_) => assert!(self.running.is_none(), "record while {:?} runs", self.running),
                Command::Open(_) | Command::Close { .. } => {
                    assert!(self.running.is_none(), "{c:?} issued while {:?} runs", self.running);
                    self.running = Some(c);
                }
            }
        }
    }

    /// Applies `step`; false when it does not apply in this state (nothing to succeed).
    fn apply(&mut self, now: Instant, step: Step) -> bool {
        let before = self.log.len();
        match (step, self.running.take()) {
            (Step::Succeed, Some(Command::Open(_))) => self.l.handle_opened(now),
            (Step::Fail, Some(Command::Open(_))) => self.l.handle_open_failed(),
            (Step::Succeed, Some(Command::Close { .. })) => self.l.handle_closed(),
            (Step::Fail, Some(Command::Close { .. })) => self.l.handle_close_failed(),
            (Step::Succeed | Step::Fail, r) => {
                self.running = r;
                return false;
            }
            (Step::Change(c), r) => {
                self.running = r;
                let serving = self.l.serving();
                let applies = self.l.handle_role_change(now, c);
                // A change applies exactly to the role it was raised in, while serving it.
                assert_eq!(applies, serving == Some(c.from_role()), "{c:?} while {:?}", self.l.phase);
                if applies {
                    let issued: Vec<_> = self.l.commands.iter().cloned().collect();
                    assert!(matches!(issued[0], Command::Record(r) if r == c), "record first: {issued:?}");
                    assert!(
                        matches!(issued[1], Command::Close { role, how: Closing::RoleLost, .. } if role == c.from_role()),
                        "{issued:?}"
                    );
                } else {
                    assert!(self.l.commands.is_empty(), "an ignored change issued {:?}", self.l.commands);
                }
            }
            (Step::Stop, r) => {
                self.running = r;
                self.l.handle_stop(now);
            }
        }
        self.drain();
        for c in &self.log[before..] {
            if let Command::Close { deadline, .. } = c {
                assert!(*deadline <= now + CLOSE_MAX, "a close without its bound");
            }
        }
        true
    }

    /// At most one role's parts are open, and exactly while opening, serving or closing.
    fn check(&self) {
        match self.l.phase {
            Phase::Opening(r) | Phase::Serving(r) | Phase::Closing { role: r, .. } => {
                assert_eq!(self.l.parts, Some(r), "{:?}", self.l)
            }
            Phase::Stopped => {}
            Phase::Failed => {}
        }
        // The role opened after an applied change is the change's target.
        for w in self.log.windows(3) {
            if let [Command::Record(c), Command::Close { .. }, Command::Open(r)] = w {
                assert_eq!(*r, c.to_role(), "{:?}", self.log);
            }
        }
    }

    /// From here, a stop and every command succeeding reaches `Stopped` in a few steps, with
    /// no parts left open.
    fn stops(mut self, now: Instant) {
        let stop_at = self.log.len();
        self.apply(now, Step::Stop);
        for _ in 0..4 {
            if self.l.is_stopped() {
                break;
            }
            assert!(self.apply(now, Step::Succeed), "stuck after a stop: {:?}", self.l);
        }
        assert!(self.l.is_stopped(), "not stopped: {:?}", self.l);
        assert!(self.running.is_none());
        assert!(
            self.l.parts.is_none() || self.log.iter().rev().any(|c| matches!(c, Command::Close { .. })),
            "parts left open without a close: {:?}",
            self.l
        );
        // Nothing opens after a stop.
        assert!(self.log[stop_at..].iter().all(|c| !matches!(c, Command::Open(_))));
    }
}

fn explore(s: Sim, now: Instant, depth: usize, visited: &mut usize) {
    *visited += 1;
    s.check();
    s.clone().stops(now);
    if depth == 0 {
        return;
    }
    for step in STEPS {
        let mut next = s.clone();
        if next.apply(now, step) {
            explore(next, now + Duration::from_millis(1), depth - 1, visited);
        }
    }
}

#[test]
fn every_sequence_of_events_keeps_one_role_open_and_stops() {
    let now = Instant::now();
    let mut visited = 0;
    for role in [Role::Primary, Role::Secondary] {
        explore(Sim::new(role), now, 6, &mut visited);
    }
    assert!(visited > 10_000, "explored only {visited} states");
}

#[test]
fn a_promotion_closes_the_secondary_then_opens_the_primary() {
    let now = Instant::now();
    let mut s = Sim::new(Role::Secondary);
    s.apply(now, Step::Succeed);
    assert_eq!(s.l.serving(), Some(Role::Secondary));
    s.apply(now, Step::Change(Change::Promoted { epoch: 3 }));
    s.apply(now, Step::Succeed);
    s.apply(now, Step::Succeed);
    assert_eq!(s.l.serving(), Some(Role::Primary));
    assert!(matches!(
        &s.log[..],
        [
            Command::Open(Role::Secondary),
            Command::Record(Change::Promoted { epoch: 3 }),
            Command::Close { role: Role::Secondary, how: Closing::RoleLost, .. },
            Command::Open(Role::Primary)
        ]
    ));
}

#[test]
fn a_stop_during_a_role_change_drops_the_reopen() {
    let now = Instant::now();
    let mut s = Sim::new(Role::Primary);
    s.apply(now, Step::Succeed);
    s.apply(now, Step::Change(Change::HandedOver { epoch: 2 }));
    s.apply(now, Step::Stop);
    s.apply(now, Step::Succeed);
    assert!(s.l.is_stopped());
    assert!(!s.log.iter().skip(1).any(|c| matches!(c, Command::Open(_))), "{:?}", s.log);
}

#[test]
fn a_close_that_cannot_release_leaves_the_volume_failed_and_never_reopens() {
    let now = Instant::now();
    let mut s = Sim::new(Role::Secondary);
    s.apply(now, Step::Succeed);
    s.apply(now, Step::Change(Change::Promoted { epoch: 2 }));
    s.apply(now, Step::Fail);
    assert_eq!(s.l.phase(), Phase::Failed);
    for step in STEPS {
        s.apply(now, step);
    }
    assert_eq!(s.log.iter().filter(|c| matches!(c, Command::Open(_))).count(), 1, "{:?}", s.log);
}

#[test]
fn a_stale_change_from_the_other_role_is_ignored() {
    let now = Instant::now();
    let mut s = Sim::new(Role::Primary);
    s.apply(now, Step::Succeed);
    assert!(!s.l.handle_role_change(now, Change::Promoted { epoch: 9 }));
    assert_eq!(s.l.serving(), Some(Role::Primary));
    assert!(s.l.poll_command().is_none());
}
