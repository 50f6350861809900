//! The metadata file (`metadata_file` in the config): a checksummed superblock and the on-disk
//! write-intent bitmap of one volume on one node.
//!
//! # Layout (all integers little-endian)
//!
//! | offset        | size            | what                                                   |
//! |---------------|-----------------|--------------------------------------------------------|
//! | 0             | 4096            | superblock slot 0                                      |
//! | 4096          | 4096            | superblock slot 1                                      |
//! | 8192          | `bitmap_bytes`  | the bitmap, in 4096-byte blocks; bit `r % 8` of byte   |
//! |               |                 | `r / 8` is region `r` (LSB first); padding bits are 0  |
//!
//! A slot holds a [`WireSuperblock`] (its size checked at compile time) followed by zeros; its
//! last field is the crc32c of the bytes before it.
//!
//! # Crash safety
//!
//! Assumption: a write that is cut short (crash, power loss) leaves every byte it covers either
//! old or new (real disks tear at sector granularity, and may land sectors in any order; the
//! tests cut at every byte and also mix old and new bytes at random, which covers both).
//!
//! - **Superblock**: two slots written alternately, each with a sequence number. An update
//!   writes the slot that does *not* hold the current state, with sequence + 1, then fdatasyncs.
//!   A torn slot fails its crc, so opening picks the other (old) slot; a complete one has the
//!   higher sequence and wins. The slot holding the current state is never written, so there is
//!   always one valid copy: every update leaves the old state or the new, never garbage.
//! - **Bitmap**: blocks carry no checksum, on purpose. A checksum would turn a torn block into
//!   an unreadable one, and the only safe reading of an unreadable bitmap block is "all dirty".
//!   Without one, a torn block write leaves each byte old or new, and therefore each *bit* old or
//!   new. Every block image we write is the in-memory bitmap, which (see `bitmap::WriteIntent`)
//!   always holds every bit that must stay set. So for each bit:
//!   - set in both the old and the new image (durable and still needed): set whatever tears;
//!   - being set (old 0, new 1): may stay 0 after a tear. Harmless: the writes that need it
//!     wait until the block write *and* its fdatasync completed, so none of them was issued;
//!   - being cleared (old 1, new 0): may stay 1 after a tear. Harmless: a bit is cleared only
//!     once both nodes have the region durably, so a leftover 1 costs one needless resync of
//!     the region and nothing else.
//!
//!   A torn bitmap write can thus only leave bits set or set them, never lose a bit that was
//!   durable before it. This holds for any mix of old and new bytes, so it does not depend on
//!   the order in which a disk lands its sectors.
//! - **Creation** (`create-md`) writes a temporary file next to the target, fsyncs it, then
//!   links (or with `--force` renames) it into place and fsyncs the directory: a crash leaves
//!   no file, the old file, or the complete new one.
//!
//! Updates of the superblock and of the bitmap are independent; where their order matters (for
//! example, the clean-shutdown flag is set only after the bitmap is written and synced) the
//! caller orders them, each call being durable when it returns.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bitvec::prelude::*;
use uuid::Uuid;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::config::{Role, MAX_REGION_SIZE, MIN_REGION_SIZE};
use metroblk_protocol::DiskState;

/// First eight bytes of each superblock slot.
pub const MAGIC: [u8; 8] = *b"MBLKMETA";
/// The on-disk format version this code writes and reads.
pub const VERSION: u32 = 1;
/// The unit of every metadata write: a superblock slot, a bitmap block.
pub const BLOCK_BYTES: usize = 4096;
/// Regions one bitmap block covers.
pub const REGIONS_PER_BLOCK: u64 = (BLOCK_BYTES * 8) as u64;
/// Where the bitmap starts: after the two superblock slots.
pub const BITMAP_OFFSET: u64 = 2 * BLOCK_BYTES as u64;
/// Earlier generations a superblock remembers (the design's "short history").
pub const HISTORY_MAX: usize = 8;
/// Longest node name (the config's limit).
pub const NODE_NAME_MAX: usize = 64;
/// Largest bitmap (64 MiB: 2^29 regions, 32 PiB at the default 64 KiB region size). It bounds
/// the memory the bitmap takes; a volume needing more must use a larger region size.
pub const BITMAP_BYTES_MAX: u64 = 64 << 20;

