use super::*;

const LEASE: Duration = Duration::from_secs(5);

fn primary(now: Instant) -> Fence {
    let mut f = Fence::new(NodeRole::Primary, 7, LeaseClock::new(LEASE, 10_000), true, false);
    f.handle_peer_link(true);
    assert_eq!(f.poll_ask(now), Some(Ask::Lease));
    f.handle_answer(now, Answer::Granted { epoch: 7 });
    f
}

#[test]
fn a_started_primary_without_peer_or_lease_is_fenced() {
    let t0 = Instant::now();
    let mut f = Fence::new(NodeRole::Primary, 1, LeaseClock::new(LEASE, 0), true, false);
    assert_eq!(f.io(t0), Io::Fenced);
    assert_eq!(f.poll_ask(t0), Some(Ask::Lease), "no peer yet, nothing held: a lease only");
    f.handle_answer(t0, Answer::Granted { epoch: 1 });
    assert_eq!(f.io(t0), Io::Hold);
    f.handle_writes_held(true);
    let t1 = t0 + ASK_RETRY;
    assert_eq!(f.poll_ask(t1), Some(Ask::Outdate), "writes wait: ask to outdate the peer");
    f.handle_answer(t1, Answer::Granted { epoch: 1 });
    assert_eq!(f.io(t1), Io::Alone);
    assert_eq!(f.io(t1 + LEASE), Io::Fenced, "alone only while the lease runs");
}

#[test]
fn a_lost_peer_holds_until_the_witness_outdates_it_and_fences_when_the_lease_runs_out() {
    let t0 = Instant::now();
    let mut f = primary(t0);
    assert_eq!(f.io(t0), Io::Replicate);
    f.handle_peer_link(false);
    assert_eq!(f.io(t0), Io::Hold);
    f.handle_writes_held(true);
    assert_eq!(f.poll_ask(t0), Some(Ask::Outdate));
    assert_eq!(f.poll_ask(t0), None, "one request at a time");
    f.handle_answer(t0, Answer::Unreachable);
    assert_eq!(f.poll_ask(t0), None, "retried after ASK_RETRY");
    let t1 = t0 + ASK_RETRY;
    assert_eq!(f.poll_ask(t1), Some(Ask::Outdate));
    f.handle_answer(t1, Answer::Unreachable);
    // 5 s × 0.99 after the last granted request (t0).
    assert_eq!(f.io(t0 + Duration::from_millis(4949)), Io::Hold);
    assert_eq!(f.io(t0 + Duration::from_millis(4950)), Io::Fenced);
    // The witness returns: the lease and the outdate come together.
    let t2 = t0 + Duration::from_secs(8);
    assert_eq!(f.poll_ask(t2), Some(Ask::Outdate));
    f.handle_answer(t2, Answer::Granted { epoch: 7 });
    assert_eq!(f.io(t2), Io::Alone);
    // The peer returns and is resynced: the witness is told before the next lease.
    f.handle_peer_link(true);
    f.handle_peer_in_sync();
    assert_eq!(f.io(t2), Io::Replicate);
    assert_eq!(f.poll_ask(t2), Some(Ask::PeerUpToDate));
    f.handle_answer(t2, Answer::Granted { epoch: 7 });
    assert!(!f.peer_outdated());
    f.handle_peer_link(false);
    assert_eq!(f.io(t2), Io::Hold, "a new loss asks the witness again");
}

#[test]
fn the_witness_lost_while_connected_changes_nothing_until_the_peer_goes_too() {
    let t0 = Instant::now();
    let mut f = primary(t0);
    let mut t = t0;
    for _ in 0..10 {
        t += Duration::from_secs(2);
        if let Some(a) = f.poll_ask(t) {
            assert_eq!(a, Ask::Lease);
            f.handle_answer(t, Answer::Unreachable);
        }
        assert_eq!(f.io(t), Io::Replicate);
    }
    f.handle_peer_link(false);
    assert_eq!(f.io(t), Io::Fenced, "neither peer nor lease");
}

