//! The volume engine: one mirrored block device, independent of the frontend that drives it.
//!
//! A [`Volume`] owns the backing file, the volume's identity and counters, and one link
//! hand-off per queue. Each frontend queue thread owns one [`queue::Queue`]: the per-request
//! state machine of the primary's write path (local I/O and peer I/O of that queue, on that
//! queue's ring); [`request`] holds the pure per-request state and the completion rule. The
//! secondary's side of the write path is `peer::replica`.

pub mod conflict;
pub mod disk;
pub mod local_io;
pub mod queue;
pub mod request;
pub mod ring;
pub mod stats;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metroblk_protocol::{Geometry, MAX_PAYLOAD};

use crate::bitmap::{writer, WriteIntent};
use crate::config::{Fencing, IoMode, VolumeConfig};
use crate::metadata;
use crate::peer::connector::{self, LinkHandoff};
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
}

impl VolumeShared {
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }
}

/// A volume opened on this node in one role.
pub struct Volume {
    pub shared: Arc<VolumeShared>,
    /// Dropped after the connectors (field order does not matter: `Drop` orders it).
    writer: Option<writer::Writer>,
    sync_source: Option<crate::resync::source::Source>,
    handoffs: Vec<Arc<LinkHandoff>>,
    connectors: Vec<std::thread::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("volume {volume}: backing file {path}: {message}")]
    Backing { volume: String, path: String, message: String },
    #[error("volume {volume}: {message}")]
    Other { volume: String, message: String },
}

/// Opens the volume's metadata file (refusing a missing, foreign or corrupt one with one
/// line), marks it not cleanly shut down, and builds the write intent over its bitmap.
pub fn open_metadata(
    cfg: &VolumeConfig,
    node_name: &str,
    config_path: &std::path::Path,
) -> Result<Arc<WriteIntent>, OpenError> {
    let other = |message: String| OpenError::Other { volume: cfg.name.clone(), message };
    let expect = metadata::Expected::for_volume(cfg, node_name, config_path);
    let (mut file, mut sb, bits) =
        metadata::open_file(&cfg.metadata_file, &expect).map_err(|e| other(e.to_string()))?;
    if sb.clean_shutdown {
        sb.clean_shutdown = false;
        file.write_superblock(&sb).map_err(|e| other(e.to_string()))?;
    }
    let intent = WriteIntent::new(file, sb, bits.as_raw_slice(), cfg.fencing == Fencing::None);
    let dirty = intent.dirty_regions();
    if dirty > 0 {
        tracing::info!(volume = %cfg.name, regions = dirty, "the bitmap has regions marked dirty: they are resynced when the peer connects");
    }
    Ok(Arc::new(intent))
}

/// Starts the write-intent writer of a volume.
pub fn start_writer(shared: &Arc<VolumeShared>) -> writer::Writer {
    let weak = Arc::downgrade(shared);
    writer::spawn(shared.intent.clone(), shared.config.name.clone(), move || {
        if let Some(v) = weak.upgrade() {
            v.conflicts.wake_all_queues();
        }
    })
}

