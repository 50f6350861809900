//! The secondary's side of the write path: one connection from the primary, applied to the
//! local backing file.
//!
//! Each connection runs on its own thread with its own io_uring. One RECVMSG at a time reads
//! whatever the socket holds: the rest of the WRITE payload being received goes straight into
//! its slot's write buffer, and everything after it (headers, and the start of the next
//! payloads) into a staging buffer, from which frames are taken until it runs dry. So one ring
//! round trip brings as many frames as have arrived, not one header or one payload (a large
//! payload still lands in place; only what shares a receive with other frames is copied, on
//! this side). The write is issued at once and the next frames are read while it runs, so many
//! writes are in flight. The ack is sent only after the local write completed (protocol C);
//! for FUA, after it is durable (RWF_DSYNC); acks queued meanwhile leave in one SENDMSG.
//! A write from an epoch lower than this node's is refused with an ERROR frame and the link is
//! dropped: that primary has been replaced (design, "epoch").
//!
//! Every decision (what to receive, which slot, apply or not, ack with what) is made by the
//! pure [`ReplicaCore`](super::replica_state::ReplicaCore); this module only does the I/O.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, types, IoUring};
use metroblk_protocol::{decode_header, verify_payload, Frame, FrameKind, HEADER_LEN, MAX_ERROR_TEXT};

use super::replica_state::{OnHeader, RecvNext, ReplicaCore};
use super::sender::{FrameSender, PongSlot, SendItem};
use super::sessions::LinkControl;
use crate::config::IoMode;
use crate::volume::local_io::{self, errno_text, AlignedBuf, InlineWrite, InlineWriter, LocalOp};
use crate::volume::stats::QueueStats;
use crate::volume::VolumeShared;

/// Writes a connection may have in flight on the secondary; beyond this it stops reading the
/// socket and TCP pushes back on the primary.
pub const REPLICA_SLOTS: usize = 64;
/// Most bytes one receive puts into the staging buffer: about eight 4 KiB writes with their
/// headers. What lands there is copied into write buffers, so this also bounds the copy per
/// receive (a 128 KiB payload that starts in the stage is mostly received in place).
pub const STAGE_RECV_BYTES: usize = 32 << 10;
/// The staging buffer: what a receive may add, after at most a partial header left over.
const STAGE_BYTES: usize = STAGE_RECV_BYTES + HEADER_LEN;

const UD_RECV: u64 = 1 << 32;
const UD_SEND: u64 = 2 << 32;
const UD_LOCAL: u64 = 3 << 32;

/// A slot's I/O state: its buffer, how much of its transfer is done, its ack header.
struct RSlot {
    buf: Option<AlignedBuf>,
    done: u32,
    ack: [u8; HEADER_LEN],
}

struct Conn {
    v: Arc<VolumeShared>,
    /// This connection's own counters (status sums every connection's).
    stats: Arc<QueueStats>,
    /// The socket, owned by the session table (`control`) until this link has finished.
    fd: RawFd,
    ring: IoUring,
    core: ReplicaCore,
    /// Bytes received and not yet taken are `stage[head..tail]`.
    stage: Box<[u8]>,
    head: usize,
    tail: usize,
    /// Bytes of the current payload received so far.
    got: usize,
    /// The RECVMSG's iovecs (the payload's rest, the stage) and its header; the kernel reads
    /// them while the receive is in flight.
    recv_iov: Box<[libc::iovec; 2]>,
    recv_msg: Box<libc::msghdr>,
    /// How much of the in-flight receive goes to the current payload (iovec 0), if any.
    recv_payload_want: usize,
    recv_in_flight: bool,
    inline_writer: InlineWriter,
    slots: Vec<RSlot>,
    sender: FrameSender,
    /// Slots whose ack is queued, with its frame number: freed once the ack is sent.
    ack_fifo: VecDeque<(u16, u64)>,
    pong: PongSlot,
    err_hdr: Box<[u8; HEADER_LEN]>,
    err_text: Box<[u8; MAX_ERROR_TEXT as usize]>,
    shut: bool,
    peer: String,
    /// Set when a newer link for this queue arrived: apply and ack nothing more.
    control: Arc<LinkControl>,
}