#[test]
fn a_primary_told_of_a_newer_epoch_is_deposed_for_good() {
    let t0 = Instant::now();
    let mut f = primary(t0);
    f.handle_peer_link(false);
    f.handle_writes_held(true);
    assert_eq!(f.poll_ask(t0), Some(Ask::Outdate));
    f.handle_answer(t0, Answer::Deposed { epoch: 8 });
    assert_eq!(f.role(), NodeRole::Deposed);
    assert_eq!(f.epoch(), 8);
    f.handle_peer_link(true);
    assert_eq!(f.io(t0), Io::Fenced);
    assert_eq!(f.poll_ask(t0 + LEASE), None);
}

#[test]
fn a_secondary_asks_for_promotion_only_without_primary_and_up_to_date() {
    let t0 = Instant::now();
    let mut f = Fence::new(NodeRole::Secondary, 7, LeaseClock::new(LEASE, 10_000), true, false);
    f.handle_peer_link(true);
    assert_eq!(f.poll_ask(t0), None);
    f.handle_peer_link(false);
    f.handle_up_to_date(false);
    assert_eq!(f.poll_ask(t0), None, "an inconsistent copy never asks");
    f.handle_up_to_date(true);
    assert_eq!(f.poll_ask(t0), Some(Ask::Promote));
    f.handle_answer(t0, Answer::Refused);
    assert_eq!(f.io(t0), Io::Fenced);
    let t1 = t0 + ASK_RETRY;
    assert_eq!(f.poll_ask(t1), Some(Ask::Promote));
    f.handle_answer(t1, Answer::Granted { epoch: 8 });
    assert_eq!((f.role(), f.epoch(), f.take_promotion()), (NodeRole::Primary, 8, Some(8)));
    assert_eq!(f.take_promotion(), None);
    assert_eq!(f.io(t1), Io::Alone, "the old primary is outdated by the promotion");
    assert_eq!(f.io(t1 + LEASE), Io::Fenced, "and the new primary renews its lease");
}

#[test]
fn a_handover_asked_while_connected_gives_the_role_to_the_peer() {
    let t0 = Instant::now();
    let mut f = primary(t0);
    f.handle_handover_request();
    assert_eq!(f.poll_ask(t0), Some(Ask::Handover));
    f.handle_answer(t0, Answer::Granted { epoch: 8 });
    assert!(f.handed_over());
    assert_eq!((f.role(), f.epoch(), f.io(t0)), (NodeRole::Deposed, 8, Io::Fenced));
    // Refused (the peer is not up to date at the witness): nothing changes, not asked again.
    let mut g = primary(t0);
    g.handle_handover_request();
    assert_eq!(g.poll_ask(t0), Some(Ask::Handover));
    g.handle_answer(t0, Answer::Refused);
    assert_eq!((g.role(), g.io(t0)), (NodeRole::Primary, Io::Replicate));
    assert_ne!(g.poll_ask(t0 + LEASE), Some(Ask::Handover));
}

#[test]
fn a_primary_whose_disk_failed_resigns_and_serves_nothing() {
    let t0 = Instant::now();
    let mut f = primary(t0);
    f.handle_disk_failed();
    assert_eq!(f.io(t0), Io::Fenced);
    assert_eq!(f.poll_ask(t0), Some(Ask::Resign));
    f.handle_answer(t0, Answer::Granted { epoch: 7 });
    assert_eq!(f.role(), NodeRole::Deposed);
}

