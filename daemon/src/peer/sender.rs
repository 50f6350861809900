//! Batched, in-order frame sending on one peer socket through io_uring.
//!
//! io_uring does not order two sends on the same socket, and a send can be short, so exactly
//! one SENDMSG is in flight per socket: it carries every frame queued since the last one
//! (header and payload iovecs, up to [`MAX_IOV`]), and a short send is resumed from where it
//! stopped. Payloads are sent from the caller's buffers: nothing is copied in user space.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};
use metroblk_protocol::HEADER_LEN;

/// Most iovecs in one SENDMSG (Linux IOV_MAX is 1024).
pub const MAX_IOV: usize = 1024;

/// One frame to send: a 40-byte header and an optional payload, both owned by the caller and
/// kept unchanged until the batch holding them completes (or the peer acknowledged the frame).
#[derive(Clone, Copy, Debug)]
pub struct SendItem {
    pub header: *const u8,
    pub payload: *const u8,
    pub payload_len: u32,
}

pub struct FrameSender {
    pending: VecDeque<SendItem>,
    capacity: usize,
    iov: Box<[libc::iovec]>,
    /// `last[i]`: iovec `i` ends a frame (counts towards `frames_sent` once sent).
    last: Box<[bool]>,
    msg: Box<libc::msghdr>,
    /// The current batch is `iov[start..end]`; `start` advances as bytes are sent.
    start: usize,
    end: usize,
    in_flight: bool,
    pub bytes_sent: u64,
    /// Frames enqueued and frames wholly handed to the kernel, since creation. Frames go out
    /// in order, so frame number `n` (the value of `frames_enqueued` before its enqueue) is
    /// sent once `frames_sent > n`: owners use this to know when a header may be reused.
    pub frames_enqueued: u64,
    pub frames_sent: u64,
}

// SAFETY: the raw pointers refer to memory whose owner (the queue or the replica connection)
// moves together with the sender; they are only dereferenced by the kernel.
unsafe impl Send for FrameSender {}

impl FrameSender {
    /// `capacity` bounds the frames waiting to be sent (at most one per request slot plus the
    /// control frames); exceeding it is a bug and asserts.
    pub fn new(capacity: usize) -> FrameSender {
        let iov = vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV].into_boxed_slice();
        // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
        let msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        FrameSender {
            pending: VecDeque::with_capacity(capacity),
            capacity,
            iov,
            last: vec![false; MAX_IOV].into_boxed_slice(),
            msg,
            start: 0,
            end: 0,
            in_flight: false,
            bytes_sent: 0,
            frames_enqueued: 0,
            frames_sent: 0,
        }
    }

    /// Queues a frame; returns its frame number (see `frames_sent`).
    pub fn enqueue(&mut self, item: SendItem) -> u64 {
        assert!(self.pending.len() < self.capacity, "send queue overflow: a frame per slot is the bound");
        self.pending.push_back(item);
        self.frames_enqueued += 1;
        self.frames_enqueued - 1
    }

    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    pub fn is_idle(&self) -> bool {
        !self.in_flight && self.start == self.end && self.pending.is_empty()
    }

    /// Drops everything queued (the link is gone; the owner re-queues what it still needs).
    /// Must not be called while a send is in flight: the kernel may still read the iovecs.
    pub fn reset(&mut self) {
        assert!(!self.in_flight);
        // Whatever was not sent never will be: count it as done so owners free its headers.
        self.frames_sent = self.frames_enqueued;
        self.pending.clear();
        self.start = 0;
        self.end = 0;
    }

    /// The next SENDMSG to submit, if none is in flight and there is something to send.
    pub fn next_sqe(&mut self, fd: RawFd, user_data: u64) -> Option<squeue::Entry> {
        if self.in_flight {
            return None;
        }
        if self.start == self.end {
            self.fill_batch();
            if self.start == self.end {
                return None;
            }
        }
        self.msg.msg_iov = self.iov[self.start..].as_mut_ptr();
        self.msg.msg_iovlen = (self.end - self.start) as _;
        self.in_flight = true;
        let sqe = opcode::SendMsg::new(types::Fd(fd), &*self.msg as *const libc::msghdr)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(user_data);
        Some(sqe)
    }

    fn fill_batch(&mut self) {
        self.start = 0;
        self.end = 0;
        while let Some(item) = self.pending.front() {
            let need = if item.payload_len > 0 { 2 } else { 1 };
            if self.end + need > MAX_IOV {
                break;
            }
            let item = *item;
            self.pending.pop_front();
            self.iov[self.end] = libc::iovec { iov_base: item.header as *mut _, iov_len: HEADER_LEN };
            self.last[self.end] = item.payload_len == 0;
            self.end += 1;
            if item.payload_len > 0 {
                self.iov[self.end] =
                    libc::iovec { iov_base: item.payload as *mut _, iov_len: item.payload_len as usize };
                self.last[self.end] = true;
                self.end += 1;
            }
        }
    }

    /// Accounts a SENDMSG completion. `Err(errno)` means the link is broken.
    pub fn complete(&mut self, res: i32) -> Result<(), i32> {
        assert!(self.in_flight);
        self.in_flight = false;
        if res < 0 {
            return Err(-res);
        }
        if res == 0 {
            return Err(libc::EPIPE);
        }
        self.bytes_sent += res as u64;
        let mut left = res as usize;
        while left > 0 && self.start < self.end {
            let iov = &mut self.iov[self.start];
            if left >= iov.iov_len {
                left -= iov.iov_len;
                if self.last[self.start] {
                    self.frames_sent += 1;
                }
                self.start += 1;
            } else {
                // Short send: resume inside this iovec next time.
                // SAFETY: advancing within the same buffer, by less than its length.
                iov.iov_base = unsafe { (iov.iov_base as *mut u8).add(left) } as *mut _;
                iov.iov_len -= left;
                left = 0;
            }
        }
        debug_assert_eq!(left, 0, "kernel reported more bytes sent than queued");
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(())
    }
}

/// The answer to the peer's keepalive PING, on either end of a link: one PONG header, reused;
/// a PING is answered only once the previous PONG has gone out (its header may not be
/// rewritten while the kernel may still read it). A PING not answered is harmless: the peer
/// pings again, and any traffic counts as a sign of life.
pub struct PongSlot {
    header: Box<[u8; HEADER_LEN]>,
    frame: Option<u64>,
}

impl Default for PongSlot {
    fn default() -> Self {
        PongSlot { header: Box::new([0; HEADER_LEN]), frame: None }
    }
}

impl PongSlot {
    pub fn answer(&mut self, sender: &mut FrameSender, seq: u64) {
        if self.frame.is_some_and(|n| sender.frames_sent <= n) {
            return;
        }
        metroblk_protocol::Frame::pong(seq).encode(&mut self.header);
        self.frame =
            Some(sender.enqueue(SendItem { header: self.header.as_ptr(), payload: std::ptr::null(), payload_len: 0 }));
    }

    /// A new socket: nothing of ours is in flight on it.
    pub fn reset(&mut self) {
        self.frame = None;
    }
}
