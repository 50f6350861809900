//! The write-intent bitmap as pure state (sans-I/O): which regions must be durably marked
//! before a write to them is issued, which metadata blocks to write (group commit), and when a
//! bit may be cleared again.
//!
//! The I/O around it (later: the volume's metadata writer) does:
//! 1. `mark(slot, first, last)` for every WRITE/DISCARD/WRITE_ZEROES before issuing it.
//!    `Mark::Ready`: issue now (every region's bit is durable: a hot region costs nothing).
//!    `Mark::Wait`: park the request; its bit is in memory and goes out with the next batch.
//! 2. `poll_flush(now, batch)` whenever it may start a metadata write: it fills `batch` with
//!    the images of every block with pending sets (and, lazily, blocks with pending clears).
//!    The driver writes those blocks, fdatasyncs once, then calls `on_flushed(batch, ..)`,
//!    which releases every parked request whose regions are now durable. Every request that
//!    arrived before the poll shares that one metadata write (group commit). At most one batch
//!    is in flight.
//! 3. `on_write_done(slot, acked_by)` when the request completed on both nodes (`acked_by`: the
//!    peer session that acknowledged it) or locally only (`None`: degraded; the region stays
//!    out of sync until a resync).
//! 4. `on_flush_start()` when a FLUSH is issued to both nodes (the primary's fdatasync and the
//!    peer's FLUSH), `on_both_durable(ticket, acked_by)` when both succeeded, and
//!    `on_session_lost()` when the peer's session ends.
//!
//! # When a bit is cleared (design: "Dirty bitmap and resync")
//! A region's bit is cleared only when both nodes have it durably and it is cold:
//! - every write to it completed, was acknowledged by peer session S, and then a FLUSH that
//!   started after that completion was made durable by the primary's fdatasync and acked by the
//!   *same* session S (a write acked by a secondary that then reconnects may have been only in
//!   its page cache, so writes of a lost session become out of sync instead);
//! - and it was not written for one more such flush period (a region written at least once per
//!   flush period is never cleared, so a hot region never costs metadata writes), and no write
//!   to it is in flight.
//!
//! Clears reach the disk lazily: piggybacked on the next block write that sets bits, or on their
//! own at most once per [`CLEAR_WRITE_INTERVAL_NS`]. A clear that never reaches the disk costs a
//! needless resync of the region after a crash, nothing more.
//!
//! Regions out of sync (set on disk at start-up, so possibly diverged in a crash; written while
//! degraded; written in a lost session) are never cleared here: only the resync clears them.
//!
//! # Why a torn metadata write is safe
//! The block images handed out are copies of `memory`, which always holds every bit that must
//! stay set; `durable` is what is certainly on disk: a block's bits leave it when a write of the
//! block starts (a torn write may land or not) and come back from the image when the write and
//! its fdatasync completed. A write is released only when all its bits are in `durable`. See
//! `metadata.rs` for the on-disk half of the argument.
//!
//! # Costs and limits
//! Per request: `mark` tests one bit per region (and clears one candidate bit); no allocation,
//! no lock. Tables are sized at construction: one state per request slot (queues × depth), a
//! batch of at most `batch_blocks_max` blocks. Memory: six bits per region (the on-disk bitmap
//! is one), bounded by `metadata::BITMAP_BYTES_MAX`.

use bitvec::prelude::*;

use crate::metadata::{bitmap_bytes, BLOCK_BYTES, REGIONS_PER_BLOCK};

/// Default blocks of one metadata write (each 4 KiB covers 32768 regions).
pub const BATCH_BLOCKS_MAX: usize = 64;
/// Clear-only block writes go out at most this often (1 s): clears are never urgent.
pub const CLEAR_WRITE_INTERVAL_NS: u64 = 1_000_000_000;

type Bits = BitVec<u8, Lsb0>;

/// What a request must do after `mark`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Every region's bit is durable: issue the request now.
    Ready,
    /// Park it: `on_flushed` will release it.
    Wait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Parked until its regions' bits are durable.
    Waiting {
        first: u64,
        last: u64,
    },
    /// Issued (its bits are durable) and not yet done.
    Issued {
        first: u64,
        last: u64,
    },
}

/// A FLUSH whose completion on both nodes may clear bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushTicket {
    period: u64,
    session: u64,
}

