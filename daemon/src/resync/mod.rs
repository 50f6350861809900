//! Resync: the two copies catch up by copying only the regions marked dirty.
//!
//! Each volume has one *sync link* beside its data links: the primary dials it (queue number
//! `SYNC_QUEUE` in the hello). On it, the nodes first exchange their facts (generation,
//! history, disk state, dirty bitmap) and both run [`decide::decide`]; until that says the
//! copies may be joined (in sync, or a resync from the primary), the secondary refuses data
//! links and the primary does not dial them, so a split-brain peer never receives a write.
//! Then the sync link carries the copies ([`source`] on the primary, [`target`] on the
//! secondary) and, once the copies are in sync, the cleaner's FLUSHes that let write-intent
//! bits be cleared.
//!
//! - [`decide`] — who syncs from whom (pure).
//! - [`copy`] — the copy schedule of a pass: disk order, window, flush cadence, rate (pure).
//! - [`source`] — the primary's side (I/O): the exchange, the copies, the cleaner.
//! - [`target`] — the secondary's side (I/O): applies the copies, becomes up to date.
//! - [`zeros`] — what of a copy reads as zeros goes as a range, and is punched on the target.
//!
//! Sync links use blocking sockets on their own threads: they are control plane plus a bulk
//! stream where one thread keeps a TCP connection full; the hot path never touches them.

pub mod command;
pub mod copy;
pub mod decide;
pub mod hash;
pub mod source;
pub mod target;
pub mod zeros;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use metroblk_protocol::{decode_header, verify_payload, Frame, Geometry, SyncHello, HEADER_LEN, SYNC_HELLO_LEN};
use serde::{Deserialize, Serialize};

use crate::bitmap::WriteIntent;
use crate::config::PayloadChecksum;
use decide::CopyFacts;
use metroblk_protocol::DiskState;

/// What status shows about the sync link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SyncState {
    /// No sync link: none yet in this run, or the last one ended (the peer is gone, or not
    /// answering). Nothing is known about the peer's copy until the next exchange.
    #[default]
    Unknown,
    InSync,
    SyncSource,
    SyncTarget,
    /// Both nodes went on alone: the link is refused until an operator decides.
    SplitBrain,
    /// The exchange refused to join the copies; `message` says why.
    Refused,
}

impl std::fmt::Display for SyncState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncState::Unknown => "unknown",
            SyncState::InSync => "in-sync",
            SyncState::SyncSource => "sync-source",
            SyncState::SyncTarget => "sync-target",
            SyncState::SplitBrain => "split-brain",
            SyncState::Refused => "refused",
        })
    }
}

/// Progress of the resync in progress (or the last one).
#[derive(Debug, Clone, Default)]
pub struct SyncInfo {
    pub state: SyncState,
    pub message: Option<String>,
    pub regions_total: u64,
    pub regions_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub started: Option<Instant>,
    /// The last online verify: regions compared, regions that differed, finished.
    pub verify: Option<VerifyInfo>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyInfo {
    /// The value of `SyncShared::verify_requests` when this verify started: it answers every
    /// request up to that number (requests made while one runs are served by the next).
    #[serde(default)]
    pub request: u64,
    pub regions_checked: u64,
    pub regions_differing: u64,
    pub done: bool,
    /// Set when the verify could not finish (the link ended): `regions_checked` is partial.
    pub failed: bool,
}

/// What the operator asked the next resync to be.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Requested {
    /// `resync --full`: copy every region, not just the dirty ones.
    pub full: bool,
    /// `resync --checksum`: send only the regions whose hashes differ.
    pub checksum: bool,
}

impl Requested {
    const FULL: u8 = 1;
    const CHECKSUM: u8 = 2;

    fn bits(self) -> u8 {
        (if self.full { Self::FULL } else { 0 }) | (if self.checksum { Self::CHECKSUM } else { 0 })
    }

    fn from_bits(b: u8) -> Requested {
        Requested { full: b & Self::FULL != 0, checksum: b & Self::CHECKSUM != 0 }
    }
}

