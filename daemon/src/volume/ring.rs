//! The io_uring a queue's I/O is submitted on, seen from the engine.
//!
//! The engine does not own its ring: under ublk it submits on libublk's per-queue ring (one
//! thread, one ring per queue, as the design asks); in tests and benchmarks [`OwnRing`] gives
//! it a ring of its own. Both speak the same `user_data` layout, which is libublk's
//! target-I/O layout (`tag | op << 16 | aux << 24 | 1 << 63`), so a completion can be routed
//! back to the engine without translation.

use io_uring::{squeue, IoUring};

/// Marks a completion as the engine's (libblk's "target I/O" bit).
pub const UD_ENGINE: u64 = 1 << 63;

/// Kinds of engine operation carried in the `op` byte of `user_data`.
pub mod op {
    /// Local file I/O of one request (index = request tag).
    pub const LOCAL: u8 = 1;
    /// A batch send on the peer socket (aux = link generation).
    pub const SEND: u8 = 2;
    /// A receive on the peer socket (aux = link generation).
    pub const RECV: u8 = 3;
    /// The link hand-off eventfd became readable.
    pub const LINK_READY: u8 = 4;
    /// The periodic tick (keepalive, round-trip time, peer timeout).
    pub const TICK: u8 = 5;
}

#[inline]
pub fn user_data(op: u8, index: u16, aux: u16) -> u64 {
    index as u64 | (op as u64) << 16 | (aux as u64) << 24 | UD_ENGINE
}

#[inline]
pub fn ud_index(ud: u64) -> u16 {
    ud as u16
}

#[inline]
pub fn ud_op(ud: u64) -> u8 {
    (ud >> 16) as u8
}

#[inline]
pub fn ud_aux(ud: u64) -> u16 {
    (ud >> 24) as u16
}

/// Somewhere to put submission entries. Entries reference memory owned by the engine or by the
/// caller's request buffers; the engine keeps that memory alive until the completion arrives.
pub trait Submitter {
    fn push(&mut self, sqe: squeue::Entry);
    /// Hands what is queued to the kernel now, without waiting for a completion.
    fn submit_now(&mut self);
}

/// A ring of the engine's own, for drivers without ublk (tests, benchmarks).
pub struct OwnRing {
    pub ring: IoUring,
}

impl OwnRing {
    pub fn new(entries: u32) -> std::io::Result<OwnRing> {
        Ok(OwnRing { ring: IoUring::builder().build(entries)? })
    }
}

impl Submitter for OwnRing {
    fn push(&mut self, sqe: squeue::Entry) {
        // SAFETY: every entry the engine builds points at memory that stays valid and unmoved
        // until its completion is handled (slot buffers, boxed link state).
        unsafe { push_retrying(&mut self.ring, &sqe) }
    }

    fn submit_now(&mut self) {
        if let Err(e) = self.ring.submit() {
            tracing::error!("io_uring submit failed: {e}");
        }
    }
}

/// Pushes `sqe`; when the submission queue is full, hands what is queued to the kernel and
/// retries.
///
/// # Safety
/// Everything `sqe` points at must stay valid and unmoved until its completion is reaped.
pub unsafe fn push_retrying(ring: &mut IoUring, sqe: &squeue::Entry) {
    loop {
        // SAFETY: the caller's contract above.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return;
        }
        if let Err(e) = ring.submit() {
            tracing::error!("io_uring submit failed while the queue was full: {e}");
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        let ud = user_data(op::SEND, 0xfffe, 0xabcd);
        assert_eq!(ud_op(ud), op::SEND);
        assert_eq!(ud_index(ud), 0xfffe);
        assert_eq!(ud_aux(ud), 0xabcd);
        assert_ne!(ud & UD_ENGINE, 0);
    }
}
