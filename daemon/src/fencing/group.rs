//! A consistency group under one [`Fence`](super::Fence): what the witness client aggregates
//! over the group's volumes, as pure state (sans-I/O). The witness keeps one record for the
//! group (epoch, primary, lease, the peer's disk state), so the group goes alone, fences,
//! fails over and switches over as one, and the secondary site always holds one point in time
//! across it.
//!
//! # The rules
//! - The peer is *present* only while every volume's peer link is; a write held on any
//!   volume asks the witness to outdate the peer — for the whole group: until it has, no
//!   volume completes a write without its peer (the queues hold them; the lease is the
//!   group's).
//! - Any volume's disk failing makes the group resign; the group is up to date (promotable)
//!   only while every volume is, and the witness hears the worst volume's disk state.
//! - Once the witness outdated the peer, every volume may go alone. The witness hears the
//!   peer is up to date again only when *every* volume has been resynced since that spell of
//!   going alone began, with no write completed alone during its copy. A volume resynced
//!   while others still go alone stops going alone itself, unless its writes are held again
//!   (its peer link dropped once more): then it may go alone again, and needs another resync.

use metroblk_protocol::DiskState;

pub use crate::config::GROUP_VOLUMES_MAX;

/// What one volume of the group shows the witness client at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeFacts {
    pub peer_present: bool,
    pub disk: DiskState,
    pub writes_held: bool,
    pub epoch: u64,
}

/// The group's facts, as the [`Fence`](super::Fence) takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupFacts {
    pub peer_present: bool,
    pub disk_failed: bool,
    pub up_to_date: bool,
    pub writes_held: bool,
    pub epoch: u64,
    /// The worst volume's disk state: what Promote and Resign report.
    pub disk: DiskState,
}

fn disk_rank(d: DiskState) -> u8 {
    match d {
        DiskState::UpToDate => 0,
        DiskState::Outdated => 1,
        DiskState::Inconsistent => 2,
        DiskState::Failed => 3,
    }
}

/// Aggregates the volumes' facts (see the module doc).
pub fn group_facts(volumes: &[VolumeFacts]) -> GroupFacts {
    assert!(!volumes.is_empty() && volumes.len() <= GROUP_VOLUMES_MAX, "a group of {} volumes", volumes.len());
    GroupFacts {
        peer_present: volumes.iter().all(|v| v.peer_present),
        disk_failed: volumes.iter().any(|v| v.disk == DiskState::Failed),
        up_to_date: volumes.iter().all(|v| v.disk == DiskState::UpToDate),
        writes_held: volumes.iter().any(|v| v.writes_held),
        epoch: volumes.iter().map(|v| v.epoch).max().unwrap_or(0),
        disk: worst_disk(volumes.iter().map(|v| v.disk)),
    }
}

/// The worst of the volumes' disk states: what the witness hears of the group.
pub fn worst_disk(disks: impl Iterator<Item = DiskState>) -> DiskState {
    disks.max_by_key(|d| disk_rank(*d)).unwrap_or(DiskState::UpToDate)
}

/// Which volumes have been resynced since the group last started going alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupAlone {
    in_sync: Vec<bool>,
    alone: bool,
}

impl GroupAlone {
    pub fn new(volumes: usize) -> GroupAlone {
        assert!((1..=GROUP_VOLUMES_MAX).contains(&volumes));
        GroupAlone { in_sync: vec![false; volumes], alone: false }
    }

    /// The fence's permission to go alone, each tick. A new spell of going alone needs every
    /// volume resynced again.
    pub fn handle_alone_allowed(&mut self, allowed: bool) {
        if allowed && !self.alone {
            self.in_sync.fill(false);
        }
        self.alone = allowed;
    }

    /// Volume `i` finished a resync; `clean`: no write completed alone during its copy (else
    /// it resyncs again). Returns whether the witness may now hear the peer is up to date:
    /// every volume is resynced.
    pub fn handle_resynced(&mut self, i: usize, clean: bool) -> bool {
        assert!(i < self.in_sync.len());
        self.in_sync[i] = clean;
        clean && self.in_sync.iter().all(|&s| s)
    }

