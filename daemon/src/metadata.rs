//! The metadata file of a volume on one node: a checksummed superblock and the dirty bitmap.
//!
//! Layout (little endian):
//!
//! ```text
//! offset 0      superblock slot 0 (4 KiB)
//! offset 4096   superblock slot 1 (4 KiB)
//! offset 8192   bitmap: one bit per region, bit r of byte r/8 (LSB first), padded to 4 KiB
//! ```
//!
//! Crash safety:
//! - **Superblock:** updates alternate between the two slots, each carrying a sequence number
//!   and a crc32c over its bytes; opening takes the valid slot with the highest sequence. A
//!   torn or lost write damages only the slot being written, whose crc then fails (or which
//!   still holds its older, valid contents), so the other slot — the previous state — wins:
//!   after a crash the superblock is the old or the new one, never a mix.
//! - **Bitmap:** a block is rewritten in place. Bits are set durably before the writes to their
//!   regions are issued, and cleared only once both nodes have the region. Between two states a
//!   block's new bytes are a superset of the durable old bits (a set) or a subset (a clear). A
//!   torn write leaves each byte old or new: after a set every durably set bit is still set
//!   (the bits being set belong to writes not yet issued); after a clear a bit may stay set,
//!   which costs one region of extra resync and loses nothing.
//!
//! A file is refused with one clear line when it is missing (create it with `metroblk create-md`),
//! belongs to another volume (uuid, size or region size differ), or is corrupt (no valid slot).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::config::VolumeConfig;
use crate::volume::disk::DiskState;

pub const META_MAGIC: [u8; 8] = *b"MBLKMETA";
pub const META_VERSION: u32 = 1;
/// Size of one superblock slot and the bitmap's alignment.
pub const META_BLOCK: u64 = 4096;
/// Earlier generations kept (design: "a short history").
pub const GENERATION_HISTORY_MAX: usize = 8;
const NODE_NAME_MAX: usize = 64;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone)]
#[repr(C)]
struct WireSuper {
    magic: [u8; 8],
    version: U32,
    _pad0: [u8; 4],
    seq: U64,
    volume_uuid: [u8; 16],
    node_name: [u8; NODE_NAME_MAX],
    volume_size: U64,
    region_size: U64,
    epoch: U64,
    generation: [u8; 16],
    history: [[u8; 16]; GENERATION_HISTORY_MAX],
    history_len: U32,
    disk_state: u8,
    peer_disk_state: u8,
    clean_shutdown: u8,
    _pad1: u8,
    /// crc32c of every byte above.
    crc: U32,
}

const SUPER_LEN: usize = core::mem::size_of::<WireSuper>();
const _: () = assert!(SUPER_LEN == 284);
const _: () = assert!(SUPER_LEN as u64 <= META_BLOCK);

/// What the superblock records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub volume_uuid: uuid::Uuid,
    pub node_name: String,
    pub volume_size: u64,
    pub region_size: u64,
    pub epoch: u64,
    pub generation: uuid::Uuid,
    /// Earlier generations, newest first.
    pub history: Vec<uuid::Uuid>,
    pub disk_state: DiskState,
    pub peer_disk_state: DiskState,
    pub clean_shutdown: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    #[error("{path}: missing; create it with `metroblk create-md --config FILE {volume}`")]
    Missing { path: String, volume: String },
    #[error("{path}: already exists; `metroblk create-md --force` overwrites it (and forgets what it records)")]
    Exists { path: String },
    #[error("{path}: belongs to another volume: {what}")]
    Foreign { path: String, what: String },
    #[error(
        "{path}: corrupt: {what}; restore it, or recreate it with `metroblk create-md --force` (a full resync follows)"
    )]
    Corrupt { path: String, what: String },
    #[error("{path}: {what}")]
    Io { path: String, what: String },
}

fn disk_state_to_u8(s: DiskState) -> u8 {
    match s {
        DiskState::UpToDate => 0,
        DiskState::Outdated => 1,
        DiskState::Inconsistent => 2,
        DiskState::Failed => 3,
    }
}

fn disk_state_from_u8(v: u8) -> Option<DiskState> {
    Some(match v {
        0 => DiskState::UpToDate,
        1 => DiskState::Outdated,
        2 => DiskState::Inconsistent,
        3 => DiskState::Failed,
        _ => return None,
    })
}

impl Superblock {
    /// The superblock of a freshly created volume on this node.
    pub fn new(cfg: &VolumeConfig, node_name: &str) -> Superblock {
        Superblock {
            volume_uuid: cfg.uuid,
            node_name: node_name.to_string(),
            volume_size: cfg.size,
            region_size: cfg.region_size,
            epoch: 1,
            generation: uuid::Uuid::new_v4(),
            history: Vec::new(),
            disk_state: DiskState::UpToDate,
            peer_disk_state: DiskState::UpToDate,
            clean_shutdown: true,
        }
    }