/// One superblock slot as it lies on disk.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct WireSuperblock {
    magic: [u8; 8],
    version: U32,
    /// Size of this struct: lets a reader check the slot before trusting any other field.
    sb_len: U32,
    seq: U64,
    volume_uuid: [u8; 16],
    size: U64,
    region_size: U64,
    bitmap_offset: U64,
    bitmap_bytes: U64,
    epoch: U64,
    generation: [u8; 16],
    history: [[u8; 16]; HISTORY_MAX],
    history_len: u8,
    disk_state: u8,
    /// [`PEER_UNKNOWN`] or a disk state.
    peer_disk_state: u8,
    clean_shutdown: u8,
    /// 1: the next resync to this node copies every region (`metroblk attach`).
    full_resync: u8,
    node_name_len: u8,
    node_name: [u8; NODE_NAME_MAX],
    /// [`ROLE_UNKNOWN`], or the role the witness last gave this node (0 primary, 1 secondary).
    role: u8,
    /// 1: this copy's changes are dropped at the next exchange (`resync --discard-local`).
    /// Was reserved (zero) before: older files read as 0.
    discard_local: u8,
    reserved: [u8; 84],
    crc: U32,
}

const SB_LEN: usize = 384;
const _: () = assert!(core::mem::size_of::<WireSuperblock>() == SB_LEN);
const _: () = assert!(SB_LEN <= BLOCK_BYTES);
const _: () = assert!(BLOCK_BYTES % 512 == 0);
const PEER_UNKNOWN: u8 = 0xFF;
/// Written by versions before the witness, and by `create-md`: the config's role applies.
const ROLE_UNKNOWN: u8 = 0;
const ROLE_PRIMARY: u8 = 1;
const ROLE_SECONDARY: u8 = 2;

/// What the superblock says, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub volume_uuid: Uuid,
    pub node_name: String,
    pub size: u64,
    pub region_size: u64,
    pub epoch: u64,
    /// The current generation: the line of data history this node's copy belongs to.
    pub generation: Uuid,
    /// Earlier generations, newest first; at most [`HISTORY_MAX`].
    pub history: Vec<Uuid>,
    pub disk_state: DiskState,
    /// The peer's disk state as this node last knew it; None: never known.
    pub peer_disk_state: Option<DiskState>,
    /// True when the node stopped cleanly (bitmap written, nothing in flight); false while it runs.
    pub clean_shutdown: bool,
    /// The next resync to this node copies every region: its disk was replaced or repaired
    /// after failing (`metroblk attach`). Cleared when that resync completes.
    pub full_resync: bool,
    /// The role the witness last gave this node (a promotion, a deposition); None: the
    /// config's preferred role applies.
    pub role: Option<Role>,
    /// An operator dropped this copy's changes (`resync --discard-local`): the next exchange
    /// resyncs it from the peer whatever the generations say. Cleared when that resync
    /// completes, so a restart in between does not forget the operator's decision.
    pub discard_local: bool,
}

impl Superblock {
    /// A fresh volume's superblock. Both nodes get the same initial generation (derived from the
    /// volume uuid), so two freshly created nodes see the same line of history and connect
    /// without a resync.
    pub fn new(volume_uuid: Uuid, node_name: &str, size: u64, region_size: u64) -> Superblock {
        Superblock {
            volume_uuid,
            node_name: node_name.to_string(),
            size,
            region_size,
            epoch: 0,
            generation: initial_generation(volume_uuid),
            history: Vec::new(),
            disk_state: DiskState::UpToDate,
            peer_disk_state: None,
            clean_shutdown: true,
            full_resync: false,
            role: None,
            discard_local: false,
        }
    }

    /// Starts a new generation: the current one goes to the head of the history (the oldest
    /// falls off past [`HISTORY_MAX`]).
    pub fn new_generation(&mut self, generation: Uuid) {
        self.history.insert(0, self.generation);
        self.history.truncate(HISTORY_MAX);
        self.generation = generation;
    }

    /// Regions of the volume (the last one may be partial).
    pub fn regions(&self) -> u64 {
        regions(self.size, self.region_size)
    }
}

/// The generation both nodes start a fresh volume in.
pub fn initial_generation(volume_uuid: Uuid) -> Uuid {
    Uuid::new_v5(&volume_uuid, b"metroblk initial generation")
}

