//! The write-intent bitmap, shared by every queue of a volume: one bit per region, set durably
//! (in the metadata file) before the first write to the region is issued, cleared lazily once
//! both nodes have the region durably and it is cold (design: "Dirty bitmap and resync").
//!
//! # The rule, and who keeps it
//! A queue calls [`WriteIntent::mark`] before it issues a WRITE, DISCARD or WRITE_ZEROES:
//! - **hot** (every region's bit is `durable`): issue now. One atomic load per region (and one
//!   more the first time the region is written in a cleaning period): no lock, no allocation,
//!   no metadata I/O.
//! - **cold**: the bit goes into `pending`, the writer thread (`writer.rs`) is woken, and the
//!   queue parks the request. The writer takes *every* pending bit, writes the changed bitmap
//!   blocks, fdatasyncs once, then sets `durable` and wakes the queues: all the cold writes
//!   that arrived meanwhile share one metadata write (group commit). While the peer is in
//!   sync, the other regions of the cold region's 4 MiB extent go into the same write
//!   ([`INTENT_EXTENT_BYTES`]), and the cleaner clears an extent only when all of it is cold.
//!
//! Clearing races with marking. The writer thread alone decides a clear (asked for with
//! [`WriteIntent::request_clear`]), with a Dekker-style pair of sequentially consistent
//! operations: a queue sets `touched` and then reads `durable`; the writer clears `durable`
//! and then reads `touched` (and `pending`). At least one sees the other: either the queue
//! goes cold (and the writer sets the bit again before the write is issued), or the writer
//! sees the region touched and restores `durable` (the bit never left the disk). `touched` is
//! reset only by the writer, after it judged the clears asked before the reset.
//!
//! # Out of sync, and on disk
//! Two sets, as DRBD keeps an activity log beside its bitmap. `dirty` (memory) holds exactly
//! the regions written and not yet known durable on both nodes: what status counts and a
//! resync copies after a partition. The bits on disk (`durable`) hold those and the rest of
//! their hot extents: what a restart after a crash must resync. The cleaner clears a cold
//! region from `dirty` at once, and from the disk when its whole extent is cold.
//!
//! Every set bit marks a region that *may* differ between the nodes. Every exchange on a new
//! sync link (after a peer restart, a partition, an operator's `resync`) copies every set
//! region of either node, clearing bits as the target makes them durable. After a degraded
//! write or a start with bits set, `resync_needed` also holds: the cleaner pauses until that
//! resync is done. Bits still set after a resync are regions written since: the cleaner clears
//! them later. A clearing cycle during which a data link was lost is void (`link_losses`).

pub mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;

use crate::metadata::{MetadataError, MetadataFile, Superblock};
use metroblk_protocol::DiskState;

/// A fixed-size set of bits in atomic words.
pub struct AtomicBits {
    words: Box<[AtomicU64]>,
    len: u64,
}

impl AtomicBits {
    pub fn new(len: u64) -> AtomicBits {
        AtomicBits { words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(), len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn get(&self, i: u64) -> bool {
        debug_assert!(i < self.len);
        self.words[(i / 64) as usize].load(Ordering::SeqCst) & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; returns whether it was set before.
    #[inline]
    pub fn set(&self, i: u64) -> bool {
        debug_assert!(i < self.len);
        let m = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(m, Ordering::SeqCst) & m != 0
    }

    /// Clears bit `i`; returns whether it was set before.
    #[inline]
    pub fn clear(&self, i: u64) -> bool {
        debug_assert!(i < self.len);
        let m = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!m, Ordering::SeqCst) & m != 0
    }

    pub fn words(&self) -> usize {
        self.words.len()
    }

    pub fn word(&self, w: usize) -> u64 {
        self.words[w].load(Ordering::SeqCst)
    }

    /// Takes word `w`, leaving it zero.
    pub fn take_word(&self, w: usize) -> u64 {
        self.words[w].swap(0, Ordering::SeqCst)
    }

    pub fn or_word(&self, w: usize, bits: u64) {
        self.words[w].fetch_or(bits, Ordering::SeqCst);
    }

    pub fn store_word(&self, w: usize, bits: u64) {
        self.words[w].store(bits, Ordering::SeqCst);
    }

    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }

    /// Set bits, in order (a scan; control plane only).
    pub fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.words.len()).flat_map(move |w| {
            let mut bits = self.word(w);
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                Some(w as u64 * 64 + b)
            })
        })
    }
}

