//! The ublk frontend's view of the engine: one [`EngineQueue`] per ublk queue adapts the
//! engine's per-queue state machine ([`Queue`]) to metroblk-ublk's [`QueueTarget`].
//!
//! The engine's local file I/O and peer socket I/O go on libublk's queue ring through the
//! [`SqeSink`] (wrapped as the engine's [`Submitter`]); the engine's `user_data` is libublk's
//! target-I/O layout, so every engine completion comes back through
//! [`QueueTarget::complete`] untranslated. Nothing here allocates or locks per request.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use metroblk_ublk::{BlockIo, BlockOp, DeviceParams, QueueTarget, SqeSink};

use crate::config::VolumeConfig;
use crate::volume::ring::{Submitter, UD_ENGINE};
use crate::volume::{Queue, ReqKind, Request, MAX_IO_BYTES};

/// Target SQEs the engine can have in flight per request tag: its local I/O.
pub const ENGINE_SQES_PER_TAG: u16 = 1;
/// The same in zero copy: its local I/O and its frame's two linked sends (header, payload).
pub const ENGINE_SQES_PER_TAG_ZERO_COPY: u16 = 3;
/// Target SQEs the engine can have in flight per queue: a send and a receive on the peer
/// socket, the link hand-off eventfd read and the tick timeout.
pub const ENGINE_SQES_PER_QUEUE: u16 = 4;
/// The ublk target name (recorded in libublk's device file under /run/ublksrvd).
pub const TARGET_NAME: &str = "metroblk";
/// Largest READ/WRITE the device advertises. A WRITE is one peer frame, so it must stay
/// within the frame payload limit.
pub const MAX_REQUEST_BYTES: u32 = 512 << 10;
const _: () = assert!(MAX_REQUEST_BYTES <= MAX_IO_BYTES);

/// The engine's [`Submitter`] over the frontend's sink.
struct Sink<'a>(&'a mut dyn SqeSink);

impl Submitter for Sink<'_> {
    #[inline]
    fn push(&mut self, sqe: io_uring::squeue::Entry) {
        self.0.push(sqe)
    }

    fn submit_now(&mut self) {
        self.0.submit_now()
    }
}

/// One ublk queue's engine.
pub struct EngineQueue {
    queue: Queue,
}

impl EngineQueue {
    pub fn new(queue: Queue) -> EngineQueue {
        EngineQueue { queue }
    }
}

fn kind(op: BlockOp) -> ReqKind {
    match op {
        BlockOp::Read => ReqKind::Read,
        BlockOp::Write => ReqKind::Write,
        BlockOp::Flush => ReqKind::Flush,
        BlockOp::Discard => ReqKind::Discard,
        BlockOp::WriteZeroes => ReqKind::WriteZeroes,
    }
}

impl QueueTarget for EngineQueue {
    fn retire(self: Box<Self>) {
        self.queue.retire();
    }

    fn start(&mut self, sink: &mut dyn SqeSink) {
        self.queue.start(&mut Sink(sink));
    }

    fn submit(&mut self, sink: &mut dyn SqeSink, tag: u16, io: BlockIo) -> Result<(), i32> {
        // The queue moves a zero-copy request's data by its tag (`Queue`'s `zero_copy`).
        debug_assert!(io.buf_index.is_none() || (io.buf_index == Some(tag) && self.queue.zero_copy()));
        let req = Request { kind: kind(io.op), offset: io.offset, len: io.len, fua: io.fua, buf: io.buf };
        self.queue.submit(&mut Sink(sink), tag, req).map_err(|e| {
            tracing::debug!(tag, "request refused: {e}");
            e.errno()
        })
    }

    fn complete(
        &mut self,
        sink: &mut dyn SqeSink,
        user_data: u64,
        res: i32,
        cqe_flags: u32,
        done: &mut dyn FnMut(u16, i32),
    ) {
        debug_assert_ne!(user_data & UD_ENGINE, 0);
        self.queue.handle_completion(&mut Sink(sink), user_data, res, cqe_flags, &mut |tag, r| done(tag, r));
    }

