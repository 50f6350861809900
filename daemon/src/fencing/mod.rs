//! Fencing and promotion: what a data node may do about its peer and the witness, as pure
//! state (sans-I/O; time passed in). `client.rs` does the witness I/O around it and publishes
//! the outcome to the queues (`FenceShared`).
//!
//! # The rule (design: "Losing the peer — fencing")
//! A primary never completes a write its peer has not acknowledged unless the witness has
//! first recorded that peer `outdated` in the current epoch, and it stops serving I/O when it
//! has neither its peer nor a valid lease:
//!
//! | peer link | lease  | peer outdated by the witness | the primary's I/O |
//! |-----------|--------|------------------------------|-------------------|
//! | up        | any    | any                          | replicate          |
//! | down      | valid  | yes                          | alone              |
//! | down      | valid  | no (asked)                   | hold               |
//! | down      | expired| any                          | fenced             |
//!
//! A primary that has not held a lease since it started, and has no peer, is fenced: after a
//! restart it may have been replaced. A primary the witness names replaced (another primary,
//! a higher epoch) is *deposed*: fenced for good in its epoch; it comes back as a secondary.
//!
//! A secondary that lost its primary asks to be promoted while its copy is up to date; the
//! witness grants that only after the primary's lease ran out (`lease × (1 + drift)` after
//! its last grant, later than the primary's own `t_request + lease × (1 − drift)`), so the
//! two never serve in one epoch.

pub mod client;
pub mod group;
pub mod lease;
pub mod shared;
pub mod switchover;

use std::time::{Duration, Instant};

use lease::LeaseClock;

/// How soon a refused or unanswered Outdate or Promote is asked again.
pub const ASK_RETRY: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeRole {
    Primary,
    Secondary,
    /// Was primary; the witness named another one. Serves nothing in this epoch.
    Deposed,
}

/// A request to the witness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ask {
    /// Renew the primary's lease.
    Lease,
    /// Record the peer outdated (and renew the lease).
    Outdate,
    /// The peer is up to date again (a resync finished).
    PeerUpToDate,
    /// Make this secondary the primary.
    Promote,
    /// This primary gives up (its disk failed).
    Resign,
    /// Planned switchover: make the peer the primary (this one drained its I/O).
    Handover,
}

/// The witness's answer to the [`Ask`] in flight.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Answer {
    /// Granted; `epoch` is the witness's epoch after the decision.
    Granted { epoch: u64 },
    /// Refused because another node is primary or the epoch moved on.
    Deposed { epoch: u64 },
    /// Refused for another reason (the peer's lease runs, this copy is outdated...).
    Refused,
    /// No answer (witness unreachable, timeout).
    Unreachable,
}

/// What the primary's queues do with I/O now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Io {
    /// Normal: replicate every write.
    Replicate,
    /// The peer is outdated by the witness and the lease runs: complete writes locally.
    Alone,
    /// The peer is lost and the witness has not answered yet: hold writes.
    Hold,
    /// Neither peer nor lease: serve nothing (policy: suspend or io-error).
    Fenced,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    role: NodeRole,
    epoch: u64,
    lease: LeaseClock,
    up_to_date: bool,
    peer_connected: bool,
    /// The witness recorded the peer outdated in this epoch (and has not heard it is up to
    /// date again).
    peer_outdated: bool,
    /// The peer finished a resync from this primary and the witness has not been told.
    peer_in_sync_untold: bool,
    /// This primary's disk failed: resign.
    disk_failed: bool,
    /// Writes wait for the peer (held): the reason to ask the witness to outdate it. A
    /// primary that merely starts without its peer only renews its lease.
    writes_held: bool,
    in_flight: Option<Ask>,
    last_ask: Option<(Ask, Instant)>,
    /// Set when a Promote was granted: the node becomes primary in this epoch.
    promoted: Option<u64>,
    /// An operator asked for a switchover (primary, peer connected and in sync).
    handover_wanted: bool,
    /// The witness granted the handover: the peer is primary now.
    handed_over: bool,
}