/// Regions made durable ahead of a sequential writer: when a write enters a cold region from
/// its start (or crosses into it) right after a region written in this cleaning period, the
/// next ones are set in the same metadata write. A sequential stream then costs one metadata
/// write per 1 MiB (64 KiB regions), not one per region; a random write that happens to look
/// like that sets at most this many bits more, cleared again by the cleaner once idle.
pub const READAHEAD_REGIONS: u64 = 15;

/// A write to a cold region while the peer is in sync also sets the other regions of its
/// aligned *extent* of this many bytes (at most 64 regions: one word of bits), in the same
/// metadata write. A random writer then pays one metadata write per extent it enters, not one
/// per region (DRBD's activity log has 4 MiB extents for the same reason; md raid1 picks bitmap
/// chunks of up to 64 MiB). The cost: a primary's crash resyncs whole active extents.
pub const INTENT_EXTENT_BYTES: u64 = 4 << 20;
/// Extents are set only while fewer bytes than this are set on disk: a writer spread over a
/// whole large volume goes back to one bit per region, which bounds what a primary's crash
/// resyncs beyond the regions really written.
pub const INTENT_WIDEN_DIRTY_BYTES_MAX: u64 = 1 << 30;

/// What `mark` tells the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Every region's bit is durable: issue the request now.
    Ready,
    /// Park the request; the queue is woken when the bits are durable.
    Wait,
}

/// Counters for status and benchmarks.
#[derive(Default)]
pub struct IntentStats {
    /// Requests that had to wait for a metadata write.
    pub marks_cold: AtomicU64,
    /// Metadata writes (each: some bitmap blocks and one fdatasync).
    pub metadata_writes: AtomicU64,
    pub blocks_written: AtomicU64,
    pub regions_cleared: AtomicU64,
}

/// The metadata file and its current superblock; changed only by control-plane threads and
/// the writer thread.
pub struct MetaState {
    pub file: MetadataFile<std::fs::File>,
    pub sb: Superblock,
}

pub struct WriteIntent {
    region_shift: u32,
    regions: u64,
    /// Regions per extent ([`INTENT_EXTENT_BYTES`]): a power of two, 1..=64.
    extent_regions: u64,
    /// Widening stops at this many bits on disk ([`INTENT_WIDEN_DIRTY_BYTES_MAX`]).
    widen_dirty_regions_max: u64,
    /// Bits set on disk after the writer's last round.
    on_disk_count: AtomicU64,
    /// Bits certainly on disk (whole extents, while widening).
    durable: AtomicBits,
    /// Out of sync, exactly: the regions written (or found different) and not yet known
    /// durable on both nodes, plus every bit on disk at start. In memory only; always within
    /// the bits on disk once a write is issued. What status counts and a resync copies.
    dirty: AtomicBits,
    /// Sets the writer has not taken yet.
    pending: AtomicBits,
    /// Clears, on disk and of `dirty`, the writer has not taken yet.
    to_clear: AtomicBits,
    /// Clears of `dirty` only (the region's extent is still hot on disk) not taken yet.
    to_clear_dirty: AtomicBits,
    /// Regions written since the last reset (by the cleaner, or by resync for one region).
    touched: AtomicBits,
    /// The regions' bits that were on disk when the node started: they may differ between the
    /// nodes, so the first resync copies them (the image has them too; this is for status).
    resync_needed: AtomicBool,
    /// Data links lost since start: a clearing cycle during which one was lost is void.
    link_losses: AtomicU64,
    /// Going on alone is allowed (config `fencing = "none"` or `metroblk resume-alone`).
    alone_allowed: AtomicBool,
    /// Attempts by a queue to complete writes alone (counted before `alone_allowed` is read:
    /// see [`WriteIntent::begin_alone`]).
    alone_attempts: AtomicU64,
    /// A queue asked to go on alone; the writer records the new generation.
    alone_wanted: AtomicBool,
    /// The new generation and the peer's `outdated` are durable: unreplicated writes may
    /// complete.
    alone_ready: AtomicBool,
    /// A metadata write failed: no cold write can be made safe any more.
    failed: AtomicBool,
    /// The cleaner asked for `touched` to be reset after the pending clears.
    touched_reset_wanted: AtomicBool,
    pub stats: IntentStats,
    writer: OnceLock<Thread>,
    pub meta: Mutex<MetaState>,
}

