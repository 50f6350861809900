//! Data-link frames of the peer link.
//!
//! Every message on an established peer link is a fixed 40-byte little-endian header, optionally
//! followed by a payload (the data of a WRITE, the text of an ERROR). The layout is:
//!
//! | bytes  | field         | meaning                                                           |
//! |--------|---------------|-------------------------------------------------------------------|
//! | 0..2   | `magic`       | [`FRAME_MAGIC`]; a mismatch means the stream is out of sync       |
//! | 2      | `kind`        | [`FrameKind`]                                                     |
//! | 3      | `flags`       | [`FLAG_FUA`], [`FLAG_UNCHECKED`]; every other bit must be zero    |
//! | 4..8   | `length`      | payload bytes (WRITE, ERROR) or byte range (DISCARD, WRITE_ZEROES)|
//! | 8..16  | `seq`         | request sequence number; an ack carries the seq it answers        |
//! | 16..24 | `epoch`       | the sender's epoch (the fencing token), on requests               |
//! | 24..32 | `offset`      | byte offset into the volume                                       |
//! | 32..36 | `payload_crc` | crc32c of the payload (0 when there is none, or it is unchecked)  |
//! | 36..40 | `status`      | 0 or a negative errno on acks; the error code on ERROR            |
//!
//! [`decode_header`] checks everything that can be checked from the header alone against the local
//! [`Geometry`], so a receiver can trust offsets and lengths before it touches its backing file;
//! [`verify_payload`] then checks the payload once it has been read. Neither allocates nor panics,
//! whatever the bytes: the peer link carries data from another machine and a corrupt or hostile
//! header must become an error, never a crash.

use zerocopy::little_endian::{I32, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First two bytes of every frame header.
pub const FRAME_MAGIC: u16 = 0xB10C;
/// Size of the encoded frame header.
pub const HEADER_LEN: usize = 40;
/// Largest WRITE payload a sender may put in one frame (1 MiB).
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// Largest ERROR frame text.
pub const MAX_ERROR_TEXT: u32 = 256;
/// Bytes of one region hash in a HASH_REPLY (SHA-256).
pub const HASH_LEN: usize = 32;
/// Largest range one HASH_REQUEST may cover: 64 MiB, whose hashes fit one reply for every
/// region size (at 4 KiB: 16384 hashes, 512 KiB).
pub const MAX_HASH_RANGE: u32 = 64 << 20;
/// Force unit access: the receiver acks only after the data is durable. Allowed on WRITE and FLUSH.
pub const FLAG_FUA: u8 = 1;
/// The WRITE's payload carries no crc32c (`payload_checksum = "none"` on the sender):
/// `payload_crc` is 0 and the receiver checks nothing but the length. Allowed on WRITE only;
/// whether a receiver accepts it is its own setting's decision, not the frame's.
pub const FLAG_UNCHECKED: u8 = 2;

/// Flag bits this version understands; the decoder rejects any other bit so that a future flag
/// is never silently ignored by an old receiver.
const KNOWN_FLAGS: u8 = FLAG_FUA | FLAG_UNCHECKED;

/// The header as it lies on the wire. Byte-order types make the layout independent of the host.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WireHeader {
    magic: U16,
    kind: u8,
    flags: u8,
    length: U32,
    seq: U64,
    epoch: U64,
    offset: U64,
    payload_crc: U32,
    status: I32,
}

const _: () = assert!(core::mem::size_of::<WireHeader>() == HEADER_LEN);

/// What a frame asks for or answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Replicated write; `length` payload bytes follow the header.
    Write = 1,
    /// Answers WRITE, DISCARD and WRITE_ZEROES.
    WriteAck = 2,
    /// Make every acked write durable.
    Flush = 3,
    /// Answers FLUSH.
    FlushAck = 4,
    /// Deallocate `length` bytes at `offset`.
    Discard = 5,
    /// Zero `length` bytes at `offset`.
    WriteZeroes = 6,
    /// Liveness probe.
    Ping = 7,
    /// Answers PING.
    Pong = 8,
    /// The sender gives up on the link; `length` bytes of text follow, `status` is the code.
    Error = 9,
    /// Sync link only: the resync is complete; the target is up to date once it has answered
    /// (with a FLUSH_ACK of the same seq, after making it durable).
    SyncDone = 10,
    /// Sync link only: hash `length` bytes at `offset`, one SHA-256 per region of the
    /// volume's region size (online verify, checksum resync).
    HashRequest = 11,
    /// Answers HASH_REQUEST: `length` payload bytes, 32 per region, `seq` of the request.
    HashReply = 12,
}

