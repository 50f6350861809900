//! The secondary's side of one link, as pure state (sans-I/O): what to receive next, which
//! slot a request uses, when it is applied, when and how it is acknowledged.
//!
//! `replica.rs` does the I/O (socket receives, local writes, sends on one io_uring) and feeds
//! the outcomes here. The rules this module enforces, and its exhaustive test checks:
//!
//! - **Protocol C:** a request is acknowledged with success only after its local I/O completed
//!   successfully; an I/O error is acknowledged with the error.
//! - **Epoch:** a replicated request from a lower epoch than this node's is refused (the link
//!   ends) and nothing of it is applied; a higher epoch is adopted.
//! - **Session:** once the link is superseded by a newer one for the same queue (or is closing
//!   for any reason), nothing it receives afterwards is applied and nothing more is
//!   acknowledged; it ends when its in-flight local I/O has drained.
//! - **Disk errors latch:** once this node's disk has failed, nothing more is applied and every
//!   acknowledgement carries an error, whatever a later local I/O returns.
//! - **Bounds:** at most `slots` requests are in flight; no header is read without a free slot
//!   (TCP pushes back on the primary).
//! - **Silence:** a link from which nothing has been heard for the peer timeout while it was
//!   waiting to read ends (the primary pings every 500 ms, so only a dead or half-open primary
//!   is that quiet). Time spent not reading because every slot is busy does not count: that
//!   silence is ours, not the primary's.

use std::time::{Duration, Instant};

use metroblk_protocol::{Frame, FrameKind};

/// What the shell should receive next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvNext {
    Header,
    /// The payload of the WRITE in this slot.
    Payload(u16),
    /// Nothing: no free slot (backpressure) or the link is closing.
    Nothing,
}

/// What the shell must do after a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnHeader {
    /// Receive the payload into this slot next (`recv_next` says so too).
    ReceivePayload(u16),
    /// Issue this slot's local I/O.
    Apply(u16),
    /// Acknowledge this slot with this error at once, without I/O (the disk has failed).
    AckError(u16, i32),
    /// Answer a PING.
    Pong(u64),
    /// Nothing to do (a PONG, or anything read once closing).
    Nothing,
    /// Send an ERROR frame with this errno and text and end the link.
    Refuse(i32, String),
    /// End the link without a word (the primary sent an ERROR frame).
    Close(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    /// Receiving a WRITE's payload.
    Receiving(Frame),
    /// Local I/O in flight.
    Applying(Frame),
    /// Ack queued; the slot is freed when it has been sent.
    Acking(Frame),
}

pub struct ReplicaCore {
    slots: Vec<Slot>,
    /// Free slot indices (pre-sized: pushing never allocates).
    free: Vec<u16>,
    receiving: Option<u16>,
    closing: Option<String>,
    applying: usize,
    /// When bytes last arrived from the primary (or the link last started waiting for them).
    last_heard: Instant,
    peer_timeout: Duration,
}

impl ReplicaCore {
    pub fn new(slots: usize, now: Instant, peer_timeout: Duration) -> ReplicaCore {
        assert!(slots > 0 && slots <= u16::MAX as usize);
        ReplicaCore {
            slots: vec![Slot::Free; slots],
            free: (0..slots as u16).rev().collect(),
            receiving: None,
            closing: None,
            applying: 0,
            last_heard: now,
            peer_timeout,
        }
    }

    /// Bytes arrived from the primary.
    pub fn on_heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// The periodic check (at least every tick). Returns the reason when the link has just
    /// been closed for silence.
    pub fn on_tick(&mut self, now: Instant) -> Option<String> {
        if self.closing.is_some() {
            return None;
        }
        if self.recv_next() == RecvNext::Nothing {
            // Every slot is busy: we are not reading, so the primary cannot be heard.
            self.last_heard = now;
            return None;
        }
        let silent = now.saturating_duration_since(self.last_heard);
        if silent <= self.peer_timeout {
            return None;
        }
        let why = format!("nothing heard from the primary for {} ms", silent.as_millis());
        self.close(why.clone());
        Some(why)
    }

