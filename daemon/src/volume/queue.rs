//! The primary's write path for one queue: a state machine over request slots.
//!
//! A slot is one request tag (the ublk tag under ublk). A replicated request (WRITE, FLUSH,
//! DISCARD, WRITE_ZEROES) has two halves, the local I/O and the peer's acknowledgement, issued
//! at the same time; it completes when both are done (protocol C). A READ is local only.
//!
//! While the link is down, the peer half of every replicated request is *held*: not failed,
//! not completed. When a new connection arrives through the [`LinkHandoff`], held requests
//! are sent again in sequence order. Nothing is completed that the peer has not acknowledged
//! (design: "a primary never completes a write that its peer has not acknowledged").
//!
//! Everything here runs on the queue's thread; the steady state allocates nothing and takes
//! no lock (the hand-off mutex is touched only when a link comes up or goes down).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};
use metroblk_protocol::{Frame, FrameKind, HEADER_LEN};

use super::conflict::GranuleRange;
use super::local_io::{self, errno_text, InlineWrite, InlineWriter, LocalOp};
use super::request::{Half, RequestState};
use super::ring::{self, op, OwnRing, Submitter};
use super::stats::{LinkState, QueueStats};
use super::VolumeShared;
use crate::bitmap::Mark;
use crate::fencing::shared::PEER_FRESH;
use crate::peer::handoff::LinkHandoff;
use crate::peer::link::{LinkMachine, LinkPhase, TickAction};
use crate::peer::receiver::FrameReceiver;
use crate::peer::sender::{FrameSender, PongSlot, SendItem};

/// How often the queue checks the link and sends a keepalive PING.
pub const TICK: Duration = Duration::from_millis(500);
/// A peer that has not answered a PING for this long is declared lost.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// One block request. `buf` must stay valid (and, for WRITE, unchanged) until the request
/// completes; for O_DIRECT volumes it must be 4 KiB aligned. On a zero-copy queue a READ's
/// or WRITE's data is the ring's fixed buffer of the request's tag instead, and `buf` is
/// unused.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub kind: ReqKind,
    pub offset: u64,
    pub len: u32,
    pub fua: bool,
    pub buf: *mut u8,
}

struct Slot {
    busy: bool,
    req: Request,
    seq: u64,
    state: RequestState,
    /// Bytes of a READ/WRITE already transferred (short transfers are resumed).
    local_done: u32,
    local_res: i32,
    header: [u8; HEADER_LEN],
    /// The granules this request holds in the volume's conflict table (until it completes).
    range: Option<GranuleRange>,
    /// Fenced under `on_fence = "io-error"` while its peer half was held: completes with EIO.
    fail_fenced: bool,
    /// When a WRITE was submitted (its latency histograms; `None` for other kinds).
    submitted: Option<Instant>,
}

/// The link's I/O state; its phases and keepalive decisions are the pure [`LinkMachine`].
struct Link {
    machine: LinkMachine,
    sock: Option<OwnedFd>,
    sender: FrameSender,
    receiver: FrameReceiver,
    ping_header: [u8; HEADER_LEN],
    pong: PongSlot,
    ping_frame: Option<u64>,
}

pub struct Queue {
    qid: u16,
    shared: Arc<VolumeShared>,
    stats: Arc<QueueStats>,
    fd: RawFd,
    slots: Box<[Slot]>,
    /// Tags waiting for an overlapping request to complete, in submission order (capacity:
    /// the depth, so pushing never allocates).
    waiting: Vec<u16>,
    /// Tags waiting for their regions' write-intent bits to be durable (`bitmap/`).
    intent_waiting: Vec<u16>,
    /// Tags that arrived while the volume was fenced (`on_fence = "suspend"`), in order.
    fenced_waiting: Vec<u16>,
    /// Buffered writes to make on this thread at the end of the batch (`end_batch`), in issue
    /// order.
    inline_writes: Vec<u16>,
    /// Buffered non-FUA writes are made on the queue thread (`end_batch`), not on the ring.
    write_inline: bool,
    /// WRITE frames carry a crc32c (`payload_checksum`).
    payload_crc: bool,
    /// Zero copy (`VolumeShared::zero_copy`): a READ's or WRITE's data is the ring's fixed
    /// buffer of its tag (the request's pages, which ublk registered), moved with
    /// READ_FIXED / WRITE_FIXED and sent with SEND_ZC; never read by us, so WRITE frames
    /// carry no crc32c (only a volume with `payload_checksum = "none"` runs so) and no write
    /// is made inline (a pwrite needs the bytes in our memory).
    zero_copy: bool,
    inline_writer: InlineWriter,
    /// Tags done on both nodes whose completion came after the fence fell (`suspend`): they
    /// complete once it is lifted by a new lease (see `hold_completion_while_fenced`).
    fenced_done: Vec<u16>,
    link: Link,
    handoff: Arc<LinkHandoff>,
    eventfd_buf: Box<u64>,
    tick_ts: Box<types::Timespec>,
    next_seq: u64,
    started: bool,
    inflight: usize,
    /// False for a standalone volume: requests have no peer half.
    replicate: bool,
    /// The conflict rule (`conflict.rs`); off only in the pipeline benchmark's A/B case.
    order_conflicts: bool,
    /// The write-intent bitmap (`bitmap/`); off only in the pipeline benchmark's A/B case.
    mark_intent: bool,
}

// SAFETY: the raw buffer pointers in slots belong to the driver of this queue and are only
// used on the thread that owns the queue; the queue is moved to that thread before use.
unsafe impl Send for Queue {}

