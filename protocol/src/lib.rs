//! Wire formats of metroblk's peer link: the data-link frames that carry replicated I/O
//! ([`frame`]) and the handshake that checks compatibility and authenticates both nodes before
//! any frame flows ([`handshake`]); and of the witness link ([`witness`]): the requests a node
//! makes of the witness and the mutual authentication before them. [`DiskState`] is the one
//! disk-state type that all of them, and the daemon's superblock, carry.
//!
//! This crate does no I/O of its own (apart from the blocking [`run_handshake`] convenience
//! driver) and depends on no other metroblk crate, so the daemon, the witness and tests can all
//! share it. Decoders never panic and never trust the wire: every length and offset is checked
//! before a caller acts on it.

#![forbid(unsafe_code)]

pub mod disk_state;
pub mod frame;
pub mod handshake;
pub mod sync;
pub mod witness;

pub use disk_state::DiskState;
pub use frame::{
    decode_header, verify_payload, Frame, FrameError, FrameKind, Geometry, FLAG_FUA, FLAG_UNCHECKED, FRAME_MAGIC,
    HASH_LEN, HEADER_LEN, MAX_ERROR_TEXT, MAX_HASH_RANGE, MAX_PAYLOAD,
};
pub use handshake::{
    printable, refusal_verdict, run_handshake, Handshake, HandshakeError, HelloInfo, Role, MAX_NODE_NAME, PEER_MAGIC,
    PEER_PROTOCOL_VERSION, REFUSED_BEFORE_AUTH,
};
pub use sync::{SyncHello, SyncHelloError, SYNC_BITMAP_BYTES_MAX, SYNC_HELLO_LEN, SYNC_QUEUE};