    pub fn recv_next(&self) -> RecvNext {
        if self.closing.is_some() {
            return RecvNext::Nothing;
        }
        match self.receiving {
            Some(slot) => RecvNext::Payload(slot),
            None if self.free.is_empty() => RecvNext::Nothing,
            None => RecvNext::Header,
        }
    }

    /// The frame a slot holds (for the shell to build its I/O or its ack).
    pub fn frame(&self, slot: u16) -> Option<Frame> {
        match self.slots.get(slot as usize)? {
            Slot::Receiving(f) | Slot::Applying(f) | Slot::Acking(f) => Some(*f),
            _ => None,
        }
    }

    pub fn closing(&self) -> Option<&str> {
        self.closing.as_deref()
    }

    /// Local I/O in flight; the link may end only when this is 0.
    pub fn applying(&self) -> usize {
        self.applying
    }

    /// The link ends: for `why` (superseded, peer closed, a receive or send error). Nothing
    /// received or completed after this is applied or acknowledged.
    pub fn close(&mut self, why: String) {
        if self.closing.is_none() {
            self.closing = Some(why);
        }
    }

    /// A full header arrived (or failed to decode). `epoch` is this node's epoch; returns the
    /// epoch to adopt (if higher) with the action.
    pub fn on_header(
        &mut self,
        decoded: Result<Frame, String>,
        epoch: u64,
        disk_failed: bool,
    ) -> (OnHeader, Option<u64>) {
        assert!(self.receiving.is_none(), "a header while a payload is expected");
        if self.closing.is_some() {
            return (OnHeader::Nothing, None);
        }
        let frame = match decoded {
            Ok(f) => f,
            Err(e) => return (self.refuse(libc::EBADMSG, format!("malformed frame from primary: {e}")), None),
        };
        match frame.kind {
            FrameKind::Write | FrameKind::Flush | FrameKind::Discard | FrameKind::WriteZeroes => {
                if frame.epoch < epoch {
                    let why = format!("write from epoch {} refused: this node is at epoch {epoch}", frame.epoch);
                    return (self.refuse(libc::ESTALE, why), None);
                }
                let adopt = (frame.epoch > epoch).then_some(frame.epoch);
                let Some(slot) = self.free.pop() else {
                    // The shell reads a header only with a free slot; a lying shell is a bug.
                    return (self.refuse(libc::EPROTO, "no free slot for a request".into()), None);
                };
                if frame.kind == FrameKind::Write {
                    self.slots[slot as usize] = Slot::Receiving(frame);
                    self.receiving = Some(slot);
                    return (OnHeader::ReceivePayload(slot), adopt);
                }
                (self.start(slot, frame, disk_failed), adopt)
            }
            FrameKind::Ping => (OnHeader::Pong(frame.seq), None),
            FrameKind::Pong => (OnHeader::Nothing, None),
            FrameKind::Error => {
                let why = format!("primary reported an error ({})", frame.status);
                self.close(why.clone());
                (OnHeader::Close(why), None)
            }
            other => (self.refuse(libc::EPROTO, format!("unexpected {other:?} frame from primary")), None),
        }
    }

    /// The payload of the WRITE being received arrived; `crc_ok` says whether it matched.
    pub fn on_payload(&mut self, crc_ok: Result<(), String>, disk_failed: bool) -> OnHeader {
        let Some(slot) = self.receiving.take() else {
            return self.refuse(libc::EPROTO, "a payload without a header".into());
        };
        let Slot::Receiving(frame) = self.slots[slot as usize] else {
            unreachable!("the receiving slot holds its frame")
        };
        if self.closing.is_some() {
            self.release(slot);
            return OnHeader::Nothing;
        }
        if let Err(e) = crc_ok {
            self.release(slot);
            return self.refuse(libc::EBADMSG, format!("malformed frame from primary: {e}"));
        }
        self.start(slot, frame, disk_failed)
    }

    fn start(&mut self, slot: u16, frame: Frame, disk_failed: bool) -> OnHeader {
        if disk_failed {
            self.slots[slot as usize] = Slot::Acking(frame);
            return OnHeader::AckError(slot, -libc::EIO);
        }
        self.slots[slot as usize] = Slot::Applying(frame);
        self.applying += 1;
        OnHeader::Apply(slot)
    }