/// Why a request was refused before any I/O was issued (returned as a negative errno).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("offset {offset} length {len} is not aligned to the block size")]
    Misaligned { offset: u64, len: u32 },
    #[error("offset {offset} length {len} ends past the volume end")]
    OutOfRange { offset: u64, len: u32 },
    #[error("length {len} is zero or above the largest request")]
    BadLength { len: u32 },
    #[error("the local disk has failed; no write is accepted until it is re-attached")]
    DiskFailed,
    #[error("the volume is fenced: this node has lost its peer and the witness (on_fence = io-error)")]
    Fenced,
}

impl RequestError {
    pub fn errno(&self) -> i32 {
        match self {
            RequestError::DiskFailed | RequestError::Fenced => -libc::EIO,
            _ => -libc::EINVAL,
        }
    }
}

impl Queue {
    /// The queue thread ends (see `QueueTarget::retire`): operations may still be in flight
    /// on the ring, pointing into this queue's slots, link buffers and timer, which the ring's
    /// teardown cancels only after the thread exits. Those are kept (leaked: a few KiB per
    /// queue and role change); the link's socket is closed (an operation in flight holds the
    /// kernel's own reference to it) and everything else is released, above all the volume,
    /// so that a role change can open it afresh.
    pub fn retire(self) {
        let Queue { shared, stats, handoff, slots, mut link, eventfd_buf, tick_ts, .. } = self;
        drop(link.sock.take());
        std::mem::forget((slots, link, eventfd_buf, tick_ts));
        drop((shared, stats, handoff));
    }

    pub fn new(shared: Arc<VolumeShared>, qid: u16, depth: u16, handoff: Arc<LinkHandoff>) -> Queue {
        assert!(depth > 0 && depth <= crate::config::MAX_QUEUE_DEPTH);
        let slots = (0..depth)
            .map(|_| Slot {
                busy: false,
                req: Request { kind: ReqKind::Read, offset: 0, len: 0, fua: false, buf: std::ptr::null_mut() },
                seq: 0,
                state: RequestState { local: Half::None, peer: Half::None },
                local_done: 0,
                local_res: 0,
                header: [0; HEADER_LEN],
                range: None,
                fail_fenced: false,
                submitted: None,
            })
            .collect();
        shared.conflicts.register_queue(qid, handoff.eventfd());
        let stats = shared.queue_stats[qid as usize].clone();
        let replicate = shared.config.peer.is_some();
        let zero_copy = shared.zero_copy.load(std::sync::atomic::Ordering::Relaxed);
        let write_inline = shared.config.io_mode == crate::config::IoMode::Buffered && !zero_copy;
        let payload_crc = shared.config.payload_checksum.sends_crc() && !zero_copy;
        stats.set_link(if replicate { LinkState::Connecting } else { LinkState::Standalone });
        Queue {
            qid,
            fd: shared.file.as_raw_fd(),
            shared,
            stats,
            slots,
            waiting: Vec::with_capacity(depth as usize),
            intent_waiting: Vec::with_capacity(depth as usize),
            fenced_waiting: Vec::with_capacity(depth as usize),
            fenced_done: Vec::with_capacity(depth as usize),
            inline_writes: Vec::with_capacity(depth as usize),
            write_inline,
            payload_crc,
            zero_copy,
            inline_writer: InlineWriter::default(),
            link: Link {
                machine: LinkMachine::new(Instant::now(), PEER_TIMEOUT),
                sock: None,
                // A frame per slot plus PING and PONG.
                sender: FrameSender::new(depth as usize + 2),
                receiver: FrameReceiver::default(),
                ping_header: [0; HEADER_LEN],
                pong: PongSlot::default(),
                ping_frame: None,
            },
            handoff,
            eventfd_buf: Box::new(0),
            tick_ts: Box::new(types::Timespec::from(TICK)),
            next_seq: 1,
            started: false,
            inflight: 0,
            replicate,
            order_conflicts: true,
            mark_intent: true,
        }
    }

    /// Turns the write-intent bitmap off, for the pipeline benchmark only: it measures what the
    /// bitmap costs. Without it a crash can leave the copies different, unnoticed.
    pub fn without_write_intent_for_benchmark(mut self) -> Queue {
        self.mark_intent = false;
        self
    }

    /// Turns the conflict rule off, for the pipeline benchmark only: it measures what the rule
    /// costs. Without it overlapping writes can leave the two copies different.
    pub fn without_conflict_ordering_for_benchmark(mut self) -> Queue {
        self.order_conflicts = false;
        self
    }

    /// Whether READ and WRITE data are the ring's fixed buffers (see the field).
    pub fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    pub fn depth(&self) -> u16 {
        self.slots.len() as u16
    }

    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Requests whose peer half is held, waiting for a link.
    pub fn held(&self) -> usize {
        QueueStats::get(&self.stats.held) as usize
    }

    /// Requests not issued yet: waiting for an overlapping request, for their write-intent
    /// bits, or for the fence to lift.
    pub fn not_issued(&self) -> usize {
        self.waiting.len() + self.intent_waiting.len() + self.fenced_waiting.len()
    }

    pub fn link_is_up(&self) -> bool {
        self.link.machine.is_up()
    }

    /// Arms the queue's standing operations and asks for a link. Call once, before submit.
    pub fn start(&mut self, s: &mut impl Submitter) {
        assert!(!self.started);
        self.started = true;
        self.arm_eventfd(s);
        self.arm_tick(s);
        if self.replicate {
            self.handoff.request();
        }
    }

    fn arm_eventfd(&mut self, s: &mut impl Submitter) {
        let buf = &mut *self.eventfd_buf as *mut u64 as *mut u8;
        s.push(opcode::Read::new(types::Fd(self.handoff.eventfd()), buf, 8).build().user_data(ring::user_data(
            op::LINK_READY,
            0,
            0,
        )));
    }

