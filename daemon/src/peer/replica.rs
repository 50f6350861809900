//! The secondary's side of the write path: one connection from the primary, applied to the
//! local backing file.
//!
//! Each connection runs on its own thread with its own io_uring. A frame header is received,
//! then a WRITE's payload straight into a write buffer (no copy), the write is issued, and the
//! next header is received while it runs, so many writes are in flight. The ack is sent only
//! after the local write completed (protocol C); for FUA, after it is durable (RWF_DSYNC).
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
use crate::volume::local_io::{self, errno_text, AlignedBuf, LocalOp};
use crate::volume::stats::QueueStats;
use crate::volume::VolumeShared;

/// Writes a connection may have in flight on the secondary; beyond this it stops reading the
/// socket and TCP pushes back on the primary.
pub const REPLICA_SLOTS: usize = 64;

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
    hdr: Box<[u8; HEADER_LEN]>,
    /// Bytes of the current header, or of the current payload, received so far.
    got: usize,
    recv_in_flight: bool,
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
        hdr: Box::new([0; HEADER_LEN]),
        got: 0,
        recv_in_flight: false,
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

    fn post_recv(&mut self) {
        if self.recv_in_flight {
            return;
        }
        let (ptr, want) = match self.core.recv_next() {
            RecvNext::Nothing => return,
            // SAFETY: got < HEADER_LEN, inside the boxed header.
            RecvNext::Header => (unsafe { self.hdr.as_mut_ptr().add(self.got) }, HEADER_LEN - self.got),
            RecvNext::Payload(slot) => {
                let len = self.core.frame(slot).map_or(0, |f| f.length as usize);
                let buf = self.slots[slot as usize].buf.as_ref().expect("payload slot has a buffer");
                // SAFETY: got < frame length <= buffer length.
                (unsafe { buf.as_ptr().add(self.got) }, len - self.got)
            }
        };
        self.recv_in_flight = true;
        let sqe =
            opcode::Recv::new(types::Fd(self.fd), ptr, want as u32).flags(libc::MSG_WAITALL).build().user_data(UD_RECV);
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
        self.got += res as usize;
        match self.core.recv_next() {
            RecvNext::Header if self.got == HEADER_LEN => {
                self.got = 0;
                let decoded = decode_header(&self.hdr, &self.v.geometry).map_err(|e| e.to_string());
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
            RecvNext::Payload(slot) => {
                let Some(f) = self.core.frame(slot) else { return };
                if self.got < f.length as usize {
                    return;
                }
                self.got = 0;
                let buf = self.slots[slot as usize].buf.as_ref().expect("payload slot has a buffer");
                // SAFETY: the buffer holds `length` received bytes.
                let payload = unsafe { std::slice::from_raw_parts(buf.as_ptr(), f.length as usize) };
                let crc = verify_payload(&f, payload).map_err(|e| e.to_string());
                let out = self.core.on_payload(crc, self.v.disk.is_failed());
                self.act(out);
            }
            _ => {}
        }
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
                });
                self.shut_socket();
            }
            OnHeader::Close(_) => self.shut_socket(),
        }
    }

    fn issue_local(&mut self, slot: u16) {
        let Some(f) = self.core.frame(slot) else { return };
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

    /// Queues the ack (or error ack) of `slot`; the slot is freed once the ack is sent.
    fn send_ack(&mut self, slot: u16, status: i32) {
        let Some(f) = self.core.frame(slot) else { return };
        let ack =
            if f.kind == FrameKind::Flush { Frame::flush_ack(f.seq, status) } else { Frame::write_ack(f.seq, status) };
        let s = &mut self.slots[slot as usize];
        ack.encode(&mut s.ack);
        let n = self.sender.enqueue(SendItem { header: s.ack.as_ptr(), payload: std::ptr::null(), payload_len: 0 });
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
