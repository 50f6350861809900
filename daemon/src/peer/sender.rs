//! Batched, in-order frame sending on one peer socket through io_uring.
//!
//! io_uring does not order two sends on the same socket, and a send can be short, so exactly
//! one batch is in flight per socket: one SENDMSG carrying every frame queued since the last
//! one (header and payload iovecs, up to [`MAX_IOV`]); a short send is resumed from where it
//! stopped. Payloads are sent from the caller's buffers: nothing is copied in user space.
//!
//! Zero copy: a payload in a fixed buffer of the ring (a ublk request's pages, registered by
//! the kernel) has no address of ours a SENDMSG iovec could name, and one SQE names one
//! fixed buffer. A batch holding such a payload goes as a chain of linked SQEs instead
//! (`IOSQE_IO_LINK`, which io_uring runs in order, one after the other): a SEND per header
//! (copied into the socket, 40 bytes) and a `SEND_ZC` from the fixed buffer per payload, all
//! with `MSG_WAITALL` (io_uring retries a partial send itself, so a short result is a broken
//! link, and a failed link cancels the rest of the chain). A chain is at most
//! [`MAX_CHAIN_FRAMES`] frames and is pushed onto an empty submission queue (the caller
//! submits first), so one `io_uring_enter` never splits it (a split chain would run as two
//! chains, unordered). A `SEND_ZC` completes twice: its result (`IORING_CQE_F_MORE`), then a
//! notification (`IORING_CQE_F_NOTIF`) once the socket let go of the pages. Only the results
//! count towards the batch: the notification guards nothing of ours (the headers went by
//! copy, and the pages are the kernel's, held by io_uring's reference on the registered
//! buffer, which ublk waits for before it ends the request), so the next batch does not wait
//! for it (on a real NIC it comes after the peer's TCP ACK, a round trip later).

use std::collections::VecDeque;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};
use metroblk_protocol::HEADER_LEN;

/// Most iovecs in one SENDMSG (Linux IOV_MAX is 1024).
pub const MAX_IOV: usize = 1024;
/// Most frames in one chain of linked sends (two SQEs each at most).
pub const MAX_CHAIN_FRAMES: usize = 64;

/// One frame to send: a 40-byte header and an optional payload, both owned by the caller and
/// kept unchanged until the batch holding them completes (or the peer acknowledged the frame).
#[derive(Clone, Copy, Debug)]
pub struct SendItem {
    pub header: *const u8,
    pub payload: *const u8,
    pub payload_len: u32,
    /// The payload is in the ring's fixed buffer of this index (zero copy); `payload` is then
    /// its address in that buffer's own numbering (ublk registers a request's pages from 0).
    pub fixed: Option<u16>,
}

impl SendItem {
    /// A frame without payload.
    pub fn header_only(header: *const u8) -> SendItem {
        SendItem { header, payload: std::ptr::null(), payload_len: 0, fixed: None }
    }
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
    /// The chain in flight (zero copy): its SQEs, each one's length (a send's `user_data`
    /// index is its position), results still to come, frames in it, and whether a send of
    /// it failed.
    chain: Vec<squeue::Entry>,
    chain_lens: Box<[u32]>,
    chain_left: usize,
    chain_frames: u64,
    chain_failed: bool,
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
            chain: Vec::with_capacity(2 * MAX_CHAIN_FRAMES),
            chain_lens: vec![0; 2 * MAX_CHAIN_FRAMES].into_boxed_slice(),
            chain_left: 0,
            chain_frames: 0,
            chain_failed: false,
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

    /// What to submit next, if nothing is in flight and there is something to send: one
    /// SENDMSG, or a chain of linked sends when a payload is in a fixed buffer (the caller
    /// submits what it queued before it pushes a chain, so the chain goes in one piece).
    /// `user_data` must leave its low 16 bits (the index) 0: a chain's sends carry their
    /// position there, to be given back to [`complete_cqe`](FrameSender::complete_cqe).
    pub fn next_sqes(&mut self, fd: RawFd, user_data: u64) -> &[squeue::Entry] {
        self.chain.clear();
        if self.in_flight {
            return &self.chain;
        }
        let fixed = self.pending.iter().take(MAX_CHAIN_FRAMES).any(|i| i.fixed.is_some());
        if self.start == self.end && fixed {
            self.fill_chain(fd, user_data);
        } else if let Some(sqe) = self.next_sqe(fd, user_data) {
            self.chain.push(sqe);
        }
        &self.chain
    }