    fn arm_tick(&mut self, s: &mut impl Submitter) {
        s.push(opcode::Timeout::new(&*self.tick_ts).build().user_data(ring::user_data(op::TICK, 0, 0)));
    }

    /// Starts request `tag`. On `Err` nothing was issued and the caller completes the request
    /// with `err.errno()`; the engine never touches bytes outside the volume.
    pub fn submit(&mut self, s: &mut impl Submitter, tag: u16, req: Request) -> Result<(), RequestError> {
        let geo = self.shared.geometry;
        if req.kind != ReqKind::Flush {
            let bs = geo.block_size as u64;
            if req.len == 0 || (req.len > super::MAX_IO_BYTES && matches!(req.kind, ReqKind::Read | ReqKind::Write)) {
                return Err(RequestError::BadLength { len: req.len });
            }
            if req.offset % bs != 0 || req.len as u64 % bs != 0 {
                return Err(RequestError::Misaligned { offset: req.offset, len: req.len });
            }
            match req.offset.checked_add(req.len as u64) {
                Some(end) if end <= geo.volume_size => {}
                _ => return Err(RequestError::OutOfRange { offset: req.offset, len: req.len }),
            }
        }
        // Errors latch: a failed disk takes no more writes (design, "Disk errors latch").
        if req.kind != ReqKind::Read && self.shared.disk.is_failed() {
            return Err(RequestError::DiskFailed);
        }
        // Fenced (design: "Losing the peer"): neither peer nor lease; serve nothing.
        let fenced = self.shared.fence.is_fenced(|now| self.link.machine.is_fresh(now, PEER_FRESH));
        if fenced && self.shared.fence.fails_fenced_io() {
            return Err(RequestError::Fenced);
        }
        let slot = &mut self.slots[tag as usize];
        assert!(!slot.busy, "tag {tag} submitted twice");
        assert!(slot.range.is_none());
        slot.busy = true;
        slot.fail_fenced = false;
        slot.req = req;
        slot.seq = (self.next_seq << 16) | tag as u64;
        self.next_seq += 1;
        slot.local_done = 0;
        slot.local_res = 0;
        slot.submitted = (req.kind == ReqKind::Write).then(Instant::now);
        // Not started: nothing to hold, re-send or complete until `start`.
        slot.state = RequestState { local: Half::None, peer: Half::None };
        self.inflight += 1;
        QueueStats::add(&self.stats.inflight, 1);
        if fenced || !self.fenced_waiting.is_empty() {
            // In order behind those already waiting.
            self.fenced_waiting.push(tag);
            QueueStats::add(&self.stats.parked, 1);
            return Ok(());
        }
        self.dispatch(s, tag);
        Ok(())
    }

    /// Takes request `tag`'s range in the conflict table (or waits for it) and starts it.
    fn dispatch(&mut self, s: &mut impl Submitter, tag: u16) {
        let req = self.slots[tag as usize].req;
        let ordered = self.order_conflicts
            && self.replicate
            && matches!(req.kind, ReqKind::Write | ReqKind::Discard | ReqKind::WriteZeroes);
        if !ordered {
            self.start_request(s, tag);
            return;
        }
        let range = self.shared.conflicts.range(req.offset, req.len as u64);
        if self.shared.conflicts.try_acquire(range, self.qid) {
            self.slots[tag as usize].range = Some(range);
            self.start_request(s, tag);
        } else {
            // Overlaps a replicated request in flight: issued when that one has completed on
            // both nodes (`conflict.rs`).
            QueueStats::add(&self.stats.conflict_waits, 1);
            self.waiting.push(tag);
            self.shared.conflicts.set_waiting(self.qid, true);
            self.retry_waiting(s);
        }
    }

    /// Requests that arrived while fenced: started once the fence is lifted (a lease again,
    /// or the peer back); failed with EIO under `io-error`, with every held request.
    fn retry_fenced(&mut self, s: &mut impl Submitter, done: &mut impl FnMut(u16, i32)) {
        if !self.shared.fence.enabled {
            return;
        }
        if self.shared.fence.is_deposed() && self.link.machine.is_up() {
            // Closed at once, so the peer sees its old primary leave (a switchover is then
            // as quick as the peer's promotion; nothing is in flight after the drain).
            self.link_failed(s, "this node is no longer the primary");
            self.maybe_close_link(s);
        }
        if !self.shared.fence.is_fenced(|now| self.link.machine.is_fresh(now, PEER_FRESH)) {
            let waiting = std::mem::take(&mut self.fenced_waiting);
            QueueStats::sub(&self.stats.parked, waiting.len() as u64);
            for &tag in &waiting {
                self.dispatch(s, tag);
            }
            // Hand the capacity back: no allocation on the next fence.
            self.fenced_waiting = waiting;
            self.fenced_waiting.clear();
            let finished = std::mem::take(&mut self.fenced_done);
            QueueStats::sub(&self.stats.parked, finished.len() as u64);
            for &tag in &finished {
                self.finish(s, tag, done);
            }
            self.fenced_done = finished;
            self.fenced_done.clear();
            return;
        }
        if !self.shared.fence.fails_fenced_io() {
            return; // suspend: everything waits
        }
        QueueStats::sub(&self.stats.parked, self.fenced_done.len() as u64);
        while let Some(tag) = self.fenced_done.pop() {
            self.slots[tag as usize].fail_fenced = true;
            self.finish(s, tag, done);
        }
        QueueStats::sub(&self.stats.parked, self.fenced_waiting.len() as u64);
        while let Some(tag) = self.fenced_waiting.pop() {
            let slot = &mut self.slots[tag as usize];
            slot.local_res = -libc::EIO;
            slot.state = RequestState { local: Half::Done, peer: Half::None };
            self.maybe_complete(s, tag, done);
        }
        let mut failed = 0;
        for tag in 0..self.slots.len() {
            let slot = &mut self.slots[tag];
            if slot.busy && slot.state.waive_peer() {
                slot.fail_fenced = true;
                failed += 1;
                self.maybe_complete(s, tag as u16, done);
            }
        }
        if failed > 0 {
            QueueStats::sub(&self.stats.held, failed);
            tracing::warn!(volume = %self.shared.config.name, qid = self.qid, failed, "fenced: held writes failed with EIO (on_fence = io-error)");
        }
    }