impl Fence {
    /// `peer_outdated`: this node's metadata records its peer outdated (it went on alone,
    /// which the witness granted first).
    pub fn new(role: NodeRole, epoch: u64, lease: LeaseClock, up_to_date: bool, peer_outdated: bool) -> Fence {
        assert!(role != NodeRole::Deposed);
        Fence {
            role,
            epoch,
            lease,
            up_to_date,
            peer_connected: false,
            peer_outdated,
            peer_in_sync_untold: false,
            disk_failed: false,
            writes_held: false,
            in_flight: None,
            last_ask: None,
            promoted: None,
            handover_wanted: false,
            handed_over: false,
        }
    }

    /// A planned switchover: hand the role to the peer (the caller drained the I/O first).
    pub fn handle_handover_request(&mut self) {
        if self.role == NodeRole::Primary {
            self.handover_wanted = true;
        }
    }

    /// Whether a granted handover made this node give up its role.
    pub fn handed_over(&self) -> bool {
        self.handed_over
    }

    pub fn role(&self) -> NodeRole {
        self.role
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn lease(&self) -> &LeaseClock {
        &self.lease
    }

    pub fn peer_outdated(&self) -> bool {
        self.peer_outdated
    }

    /// Writes may complete without the peer: the witness outdated it in this epoch and no
    /// resync has made it up to date since (one that did ends going alone until the witness
    /// outdates the peer again).
    pub fn alone_allowed(&self) -> bool {
        self.role == NodeRole::Primary && self.peer_outdated && !self.peer_in_sync_untold
    }

    /// The epoch the engine has seen (a secondary adopts the primary's from its frames).
    pub fn observe_epoch(&mut self, epoch: u64) {
        self.epoch = self.epoch.max(epoch);
    }

    /// A data link to the peer came up or went down (primary: every queue's link up;
    /// secondary: any link from the primary).
    pub fn handle_peer_link(&mut self, connected: bool) {
        self.peer_connected = connected;
    }

    /// Whether writes are held for the peer now.
    pub fn handle_writes_held(&mut self, held: bool) {
        self.writes_held = held;
    }

    /// A resync to the peer finished (or an exchange found it in sync): it is up to date
    /// again, and the witness is told — even when this machine does not remember outdating
    /// it: a primary that restarted between the resync and telling the witness would
    /// otherwise leave the peer outdated there for good (never promotable).
    pub fn handle_peer_in_sync(&mut self) {
        if self.role == NodeRole::Primary {
            self.peer_in_sync_untold = true;
        }
    }

    /// This node's copy became up to date (secondary, after a resync) or not.
    pub fn handle_up_to_date(&mut self, up_to_date: bool) {
        self.up_to_date = up_to_date;
    }

    pub fn handle_disk_failed(&mut self) {
        self.disk_failed = true;
        self.up_to_date = false;
    }

    /// The next request to send, if any; it is then in flight until [`Self::handle_answer`].
    pub fn poll_ask(&mut self, now: Instant) -> Option<Ask> {
        if self.in_flight.is_some() {
            return None;
        }
        let retry_ok = |ask: Ask| match self.last_ask {
            Some((a, t)) if a == ask => now >= t + ASK_RETRY,
            _ => true,
        };
        let ask = match self.role {
            NodeRole::Deposed => return None,
            NodeRole::Primary if self.disk_failed => Ask::Resign,
            NodeRole::Primary if self.handover_wanted && self.peer_connected => Ask::Handover,
            NodeRole::Primary if !self.peer_connected && !self.alone_allowed() && self.writes_held => Ask::Outdate,
            NodeRole::Primary if self.peer_connected && self.peer_in_sync_untold => Ask::PeerUpToDate,
            NodeRole::Primary if self.lease.renewal_due(now) => Ask::Lease,
            NodeRole::Primary => return None,
            NodeRole::Secondary if !self.peer_connected && self.up_to_date && self.promoted.is_none() => Ask::Promote,
            NodeRole::Secondary => return None,
        };
        if !retry_ok(ask) {
            return None;
        }
        if matches!(ask, Ask::Lease | Ask::Outdate) {
            self.lease.on_request_sent(now);
        }
        self.in_flight = Some(ask);
        self.last_ask = Some((ask, now));
        Some(ask)
    }

    pub fn in_flight(&self) -> Option<Ask> {
        self.in_flight
    }

    /// The witness answered the request in flight (or did not).
    pub fn handle_answer(&mut self, now: Instant, answer: Answer) {
        let Some(ask) = self.in_flight.take() else { return };
        let _ = now;
        match answer {
            Answer::Granted { epoch } => {
                assert!(epoch >= self.epoch, "the witness's epoch never goes back");
                match ask {
                    Ask::Lease | Ask::Outdate => {
                        self.lease.handle_granted();
                        if ask == Ask::Outdate {
                            self.peer_outdated = true;
                            self.peer_in_sync_untold = false;
                        }
                    }
                    Ask::PeerUpToDate => {
                        self.peer_outdated = false;
                        self.peer_in_sync_untold = false;
                    }
                    Ask::Promote => {
                        assert!(self.role == NodeRole::Secondary);
                        self.role = NodeRole::Primary;
                        self.epoch = epoch;
                        self.promoted = Some(epoch);
                        // The witness granted a lease with the promotion, from its own clock:
                        // counted from this request, as every grant.
                        self.lease.on_request_sent(self.last_ask.map_or(now, |(_, t)| t));
                        self.lease.handle_granted();
                        // The old primary is outdated in the witness's record.
                        self.peer_outdated = true;
                        self.peer_connected = false;
                    }
                    Ask::Resign => {
                        self.role = NodeRole::Deposed;
                        self.lease.revoke();
                    }
                    Ask::Handover => {
                        self.role = NodeRole::Deposed;
                        self.handed_over = true;
                        self.handover_wanted = false;
                        self.epoch = epoch;
                        self.lease.revoke();
                    }
                }
            }
            Answer::Deposed { epoch } => {
                if matches!(ask, Ask::Lease | Ask::Outdate) {
                    self.lease.handle_failed();
                }
                if self.role == NodeRole::Primary {
                    self.role = NodeRole::Deposed;
                    self.lease.revoke();
                }
                self.epoch = self.epoch.max(epoch);
            }
            Answer::Refused | Answer::Unreachable => {
                if matches!(ask, Ask::Lease | Ask::Outdate) {
                    self.lease.handle_failed();
                }
                if ask == Ask::Handover && answer == Answer::Refused {
                    self.handover_wanted = false;
                }
            }
        }
    }

    /// What the primary's queues do now (a secondary serves nothing).
    pub fn io(&self, now: Instant) -> Io {
        match self.role {
            NodeRole::Secondary | NodeRole::Deposed => Io::Fenced,
            NodeRole::Primary if self.disk_failed => Io::Fenced,
            NodeRole::Primary if self.peer_connected => Io::Replicate,
            NodeRole::Primary if !self.lease.is_valid(now) => Io::Fenced,
            NodeRole::Primary if self.alone_allowed() => Io::Alone,
            NodeRole::Primary => Io::Hold,
        }
    }

    /// The epoch a granted Promote made this node primary in (taken once).
    pub fn take_promotion(&mut self) -> Option<u64> {
        self.promoted.take()
    }
}

/// Records in the metadata that this node has seen `epoch` (never lowering it), so a stale
/// primary is refused after a restart too.
pub fn persist_epoch(v: &crate::volume::VolumeShared, epoch: u64) {
    let r = v.intent.update_superblock(|sb| sb.epoch = sb.epoch.max(epoch));
    if let Err(e) = r {
        tracing::error!(volume = %v.config.name, epoch, "cannot record the epoch: {e}");
    }
}

#[cfg(test)]
mod tests;
