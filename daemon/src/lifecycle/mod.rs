//! One volume's life on this node: open in a role, serve, change role, stop. The role belongs
//! to the volume, never to the node: a role change of one volume closes and opens that
//! volume's parts alone (its device, queues, links, witness client, metadata), in the running
//! process, and touches no other volume.
//!
//! [`Lifecycle`] is the pure state (sans-I/O, time passed in); `runner.rs` executes its
//! [`Command`]s on one thread per volume and feeds back what happened.
//!
//! # The rules
//! - A role's parts are opened only when no role's parts are open: the old role is closed
//!   (device stopped, links and listener shut, witness client joined, every reference to its
//!   metadata released) before the new one opens, so two incarnations never write one
//!   metadata file or serve one device.
//! - A role change applies only to the role it was raised in: `Promoted` to a serving
//!   secondary, `Deposed`, `Resigned` and `HandedOver` to a serving primary. Any other (stale:
//!   raised by a witness client that has since been closed) is ignored.
//! - The change is recorded in the metadata before the old role closes, so a crash in between
//!   restarts in the new role.
//! - Closing is bounded: every [`Command::Close`] carries a deadline ([`CLOSE_MAX`]); what has
//!   not drained by then is given up (a primary leaving its role deletes its device, and the
//!   I/O still pending fails; at shutdown the device is left for recovery instead, as after
//!   `kill -9`). A close that cannot release the old parts by its deadline leaves the volume
//!   `failed`: it is never opened a second time beside them.
//! - A stop wins over everything: a pending reopen is dropped, an open that completes is
//!   closed again, a failed volume is simply stopped.

pub mod parts;
pub mod runner;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::Role;

/// Longest a role's parts take to close: in-flight I/O drains (or is failed), the device is
/// stopped, the links end and every thread holding the volume lets go.
pub const CLOSE_MAX: Duration = Duration::from_secs(10);
/// Most commands outstanding at once (record, close, open).
const COMMANDS_MAX: usize = 3;

/// A role change the witness client raised for this volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// The witness made this secondary the primary in `epoch`.
    Promoted { epoch: u64 },
    /// Another node is primary in `epoch`: this primary serves nothing more.
    Deposed { epoch: u64 },
    /// This primary resigned (its disk failed).
    Resigned,
    /// A planned switchover: the peer is primary in `epoch`; this copy is up to date.
    HandedOver { epoch: u64 },
    /// An operator's `metroblk promote` (no witness): primary in the next epoch, a new
    /// generation; `forced`: even though this copy is not up to date.
    PromotedByOperator { forced: bool },
    /// An operator's `metroblk demote` (no witness): secondary, the copy as it is; or
    /// `resync --discard-local` on a primary (`discard_local`): secondary, outdated, its
    /// changes dropped at the first exchange (resynced from the peer).
    DemotedByOperator { discard_local: bool },
}

impl Change {
    /// The role the change applies to.
    pub fn from_role(self) -> Role {
        match self {
            Change::Promoted { .. } | Change::PromotedByOperator { .. } => Role::Secondary,
            _ => Role::Primary,
        }
    }

    /// The role the volume serves in after it.
    pub fn to_role(self) -> Role {
        match self {
            Change::Promoted { .. } | Change::PromotedByOperator { .. } => Role::Primary,
            _ => Role::Secondary,
        }
    }
}

/// How a role's parts are closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Closing {
    /// The role moved to the peer: a primary's queues fail what they hold or parked, and its
    /// device is deleted (its page cache must never see the other site's data).
    RoleLost,
    /// The node stops: a primary's device is stopped and deleted when that hurts nobody, else
    /// left for the next start to recover (writes held for the peer or parked while fenced,
    /// or the device in use).
    Shutdown,
}

/// What the runner must do next.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Command {
    /// Open the volume's parts in `role` and serve.
    Open(Role),
    /// Record the role change in the metadata (before closing the old role).
    Record(Change),
    /// Close the parts of `role`; give up what has not drained by `deadline`.
    Close { role: Role, how: Closing, deadline: Instant },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Opening(Role),
    Serving(Role),
    Closing {
        role: Role,
        then: Then,
    },
    /// The volume could not be opened, or its old role could not be closed: it serves
    /// nothing until the node restarts (`status` says why).
    Failed,
    Stopped,
}