impl FrameKind {
    /// The kind with this wire value, if any.
    pub fn from_u8(v: u8) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Write,
            2 => FrameKind::WriteAck,
            3 => FrameKind::Flush,
            4 => FrameKind::FlushAck,
            5 => FrameKind::Discard,
            6 => FrameKind::WriteZeroes,
            7 => FrameKind::Ping,
            8 => FrameKind::Pong,
            9 => FrameKind::Error,
            10 => FrameKind::SyncDone,
            11 => FrameKind::HashRequest,
            12 => FrameKind::HashReply,
            _ => return None,
        })
    }

    /// Lower-case name for logs and error texts.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Write => "write",
            FrameKind::WriteAck => "write-ack",
            FrameKind::Flush => "flush",
            FrameKind::FlushAck => "flush-ack",
            FrameKind::Discard => "discard",
            FrameKind::WriteZeroes => "write-zeroes",
            FrameKind::Ping => "ping",
            FrameKind::Pong => "pong",
            FrameKind::Error => "error",
            FrameKind::SyncDone => "sync-done",
            FrameKind::HashRequest => "hash-request",
            FrameKind::HashReply => "hash-reply",
        }
    }

    /// Kinds whose `offset`/`length` name a byte range of the volume.
    fn is_ranged(self) -> bool {
        matches!(self, FrameKind::Write | FrameKind::Discard | FrameKind::WriteZeroes | FrameKind::HashRequest)
    }

    /// Kinds followed by `length` payload bytes.
    fn has_payload(self) -> bool {
        matches!(self, FrameKind::Write | FrameKind::Error | FrameKind::HashReply)
    }

    /// Flag bits that mean something on this kind.
    fn allowed_flags(self) -> u8 {
        match self {
            FrameKind::Write => FLAG_FUA | FLAG_UNCHECKED,
            FrameKind::Flush => FLAG_FUA,
            _ => 0,
        }
    }
}

impl core::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A decoded (or to-be-encoded) frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub flags: u8,
    pub length: u32,
    pub seq: u64,
    pub epoch: u64,
    pub offset: u64,
    pub payload_crc: u32,
    pub status: i32,
}

