//! Exports: the iSCSI (LIO) or NVMe/TCP (nvmet) target and the service address through which
//! hosts reach a primary's device (design: "Exports: hosts follow the primary"). The export
//! follows the role: it is up only while this node serves the volume as primary, unfenced,
//! with one identity on both nodes (`identity.rs`).
//!
//! This file is the pure part: the export's [`Part`]s, which of them are [`Present`], and
//! the next step towards a [`Goal`]. `service.rs` runs the steps on a thread of its own
//! (configfs writes can wait for I/O in flight), `configfs.rs` and `net.rs` are the I/O.
//!
//! # The rules
//! - Bring-up adds the parts in the order of [`Part::UP`]: the service address, the backing
//!   store (with the volume's identity, set before anything links it), the target, the LUN
//!   (namespace), the target enabled, and last the portal that listens. A portal never
//!   answers before its LUN exists (ESXi would call an empty target a permanent device loss).
//!   Until the portal opens, the port is closed on the service address: a host that tries
//!   is refused (TCP RST) and retries; no firewall is involved.
//! - Tear-down ([`Goal::Down`]: switchover finished, resignation, the operator, shutdown)
//!   removes them in the reverse order: the portal closes first, the service address goes
//!   last.
//! - Withdrawal ([`Goal::Withdraw`]: fenced, about to be fenced, deposed, a switchover under
//!   way) closes the portal, then drops the service address at once, then removes the rest.
//!   Ending the sessions waits for the commands in flight, and on a fenced volume those wait
//!   (parked) until the node is unfenced or deposed; the address must not wait with them: the
//!   new primary takes it, and whatever the old one sends after that (an error for a parked
//!   write failed at deposition) must reach no host. The switchover waits for the address
//!   to be gone before it asks the witness to hand over (`fencing/switchover.rs`).
//! - A part is removed only after every part that depends on it (later in [`Part::UP`]),
//!   except the address on withdrawal; it is added only after every part it depends on.

pub mod config;
pub mod configfs;
pub mod identity;
pub mod net;
pub mod service;

pub use service::Exports;

use std::time::Duration;

/// One piece of a running export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The service address on its interface (announced by gratuitous ARP).
    Address,
    /// iSCSI: the iblock storage object on the device, with the identity (serial, vendor,
    /// product) and its attributes; NVMe: the subsystem with its serial and controller ids.
    Store,
    /// iSCSI: the target and its portal group (attributes, authentication, ACLs); NVMe: the
    /// allowed hosts.
    Target,
    /// iSCSI: LUN 0 linked to the storage object (and mapped in each ACL); NVMe: namespace 1
    /// on the device, enabled.
    Lun,
    /// iSCSI: the portal group enabled (ending sessions disables it); NVMe: the port (not
    /// listening yet).
    Enabled,
    /// iSCSI: the network portal (listening); NVMe: the subsystem linked into the port
    /// (listening).
    Portal,
}

impl Part {
    /// The bring-up order; tear-down is its reverse.
    pub const UP: [Part; 6] = [Part::Address, Part::Store, Part::Target, Part::Lun, Part::Enabled, Part::Portal];
    /// The withdrawal order: the portal, then the address, then the rest in reverse.
    pub const WITHDRAW: [Part; 6] = [Part::Portal, Part::Address, Part::Enabled, Part::Lun, Part::Target, Part::Store];

    fn bit(self) -> u8 {
        1 << Part::UP.iter().position(|p| *p == self).unwrap_or(0)
    }
}

/// The parts present now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Present(u8);

impl Present {
    pub const NONE: Present = Present(0);
    pub const ALL: Present = Present(0b11_1111);

    pub fn has(self, p: Part) -> bool {
        self.0 & p.bit() != 0
    }
    pub fn with(self, p: Part) -> Present {
        Present(self.0 | p.bit())
    }
    pub fn without(self, p: Part) -> Present {
        Present(self.0 & !p.bit())
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn apply(self, step: Step) -> Present {
        match step {
            Step::Add(p) => self.with(p),
            Step::Remove(p) => self.without(p),
        }
    }
}

/// Where the export is heading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Goal {
    /// Every part present: hosts are served.
    Serve,
    /// Nothing present, the address dropped right after the portal (see the module doc).
    Withdraw,
    /// Nothing present, in reverse bring-up order (the address last).
    Down,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Add(Part),
    Remove(Part),
}

/// The next step from `present` towards `goal`; None once there.
pub fn next_step(present: Present, goal: Goal) -> Option<Step> {
    match goal {
        Goal::Serve => Part::UP.iter().find(|p| !present.has(**p)).map(|p| Step::Add(*p)),
        Goal::Down => Part::UP.iter().rev().find(|p| present.has(**p)).map(|p| Step::Remove(*p)),
        Goal::Withdraw => Part::WITHDRAW.iter().find(|p| present.has(**p)).map(|p| Step::Remove(*p)),
    }
}

/// What the export sees of its volume's fence (`service.rs` reads it from `FenceShared`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceView {
    /// The volume has a witness (`fencing = "witness"`); without one nothing here applies.
    pub enabled: bool,
    /// Fenced now (deposed, switching, or the lease and the peer both gone): `is_fenced`.
    pub fenced: bool,
    /// Every link to the peer is up.
    pub peer_linked: bool,
    /// `on_fence = "io-error"`: the fence fails the I/O it holds.
    pub fence_fails_io: bool,
    pub lease_left: Duration,
    pub lease: Duration,
}