    fn end_batch(&mut self, sink: &mut dyn SqeSink, done: &mut dyn FnMut(u16, i32)) {
        self.queue.end_batch(&mut Sink(sink), &mut |tag, r| done(tag, r));
    }
}

/// The ublk device parameters of a primary volume. `dev_id` is the configured `ublk_id`,
/// or the one recorded when the driver picked it, or -1.
pub fn device_params(cfg: &VolumeConfig, node_name: &str, dev_id: i32) -> DeviceParams {
    let mut p = DeviceParams::new(TARGET_NAME, cfg.size);
    p.dev_id = dev_id;
    p.logical_block = cfg.block_size;
    p.queues = cfg.queues;
    p.single_cpu_affinity = cfg.queue_affinity == crate::config::QueueAffinity::SingleCpu;
    p.depth = cfg.depth;
    p.io_scheduler = cfg.io_scheduler.clone();
    p.max_io_bytes = MAX_REQUEST_BYTES;
    p.owner_tag = owner_tag(cfg, node_name);
    // Zero copy only where the payload need not be read: the crc32c of a WRITE would take a
    // copy of it (`UBLK_F_USER_COPY`), which is what zero copy saves.
    p.zero_copy = !cfg.payload_checksum.sends_crc();
    p.target_sqes_per_tag = if p.zero_copy { ENGINE_SQES_PER_TAG_ZERO_COPY } else { ENGINE_SQES_PER_TAG };
    p.target_sqes_per_queue = ENGINE_SQES_PER_QUEUE;
    p
}

/// Marks a ublk device as this node's device of this volume, so that after a crash the
/// restarted daemon recovers its own device and never takes over another one with the same
/// id. FNV-1a of the volume uuid and the node name: stable across builds and restarts.
pub fn owner_tag(cfg: &VolumeConfig, node_name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cfg.uuid.as_bytes().iter().chain([0u8].iter()).chain(node_name.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // 0 is what a device created without a tag carries.
    h.max(1)
}

/// `<metadata_file>.ublk-id`: the ublk id the driver picked for this volume on this node.
pub fn ublk_id_file(cfg: &VolumeConfig) -> PathBuf {
    let mut name = cfg.metadata_file.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "metadata".into());
    name.push(".ublk-id");
    cfg.metadata_file.with_file_name(name)
}

/// The remembered id, or `None` when there is none yet.
pub fn read_ublk_id(path: &Path) -> Result<Option<i32>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
    };
    let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
    match line.parse::<i32>() {
        Ok(id) if id >= 0 => Ok(Some(id)),
        _ => Err(format!(
            "{}: '{line}' is not a ublk device id (delete the file to let the driver pick one)",
            path.display()
        )),
    }
}

/// Remembers `id` crash-safely (write a temporary file, fsync, rename, fsync the directory).
pub fn write_ublk_id(path: &Path, id: i32, volume: &str) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("{}: cannot record the ublk device id: {e}", path.display());
    let tmp = path.with_extension("ublk-id.tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(fail)?;
    writeln!(f, "# ublk device id of volume {volume} on this node; a restarted node recovers /dev/ublkb{id}")
        .and_then(|()| writeln!(f, "{id}"))
        .and_then(|()| f.sync_all())
        .map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_op_maps_to_its_engine_kind() {
        assert_eq!(kind(BlockOp::Read), ReqKind::Read);
        assert_eq!(kind(BlockOp::Write), ReqKind::Write);
        assert_eq!(kind(BlockOp::Flush), ReqKind::Flush);
        assert_eq!(kind(BlockOp::Discard), ReqKind::Discard);
        assert_eq!(kind(BlockOp::WriteZeroes), ReqKind::WriteZeroes);
    }

    #[test]
    fn ublk_id_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol0.meta.ublk-id");
        assert_eq!(read_ublk_id(&path).unwrap(), None);
        write_ublk_id(&path, 7, "vol0").unwrap();
        assert_eq!(read_ublk_id(&path).unwrap(), Some(7));
        std::fs::write(&path, "seven\n").unwrap();
        let e = read_ublk_id(&path).unwrap_err();
        assert!(e.contains("is not a ublk device id") && !e.contains('\n'), "{e}");
    }
}