/// Regions of a volume of `size` bytes.
pub fn regions(size: u64, region_size: u64) -> u64 {
    size.div_ceil(region_size)
}

/// Bitmap bytes on disk for `regions` regions: whole blocks.
pub fn bitmap_bytes(regions: u64) -> u64 {
    regions.div_ceil(REGIONS_PER_BLOCK) * BLOCK_BYTES as u64
}

/// The I/O the metadata file needs; a trait so tests can cut writes short.
pub trait MetaIo {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync(&mut self) -> io::Result<()>;
    /// The file's length.
    fn file_len(&mut self) -> io::Result<u64>;
}

impl MetaIo for std::fs::File {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
    fn file_len(&mut self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

/// Why a metadata file cannot be used: one line naming the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataError {
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for MetadataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for MetadataError {}

/// An opened file: the file, its current superblock and its bitmap (one bit per region).
pub type Opened<I> = (MetadataFile<I>, Superblock, BitVec<u8, Lsb0>);

/// What the opener expects the file to describe; anything else is a foreign file.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    pub volume_name: &'a str,
    pub volume_uuid: Uuid,
    pub node_name: &'a str,
    pub size: u64,
    pub region_size: u64,
    /// The config file, named in the hint of a "missing" error.
    pub config: &'a Path,
}

impl<'a> Expected<'a> {
    /// What volume `v` of node `node_name`'s config (`config`) expects.
    pub fn for_volume(v: &'a crate::config::VolumeConfig, node_name: &'a str, config: &'a Path) -> Expected<'a> {
        Expected {
            volume_name: &v.name,
            volume_uuid: v.uuid,
            node_name,
            size: v.size,
            region_size: v.region_size,
            config,
        }
    }
}

/// An open metadata file: the current superblock's sequence and slot, and the I/O.
pub struct MetadataFile<I: MetaIo> {
    io: I,
    path: PathBuf,
    /// Sequence number of the current superblock; the next update writes `seq + 1`.
    seq: u64,
    regions: u64,
}

impl<I: MetaIo> fmt::Debug for MetadataFile<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetadataFile").field("path", &self.path).field("seq", &self.seq).finish()
    }
}

/// Checks that a geometry can have a metadata file; the message names what to change.
pub fn check_geometry(size: u64, region_size: u64) -> Result<(), String> {
    if !region_size.is_power_of_two() || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size) {
        return Err(format!("region size {region_size} is not a power of two between 4KiB and 64MiB"));
    }
    if size == 0 {
        return Err("volume size 0".into());
    }
    let bytes = bitmap_bytes(regions(size, region_size));
    if bytes > BITMAP_BYTES_MAX {
        return Err(format!(
            "a {size}-byte volume at region size {region_size} needs a {bytes}-byte bitmap, above the limit of \
             {BITMAP_BYTES_MAX}; use a larger region_size"
        ));
    }
    Ok(())
}

fn encode(sb: &Superblock, seq: u64) -> [u8; BLOCK_BYTES] {
    assert!(sb.history.len() <= HISTORY_MAX, "history is bounded");
    assert!(sb.node_name.len() <= NODE_NAME_MAX, "node name is bounded by the config");
    let regions = sb.regions();
    let mut history = [[0u8; 16]; HISTORY_MAX];
    for (h, g) in history.iter_mut().zip(&sb.history) {
        *h = g.into_bytes();
    }
    let mut node_name = [0u8; NODE_NAME_MAX];
    node_name[..sb.node_name.len()].copy_from_slice(sb.node_name.as_bytes());
    let mut w = WireSuperblock {
        magic: MAGIC,
        version: U32::new(VERSION),
        sb_len: U32::new(SB_LEN as u32),
        seq: U64::new(seq),
        volume_uuid: sb.volume_uuid.into_bytes(),
        size: U64::new(sb.size),
        region_size: U64::new(sb.region_size),
        bitmap_offset: U64::new(BITMAP_OFFSET),
        bitmap_bytes: U64::new(bitmap_bytes(regions)),
        epoch: U64::new(sb.epoch),
        generation: sb.generation.into_bytes(),
        history,
        history_len: sb.history.len() as u8,
        disk_state: sb.disk_state.code(),
        peer_disk_state: sb.peer_disk_state.map(DiskState::code).unwrap_or(PEER_UNKNOWN),
        clean_shutdown: sb.clean_shutdown as u8,
        full_resync: sb.full_resync as u8,
        discard_local: sb.discard_local as u8,
        node_name_len: sb.node_name.len() as u8,
        node_name,
        role: match sb.role {
            None => ROLE_UNKNOWN,
            Some(Role::Primary) => ROLE_PRIMARY,
            Some(Role::Secondary) => ROLE_SECONDARY,
        },
        reserved: [0; 84],
        crc: U32::new(0),
    };
    w.crc = U32::new(crc32c::crc32c(&w.as_bytes()[..SB_LEN - 4]));
    let mut out = [0u8; BLOCK_BYTES];
    out[..SB_LEN].copy_from_slice(w.as_bytes());
    out
}