/// The block images of one metadata write; pre-sized, reused between writes.
pub struct FlushBatch {
    blocks: Vec<u32>,
    data: Vec<u8>,
}

impl FlushBatch {
    pub fn new(blocks_max: usize) -> FlushBatch {
        assert!(blocks_max > 0);
        FlushBatch { blocks: Vec::with_capacity(blocks_max), data: Vec::with_capacity(blocks_max * BLOCK_BYTES) }
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// (block number, its 4096-byte image), in block order.
    pub fn blocks(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.blocks.iter().zip(self.data.chunks_exact(BLOCK_BYTES)).map(|(b, d)| (*b as u64, d))
    }
}

/// Sizes of the tables.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Regions of the volume.
    pub regions: u64,
    /// Request slots (queues × depth): `mark` takes a slot number below this.
    pub slots: usize,
    /// Blocks of one metadata write.
    pub batch_blocks_max: usize,
}

/// Counters for status and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Metadata writes (batches) started.
    pub metadata_writes: u64,
    /// Bitmap blocks written.
    pub blocks_written: u64,
    /// Requests that had to wait for a metadata write.
    pub marks_cold: u64,
    /// Requests that went straight on.
    pub marks_hot: u64,
    /// Bits cleared in memory.
    pub regions_cleared: u64,
}

pub struct WriteIntent {
    regions: u64,
    /// The image the next block write carries: every bit that must stay set (and a few not yet
    /// written clears' worth less).
    memory: Bits,
    /// Bits certainly set on disk.
    durable: Bits,
    /// Regions only a resync may clear.
    out_of_sync: Bits,
    /// Regions whose last write completed in the current flush period.
    written_cur: Bits,
    /// Regions whose last write completed in the period of the FLUSH in flight.
    written_flushing: Bits,
    /// Regions flushed on both nodes and idle since: cleared at the next both-durable flush.
    candidates: Bits,
    /// Per block: sets not yet written.
    set_pending: Bits,
    /// Per block: clears not yet written.
    clear_pending: Bits,
    /// Per block summaries of the three region sets above, so a flush touches only their blocks.
    written_cur_blocks: Bits,
    written_flushing_blocks: Bits,
    candidate_blocks: Bits,
    batch_in_flight: bool,
    batch_blocks_max: usize,
    slots: Vec<SlotState>,
    waiting: usize,
    /// The peer session the written sets belong to.
    session: Option<u64>,
    flushing: Option<FlushTicket>,
    period: u64,
    last_clear_write_ns: u64,
    stats: Stats,
}

fn byte_range(block: usize) -> std::ops::Range<usize> {
    block * BLOCK_BYTES..(block + 1) * BLOCK_BYTES
}

impl WriteIntent {
    /// `on_disk`: the bitmap read from the metadata file. Every bit set there is out of sync:
    /// after a crash, the regions it marks may differ between the nodes.
    pub fn new(limits: Limits, on_disk: &BitSlice<u8, Lsb0>) -> WriteIntent {
        assert!(limits.regions > 0 && limits.slots > 0 && limits.batch_blocks_max > 0);
        assert_eq!(on_disk.len() as u64, limits.regions, "the bitmap covers the volume");
        assert!(limits.slots <= u32::MAX as usize);
        let bits = (bitmap_bytes(limits.regions) * 8) as usize;
        let blocks = bits / (REGIONS_PER_BLOCK as usize);
        let mut memory: Bits = BitVec::repeat(false, bits);
        memory[..on_disk.len()].copy_from_bitslice(on_disk);
        let empty_regions: Bits = BitVec::repeat(false, bits);
        let empty_blocks: Bits = BitVec::repeat(false, blocks);
        WriteIntent {
            regions: limits.regions,
            durable: memory.clone(),
            out_of_sync: memory.clone(),
            memory,
            written_cur: empty_regions.clone(),
            written_flushing: empty_regions.clone(),
            candidates: empty_regions,
            set_pending: empty_blocks.clone(),
            clear_pending: empty_blocks.clone(),
            written_cur_blocks: empty_blocks.clone(),
            written_flushing_blocks: empty_blocks.clone(),
            candidate_blocks: empty_blocks,
            batch_in_flight: false,
            batch_blocks_max: limits.batch_blocks_max,
            slots: vec![SlotState::Free; limits.slots],
            waiting: 0,
            session: None,
            flushing: None,
            period: 0,
            last_clear_write_ns: 0,
            stats: Stats::default(),
        }
    }