/// Serves one authenticated, admitted connection (its socket is in `control`) until it ends,
/// with nothing of it left in flight. Returns why it ended.
pub fn serve(v: Arc<VolumeShared>, peer: String, control: Arc<LinkControl>, stats: Arc<QueueStats>) -> String {
    let set_up = control.with_socket(|s| {
        let _ = s.set_nodelay(true);
        super::set_dead_peer_detection(s).map_err(|e| format!("cannot set keepalive on the link: {e}"))?;
        s.set_nonblocking(true).map_err(|e| format!("cannot make the link's socket non-blocking: {e}"))
    });
    match set_up {
        Some(Ok(())) => {}
        Some(Err(e)) => return e,
        None => return "the link's socket is already closed".into(),
    }
    let ring = match IoUring::builder().build(256) {
        Ok(r) => r,
        Err(e) => return format!("cannot create io_uring: {e}"),
    };
    let mut c = Conn {
        fd: control.fd(),
        stats,
        ring,
        core: ReplicaCore::new(REPLICA_SLOTS, Instant::now(), crate::volume::queue::PEER_TIMEOUT),
        stage: vec![0u8; STAGE_BYTES].into_boxed_slice(),
        head: 0,
        tail: 0,
        got: 0,
        recv_iov: Box::new([libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 2]),
        // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
        recv_msg: Box::new(unsafe { std::mem::zeroed() }),
        recv_payload_want: 0,
        recv_in_flight: false,
        inline_writer: InlineWriter::default(),
        slots: (0..REPLICA_SLOTS).map(|_| RSlot { buf: None, done: 0, ack: [0; HEADER_LEN] }).collect(),
        sender: FrameSender::new(REPLICA_SLOTS + 2),
        ack_fifo: VecDeque::with_capacity(REPLICA_SLOTS),
        pong: PongSlot::default(),
        err_hdr: Box::new([0; HEADER_LEN]),
        err_text: Box::new([0; MAX_ERROR_TEXT as usize]),
        shut: false,
        peer,
        control,
        v,
    };
    c.run()
}