/// What one slot holds.
enum Slot {
    /// Not a metroblk superblock at all.
    NoMagic,
    /// The magic is there but the checksum does not match (torn or damaged).
    BadCrc,
    /// Checksummed, but from a version we do not read.
    Version(u32),
    /// Checksummed, but its fields make no sense (written by a buggy or hostile writer).
    Invalid(String),
    Valid(u64, Superblock),
}

fn decode(buf: &[u8; BLOCK_BYTES]) -> Slot {
    let Ok((w, _)) = WireSuperblock::read_from_prefix(&buf[..]) else {
        return Slot::NoMagic; // unreachable: the buffer is larger than the struct
    };
    if w.magic != MAGIC {
        return Slot::NoMagic;
    }
    if w.sb_len.get() as usize != SB_LEN || crc32c::crc32c(&buf[..SB_LEN - 4]) != w.crc.get() {
        // A later version may have a longer superblock; its crc then covers other bytes.
        if w.version.get() != VERSION && w.version.get() != 0 {
            return Slot::Version(w.version.get());
        }
        return Slot::BadCrc;
    }
    if w.version.get() != VERSION {
        return Slot::Version(w.version.get());
    }
    let size = w.size.get();
    let region_size = w.region_size.get();
    if let Err(m) = check_geometry(size, region_size) {
        return Slot::Invalid(m);
    }
    if w.bitmap_offset.get() != BITMAP_OFFSET || w.bitmap_bytes.get() != bitmap_bytes(regions(size, region_size)) {
        return Slot::Invalid("bitmap offset or length does not match the volume's geometry".into());
    }
    let history_len = w.history_len as usize;
    if history_len > HISTORY_MAX {
        return Slot::Invalid(format!("history of {history_len} generations (at most {HISTORY_MAX})"));
    }
    let Some(disk_state) = DiskState::from_code(w.disk_state) else {
        return Slot::Invalid(format!("unknown disk state {}", w.disk_state));
    };
    let peer_disk_state = match w.peer_disk_state {
        PEER_UNKNOWN => None,
        v => match DiskState::from_code(v) {
            Some(s) => Some(s),
            None => return Slot::Invalid(format!("unknown peer disk state {v}")),
        },
    };
    if w.clean_shutdown > 1 {
        return Slot::Invalid(format!("clean-shutdown flag {}", w.clean_shutdown));
    }
    if w.full_resync > 1 {
        return Slot::Invalid(format!("full-resync flag {}", w.full_resync));
    }
    if w.discard_local > 1 {
        return Slot::Invalid(format!("discard-local flag {}", w.discard_local));
    }
    let role = match w.role {
        ROLE_UNKNOWN => None,
        ROLE_PRIMARY => Some(Role::Primary),
        ROLE_SECONDARY => Some(Role::Secondary),
        v => return Slot::Invalid(format!("unknown role {v}")),
    };
    let name_len = w.node_name_len as usize;
    let node_name = match w.node_name.get(..name_len).map(std::str::from_utf8) {
        Some(Ok(n)) => n.to_string(),
        _ => return Slot::Invalid("node name is not text".into()),
    };
    Slot::Valid(
        w.seq.get(),
        Superblock {
            volume_uuid: Uuid::from_bytes(w.volume_uuid),
            node_name,
            size,
            region_size,
            epoch: w.epoch.get(),
            generation: Uuid::from_bytes(w.generation),
            history: w.history[..history_len].iter().map(|b| Uuid::from_bytes(*b)).collect(),
            disk_state,
            peer_disk_state,
            clean_shutdown: w.clean_shutdown == 1,
            full_resync: w.full_resync == 1,
            role,
            discard_local: w.discard_local == 1,
        },
    )
}

