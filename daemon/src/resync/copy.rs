//! The copy schedule of one resync pass, as pure state (time passed in): which region goes
//! next (disk order), how many are in flight (a window), when to FLUSH the target, which
//! regions a completed FLUSH makes durable on both nodes (their bits may be cleared), and the
//! optional rate limit (a token bucket over the bytes that cross the link: a piece the source
//! finds to read as zeros goes as a range with no payload, and its bytes are given back).
//!
//! The sync link is one TCP connection served in order, so acks arrive in the order the copies
//! were sent; an ack for anything else is a protocol violation.

use std::collections::VecDeque;

/// Copies in flight at most (the window): enough to keep a fast link busy, bounded memory.
pub const COPIES_IN_FLIGHT_MAX: usize = 32;
/// Regions acked between two FLUSHes of the target at most: bounds what an interrupted resync
/// copies again, and the memory of the list.
pub const REGIONS_PER_FLUSH_MAX: usize = 1024;
/// Bytes acked between two FLUSHes at most: what an interrupted resync may copy again.
pub const BYTES_PER_FLUSH_MAX: u64 = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Copy `count` consecutive regions from `first` now (one run: fewer frames and acks).
    Copy { first: u64, count: u64 },
    /// Send a FLUSH to the target.
    Flush,
    /// Nothing to do until an ack (or, rate-limited, until `now` passes the returned time).
    Wait { until_ns: Option<u64> },
    /// Every region copied and durable on the target.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error("the peer acknowledged region {got} but {expected:?} was the oldest copy in flight")]
    UnexpectedAck { got: u64, expected: Option<u64> },
    #[error("the peer acknowledged a FLUSH that was not sent")]
    UnexpectedFlushAck,
}

pub struct CopyPlan {
    /// Regions to copy (one bit each, in u64 words).
    to_copy: Vec<u64>,
    regions: u64,
    region_size: u64,
    volume_size: u64,
    cursor: u64,
    /// Runs in flight: (first region, regions).
    in_flight: VecDeque<(u64, u64)>,
    in_flight_regions: usize,
    /// Longest run of consecutive regions one copy may take.
    run_regions_max: u64,
    acked: Vec<u64>,
    acked_bytes: u64,
    flushing: Vec<u64>,
    flush_in_flight: bool,
    /// Bytes per second; 0: unlimited.
    rate_bps: u64,
    tokens: f64,
    last_refill_ns: u64,
    /// Bytes of the last copy taken from the bucket and not given back.
    charged_bytes: u64,
    pub regions_total: u64,
    pub regions_copied: u64,
    pub bytes_copied: u64,
    pub bytes_total: u64,
}

impl CopyPlan {
    /// `run_bytes_max`: the most bytes one copy (a run of consecutive regions) may span.
    pub fn new(
        to_copy: Vec<u64>,
        regions: u64,
        region_size: u64,
        volume_size: u64,
        run_bytes_max: u64,
        rate_bps: u64,
        now_ns: u64,
    ) -> CopyPlan {
        assert_eq!(to_copy.len() as u64, regions.div_ceil(64));
        assert!(region_size.is_power_of_two() && regions == volume_size.div_ceil(region_size));
        let mut plan = CopyPlan {
            to_copy,
            regions,
            region_size,
            volume_size,
            cursor: 0,
            in_flight: VecDeque::with_capacity(COPIES_IN_FLIGHT_MAX),
            in_flight_regions: 0,
            run_regions_max: (run_bytes_max / region_size).max(1),
            acked: Vec::with_capacity(REGIONS_PER_FLUSH_MAX),
            acked_bytes: 0,
            flushing: Vec::with_capacity(REGIONS_PER_FLUSH_MAX),
            flush_in_flight: false,
            rate_bps,
            tokens: 0.0,
            last_refill_ns: now_ns,
            charged_bytes: 0,
            regions_total: 0,
            regions_copied: 0,
            bytes_copied: 0,
            bytes_total: 0,
        };
        // Padding bits past the last region mean nothing.
        if regions % 64 != 0 {
            if let Some(last) = plan.to_copy.last_mut() {
                *last &= (1u64 << (regions % 64)) - 1;
            }
        }
        let marked: Vec<u64> = plan.ones().collect();
        for r in marked {
            plan.regions_total += 1;
            plan.bytes_total += plan.region_len(r);
        }
        plan
    }

    fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        self.to_copy.iter().enumerate().flat_map(|(w, &bits)| {
            let mut b = bits;
            std::iter::from_fn(move || {
                (b != 0).then(|| {
                    let i = b.trailing_zeros() as u64;
                    b &= b - 1;
                    w as u64 * 64 + i
                })
            })
        })
    }

    /// Bytes of region `r` (the last one may be short).
    pub fn region_len(&self, r: u64) -> u64 {
        assert!(r < self.regions);
        (self.volume_size - r * self.region_size).min(self.region_size)
    }

    pub fn region_offset(&self, r: u64) -> u64 {
        r * self.region_size
    }

    fn next_set(&self, from: u64) -> Option<u64> {
        let mut w = (from / 64) as usize;
        if w >= self.to_copy.len() {
            return None;
        }
        let mut bits = self.to_copy[w] & (!0u64 << (from % 64));
        loop {
            if bits != 0 {
                return Some(w as u64 * 64 + bits.trailing_zeros() as u64);
            }
            w += 1;
            if w >= self.to_copy.len() {
                return None;
            }
            bits = self.to_copy[w];
        }
    }

    /// What to do next.
    pub fn poll_next(&mut self, now_ns: u64) -> Next {
        let copying_done = self.next_set(self.cursor).is_none();
        if !self.flush_in_flight
            && !self.acked.is_empty()
            && (self.acked.len() >= REGIONS_PER_FLUSH_MAX
                || self.acked_bytes >= BYTES_PER_FLUSH_MAX
                || (copying_done && self.in_flight.is_empty()))
        {
            std::mem::swap(&mut self.acked, &mut self.flushing);
            self.acked_bytes = 0;
            self.flush_in_flight = true;
            return Next::Flush;
        }
        if copying_done {
            if self.in_flight.is_empty() && self.acked.is_empty() && !self.flush_in_flight {
                return Next::Done;
            }
            return Next::Wait { until_ns: None };
        }
        // Acked-but-unflushed regions are bounded: wait for the flush before copying more.
        let room = REGIONS_PER_FLUSH_MAX.saturating_sub(self.acked.len() + self.in_flight_regions) as u64;
        if self.in_flight.len() >= COPIES_IN_FLIGHT_MAX || room == 0 {
            return Next::Wait { until_ns: None };
        }
        let r = self.next_set(self.cursor).expect("checked above");
        let mut count = 1;
        while count < self.run_regions_max.min(room)
            && r + count < self.regions
            && self.to_copy[((r + count) / 64) as usize] & (1 << ((r + count) % 64)) != 0
        {
            count += 1;
        }
        let bytes: u64 = (r..r + count).map(|x| self.region_len(x)).sum();
        if self.rate_bps > 0 {
            let dt = now_ns.saturating_sub(self.last_refill_ns) as f64 / 1e9;
            self.last_refill_ns = now_ns;
            let need = bytes as f64;
            // At most one second of burst (or one run, if a run is larger).
            self.tokens = (self.tokens + dt * self.rate_bps as f64).min((self.rate_bps as f64).max(need));
            if self.tokens < need {
                let wait_ns = ((need - self.tokens) / self.rate_bps as f64 * 1e9) as u64;
                return Next::Wait { until_ns: Some(now_ns + wait_ns.max(1)) };
            }
            self.tokens -= need;
            self.charged_bytes = bytes;
        }
        self.cursor = r + count;
        self.in_flight.push_back((r, count));
        self.in_flight_regions += count as usize;
        Next::Copy { first: r, count }
    }

    /// `bytes` of the last copy went as a zero range, with no payload: they are given back to
    /// the rate limit, so that a resync of a mostly empty volume is paced by its data alone.
    pub fn on_sent_as_zeros(&mut self, bytes: u64) {
        if self.rate_bps == 0 {
            return;
        }
        assert!(bytes <= self.charged_bytes, "gave back {bytes} B of a copy charged {} B", self.charged_bytes);
        self.charged_bytes -= bytes;
        self.tokens += bytes as f64;
    }

    /// The target applied the copy of the run starting at `first`.
    pub fn on_acked(&mut self, first: u64) -> Result<(), CopyError> {
        let Some(&(r, count)) = self.in_flight.front().filter(|(r, _)| *r == first) else {
            return Err(CopyError::UnexpectedAck { got: first, expected: self.in_flight.front().map(|f| f.0) });
        };
        self.in_flight.pop_front();
        self.in_flight_regions -= count as usize;
        for x in r..r + count {
            let len = self.region_len(x);
            self.acked.push(x);
            self.acked_bytes += len;
            self.regions_copied += 1;
            self.bytes_copied += len;
        }
        Ok(())
    }

    /// Bytes of the run of `count` regions from `first`.
    pub fn run_len(&self, first: u64, count: u64) -> u64 {
        (first..first + count).map(|x| self.region_len(x)).sum()
    }

    /// The target's FLUSH completed: the regions it covered are durable on both nodes.
    pub fn on_flushed(&mut self) -> Result<std::vec::Drain<'_, u64>, CopyError> {
        if !self.flush_in_flight {
            return Err(CopyError::UnexpectedFlushAck);
        }
        self.flush_in_flight = false;
        Ok(self.flushing.drain(..))
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(bits: &[u64], regions: u64, rate: u64) -> CopyPlan {
        let mut words = vec![0u64; regions.div_ceil(64) as usize];
        for &r in bits {
            words[(r / 64) as usize] |= 1 << (r % 64);
        }
        CopyPlan::new(words, regions, 4096, regions * 4096 - 512, 16 * 4096, rate, 0)
    }

    /// Drives a plan to the end with an in-order peer, acking as late as the window allows;
    /// returns the regions copied in order and those cleared.
    fn drive(p: &mut CopyPlan) -> (Vec<u64>, Vec<u64>) {
        let (mut sent, mut cleared) = (Vec::new(), Vec::new());
        let mut pending: VecDeque<Result<u64, ()>> = VecDeque::new();
        let mut now = 0;
        loop {
            match p.poll_next(now) {
                Next::Copy { first, count } => {
                    assert!((1..=16).contains(&count));
                    sent.extend(first..first + count);
                    pending.push_back(Ok(first));
                }
                Next::Flush => pending.push_back(Err(())),
                Next::Wait { until_ns } => {
                    if let Some(t) = until_ns {
                        now = t;
                        continue;
                    }
                    match pending.pop_front().expect("waiting with nothing in flight") {
                        Ok(r) => p.on_acked(r).unwrap(),
                        Err(()) => cleared.extend(p.on_flushed().unwrap()),
                    }
                }
                Next::Done => break,
            }
            assert!(p.in_flight() <= COPIES_IN_FLIGHT_MAX);
        }
        assert!(pending.is_empty());
        (sent, cleared)
    }

    #[test]
    fn copies_every_marked_region_once_in_disk_order_and_clears_each_after_a_flush() {
        let marked: Vec<u64> = (0..5000).filter(|r| r % 3 == 0 || r % 7 == 0).collect();
        let mut p = plan(&marked, 5000, 0);
        assert_eq!(p.regions_total, marked.len() as u64);
        let (sent, cleared) = drive(&mut p);
        assert_eq!(sent, marked);
        assert_eq!(cleared, marked);
        assert_eq!(p.regions_copied, marked.len() as u64);
        assert_eq!(p.bytes_copied, p.bytes_total);
        // The last region is short: 4096 - 512 bytes.
        assert_eq!(p.region_len(4999), 3584);
    }

    #[test]
    fn an_empty_plan_is_done_at_once_and_padding_bits_are_ignored() {
        let mut p = CopyPlan::new(vec![!0u64 << 10], 10, 4096, 40960, 4096, 0, 0);
        assert_eq!(p.regions_total, 0);
        assert_eq!(p.poll_next(0), Next::Done);
    }

    #[test]
    fn the_rate_limit_spaces_copies() {
        // 100 regions of 4 KiB at 40960 B/s: about 10 s.
        let secs = rate_limited_secs(|_| false);
        assert!((9.0..11.0).contains(&secs), "{secs} s for 400 KiB at 40 KiB/s");
    }

    #[test]
    fn zero_ranges_are_given_back_to_the_rate_limit() {
        // Every other region sent as zeros: about 5 s.
        let secs = rate_limited_secs(|r| r % 2 == 0);
        assert!((4.5..5.5).contains(&secs), "{secs} s for 200 KiB of data at 40 KiB/s");
    }

    /// Copies 100 regions of 4 KiB, one per copy, at 40960 B/s with an instant peer; those
    /// `as_zeros` picks go as zero ranges. Returns the seconds it took.
    fn rate_limited_secs(as_zeros: impl Fn(u64) -> bool) -> f64 {
        let mut p = plan(&(0..100).collect::<Vec<_>>(), 100, 40960);
        p.run_regions_max = 1;
        let mut now = 0u64;
        let mut copies = 0;
        while copies < 100 {
            match p.poll_next(now) {
                Next::Copy { first, count } => {
                    if as_zeros(first) {
                        p.on_sent_as_zeros(p.run_len(first, count));
                    }
                    p.on_acked(first).unwrap();
                    copies += count;
                }
                Next::Wait { until_ns: Some(t) } => now = t,
                Next::Flush => {
                    p.on_flushed().unwrap().count();
                }
                other => panic!("{other:?}"),
            }
        }
        now as f64 / 1e9
    }

    #[test]
    #[should_panic(expected = "gave back")]
    fn giving_back_more_than_the_copy_took_is_a_bug() {
        let mut p = plan(&[0], 64, 40960);
        assert_eq!(p.poll_next(1_000_000_000), Next::Copy { first: 0, count: 1 });
        p.on_sent_as_zeros(8192);
    }

    #[test]
    fn acks_out_of_order_are_refused() {
        let mut p = plan(&[1, 2, 5], 64, 0);
        assert_eq!(p.poll_next(0), Next::Copy { first: 1, count: 2 }, "consecutive regions go as one run");
        assert_eq!(p.poll_next(0), Next::Copy { first: 5, count: 1 });
        assert_eq!(p.on_acked(5), Err(CopyError::UnexpectedAck { got: 5, expected: Some(1) }));
        assert!(p.on_flushed().is_err());
    }
}