    /// Starts the waiting requests whose range is now free, in submission order.
    fn retry_waiting(&mut self, s: &mut impl Submitter) {
        let mut kept = 0;
        for i in 0..self.waiting.len() {
            let tag = self.waiting[i];
            let req = self.slots[tag as usize].req;
            let range = self.shared.conflicts.range(req.offset, req.len as u64);
            if self.shared.conflicts.try_acquire(range, self.qid) {
                self.slots[tag as usize].range = Some(range);
                self.start_request(s, tag);
            } else {
                self.waiting[kept] = tag;
                kept += 1;
            }
        }
        self.waiting.truncate(kept);
        if self.waiting.is_empty() {
            self.shared.conflicts.set_waiting(self.qid, false);
        }
    }

    /// Marks request `tag`'s regions in the write-intent bitmap, then issues it; a request to
    /// a cold region is parked until its bit is durable.
    fn start_request(&mut self, s: &mut impl Submitter, tag: u16) {
        let r = self.slots[tag as usize].req;
        if self.replicate
            && self.mark_intent
            && matches!(r.kind, ReqKind::Write | ReqKind::Discard | ReqKind::WriteZeroes)
            && self.shared.intent.mark_write(r.offset, r.len as u64, self.link.machine.is_up()) == Mark::Wait
        {
            QueueStats::add(&self.stats.intent_waits, 1);
            self.intent_waiting.push(tag);
            return;
        }
        self.issue_request(s, tag);
    }

    /// Issues the parked requests whose bits are now durable; fails them all once the
    /// bitmap cannot be written any more.
    fn retry_intent_waiting(&mut self, s: &mut impl Submitter, done: &mut impl FnMut(u16, i32)) {
        let failed = self.shared.intent.has_failed();
        let mut kept = 0;
        for i in 0..self.intent_waiting.len() {
            let tag = self.intent_waiting[i];
            let r = self.slots[tag as usize].req;
            let (first, last) = self.shared.intent.regions_of(r.offset, r.len as u64);
            if failed {
                let slot = &mut self.slots[tag as usize];
                slot.local_res = -libc::EIO;
                slot.state = RequestState { local: Half::Done, peer: Half::None };
                self.maybe_complete(s, tag, done);
            } else if self.shared.intent.is_durable(first, last) {
                self.issue_request(s, tag);
            } else {
                self.intent_waiting[kept] = tag;
                kept += 1;
            }
        }
        self.intent_waiting.truncate(if failed { 0 } else { kept });
    }

    /// While the link is down and the volume may go on alone (durably recorded), the peer
    /// half of every held request is waived: it completes on its local I/O alone, and its
    /// regions stay dirty for the resync.
    fn maybe_complete_alone(&mut self, s: &mut impl Submitter, done: &mut impl FnMut(u16, i32)) {
        if self.link.machine.is_up() || QueueStats::get(&self.stats.held) == 0 || !self.shared.intent.alone_allowed() {
            return;
        }
        // With a witness: only while the lease runs (the witness may promote the peer after).
        if !self.shared.fence.may_serve_without_peer(Instant::now()) {
            return;
        }
        // Counted, then the permission read again (see `WriteIntent::begin_alone`).
        if !self.shared.intent.begin_alone() {
            return;
        }
        if !self.shared.intent.may_complete_alone() {
            return; // the writer records it and wakes this queue
        }
        let mut waived = 0;
        for tag in 0..self.slots.len() {
            let slot = &mut self.slots[tag];
            if slot.busy && slot.state.waive_peer() {
                waived += 1;
                self.maybe_complete(s, tag as u16, done);
            }
        }
        QueueStats::sub(&self.stats.held, waived);
        QueueStats::add(&self.stats.completed_alone, waived);
    }

    /// Issues request `tag`'s local I/O and, if replicated, its frame to the peer.
    fn issue_request(&mut self, s: &mut impl Submitter, tag: u16) {
        let slot = &mut self.slots[tag as usize];
        assert!(slot.busy);
        slot.state = RequestState::new(slot.req.kind != ReqKind::Read && self.replicate);
        self.issue_local(s, tag);
        if self.slots[tag as usize].state.is_held() {
            self.encode_frame(tag);
            if self.link.machine.is_up() {
                self.send_slot(tag);
                self.kick_send(s);
            } else {
                QueueStats::add(&self.stats.held, 1);
            }
        }
    }

    /// Issues request `tag`'s local I/O: a buffered write at the end of the batch, on this
    /// thread (`end_batch`); the rest on the ring.
    fn issue_local(&mut self, s: &mut impl Submitter, tag: u16) {
        let r = self.slots[tag as usize].req;
        if self.write_inline && r.kind == ReqKind::Write && !r.fua {
            assert!(self.inline_writes.len() < self.slots.len());
            self.inline_writes.push(tag);
            return;
        }
        self.issue_local_on_ring(s, tag);
    }