impl Conn {
    fn run(&mut self) -> String {
        loop {
            self.check_superseded();
            // Frames left in the stage while every slot was busy, now that some are free.
            self.take_frames();
            self.post_recv();
            if let Some(sqe) = self.sender.next_sqe(self.fd, UD_SEND) {
                self.push(sqe);
            }
            if let Some(why) = self.core.closing() {
                if !self.recv_in_flight && !self.sender.in_flight() && self.core.applying() == 0 {
                    return why.to_string();
                }
            }
            // Wake at least every tick, so a primary that went silent (it pings every 500 ms)
            // is noticed even when no completion comes.
            let ts = io_uring::types::Timespec::from(crate::volume::queue::TICK);
            let args = io_uring::types::SubmitArgs::new().timespec(&ts);
            if let Err(e) = self.ring.submitter().submit_with_args(1, &args) {
                if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::ETIME)) {
                    self.check_silence();
                    continue;
                }
                // Returning now would free buffers the kernel may still write into, and let a
                // newer link start while local writes of this one are in flight. So end the
                // link and keep reaping until it has drained (such errors are transient:
                // EAGAIN, EBUSY, ENOMEM; a drained link returns above).
                if self.core.closing().is_none() {
                    tracing::error!(volume = %self.v.config.name, "io_uring wait failed: {e}; ending the link");
                    self.close(format!("io_uring wait failed: {e}"));
                }
                // The completion queue is shared memory: it is reaped below without the ring.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            self.check_silence();
            self.check_superseded();
            loop {
                let Some(cqe) = self.ring.completion().next() else { break };
                let (ud, res) = (cqe.user_data(), cqe.result());
                match ud & !0xffff_ffff {
                    UD_RECV => self.on_recv(res),
                    UD_SEND => self.on_send(res),
                    UD_LOCAL => self.on_local((ud & 0xffff) as u16, res),
                    _ => tracing::error!("unknown completion {ud:#x}"),
                }
            }
        }
    }

    /// The session rule: once a newer link for this queue exists, nothing read or completed
    /// from here on is applied or acknowledged (the core is closed before any completion that
    /// follows is handled).
    fn check_superseded(&mut self) {
        if self.core.closing().is_none() && self.control.is_superseded() {
            self.close(format!("superseded by a newer link (session {} ended)", self.control.session));
        }
    }

    /// Ends a link from which nothing has been heard for the peer timeout: a half-open or
    /// silent connection must not hold its slot (or its session) forever.
    fn check_silence(&mut self) {
        if self.core.on_tick(Instant::now()).is_some() {
            self.shut_socket();
        }
    }

    fn push(&mut self, sqe: io_uring::squeue::Entry) {
        // SAFETY: every entry points at memory owned by `self` (boxed headers, slot buffers,
        // the sender's iovecs) that outlives its completion: `run` returns only when nothing
        // is in flight.
        unsafe { crate::volume::ring::push_retrying(&mut self.ring, &sqe) }
    }

    fn close(&mut self, why: String) {
        self.core.close(why);
        self.shut_socket();
    }

    fn shut_socket(&mut self) {
        if !self.shut {
            self.shut = true;
            // SAFETY: plain syscall on our socket; makes an in-flight RECV finish.
            unsafe { libc::shutdown(self.fd, libc::SHUT_RD) };
        }
    }

    /// Posts the next receive: the rest of the current payload in place, then the stage.
    /// Without MSG_WAITALL it completes with whatever has arrived, however little.
    fn post_recv(&mut self) {
        if self.recv_in_flight {
            return;
        }
        let (payload, want) = match self.core.recv_next() {
            RecvNext::Nothing => return,
            RecvNext::Header => (std::ptr::null_mut(), 0),
            RecvNext::Payload(slot) => {
                let len = self.core.frame(slot).map_or(0, |f| f.length as usize);
                let buf = self.slots[slot as usize].buf.as_ref().expect("payload slot has a buffer");
                assert!(self.got < len && len <= buf.as_slice().len());
                // SAFETY: got < frame length <= buffer length.
                (unsafe { buf.as_ptr().add(self.got) }, len - self.got)
            }
        };
        // `take_frames` ran dry: what is left is less than a header, or nothing when a
        // payload is wanted (it would have been taken into the payload).
        assert!(self.tail - self.head < HEADER_LEN && (want == 0 || self.head == self.tail));
        self.stage.copy_within(self.head..self.tail, 0);
        self.tail -= self.head;
        self.head = 0;
        // SAFETY: tail < HEADER_LEN < stage length: inside the boxed stage.
        let stage = unsafe { self.stage.as_mut_ptr().add(self.tail) };
        let stage = libc::iovec { iov_base: stage as *mut _, iov_len: STAGE_RECV_BYTES };
        assert!(self.tail + STAGE_RECV_BYTES <= self.stage.len());
        let iovs = if want > 0 {
            *self.recv_iov = [libc::iovec { iov_base: payload as *mut _, iov_len: want }, stage];
            2
        } else {
            self.recv_iov[0] = stage;
            1
        };
        self.recv_msg.msg_iov = self.recv_iov.as_mut_ptr();
        self.recv_msg.msg_iovlen = iovs;
        self.recv_payload_want = want;
        self.recv_in_flight = true;
        let sqe = opcode::RecvMsg::new(types::Fd(self.fd), &mut *self.recv_msg as *mut libc::msghdr)
            .build()
            .user_data(UD_RECV);
        self.push(sqe);
    }

    fn on_recv(&mut self, res: i32) {
        self.recv_in_flight = false;
        // Whatever this receive brought belongs to a superseded link if the flag is set now:
        // dropped unapplied.
        self.check_superseded();
        if self.core.closing().is_some() {
            return;
        }
        if res <= 0 {
            let why = if res == 0 {
                "primary closed the connection".to_string()
            } else {
                format!("receive failed: {}", errno_text(-res))
            };
            self.close(why);
            return;
        }
        let now = Instant::now();
        self.core.on_heard(now);
        self.v.fence.on_peer_heard(now);
        let res = res as usize;
        let to_payload = res.min(self.recv_payload_want);
        self.tail += res - to_payload;
        assert!(self.tail <= self.stage.len());
        if self.recv_payload_want > 0 {
            self.got += to_payload;
            if let RecvNext::Payload(slot) = self.core.recv_next() {
                self.payload_progress(slot);
            }
        }
        self.take_frames();
    }

    /// Takes every whole header, and as much payload as there is, from the stage, until it
    /// runs dry or no slot is free (the rest stays for later: TCP pushes back meanwhile).
    fn take_frames(&mut self) {
        loop {
            match self.core.recv_next() {
                RecvNext::Nothing => return,
                RecvNext::Header => {
                    if self.tail - self.head < HEADER_LEN {
                        return;
                    }
                    let hdr: [u8; HEADER_LEN] =
                        self.stage[self.head..self.head + HEADER_LEN].try_into().expect("a header's length");
                    self.head += HEADER_LEN;
                    self.got = 0;
                    self.on_header(&hdr);
                }
                RecvNext::Payload(slot) => {
                    let len = self.core.frame(slot).map_or(0, |f| f.length as usize);
                    let n = (len - self.got).min(self.tail - self.head);
                    if n == 0 {
                        return;
                    }
                    let buf = self.slots[slot as usize].buf.as_mut().expect("payload slot has a buffer");
                    buf.as_mut_slice()[self.got..self.got + n].copy_from_slice(&self.stage[self.head..self.head + n]);
                    self.head += n;
                    self.got += n;
                    self.payload_progress(slot);
                }
            }
        }
    }

    fn on_header(&mut self, hdr: &[u8; HEADER_LEN]) {
        let decoded = decode_header(hdr, &self.v.geometry).map_err(|e| e.to_string());
        let (out, adopt) = self.core.on_header(decoded, self.v.epoch(), self.v.disk.is_failed());
        if let Some(e) = adopt {
            // A newer primary: remember its epoch so an older one is refused from now,
            // after restarts too (rare: once per promotion, so a metadata write here).
            if self.v.epoch.fetch_max(e, Ordering::Relaxed) < e {
                crate::fencing::persist_epoch(&self.v, e);
            }
        }
        self.act(out);
    }

    /// Applies slot's WRITE once its whole payload is in.
    fn payload_progress(&mut self, slot: u16) {
        let Some(f) = self.core.frame(slot) else { return };
        assert!(self.got <= f.length as usize);
        if self.got < f.length as usize {
            return;
        }
        self.got = 0;
        let buf = self.slots[slot as usize].buf.as_ref().expect("payload slot has a buffer");
        let crc = self
            .v
            .config
            .payload_checksum
            .admits(&f)
            .and_then(|()| verify_payload(&f, &buf.as_slice()[..f.length as usize]).map_err(|e| e.to_string()));
        let out = self.core.on_payload(crc, self.v.disk.is_failed());
        self.act(out);
    }

    /// Carries out what the core decided.
    fn act(&mut self, out: OnHeader) {
        match out {
            OnHeader::ReceivePayload(slot) => {
                let s = &mut self.slots[slot as usize];
                if s.buf.is_none() {
                    s.buf = Some(AlignedBuf::new(self.v.geometry.max_payload as usize));
                }
            }
            OnHeader::Apply(slot) => {
                self.slots[slot as usize].done = 0;
                QueueStats::add(&self.stats.inflight, 1);
                self.issue_local(slot);
            }
            OnHeader::AckError(slot, status) => self.send_ack(slot, status),
            OnHeader::Pong(seq) => self.pong.answer(&mut self.sender, seq),
            OnHeader::Nothing => {}
            OnHeader::Refuse(errno, why) => {
                tracing::error!(volume = %self.v.config.name, peer = %self.peer, "{why}; dropping the link");
                let text = why.as_bytes();
                let n = text.len().min(self.err_text.len());
                self.err_text[..n].copy_from_slice(&text[..n]);
                Frame::error(-errno, &self.err_text[..n]).encode(&mut self.err_hdr);
                self.sender.enqueue(SendItem {
                    header: self.err_hdr.as_ptr(),
                    payload: self.err_text.as_ptr(),
                    payload_len: n as u32,
                    fixed: None,
                });
                self.shut_socket();
            }
            OnHeader::Close(_) => self.shut_socket(),
        }
    }

    fn issue_local(&mut self, slot: u16) {
        let Some(f) = self.core.frame(slot) else { return };
        if f.kind == FrameKind::Write && !f.fua() && self.v.config.io_mode == IoMode::Buffered {
            match self.write_inline(slot) {
                InlineWrite::Done(res) => return self.on_local(slot, res),
                InlineWrite::WouldBlock { .. } => {} // the rest on the ring
            }
        }
        let s = &self.slots[slot as usize];
        let (op, buf) = match f.kind {
            FrameKind::Write => {
                (LocalOp::Write { fua: f.fua() }, s.buf.as_ref().expect("write slot has a buffer").as_ptr())
            }
            FrameKind::Flush => (LocalOp::Flush, std::ptr::null_mut()),
            _ => (LocalOp::PunchHole, std::ptr::null_mut()),
        };
        let sqe = local_io::sqe(self.v.file.as_raw_fd(), op, f.offset, f.length, buf, s.done);
        self.push(sqe.user_data(UD_LOCAL | slot as u64));
    }

    /// Writes the rest of slot's payload on this thread (`InlineWriter`: why): the bytes
    /// written or the errno, or `WouldBlock` with the progress recorded in the slot.
    fn write_inline(&mut self, slot: u16) -> InlineWrite {
        let Some(f) = self.core.frame(slot) else { return InlineWrite::Done(-libc::EIO) };
        let s = &mut self.slots[slot as usize];
        let buf = &s.buf.as_ref().expect("write slot has a buffer").as_slice()[..f.length as usize];
        let rest = &buf[s.done as usize..];
        let res = self.inline_writer.write(self.v.file.as_raw_fd(), rest, f.offset + s.done as u64);
        if let InlineWrite::WouldBlock { written } = res {
            s.done += written;
        }
        res
    }

    /// Queues the ack (or error ack) of `slot`; the slot is freed once the ack is sent.
    fn send_ack(&mut self, slot: u16, status: i32) {
        let Some(f) = self.core.frame(slot) else { return };
        let ack =
            if f.kind == FrameKind::Flush { Frame::flush_ack(f.seq, status) } else { Frame::write_ack(f.seq, status) };
        let s = &mut self.slots[slot as usize];
        ack.encode(&mut s.ack);
        let n = self.sender.enqueue(SendItem::header_only(s.ack.as_ptr()));
        self.ack_fifo.push_back((slot, n));
    }

    fn on_local(&mut self, slot: u16, res: i32) {
        let Some(f) = self.core.frame(slot) else { return };
        let s = &mut self.slots[slot as usize];
        let mut status = 0;
        if res < 0 {
            status = res;
        } else if f.kind == FrameKind::Write {
            s.done += res as u32;
            if res == 0 {
                status = -libc::EIO;
            } else if s.done < f.length {
                // Short write: issue the rest.
                self.issue_local(slot);
                return;
            }
        }
        QueueStats::sub(&self.stats.inflight, 1);
        if status < 0 {
            let why = format!("{} at {} (+{}) failed: {}", f.kind.name(), f.offset, f.length, errno_text(-status));
            tracing::error!(volume = %self.v.config.name, "local I/O failed: {why}");
            self.v.disk.latch_failed(&self.v.config.name, &why);
        }
        let Some(ack) = self.core.on_applied(slot, status, self.v.disk.is_failed()) else { return };
        if ack == 0 {
            match f.kind {
                FrameKind::Write => {
                    QueueStats::add(&self.stats.local_write_requests, 1);
                    QueueStats::add(&self.stats.local_write_bytes, f.length as u64);
                }
                FrameKind::Flush => QueueStats::add(&self.stats.flushes, 1),
                _ => {}
            }
        }
        self.send_ack(slot, ack);
    }

    fn on_send(&mut self, res: i32) {
        if let Err(errno) = self.sender.complete(res) {
            self.sender.reset();
            self.close(format!("send failed: {}", errno_text(errno)));
            return;
        }
        while let Some(&(slot, n)) = self.ack_fifo.front() {
            if self.sender.frames_sent <= n {
                break;
            }
            self.ack_fifo.pop_front();
            self.core.on_ack_sent(slot);
        }
    }
}