impl WriteIntent {
    /// `on_disk`: the bitmap read from the metadata file (one bit per region, LSB first).
    pub fn new(file: MetadataFile<std::fs::File>, sb: Superblock, on_disk: &[u8], alone_allowed: bool) -> WriteIntent {
        assert!(sb.region_size.is_power_of_two());
        let regions = sb.regions();
        assert!(on_disk.len() as u64 * 8 >= regions, "the bitmap covers the volume");
        let durable = AtomicBits::new(regions);
        let dirty = AtomicBits::new(regions);
        for w in 0..durable.words() {
            let mut bytes = [0u8; 8];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = on_disk.get(w * 8 + i).copied().unwrap_or(0);
            }
            let mut bits = u64::from_le_bytes(bytes);
            let valid = regions - w as u64 * 64;
            if valid < 64 {
                bits &= (1u64 << valid) - 1;
            }
            durable.store_word(w, bits);
            dirty.store_word(w, bits);
        }
        let any = dirty.count_ones() > 0;
        // A peer recorded outdated means this node went on alone before: keep doing so.
        let outdated_peer = sb.peer_disk_state == Some(DiskState::Outdated);
        let on_disk_count = dirty.count_ones();
        let extent_regions = (INTENT_EXTENT_BYTES / sb.region_size).clamp(1, 64);
        assert!(extent_regions.is_power_of_two());
        WriteIntent {
            region_shift: sb.region_size.trailing_zeros(),
            regions,
            extent_regions,
            widen_dirty_regions_max: INTENT_WIDEN_DIRTY_BYTES_MAX / sb.region_size,
            on_disk_count: AtomicU64::new(on_disk_count),
            durable,
            dirty,
            pending: AtomicBits::new(regions),
            to_clear: AtomicBits::new(regions),
            to_clear_dirty: AtomicBits::new(regions),
            touched: AtomicBits::new(regions),
            resync_needed: AtomicBool::new(any || outdated_peer),
            link_losses: AtomicU64::new(0),
            alone_allowed: AtomicBool::new(alone_allowed),
            alone_attempts: AtomicU64::new(0),
            alone_wanted: AtomicBool::new(false),
            alone_ready: AtomicBool::new(outdated_peer),
            failed: AtomicBool::new(false),
            touched_reset_wanted: AtomicBool::new(false),
            stats: IntentStats::default(),
            writer: OnceLock::new(),
            meta: Mutex::new(MetaState { file, sb }),
        }
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    pub fn region_size(&self) -> u64 {
        1 << self.region_shift
    }

    /// The regions `[first, last]` that `len > 0` bytes at `offset` touch.
    #[inline]
    pub fn regions_of(&self, offset: u64, len: u64) -> (u64, u64) {
        debug_assert!(len > 0);
        (offset >> self.region_shift, (offset + len - 1) >> self.region_shift)
    }

    /// A write of `len > 0` bytes at `offset` is about to be issued: [`Self::mark`] its
    /// regions, reading ahead of a sequential writer ([`READAHEAD_REGIONS`]) and, if the
    /// queue's link to the peer is up, setting whole extents ([`INTENT_EXTENT_BYTES`]).
    #[inline]
    pub fn mark_write(&self, offset: u64, len: u64, peer_linked: bool) -> Mark {
        let (first, last) = self.regions_of(offset, len);
        let enters = first < last || offset & (self.region_size() - 1) == 0;
        let mark = self.mark_regions(first, last, peer_linked);
        if mark == Mark::Wait && enters && first > 0 && self.touched.get(first - 1) {
            // No write to these yet, so they are not touched: the cleaner clears them when
            // the writer does not come.
            for r in last + 1..=(last + READAHEAD_REGIONS).min(self.regions - 1) {
                if !self.durable.get(r) {
                    self.pending.set(r);
                }
            }
        }
        mark
    }

    /// A write to regions `first..=last` is about to be issued (see the module doc); sets one
    /// bit per region.
    #[inline]
    pub fn mark(&self, first: u64, last: u64) -> Mark {
        self.mark_regions(first, last, false)
    }