    fn issue_local_on_ring(&mut self, s: &mut impl Submitter, tag: u16) {
        let slot = &self.slots[tag as usize];
        let r = slot.req;
        let op = match r.kind {
            ReqKind::Read => LocalOp::Read,
            ReqKind::Write => LocalOp::Write { fua: r.fua },
            ReqKind::Flush => LocalOp::Flush,
            ReqKind::Discard | ReqKind::WriteZeroes => LocalOp::PunchHole,
        };
        let sqe = if self.zero_copy {
            local_io::sqe_fixed(self.fd, op, r.offset, r.len, tag, slot.local_done)
        } else {
            local_io::sqe(self.fd, op, r.offset, r.len, r.buf, slot.local_done)
        };
        s.push(sqe.user_data(ring::user_data(op::LOCAL, tag, 0)));
    }

    fn encode_frame(&mut self, tag: u16) {
        let epoch = self.shared.epoch();
        let slot = &mut self.slots[tag as usize];
        let r = slot.req;
        let frame = match r.kind {
            ReqKind::Write if self.zero_copy => Frame::write_unchecked(slot.seq, epoch, r.offset, r.len, r.fua),
            ReqKind::Write => {
                // SAFETY: the caller's buffer holds `len` initialised bytes until completion.
                let payload = unsafe { std::slice::from_raw_parts(r.buf, r.len as usize) };
                Frame::write(slot.seq, epoch, r.offset, payload, r.fua, self.payload_crc)
            }
            ReqKind::Flush => Frame::flush(slot.seq, epoch),
            ReqKind::Discard => Frame::discard(slot.seq, epoch, r.offset, r.len),
            ReqKind::WriteZeroes => Frame::write_zeroes(slot.seq, epoch, r.offset, r.len),
            ReqKind::Read => unreachable!("reads are not replicated"),
        };
        frame.encode(&mut slot.header);
    }

    fn send_slot(&mut self, tag: u16) {
        let slot = &mut self.slots[tag as usize];
        slot.state.on_sent();
        let (payload, payload_len) = if slot.req.kind == ReqKind::Write {
            (slot.req.buf as *const u8, slot.req.len)
        } else {
            (std::ptr::null(), 0)
        };
        let fixed = (self.zero_copy && payload_len > 0).then_some(tag);
        self.link.sender.enqueue(SendItem { header: slot.header.as_ptr(), payload, payload_len, fixed });
    }

    fn kick_send(&mut self, s: &mut impl Submitter) {
        if !self.link.machine.is_up() {
            return;
        }
        let fd = self.link.sock.as_ref().map(|f| f.as_raw_fd()).expect("an up link has a socket");
        let sqes = self.link.sender.next_sqes(fd, ring::user_data(op::SEND, 0, self.link.machine.generation()));
        if sqes.len() > 1 {
            // A chain of linked sends goes onto an empty submission queue, in one piece.
            s.submit_now();
        }
        for sqe in sqes {
            s.push(sqe.clone());
        }
    }

    fn kick_recv(&mut self, s: &mut impl Submitter) {
        if !self.link.machine.is_up() {
            return;
        }
        let fd = self.link.sock.as_ref().map(|f| f.as_raw_fd()).expect("an up link has a socket");
        if let Some(sqe) = self.link.receiver.next_sqe(fd, ring::user_data(op::RECV, 0, self.link.machine.generation()))
        {
            s.push(sqe);
        }
    }

    /// Makes the buffered writes issued in this batch on this thread (`InlineWriter`: why),
    /// after their frames went out, so the peer writes its copy meanwhile. What would block
    /// goes to the ring.
    pub fn end_batch(&mut self, s: &mut impl Submitter, done: &mut impl FnMut(u16, i32)) {
        let mut next = 0;
        while next < self.inline_writes.len() {
            if self.replicate {
                s.submit_now();
            }
            let end = self.inline_writes.len();
            for i in next..end {
                let tag = self.inline_writes[i];
                let slot = &self.slots[tag as usize];
                assert!(slot.busy && slot.state.local == Half::Pending && slot.req.kind == ReqKind::Write);
                let r = slot.req;
                // SAFETY: the caller's buffer holds `len` initialised bytes until completion.
                let data = unsafe { std::slice::from_raw_parts(r.buf, r.len as usize) };
                let at = slot.local_done;
                match self.inline_writer.write(self.fd, &data[at as usize..], r.offset + at as u64) {
                    // May finish requests and start waiting ones, which append here.
                    InlineWrite::Done(res) => self.local_done(s, tag, res, done),
                    InlineWrite::WouldBlock { written } => {
                        self.slots[tag as usize].local_done += written;
                        self.issue_local_on_ring(s, tag);
                    }
                }
            }
            next = end;
        }
        self.inline_writes.clear();
        // A write made inline completes no ring operation: while the volume goes on alone,
        // its held peer half is waived here, not at the next tick (500 ms later).
        if self.replicate && !self.link.machine.is_up() {
            self.maybe_complete_alone(s, done);
        }
    }