/// What follows a close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Then {
    Open(Role),
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lifecycle {
    phase: Phase,
    /// A stop arrived while opening: close as soon as the open completes.
    stop_requested: bool,
    /// The role whose parts are open (or being opened or closed) right now.
    parts: Option<Role>,
    commands: VecDeque<Command>,
}

impl Lifecycle {
    /// A volume about to open in `role`.
    pub fn new(role: Role) -> Lifecycle {
        let mut l =
            Lifecycle { phase: Phase::Opening(role), stop_requested: false, parts: None, commands: VecDeque::new() };
        l.open(role);
        l
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The role served now, if any.
    pub fn serving(&self) -> Option<Role> {
        match self.phase {
            Phase::Serving(r) => Some(r),
            _ => None,
        }
    }

    /// Nothing more will happen: stopped.
    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    fn push(&mut self, c: Command) {
        assert!(self.commands.len() < COMMANDS_MAX, "lifecycle commands beyond {COMMANDS_MAX}: {:?}", self.commands);
        self.commands.push_back(c);
    }

    fn open(&mut self, role: Role) {
        assert!(self.parts.is_none(), "opening {role} while the parts of {:?} are open", self.parts);
        self.parts = Some(role);
        self.phase = Phase::Opening(role);
        self.push(Command::Open(role));
    }

    fn close(&mut self, now: Instant, role: Role, how: Closing, then: Then) {
        assert_eq!(self.parts, Some(role), "closing {role} while the open parts are {:?}", self.parts);
        self.phase = Phase::Closing { role, then };
        self.push(Command::Close { role, how, deadline: now + CLOSE_MAX });
    }

    /// The open of `role` succeeded: the volume serves.
    pub fn handle_opened(&mut self, now: Instant) {
        let Phase::Opening(role) = self.phase else { panic!("opened while {:?}", self.phase) };
        assert_eq!(self.parts, Some(role));
        self.phase = Phase::Serving(role);
        if self.stop_requested {
            self.close(now, role, Closing::Shutdown, Then::Stop);
        }
    }

    /// The open failed; whatever it had opened is closed again (the runner's open cleans up
    /// after itself), so no parts are open.
    pub fn handle_open_failed(&mut self) {
        assert!(matches!(self.phase, Phase::Opening(_)), "open failed while {:?}", self.phase);
        self.parts = None;
        self.phase = if self.stop_requested { Phase::Stopped } else { Phase::Failed };
    }

    /// The witness client raised `change`. Returns whether it applies (see the module doc).
    pub fn handle_role_change(&mut self, now: Instant, change: Change) -> bool {
        match self.phase {
            Phase::Serving(role) if role == change.from_role() && !self.stop_requested => {
                self.push(Command::Record(change));
                let how = Closing::RoleLost;
                self.close(now, role, how, Then::Open(change.to_role()));
                true
            }
            _ => false,
        }
    }

    /// The node stops (SIGINT, SIGTERM).
    pub fn handle_stop(&mut self, now: Instant) {
        self.stop_requested = true;
        match self.phase {
            Phase::Serving(role) => self.close(now, role, Closing::Shutdown, Then::Stop),
            Phase::Closing { role, .. } => self.phase = Phase::Closing { role, then: Then::Stop },
            Phase::Failed => self.phase = Phase::Stopped,
            Phase::Opening(_) | Phase::Stopped => {}
        }
    }

    /// The old role's parts are closed and released.
    pub fn handle_closed(&mut self) {
        let Phase::Closing { role, then } = self.phase else { panic!("closed while {:?}", self.phase) };
        assert_eq!(self.parts, Some(role));
        self.parts = None;
        match then {
            Then::Open(next) if !self.stop_requested => self.open(next),
            _ => self.phase = Phase::Stopped,
        }
    }

    /// The old role's parts could not be released by the deadline: never open beside them.
    pub fn handle_close_failed(&mut self) {
        assert!(matches!(self.phase, Phase::Closing { .. }), "close failed while {:?}", self.phase);
        // The parts stay (leaked, threads still ending): nothing opens again in this process.
        self.phase = if self.stop_requested { Phase::Stopped } else { Phase::Failed };
    }
}

#[cfg(test)]
mod tests;
