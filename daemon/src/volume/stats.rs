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
