//! The sync link's opening: what each node tells the other about its copy before a resync.
//!
//! The sync link is a peer link whose hello names queue [`SYNC_QUEUE`]. Right after the
//! handshake, the dialer (the primary) sends its [`SyncHello`] followed by its dirty bitmap;
//! the listener answers with its own. Both then decide the same thing from the same facts
//! (generations, disk states, bitmaps): in sync, who is the sync source, or split brain. After
//! that the link carries ordinary frames: WRITE (a region's copy), FLUSH, PING, and SYNC_DONE.
//!
//! Layout (little-endian, 404 bytes): magic `MBLKSYNC`, generation (16), history (8 × 16),
//! history length, disk state, flags (bit 0: discard local changes; bit 1: full resync asked;
//! bit 2: the sender serves the volume as primary),
//! reserved (5), region count, bitmap bytes that follow, reserved (8).

use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The queue number a sync link's hello carries.
pub const SYNC_QUEUE: u16 = u16::MAX;
/// First bytes of a sync hello.
pub const SYNC_MAGIC: [u8; 8] = *b"MBLKSYNC";
/// Generations of history a sync hello carries.
pub const SYNC_HISTORY_MAX: usize = 8;
/// Largest bitmap a sync hello may announce (the metadata file's limit: 64 MiB).
pub const SYNC_BITMAP_BYTES_MAX: u64 = 64 << 20;

const FLAG_DISCARD_LOCAL: u8 = 1;
const FLAG_FULL: u8 = 2;
const FLAG_PRIMARY: u8 = 4;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WireSyncHello {
    magic: [u8; 8],
    generation: [u8; 16],
    history: [[u8; 16]; SYNC_HISTORY_MAX],
    history_len: u8,
    disk_state: u8,
    flags: u8,
    reserved: [u8; 5],
    regions: U64,
    bitmap_bytes: U64,
    reserved2: [u8; 8],
}

/// Encoded size of a sync hello.
pub const SYNC_HELLO_LEN: usize = core::mem::size_of::<WireSyncHello>();
const _: () = assert!(SYNC_HELLO_LEN == 184);

/// One node's facts about its copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncHello {
    pub generation: [u8; 16],
    /// Earlier generations, newest first (at most [`SYNC_HISTORY_MAX`]).
    pub history: Vec<[u8; 16]>,
    /// The disk state as a number: 0 up-to-date, 1 outdated, 2 inconsistent, 3 failed.
    pub disk_state: u8,
    /// The operator asked to drop this node's changes (`resync --discard-local`).
    pub discard_local: bool,
    /// The operator asked for a full resync.
    pub full: bool,
    /// The sender serves the volume as primary (the dialer always; a listener that does is
    /// the other half of two primaries: a split brain of roles).
    pub primary: bool,
    /// Regions of the volume (both must agree).
    pub regions: u64,
    /// Bytes of dirty bitmap that follow the hello (one bit per region, LSB first).
    pub bitmap_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncHelloError {
    #[error("not a sync hello (bad magic)")]
    BadMagic,
    #[error("sync hello has a history of {0} generations (at most {SYNC_HISTORY_MAX})")]
    History(u8),
    #[error("sync hello has unknown disk state {0}")]
    DiskState(u8),
    #[error("sync hello has unknown flags {0:#04x}")]
    Flags(u8),
    #[error("sync hello announces a {0}-byte bitmap (at most {SYNC_BITMAP_BYTES_MAX})")]
    BitmapTooLarge(u64),
}

impl SyncHello {
    pub fn encode(&self) -> [u8; SYNC_HELLO_LEN] {
        assert!(self.history.len() <= SYNC_HISTORY_MAX);
        let mut history = [[0u8; 16]; SYNC_HISTORY_MAX];
        history[..self.history.len()].copy_from_slice(&self.history);
        let w = WireSyncHello {
            magic: SYNC_MAGIC,
            generation: self.generation,
            history,
            history_len: self.history.len() as u8,
            disk_state: self.disk_state,
            flags: if self.discard_local { FLAG_DISCARD_LOCAL } else { 0 }
                | if self.full { FLAG_FULL } else { 0 }
                | if self.primary { FLAG_PRIMARY } else { 0 },
            reserved: [0; 5],
            regions: U64::new(self.regions),
            bitmap_bytes: U64::new(self.bitmap_bytes),
            reserved2: [0; 8],
        };
        zerocopy::transmute!(w)
    }

    /// Decodes a hello from the wire; never panics.
    pub fn decode(buf: &[u8; SYNC_HELLO_LEN]) -> Result<SyncHello, SyncHelloError> {
        let w: WireSyncHello = zerocopy::transmute!(*buf);
        if w.magic != SYNC_MAGIC {
            return Err(SyncHelloError::BadMagic);
        }
        if w.history_len as usize > SYNC_HISTORY_MAX {
            return Err(SyncHelloError::History(w.history_len));
        }
        if crate::DiskState::from_code(w.disk_state).is_none() {
            return Err(SyncHelloError::DiskState(w.disk_state));
        }
        if w.flags & !(FLAG_DISCARD_LOCAL | FLAG_FULL | FLAG_PRIMARY) != 0 {
            return Err(SyncHelloError::Flags(w.flags));
        }
        if w.bitmap_bytes.get() > SYNC_BITMAP_BYTES_MAX {
            return Err(SyncHelloError::BitmapTooLarge(w.bitmap_bytes.get()));
        }
        Ok(SyncHello {
            generation: w.generation,
            history: w.history[..w.history_len as usize].to_vec(),
            disk_state: w.disk_state,
            discard_local: w.flags & FLAG_DISCARD_LOCAL != 0,
            full: w.flags & FLAG_FULL != 0,
            primary: w.flags & FLAG_PRIMARY != 0,
            regions: w.regions.get(),
            bitmap_bytes: w.bitmap_bytes.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_it_cannot_trust() {
        let h = SyncHello {
            generation: [7; 16],
            history: vec![[1; 16], [2; 16]],
            disk_state: 2,
            discard_local: true,
            full: false,
            primary: true,
            regions: 1024,
            bitmap_bytes: 4096,
        };
        let b = h.encode();
        assert_eq!(SyncHello::decode(&b), Ok(h));
        let mut bad = b;
        bad[0] = b'X';
        assert_eq!(SyncHello::decode(&bad), Err(SyncHelloError::BadMagic));
        let mut bad = b;
        bad[8 + 16 + 128] = 9;
        assert_eq!(SyncHello::decode(&bad), Err(SyncHelloError::History(9)));
        let mut bad = b;
        bad[8 + 16 + 128 + 2] = 0x80;
        assert_eq!(SyncHello::decode(&bad), Err(SyncHelloError::Flags(0x80)));
        let mut bad = b;
        bad[176 - 8..176].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(SyncHello::decode(&bad), Err(SyncHelloError::BitmapTooLarge(_))));
        // Any bytes: an error or a hello, never a panic.
        for seed in 0..2000u64 {
            let mut buf = [0u8; SYNC_HELLO_LEN];
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for byte in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            if seed % 2 == 0 {
                buf[..8].copy_from_slice(&SYNC_MAGIC);
            }
            let _ = SyncHello::decode(&buf);
        }
    }
}
