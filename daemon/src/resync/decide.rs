//! Who syncs from whom, decided from both nodes' facts (pure; both nodes run it on the same
//! inputs and reach the same answer).
//!
//! The rule (design: "Dirty bitmap and resync"):
//! 1. An operator's `--discard-local` on one node makes it the target (both: refused).
//! 2. Same generation: in sync if neither has a dirty region and both are up to date;
//!    otherwise the up-to-date side is the source (the primary if both are) and the union of
//!    both bitmaps is copied.
//! 3. One side's generation in the other's history: the newer side is the source.
//! 4. Neither: split brain. Refused until an operator discards one side's changes.
//! 5. Both nodes serve the volume as primary (an operator promoted one while the other went on
//!    alone, without a witness): never a copy, whatever the facts (a primary's copy is what
//!    its applications read). Split brain where the generations diverged; otherwise refused,
//!    saying that one of them must be demoted. The answering primary only reports this and
//!    closes the link (`target::answer_as_primary`).
//!
//! A `failed`, `inconsistent` or `outdated` node is never a source; a resync whose only
//! possible source is such a node is refused, as is (until roles can change at run time) one
//! that would make the primary the target: the primary serves its copy to applications.

use metroblk_protocol::DiskState;

/// One node's facts, as its sync hello carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFacts {
    pub generation: [u8; 16],
    /// Earlier generations, newest first.
    pub history: Vec<[u8; 16]>,
    pub disk_state: DiskState,
    pub dirty: bool,
    pub discard_local: bool,
    pub full: bool,
    /// The node serves the volume as primary (the dialer always does).
    pub primary: bool,
}

/// What status and the log say about a split brain, on both nodes.
pub const SPLIT_BRAIN_TEXT: &str =
    "split brain: both nodes went on alone and their data diverged; pick the node whose \
     changes are to be dropped and run metroblk resync VOL --discard-local on it (a primary there is demoted and \
     resynced from the peer)";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to copy.
    InSync,
    /// The primary copies to the secondary: the union of both bitmaps, or everything.
    PrimaryToSecondary { full: bool },
    /// Both went on alone: their data diverged.
    SplitBrain,
    /// Cannot go on; the text says why and what to do.
    Refused(String),
}

fn usable_source(s: DiskState) -> bool {
    s == DiskState::UpToDate
}

/// Decides from the primary's and the secondary's facts. `primary` is the dialer's; if the
/// other node serves as primary too, see [`both_primary`].
pub fn decide(primary: &CopyFacts, secondary: &CopyFacts) -> Decision {
    if secondary.primary {
        return both_primary(primary, secondary);
    }
    let full = primary.full || secondary.full;
    let from_primary = |why_not: &str| {
        if usable_source(primary.disk_state) {
            Decision::PrimaryToSecondary { full }
        } else {
            Decision::Refused(format!(
                "{why_not}, but the primary's disk is {} and cannot be a sync source",
                primary.disk_state
            ))
        }
    };
    let secondary_newer = |why: &str| {
        Decision::Refused(format!(
            "{why}: the secondary holds the newer data; start that node as the primary, or drop its changes \
             with metroblk resync --discard-local on it"
        ))
    };
    match (primary.discard_local, secondary.discard_local) {
        (true, true) => return Decision::Refused("both nodes were asked to discard their changes".into()),
        (true, false) => return secondary_newer("the primary was asked to discard its changes"),
        (false, true) => return from_primary("the secondary was asked to discard its changes"),
        (false, false) => {}
    }
    if primary.disk_state == DiskState::Failed {
        return Decision::Refused("the primary's disk has failed".into());
    }
    if primary.generation == secondary.generation {
        let clean = !primary.dirty
            && !secondary.dirty
            && primary.disk_state == DiskState::UpToDate
            && secondary.disk_state == DiskState::UpToDate;
        if clean && !full {
            return Decision::InSync;
        }
        if usable_source(primary.disk_state) {
            return Decision::PrimaryToSecondary { full };
        }
        if usable_source(secondary.disk_state) {
            return secondary_newer("same generation and only the secondary is up to date");
        }
        return Decision::Refused(format!(
            "no up-to-date copy: the primary is {} and the secondary {}",
            primary.disk_state, secondary.disk_state
        ));
    }
    if primary.history.contains(&secondary.generation) {
        return from_primary("the primary's data is newer");
    }
    if secondary.history.contains(&primary.generation) {
        return secondary_newer("the secondary's generation is newer");
    }
    Decision::SplitBrain
}