impl<I: MetaIo> MetadataFile<I> {
    fn err(&self, message: String) -> MetadataError {
        MetadataError { path: self.path.clone(), message }
    }

    /// Writes a fresh metadata file into `io` (expected empty): a zero bitmap, then both slots
    /// (sequence 1 and 2, same content), so one damaged slot is survived from the start.
    pub fn format(mut io: I, path: &Path, sb: &Superblock) -> Result<MetadataFile<I>, MetadataError> {
        let e = |m: String| MetadataError { path: path.to_path_buf(), message: m };
        check_geometry(sb.size, sb.region_size).map_err(e)?;
        let regions = sb.regions();
        let zero = [0u8; BLOCK_BYTES];
        let blocks = bitmap_bytes(regions) / BLOCK_BYTES as u64;
        for b in 0..blocks {
            io.write_at(BITMAP_OFFSET + b * BLOCK_BYTES as u64, &zero).map_err(|x| e(format!("write: {x}")))?;
        }
        io.write_at(0, &encode(sb, 1)).map_err(|x| e(format!("write: {x}")))?;
        io.write_at(BLOCK_BYTES as u64, &encode(sb, 2)).map_err(|x| e(format!("write: {x}")))?;
        io.sync().map_err(|x| e(format!("fdatasync: {x}")))?;
        Ok(MetadataFile { io, path: path.to_path_buf(), seq: 2, regions })
    }

    /// Opens a metadata file: picks the valid slot with the highest sequence, checks that it
    /// describes the expected volume and node, and reads the bitmap. Every refusal is one line
    /// naming the file and what is wrong. Nothing in the file's bytes can make it panic.
    pub fn open(mut io: I, path: &Path, expect: &Expected) -> Result<Opened<I>, MetadataError> {
        let e = |m: String| MetadataError { path: path.to_path_buf(), message: m };
        let len = io.file_len().map_err(|x| e(format!("cannot stat: {x}")))?;
        let mut slots = Vec::with_capacity(2);
        for i in 0..2u64 {
            let mut buf = [0u8; BLOCK_BYTES];
            let off = i * BLOCK_BYTES as u64;
            if len >= off + BLOCK_BYTES as u64 {
                io.read_at(off, &mut buf).map_err(|x| e(format!("read: {x}")))?;
                slots.push(decode(&buf));
            } else {
                slots.push(Slot::NoMagic);
            }
        }
        let mut best: Option<(u64, Superblock)> = None;
        for s in &slots {
            if let Slot::Valid(seq, sb) = s {
                if best.as_ref().is_none_or(|(b, _)| seq > b) {
                    best = Some((*seq, sb.clone()));
                }
            }
        }
        let Some((seq, sb)) = best else {
            // No valid copy: say the most specific thing.
            for s in &slots {
                if let Slot::Version(v) = s {
                    return Err(e(format!(
                        "written by metadata format version {v}; this metroblk reads version {VERSION}"
                    )));
                }
            }
            for s in &slots {
                if let Slot::Invalid(m) = s {
                    return Err(e(format!("corrupt superblock ({m}); restore it or run metroblk create-md --force")));
                }
            }
            if slots.iter().all(|s| matches!(s, Slot::NoMagic)) {
                return Err(e(if len == 0 {
                    "empty file, not a metroblk metadata file; run metroblk create-md --force".into()
                } else {
                    "not a metroblk metadata file (no superblock magic); run metroblk create-md --force if it \
                     may be overwritten"
                        .into()
                }));
            }
            return Err(e(
                "corrupt superblock (checksum mismatch in both copies); restore it or run metroblk create-md --force"
                    .into(),
            ));
        };
        if sb.volume_uuid != expect.volume_uuid {
            return Err(e(format!(
                "belongs to volume {} (this volume, {}, is {})",
                sb.volume_uuid, expect.volume_name, expect.volume_uuid
            )));
        }
        if sb.size != expect.size {
            return Err(e(format!("is for a volume of {} bytes (this volume is {} bytes)", sb.size, expect.size)));
        }
        if sb.region_size != expect.region_size {
            return Err(e(format!(
                "has region size {} (the config says {}); recreate it with metroblk create-md --force and resync",
                sb.region_size, expect.region_size
            )));
        }
        if sb.node_name != expect.node_name {
            return Err(e(format!(
                "belongs to node {} (this node is {}); is it the peer's file?",
                sb.node_name, expect.node_name
            )));
        }
        let regions = sb.regions();
        let need = BITMAP_OFFSET + bitmap_bytes(regions);
        if len < need {
            return Err(e(format!(
                "truncated: {len} bytes, the bitmap needs {need}; restore it or run metroblk create-md --force"
            )));
        }
        let mut bits: BitVec<u8, Lsb0> = BitVec::repeat(false, (bitmap_bytes(regions) * 8) as usize);
        io.read_at(BITMAP_OFFSET, bits.as_raw_mut_slice()).map_err(|x| e(format!("read: {x}")))?;
        // Padding bits past the last region mean nothing; drop them.
        bits.truncate(regions as usize);
        Ok((MetadataFile { io, path: path.to_path_buf(), seq, regions }, sb, bits))
    }

