//! Counters a queue (or a replica connection) keeps for `metroblk status`.
//!
//! One struct per queue, written only by that queue's thread with relaxed atomics (no
//! contention, no lock) and read by the control socket.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Link state as the design names it, stored as a number in an atomic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkState {
    Connected,
    Connecting,
    Standalone,
    SyncSource,
    SyncTarget,
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LinkState::Connected => "connected",
            LinkState::Connecting => "connecting",
            LinkState::Standalone => "standalone",
            LinkState::SyncSource => "sync-source",
            LinkState::SyncTarget => "sync-target",
        })
    }
}

impl LinkState {
    fn from_u64(v: u64) -> LinkState {
        match v {
            0 => LinkState::Connecting,
            1 => LinkState::Connected,
            3 => LinkState::SyncSource,
            4 => LinkState::SyncTarget,
            _ => LinkState::Standalone,
        }
    }
    fn to_u64(self) -> u64 {
        match self {
            LinkState::Connecting => 0,
            LinkState::Connected => 1,
            LinkState::Standalone => 2,
            LinkState::SyncSource => 3,
            LinkState::SyncTarget => 4,
        }
    }
}

#[derive(Default)]
pub struct QueueStats {
    link: AtomicU64,
    pub inflight: AtomicU64,
    /// Requests held because the peer is unreachable.
    pub held: AtomicU64,
    /// Requests parked, not started, while the volume is fenced or switching over.
    pub parked: AtomicU64,
    /// Requests that waited for a write-intent bit to become durable.
    pub intent_waits: AtomicU64,
    /// Replicated requests completed without the peer (the volume went on alone).
    pub completed_alone: AtomicU64,
    pub local_write_bytes: AtomicU64,
    pub local_write_requests: AtomicU64,
    pub peer_write_bytes: AtomicU64,
    pub peer_write_requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub read_requests: AtomicU64,
    pub flushes: AtomicU64,
    /// Last measured PING/PONG round trip, nanoseconds (0 = none yet).
    pub rtt_ns: AtomicU64,
    pub reconnects: AtomicU64,
    /// Requests that waited for an overlapping request to complete on both nodes.
    pub conflict_waits: AtomicU64,
    /// WRITE latency from submission: the local half done, the peer's ack, the request
    /// completed (`metroblk_write_duration_seconds`).
    pub write_local: LatencyHistogram,
    pub write_peer: LatencyHistogram,
    pub write_whole: LatencyHistogram,
}

/// Upper bounds of the latency buckets, in nanoseconds (50 µs to 10 s; the last bucket is
/// everything above).
pub const LATENCY_BUCKETS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// A latency histogram written by one thread (its queue's): a fixed array of relaxed
/// counters, no allocation, no lock; a reader sees each counter whole but not all of them
/// at one instant (a scrape is a sample).
#[derive(Default)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative); the last one counts what is above every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Records one duration. Only the owning thread calls it, so a load and a store suffice
    /// (no read-modify-write on the hot path).
    #[inline]
    pub fn observe(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_NS.iter().position(|&b| ns <= b).unwrap_or(LATENCY_BUCKETS_NS.len());
        let bump = |c: &AtomicU64, v: u64| c.store(c.load(Relaxed).wrapping_add(v), Relaxed);
        bump(&self.buckets[i], 1);
        bump(&self.sum_ns, ns);
    }

    /// Adds this histogram's counts into `buckets` (per bucket) and returns the sum in ns.
    pub fn add_to(&self, buckets: &mut [u64; LATENCY_BUCKETS_NS.len() + 1]) -> u64 {
        for (acc, c) in buckets.iter_mut().zip(&self.buckets) {
            *acc += c.load(Relaxed);
        }
        self.sum_ns.load(Relaxed)
    }
}

impl QueueStats {
    pub fn link(&self) -> LinkState {
        LinkState::from_u64(self.link.load(Relaxed))
    }
    pub fn set_link(&self, s: LinkState) {
        self.link.store(s.to_u64(), Relaxed)
    }
    #[inline]
    pub fn add(counter: &AtomicU64, v: u64) {
        counter.fetch_add(v, Relaxed);
    }
    #[inline]
    pub fn sub(counter: &AtomicU64, v: u64) {
        counter.fetch_sub(v, Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