    /// A write to regions `first..=last` in request slot `slot` is about to be issued.
    #[inline]
    pub fn mark(&mut self, slot: u32, first: u64, last: u64) -> Mark {
        assert!(first <= last && last < self.regions, "regions {first}..={last} past the volume");
        assert_eq!(self.slots[slot as usize], SlotState::Free, "slot {slot} is already marked");
        let mut cold = false;
        for r in first as usize..=last as usize {
            // A region being written is not idle: it stops being a clearing candidate.
            self.candidates.set(r, false);
            if !self.memory[r] {
                // Cleared in memory: if the clear is not on disk yet, setting the bit again
                // just cancels it; otherwise the set must be written.
                self.memory.set(r, true);
                if !self.durable[r] {
                    self.set_pending.set(r / REGIONS_PER_BLOCK as usize, true);
                }
            }
            cold |= !self.durable[r];
        }
        if cold {
            self.slots[slot as usize] = SlotState::Waiting { first, last };
            self.waiting += 1;
            self.stats.marks_cold += 1;
            Mark::Wait
        } else {
            self.slots[slot as usize] = SlotState::Issued { first, last };
            self.stats.marks_hot += 1;
            Mark::Ready
        }
    }

    /// Fills `batch` with the next metadata write, if one is due and none is in flight: every
    /// block with pending sets (up to the batch size), and blocks with only pending clears once
    /// [`CLEAR_WRITE_INTERVAL_NS`] passed since the last clear write. Returns whether it did.
    pub fn poll_flush(&mut self, now_ns: u64, batch: &mut FlushBatch) -> bool {
        if self.batch_in_flight {
            return false;
        }
        assert!(batch.blocks.capacity() >= self.batch_blocks_max, "batch sized for this bitmap");
        batch.blocks.clear();
        batch.data.clear();
        let clears_due = now_ns.saturating_sub(self.last_clear_write_ns) >= CLEAR_WRITE_INTERVAL_NS;
        let mut wrote_clears = false;
        for pass in 0..2 {
            if pass == 1 && !clears_due {
                break;
            }
            let mut b = 0;
            while batch.blocks.len() < self.batch_blocks_max {
                let pending = if pass == 0 { &self.set_pending } else { &self.clear_pending };
                let Some(next) = pending[b..].first_one() else { break };
                let block = b + next;
                b = block + 1;
                wrote_clears |= self.clear_pending[block];
                self.set_pending.set(block, false);
                self.clear_pending.set(block, false);
                let range = byte_range(block);
                batch.data.extend_from_slice(&self.memory.as_raw_slice()[range.clone()]);
                // The write may tear: until it completes, only bits in both images are certain.
                for (d, m) in
                    self.durable.as_raw_mut_slice()[range.clone()].iter_mut().zip(&self.memory.as_raw_slice()[range])
                {
                    *d &= *m;
                }
                batch.blocks.push(block as u32);
            }
        }
        if batch.blocks.is_empty() {
            return false;
        }
        if wrote_clears {
            self.last_clear_write_ns = now_ns;
        }
        self.batch_in_flight = true;
        self.stats.metadata_writes += 1;
        self.stats.blocks_written += batch.blocks.len() as u64;
        true
    }

    /// The batch's blocks were written and fdatasynced. Calls `released(slot)` for every parked
    /// request whose regions are now all durable; it may be issued now.
    pub fn on_flushed(&mut self, batch: &FlushBatch, mut released: impl FnMut(u32)) {
        assert!(self.batch_in_flight, "on_flushed without a batch in flight");
        self.batch_in_flight = false;
        for (block, data) in batch.blocks() {
            self.durable.as_raw_mut_slice()[byte_range(block as usize)].copy_from_slice(data);
        }
        if self.waiting == 0 {
            return;
        }
        for (slot, state) in self.slots.iter_mut().enumerate() {
            if let SlotState::Waiting { first, last } = *state {
                if self.durable[first as usize..=last as usize].all() {
                    *state = SlotState::Issued { first, last };
                    self.waiting -= 1;
                    released(slot as u32);
                }
            }
        }
    }

