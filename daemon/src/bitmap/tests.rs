//! Write-intent tests: unit tests of the promises, and a property test against a model of the
//! disk (with torn writes) and of the peer's durability.

use super::*;
use proptest::prelude::*;

const RPB: u64 = REGIONS_PER_BLOCK;
const SEC: u64 = 1_000_000_000;

fn intent(regions: u64, slots: usize) -> WriteIntent {
    let on_disk: Bits = BitVec::repeat(false, regions as usize);
    WriteIntent::new(Limits { regions, slots, batch_blocks_max: BATCH_BLOCKS_MAX }, &on_disk)
}

/// Runs one metadata write to completion; returns the released slots.
fn flush(w: &mut WriteIntent, now: u64, batch: &mut FlushBatch) -> Option<Vec<u32>> {
    if !w.poll_flush(now, batch) {
        return None;
    }
    let mut released = Vec::new();
    w.on_flushed(batch, |s| released.push(s));
    w.check_invariants();
    Some(released)
}

#[test]
fn a_cold_write_waits_for_one_metadata_write_and_a_hot_one_costs_none() {
    let mut w = intent(4 * RPB, 8);
    let mut batch = FlushBatch::new(BATCH_BLOCKS_MAX);
    assert_eq!(w.mark(0, 5, 5), Mark::Wait);
    assert!(!w.is_durable(5));
    assert_eq!(flush(&mut w, 0, &mut batch), Some(vec![0]));
    assert_eq!(batch.blocks().map(|(b, d)| (b, d[0])).collect::<Vec<_>>(), vec![(0, 1 << 5)]);
    w.on_write_done(0, Some(1));
    let writes = w.stats().metadata_writes;
    // Hot: written every flush period, it stays set and costs no metadata I/O at all.
    for round in 0..100 {
        assert_eq!(w.mark(1, 5, 5), Mark::Ready, "round {round}");
        w.on_write_done(1, Some(1));
        let t = w.on_flush_start().unwrap();
        w.on_both_durable(t, 1);
        assert_eq!(flush(&mut w, round * 10 * SEC, &mut batch), None);
        w.check_invariants();
    }
    assert_eq!(w.stats().metadata_writes, writes);
    assert!(w.is_dirty(5));
}

#[test]
fn concurrent_cold_writes_share_one_metadata_write() {
    let mut w = intent(4 * RPB, 64);
    let mut batch = FlushBatch::new(BATCH_BLOCKS_MAX);
    // 40 writes over four blocks, some sharing a region, one spanning two blocks.
    for s in 0..39u32 {
        let r = (s as u64 % 4) * RPB + (s as u64 % 7);
        assert_eq!(w.mark(s, r, r), Mark::Wait);
    }
    assert_eq!(w.mark(39, RPB - 1, RPB), Mark::Wait);
    assert_eq!(w.waiting(), 40);
    let mut released = flush(&mut w, 0, &mut batch).unwrap();
    released.sort();
    assert_eq!(released, (0..40).collect::<Vec<_>>());
    assert_eq!(batch.len(), 4);
    assert_eq!(w.stats().metadata_writes, 1);
    assert_eq!(flush(&mut w, 0, &mut batch), None, "nothing left to write");
    // A write arriving while a batch is in flight, for a region not in it, waits for the next.
    assert_eq!(w.mark(40, 100, 100), Mark::Wait);
    assert!(w.poll_flush(0, &mut batch));
    assert_eq!(w.mark(41, 200, 200), Mark::Wait);
    assert!(!w.poll_flush(0, &mut batch), "one batch in flight at a time");
    let mut rel = Vec::new();
    w.on_flushed(&batch, |s| rel.push(s));
    assert_eq!(rel, vec![40]);
    assert_eq!(flush(&mut w, 0, &mut batch), Some(vec![41]));
}

#[test]
fn bits_clear_lazily_after_two_flushes_acked_by_the_writing_session() {
    let mut w = intent(RPB, 4);
    let mut batch = FlushBatch::new(BATCH_BLOCKS_MAX);
    assert_eq!(w.mark(0, 9, 9), Mark::Wait);
    flush(&mut w, 0, &mut batch).unwrap();
    w.on_write_done(0, Some(7));
    let t = w.on_flush_start().unwrap();
    w.on_both_durable(t, 7);
    assert!(w.is_dirty(9), "one flush makes it a candidate only");
    let t = w.on_flush_start().unwrap();
    w.on_both_durable(t, 7);
    assert!(!w.is_dirty(9), "idle for a whole period: cleared");
    assert!(w.is_durable(9), "the clear is not on disk yet");
    w.check_invariants();
    // The clear goes out on its own only after the interval.
    assert_eq!(flush(&mut w, 0, &mut batch), None);
    assert_eq!(flush(&mut w, 2 * SEC, &mut batch), Some(vec![]));
    assert!(!w.is_durable(9));
    assert_eq!(w.stats().regions_cleared, 1);
    // Written again: cold again.
    assert_eq!(w.mark(1, 9, 9), Mark::Wait);
}