/// How much of the lease may be left, without the peer, before the export withdraws ahead
/// of the fence: a quarter (renewals come every third, so a healthy lease never gets there).
pub const WITHDRAW_AHEAD_DIVISOR: u32 = 4;

/// May a primary's export serve hosts now? Not while fenced (a switchover under way counts:
/// the I/O is parked for the peer), and not once the lease is nearly gone without the peer
/// (the peer may be promoted soon after it runs out: the address must be free by then).
/// With `on_fence = "io-error"`, not once the lease is nearly gone at all: the fence fails
/// the I/O it holds, and a link that died silently still looks up, so hosts are cut off
/// before the lease ends whatever the link seems to be (a witness outage with the peer
/// present then stalls hosts until it returns; `suspend`, the default, keeps serving).
pub fn may_serve(f: FenceView) -> bool {
    if !f.enabled {
        return true;
    }
    !f.fenced && (f.lease_left >= f.lease / WITHDRAW_AHEAD_DIVISOR || (f.peer_linked && !f.fence_fails_io))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_states() -> impl Iterator<Item = Present> {
        (0u8..64).map(Present)
    }

    fn index(p: Part) -> usize {
        Part::UP.iter().position(|q| *q == p).unwrap()
    }

    /// Every step from every state towards every goal keeps the ordering rules, and every
    /// goal is reached from every state in at most six steps.
    #[test]
    fn every_step_from_every_state_keeps_the_order() {
        for goal in [Goal::Serve, Goal::Withdraw, Goal::Down] {
            for start in all_states() {
                let mut present = start;
                let mut steps = 0;
                while let Some(step) = next_step(present, goal) {
                    match step {
                        Step::Add(p) => {
                            assert_eq!(goal, Goal::Serve);
                            assert!(!present.has(p));
                            // Added only on top of every part it depends on.
                            for q in &Part::UP[..index(p)] {
                                assert!(present.has(*q), "{p:?} added before {q:?} from {start:?}");
                            }
                        }
                        Step::Remove(p) => {
                            assert_ne!(goal, Goal::Serve);
                            assert!(present.has(p));
                            // The portal closes first, whatever else is there.
                            if p != Part::Portal {
                                assert!(!present.has(Part::Portal), "{p:?} removed while the portal is open");
                            }
                            match goal {
                                Goal::Down => {
                                    // Nothing removed under a part that depends on it: the
                                    // address goes last.
                                    for q in &Part::UP[index(p) + 1..] {
                                        assert!(!present.has(*q), "{p:?} removed before {q:?} from {start:?}");
                                    }
                                }
                                Goal::Withdraw => {
                                    // The address goes right after the portal, the rest in
                                    // reverse order.
                                    if p != Part::Portal && p != Part::Address {
                                        assert!(!present.has(Part::Address), "{p:?} removed before the address");
                                        for q in &Part::UP[index(p) + 1..] {
                                            assert!(!present.has(*q), "{p:?} removed before {q:?} from {start:?}");
                                        }
                                    }
                                }
                                Goal::Serve => unreachable!(),
                            }
                        }
                    }
                    present = present.apply(step);
                    steps += 1;
                    assert!(steps <= Part::UP.len(), "no progress from {start:?} towards {goal:?}");
                }
                let want = if goal == Goal::Serve { Present::ALL } else { Present::NONE };
                assert_eq!(present, want, "{goal:?} from {start:?}");
            }
        }
    }

    /// The sequences as an operator reads them.
    #[test]
    fn the_three_sequences_from_their_usual_states() {
        let run = |mut p: Present, goal| {
            let mut out = Vec::new();
            while let Some(s) = next_step(p, goal) {
                out.push(s);
                p = p.apply(s);
            }
            out
        };
        use Part::*;
        use Step::*;
        assert_eq!(
            run(Present::NONE, Goal::Serve),
            [Add(Address), Add(Store), Add(Target), Add(Lun), Add(Enabled), Add(Portal)]
        );
        assert_eq!(
            run(Present::ALL, Goal::Down),
            [Remove(Portal), Remove(Enabled), Remove(Lun), Remove(Target), Remove(Store), Remove(Address)]
        );
        assert_eq!(
            run(Present::ALL, Goal::Withdraw),
            [Remove(Portal), Remove(Address), Remove(Enabled), Remove(Lun), Remove(Target), Remove(Store)]
        );
        // A withdrawal cut short (the lease came back): the address, then the portal again.
        let halfway = Present::ALL.without(Portal).without(Address);
        assert_eq!(run(halfway, Goal::Serve), [Add(Address), Add(Portal)]);
        // A bring-up that failed at the LUN: tear down what is there.
        let partial = Present::NONE.with(Address).with(Store).with(Target);
        assert_eq!(run(partial, Goal::Down), [Remove(Target), Remove(Store), Remove(Address)]);
    }

    #[test]
    fn serving_follows_the_fence_and_withdraws_ahead_of_it() {
        let lease = Duration::from_secs(4);
        let f = |enabled, fenced, peer_linked, fence_fails_io, left_ms| FenceView {
            enabled,
            fenced,
            peer_linked,
            fence_fails_io,
            lease_left: Duration::from_millis(left_ms),
            lease,
        };
        for fenced in [false, true] {
            for peer in [false, true] {
                for fails in [false, true] {
                    for left in [0, 999, 1000, 4000] {
                        let view = f(true, fenced, peer, fails, left);
                        let expect = !fenced && (left >= 1000 || (peer && !fails));
                        assert_eq!(may_serve(view), expect, "{view:?}");
                        assert!(may_serve(f(false, fenced, peer, fails, left)), "without a witness nothing fences");
                    }
                }
            }
        }
    }
}