/// Every sequence of up to 6 events from a small alphabet keeps the table of the module doc:
/// alone only with a valid lease and the peer outdated by a grant; never I/O without peer or
/// lease.
#[test]
fn every_short_sequence_keeps_the_rule() {
    #[derive(Clone, Copy, Debug)]
    enum Ev {
        Link(bool),
        Ask,
        Grant,
        Unreachable,
        Deposed,
        Wait(u64),
        InSync,
    }
    let alphabet = [
        Ev::Link(true),
        Ev::Link(false),
        Ev::Ask,
        Ev::Grant,
        Ev::Unreachable,
        Ev::Deposed,
        Ev::Wait(1700),
        Ev::Wait(6000),
        Ev::InSync,
    ];
    let t0 = Instant::now();
    let mut checked = 0u64;
    let mut seq = vec![0usize; 6];
    'outer: loop {
        let mut f = Fence::new(NodeRole::Primary, 3, LeaseClock::new(LEASE, 10_000), true, false);
        f.handle_writes_held(true);
        let mut now = t0;
        let mut outdate_granted = false;
        let mut last_grant_request: Option<Instant> = None;
        let mut sent: Option<(Ask, Instant)> = None;
        for &i in &seq {
            match alphabet[i] {
                Ev::Link(up) => f.handle_peer_link(up),
                Ev::Ask => sent = f.poll_ask(now).map(|a| (a, now)).or(sent),
                Ev::Grant => {
                    if let Some((a, t)) = f.in_flight().zip(sent.map(|s| s.1)) {
                        if matches!(a, Ask::Lease | Ask::Outdate) {
                            last_grant_request = Some(last_grant_request.map_or(t, |l| l.max(t)));
                        }
                        if a == Ask::Outdate {
                            outdate_granted = true;
                        }
                        if a == Ask::PeerUpToDate {
                            outdate_granted = false;
                        }
                    }
                    f.handle_answer(now, Answer::Granted { epoch: 3 });
                }
                Ev::Unreachable => f.handle_answer(now, Answer::Unreachable),
                Ev::Deposed => f.handle_answer(now, Answer::Deposed { epoch: 4 }),
                Ev::Wait(ms) => now += Duration::from_millis(ms),
                Ev::InSync => f.handle_peer_in_sync(),
            }
            let lease_ok = last_grant_request.is_some_and(|t| now < t + LEASE - LEASE / 100);
            match f.io(now) {
                Io::Alone => assert!(lease_ok && outdate_granted && f.role() == NodeRole::Primary, "{seq:?}"),
                Io::Hold => assert!(lease_ok && f.role() == NodeRole::Primary, "{seq:?}"),
                Io::Replicate => assert!(f.role() == NodeRole::Primary, "{seq:?}"),
                Io::Fenced => {}
            }
            if f.role() == NodeRole::Deposed {
                assert_eq!(f.io(now), Io::Fenced);
            }
            checked += 1;
        }
        for d in (0..seq.len()).rev() {
            seq[d] += 1;
            if seq[d] < alphabet.len() {
                continue 'outer;
            }
            seq[d] = 0;
        }
        break;
    }
    assert_eq!(checked, 9u64.pow(6) * 6);
}

/// The model checker's trace (tests/fencing_model.rs): after a resync, a link lost before the
/// witness heard of it must not let writes complete alone, and must not later tell the witness
/// the peer is up to date without the writes of that loss.
#[test]
fn after_a_resync_going_alone_needs_a_new_outdate() {
    let t0 = Instant::now();
    let mut f = primary(t0);
    f.handle_peer_link(false);
    f.handle_writes_held(true);
    assert_eq!(f.poll_ask(t0), Some(Ask::Outdate));
    f.handle_answer(t0, Answer::Granted { epoch: 7 });
    assert_eq!(f.io(t0), Io::Alone);
    // Healed and resynced; the link goes again before the witness was told.
    f.handle_peer_link(true);
    f.handle_peer_in_sync();
    assert!(!f.alone_allowed());
    f.handle_peer_link(false);
    assert_eq!(f.io(t0), Io::Hold, "not alone: the peer may be promoted once told");
    let t1 = t0 + ASK_RETRY;
    assert_eq!(f.poll_ask(t1), Some(Ask::Outdate), "a new outdate, not PeerUpToDate");
    f.handle_answer(t1, Answer::Granted { epoch: 7 });
    assert_eq!(f.io(t1), Io::Alone);
    f.handle_peer_link(true);
    assert_ne!(f.poll_ask(t1 + ASK_RETRY), Some(Ask::PeerUpToDate), "the outdate made the old report void");
}