/// Payload lengths beyond u32 cannot be encoded; saturating makes the decoder reject the frame
/// instead of a silent wrap producing a short, valid-looking one.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl Frame {
    fn bare(kind: FrameKind, seq: u64) -> Frame {
        Frame { kind, flags: 0, length: 0, seq, epoch: 0, offset: 0, payload_crc: 0, status: 0 }
    }

    /// A WRITE of `payload` at `offset`. The caller keeps `payload.len()` within the peer's
    /// `max_payload`; the crc32c is computed here when `checked`, else the frame says
    /// [`FLAG_UNCHECKED`].
    pub fn write(seq: u64, epoch: u64, offset: u64, payload: &[u8], fua: bool, checked: bool) -> Frame {
        Frame {
            flags: if fua { FLAG_FUA } else { 0 } | if checked { 0 } else { FLAG_UNCHECKED },
            length: len_u32(payload.len()),
            epoch,
            offset,
            payload_crc: if checked { crc32c::crc32c(payload) } else { 0 },
            ..Frame::bare(FrameKind::Write, seq)
        }
    }

    /// A WRITE of `length` bytes without a payload checksum (`FLAG_UNCHECKED`), built
    /// without the payload: a sender in zero copy cannot read it (the bytes are in pages the
    /// kernel registered for the socket and the file, not in our memory).
    pub fn write_unchecked(seq: u64, epoch: u64, offset: u64, length: u32, fua: bool) -> Frame {
        Frame {
            flags: if fua { FLAG_FUA } else { 0 } | FLAG_UNCHECKED,
            length,
            epoch,
            offset,
            payload_crc: 0,
            ..Frame::bare(FrameKind::Write, seq)
        }
    }

    /// Acks a WRITE, DISCARD or WRITE_ZEROES; `status` is 0 or a negative errno.
    pub fn write_ack(seq: u64, status: i32) -> Frame {
        Frame { status, ..Frame::bare(FrameKind::WriteAck, seq) }
    }

    pub fn flush(seq: u64, epoch: u64) -> Frame {
        Frame { epoch, ..Frame::bare(FrameKind::Flush, seq) }
    }

    /// Acks a FLUSH; `status` is 0 or a negative errno.
    pub fn flush_ack(seq: u64, status: i32) -> Frame {
        Frame { status, ..Frame::bare(FrameKind::FlushAck, seq) }
    }

    pub fn discard(seq: u64, epoch: u64, offset: u64, length: u32) -> Frame {
        Frame { length, epoch, offset, ..Frame::bare(FrameKind::Discard, seq) }
    }

    pub fn write_zeroes(seq: u64, epoch: u64, offset: u64, length: u32) -> Frame {
        Frame { length, epoch, offset, ..Frame::bare(FrameKind::WriteZeroes, seq) }
    }

    pub fn ping(seq: u64) -> Frame {
        Frame::bare(FrameKind::Ping, seq)
    }

    pub fn pong(seq: u64) -> Frame {
        Frame::bare(FrameKind::Pong, seq)
    }

    pub fn sync_done(seq: u64, epoch: u64) -> Frame {
        Frame { epoch, ..Frame::bare(FrameKind::SyncDone, seq) }
    }

    pub fn hash_request(seq: u64, offset: u64, length: u32) -> Frame {
        Frame { offset, length, ..Frame::bare(FrameKind::HashRequest, seq) }
    }

    /// Answers a HASH_REQUEST with `hashes` (32 bytes per region), or `status` < 0.
    pub fn hash_reply(seq: u64, hashes: &[u8], status: i32) -> Frame {
        Frame {
            length: len_u32(hashes.len()),
            payload_crc: crc32c::crc32c(hashes),
            status,
            ..Frame::bare(FrameKind::HashReply, seq)
        }
    }

    /// An ERROR carrying `text` (the caller truncates it to [`MAX_ERROR_TEXT`]) and `code`.
    pub fn error(code: i32, text: &[u8]) -> Frame {
        Frame {
            length: len_u32(text.len()),
            payload_crc: crc32c::crc32c(text),
            status: code,
            ..Frame::bare(FrameKind::Error, 0)
        }
    }

    /// Whether the sender asked for force-unit-access semantics.
    pub fn fua(&self) -> bool {
        self.flags & FLAG_FUA != 0
    }

    /// Whether the payload travels without a crc32c ([`FLAG_UNCHECKED`]).
    pub fn unchecked(&self) -> bool {
        self.flags & FLAG_UNCHECKED != 0
    }

    /// Bytes that follow the header on the wire: `length` for WRITE and ERROR, 0 otherwise
    /// (DISCARD and WRITE_ZEROES use `length` for the range, not for a payload).
    pub fn payload_len(&self) -> usize {
        if self.kind.has_payload() {
            // u32 always fits in usize on the 32/64-bit targets metroblk runs on.
            self.length as usize
        } else {
            0
        }
    }

    /// Writes the 40-byte header into `out`. Does not validate: encoding what the decoder would
    /// reject is the caller's bug, and the peer will say so.
    pub fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        let wire = WireHeader {
            magic: U16::new(FRAME_MAGIC),
            kind: self.kind as u8,
            flags: self.flags,
            length: U32::new(self.length),
            seq: U64::new(self.seq),
            epoch: U64::new(self.epoch),
            offset: U64::new(self.offset),
            payload_crc: U32::new(self.payload_crc),
            status: I32::new(self.status),
        };
        *out = zerocopy::transmute!(wire);
    }
}

/// The local volume's shape, against which incoming headers are checked.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Offsets and lengths of ranged requests must be multiples of this (0 is treated as 1).
    pub block_size: u32,
    /// Largest WRITE payload this receiver accepts (normally [`MAX_PAYLOAD`]).
    pub max_payload: u32,
}