    /// `widen`: a cold mark sets the regions' extents too, when [`Self::widening_allowed`].
    #[inline]
    fn mark_regions(&self, first: u64, last: u64, widen: bool) -> Mark {
        assert!(first <= last && last < self.regions, "regions {first}..={last} past the volume");
        let mut cold = false;
        for r in first..=last {
            // Touched first, dirty and durable second: the order the clearing protocol relies on.
            if !self.touched.get(r) {
                self.touched.set(r);
            }
            if !self.dirty.get(r) {
                self.dirty.set(r);
            }
            if !self.durable.get(r) {
                self.pending.set(r);
                cold = true;
            }
        }
        if !cold {
            return Mark::Ready;
        }
        if widen && self.widening_allowed() {
            self.widen(first, last);
        }
        self.stats.marks_cold.fetch_add(1, Ordering::Relaxed);
        self.wake_writer();
        Mark::Wait
    }

    /// Extents are set only while the peer is in sync (and linked: the caller knows): alone,
    /// or with a resync to come, the bits are what the resync copies, and stay exact.
    fn widening_allowed(&self) -> bool {
        !self.is_alone()
            && !self.resync_needed()
            && self.on_disk_count.load(Ordering::Relaxed) < self.widen_dirty_regions_max
    }

    /// Sets `pending` for every region not yet durable in the extents of `first..=last`
    /// (the cold path of [`Self::mark`]; the writer takes them with the request's own).
    fn widen(&self, first: u64, last: u64) {
        let mut r = first;
        while r <= last {
            let (w, mut mask) = self.extent_bits(r);
            if w == self.pending.words() - 1 && self.regions % 64 != 0 {
                mask &= (1u64 << (self.regions % 64)) - 1; // padding bits past the volume
            }
            let missing = mask & !self.durable.word(w);
            if missing != 0 {
                self.pending.or_word(w, missing);
            }
            r = (r & !(self.extent_regions - 1)) + self.extent_regions;
        }
    }

    /// The word of region `r`'s extent and the extent's bits in it (an extent never spans
    /// two words: `extent_regions` divides 64).
    fn extent_bits(&self, r: u64) -> (usize, u64) {
        let n = self.extent_regions;
        let start = r & !(n - 1);
        ((start / 64) as usize, if n == 64 { !0u64 } else { ((1u64 << n) - 1) << (start % 64) })
    }

    /// Whether a region of `r`'s extent was written in this cleaning period: the cleaner
    /// clears an extent's bits only together, so a hot extent stays hot.
    pub fn extent_touched(&self, r: u64) -> bool {
        assert!(r < self.regions);
        let (w, mask) = self.extent_bits(r);
        self.touched.word(w) & mask != 0
    }

    pub fn extent_regions(&self) -> u64 {
        self.extent_regions
    }

    /// One bit per region, never an extent: for the tests of the rest of the rule.
    #[cfg(test)]
    pub fn without_extents(mut self) -> WriteIntent {
        self.extent_regions = 1;
        self
    }

    /// Whether every region's bit is durable (a parked request may go).
    #[inline]
    pub fn is_durable(&self, first: u64, last: u64) -> bool {
        (first..=last).all(|r| self.durable.get(r))
    }

    /// A metadata write failed: cold writes can never be made safe.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Asks for region `r`'s bit to be cleared: the caller knows that both nodes have the
    /// region durably as of a point after the last reset of its `touched` bit. The writer
    /// thread decides (`writer.rs`): it leaves the bit if the region was written since.
    pub fn request_clear(&self, r: u64) {
        self.to_clear.set(r);
    }

    /// As [`Self::request_clear`], for `dirty` only: the bit stays on disk, so that the next
    /// write to the region's hot extent costs no metadata write.
    pub fn request_clear_dirty(&self, r: u64) {
        self.to_clear_dirty.set(r);
    }

    /// Asks the writer thread to reset every `touched` bit once it has handled the clears
    /// asked so far (the cleaner's next period starts then, never before a clear was judged).
    pub fn request_touched_reset(&self) {
        self.touched_reset_wanted.store(true, Ordering::SeqCst);
        self.wake_writer();
    }

    /// Whether the writer still has clears or a `touched` reset to handle.
    pub fn clears_pending(&self) -> bool {
        self.touched_reset_wanted.load(Ordering::SeqCst)
            || (0..self.to_clear.words()).any(|w| self.to_clear.word(w) != 0 || self.to_clear_dirty.word(w) != 0)
    }

    /// Marks region `r` dirty without a write (verify found it different): the writer makes
    /// the bit durable in its next round, and a resync copies the region.
    pub fn mark_out_of_sync(&self, r: u64) {
        self.dirty.set(r);
        self.pending.set(r);
        self.wake_writer();
    }