/// Per volume: the sync link's state and the operator's requests.
#[derive(Default)]
pub struct SyncShared {
    /// The exchange on the sync link let data links join the copies (both nodes set it).
    admitted: AtomicBool,
    /// Exchanges that admitted the peer (connectors dial at once after one).
    admissions: AtomicU64,
    /// `resync --discard-local`: this node's changes are to be dropped.
    pub discard_local: AtomicBool,
    /// The operator's `resync --full` / `--checksum`, one word ([`Requested`]) so that an
    /// exchange takes both flags of one request or neither.
    requested: AtomicU8,
    /// `verify`: compare every region's hash with the peer's.
    pub verify_requested: AtomicBool,
    /// `verify` requests so far; counted before `verify_requested` is set, so the verify that
    /// takes the flag sees the count of the request that set it.
    pub verify_requests: AtomicU64,
    /// `resync`: exchange again now (and resync what is dirty).
    pub restart: AtomicBool,
    /// Bytes per second; 0: unlimited. From the config, changed by `resync --rate`.
    pub rate_bps: AtomicU64,
    /// A sync link is being served (secondary).
    pub target_busy: AtomicBool,
    /// The volume is going away: the sync threads end.
    pub stopping: AtomicBool,
    pub bytes_resynced: AtomicU64,
    /// Of `bytes_resynced`, those that read as zeros and went as WRITE_ZEROES ranges (source).
    pub bytes_resynced_as_zeros: AtomicU64,
    pub regions_resynced: AtomicU64,
    pub info: Mutex<SyncInfo>,
}

impl SyncShared {
    pub fn new(rate_bps: u64) -> SyncShared {
        SyncShared { rate_bps: AtomicU64::new(rate_bps), ..SyncShared::default() }
    }