/// Why a frame was refused. Every one means the peer is broken or the stream is corrupt: the
/// receiver drops the link rather than guess.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad frame magic {0:#06x} (expected {FRAME_MAGIC:#06x}): the peer link stream is out of sync")]
    BadMagic(u16),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("{kind} frame carries flags {flags:#04x} that are not allowed on it")]
    FlagsNotAllowed { kind: FrameKind, flags: u8 },
    #[error("{kind} frame length {length} exceeds the maximum {max}")]
    TooLong { kind: FrameKind, length: u32, max: u32 },
    #[error("{kind} frame has length 0")]
    ZeroLength { kind: FrameKind },
    #[error("{kind} frame has length {length}; this kind must have length 0")]
    UnexpectedLength { kind: FrameKind, length: u32 },
    #[error("request at offset {offset} length {length} ends past the volume end ({volume_size})")]
    OutOfRange { offset: u64, length: u32, volume_size: u64 },
    #[error("{}", misaligned_text(*.offset, *.length, *.block_size))]
    Misaligned { offset: u64, length: u32, block_size: u32 },
    #[error("payload checksum mismatch: header says crc32c {expected:#010x}, payload has {actual:#010x}")]
    BadCrc { expected: u32, actual: u32 },
    #[error("payload length mismatch: frame needs {expected} bytes, got {actual}")]
    BadPayloadLen { expected: usize, actual: usize },
}

fn misaligned_text(offset: u64, length: u32, block_size: u32) -> String {
    let what = if offset.checked_rem(u64::from(block_size)).unwrap_or(0) != 0 { "offset" } else { "length" };
    format!(
        "request at offset {offset} length {length} is misaligned: {what} is not a multiple of the block size {block_size}"
    )
}

/// Decodes and validates a header against the local geometry. Never panics, never allocates.
pub fn decode_header(buf: &[u8; HEADER_LEN], geo: &Geometry) -> Result<Frame, FrameError> {
    let wire: WireHeader = zerocopy::transmute!(*buf);

    let magic = wire.magic.get();
    if magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let kind = FrameKind::from_u8(wire.kind).ok_or(FrameError::UnknownKind(wire.kind))?;
    let flags = wire.flags;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(FrameError::UnknownFlags(flags));
    }
    if flags & !kind.allowed_flags() != 0 {
        return Err(FrameError::FlagsNotAllowed { kind, flags });
    }

    let frame = Frame {
        kind,
        flags,
        length: wire.length.get(),
        seq: wire.seq.get(),
        epoch: wire.epoch.get(),
        offset: wire.offset.get(),
        payload_crc: wire.payload_crc.get(),
        status: wire.status.get(),
    };
    let length = frame.length;

    if kind.is_ranged() {
        if length == 0 {
            return Err(FrameError::ZeroLength { kind });
        }
        if kind == FrameKind::Write && length > geo.max_payload {
            return Err(FrameError::TooLong { kind, length, max: geo.max_payload });
        }
        if kind == FrameKind::HashRequest && length > MAX_HASH_RANGE {
            return Err(FrameError::TooLong { kind, length, max: MAX_HASH_RANGE });
        }
        // A block size of 0 would divide by zero; treat it as "no alignment constraint".
        let bs = u64::from(geo.block_size.max(1));
        if frame.offset % bs != 0 || u64::from(length) % bs != 0 {
            return Err(FrameError::Misaligned { offset: frame.offset, length, block_size: geo.block_size });
        }
        // checked_add: a hostile offset near u64::MAX must not wrap into range.
        let in_range = frame.offset.checked_add(u64::from(length)).is_some_and(|end| end <= geo.volume_size);
        if !in_range {
            return Err(FrameError::OutOfRange { offset: frame.offset, length, volume_size: geo.volume_size });
        }
    } else if kind == FrameKind::Error {
        if length > MAX_ERROR_TEXT {
            return Err(FrameError::TooLong { kind, length, max: MAX_ERROR_TEXT });
        }
    } else if kind == FrameKind::HashReply {
        if length > geo.max_payload || length % HASH_LEN as u32 != 0 {
            return Err(FrameError::TooLong { kind, length, max: geo.max_payload });
        }
    } else if length != 0 {
        return Err(FrameError::UnexpectedLength { kind, length });
    }
    Ok(frame)
}