    /// May volume `i` complete writes alone now? While the group goes alone: a volume not
    /// yet resynced, or one whose writes are held again (which then needs a resync again).
    pub fn may_go_alone(&mut self, i: usize, writes_held: bool) -> bool {
        assert!(i < self.in_sync.len());
        if !self.alone {
            return false;
        }
        if writes_held {
            self.in_sync[i] = false;
        }
        !self.in_sync[i]
    }

    pub fn is_resynced(&self, i: usize) -> bool {
        self.in_sync[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_is_present_up_to_date_and_held_as_its_volumes_together() {
        let v = |peer_present, disk, writes_held, epoch| VolumeFacts { peer_present, disk, writes_held, epoch };
        let f = group_facts(&[v(true, DiskState::UpToDate, false, 3), v(false, DiskState::Outdated, true, 4)]);
        assert_eq!(
            f,
            GroupFacts {
                peer_present: false,
                disk_failed: false,
                up_to_date: false,
                writes_held: true,
                epoch: 4,
                disk: DiskState::Outdated
            }
        );
        let f = group_facts(&[v(true, DiskState::Failed, false, 1), v(true, DiskState::Inconsistent, false, 1)]);
        assert!(f.disk_failed && f.peer_present && !f.writes_held);
        assert_eq!(f.disk, DiskState::Failed);
        let f = group_facts(&[v(true, DiskState::UpToDate, false, 2)]);
        assert!(f.up_to_date && f.peer_present && !f.disk_failed);
    }

    #[derive(Clone, Copy, Debug)]
    enum Ev {
        Alone(bool),
        Resynced(usize, bool),
        Held(usize, bool),
    }

    /// The model: per volume, whether it has been cleanly resynced since the spell began and
    /// not gone alone since; the witness may be told only when all have.
    #[derive(Clone, Debug)]
    struct Model {
        alone: bool,
        clean: Vec<bool>,
    }

    /// Every sequence of events on a group of three, up to a depth: the witness is told the
    /// peer is up to date exactly when every volume was cleanly resynced since the spell of
    /// going alone began and none went alone again since; a volume with held writes may
    /// always go alone while the group does.
    #[test]
    fn every_sequence_of_events_tells_the_witness_only_when_every_volume_is_resynced() {
        const N: usize = 3;
        let mut events = vec![Ev::Alone(true), Ev::Alone(false)];
        for i in 0..N {
            events.extend([Ev::Resynced(i, true), Ev::Resynced(i, false), Ev::Held(i, true), Ev::Held(i, false)]);
        }
        fn walk(g: &GroupAlone, m: &Model, events: &[Ev], depth: usize, seen: &mut u64) {
            *seen += 1;
            if depth == 0 {
                return;
            }
            for &e in events {
                let (mut g, mut m) = (g.clone(), m.clone());
                match e {
                    Ev::Alone(a) => {
                        g.handle_alone_allowed(a);
                        if a && !m.alone {
                            m.clean.fill(false);
                        }
                        m.alone = a;
                    }
                    Ev::Resynced(i, clean) => {
                        let told = g.handle_resynced(i, clean);
                        m.clean[i] = clean;
                        assert_eq!(told, clean && m.clean.iter().all(|&c| c), "{m:?} after {e:?}");
                    }
                    Ev::Held(i, held) => {
                        let may = g.may_go_alone(i, held);
                        if m.alone && held {
                            m.clean[i] = false;
                        }
                        assert_eq!(may, m.alone && !m.clean[i], "{m:?} after {e:?}");
                        if held && m.alone {
                            assert!(may, "a volume with held writes is refused going alone while the group goes alone");
                        }
                    }
                }
                for i in 0..N {
                    assert_eq!(g.is_resynced(i), m.clean[i]);
                }
                walk(&g, &m, events, depth - 1, seen);
            }
        }
        let mut seen = 0;
        walk(&GroupAlone::new(N), &Model { alone: false, clean: vec![false; N] }, &events, 5, &mut seen);
        assert!(seen > 100_000, "{seen}");
    }
}