    /// Makes `sb` the current superblock, durably: writes the slot not holding the current one
    /// with the next sequence number, then fdatasyncs. On error the file still opens to the
    /// previous state or to `sb` (see the module doc).
    pub fn write_superblock(&mut self, sb: &Superblock) -> Result<(), MetadataError> {
        assert_eq!(sb.regions(), self.regions, "the geometry of an open metadata file never changes");
        let seq = self.seq + 1;
        // Slot of sequence s is s % 2: the current one (seq) is in the other slot.
        let off = (seq % 2) * BLOCK_BYTES as u64;
        self.io.write_at(off, &encode(sb, seq)).map_err(|x| self.err(format!("write superblock: {x}")))?;
        self.io.sync().map_err(|x| self.err(format!("fdatasync: {x}")))?;
        self.seq = seq;
        Ok(())
    }

    /// Writes one bitmap block (not yet durable: call [`Self::sync`] after a batch). The image
    /// must hold every bit that must stay set (module doc).
    pub fn write_bitmap_block(&mut self, block: u64, data: &[u8]) -> Result<(), MetadataError> {
        assert!(block < self.bitmap_blocks(), "block {block} past the bitmap");
        assert_eq!(data.len(), BLOCK_BYTES);
        self.io
            .write_at(BITMAP_OFFSET + block * BLOCK_BYTES as u64, data)
            .map_err(|x| self.err(format!("write bitmap block {block}: {x}")))
    }

    /// fdatasync: every bitmap block written so far is durable when it returns Ok.
    pub fn sync(&mut self) -> Result<(), MetadataError> {
        self.io.sync().map_err(|x| self.err(format!("fdatasync: {x}")))
    }

    /// Blocks of the bitmap on disk.
    pub fn bitmap_blocks(&self) -> u64 {
        bitmap_bytes(self.regions) / BLOCK_BYTES as u64
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the I/O back (tests inspect what was written).
    pub fn into_io(self) -> I {
        self.io
    }
}

/// Opens the metadata file at `path` for reading and writing; a missing file is refused with
/// the command that creates it.
pub fn open_file(path: &Path, expect: &Expected) -> Result<Opened<std::fs::File>, MetadataError> {
    let file = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(x) if x.kind() == io::ErrorKind::NotFound => {
            return Err(MetadataError {
                path: path.to_path_buf(),
                message: format!(
                    "missing; create it with metroblk create-md --config {} {}",
                    expect.config.display(),
                    expect.volume_name
                ),
            })
        }
        Err(x) => return Err(MetadataError { path: path.to_path_buf(), message: format!("cannot open: {x}") }),
    };
    MetadataFile::open(file, path, expect)
}