    pub fn info(&self) -> SyncInfo {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_state(&self, state: SyncState, message: Option<String>) {
        let mut g = self.info.lock().unwrap_or_else(|p| p.into_inner());
        g.state = state;
        g.message = message;
    }

    /// The sync link ended: what the exchange found no longer holds (the peer may be gone, or
    /// write alone from now on). A split brain or a refusal stands until the next exchange.
    pub fn link_ended(&self, why: &str) {
        self.update(|i| {
            if !matches!(i.state, SyncState::SplitBrain | SyncState::Refused) {
                i.state = SyncState::Unknown;
                i.message = Some(why.to_string());
            }
        });
    }

    pub fn update(&self, f: impl FnOnce(&mut SyncInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn is_admitted(&self) -> bool {
        self.admitted.load(Ordering::Acquire)
    }

    /// An operator's request the sync link has not taken up yet.
    pub fn is_pending(&self) -> bool {
        self.restart.load(Ordering::Acquire) || self.requested.load(Ordering::Acquire) != 0
    }

    /// Asks for the next resync to be full and/or by checksum (adds to what is asked already).
    pub fn request(&self, r: Requested) {
        self.requested.fetch_or(r.bits(), Ordering::AcqRel);
    }

    /// Takes every request made so far, for one exchange.
    pub fn take_requested(&self) -> Requested {
        Requested::from_bits(self.requested.swap(0, Ordering::AcqRel))
    }

    /// A full resync is asked for and not done yet.
    pub fn full_requested(&self) -> bool {
        Requested::from_bits(self.requested.load(Ordering::Acquire)).full
    }

    /// A full resync was done (this node's copy came in whole).
    pub fn full_done(&self) {
        self.requested.fetch_and(!Requested::FULL, Ordering::AcqRel);
    }

    pub fn admissions(&self) -> u64 {
        self.admissions.load(Ordering::Acquire)
    }

    /// Records the exchange's verdict on data links.
    pub fn set_admitted(&self, admitted: bool) {
        self.admitted.store(admitted, Ordering::Release);
        if admitted {
            self.admissions.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// This node's sync hello and its dirty bitmap (bytes, LSB first).
/// `full`: ask for a full resync (an operator's `--full`, or an attached disk); `primary`:
/// this node serves the volume as primary.
pub fn local_hello(
    intent: &WriteIntent,
    disk: DiskState,
    sync: &SyncShared,
    full: bool,
    primary: bool,
) -> (SyncHello, Vec<u8>) {
    let sb = intent.superblock();
    let dirty = intent.dirty();
    let mut bitmap = Vec::with_capacity(dirty.words() * 8);
    for w in 0..dirty.words() {
        bitmap.extend_from_slice(&dirty.word(w).to_le_bytes());
    }
    let hello = SyncHello {
        generation: sb.generation.into_bytes(),
        history: sb.history.iter().map(|g| g.into_bytes()).collect(),
        disk_state: disk.code(),
        discard_local: sync.discard_local.load(Ordering::Acquire),
        full,
        primary,
        regions: intent.regions(),
        bitmap_bytes: bitmap.len() as u64,
    };
    (hello, bitmap)
}

/// The facts a hello and its bitmap state.
pub fn facts(h: &SyncHello, bitmap: &[u8]) -> CopyFacts {
    CopyFacts {
        generation: h.generation,
        history: h.history.clone(),
        disk_state: DiskState::from_code(h.disk_state).unwrap_or(DiskState::Failed),
        dirty: bitmap.iter().any(|b| *b != 0),
        discard_local: h.discard_local,
        full: h.full,
        primary: h.primary,
    }
}

pub fn send_hello(s: &mut TcpStream, h: &SyncHello, bitmap: &[u8]) -> Result<(), String> {
    s.write_all(&h.encode()).and_then(|()| s.write_all(bitmap)).map_err(|e| format!("cannot send the sync hello: {e}"))
}

/// Reads the peer's hello and bitmap; the bitmap must cover exactly `regions` regions.
pub fn read_hello(s: &mut impl Read, regions: u64) -> Result<(SyncHello, Vec<u8>), String> {
    let mut buf = [0u8; SYNC_HELLO_LEN];
    s.read_exact(&mut buf).map_err(|e| format!("no sync hello from the peer: {e}"))?;
    let h = SyncHello::decode(&buf).map_err(|e| format!("bad sync hello from the peer: {e}"))?;
    let expected = regions.div_ceil(64) * 8;
    if h.regions != regions || h.bitmap_bytes != expected {
        return Err(format!(
            "the peer's sync hello describes {} regions and a {}-byte bitmap; this volume has {regions} regions",
            h.regions, h.bitmap_bytes
        ));
    }
    let mut bitmap = vec![0u8; expected as usize];
    s.read_exact(&mut bitmap).map_err(|e| format!("the peer's bitmap was cut short: {e}"))?;
    Ok((h, bitmap))
}

/// Writes one frame: header and payload in one vectored write where the socket takes it.
pub fn write_frame(s: &mut TcpStream, f: &Frame, payload: &[u8]) -> Result<(), String> {
    let mut h = [0u8; HEADER_LEN];
    f.encode(&mut h);
    let total = HEADER_LEN + payload.len();
    let mut done = 0;
    while done < total {
        let parts = if done < HEADER_LEN {
            [std::io::IoSlice::new(&h[done..]), std::io::IoSlice::new(payload)]
        } else {
            [std::io::IoSlice::new(&payload[done - HEADER_LEN..]), std::io::IoSlice::new(&[])]
        };
        match s.write_vectored(&parts) {
            Ok(0) => return Err("sync link send failed: the connection closed".into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("sync link send failed: {e}")),
        }
    }
    Ok(())
}

/// Reads one frame; its payload lands in `buf` (which must be large enough for the largest
/// payload the geometry allows). Checks the header and the payload's checksum, and that
/// `checksum` (this node's setting) admits an unchecked one.
pub fn read_frame(
    s: &mut impl Read,
    geo: &Geometry,
    checksum: PayloadChecksum,
    buf: &mut [u8],
) -> Result<(Frame, usize), String> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).map_err(|e| format!("sync link receive failed: {e}"))?;
    let f = decode_header(&h, geo).map_err(|e| format!("malformed frame on the sync link: {e}"))?;
    let n = f.payload_len();
    let payload = buf.get_mut(..n).ok_or_else(|| format!("sync link frame payload of {n} bytes is too large"))?;
    s.read_exact(payload).map_err(|e| format!("sync link receive failed: {e}"))?;
    checksum.admits(&f).map_err(|e| format!("refused on the sync link: {e}"))?;
    verify_payload(&f, payload).map_err(|e| format!("malformed frame on the sync link: {e}"))?;
    Ok((f, n))
}

/// Monotonic nanoseconds since an arbitrary start (for the pure schedules).
pub fn now_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::{Requested, SyncShared};

    #[test]
    fn an_exchange_takes_both_flags_of_a_request_or_neither() {
        let s = SyncShared::new(0);
        assert!(!s.is_pending() && !s.full_requested());
        s.request(Requested { full: true, checksum: true });
        assert!(s.is_pending() && s.full_requested());
        assert_eq!(s.take_requested(), Requested { full: true, checksum: true });
        assert_eq!(s.take_requested(), Requested::default());
        // Requests add up until taken; a finished full resync leaves the checksum request.
        s.request(Requested { full: true, checksum: false });
        s.request(Requested { full: false, checksum: true });
        s.full_done();
        assert!(!s.full_requested());
        assert_eq!(s.take_requested(), Requested { full: false, checksum: true });
        assert!(!s.is_pending());
    }
}