/// Opens (creating if missing) the backing file and checks its size against the volume's.
/// A file of another size is refused, never resized: it may be another volume's data.
pub fn open_backing_file(cfg: &VolumeConfig) -> Result<File, OpenError> {
    let err = |message: String| OpenError::Backing {
        volume: cfg.name.clone(),
        path: cfg.backing_file.display().to_string(),
        message,
    };
    let mut opts = OpenOptions::new();
    // Created private: the volume's data is nobody else's business.
    opts.read(true).write(true).mode(0o600);
    let mut flags = 0;
    if cfg.io_mode == IoMode::Direct {
        flags |= libc::O_DIRECT;
    }
    // A block device is opened exclusively (O_EXCL without O_CREAT: the kernel refuses it with
    // EBUSY while the device is mounted or claimed by another exclusive opener, such as a
    // second node or md), so two writers cannot share the disk.
    use std::os::unix::fs::FileTypeExt;
    if std::fs::metadata(&cfg.backing_file).is_ok_and(|m| m.file_type().is_block_device()) {
        flags |= libc::O_EXCL;
    }
    opts.custom_flags(flags);
    let file = match opts.open(&cfg.backing_file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f = opts.create_new(true).open(&cfg.backing_file).map_err(|e| err(format!("cannot create: {e}")))?;
            f.set_len(cfg.size).map_err(|e| err(format!("cannot size to {} bytes: {e}", cfg.size)))?;
            tracing::info!(volume = %cfg.name, path = %cfg.backing_file.display(), size = cfg.size, "created backing file");
            f
        }
        Err(e) => return Err(err(format!("cannot open: {e}"))),
    };
    let meta = file.metadata().map_err(|e| err(format!("cannot stat: {e}")))?;
    if meta.is_file() && meta.len() != cfg.size {
        return Err(err(format!(
            "is {} bytes but the volume is {} bytes (refusing to resize existing data)",
            meta.len(),
            cfg.size
        )));
    }
    Ok(file)
}

impl Volume {
    /// Opens the volume as primary: queues can be created and the links to the peer are
    /// dialled (one TCP connection per queue, so no queue shares a socket with another).
    pub fn open_primary(cfg: &VolumeConfig, node_name: &str, queues: u16) -> Result<Volume, OpenError> {
        assert!(queues >= 1);
        let intent = open_metadata(cfg, node_name, std::path::Path::new("the node's config"))?;
        Self::open_primary_with(cfg, node_name, queues, intent)
    }

    /// As [`Self::open_primary`], with the metadata already opened.
    pub fn open_primary_with(
        cfg: &VolumeConfig,
        node_name: &str,
        queues: u16,
        intent: Arc<WriteIntent>,
    ) -> Result<Volume, OpenError> {
        assert!(queues >= 1);
        let file = open_backing_file(cfg)?;
        let queue_stats = (0..queues).map(|_| Arc::new(QueueStats::default())).collect();
        let shared = Arc::new(VolumeShared {
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
            queue_stats,
        });
        let writer = Some(start_writer(&shared));
        let sync_source = cfg.peer.is_some().then(|| crate::resync::source::spawn(shared.clone()));
        let mut handoffs = Vec::new();
        let mut connectors = Vec::new();
        for q in 0..queues {
            let h = Arc::new(LinkHandoff::new().map_err(|e| OpenError::Other {
                volume: cfg.name.clone(),
                message: format!("cannot create eventfd: {e}"),
            })?);
            // A standalone volume has no peer: its queues never ask for a link.
            if cfg.peer.is_some() {
                connectors.push(connector::spawn(shared.clone(), q, h.clone()));
            }
            handoffs.push(h);
        }
        Ok(Volume { shared, writer, sync_source, handoffs, connectors })
    }

    /// The engine state machine of queue `qid`, to be driven by one thread.
    pub fn queue(&self, qid: u16, depth: u16) -> Queue {
        Queue::new(self.shared.clone(), qid, depth, self.handoffs[qid as usize].clone())
    }

    pub fn handoff(&self, qid: u16) -> &Arc<LinkHandoff> {
        &self.handoffs[qid as usize]
    }

    pub fn handoffs(&self) -> &[Arc<LinkHandoff>] {
        &self.handoffs
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        for h in &self.handoffs {
            h.shut_down();
        }
        for c in self.connectors.drain(..) {
            let _ = c.join();
        }
        self.sync_source.take();
        // Last: whatever the queues marked is written before the writer stops.
        if self.writer.take().is_some() && !self.shared.intent.has_failed() {
            if let Err(e) = self.shared.intent.update_superblock(|sb| sb.clean_shutdown = true) {
                tracing::error!(volume = %self.shared.config.name, "{e}");
            }
        }
    }
}

pub fn geometry(cfg: &VolumeConfig) -> Geometry {
    Geometry { volume_size: cfg.size, block_size: cfg.block_size, max_payload: MAX_IO_BYTES }
}
