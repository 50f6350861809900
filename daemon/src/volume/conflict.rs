//! Conflicting writes: overlapping replicated requests are applied one after the other.
//!
//! The rule (design, "Write path" 7; DRBD's `complete_conflicting_writes`): a WRITE, DISCARD or
//! WRITE_ZEROES that overlaps a replicated request still in flight, on any queue, is issued only
//! after the earlier one completed on both nodes. The kernel lets overlapping writes be in
//! flight together, and the two nodes would otherwise apply them in different orders (the
//! secondary runs many local writes at once); with this rule at most one request per byte is
//! in flight anywhere, so both copies end up with the same bytes. Resync copies take the same
//! ranges, so a copy never lands on top of a newer application write.
//!
//! How: the volume is cut into *granules* (4 KiB, or larger for huge volumes so the table stays
//! bounded) and the table keeps one bit per granule in atomic words. A request takes its range
//! by setting its bits with `fetch_or`; if any bit was already set, it undoes exactly the bits it
//! set and waits. Nothing holds one word while waiting for another, so there is no deadlock, and
//! the hot path is a few atomic operations on words that only contend when queues write to
//! neighbouring granules: no lock, no allocation.
//!
//! Waking: a queue with waiting requests sets its bit in `waiters` (SeqCst) and tries once more;
//! whoever releases a range (SeqCst) then reads `waiters` and signals those queues' eventfds.
//! Either the retry sees the release or the releaser sees the waiter: no lost wake-up. A queue
//! retries its own waiting requests whenever it releases a range itself.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

/// Finest granule: a page, so 4 KiB writes that do not overlap never wait for each other.
pub const GRANULE_MIN: u64 = 4096;
/// Largest table, in bits (16 MiB of memory); huge volumes get coarser granules instead.
pub const TABLE_BITS_MAX: u64 = 1 << 27;
/// Queues that can wait on the table (one bit each in `waiters`).
pub const WAITER_QUEUES_MAX: usize = 32;
/// The owner id resync copies take ranges under (no queue has it; resync polls instead of
/// waiting on an eventfd).
pub const RESYNC_OWNER: u16 = WAITER_QUEUES_MAX as u16 - 1;
const _: () = assert!((crate::config::MAX_QUEUES as usize) < RESYNC_OWNER as usize);
const _: () = assert!(crate::config::MAX_QUEUES as usize <= WAITER_QUEUES_MAX);

pub struct ConflictTable {
    granule_shift: u32,
    granules: u64,
    words: Box<[AtomicU64]>,
    /// Bit q: queue q has requests waiting for a range.
    waiters: AtomicU32,
    /// The eventfd each queue's ring watches (-1: none registered).
    wake_fds: [AtomicI32; WAITER_QUEUES_MAX],
}

/// The granules `[first, last]` a byte range covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GranuleRange {
    first: u64,
    last: u64,
}