    fn encode(&self, seq: u64) -> [u8; META_BLOCK as usize] {
        assert!(self.history.len() <= GENERATION_HISTORY_MAX);
        let mut name = [0u8; NODE_NAME_MAX];
        let n = self.node_name.len().min(NODE_NAME_MAX);
        name[..n].copy_from_slice(&self.node_name.as_bytes()[..n]);
        let mut history = [[0u8; 16]; GENERATION_HISTORY_MAX];
        for (h, g) in history.iter_mut().zip(&self.history) {
            *h = *g.as_bytes();
        }
        let mut w = WireSuper {
            magic: META_MAGIC,
            version: U32::new(META_VERSION),
            _pad0: [0; 4],
            seq: U64::new(seq),
            volume_uuid: *self.volume_uuid.as_bytes(),
            node_name: name,
            volume_size: U64::new(self.volume_size),
            region_size: U64::new(self.region_size),
            epoch: U64::new(self.epoch),
            generation: *self.generation.as_bytes(),
            history,
            history_len: U32::new(self.history.len() as u32),
            disk_state: disk_state_to_u8(self.disk_state),
            peer_disk_state: disk_state_to_u8(self.peer_disk_state),
            clean_shutdown: self.clean_shutdown as u8,
            _pad1: 0,
            crc: U32::new(0),
        };
        w.crc = U32::new(crc32c::crc32c(&w.as_bytes()[..SUPER_LEN - 4]));
        let mut block = [0u8; META_BLOCK as usize];
        block[..SUPER_LEN].copy_from_slice(w.as_bytes());
        block
    }

    /// Decodes a slot; None when it is not a valid superblock (torn, never written, garbage).
    fn decode(block: &[u8]) -> Option<(u64, Superblock)> {
        let w = WireSuper::read_from_bytes(block.get(..SUPER_LEN)?).ok()?;
        if w.magic != META_MAGIC || crc32c::crc32c(&w.as_bytes()[..SUPER_LEN - 4]) != w.crc.get() {
            return None;
        }
        if w.version.get() != META_VERSION {
            return None;
        }
        let history_len = w.history_len.get() as usize;
        if history_len > GENERATION_HISTORY_MAX {
            return None;
        }
        let end = w.node_name.iter().position(|&b| b == 0).unwrap_or(NODE_NAME_MAX);
        let sb = Superblock {
            volume_uuid: uuid::Uuid::from_bytes(w.volume_uuid),
            node_name: String::from_utf8_lossy(&w.node_name[..end]).into_owned(),
            volume_size: w.volume_size.get(),
            region_size: w.region_size.get(),
            epoch: w.epoch.get(),
            generation: uuid::Uuid::from_bytes(w.generation),
            history: w.history[..history_len].iter().map(|b| uuid::Uuid::from_bytes(*b)).collect(),
            disk_state: disk_state_from_u8(w.disk_state)?,
            peer_disk_state: disk_state_from_u8(w.peer_disk_state)?,
            clean_shutdown: w.clean_shutdown != 0,
        };
        Some((w.seq.get(), sb))
    }
}

/// An open metadata file.
pub struct MetadataFile {
    path: PathBuf,
    file: File,
    seq: u64,
    sb: Superblock,
    regions: u64,
}

/// Regions of a volume (the bitmap's length in bits).
pub fn regions_of(volume_size: u64, region_size: u64) -> u64 {
    volume_size.div_ceil(region_size)
}

fn bitmap_bytes(regions: u64) -> u64 {
    regions.div_ceil(8).div_ceil(META_BLOCK) * META_BLOCK
}

