//! What a ublk queue thread drives: the target's side of the contract.

use io_uring::squeue;

/// Bit 63 of `user_data`: the completion belongs to the target (libublk's "target I/O" bit).
/// Completions without it are ublk's own io commands and never reach the target.
pub const UD_TARGET: u64 = libublk::UblkUringData::Target as u64;

/// The kind of a block request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    Read,
    Write,
    /// Make everything completed so far durable. `offset` and `len` are 0.
    Flush,
    Discard,
    WriteZeroes,
}

/// One block request as ublk delivered it.
#[derive(Debug, Clone, Copy)]
pub struct BlockIo {
    pub op: BlockOp,
    /// Byte offset on the device (a multiple of the logical block size).
    pub offset: u64,
    /// Length in bytes (a multiple of the logical block size; 0 for FLUSH).
    pub len: u32,
    /// Forced unit access: the write must be durable when it completes.
    pub fua: bool,
    /// The request's data buffer (4 KiB aligned, `len` bytes used for READ and WRITE). It
    /// stays valid, and for WRITE unchanged, until the request is reported done. Null under
    /// zero copy (see `buf_index`).
    pub buf: *mut u8,
    /// Zero copy (`UBLK_F_AUTO_BUF_REG`): the kernel registered the request's own pages in
    /// the queue's io_uring as this fixed buffer (READ and WRITE only; the index is the tag).
    /// The target moves the data with `READ_FIXED` / `WRITE_FIXED` / `SEND_ZC` on that index,
    /// addresses counted from 0; it cannot read the bytes itself (that would take
    /// `UBLK_F_USER_COPY`, a copy). The registration ends when the request is reported done.
    pub buf_index: Option<u16>,
}

/// Somewhere to put submission entries: the queue's io_uring. Entries are handed to the
/// kernel when the queue thread next waits for completions; the memory they reference must
/// stay valid until their completion has been delivered to [`QueueTarget::complete`].
pub trait SqeSink {
    fn push(&mut self, sqe: squeue::Entry);
    /// Hands what is queued to the kernel now, without waiting for any completion (an
    /// `io_uring_enter` that only submits).
    fn submit_now(&mut self);
}

/// A block target driven by one ublk queue thread. Every method runs on that thread.
///
/// Contract:
/// - [`start`](QueueTarget::start) is called once, before the first request.
/// - [`submit`](QueueTarget::submit) starts request `tag` (unique among the requests in
///   flight on this queue). `Err(-errno)` completes it at once with that error; `Ok(())`
///   means the target reports it later, exactly once, through the `done` callback of
///   [`complete`](QueueTarget::complete): the byte count for READ/WRITE, 0 for the other
///   kinds, or a negative errno.
/// - Every SQE the target pushes must carry [`UD_TARGET`] in its `user_data`; its completion
///   is passed to [`complete`](QueueTarget::complete) with that `user_data`, result and CQE
///   flags (a `SEND_ZC` completes twice: `IORING_CQE_F_MORE`, then the notification with
///   `IORING_CQE_F_NOTIF`, both with its `user_data`).
pub trait QueueTarget: Send {
    fn start(&mut self, sink: &mut dyn SqeSink);
    fn submit(&mut self, sink: &mut dyn SqeSink, tag: u16, io: BlockIo) -> Result<(), i32>;
    fn complete(
        &mut self,
        sink: &mut dyn SqeSink,
        user_data: u64,
        res: i32,
        cqe_flags: u32,
        done: &mut dyn FnMut(u16, i32),
    );
    /// Called once after each batch of requests and completions, before the queue thread
    /// waits for the next: for work the target deferred to do once per batch. Requests may
    /// be reported done here too.
    fn end_batch(&mut self, _sink: &mut dyn SqeSink, _done: &mut dyn FnMut(u16, i32)) {}
    /// The queue thread is ending: operations may still be in flight on its ring (a socket
    /// receive, a timer) that point into the target's memory, and the ring is torn down only
    /// after the thread exits. The default keeps all of the target's memory (leaks it); a
    /// target should keep only what the kernel may still touch and release the rest, so a
    /// server that outlives one device (a role change) does not hold on to its engine.
    fn retire(self: Box<Self>) {
        std::mem::forget(self);
    }
}
