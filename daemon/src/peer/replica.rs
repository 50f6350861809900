//! The secondary's side of the write path: one connection from the primary, applied to the
//! local backing file.
//!
//! Each connection runs on its own thread with its own io_uring. A frame header is received,
//! then a WRITE's payload straight into a write buffer (no copy), the write is issued, and the
//! next header is received while it runs, so many writes are in flight. The ack is sent only
//! after the local write completed (protocol C); for FUA, after it is durable (RWF_DSYNC).
//! A write from an epoch lower than this node's is refused with an ERROR frame and the link is
//! dropped: that primary has been replaced (design, "epoch").

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use metroblk_protocol::{decode_header, verify_payload, Frame, FrameKind, HEADER_LEN, MAX_ERROR_TEXT};

use super::sender::{FrameSender, SendItem};
use super::sessions::LinkControl;
use crate::volume::queue::errno_text;
use crate::volume::stats::QueueStats;
use crate::volume::VolumeShared;

/// Writes a connection may have in flight on the secondary; beyond this it stops reading the
/// socket and TCP pushes back on the primary.
pub const REPLICA_SLOTS: usize = 64;

const UD_RECV: u64 = 1 << 32;
const UD_SEND: u64 = 2 << 32;
const UD_LOCAL: u64 = 3 << 32;

/// A 4 KiB-aligned buffer (O_DIRECT needs it), allocated on first use.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("valid layout");
        // SAFETY: non-zero size; the result is checked.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

struct RSlot {
    buf: Option<AlignedBuf>,
    frame: Frame,
    done: u32,
    ack: [u8; HEADER_LEN],
}

enum RecvPhase {
    Header { got: usize },
    Payload { slot: u16, got: usize },
}

struct Conn {
    v: Arc<VolumeShared>,
    stats: Arc<QueueStats>,
    /// Owns the socket `fd` refers to; closed when the connection ends.
    _sock: OwnedFd,
    fd: RawFd,
    ring: IoUring,
    hdr: Box<[u8; HEADER_LEN]>,
    phase: RecvPhase,
    recv_in_flight: bool,
    slots: Vec<RSlot>,
    free: Vec<u16>,
    local_in_flight: usize,
    sender: FrameSender,
    /// Slots whose ack is queued, with its frame number: freed once the ack is sent.
    ack_fifo: VecDeque<(u16, u64)>,
    pong: Box<[u8; HEADER_LEN]>,
    pong_frame: Option<u64>,
    err_hdr: Box<[u8; HEADER_LEN]>,
    err_text: Box<[u8; MAX_ERROR_TEXT as usize]>,
    closing: Option<String>,
    peer: String,
    /// When bytes last arrived from the primary.
    last_heard: std::time::Instant,
    /// Set when a newer link for this queue arrived: apply and ack nothing more.
    control: Arc<LinkControl>,
}

/// Serves one authenticated connection until it ends. Returns why it ended.
pub fn serve(v: Arc<VolumeShared>, stream: TcpStream, peer: String, control: Arc<LinkControl>) -> String {
    let _ = stream.set_nodelay(true);
    if let Err(e) = super::set_dead_peer_detection(&stream) {
        return format!("cannot set keepalive on the link: {e}");
    }
    let _ = stream.set_nonblocking(true);
    let sock = OwnedFd::from(stream);
    let ring = match IoUring::builder().build(256) {
        Ok(r) => r,
        Err(e) => return format!("cannot create io_uring: {e}"),
    };
    let stats = v.queue_stats[0].clone();
    let mut c = Conn {
        fd: sock.as_raw_fd(),
        _sock: sock,
        stats,
        ring,
        hdr: Box::new([0; HEADER_LEN]),
        phase: RecvPhase::Header { got: 0 },
        recv_in_flight: false,
        slots: (0..REPLICA_SLOTS)
            .map(|_| RSlot { buf: None, frame: Frame::ping(0), done: 0, ack: [0; HEADER_LEN] })
            .collect(),
        free: (0..REPLICA_SLOTS as u16).rev().collect(),
        local_in_flight: 0,
        sender: FrameSender::new(REPLICA_SLOTS + 2),
        ack_fifo: VecDeque::with_capacity(REPLICA_SLOTS),
        pong: Box::new([0; HEADER_LEN]),
        pong_frame: None,
        err_hdr: Box::new([0; HEADER_LEN]),
        err_text: Box::new([0; MAX_ERROR_TEXT as usize]),
        closing: None,
        peer,
        last_heard: std::time::Instant::now(),
        control,
        v,
    };
    c.run()
}