    /// The request in `slot` is done: completed on both nodes and acknowledged by peer session
    /// `acked_by`, or (`None`) written locally only, so the peer lacks it.
    pub fn on_write_done(&mut self, slot: u32, acked_by: Option<u64>) {
        let SlotState::Issued { first, last } = self.slots[slot as usize] else {
            panic!("slot {slot} done but not issued");
        };
        self.slots[slot as usize] = SlotState::Free;
        let range = first as usize..=last as usize;
        assert!(self.memory[range.clone()].all(), "an issued write's bits are set");
        match acked_by {
            Some(s) => {
                if self.session != Some(s) {
                    self.on_session_lost();
                    self.session = Some(s);
                }
                self.written_cur[range].fill(true);
                for b in first / REGIONS_PER_BLOCK..=last / REGIONS_PER_BLOCK {
                    self.written_cur_blocks.set(b as usize, true);
                }
            }
            None => self.out_of_sync[range].fill(true),
        }
    }

    /// A FLUSH is being issued to both nodes. It covers every write done before now; if no
    /// other tracked flush is in flight, the ticket lets its completion clear bits.
    pub fn on_flush_start(&mut self) -> Option<FlushTicket> {
        let session = self.session?;
        if self.flushing.is_some() {
            return None; // one tracked at a time; the writes wait for the next one
        }
        debug_assert!(self.written_flushing_blocks.not_any());
        std::mem::swap(&mut self.written_cur, &mut self.written_flushing);
        std::mem::swap(&mut self.written_cur_blocks, &mut self.written_flushing_blocks);
        let t = FlushTicket { period: self.period, session };
        self.period += 1;
        self.flushing = Some(t);
        Some(t)
    }

    /// The FLUSH of `ticket` is durable on the primary (fdatasync) and was acked by peer
    /// session `acked_by`. Clears the candidates still idle, and makes this flush's regions the
    /// next candidates.
    pub fn on_both_durable(&mut self, ticket: FlushTicket, acked_by: u64) {
        if self.flushing != Some(ticket) {
            return; // superseded by a session loss
        }
        self.flushing = None;
        if acked_by != ticket.session {
            // Not the session that acked the writes: their durability on the peer is unknown.
            self.flushing_to_out_of_sync();
            return;
        }
        // 1. Candidates idle for a whole period: clear them (memory only; written lazily).
        let mut b = 0;
        while let Some(next) = self.candidate_blocks[b..].first_one() {
            let block = b + next;
            b = block + 1;
            let mut cleared = 0u64;
            let range = byte_range(block);
            let mem = &mut self.memory.as_raw_mut_slice()[range.clone()];
            for (m, c) in mem.iter_mut().zip(&mut self.candidates.as_raw_mut_slice()[range]) {
                cleared += c.count_ones() as u64;
                *m &= !*c;
                *c = 0;
            }
            if cleared > 0 {
                self.clear_pending.set(block, true);
                self.stats.regions_cleared += cleared;
            }
            self.candidate_blocks.set(block, false);
        }
        // 2. This flush's regions, unless written again since or out of sync, are candidates.
        let mut b = 0;
        while let Some(next) = self.written_flushing_blocks[b..].first_one() {
            let block = b + next;
            b = block + 1;
            let range = byte_range(block);
            let mut any = 0u8;
            for i in range {
                let w = &mut self.written_flushing.as_raw_mut_slice()[i];
                let c = *w & !self.written_cur.as_raw_slice()[i] & !self.out_of_sync.as_raw_slice()[i];
                *w = 0;
                self.candidates.as_raw_mut_slice()[i] |= c;
                any |= c;
            }
            if any != 0 {
                self.candidate_blocks.set(block, true);
            }
            self.written_flushing_blocks.set(block, false);
        }
        // Regions with a write in flight are not idle.
        for state in &self.slots {
            if let SlotState::Waiting { first, last } | SlotState::Issued { first, last } = *state {
                self.candidates[first as usize..=last as usize].fill(false);
            }
        }
    }

    /// The peer session ended (link lost or superseded): writes it acknowledged but did not
    /// flush may be lost on the peer, so their regions become out of sync.
    pub fn on_session_lost(&mut self) {
        let mut b = 0;
        while let Some(next) = self.written_cur_blocks[b..].first_one() {
            let block = b + next;
            b = block + 1;
            for i in byte_range(block) {
                self.out_of_sync.as_raw_mut_slice()[i] |= std::mem::take(&mut self.written_cur.as_raw_mut_slice()[i]);
            }
        }
        self.written_cur_blocks.fill(false);
        self.flushing_to_out_of_sync();
        self.flushing = None;
        self.session = None;
    }