/// Checks a payload read after `frame`'s header: its length must be `frame.payload_len()` and,
/// for kinds that carry one, its crc32c must match the header (unless the frame says
/// [`FLAG_UNCHECKED`]; the receiver decides beforehand whether it accepts that).
pub fn verify_payload(frame: &Frame, payload: &[u8]) -> Result<(), FrameError> {
    let expected = frame.payload_len();
    if payload.len() != expected {
        return Err(FrameError::BadPayloadLen { expected, actual: payload.len() });
    }
    if frame.kind.has_payload() && !frame.unchecked() {
        let actual = crc32c::crc32c(payload);
        if actual != frame.payload_crc {
            return Err(FrameError::BadCrc { expected: frame.payload_crc, actual });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: Geometry = Geometry { volume_size: 1 << 20, block_size: 4096, max_payload: MAX_PAYLOAD };

    fn enc(f: &Frame) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        f.encode(&mut b);
        b
    }

    fn roundtrip(f: Frame) {
        assert_eq!(decode_header(&enc(&f), &GEO), Ok(f));
    }

    #[test]
    fn layout_is_little_endian_and_fixed() {
        let f = Frame {
            kind: FrameKind::Write,
            flags: FLAG_FUA,
            length: 0x0000_1000,
            seq: 0x0102_0304_0506_0708,
            epoch: 0x1112_1314_1516_1718,
            offset: 0x2000,
            payload_crc: 0xA1B2_C3D4,
            status: -5,
        };
        let b = enc(&f);
        assert_eq!(&b[0..2], &[0x0C, 0xB1]);
        assert_eq!(b[2], 1);
        assert_eq!(b[3], 1);
        assert_eq!(&b[4..8], &[0x00, 0x10, 0, 0]);
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..24], &[0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11]);
        assert_eq!(&b[24..32], &[0, 0x20, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[32..36], &[0xD4, 0xC3, 0xB2, 0xA1]);
        assert_eq!(&b[36..40], &(-5i32).to_le_bytes());
    }

    #[test]
    fn every_kind_round_trips() {
        let data = vec![0x5Au8; 8192];
        let w = Frame::write(1, 7, 4096, &data, false, true);
        roundtrip(w);
        verify_payload(&w, &data).unwrap();
        let wf = Frame::write(2, 7, 0, &data[..4096], true, true);
        assert!(wf.fua());
        roundtrip(wf);
        roundtrip(Frame::write_ack(3, 0));
        roundtrip(Frame::write_ack(4, -5));
        roundtrip(Frame::flush(5, 7));
        let mut ff = Frame::flush(6, 7);
        ff.flags = FLAG_FUA;
        roundtrip(ff);
        roundtrip(Frame::flush_ack(7, -28));
        roundtrip(Frame::discard(8, 7, 0, 1 << 20));
        roundtrip(Frame::write_zeroes(9, 7, 8192, 4096));
        roundtrip(Frame::ping(10));
        roundtrip(Frame::pong(10));
        let text = b"fenced: epoch 9 is newer";
        let e = Frame::error(-1, text);
        roundtrip(e);
        verify_payload(&e, text).unwrap();
        assert_eq!(e.payload_len(), text.len());
        assert_eq!(e.status, -1);
    }

    #[test]
    fn payload_len_only_for_write_and_error() {
        assert_eq!(Frame::write(0, 0, 0, &[0; 512], false, true).payload_len(), 512);
        assert_eq!(Frame::discard(0, 0, 0, 4096).payload_len(), 0);
        assert_eq!(Frame::write_zeroes(0, 0, 0, 4096).payload_len(), 0);
        assert_eq!(Frame::error(1, b"abc").payload_len(), 3);
        assert_eq!(Frame::flush(0, 0).payload_len(), 0);
        verify_payload(&Frame::discard(0, 0, 0, 4096), &[]).unwrap();
        verify_payload(&Frame::ping(1), &[]).unwrap();
    }

    #[test]
    fn rejects_bad_magic() {
        let mut b = enc(&Frame::ping(1));
        b[0] = 0;
        assert_eq!(decode_header(&b, &GEO), Err(FrameError::BadMagic(0xB100)));
    }

    #[test]
    fn rejects_unknown_kind() {
        for k in [0u8, 13, 255] {
            let mut b = enc(&Frame::ping(1));
            b[2] = k;
            assert_eq!(decode_header(&b, &GEO), Err(FrameError::UnknownKind(k)));
        }
    }

    #[test]
    fn rejects_unknown_flags() {
        let mut b = enc(&Frame::write(1, 1, 0, &[0; 4096], true, true));
        b[3] = FLAG_FUA | 0x80;
        assert_eq!(decode_header(&b, &GEO), Err(FrameError::UnknownFlags(0x81)));
    }

    #[test]
    fn rejects_fua_where_meaningless() {
        let mut f = Frame::discard(1, 1, 0, 4096);
        f.flags = FLAG_FUA;
        assert_eq!(
            decode_header(&enc(&f), &GEO),
            Err(FrameError::FlagsNotAllowed { kind: FrameKind::Discard, flags: FLAG_FUA })
        );
    }

    #[test]
    fn rejects_too_long() {
        let mut f = Frame::write(1, 1, 0, &[], false, true);
        f.length = MAX_PAYLOAD + 4096;
        let geo = Geometry { volume_size: 1 << 30, ..GEO };
        assert_eq!(
            decode_header(&enc(&f), &geo),
            Err(FrameError::TooLong { kind: FrameKind::Write, length: MAX_PAYLOAD + 4096, max: MAX_PAYLOAD })
        );
        let mut e = Frame::error(1, b"");
        e.length = MAX_ERROR_TEXT + 1;
        assert!(matches!(decode_header(&enc(&e), &GEO), Err(FrameError::TooLong { kind: FrameKind::Error, .. })));
        // Discard and write-zeroes are not bounded by max_payload, only by the volume.
        let big = Geometry { volume_size: 1 << 40, ..GEO };
        let d = Frame::discard(1, 1, 0, u32::MAX - 4095);
        assert_eq!(decode_header(&enc(&d), &big), Ok(d));
    }

    #[test]
    fn rejects_zero_and_unexpected_length() {
        let mut f = Frame::write(1, 1, 0, &[], false, true);
        f.length = 0;
        assert_eq!(decode_header(&enc(&f), &GEO), Err(FrameError::ZeroLength { kind: FrameKind::Write }));
        for mut f in
            [Frame::write_ack(1, 0), Frame::flush(1, 1), Frame::flush_ack(1, 0), Frame::ping(1), Frame::pong(1)]
        {
            f.length = 4096;
            assert_eq!(decode_header(&enc(&f), &GEO), Err(FrameError::UnexpectedLength { kind: f.kind, length: 4096 }));
        }
    }

    #[test]
    fn rejects_out_of_range() {
        let f = Frame::write(1, 1, (1 << 20) - 4096, &[0; 8192], false, true);
        let err = decode_header(&enc(&f), &GEO).unwrap_err();
        assert_eq!(err, FrameError::OutOfRange { offset: (1 << 20) - 4096, length: 8192, volume_size: 1 << 20 });
        assert_eq!(err.to_string(), "request at offset 1044480 length 8192 ends past the volume end (1048576)");
        // Exactly at the end is fine.
        let ok = Frame::write(1, 1, (1 << 20) - 8192, &[0; 8192], false, true);
        assert_eq!(decode_header(&enc(&ok), &GEO), Ok(ok));
    }

    #[test]
    fn rejects_u64_overflow() {
        // Offset aligned, offset + length wraps u64: must be refused, not wrapped into range.
        let off = u64::MAX - 4095;
        let f = Frame::write_zeroes(1, 1, off, 8192);
        assert!(matches!(decode_header(&enc(&f), &GEO), Err(FrameError::OutOfRange { .. })));
        let huge = Geometry { volume_size: u64::MAX, ..GEO };
        assert!(matches!(decode_header(&enc(&f), &huge), Err(FrameError::OutOfRange { .. })));
    }

    #[test]
    fn rejects_misaligned_offset() {
        let f = Frame::write(1, 1, 512, &[0; 4096], false, true);
        let err = decode_header(&enc(&f), &GEO).unwrap_err();
        assert_eq!(err, FrameError::Misaligned { offset: 512, length: 4096, block_size: 4096 });
        assert!(err.to_string().contains("offset is not a multiple"));
    }

    #[test]
    fn rejects_misaligned_length() {
        let f = Frame::discard(1, 1, 4096, 1000);
        let err = decode_header(&enc(&f), &GEO).unwrap_err();
        assert_eq!(err, FrameError::Misaligned { offset: 4096, length: 1000, block_size: 4096 });
        assert!(err.to_string().contains("length is not a multiple"));
    }

    #[test]
    fn zero_block_size_does_not_divide_by_zero() {
        let geo = Geometry { block_size: 0, ..GEO };
        let f = Frame::write(1, 1, 3, &[1, 2, 3], false, true);
        assert_eq!(decode_header(&enc(&f), &geo), Ok(f));
    }

    #[test]
    fn rejects_bad_crc() {
        let data = vec![7u8; 4096];
        let f = Frame::write(1, 1, 0, &data, false, true);
        let mut bad = data.clone();
        bad[100] ^= 1;
        assert!(matches!(
            verify_payload(&f, &bad),
            Err(FrameError::BadCrc { expected, .. }) if expected == f.payload_crc
        ));
        let e = Frame::error(1, b"boom");
        assert!(matches!(verify_payload(&e, b"bOom"), Err(FrameError::BadCrc { .. })));
    }

    #[test]
    fn an_unchecked_write_carries_no_crc_and_only_its_length_is_checked() {
        let data = vec![7u8; 4096];
        let f = Frame::write(1, 1, 0, &data, true, false);
        assert!(f.unchecked() && f.fua());
        assert_eq!(f.payload_crc, 0);
        // Zero copy builds the same frame from the length alone.
        assert_eq!(Frame::write_unchecked(1, 1, 0, 4096, true), f);
        assert_eq!(decode_header(&enc(&f), &GEO), Ok(f));
        let mut changed = data.clone();
        changed[100] ^= 1;
        assert_eq!(verify_payload(&f, &changed), Ok(()));
        assert!(matches!(verify_payload(&f, &data[..4095]), Err(FrameError::BadPayloadLen { .. })));
        // Only a WRITE may be unchecked: an ERROR's text, say, is always checked.
        let mut b = enc(&Frame::flush(1, 1));
        b[3] = FLAG_UNCHECKED;
        assert_eq!(
            decode_header(&b, &GEO),
            Err(FrameError::FlagsNotAllowed { kind: FrameKind::Flush, flags: FLAG_UNCHECKED })
        );
    }

    #[test]
    fn rejects_wrong_payload_len() {
        let data = vec![7u8; 4096];
        let f = Frame::write(1, 1, 0, &data, false, true);
        assert_eq!(verify_payload(&f, &data[..4095]), Err(FrameError::BadPayloadLen { expected: 4096, actual: 4095 }));
        assert_eq!(
            verify_payload(&Frame::flush(1, 1), &[0]),
            Err(FrameError::BadPayloadLen { expected: 0, actual: 1 })
        );
    }

    #[test]
    fn error_texts_are_one_line() {
        let errs = [
            FrameError::BadMagic(1),
            FrameError::UnknownKind(77),
            FrameError::UnknownFlags(0x80),
            FrameError::FlagsNotAllowed { kind: FrameKind::Ping, flags: 1 },
            FrameError::TooLong { kind: FrameKind::Write, length: 9, max: 8 },
            FrameError::ZeroLength { kind: FrameKind::Discard },
            FrameError::UnexpectedLength { kind: FrameKind::Pong, length: 1 },
            FrameError::OutOfRange { offset: 1, length: 2, volume_size: 3 },
            FrameError::Misaligned { offset: 1, length: 2, block_size: 0 },
            FrameError::BadCrc { expected: 1, actual: 2 },
            FrameError::BadPayloadLen { expected: 1, actual: 2 },
        ];
        for e in errs {
            let s = e.to_string();
            assert!(!s.is_empty() && !s.contains('\n'), "{s}");
        }
        assert_eq!(
            FrameError::BadMagic(0x1234).to_string(),
            "bad frame magic 0x1234 (expected 0xb10c): the peer link stream is out of sync"
        );
    }

    #[test]
    fn hash_frames_round_trip_and_are_bounded() {
        let req = Frame::hash_request(9, 4096, 8192);
        roundtrip(req);
        let hashes = vec![7u8; 2 * HASH_LEN];
        let reply = Frame::hash_reply(9, &hashes, 0);
        roundtrip(reply);
        verify_payload(&reply, &hashes).unwrap();
        assert_eq!(reply.payload_len(), 2 * HASH_LEN);
        assert_eq!(req.payload_len(), 0, "a hash request carries a range, not a payload");
        // Ranges are checked like a write's: inside the volume, aligned, bounded.
        let big = Geometry { volume_size: 1 << 30, ..GEO };
        let too_long = enc(&Frame::hash_request(1, 0, MAX_HASH_RANGE + 4096));
        assert!(matches!(decode_header(&too_long, &big), Err(FrameError::TooLong { .. })));
        let past_end = enc(&Frame::hash_request(1, GEO.volume_size - 4096, 8192));
        assert!(matches!(decode_header(&past_end, &GEO), Err(FrameError::OutOfRange { .. })));
        let misaligned = enc(&Frame::hash_request(1, 100, 4096));
        assert!(matches!(decode_header(&misaligned, &GEO), Err(FrameError::Misaligned { .. })));
        // A reply must hold whole hashes and no more than a payload.
        let ragged = enc(&Frame::hash_reply(1, &[0u8; 33], 0));
        assert!(decode_header(&ragged, &GEO).is_err());
    }
}