    fn fill_chain(&mut self, fd: RawFd, user_data: u64) {
        let frames = self.pending.len().min(MAX_CHAIN_FRAMES);
        let mut lens = 0;
        for k in 0..frames {
            let item = self.pending.pop_front().expect("counted above");
            let last = k + 1 == frames;
            // MSG_MORE: more of the batch follows, so the socket need not push a lone header.
            let base = libc::MSG_NOSIGNAL | libc::MSG_WAITALL;
            let header_flags = base | if last && item.payload_len == 0 { 0 } else { libc::MSG_MORE };
            let ud = user_data | lens as u64;
            self.chain.push(
                opcode::Send::new(types::Fd(fd), item.header, HEADER_LEN as u32)
                    .flags(header_flags)
                    .build()
                    .user_data(ud),
            );
            self.chain_lens[lens] = HEADER_LEN as u32;
            lens += 1;
            if item.payload_len > 0 {
                let flags = base | if last { 0 } else { libc::MSG_MORE };
                let ud = user_data | lens as u64;
                let sqe = match item.fixed {
                    Some(index) => opcode::SendZc::new(types::Fd(fd), item.payload, item.payload_len)
                        .buf_index(Some(index))
                        .flags(flags)
                        .build(),
                    None => opcode::Send::new(types::Fd(fd), item.payload, item.payload_len).flags(flags).build(),
                };
                self.chain.push(sqe.user_data(ud));
                self.chain_lens[lens] = item.payload_len;
                lens += 1;
            }
        }
        let n = self.chain.len();
        for sqe in &mut self.chain[..n - 1] {
            *sqe = sqe.clone().flags(squeue::Flags::IO_LINK);
        }
        self.chain_left = n;
        self.chain_frames = frames as u64;
        self.chain_failed = false;
        self.in_flight = true;
    }

    /// Accounts one completion of the batch in flight: its `user_data` index, result and
    /// CQE flags. `Err(errno)` (once per batch) means the link is broken; the batch stays in
    /// flight until every one of its sends has completed.
    pub fn complete_cqe(&mut self, index: u16, res: i32, cqe_flags: u32) -> Result<(), i32> {
        if io_uring::cqueue::notif(cqe_flags) {
            // A SEND_ZC's second completion: nothing waits for it (see the module doc).
            return Ok(());
        }
        if self.chain_left == 0 {
            return self.complete(res);
        }
        self.chain_left -= 1;
        let want = self.chain_lens.get(index as usize).copied().unwrap_or(u32::MAX);
        let result = match res {
            r if r < 0 => Err(-r),
            r if (r as u32) < want => Err(libc::EPIPE),
            r => {
                self.bytes_sent += r as u64;
                Ok(())
            }
        };
        let first_failure = result.is_err() && !self.chain_failed;
        self.chain_failed |= result.is_err();
        if self.chain_left == 0 {
            self.in_flight = false;
            if !self.chain_failed {
                self.frames_sent += self.chain_frames;
            }
        }
        if first_failure {
            result
        } else {
            Ok(())
        }
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
            if item.fixed.is_some() {
                break; // goes in a chain, the next batch
            }
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
        self.frame = Some(sender.enqueue(SendItem::header_only(self.header.as_ptr())));
    }

