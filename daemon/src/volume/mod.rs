//! The volume engine: one mirrored block device, independent of the frontend that drives it.
//!
//! [`VolumeShared`] is what every part shares about one volume: the backing file, its
//! identity, epoch, conflict table, disk state, write intent and counters. Each frontend
//! queue thread owns one [`queue::Queue`]: the per-request
//! state machine of the primary's write path (local I/O and peer I/O of that queue, on that
//! queue's ring); [`request`] holds the pure per-request state and the completion rule. The
//! secondary's side of the write path is `peer::replica`.
//!
//! Architecture Invariant: the engine only uses parts below it (bitmap, metadata, the fence's
//! and the sync link's shared atomics, the link's pure state and frame I/O, the link
//! hand-off); what opens a volume and spawns the threads around it is `lifecycle::parts`.

pub mod conflict;
pub mod disk;
pub mod local_io;
pub mod queue;
pub mod request;
pub mod ring;
pub mod stats;

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use metroblk_protocol::{Geometry, MAX_PAYLOAD};

use crate::bitmap::WriteIntent;
use crate::config::VolumeConfig;
use stats::QueueStats;

pub use queue::{Queue, QueueDriver, ReqKind, Request};

/// Largest single request the engine accepts (one WRITE frame's payload).
pub const MAX_IO_BYTES: u32 = MAX_PAYLOAD;

/// What every part of the engine shares about one volume. Read-mostly: the hot path touches
/// only the epoch (a relaxed load) and its own queue's counters.
pub struct VolumeShared {
    pub config: VolumeConfig,
    pub node_name: String,
    pub geometry: Geometry,
    /// Fencing token carried by every replicated write (raised by the witness; constant until
    /// that exists).
    pub epoch: AtomicU64,
    pub file: File,
    /// Ranges of replicated requests in flight, shared by every queue (`conflict.rs`).
    pub conflicts: conflict::ConflictTable,
    /// This node's disk state; an I/O error latches it to `failed`.
    pub disk: disk::DiskHealth,
    /// The write-intent bitmap and the metadata file (`bitmap/`).
    pub intent: Arc<WriteIntent>,
    /// The sync link's state and the operator's resync requests (`resync/`).
    pub sync: crate::resync::SyncShared,
    pub queue_stats: Vec<Arc<QueueStats>>,
    /// The lease and the fence, from the witness client (`fencing/`).
    pub fence: crate::fencing::shared::FenceShared,
    /// The primary's ublk device runs in zero copy (set before its queues are made, which
    /// then move READ and WRITE data with the ring's fixed buffers; `status`'s `write_path`).
    pub zero_copy: AtomicBool,
}

impl VolumeShared {
    /// The shared state of `cfg` over its opened backing `file` and write `intent`, with
    /// `counters` sets of per-queue counters (the primary's queues, or the secondary's links).
    pub fn new(
        cfg: &VolumeConfig,
        node_name: &str,
        file: File,
        intent: Arc<WriteIntent>,
        counters: u16,
    ) -> VolumeShared {
        assert!(counters >= 1);
        VolumeShared {
            config: cfg.clone(),
            node_name: node_name.to_string(),
            geometry: geometry(cfg),
            epoch: AtomicU64::new(intent.superblock().epoch.max(1)),
            fence: crate::fencing::shared::FenceShared::new(cfg),
            file,
            conflicts: conflict::ConflictTable::new(cfg.size),
            disk: disk::DiskHealth::new(intent.superblock().disk_state),
            intent,
            sync: crate::resync::SyncShared::new(cfg.resync_rate_bps),
            queue_stats: (0..counters).map(|_| Arc::new(QueueStats::default())).collect(),
            zero_copy: AtomicBool::new(false),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }
}

pub fn geometry(cfg: &VolumeConfig) -> Geometry {
    Geometry { volume_size: cfg.size, block_size: cfg.block_size, max_payload: MAX_IO_BYTES }
}