    /// The slot's local I/O finished with `status` (0 or a negative errno; the shell resumes
    /// short transfers itself). Returns the status to acknowledge with, or None when the link
    /// is closing (the slot is freed, nothing is acknowledged).
    pub fn on_applied(&mut self, slot: u16, status: i32, disk_failed: bool) -> Option<i32> {
        let Some(&Slot::Applying(frame)) = self.slots.get(slot as usize) else {
            panic!("local completion for slot {slot}, which has no I/O in flight")
        };
        self.applying -= 1;
        if self.closing.is_some() {
            self.release(slot);
            return None;
        }
        self.slots[slot as usize] = Slot::Acking(frame);
        // Errors latch: after a failure nothing is acknowledged as done.
        Some(if status < 0 {
            status
        } else if disk_failed {
            -libc::EIO
        } else {
            0
        })
    }

    /// The ack of `slot` was sent (or dropped unsent because the link ended).
    pub fn on_ack_sent(&mut self, slot: u16) {
        assert!(matches!(self.slots.get(slot as usize), Some(Slot::Acking(_))), "ack sent for slot {slot}");
        self.release(slot);
    }

    fn release(&mut self, slot: u16) {
        self.slots[slot as usize] = Slot::Free;
        assert!(self.free.len() < self.slots.len());
        self.free.push(slot);
    }

    fn refuse(&mut self, errno: i32, why: String) -> OnHeader {
        self.close(why.clone());
        OnHeader::Refuse(errno, why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy)]
    enum Ev {
        Header(FrameKind, u64),
        Payload(bool),
        Applied(usize, bool),
        AckSent(usize),
        Superseded,
        DiskFails,
        /// A tick after the peer timeout with nothing heard.
        Silence,
    }

    const T: Duration = Duration::from_secs(5);

    const EVENTS: [Ev; 13] = [
        Ev::Header(FrameKind::Write, 5),
        Ev::Header(FrameKind::Flush, 5),
        Ev::Header(FrameKind::Write, 4),
        Ev::Header(FrameKind::Write, 6),
        Ev::Payload(true),
        Ev::Payload(false),
        Ev::Applied(0, true),
        Ev::Applied(1, false),
        Ev::AckSent(0),
        Ev::AckSent(1),
        Ev::Superseded,
        Ev::DiskFails,
        Ev::Silence,
    ];