#[test]
fn a_flush_acked_by_another_session_clears_nothing_and_the_region_goes_out_of_sync() {
    let mut w = intent(RPB, 4);
    let mut batch = FlushBatch::new(BATCH_BLOCKS_MAX);
    w.mark(0, 3, 3);
    flush(&mut w, 0, &mut batch).unwrap();
    w.on_write_done(0, Some(1));
    let t = w.on_flush_start().unwrap();
    w.on_both_durable(t, 2);
    for _ in 0..3 {
        if let Some(t) = w.on_flush_start() {
            w.on_both_durable(t, 1);
        }
    }
    assert!(w.is_dirty(3) && w.is_out_of_sync(3));
    // The same for a session lost before its flush.
    w.mark(1, 4, 4);
    flush(&mut w, 0, &mut batch).unwrap();
    w.on_write_done(1, Some(1));
    w.on_session_lost();
    assert!(w.is_out_of_sync(4));
    assert_eq!(w.out_of_sync_count(), 2);
    w.check_invariants();
}

#[test]
fn degraded_writes_and_bits_found_at_start_stay_out_of_sync() {
    let mut on_disk: Bits = BitVec::repeat(false, 100);
    on_disk.set(42, true);
    let mut w = WriteIntent::new(Limits { regions: 100, slots: 2, batch_blocks_max: 1 }, &on_disk);
    assert!(w.is_out_of_sync(42) && w.is_durable(42));
    assert_eq!(w.mark(0, 42, 42), Mark::Ready, "set on disk: hot");
    w.on_write_done(0, None);
    let mut batch = FlushBatch::new(1);
    assert_eq!(w.mark(1, 50, 50), Mark::Wait);
    flush(&mut w, 0, &mut batch).unwrap();
    w.on_write_done(1, None);
    for _ in 0..3 {
        if let Some(t) = w.on_flush_start() {
            w.on_both_durable(t, 1);
        }
    }
    assert!(w.is_dirty(42) && w.is_dirty(50) && w.out_of_sync_count() == 2);
    w.check_invariants();
}

// ---- property test against a model ----

/// Regions the model writes: a few per block, and one pair across a block boundary.
const REGIONS: [u64; 7] = [0, 1, 2, RPB - 1, RPB, RPB + 5, 2 * RPB + 3];
const SLOTS: usize = 6;

#[derive(Debug, Clone)]
enum Op {
    Mark { slot: usize, at: usize, two: bool },
    Done { slot: usize, degraded: bool },
    Poll { advance_s: u64 },
    Flushed,
    FlushStart,
    BothDurable { ticket: usize, other_session: bool },
    SessionLost,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SLOTS, 0..REGIONS.len(), any::<bool>()).prop_map(|(slot, at, two)| Op::Mark { slot, at, two }),
        4 => (0..SLOTS, proptest::bool::weighted(0.1)).prop_map(|(slot, degraded)| Op::Done { slot, degraded }),
        2 => (0u64..3).prop_map(|advance_s| Op::Poll { advance_s }),
        2 => Just(Op::Flushed),
        2 => Just(Op::FlushStart),
        2 => (0usize..3, proptest::bool::weighted(0.1)).prop_map(|(ticket, other_session)| Op::BothDurable { ticket, other_session }),
        1 => Just(Op::SessionLost),
    ]
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum ModelSlot {
    Free,
    Waiting(u64, u64),
    Issued(u64, u64),
}

/// A write done but maybe not durable on both nodes: (region, acking session or None, when).
struct Unflushed {
    region: u64,
    session: Option<u64>,
    done_at: u64,
}

struct Model {
    /// What the disk holds after completed metadata writes.
    disk: Bits,
    /// The image of the metadata write in flight: until it completes, a bit is certain only if
    /// set in both (a torn write may leave either byte).
    in_flight: Option<Vec<(u64, Vec<u8>)>>,
    slots: [ModelSlot; SLOTS],
    unflushed: Vec<Unflushed>,
    /// Flushes started: (ticket, started at).
    tickets: Vec<(FlushTicket, u64)>,
    session: u64,
    clock: u64,
    now: u64,
}