impl Conn {
    fn run(&mut self) -> String {
        loop {
            self.post_recv();
            if let Some(sqe) = self.sender.next_sqe(self.fd, UD_SEND) {
                self.push(sqe);
            }
            if self.closing.is_some() && !self.recv_in_flight && !self.sender.in_flight() && self.local_in_flight == 0 {
                return self.closing.take().unwrap_or_default();
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
                // Without the ring nothing in flight can be reaped; the kernel cancels it when
                // the ring closes. Nothing was acknowledged that was not written.
                return format!("io_uring wait failed: {e}");
            }
            self.check_silence();
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

    /// Ends a link from which nothing has been heard for the peer timeout: a half-open or
    /// silent connection must not hold its slot (or its session) forever.
    fn check_silence(&mut self) {
        let silent = self.last_heard.elapsed();
        if self.closing.is_none() && silent > crate::volume::queue::PEER_TIMEOUT {
            self.close(format!("nothing heard from the primary for {} ms", silent.as_millis()));
        }
    }

    fn push(&mut self, sqe: io_uring::squeue::Entry) {
        loop {
            // SAFETY: every entry points at memory owned by `self` (boxed headers, slot
            // buffers, the sender's iovecs) that outlives its completion: `run` returns only
            // when nothing is in flight.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            let _ = self.ring.submit();
        }
    }

    fn close(&mut self, why: String) {
        if self.closing.is_none() {
            self.closing = Some(why);
            // SAFETY: plain syscall on our socket; makes an in-flight RECV finish.
            unsafe { libc::shutdown(self.fd, libc::SHUT_RD) };
        }
    }

    fn post_recv(&mut self) {
        if self.recv_in_flight || self.closing.is_some() {
            return;
        }
        let (ptr, want) = match self.phase {
            RecvPhase::Header { got } => {
                // Backpressure: read no new request until a slot is free.
                if self.free.is_empty() {
                    return;
                }
                // SAFETY: got < HEADER_LEN, inside the boxed header.
                (unsafe { self.hdr.as_mut_ptr().add(got) }, HEADER_LEN - got)
            }
            RecvPhase::Payload { slot, got } => {
                let s = &mut self.slots[slot as usize];
                let buf = s.buf.as_ref().expect("payload slot has a buffer");
                // SAFETY: got < frame length <= buffer length.
                (unsafe { buf.ptr.add(got) }, s.frame.length as usize - got)
            }
        };
        self.recv_in_flight = true;
        let sqe =
            opcode::Recv::new(types::Fd(self.fd), ptr, want as u32).flags(libc::MSG_WAITALL).build().user_data(UD_RECV);
        self.push(sqe);
    }

    fn on_recv(&mut self, res: i32) {
        self.recv_in_flight = false;
        if self.closing.is_none() && self.control.is_superseded() {
            // Whatever this receive brought belongs to a superseded link: dropped unapplied.
            self.close(format!("superseded by a newer link (session {} ended)", self.control.session));
            return;
        }
        if res > 0 {
            self.last_heard = std::time::Instant::now();
        }
        if self.closing.is_some() {
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
        let n = res as usize;
        match self.phase {
            RecvPhase::Header { got } => {
                let got = got + n;
                if got < HEADER_LEN {
                    self.phase = RecvPhase::Header { got };
                    return;
                }
                self.phase = RecvPhase::Header { got: 0 };
                self.on_header();
            }
            RecvPhase::Payload { slot, got } => {
                let got = got + n;
                let s = &self.slots[slot as usize];
                if got < s.frame.length as usize {
                    self.phase = RecvPhase::Payload { slot, got };
                    return;
                }
                self.phase = RecvPhase::Header { got: 0 };
                let buf = s.buf.as_ref().expect("payload slot has a buffer");
                // SAFETY: the buffer holds `length` received bytes.
                let payload = unsafe { std::slice::from_raw_parts(buf.ptr, s.frame.length as usize) };
                if let Err(e) = verify_payload(&s.frame, payload) {
                    self.free.push(slot);
                    self.refuse(libc::EBADMSG, &format!("malformed frame from primary: {e}"));
                    return;
                }
                self.issue_local(slot);
            }
        }
    }

    fn on_header(&mut self) {
        let frame = match decode_header(&self.hdr, &self.v.geometry) {
            Ok(f) => f,
            Err(e) => {
                self.refuse(libc::EBADMSG, &format!("malformed frame from primary: {e}"));
                return;
            }
        };
        match frame.kind {
            FrameKind::Write | FrameKind::Flush | FrameKind::Discard | FrameKind::WriteZeroes => {
                let mine = self.v.epoch();
                if frame.epoch < mine {
                    self.refuse(
                        libc::ESTALE,
                        &format!("write from epoch {} refused: this node is at epoch {mine}", frame.epoch),
                    );
                    return;
                }
                if frame.epoch > mine {
                    // A newer primary: remember its epoch so an older one is refused from now.
                    self.v.epoch.fetch_max(frame.epoch, Ordering::Relaxed);
                }
                let slot = self.free.pop().expect("header read only with a free slot");
                let s = &mut self.slots[slot as usize];
                s.frame = frame;
                s.done = 0;
                if frame.kind == FrameKind::Write {
                    if s.buf.is_none() {
                        s.buf = Some(AlignedBuf::new(self.v.geometry.max_payload as usize));
                    }
                    self.phase = RecvPhase::Payload { slot, got: 0 };
                } else {
                    self.issue_local(slot);
                }
            }
            FrameKind::Ping => {
                let busy = self.pong_frame.is_some_and(|n| self.sender.frames_sent <= n);
                if !busy {
                    Frame::pong(frame.seq).encode(&mut self.pong);
                    let n = self.sender.enqueue(SendItem {
                        header: self.pong.as_ptr(),
                        payload: std::ptr::null(),
                        payload_len: 0,
                    });
                    self.pong_frame = Some(n);
                }
            }
            FrameKind::Pong => {}
            FrameKind::Error => {
                // The text follows; the link ends either way, so name the code only.
                self.close(format!("primary reported an error ({})", frame.status));
            }
            other => self.refuse(libc::EPROTO, &format!("unexpected {other:?} frame from primary")),
        }
    }

    /// Sends an ERROR frame with `why` and ends the connection.
    fn refuse(&mut self, errno: i32, why: &str) {
        tracing::error!(volume = %self.v.config.name, peer = %self.peer, "{why}; dropping the link");
        if self.closing.is_none() {
            let text = why.as_bytes();
            let n = text.len().min(self.err_text.len());
            self.err_text[..n].copy_from_slice(&text[..n]);
            Frame::error(-errno, &self.err_text[..n]).encode(&mut self.err_hdr);
            self.sender.enqueue(SendItem {
                header: self.err_hdr.as_ptr(),
                payload: self.err_text.as_ptr(),
                payload_len: n as u32,
            });
        }
        self.close(why.to_string());
    }

    fn issue_local(&mut self, slot: u16) {
        if self.v.disk.is_failed() {
            // Errors latch: a failed disk applies nothing more; the request is acked with the
            // error (the primary then treats this node as lost and holds its writes).
            self.ack(slot, -libc::EIO);
            return;
        }
        let s = &self.slots[slot as usize];
        let f = s.frame;
        let fd = types::Fd(self.v.file.as_raw_fd());
        let sqe = match f.kind {
            FrameKind::Write => {
                let buf = s.buf.as_ref().expect("write slot has a buffer");
                // SAFETY: done < length <= buffer length.
                let p = unsafe { buf.ptr.add(s.done as usize) };
                let flags = if f.fua() { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(fd, p, f.length - s.done).offset(f.offset + s.done as u64).rw_flags(flags).build()
            }
            FrameKind::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            _ => opcode::Fallocate::new(fd, f.length as u64)
                .offset(f.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        };
        self.local_in_flight += 1;
        QueueStats::add(&self.stats.inflight, 1);
        self.push(sqe.user_data(UD_LOCAL | slot as u64));
    }

    /// Queues the ack (or error ack) of `slot`; the slot is freed once the ack is sent.
    fn ack(&mut self, slot: u16, status: i32) {
        let f = self.slots[slot as usize].frame;
        let ack =
            if f.kind == FrameKind::Flush { Frame::flush_ack(f.seq, status) } else { Frame::write_ack(f.seq, status) };
        let s = &mut self.slots[slot as usize];
        ack.encode(&mut s.ack);
        if self.closing.is_some() {
            self.free.push(slot);
            return;
        }
        let n = self.sender.enqueue(SendItem { header: s.ack.as_ptr(), payload: std::ptr::null(), payload_len: 0 });
        self.ack_fifo.push_back((slot, n));
    }

    fn on_local(&mut self, slot: u16, res: i32) {
        self.local_in_flight -= 1;
        QueueStats::sub(&self.stats.inflight, 1);
        let s = &mut self.slots[slot as usize];
        let f = s.frame;
        let mut status = 0;
        if res < 0 {
            status = res;
        } else if f.kind == FrameKind::Write {
            s.done += res as u32;
            if res == 0 {
                status = -libc::EIO;
            } else if s.done < f.length {
                self.issue_local(slot);
                return;
            }
        }
        if status < 0 {
            let why = format!("{} at {} (+{}) failed: {}", f.kind.name(), f.offset, f.length, errno_text(-status));
            tracing::error!(volume = %self.v.config.name, "local I/O failed: {why}");
            self.v.disk.latch_failed(&self.v.config.name, &why);
        } else if self.v.disk.is_failed() {
            // Linux reports a writeback error to one fsync only: once the disk has failed
            // (here or on another connection) nothing is acked as done.
            status = -libc::EIO;
        }
        match f.kind {
            FrameKind::Write if status == 0 => {
                QueueStats::add(&self.stats.local_write_requests, 1);
                QueueStats::add(&self.stats.local_write_bytes, f.length as u64);
            }
            FrameKind::Flush if status == 0 => QueueStats::add(&self.stats.flushes, 1),
            _ => {}
        }
        self.ack(slot, status);
    }

    fn on_send(&mut self, res: i32) {
        if let Err(errno) = self.sender.complete(res) {
            self.sender.reset();
            self.close(format!("send failed: {}", errno_text(errno)));
        }
        while let Some(&(slot, n)) = self.ack_fifo.front() {
            if self.sender.frames_sent <= n {
                break;
            }
            self.ack_fifo.pop_front();
            self.free.push(slot);
        }
    }
}