impl ConflictTable {
    pub fn new(volume_size: u64) -> ConflictTable {
        assert!(volume_size > 0);
        let mut granule = GRANULE_MIN;
        while volume_size.div_ceil(granule) > TABLE_BITS_MAX {
            granule *= 2;
        }
        let granules = volume_size.div_ceil(granule);
        let words = (0..granules.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        ConflictTable {
            granule_shift: granule.trailing_zeros(),
            granules,
            words,
            waiters: AtomicU32::new(0),
            wake_fds: std::array::from_fn(|_| AtomicI32::new(-1)),
        }
    }

    pub fn granule_size(&self) -> u64 {
        1 << self.granule_shift
    }

    /// Tells the table which eventfd wakes queue `qid`'s ring.
    pub fn register_queue(&self, qid: u16, eventfd: RawFd) {
        assert!((qid as usize) < WAITER_QUEUES_MAX);
        self.wake_fds[qid as usize].store(eventfd, Ordering::Release);
    }

    /// The granules of `len` bytes at `offset` (`len > 0`, inside the volume: checked by the
    /// caller before any request gets here).
    pub fn range(&self, offset: u64, len: u64) -> GranuleRange {
        assert!(len > 0);
        let first = offset >> self.granule_shift;
        let last = (offset + len - 1) >> self.granule_shift;
        assert!(last < self.granules, "range {offset}+{len} past the volume");
        GranuleRange { first, last }
    }

    /// Takes `r` if no part of it is taken. On false nothing changed.
    ///
    /// A read-only check first, so a request that waits for a range held for long (writes held
    /// while the link is down) retries without side effects; only a real race with another
    /// taker can leave a partial hold to undo, and only then are other waiters woken.
    pub fn try_acquire(&self, r: GranuleRange, me: u16) -> bool {
        if self.is_taken(r) {
            return false;
        }
        let mut taken_upto = None;
        for (w, mask) in word_masks(r) {
            let prev = self.words[w].fetch_or(mask, Ordering::SeqCst);
            if prev & mask != 0 {
                // Give back only the bits this call set; the others are someone else's.
                self.words[w].fetch_and(!(mask & !prev), Ordering::SeqCst);
                if let Some(upto) = taken_upto {
                    for (w, mask) in word_masks(r).take_while(|&(w, _)| w <= upto) {
                        self.words[w].fetch_and(!mask, Ordering::SeqCst);
                    }
                }
                // Our partial hold may have made another queue wait: let it retry.
                self.wake_waiters(me);
                return false;
            }
            taken_upto = Some(w);
        }
        true
    }

    /// Gives back a range taken by `try_acquire` and wakes the queues (other than `me`) that
    /// wait for a range.
    pub fn release(&self, r: GranuleRange, me: u16) {
        for (w, mask) in word_masks(r) {
            let prev = self.words[w].fetch_and(!mask, Ordering::SeqCst);
            assert_eq!(prev & mask, mask, "released a range that was not held");
        }
        self.wake_waiters(me);
    }

    /// Queue `qid` has (true) or no longer has (false) requests waiting. After setting it, the
    /// queue must retry its waiting requests once before it sleeps.
    pub fn set_waiting(&self, qid: u16, waiting: bool) {
        let bit = 1u32 << qid;
        if waiting {
            self.waiters.fetch_or(bit, Ordering::SeqCst);
        } else {
            self.waiters.fetch_and(!bit, Ordering::SeqCst);
        }
    }

    /// Wakes every registered queue: the write-intent writer made bits durable, or the volume
    /// may now go on alone. A queue retries whatever it parked on any wake.
    pub fn wake_all_queues(&self) {
        for (q, fd) in self.wake_fds.iter().enumerate() {
            let fd = fd.load(Ordering::Acquire);
            if fd >= 0 {
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from a live u64 to an eventfd the queue keeps open
                // for the volume's lifetime.
                let n = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
                if n != 8 {
                    tracing::error!(queue = q, "cannot wake a queue: {}", std::io::Error::last_os_error());
                }
            }
        }
    }

    fn wake_waiters(&self, me: u16) {
        let mut w = self.waiters.load(Ordering::SeqCst) & !(1u32 << me);
        while w != 0 {
            let q = w.trailing_zeros() as usize;
            w &= w - 1;
            let fd = self.wake_fds[q].load(Ordering::Acquire);
            if fd >= 0 {
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from a live u64 to an eventfd the queue keeps open
                // for the volume's lifetime.
                let n = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
                if n != 8 {
                    tracing::error!(queue = q, "cannot wake a queue: {}", std::io::Error::last_os_error());
                }
            }
        }
    }

    /// Is any granule of `r` taken? (Tests and assertions.)
    pub fn is_taken(&self, r: GranuleRange) -> bool {
        word_masks(r).any(|(w, mask)| self.words[w].load(Ordering::SeqCst) & mask != 0)
    }
}

/// (word index, bit mask) for each table word `r` touches, in ascending order.
fn word_masks(r: GranuleRange) -> impl Iterator<Item = (usize, u64)> {
    let (fw, lw) = (r.first / 64, r.last / 64);
    (fw..=lw).map(move |w| {
        let lo = if w == fw { r.first % 64 } else { 0 };
        let hi = if w == lw { r.last % 64 } else { 63 };
        let mask = (u64::MAX >> (63 - (hi - lo))) << lo;
        (w as usize, mask)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granules_stay_bounded_for_huge_volumes() {
        assert_eq!(ConflictTable::new(1 << 30).granule_size(), 4096);
        let t = ConflictTable::new(1 << 50);
        assert!(t.granules <= TABLE_BITS_MAX);
        assert_eq!(t.granule_size(), 1 << 23);
    }

    #[test]
    fn masks_cover_exactly_the_range() {
        for first in 0..200u64 {
            for last in first..first + 150 {
                let mut bits = std::collections::BTreeSet::new();
                for (w, m) in word_masks(GranuleRange { first, last }) {
                    for b in 0..64 {
                        if m & (1 << b) != 0 {
                            assert!(bits.insert(w as u64 * 64 + b));
                        }
                    }
                }
                assert_eq!(bits, (first..=last).collect());
            }
        }
    }

    /// Every pair of small ranges: the second is refused exactly when they overlap, a refusal
    /// leaves the table as it was, and release frees exactly the range.
    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let t = ConflictTable::new(300 * 4096);
        let spans: Vec<(u64, u64)> =
            (0..300u64).step_by(7).flat_map(|a| [1u64, 2, 63, 64, 65, 130].map(move |n| (a, n))).collect();
        for &(a, n) in &spans {
            if a + n > 300 {
                continue;
            }
            let ra = t.range(a * 4096, n * 4096);
            assert!(t.try_acquire(ra, 0));
            for &(b, m) in &spans {
                if b + m > 300 {
                    continue;
                }
                let rb = t.range(b * 4096, m * 4096);
                let overlap = b < a + n && a < b + m;
                let before: Vec<u64> = t.words.iter().map(|w| w.load(Ordering::SeqCst)).collect();
                let got = t.try_acquire(rb, 0);
                assert_eq!(got, !overlap, "{a}+{n} vs {b}+{m}");
                if got {
                    t.release(rb, 0);
                }
                let after: Vec<u64> = t.words.iter().map(|w| w.load(Ordering::SeqCst)).collect();
                assert_eq!(before, after);
            }
            t.release(ra, 0);
            assert!(t.words.iter().all(|w| w.load(Ordering::SeqCst) == 0));
        }
    }

    #[test]
    fn sub_granule_ranges_conflict_conservatively() {
        let t = ConflictTable::new(1 << 20);
        let a = t.range(0, 512);
        let b = t.range(512, 512);
        assert!(t.try_acquire(a, 0));
        assert!(!t.try_acquire(b, 0), "two writes in one granule are ordered");
        t.release(a, 0);
        assert!(t.try_acquire(b, 0));
    }

    /// Threads hammer overlapping ranges; each checks that nobody else holds any granule of its
    /// range while it holds it (a shared owner array stands in for the data).
    #[test]
    fn concurrent_holders_never_overlap() {
        use std::sync::Arc;
        const N: u64 = 256;
        let t = Arc::new(ConflictTable::new(N * 4096));
        let owner: Arc<Vec<AtomicU32>> = Arc::new((0..N).map(|_| AtomicU32::new(0)).collect());
        let threads: Vec<_> = (1..=4u32)
            .map(|id| {
                let (t, owner) = (t.clone(), owner.clone());
                std::thread::spawn(move || {
                    let mut x = (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    let mut held = 0;
                    while held < 20_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let start = x % N;
                        let len = 1 + (x >> 20) % 70.min(N - start);
                        let r = t.range(start * 4096, len * 4096);
                        if !t.try_acquire(r, id as u16) {
                            continue;
                        }
                        for g in start..start + len {
                            assert_eq!(owner[g as usize].swap(id, Ordering::SeqCst), 0);
                        }
                        for g in start..start + len {
                            assert_eq!(owner[g as usize].swap(0, Ordering::SeqCst), id);
                        }
                        t.release(r, 0);
                        held += 1;
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert!(t.words.iter().all(|w| w.load(Ordering::SeqCst) == 0));
    }
}