/// Creates the metadata file at `path` (mode 0600), crash-safely: a temporary file next to it is
/// written and synced, then linked into place (refused if `path` exists) or, with `force`,
/// renamed over it; then the directory is synced.
pub fn create_file(path: &Path, sb: &Superblock, force: bool) -> Result<(), MetadataError> {
    let e = |m: String| MetadataError { path: path.to_path_buf(), message: m };
    check_geometry(sb.size, sb.region_size).map_err(e)?;
    if !force && std::fs::symlink_metadata(path).is_ok() {
        return Err(e("exists; refusing to overwrite it (it may hold the bitmap of data not yet resynced); \
             use --force to replace it"
            .into()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| e("is not a file path".into()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".create-md.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|x| e(format!("cannot create {}: {x}", tmp.display())))?;
        MetadataFile::format(file, path, sb)?;
        if force {
            std::fs::rename(&tmp, path).map_err(|x| e(format!("cannot rename {} into place: {x}", tmp.display())))?;
        } else {
            // link() fails if the target exists, so a file created meanwhile is never clobbered.
            std::fs::hard_link(&tmp, path).map_err(|x| {
                if x.kind() == io::ErrorKind::AlreadyExists {
                    e("exists; refusing to overwrite it; use --force to replace it".into())
                } else {
                    e(format!("cannot link {} into place: {x}", tmp.display()))
                }
            })?;
            std::fs::remove_file(&tmp).map_err(|x| e(format!("cannot remove {}: {x}", tmp.display())))?;
        }
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|x| e(format!("cannot sync directory {}: {x}", dir.display())))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;

/// `metroblk create-md`: initialises the metadata file of volume `volume` of a node config.
pub fn create_md_command(config: &Path, volume: &str, force: bool) -> Result<String, String> {
    let cfg = crate::config::NodeConfig::load_with(config, crate::config::Keys::Skip).map_err(|e| e.to_string())?;
    let v = cfg.volumes.iter().find(|v| v.name == volume).ok_or_else(|| {
        let names: Vec<&str> = cfg.volumes.iter().map(|v| v.name.as_str()).collect();
        format!("{}: no volume '{volume}' (it configures: {})", config.display(), names.join(", "))
    })?;
    let sb = Superblock::new(v.uuid, &cfg.name, v.size, v.region_size);
    create_file(&v.metadata_file, &sb, force).map_err(|e| e.to_string())?;
    Ok(format!(
        "{}: metadata of volume {} on node {} created: {} regions of {} bytes, generation {}",
        v.metadata_file.display(),
        v.name,
        cfg.name,
        sb.regions(),
        v.region_size,
        sb.generation
    ))
}

/// `metroblk attach`: a node whose disk failed (and was repaired or replaced) takes part
/// again: its copy is marked `inconsistent`, to be resynced in full from the peer when the
/// node next runs. Offline: the node must be stopped (its disk state is latched in memory).
pub fn attach_command(config: &Path, volume: &str) -> Result<String, String> {
    let cfg = crate::config::NodeConfig::load_with(config, crate::config::Keys::Skip).map_err(|e| e.to_string())?;
    let v = cfg.volumes.iter().find(|v| v.name == volume).ok_or_else(|| {
        let names: Vec<&str> = cfg.volumes.iter().map(|v| v.name.as_str()).collect();
        format!("{}: no volume '{volume}' (it configures: {})", config.display(), names.join(", "))
    })?;
    if std::os::unix::net::UnixStream::connect(&cfg.control_socket).is_ok() {
        return Err(format!(
            "node {} is running (its control socket {} answers); stop it first, then attach",
            cfg.name,
            cfg.control_socket.display()
        ));
    }
    // The backing file must be usable again: open it as the node will, and read it.
    let file = crate::backing::open(v).map_err(|e| e.to_string())?;
    let mut block = vec![0u8; 4096.min(v.size as usize)];
    FileExt::read_exact_at(&file, &mut block, 0)
        .map_err(|e| format!("{}: still unreadable: {e}", v.backing_file.display()))?;
    let expect = Expected::for_volume(v, &cfg.name, config);
    let (mut md, mut sb, _) = open_file(&v.metadata_file, &expect).map_err(|e| e.to_string())?;
    sb.disk_state = DiskState::Inconsistent;
    sb.full_resync = true;
    md.write_superblock(&sb).map_err(|e| e.to_string())?;
    Ok(format!(
        "volume {} on node {}: disk attached; its copy is inconsistent until a full resync from the peer \
         completes (start the node as the secondary)",
        v.name, cfg.name
    ))
}