    /// Every sequence of 6 events (13^7, about 63 million, is too many for a unit test;
    /// 13^6 = 4.8 million runs in a few seconds) over a two-slot link, checked against an
    /// independent record of what happened: acks only after a successful local write, nothing
    /// applied or acked after supersession (or a close for silence), errors only after a disk
    /// failure, lower epochs never applied, at most two requests in flight.
    #[test]
    fn exhaustive_sequences_keep_the_replica_rules() {
        const LEN: u32 = 6;
        let mut sequences = 0u64;
        for code in 0..EVENTS.len().pow(LEN) {
            sequences += 1;
            let t0 = Instant::now();
            let mut now = t0;
            let mut core = ReplicaCore::new(2, t0, T);
            let mut epoch = 5u64;
            let mut disk_failed = false;
            let mut superseded = false;
            // Model: per slot, what it holds and whether its local write succeeded.
            let mut applying: Vec<Option<bool>> = vec![None; 2]; // Some(_) = in flight
            let mut ok_done = [false; 2];
            let mut acking = [false; 2];
            let mut c = code;
            for _ in 0..LEN {
                let ev = EVENTS[c % EVENTS.len()];
                c /= EVENTS.len();
                let closing_before = core.closing().is_some();
                match ev {
                    Ev::Header(kind, e) => {
                        if core.recv_next() != RecvNext::Header {
                            continue;
                        }
                        let f = match kind {
                            FrameKind::Write => Frame::write(1, e, 0, &[0u8; 512], false, true),
                            _ => Frame::flush(1, e),
                        };
                        let (out, adopt) = core.on_header(Ok(f), epoch, disk_failed);
                        if e < epoch {
                            assert!(matches!(out, OnHeader::Refuse(libc::ESTALE, _)), "{out:?}");
                        }
                        if let Some(a) = adopt {
                            assert!(a > epoch);
                            epoch = a;
                        }
                        match out {
                            OnHeader::Apply(s) => {
                                assert!(!superseded && !disk_failed && !closing_before);
                                applying[s as usize] = Some(true);
                            }
                            OnHeader::AckError(s, err) => {
                                assert!(disk_failed && err < 0);
                                acking[s as usize] = true;
                            }
                            _ => {}
                        }
                    }
                    Ev::Payload(ok) => {
                        let RecvNext::Payload(_) = core.recv_next() else { continue };
                        let out = core.on_payload(if ok { Ok(()) } else { Err("crc".into()) }, disk_failed);
                        match out {
                            OnHeader::Apply(s) => {
                                assert!(ok && !superseded && !disk_failed && !closing_before);
                                applying[s as usize] = Some(true);
                            }
                            OnHeader::AckError(s, _) => {
                                assert!(disk_failed);
                                acking[s as usize] = true;
                            }
                            OnHeader::Refuse(..) => assert!(!ok),
                            OnHeader::Nothing => assert!(closing_before),
                            other => panic!("{other:?}"),
                        }
                    }
                    Ev::Applied(s, ok) => {
                        if applying[s].is_none() {
                            continue;
                        }
                        applying[s] = None;
                        if !ok {
                            disk_failed = true; // the shell latches the disk on an error
                        }
                        let status = if ok { 0 } else { -libc::EIO };
                        match core.on_applied(s as u16, status, disk_failed) {
                            None => assert!(closing_before, "an ack was dropped on a live link"),
                            Some(st) => {
                                assert!(!closing_before && !superseded, "acked on a closing link");
                                // Protocol C: success only after a successful local write,
                                // and never once the disk has failed.
                                assert_eq!(st == 0, ok && !disk_failed);
                                ok_done[s] = st == 0;
                                acking[s] = true;
                            }
                        }
                    }
                    Ev::AckSent(s) => {
                        if !acking[s] {
                            continue;
                        }
                        acking[s] = false;
                        core.on_ack_sent(s as u16);
                    }
                    Ev::Superseded => {
                        superseded = true;
                        core.close("superseded".into());
                    }
                    Ev::DiskFails => disk_failed = true,
                    Ev::Silence => {
                        let reading = core.recv_next() != RecvNext::Nothing;
                        now += 2 * T;
                        match core.on_tick(now) {
                            Some(why) => {
                                assert!(reading && !closing_before && why.contains("nothing heard"));
                                assert_eq!(core.recv_next(), RecvNext::Nothing);
                            }
                            None => assert!(closing_before || !reading, "a silent reading link stayed open"),
                        }
                    }
                }
                assert_eq!(core.applying(), applying.iter().filter(|a| a.is_some()).count());
                if superseded {
                    assert_eq!(core.recv_next(), RecvNext::Nothing, "a superseded link reads on");
                }
            }
            let _ = ok_done;
        }
        assert_eq!(sequences, 13u64.pow(LEN));
    }

    #[test]
    fn silence_ends_a_reading_link_but_not_one_whose_slots_are_all_busy() {
        let t0 = Instant::now();
        let mut core = ReplicaCore::new(1, t0, T);
        assert_eq!(core.on_tick(t0 + T), None, "not before the timeout");
        core.on_heard(t0 + T);
        assert_eq!(core.on_tick(t0 + 2 * T), None, "heard at T: silent for exactly T");
        // The only slot is busy with a slow local write: not reading, so no silence counts.
        let (out, _) = core.on_header(Ok(Frame::flush(1, 1)), 1, false);
        assert_eq!(out, OnHeader::Apply(0));
        assert_eq!(core.recv_next(), RecvNext::Nothing);
        assert_eq!(core.on_tick(t0 + 10 * T), None, "a busy link is not silent");
        assert_eq!(core.on_applied(0, 0, false), Some(0));
        core.on_ack_sent(0);
        // Reading again: the clock starts when reading resumed (the last tick), not earlier.
        assert_eq!(core.on_tick(t0 + 10 * T + T), None);
        let why = core.on_tick(t0 + 12 * T).expect("silent for longer than the timeout");
        assert!(why.contains("nothing heard from the primary"), "{why}");
        assert_eq!(core.recv_next(), RecvNext::Nothing);
        assert_eq!(core.on_tick(t0 + 20 * T), None, "closes once");
    }
}