    /// A new socket: nothing of ours is in flight on it.
    pub fn reset(&mut self) {
        self.frame = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use io_uring::IoUring;

    const UD: u64 = 1 << 63 | 2 << 16;

    /// Sends everything queued on a ring of its own, the way the queue does (a chain onto an
    /// empty submission queue); on a broken link, returns its errno (reported once) when
    /// nothing is in flight any more.
    fn drain(ring: &mut IoUring, sender: &mut FrameSender, fd: RawFd) -> Result<(), i32> {
        let mut failed = None;
        loop {
            let sqes = if failed.is_some() { Vec::new() } else { sender.next_sqes(fd, UD).to_vec() };
            if sqes.is_empty() && !sender.in_flight() {
                return failed.map_or(Ok(()), Err);
            }
            assert!(sqes.len() <= 2 * MAX_CHAIN_FRAMES);
            for sqe in &sqes {
                // SAFETY: headers and payloads live in the test's vectors until it ends.
                unsafe { ring.submission().push(sqe).expect("the ring has room for a chain") };
            }
            ring.submit_and_wait(1).unwrap();
            let cqes: Vec<_> = ring.completion().map(|c| (c.user_data(), c.result(), c.flags())).collect();
            for (ud, res, flags) in cqes {
                assert_eq!(ud & !0xffff, UD);
                if let Err(errno) = sender.complete_cqe(ud as u16, res, flags) {
                    assert_eq!(failed, None, "a broken link is reported once");
                    failed = Some(errno);
                }
            }
        }
    }

    #[test]
    fn frames_with_fixed_buffer_payloads_go_out_whole_and_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut rx, _) = listener.accept().unwrap();
        // Two registered buffers, as ublk's request pages would be, and one plain payload.
        let mut fixed: Vec<Vec<u8>> = (0..2u8).map(|b| (0..65536u32).map(|i| (i as u8) ^ b ^ 0x5a).collect()).collect();
        let plain: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut ring = IoUring::new(512).unwrap();
        let iovs: Vec<libc::iovec> =
            fixed.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr() as *mut _, iov_len: b.len() }).collect();
        // SAFETY: the buffers outlive the ring's use of them (the ring is dropped first).
        unsafe { ring.submitter().register_buffers(&iovs).unwrap() };
        // More frames than one chain holds, every kind mixed.
        let frames = 3 * MAX_CHAIN_FRAMES + 5;
        let headers: Vec<[u8; HEADER_LEN]> = (0..frames).map(|i| [i as u8; HEADER_LEN]).collect();
        let mut sender = FrameSender::new(frames);
        let mut want = Vec::new();
        for (i, h) in headers.iter().enumerate() {
            want.extend_from_slice(h);
            let item = match i % 4 {
                0 => SendItem::header_only(h.as_ptr()),
                1 => {
                    let (index, at, len) = (i % 2, (i * 512) % 32768, 4096 * (1 + i % 3));
                    want.extend_from_slice(&fixed[index][at..at + len]);
                    let address = fixed[index][at..].as_ptr();
                    SendItem {
                        header: h.as_ptr(),
                        payload: address,
                        payload_len: len as u32,
                        fixed: Some(index as u16),
                    }
                }
                2 => {
                    want.extend_from_slice(&plain);
                    SendItem {
                        header: h.as_ptr(),
                        payload: plain.as_ptr(),
                        payload_len: plain.len() as u32,
                        fixed: None,
                    }
                }
                _ => {
                    want.extend_from_slice(&fixed[0][..65536]);
                    SendItem { header: h.as_ptr(), payload: fixed[0].as_ptr(), payload_len: 65536, fixed: Some(0) }
                }
            };
            sender.enqueue(item);
        }
        let total = want.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; total];
            rx.read_exact(&mut got).unwrap();
            got
        });
        drain(&mut ring, &mut sender, tx.as_raw_fd()).unwrap();
        assert!(sender.is_idle());
        assert_eq!(sender.frames_sent, frames as u64);
        assert_eq!(sender.bytes_sent, total as u64);
        let got = reader.join().unwrap();
        assert!(got == want, "the bytes on the wire differ from the frames queued");
    }

    #[test]
    fn a_broken_link_fails_the_chain_once_and_leaves_nothing_in_flight() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        drop(listener.accept().unwrap());
        let mut buf = vec![7u8; 65536];
        let mut ring = IoUring::new(512).unwrap();
        let iov = [libc::iovec { iov_base: buf.as_mut_ptr() as *mut _, iov_len: buf.len() }];
        // SAFETY: the buffer outlives the ring's use of it.
        unsafe { ring.submitter().register_buffers(&iov).unwrap() };
        // SAFETY: plain syscall on a socket we own.
        unsafe { libc::shutdown(tx.as_raw_fd(), libc::SHUT_WR) };
        let header = [1u8; HEADER_LEN];
        let mut sender = FrameSender::new(8);
        for _ in 0..4 {
            sender.enqueue(SendItem {
                header: header.as_ptr(),
                payload: buf.as_ptr(),
                payload_len: 65536,
                fixed: Some(0),
            });
        }
        // The rest of the chain completes (cancelled) without a second error.
        assert_eq!(drain(&mut ring, &mut sender, tx.as_raw_fd()), Err(libc::EPIPE));
        sender.reset();
        assert!(sender.is_idle());
    }
}