    /// Resets `touched` for region `r` (resync, holding the region's range: no write to it
    /// is in flight).
    pub fn reset_touched(&self, r: u64) {
        self.touched.clear(r);
    }

    /// Resets every `touched` bit (the cleaner, at the start of a cycle).
    pub fn reset_all_touched(&self) {
        for w in 0..self.touched.words() {
            self.touched.take_word(w);
        }
    }

    pub fn is_touched(&self, r: u64) -> bool {
        self.touched.get(r)
    }

    /// Out-of-sync regions: possibly different on the peer (see the field).
    pub fn dirty(&self) -> &AtomicBits {
        &self.dirty
    }

    /// Bits certainly on disk: `dirty` and the rest of their hot extents.
    pub fn on_disk(&self) -> &AtomicBits {
        &self.durable
    }

    pub fn dirty_regions(&self) -> u64 {
        self.dirty.count_ones()
    }

    /// Bits on disk after the writer's last round (at least `dirty_regions` once the writes
    /// of those regions were issued).
    pub fn on_disk_regions(&self) -> u64 {
        self.on_disk_count.load(Ordering::Relaxed)
    }

    /// A data link was lost. What the peer acked but did not flush may be lost with it if the
    /// peer crashed; then the sync link drops too, and the next exchange resyncs every set
    /// region (the bits of such writes are still set: nothing is cleared across a loss).
    pub fn on_link_lost(&self) {
        self.link_losses.fetch_add(1, Ordering::SeqCst);
    }

    pub fn link_losses(&self) -> u64 {
        self.link_losses.load(Ordering::SeqCst)
    }

    pub fn resync_needed(&self) -> bool {
        self.resync_needed.load(Ordering::SeqCst)
    }

    pub fn set_resync_needed(&self, needed: bool) {
        self.resync_needed.store(needed, Ordering::SeqCst);
    }

    pub fn alone_allowed(&self) -> bool {
        self.alone_allowed.load(Ordering::SeqCst)
    }

    /// A queue is about to complete writes without the peer: counts the attempt, then reads
    /// the permission (both sequentially consistent). Whoever revokes the permission and then
    /// reads [`Self::alone_attempts`] either sees this attempt or made it fail: no write
    /// completes alone unseen after a revoke (the witness is told the peer is up to date only
    /// when none did).
    pub fn begin_alone(&self) -> bool {
        self.alone_attempts.fetch_add(1, Ordering::SeqCst);
        self.alone_allowed.load(Ordering::SeqCst)
    }

    pub fn alone_attempts(&self) -> u64 {
        self.alone_attempts.load(Ordering::SeqCst)
    }

    pub fn allow_alone(&self) {
        self.alone_allowed.store(true, Ordering::SeqCst);
    }

    /// With a witness: the next loss of the peer must be granted again (the peer is up to
    /// date; the witness is told after this, so it never records up to date first).
    pub fn revoke_alone(&self) {
        self.alone_allowed.store(false, Ordering::SeqCst);
    }

    /// Whether unreplicated writes may complete now. If going alone is allowed but not yet
    /// recorded, asks the writer to record it (the queues are woken when it is).
    pub fn may_complete_alone(&self) -> bool {
        if self.alone_ready.load(Ordering::Acquire) {
            return true;
        }
        if self.alone_allowed() && !self.alone_wanted.swap(true, Ordering::AcqRel) {
            self.wake_writer();
        }
        false
    }

    pub fn is_alone(&self) -> bool {
        self.alone_ready.load(Ordering::Acquire)
    }

    /// The peer is up to date again (a resync finished): the next loss of it starts a new
    /// generation again.
    pub fn on_peer_up_to_date(&self) {
        self.alone_ready.store(false, Ordering::Release);
        self.alone_wanted.store(false, Ordering::Release);
    }

    /// Changes the superblock durably (control plane).
    pub fn update_superblock(&self, f: impl FnOnce(&mut Superblock)) -> Result<Superblock, MetadataError> {
        let mut g = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let mut sb = g.sb.clone();
        f(&mut sb);
        g.file.write_superblock(&sb)?;
        g.sb = sb.clone();
        Ok(sb)
    }

    pub fn superblock(&self) -> Superblock {
        self.meta.lock().unwrap_or_else(|p| p.into_inner()).sb.clone()
    }

    pub fn set_writer(&self, t: Thread) {
        let _ = self.writer.set(t);
    }

    pub fn wake_writer(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }
}

#[cfg(test)]
mod tests;