/// Both nodes serve the volume as primary: nothing is copied either way. The same answer
/// whichever of the two is passed first.
pub fn both_primary(a: &CopyFacts, b: &CopyFacts) -> Decision {
    let diverged =
        a.generation != b.generation && !a.history.contains(&b.generation) && !b.history.contains(&a.generation);
    if diverged {
        return Decision::SplitBrain;
    }
    Decision::Refused(
        "both nodes serve this volume as primary (their data has not diverged); demote one with metroblk demote, \
         or drop its changes with metroblk resync VOL --discard-local on it"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: [[u8; 16]; 4] = [[1; 16], [2; 16], [3; 16], [4; 16]];

    fn facts(gen: usize, history: &[usize], disk_state: DiskState, dirty: bool) -> CopyFacts {
        CopyFacts {
            generation: G[gen],
            history: history.iter().map(|h| G[*h]).collect(),
            disk_state,
            dirty,
            discard_local: false,
            full: false,
            primary: false,
        }
    }

    /// Two primaries (one promoted by an operator while the other went on alone): split brain
    /// on both nodes, never a copy either way, whatever else the facts say.
    #[test]
    fn two_primaries_never_copy_and_report_the_split_brain_on_both_sides() {
        use DiskState::*;
        let primary = |g, h: &[usize], d, discard| {
            let mut f = facts(g, h, d, true);
            f.primary = true;
            f.discard_local = discard;
            f
        };
        // The runbook's case: alpha went on alone (1 after 0), beta was promoted (2 after 0).
        let (alpha, beta) = (primary(1, &[0], UpToDate, false), primary(2, &[0], UpToDate, false));
        assert_eq!(decide(&alpha, &beta), Decision::SplitBrain);
        assert_eq!(decide(&beta, &alpha), Decision::SplitBrain);
        // Once alpha is demoted with --discard-local, it answers as a secondary: beta copies.
        let mut demoted = facts(1, &[0], Outdated, true);
        demoted.discard_local = true;
        assert_eq!(decide(&beta, &demoted), Decision::PrimaryToSecondary { full: false });
        // One side's data descends from the other's: still no copy, and the text says what to do.
        let d = decide(&primary(1, &[0], UpToDate, false), &primary(0, &[], UpToDate, false));
        assert!(matches!(&d, Decision::Refused(t) if t.contains("both nodes serve this volume as primary")), "{d:?}");
        // Over small facts: symmetric, and never a copy.
        let histories: [&[usize]; 3] = [&[], &[0], &[1, 0]];
        for (ag, bg) in [(0, 0), (0, 1), (1, 2), (2, 3), (3, 1)] {
            for ah in histories {
                for bh in histories {
                    for ds in [UpToDate, Outdated, Inconsistent, Failed] {
                        for (adl, bdl) in [(false, false), (true, false), (false, true)] {
                            let (a, b) = (primary(ag, ah, ds, adl), primary(bg, bh, UpToDate, bdl));
                            let (ab, ba) = (decide(&a, &b), decide(&b, &a));
                            assert_eq!(ab, ba, "{a:?} {b:?}");
                            assert!(matches!(ab, Decision::SplitBrain | Decision::Refused(_)), "{ab:?}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_cases_of_the_design() {
        use DiskState::*;
        let up = |g, h: &[usize], d| facts(g, h, UpToDate, d);
        // Same generation, nothing dirty: in sync. Dirty on either side: union from the primary.
        assert_eq!(decide(&up(0, &[], false), &up(0, &[], false)), Decision::InSync);
        assert_eq!(decide(&up(0, &[], true), &up(0, &[], false)), Decision::PrimaryToSecondary { full: false });
        assert_eq!(decide(&up(0, &[], false), &up(0, &[], true)), Decision::PrimaryToSecondary { full: false });
        // The primary went on alone (new generation 1, 0 in its history): it is the source.
        assert_eq!(decide(&up(1, &[0], true), &up(0, &[], false)), Decision::PrimaryToSecondary { full: false });
        // An interrupted target: same generation, inconsistent: the primary again.
        assert_eq!(
            decide(&up(1, &[0], true), &facts(0, &[], Inconsistent, false)),
            Decision::PrimaryToSecondary { full: false }
        );
        // Both went on alone from generation 0.
        assert_eq!(decide(&up(1, &[0], true), &up(2, &[0], true)), Decision::SplitBrain);
        // ... and an operator drops the secondary's changes.
        let mut s = up(2, &[0], true);
        s.discard_local = true;
        assert_eq!(decide(&up(1, &[0], true), &s), Decision::PrimaryToSecondary { full: false });
        // The secondary is newer: refused (the primary serves its copy), naming the way out.
        let d = decide(&up(0, &[], false), &up(3, &[0], true));
        assert!(matches!(&d, Decision::Refused(t) if t.contains("secondary holds the newer data")), "{d:?}");
        // A full resync asked on either side.
        let mut p = up(0, &[], false);
        p.full = true;
        assert_eq!(decide(&p, &up(0, &[], false)), Decision::PrimaryToSecondary { full: true });
    }

    /// Over every combination of small facts: a non-up-to-date primary is never a source, and
    /// split brain is reported exactly when neither generation descends from the other.
    #[test]
    fn never_copies_from_a_copy_that_is_not_up_to_date() {
        use DiskState::*;
        let states = [UpToDate, Outdated, Inconsistent, Failed];
        let histories: [&[usize]; 4] = [&[], &[0], &[1, 0], &[2]];
        let mut cases = 0;
        for pg in 0..3 {
            for sg in 0..3 {
                for ph in histories {
                    for sh in histories {
                        for ps in states {
                            for ss in states {
                                for (pd, sd) in [(false, false), (true, false), (false, true)] {
                                    for (pdl, sdl) in [(false, false), (true, false), (false, true), (true, true)] {
                                        let mut p = facts(pg, ph, ps, pd);
                                        let mut s = facts(sg, sh, ss, sd);
                                        p.discard_local = pdl;
                                        s.discard_local = sdl;
                                        let d = decide(&p, &s);
                                        cases += 1;
                                        if matches!(d, Decision::PrimaryToSecondary { .. }) {
                                            assert_eq!(ps, UpToDate, "{p:?} {s:?}");
                                            assert!(!pdl);
                                        }
                                        if d == Decision::InSync {
                                            assert!(pg == sg && !pd && !sd && ps == UpToDate && ss == UpToDate);
                                        }
                                        if d == Decision::SplitBrain {
                                            assert!(pg != sg && !ph.contains(&sg) && !sh.contains(&pg));
                                            assert!(!pdl && !sdl);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 3 * 3 * 4 * 4 * 4 * 4 * 3 * 4);
    }
}