impl MetadataFile {
    /// Creates the metadata file of `cfg` on this node (mode 0600): a new generation, disk
    /// `up-to-date`, an empty bitmap. Refuses to overwrite one unless `force`.
    pub fn create(cfg: &VolumeConfig, node_name: &str, force: bool) -> Result<MetadataFile, MetadataError> {
        let path = cfg.metadata_file.clone();
        let io = |e: std::io::Error| MetadataError::Io { path: path.display().to_string(), what: e.to_string() };
        let mut opts = OpenOptions::new();
        opts.read(true).write(true).mode(0o600);
        if force {
            opts.create(true).truncate(true);
        } else {
            opts.create_new(true);
        }
        let file = opts.open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                MetadataError::Exists { path: path.display().to_string() }
            } else {
                io(e)
            }
        })?;
        let regions = regions_of(cfg.size, cfg.region_size);
        file.set_len(2 * META_BLOCK + bitmap_bytes(regions)).map_err(io)?;
        let sb = Superblock::new(cfg, node_name);
        // Both slots, so that a later torn update always has a valid other slot.
        file.write_all_at(&sb.encode(1), 0).map_err(io)?;
        file.write_all_at(&sb.encode(2), META_BLOCK).map_err(io)?;
        file.sync_all().map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(MetadataFile { path, file, seq: 2, sb, regions })
    }

    /// Opens the metadata file of `cfg`, refusing a missing, foreign or corrupt one.
    pub fn open(cfg: &VolumeConfig) -> Result<MetadataFile, MetadataError> {
        let path = cfg.metadata_file.clone();
        let shown = path.display().to_string();
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MetadataError::Missing { path: shown, volume: cfg.name.clone() })
            }
            Err(e) => return Err(MetadataError::Io { path: shown, what: e.to_string() }),
        };
        let mut slots = [[0u8; META_BLOCK as usize]; 2];
        for (i, s) in slots.iter_mut().enumerate() {
            // A short file leaves zeros, which decode as invalid.
            let _ = file.read_at(s, i as u64 * META_BLOCK);
        }
        let best = slots.iter().filter_map(|s| Superblock::decode(s)).max_by_key(|(seq, _)| *seq);
        let Some((seq, sb)) = best else {
            return Err(MetadataError::Corrupt {
                path: shown,
                what: "no valid superblock (bad magic or checksum in both copies)".into(),
            });
        };
        let foreign = |what: String| MetadataError::Foreign { path: shown.clone(), what };
        if sb.volume_uuid != cfg.uuid {
            return Err(foreign(format!("volume uuid {} (this volume is {})", sb.volume_uuid, cfg.uuid)));
        }
        if sb.volume_size != cfg.size {
            return Err(foreign(format!("volume size {} bytes (this volume is {} bytes)", sb.volume_size, cfg.size)));
        }
        if sb.region_size != cfg.region_size {
            return Err(foreign(format!(
                "region size {} bytes (this volume's is {} bytes)",
                sb.region_size, cfg.region_size
            )));
        }
        let regions = regions_of(cfg.size, cfg.region_size);
        let len = file.metadata().map_err(|e| MetadataError::Io { path: shown.clone(), what: e.to_string() })?.len();
        if len < 2 * META_BLOCK + bitmap_bytes(regions) {
            return Err(MetadataError::Corrupt {
                path: shown,
                what: format!("{len} bytes, too short for the bitmap of {regions} regions"),
            });
        }
        Ok(MetadataFile { path, file, seq, sb, regions })
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Writes `sb` crash-safely (the other slot, then fdatasync): after a crash the file holds
    /// the previous superblock or this one.
    pub fn update(&mut self, sb: Superblock) -> Result<(), MetadataError> {
        assert_eq!(sb.volume_uuid, self.sb.volume_uuid, "a superblock update never changes the volume");
        let seq = self.seq + 1;
        let slot = seq % 2;
        let io = |e: std::io::Error| MetadataError::Io { path: self.path.display().to_string(), what: e.to_string() };
        self.file.write_all_at(&sb.encode(seq), slot * META_BLOCK).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.seq = seq;
        self.sb = sb;
        Ok(())
    }

    /// Reads the whole bitmap (bit r = region r dirty).
    pub fn read_bitmap(&self) -> Result<Vec<u8>, MetadataError> {
        let mut bytes = vec![0u8; self.regions.div_ceil(8) as usize];
        self.file
            .read_exact_at(&mut bytes, 2 * META_BLOCK)
            .map_err(|e| MetadataError::Io { path: self.path.display().to_string(), what: e.to_string() })?;
        Ok(bytes)
    }

    /// Writes the bitmap blocks that hold bytes `[first, first + bytes.len())` of it, then
    /// fdatasync: one metadata write for a whole group of bit changes.
    pub fn write_bitmap(&mut self, first: u64, bytes: &[u8]) -> Result<(), MetadataError> {
        assert!(first + bytes.len() as u64 <= self.regions.div_ceil(8), "bitmap write past its end");
        let io = |e: std::io::Error| MetadataError::Io { path: self.path.display().to_string(), what: e.to_string() };
        self.file.write_all_at(bytes, 2 * META_BLOCK + first).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

/// `metroblk create-md`: initialises the metadata file of volume `volume` of a node config.
pub fn create_md_command(config: &Path, volume: &str, force: bool) -> Result<String, String> {
    let cfg = crate::config::NodeConfig::load_with(config, crate::config::Keys::Skip).map_err(|e| e.to_string())?;
    let v = cfg.volumes.iter().find(|v| v.name == volume).ok_or_else(|| {
        let names: Vec<&str> = cfg.volumes.iter().map(|v| v.name.as_str()).collect();
        format!("{}: no volume '{volume}' (it configures: {})", config.display(), names.join(", "))
    })?;
    let md = MetadataFile::create(v, &cfg.name, force).map_err(|e| e.to_string())?;
    Ok(format!(
        "{}: metadata of volume {} on node {} created: {} regions of {} bytes, generation {}",
        v.metadata_file.display(),
        v.name,
        cfg.name,
        md.regions(),
        v.region_size,
        md.superblock().generation
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> VolumeConfig {
        let key = dir.join("key");
        std::fs::write(&key, "0123456789abcdef0123").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let text = r#"
[node]
name = "alpha"
control_socket = "alpha.sock"
[[volume]]
name = "vol0"
size = "64MiB"
backing_file = "vol0.img"
metadata_file = "vol0.meta"
listen = "127.0.0.1:7789"
role = "primary"
[volume.peer]
name = "beta"
address = "127.0.0.1:7790"
authkey_file = "key"
"#;
        crate::config::NodeConfig::parse(&dir.join("alpha.toml"), text).unwrap().volumes.remove(0)
    }

    #[test]
    fn create_open_update_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let e = MetadataFile::open(&c).err().unwrap().to_string();
        assert!(e.ends_with("vol0.meta: missing; create it with `metroblk create-md --config FILE vol0`"), "{e}");
        let mut md = MetadataFile::create(&c, "alpha", false).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&c.metadata_file).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(MetadataFile::create(&c, "alpha", false), Err(MetadataError::Exists { .. })));
        assert_eq!(md.regions(), 1024);
        let mut sb = md.superblock().clone();
        sb.epoch = 7;
        sb.history.insert(0, sb.generation);
        sb.generation = uuid::Uuid::new_v4();
        sb.disk_state = DiskState::Outdated;
        sb.clean_shutdown = false;
        md.update(sb.clone()).unwrap();
        md.write_bitmap(3, &[0b1010_0001]).unwrap();
        drop(md);
        let md = MetadataFile::open(&c).unwrap();
        assert_eq!(md.superblock(), &sb);
        assert_eq!(md.read_bitmap().unwrap()[3], 0b1010_0001);

        // Foreign: another size, region size or uuid.
        for (edit, want) in [
            (Box::new(|c: &mut VolumeConfig| c.size = 128 << 20) as Box<dyn Fn(&mut VolumeConfig)>, "volume size"),
            (Box::new(|c: &mut VolumeConfig| c.region_size = 128 << 10), "region size"),
            (Box::new(|c: &mut VolumeConfig| c.uuid = uuid::Uuid::new_v4()), "volume uuid"),
        ] {
            let mut other = c.clone();
            edit(&mut other);
            let e = MetadataFile::open(&other).err().unwrap().to_string();
            assert!(e.contains("belongs to another volume: ") && e.contains(want), "{e}");
        }
        // Corrupt: both slots damaged.
        let f = OpenOptions::new().write(true).open(&c.metadata_file).unwrap();
        f.write_all_at(&[0xFF; 16], 100).unwrap();
        f.write_all_at(&[0xFF; 16], META_BLOCK + 100).unwrap();
        let e = MetadataFile::open(&c).err().unwrap().to_string();
        assert!(e.contains("corrupt: no valid superblock"), "{e}");
        assert!(!e.contains('\n'));
    }

    /// A superblock update cut short at every byte boundary (what a crash mid-write can leave)
    /// opens as the old state or the new one, never anything else.
    #[test]
    fn a_torn_superblock_write_leaves_the_old_or_the_new_state() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let mut md = MetadataFile::create(&c, "alpha", false).unwrap();
        let mut old = md.superblock().clone();
        old.epoch = 5;
        md.update(old.clone()).unwrap();
        let mut new = old.clone();
        new.epoch = 6;
        new.history.insert(0, new.generation);
        new.generation = uuid::Uuid::new_v4();
        let seq = md.seq + 1;
        let slot = seq % 2;
        let image = new.encode(seq);
        let pristine = std::fs::read(&c.metadata_file).unwrap();
        drop(md);
        let (mut saw_old, mut saw_new) = (0, 0);
        for cut in 0..=SUPER_LEN {
            let mut bytes = pristine.clone();
            let at = (slot * META_BLOCK) as usize;
            bytes[at..at + cut].copy_from_slice(&image[..cut]);
            std::fs::write(&c.metadata_file, &bytes).unwrap();
            let got = MetadataFile::open(&c).unwrap().superblock().clone();
            if got == old {
                saw_old += 1;
            } else if got == new {
                saw_new += 1;
            } else {
                panic!("cut at {cut}: neither old nor new: {got:?}");
            }
        }
        assert_eq!(saw_new, 1, "only the complete write gives the new state");
        assert_eq!(saw_old, SUPER_LEN);
    }
}