    fn flushing_to_out_of_sync(&mut self) {
        let mut b = 0;
        while let Some(next) = self.written_flushing_blocks[b..].first_one() {
            let block = b + next;
            b = block + 1;
            for i in byte_range(block) {
                self.out_of_sync.as_raw_mut_slice()[i] |=
                    std::mem::take(&mut self.written_flushing.as_raw_mut_slice()[i]);
            }
        }
        self.written_flushing_blocks.fill(false);
    }

    /// Marks regions out of sync (verify found them different, or an operator asked). Their
    /// bits go out with the next metadata write; nothing waits for it.
    pub fn set_out_of_sync(&mut self, first: u64, last: u64) {
        assert!(first <= last && last < self.regions);
        for r in first as usize..=last as usize {
            self.out_of_sync.set(r, true);
            self.candidates.set(r, false);
            if !self.memory[r] {
                self.memory.set(r, true);
                self.set_pending.set(r / REGIONS_PER_BLOCK as usize, true);
            }
        }
    }

    /// Whether region `r`'s bit is certainly on disk.
    pub fn is_durable(&self, r: u64) -> bool {
        self.durable[r as usize]
    }

    /// Whether region `r`'s bit is set (in memory).
    pub fn is_dirty(&self, r: u64) -> bool {
        self.memory[r as usize]
    }

    /// Whether region `r` may differ between the nodes (only a resync clears it).
    pub fn is_out_of_sync(&self, r: u64) -> bool {
        self.out_of_sync[r as usize]
    }

    /// Regions out of sync (a scan: for status, not the data path).
    pub fn out_of_sync_count(&self) -> u64 {
        self.out_of_sync.count_ones() as u64
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Requests parked for a metadata write.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Checks every invariant (a full scan, for tests).
    pub fn check_invariants(&self) {
        let regions = self.regions as usize;
        let blocks = self.set_pending.len();
        for block in 0..blocks {
            let range = byte_range(block);
            let m = &self.memory.as_raw_slice()[range.clone()];
            let d = &self.durable.as_raw_slice()[range.clone()];
            let o = &self.out_of_sync.as_raw_slice()[range.clone()];
            let wc = &self.written_cur.as_raw_slice()[range.clone()];
            let wf = &self.written_flushing.as_raw_slice()[range.clone()];
            let c = &self.candidates.as_raw_slice()[range];
            let mut unwritten_sets = false;
            let mut unwritten_clears = false;
            for i in 0..BLOCK_BYTES {
                unwritten_sets |= m[i] & !d[i] != 0;
                unwritten_clears |= d[i] & !m[i] != 0;
                assert_eq!(o[i] & !m[i], 0, "out-of-sync bits are set");
                assert_eq!((wc[i] | wf[i]) & !m[i], 0, "written regions' bits are set");
                assert_eq!(c[i] & !m[i], 0, "candidates' bits are set");
                assert_eq!(c[i] & (o[i] | wc[i]), 0, "a candidate is idle and in sync");
            }
            // A set not yet written is pending or in the batch in flight.
            assert!(!unwritten_sets || self.set_pending[block] || self.batch_in_flight, "block {block}");
            assert!(!unwritten_clears || self.clear_pending[block], "block {block}");
            assert!(self.candidate_blocks[block] || c.iter().all(|b| *b == 0));
            assert!(self.written_cur_blocks[block] || wc.iter().all(|b| *b == 0));
            assert!(self.written_flushing_blocks[block] || wf.iter().all(|b| *b == 0));
        }
        assert!(self.memory[regions..].not_any(), "padding bits stay clear");
        assert!(self.flushing.is_some() || self.written_flushing.not_any());
        let mut waiting = 0;
        for s in &self.slots {
            match *s {
                SlotState::Free => {}
                SlotState::Waiting { first, last } => {
                    waiting += 1;
                    assert!(self.memory[first as usize..=last as usize].all());
                }
                SlotState::Issued { first, last } => {
                    let r = first as usize..=last as usize;
                    assert!(self.durable[r.clone()].all() && self.memory[r.clone()].all());
                    assert!(self.candidates[r].not_any());
                }
            }
        }
        assert_eq!(waiting, self.waiting);
    }
}

#[cfg(test)]
mod tests;