    /// Feeds one completion that carries the engine's mark (see `ring::UD_ENGINE`), with its
    /// CQE flags. Finished requests are reported through `done(tag, result)`: bytes for
    /// READ/WRITE, 0 for the others, or a negative errno.
    pub fn handle_completion(
        &mut self,
        s: &mut impl Submitter,
        ud: u64,
        res: i32,
        cqe_flags: u32,
        done: &mut impl FnMut(u16, i32),
    ) {
        match ring::ud_op(ud) {
            op::LOCAL => self.local_done(s, ring::ud_index(ud), res, done),
            // A SEND_ZC's notification: it may come after its link was replaced, and nothing
            // waits for it (`sender.rs`).
            op::SEND if io_uring::cqueue::notif(cqe_flags) => {}
            op::SEND => {
                debug_assert_eq!(ring::ud_aux(ud), self.link.machine.generation());
                match self.link.sender.complete_cqe(ring::ud_index(ud), res, cqe_flags) {
                    Ok(()) => self.kick_send(s),
                    Err(errno) => self.link_failed(s, &format!("send failed: {}", errno_text(errno))),
                }
                self.maybe_close_link(s);
            }
            op::RECV => {
                debug_assert_eq!(ring::ud_aux(ud), self.link.machine.generation());
                match self.link.receiver.complete(res) {
                    Ok(()) => {
                        self.link.machine.on_heard(Instant::now());
                        self.process_frames(s, done);
                        self.kick_recv(s);
                        self.kick_send(s);
                    }
                    Err(errno) if errno == libc::ECONNRESET => self.link_failed(s, "peer closed the connection"),
                    Err(errno) => self.link_failed(s, &format!("receive failed: {}", errno_text(errno))),
                }
                self.maybe_close_link(s);
            }
            op::LINK_READY => {
                // The eventfd also wakes the queue when a conflicting range was released.
                self.arm_eventfd(s);
                if !self.waiting.is_empty() {
                    self.retry_waiting(s);
                }
                if !self.intent_waiting.is_empty() {
                    self.retry_intent_waiting(s, done);
                }
                if self.link.machine.phase() == LinkPhase::Down {
                    if let Some(sock) = self.handoff.take() {
                        self.link_up(s, sock);
                    }
                }
            }
            op::TICK => {
                self.tick(s);
                self.arm_tick(s);
            }
            other => tracing::error!(qid = self.qid, op = other, "completion with an unknown engine op ignored"),
        }
        if self.replicate && !self.link.machine.is_up() {
            self.maybe_complete_alone(s, done);
        }
        if self.shared.fence.enabled
            && (matches!(ring::ud_op(ud), op::TICK | op::LINK_READY)
                || !self.fenced_waiting.is_empty()
                || !self.fenced_done.is_empty())
        {
            self.retry_fenced(s, done);
        }
    }

    fn local_done(&mut self, s: &mut impl Submitter, tag: u16, res: i32, done: &mut impl FnMut(u16, i32)) {
        let slot = &mut self.slots[tag as usize];
        assert!(slot.busy && slot.state.local == Half::Pending, "local completion for idle tag {tag}");
        let r = slot.req;
        if res >= 0 && matches!(r.kind, ReqKind::Read | ReqKind::Write) {
            slot.local_done += res as u32;
            if res == 0 && slot.local_done < r.len {
                slot.local_res = -libc::EIO;
            } else if slot.local_done < r.len {
                // Short transfer: issue the rest.
                self.issue_local(s, tag);
                return;
            } else {
                slot.local_res = r.len as i32;
            }
        } else {
            slot.local_res = res;
        }
        if slot.local_res < 0 {
            tracing::error!(qid = self.qid, tag, kind = ?r.kind, offset = r.offset, len = r.len, "local I/O failed: {}", errno_text(-slot.local_res));
            if r.kind != ReqKind::Read {
                let why = format!("{:?} at {} (+{}) failed: {}", r.kind, r.offset, r.len, errno_text(-slot.local_res));
                self.shared.disk.latch_failed(&self.shared.config.name, &why);
            }
        } else if r.kind != ReqKind::Read && self.shared.disk.is_failed() {
            // Linux reports a writeback error once per open file: a FLUSH that ran beside the
            // one that saw it can succeed although the data is gone. Once failed, nothing that
            // writes is reported done.
            slot.local_res = -libc::EIO;
        }
        slot.state.on_local_done().expect("checked above");
        match r.kind {
            ReqKind::Read => {
                QueueStats::add(&self.stats.read_requests, 1);
                QueueStats::add(&self.stats.read_bytes, r.len as u64);
            }
            ReqKind::Write => {
                QueueStats::add(&self.stats.local_write_requests, 1);
                QueueStats::add(&self.stats.local_write_bytes, r.len as u64);
                if let Some(t) = slot.submitted {
                    self.stats.write_local.observe(t.elapsed());
                }
            }
            ReqKind::Flush => QueueStats::add(&self.stats.flushes, 1),
            _ => {}
        }
        self.maybe_complete(s, tag, done);
    }

    fn maybe_complete(&mut self, s: &mut impl Submitter, tag: u16, done: &mut impl FnMut(u16, i32)) {
        if !self.slots[tag as usize].state.is_complete() || self.hold_completion_while_fenced(tag) {
            return;
        }
        self.finish(s, tag, done);
    }

    /// A fenced primary never completes another write (design, "Losing the peer"), not even
    /// one its peer acknowledged late: after a partition heals, the peer's old connection can
    /// still deliver an ack it sent before it was promoted, and the application must not see
    /// its old primary succeed after the failover. Under `suspend` the request waits until a
    /// new lease lifts the fence; under `io-error` (or once deposed) it fails with EIO.
    fn hold_completion_while_fenced(&mut self, tag: u16) -> bool {
        let slot = &self.slots[tag as usize];
        if !self.shared.fence.enabled || slot.req.kind == ReqKind::Read || slot.fail_fenced || slot.local_res < 0 {
            return false;
        }
        let link = &self.link.machine;
        if !self.shared.fence.is_fenced(|now| link.is_fresh(now, PEER_FRESH)) {
            return false;
        }
        if self.shared.fence.fails_fenced_io() {
            self.slots[tag as usize].fail_fenced = true;
            return false;
        }
        assert!(self.fenced_done.len() < self.slots.len());
        self.fenced_done.push(tag);
        QueueStats::add(&self.stats.parked, 1);
        true
    }

