//! What a role opens: the metadata and write intent, the volume's shared state, and the
//! primary's engine with the threads that serve it.
//!
//! Architecture Invariant: this is the one place that spawns a volume's connectors, sync
//! source and write-intent writer. `volume/` is the engine alone: it never reaches up to the
//! parts that drive it, so no import circle runs through it (checked by
//! `daemon/tests/architecture.rs`).

use std::path::Path;
use std::sync::Arc;

use crate::bitmap::{writer, WriteIntent};
use crate::config::{Fencing, VolumeConfig};
use crate::metadata;
use crate::peer::connector;
use crate::peer::handoff::LinkHandoff;
use crate::volume::{Queue, VolumeShared};

/// Opens the volume's metadata file (refusing a missing, foreign or corrupt one with one
/// line), marks it not cleanly shut down, and builds the write intent over its bitmap.
pub fn open_metadata(cfg: &VolumeConfig, node_name: &str, config_path: &Path) -> Result<Arc<WriteIntent>, String> {
    let other = |message: String| format!("volume {}: {message}", cfg.name);
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

/// Opens the backing file and builds the volume's shared state over `intent`, with
/// `counters` sets of per-queue counters.
pub fn open_shared(
    cfg: &VolumeConfig,
    node_name: &str,
    intent: Arc<WriteIntent>,
    counters: u16,
) -> Result<Arc<VolumeShared>, String> {
    let file = crate::backing::open(cfg).map_err(|e| e.to_string())?;
    Ok(Arc::new(VolumeShared::new(cfg, node_name, file, intent, counters)))
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

/// A volume opened as primary: the engine's shared state, one link hand-off per queue, and
/// the threads that serve the engine (a connector per queue, the sync source, the
/// write-intent writer). The frontend drives [`PrimaryEngine::queue`]s.
pub struct PrimaryEngine {
    pub shared: Arc<VolumeShared>,
    /// Dropped after the connectors (field order does not matter: `Drop` orders it).
    writer: Option<writer::Writer>,
    sync_source: Option<crate::resync::source::Source>,
    handoffs: Vec<Arc<LinkHandoff>>,
    connectors: Vec<std::thread::JoinHandle<()>>,
}

impl PrimaryEngine {
    /// Opens the volume as primary: queues can be created and the links to the peer are
    /// dialled (one TCP connection per queue, so no queue shares a socket with another).
    pub fn open(cfg: &VolumeConfig, node_name: &str, queues: u16) -> Result<PrimaryEngine, String> {
        assert!(queues >= 1);
        let intent = open_metadata(cfg, node_name, Path::new("the node's config"))?;
        Self::open_with(cfg, node_name, queues, intent)
    }

    /// As [`Self::open`], with the metadata already opened.
    pub fn open_with(
        cfg: &VolumeConfig,
        node_name: &str,
        queues: u16,
        intent: Arc<WriteIntent>,
    ) -> Result<PrimaryEngine, String> {
        assert!(queues >= 1);
        let shared = open_shared(cfg, node_name, intent, queues)?;
        let writer = Some(start_writer(&shared));
        let sync_source = cfg.peer.is_some().then(|| crate::resync::source::spawn(shared.clone()));
        let mut handoffs = Vec::new();
        let mut connectors = Vec::new();
        for q in 0..queues {
            let h =
                Arc::new(LinkHandoff::new().map_err(|e| format!("volume {}: cannot create eventfd: {e}", cfg.name))?);
            // A standalone volume has no peer: its queues never ask for a link.
            if cfg.peer.is_some() {
                connectors.push(connector::spawn(shared.clone(), q, h.clone()));
            }
            handoffs.push(h);
        }
        Ok(PrimaryEngine { shared, writer, sync_source, handoffs, connectors })
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

impl Drop for PrimaryEngine {
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