impl Model {
    fn certain(&self, r: u64) -> bool {
        let on_disk = self.disk[r as usize];
        match &self.in_flight {
            Some(blocks) => match blocks.iter().find(|(b, _)| *b == r / RPB) {
                Some((_, img)) => on_disk && img.view_bits::<Lsb0>()[(r % RPB) as usize],
                None => on_disk,
            },
            None => on_disk,
        }
    }

    /// The safety properties: an issued write's regions, and every region written but not yet
    /// flushed on both nodes by the acking session, are certainly set on disk.
    fn check(&self, w: &WriteIntent) {
        for s in &self.slots {
            if let ModelSlot::Issued(f, l) = *s {
                for r in f..=l {
                    assert!(self.certain(r), "region {r} has a write in flight but its bit is not durable");
                }
            }
        }
        for u in &self.unflushed {
            assert!(self.certain(u.region), "region {} written and unflushed but its bit may be lost", u.region);
            assert!(w.is_dirty(u.region));
        }
        w.check_invariants();
    }
}

fn run(ops: Vec<Op>) {
    let regions = 3 * RPB;
    let mut w = intent(regions, SLOTS);
    let mut batch = FlushBatch::new(2);
    let mut m = Model {
        disk: BitVec::repeat(false, (3 * RPB) as usize),
        in_flight: None,
        slots: [ModelSlot::Free; SLOTS],
        unflushed: Vec::new(),
        tickets: Vec::new(),
        session: 1,
        clock: 0,
        now: 0,
    };
    // A small batch limit so blocks queue behind each other.
    w.batch_blocks_max = 2;
    for op in ops {
        m.clock += 1;
        match op {
            Op::Mark { slot, at, two } => {
                if m.slots[slot] != ModelSlot::Free {
                    continue;
                }
                let first = REGIONS[at];
                let last = if two { first + 1 } else { first };
                m.slots[slot] = match w.mark(slot as u32, first, last) {
                    Mark::Ready => ModelSlot::Issued(first, last),
                    Mark::Wait => ModelSlot::Waiting(first, last),
                };
            }
            Op::Done { slot, degraded } => {
                let ModelSlot::Issued(f, l) = m.slots[slot] else { continue };
                let session = if degraded { None } else { Some(m.session) };
                w.on_write_done(slot as u32, session);
                m.slots[slot] = ModelSlot::Free;
                for region in f..=l {
                    m.unflushed.push(Unflushed { region, session, done_at: m.clock });
                }
            }
            Op::Poll { advance_s } => {
                m.now += advance_s * SEC;
                if w.poll_flush(m.now, &mut batch) {
                    assert!(m.in_flight.is_none());
                    m.in_flight = Some(batch.blocks().map(|(b, d)| (b, d.to_vec())).collect());
                }
            }
            Op::Flushed => {
                let Some(blocks) = m.in_flight.take() else { continue };
                for (b, img) in &blocks {
                    let start = (*b * RPB) as usize;
                    m.disk[start..start + RPB as usize].copy_from_bitslice(img.view_bits::<Lsb0>());
                }
                let mut released = Vec::new();
                w.on_flushed(&batch, |s| released.push(s as usize));
                for s in released {
                    let ModelSlot::Waiting(f, l) = m.slots[s] else { panic!("released slot {s} was not waiting") };
                    m.slots[s] = ModelSlot::Issued(f, l);
                    for r in f..=l {
                        assert!(m.certain(r), "slot {s} released before region {r} is durable");
                    }
                }
            }
            Op::FlushStart => {
                if let Some(t) = w.on_flush_start() {
                    m.tickets.push((t, m.clock));
                }
            }
            Op::BothDurable { ticket, other_session } => {
                if ticket >= m.tickets.len() {
                    continue;
                }
                let (t, started) = m.tickets.remove(ticket);
                let acked = if other_session { m.session + 100 } else { m.session };
                w.on_both_durable(t, acked);
                // Physics: the primary's fdatasync and the acking session's FLUSH made every
                // write that session acked before the flush started durable on both nodes.
                m.unflushed.retain(|u| !(u.session == Some(acked) && u.done_at < started));
            }
            Op::SessionLost => {
                w.on_session_lost();
                m.session += 1;
            }
        }
        m.check(&w);
    }
    // Liveness: with no more requests, metadata writes drain and release every parked write.
    for _ in 0..10 {
        if m.in_flight.take().is_some() {
            w.on_flushed(&batch, |s| m.slots[s as usize] = ModelSlot::Free);
        }
        if w.poll_flush(m.now, &mut batch) {
            m.in_flight = Some(Vec::new());
        }
    }
    assert_eq!(w.waiting(), 0, "every parked write was released");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn never_issued_before_durable_and_never_cleared_while_needed(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops);
    }
}