    /// Reports request `tag` done and frees its slot and its granules.
    fn finish(&mut self, s: &mut impl Submitter, tag: u16, done: &mut impl FnMut(u16, i32)) {
        let slot = &mut self.slots[tag as usize];
        assert!(slot.busy && slot.state.is_complete());
        slot.busy = false;
        let range = slot.range.take();
        self.inflight -= 1;
        QueueStats::sub(&self.stats.inflight, 1);
        if let Some(t) = slot.submitted.take() {
            self.stats.write_whole.observe(t.elapsed());
        }
        done(tag, if slot.fail_fenced { -libc::EIO } else { slot.local_res });
        // Released after `done`, so whoever waited for this range is issued, and completes,
        // strictly after this request has been reported complete.
        if let Some(range) = range {
            self.shared.conflicts.release(range, self.qid);
            if !self.waiting.is_empty() {
                self.retry_waiting(s);
            }
        }
    }

    fn process_frames(&mut self, s: &mut impl Submitter, done: &mut impl FnMut(u16, i32)) {
        let geo = self.shared.geometry;
        loop {
            let (frame, text) = match self.link.receiver.next_frame(&geo) {
                None => return,
                Some(Ok((f, payload))) => {
                    let text = if f.kind == FrameKind::Error {
                        // Peer text: one printable line before it reaches logs and status.
                        metroblk_protocol::printable(payload)
                    } else {
                        String::new()
                    };
                    (f, text)
                }
                Some(Err(e)) => {
                    self.link_failed(s, &format!("malformed frame from peer: {e}"));
                    return;
                }
            };
            match frame.kind {
                FrameKind::WriteAck | FrameKind::FlushAck => {
                    // Accept an ack only for a frame sent on this link and not yet acked, of
                    // the matching kind; anything else is a protocol violation that ends the
                    // link (never an assert: these are bytes from the wire).
                    let tag = (frame.seq & 0xffff) as u16;
                    let ok = (tag as usize) < self.slots.len() && {
                        let slot = &self.slots[tag as usize];
                        let kind_matches = match slot.req.kind {
                            ReqKind::Flush => frame.kind == FrameKind::FlushAck,
                            ReqKind::Write | ReqKind::Discard | ReqKind::WriteZeroes => {
                                frame.kind == FrameKind::WriteAck
                            }
                            ReqKind::Read => false,
                        };
                        slot.busy && slot.seq == frame.seq && slot.state.peer == Half::Pending && kind_matches
                    };
                    if !ok {
                        self.link_failed(
                            s,
                            &format!(
                                "protocol violation: peer sent {} for request {:#x}, which is not awaiting one",
                                frame.kind.name(),
                                frame.seq
                            ),
                        );
                        return;
                    }
                    if frame.status != 0 {
                        // The peer could not apply the write. Completing it would acknowledge
                        // data the peer lacks; hold it and retry on a new link instead.
                        self.peer_failed(
                            s,
                            &format!("peer failed request {:#x}: {}", frame.seq, errno_text(-frame.status)),
                        );
                        return;
                    }
                    let slot = &mut self.slots[tag as usize];
                    if slot.state.on_peer_ack().is_err() {
                        self.link_failed(s, "protocol violation: ack for a request not sent");
                        return;
                    }
                    if slot.req.kind == ReqKind::Write {
                        QueueStats::add(&self.stats.peer_write_requests, 1);
                        QueueStats::add(&self.stats.peer_write_bytes, slot.req.len as u64);
                        if let Some(t) = slot.submitted {
                            self.stats.write_peer.observe(t.elapsed());
                        }
                    }
                    self.maybe_complete(s, tag, done);
                }
                FrameKind::Pong => {
                    if let Some(rtt) = self.link.machine.on_pong(frame.seq, Instant::now()) {
                        self.stats.rtt_ns.store(rtt.as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                FrameKind::Ping => self.link.pong.answer(&mut self.link.sender, frame.seq),
                FrameKind::Error => {
                    self.peer_failed(s, &format!("peer reported an error ({}): {text}", frame.status));
                    return;
                }
                other => {
                    self.link_failed(s, &format!("unexpected {other:?} frame from peer"));
                    return;
                }
            }
        }
    }

    fn tick(&mut self, s: &mut impl Submitter) {
        let header_free = self.link.ping_frame.is_none_or(|n| self.link.sender.frames_sent > n);
        let seq = match self.link.machine.on_tick(Instant::now(), header_free) {
            TickAction::Nothing => return,
            TickAction::Fail(why) => {
                self.link_failed(s, &why);
                self.maybe_close_link(s);
                return;
            }
            TickAction::SendPing(seq) => seq,
        };
        Frame::ping(seq).encode(&mut self.link.ping_header);
        let n = self.link.sender.enqueue(SendItem::header_only(self.link.ping_header.as_ptr()));
        self.link.ping_frame = Some(n);
        self.kick_send(s);
    }

    fn link_up(&mut self, s: &mut impl Submitter, sock: OwnedFd) {
        assert!(self.link.sender.is_idle() && !self.link.receiver.in_flight());
        let accepted = self.link.machine.on_connected(Instant::now());
        assert!(accepted, "a socket is taken only while the link is down");
        self.link.sock = Some(sock);
        self.link.receiver.reset();
        self.link.ping_frame = None;
        self.link.pong.reset();
        self.stats.set_link(LinkState::Connected);
        // Re-send held requests in the order they were first issued.
        let mut held: Vec<(u64, u16)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, sl)| sl.busy && sl.state.is_held())
            .map(|(i, sl)| (sl.seq, i as u16))
            .collect();
        held.sort_unstable();
        if !held.is_empty() {
            tracing::info!(volume = %self.shared.config.name, qid = self.qid, held = held.len(), "link up: re-sending held requests");
        } else {
            tracing::info!(volume = %self.shared.config.name, qid = self.qid, "link up");
        }
        QueueStats::sub(&self.stats.held, held.len() as u64);
        for (_, tag) in held {
            self.send_slot(tag);
        }
        self.kick_recv(s);
        self.kick_send(s);
    }

    fn link_failed(&mut self, s: &mut impl Submitter, why: &str) {
        self.link_lost(s, why, false)
    }

    /// The peer ended the link with an error of its own (an error ack, an ERROR frame): the
    /// connector then waits the longest backoff before it dials again.
    fn peer_failed(&mut self, s: &mut impl Submitter, why: &str) {
        self.link_lost(s, why, true)
    }

    fn link_lost(&mut self, s: &mut impl Submitter, why: &str, peer_error: bool) {
        if !self.link.machine.on_failed() {
            return;
        }
        self.shared.intent.on_link_lost();
        if self.shared.intent.alone_allowed() {
            tracing::warn!(volume = %self.shared.config.name, qid = self.qid, "peer link lost: {why}; going on alone (fencing = none or resume-alone)");
        } else {
            tracing::warn!(volume = %self.shared.config.name, qid = self.qid, "peer link lost: {why}; holding writes until it returns");
        }
        self.handoff.set_error(why);
        self.handoff.link_ended(peer_error);
        self.stats.set_link(LinkState::Connecting);
        QueueStats::add(&self.stats.reconnects, 1);
        if let Some(sock) = &self.link.sock {
            // Makes the in-flight SEND/RECV finish promptly so the socket can be closed.
            // SAFETY: plain syscall on a socket we own.
            unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let mut held = 0;
        for slot in self.slots.iter_mut() {
            if slot.busy && slot.state.on_link_lost() {
                held += 1;
            }
        }
        QueueStats::add(&self.stats.held, held);
        self.maybe_close_link(s);
    }

    /// Once nothing is in flight on a closing socket, close it and ask for a new link.
    fn maybe_close_link(&mut self, _s: &mut impl Submitter) {
        let in_flight = self.link.sender.in_flight() || self.link.receiver.in_flight();
        if !self.link.machine.on_drained(in_flight) {
            return;
        }
        self.link.sender.reset();
        self.link.receiver.reset();
        self.link.sock = None;
        self.handoff.request();
    }

    /// Shuts the link down for good (daemon exit); in-flight requests stay held.
    pub fn shutdown_link(&mut self) {
        if let Some(sock) = &self.link.sock {
            // SAFETY: plain syscall on a socket we own.
            unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// Drives a [`Queue`] on a ring of its own: the engine API for tests, benchmarks and any
/// frontend that is not ublk.
pub struct QueueDriver {
    // Field order: the ring must be dropped before the queue it references.
    ring: OwnRing,
    queue: Queue,
}

impl QueueDriver {
    pub fn new(mut queue: Queue) -> std::io::Result<QueueDriver> {
        let entries = (queue.depth() as u32 * 2 + 16).next_power_of_two();
        let mut ring = OwnRing::new(entries)?;
        queue.start(&mut ring);
        Ok(QueueDriver { ring, queue })
    }

    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub fn submit(&mut self, tag: u16, req: Request) -> Result<(), RequestError> {
        self.queue.submit(&mut self.ring, tag, req)
    }

    /// Submits what is queued, waits for at least one completion (or `timeout`), and reports
    /// finished requests through `done`. Returns how many requests finished.
    pub fn poll(&mut self, timeout: Option<Duration>, mut done: impl FnMut(u16, i32)) -> std::io::Result<usize> {
        let mut finished = 0;
        let mut count = |tag: u16, res: i32| {
            finished += 1;
            done(tag, res)
        };
        // The writes of requests submitted since the last poll; what they finished is
        // reported without waiting.
        let mut finished_inline = 0;
        self.queue.end_batch(&mut self.ring, &mut |tag, res| {
            finished_inline += 1;
            count(tag, res)
        });
        match timeout {
            _ if finished_inline > 0 => {
                self.ring.ring.submit()?;
            }
            None => {
                self.ring.ring.submit_and_wait(1)?;
            }
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                match self.ring.ring.submitter().submit_with_args(1, &args) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ETIME) || e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        loop {
            let cqe = match self.ring.ring.completion().next() {
                Some(c) => c,
                None => break,
            };
            self.queue.handle_completion(&mut self.ring, cqe.user_data(), cqe.result(), cqe.flags(), &mut count);
        }
        self.queue.end_batch(&mut self.ring, &mut count);
        self.ring.ring.submit()?;
        Ok(finished)
    }
}

impl Drop for QueueDriver {
    fn drop(&mut self) {
        self.queue.shutdown_link();
        // Give the kernel a moment to finish the socket operations that reference our buffers.
        let _ = self.ring.ring.submit();
        let deadline = Instant::now() + Duration::from_millis(200);
        while (self.queue.link.sender.in_flight() || self.queue.link.receiver.in_flight()) && Instant::now() < deadline
        {
            let ts = types::Timespec::from(Duration::from_millis(20));
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.ring.submitter().submit_with_args(1, &args);
            while let Some(cqe) = self.ring.ring.completion().next() {
                match ring::ud_op(cqe.user_data()) {
                    op::SEND => {
                        let _ = self.queue.link.sender.complete_cqe(
                            ring::ud_index(cqe.user_data()),
                            cqe.result(),
                            cqe.flags(),
                        );
                    }
                    op::RECV => {
                        let _ = self.queue.link.receiver.complete(cqe.result());
                    }
                    _ => {}
                }
            }
        }
    }
}
