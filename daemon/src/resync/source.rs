//! The primary's side of the sync link: dial, exchange facts, copy the dirty regions to the
//! secondary, then keep the link for the cleaner (the FLUSHes that let bits be cleared).
//!
//! A copy obeys the conflict rule: the region's range is taken in the volume's conflict table
//! (as a replicated write would) from before it is read until the secondary acknowledged it,
//! so an application write to the region is issued either before (and the copy reads it) or
//! after (and reaches the secondary after the copy): a copy never overwrites a newer write.

use std::collections::VecDeque;
use std::io::BufReader;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metroblk_protocol::{Frame, FrameKind, HASH_LEN, MAX_PAYLOAD, SYNC_QUEUE};

use super::copy::{CopyPlan, Next};
use super::decide::{decide, Decision};
use super::{
    facts, local_hello, now_ns, read_frame, read_hello, send_hello, write_frame, zeros, SyncState, VerifyInfo,
};
use crate::peer::connector::{self, Backoff};
use crate::volume::conflict::{GranuleRange, RESYNC_OWNER};
use crate::volume::local_io::AlignedBuf;
use crate::volume::stats::{LinkState, QueueStats};
use crate::volume::VolumeShared;
use metroblk_protocol::DiskState;

/// A silent sync link is dead after this long.
pub const SYNC_LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle sync link is pinged, and the operator's requests looked at.
pub const IDLE_TICK: Duration = Duration::from_millis(500);
/// How often the cleaner looks for bits to clear: a region written at least this often is
/// hot and never costs a metadata write, so a bit lives 5 to 10 s after its region's last
/// write (md's write-intent bitmap clears after its 5 s daemon period too). Longer keeps more
/// regions hot: random 4 KiB writes over a few hundred MiB come back to a region every few
/// seconds, and each return to a cleared one costs a metadata write and an fdatasync (on a
/// disk, as much as the write itself). Shorter resyncs less after a loss: every bit still set
/// then is copied, so a partition within 10 s of `mkfs` (a discard of the whole device) copies
/// the whole device.
pub const CLEAN_INTERVAL: Duration = Duration::from_secs(5);
/// How long a copy waits for an application write to its region before the pass gives up
/// (the writes may be held while the data links are down).
pub const RANGE_WAIT_MAX: Duration = Duration::from_secs(30);
/// Bytes one hash comparison covers (under one conflict-table hold).
pub const HASH_RUN_BYTES: u64 = 4 << 20;
/// Passes of one resync at most (each over the bits set during the previous one).
pub const RESYNC_PASSES_MAX: u32 = 8;
/// Pause after a refusal (split brain, an outdated peer) before the next exchange.
pub const REFUSED_RETRY: Duration = Duration::from_secs(2);

/// The running sync source; dropping it stops the thread.
pub struct Source {
    v: Arc<VolumeShared>,
    stream: Arc<Mutex<Option<TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn spawn(v: Arc<VolumeShared>) -> Source {
    let stream: Arc<Mutex<Option<TcpStream>>> = Arc::default();
    let (v2, s2) = (v.clone(), stream.clone());
    let thread = std::thread::Builder::new()
        .name(format!("sync-{}", v.config.name))
        .spawn(move || run(v2, s2))
        .expect("spawning the sync source");
    Source { v, stream, thread: Some(thread) }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.v.sync.stopping.store(true, Ordering::Release);
        if let Some(s) = self.stream.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sleep_unless_stopping(v: &VolumeShared, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if v.sync.stopping.load(Ordering::Acquire) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
    }
    !v.sync.stopping.load(Ordering::Acquire)
}

/// Waits up to `timeout` for the peer to close (or reset) an idle link; true if it did.
fn peer_closed_within(s: &TcpStream, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one pollfd on the stack, valid for the call; the socket outlives it.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

fn run(v: Arc<VolumeShared>, slot: Arc<Mutex<Option<TcpStream>>>) {
    let mut backoff = Backoff::default();
    let mut session = 0;
    let mut last_logged: Option<String> = None;
    while !v.sync.stopping.load(Ordering::Acquire) {
        session = connector::next_session(session);
        let stream = match connector::dial_stream(&v, SYNC_QUEUE, session) {
            Ok(s) => s,
            Err(e) => {
                v.sync.update(|i| i.message = Some(e.text.clone()));
                if last_logged.as_deref() != Some(e.text.as_str()) {
                    tracing::warn!(volume = %v.config.name, "sync link: {}; retrying", e.text);
                    last_logged = Some(e.text.clone());
                }
                if !sleep_unless_stopping(&v, backoff.dial_failed(e.peer_refused)) {
                    return;
                }
                continue;
            }
        };
        last_logged = None;
        if let Ok(c) = stream.try_clone() {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
        }
        let up_at = Instant::now();
        let result = SyncLink::new(&v, stream).map_err(Ended::Failed).and_then(|mut link| link.run());
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let wait = match result {
            Ok(()) => Duration::ZERO, // an operator's restart: exchange again at once
            Err(Ended::Refused) => REFUSED_RETRY,
            Err(Ended::Failed(why)) => {
                if !v.sync.stopping.load(Ordering::Acquire) {
                    tracing::warn!(volume = %v.config.name, "sync link ended: {why}");
                    v.sync.link_ended(&why);
                }
                backoff.link_ended(up_at.elapsed(), false)
            }
        };
        if !wait.is_zero() && !sleep_unless_stopping(&v, wait) {
            return;
        }
    }
}

enum Ended {
    /// The exchange refused to join the copies (status says why).
    Refused,
    Failed(String),
}

impl From<String> for Ended {
    fn from(s: String) -> Ended {
        Ended::Failed(s)
    }
}

struct SyncLink<'a> {
    v: &'a VolumeShared,
    s: TcpStream,
    /// The same socket, read through a buffer: one read brings many acks.
    r: BufReader<TcpStream>,
    seq: u64,
    buf: AlignedBuf,
    start: Instant,
}

/// A copy in flight: its region, its range in the conflict table, acks still due.
struct InFlight {
    region: u64,
    range: GranuleRange,
    acks_due: u32,
}

impl<'a> SyncLink<'a> {
    fn new(v: &'a VolumeShared, s: TcpStream) -> Result<SyncLink<'a>, String> {
        let r = BufReader::with_capacity(64 << 10, s.try_clone().map_err(|e| format!("sync link: {e}"))?);
        Ok(SyncLink { v, s, r, seq: 0, buf: AlignedBuf::new(MAX_PAYLOAD as usize), start: Instant::now() })
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn run(&mut self) -> Result<(), Ended> {
        let v = self.v;
        self.s
            .set_read_timeout(Some(SYNC_LINK_TIMEOUT))
            .and_then(|()| self.s.set_write_timeout(Some(SYNC_LINK_TIMEOUT)))
            .map_err(|e| format!("sync link: {e}"))?;
        let _ = self.s.set_nodelay(true);
        v.sync.restart.store(false, Ordering::Release);
        // The operator's requests are taken for this exchange; given back if it ends before
        // the resync they asked for is done.
        let requested = v.sync.take_requested();
        let result = self.exchange(requested.full, requested.checksum);
        if result.is_err() {
            v.sync.request(requested);
        }
        result?;
        self.idle()
    }

    /// The exchange and, if one is due, the resync.
    fn exchange(&mut self, full: bool, checksum: bool) -> Result<(), Ended> {
        let v = self.v;
        let name = &v.config.name;
        let alone_before = self.completed_alone();
        let attempts_before = v.intent.alone_attempts();
        let (ours, our_bitmap) = local_hello(&v.intent, v.disk.state(), &v.sync, full, true);
        send_hello(&mut self.s, &ours, &our_bitmap)?;
        let (theirs, their_bitmap) = read_hello(&mut self.r, v.intent.regions())?;
        let decision = decide(&facts(&ours, &our_bitmap), &facts(&theirs, &their_bitmap));
        match decision {
            Decision::SplitBrain => {
                let text = super::decide::SPLIT_BRAIN_TEXT;
                tracing::error!(volume = %name, "{text}");
                v.sync.set_admitted(false);
                v.sync.set_state(SyncState::SplitBrain, Some(text.into()));
                return Err(Ended::Refused);
            }
            Decision::Refused(text) => {
                tracing::error!(volume = %name, "resync refused: {text}");
                v.sync.set_admitted(false);
                v.sync.set_state(SyncState::Refused, Some(text));
                return Err(Ended::Refused);
            }
            Decision::InSync => {
                tracing::info!(volume = %name, "copies in sync: nothing to resync");
                // Same generation, no region marked on either node: nothing is due, unless a
                // write completed alone since our hello was made.
                if self.completed_alone() == alone_before {
                    v.intent.set_resync_needed(false);
                }
                self.finish_in_sync(attempts_before)?;
            }
            Decision::PrimaryToSecondary { full } => {
                v.sync.set_admitted(true);
                self.resync(full, checksum, &their_bitmap)?;
            }
        }
        Ok(())
    }

    /// The peer is up to date: record it and let the cleaner work. `attempts_mark`: the
    /// count of attempts to complete writes alone when the copy that made the peer up to date
    /// began (with a witness, the client tells the witness only if none came since).
    fn finish_in_sync(&mut self, attempts_mark: u64) -> Result<(), Ended> {
        let v = self.v;
        if v.intent.superblock().peer_disk_state != Some(DiskState::UpToDate) {
            v.intent
                .update_superblock(|sb| sb.peer_disk_state = Some(DiskState::UpToDate))
                .map_err(|e| e.to_string())?;
        }
        v.intent.on_peer_up_to_date();
        if v.fence.enabled {
            // The witness client revokes going alone and tells the witness (`fencing/client.rs`).
            v.fence.report_peer_in_sync(attempts_mark);
        }
        v.sync.set_state(SyncState::InSync, None);
        v.sync.set_admitted(true);
        Ok(())
    }

    fn resync(&mut self, full: bool, checksum: bool, their_bitmap: &[u8]) -> Result<(), Ended> {
        let v = self.v;
        let regions = v.intent.regions();
        // Writes that complete without the peer while a pass runs (its data links are not up
        // yet) set bits the pass did not see: pass again over our bits until none did.
        let mut pass = 0;
        let mut attempts_mark;
        let alone_at_end = loop {
            attempts_mark = v.intent.alone_attempts();
            let alone_before = self.completed_alone();
            let losses_before = v.intent.link_losses();
            // Every region set on either side (the first pass), or all of them.
            let mut words: Vec<u64> = (0..v.intent.dirty().words()).map(|w| v.intent.dirty().word(w)).collect();
            if full && pass == 0 {
                words.iter_mut().for_each(|w| *w = !0);
            } else if pass == 0 {
                for (w, chunk) in words.iter_mut().zip(their_bitmap.chunks_exact(8)) {
                    *w |= u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                }
            }
            // Checksum mode: compare first, copy only what differs; the equal regions' bits are
            // cleared after a both-node flush below.
            let mut equal = Vec::new();
            if pass == 0 && checksum {
                let marked: Vec<u64> = words
                    .iter()
                    .enumerate()
                    .flat_map(|(w, &bits)| {
                        (0..64).filter(move |b| bits & (1 << b) != 0).map(move |b| w as u64 * 64 + b)
                    })
                    .filter(|&r| r < regions)
                    .collect();
                let differing = self.compare(&marked, true)?;
                words.iter_mut().for_each(|w| *w = 0);
                for &r in &differing {
                    words[(r / 64) as usize] |= 1 << (r % 64);
                }
                let mut d = differing.iter().peekable();
                for r in marked {
                    if d.peek() == Some(&&r) {
                        d.next();
                    } else {
                        equal.push(r);
                    }
                }
                tracing::info!(volume = %v.config.name, equal = equal.len(), differing = differing.len(), "checksum resync: only differing regions are sent");
            }
            let rate = v.sync.rate_bps.load(Ordering::Relaxed);
            let plan = CopyPlan::new(
                words,
                regions,
                v.intent.region_size(),
                v.config.size,
                MAX_PAYLOAD as u64,
                rate,
                now_ns(self.start),
            );
            tracing::info!(
                volume = %v.config.name,
                pass,
                regions = plan.regions_total,
                bytes = plan.bytes_total,
                full = full && pass == 0,
                "resync to the peer starts"
            );
            v.sync.set_state(SyncState::SyncSource, None);
            v.sync.update(|i| {
                i.regions_total = plan.regions_total;
                i.bytes_total = plan.bytes_total;
                i.regions_done = 0;
                i.bytes_done = 0;
                i.started = Some(Instant::now());
            });
            let t0 = Instant::now();
            let bytes = self.copy(plan)?;
            if !equal.is_empty() {
                self.flush_both()?;
                for r in equal {
                    v.intent.request_clear(r);
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            tracing::info!(
                volume = %v.config.name,
                bytes,
                secs,
                mib_per_s = bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
                link_losses = v.intent.link_losses() - losses_before,
                "resync pass done"
            );
            let alone = self.completed_alone();
            if alone == alone_before {
                break alone;
            }
            pass += 1;
            if pass >= RESYNC_PASSES_MAX {
                return Err(format!(
                    "writes kept completing without the peer during {RESYNC_PASSES_MAX} resync passes; trying again"
                )
                .into());
            }
        };
        // The target adopts our generation and becomes up to date.
        let seq = self.next_seq();
        write_frame(&mut self.s, &Frame::sync_done(seq, v.epoch()), &[])?;
        let geo = v.geometry;
        loop {
            let (f, _) = read_frame(&mut self.r, &geo, self.v.config.payload_checksum, self.buf.as_mut_slice())?;
            match f.kind {
                FrameKind::FlushAck if f.seq == seq && f.status == 0 => break,
                FrameKind::Pong => continue,
                _ => {
                    return Err(
                        format!("the peer answered {} (status {}) to the end of the resync", f.kind, f.status).into()
                    )
                }
            }
        }
        v.intent.set_resync_needed(false);
        tracing::info!(volume = %v.config.name, "resync complete: the peer is up to date");
        self.finish_in_sync(attempts_mark)?;
        // A write that completed alone after the last pass (before going alone ended) is not
        // on the peer: resync again (the idle loop sees it).
        if self.completed_alone() != alone_at_end {
            v.intent.set_resync_needed(true);
        }
        Ok(())
    }

    /// Replicated requests completed without the peer, over all queues.
    fn completed_alone(&self) -> u64 {
        self.v.queue_stats.iter().map(|q| QueueStats::get(&q.completed_alone)).sum()
    }

    /// Runs one copy pass to the end; returns the bytes copied.
    fn copy(&mut self, mut plan: CopyPlan) -> Result<u64, Ended> {
        let v = self.v;
        // A clear asked in an earlier pass must be judged before this pass resets `touched`
        // of the regions it copies again.
        let deadline = Instant::now() + Duration::from_secs(5);
        while v.intent.clears_pending() {
            v.intent.wake_writer();
            if Instant::now() > deadline {
                return Err("the write-intent writer did not handle the clears of the last pass".to_string().into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(super::copy::COPIES_IN_FLIGHT_MAX);
        let mut flush_seq = None;
        let result = (|| -> Result<u64, Ended> {
            loop {
                if v.sync.stopping.load(Ordering::Acquire) {
                    return Err("stopping".to_string().into());
                }
                match plan.poll_next(now_ns(self.start)) {
                    Next::Copy { first, count } => {
                        let range = self.take_range(&plan, first, count)?;
                        // No write to the regions is in flight: what is written from now on
                        // is seen by the clear after the flush, and keeps the bit.
                        for r in first..first + count {
                            v.intent.reset_touched(r);
                        }
                        in_flight.push_back(InFlight { region: first, range, acks_due: 0 });
                        let sent = self.send_run(&mut plan, first, count)?;
                        in_flight.back_mut().expect("just pushed").acks_due = sent;
                    }
                    Next::Flush => {
                        let seq = self.next_seq();
                        write_frame(&mut self.s, &Frame::flush(seq, v.epoch()), &[])?;
                        flush_seq = Some(seq);
                    }
                    Next::Wait { until_ns } => {
                        if in_flight.is_empty() && flush_seq.is_none() {
                            let wait = until_ns.map_or(1_000_000, |t| t.saturating_sub(now_ns(self.start)));
                            std::thread::sleep(Duration::from_nanos(wait.min(100_000_000)));
                            continue;
                        }
                        self.read_ack(&mut plan, &mut in_flight, &mut flush_seq)?;
                    }
                    Next::Done => return Ok(plan.bytes_copied),
                }
            }
        })();
        for f in in_flight {
            v.conflicts.release(f.range, RESYNC_OWNER);
        }
        result
    }

    /// Takes the run's range in the conflict table, waiting for writes in flight to it.
    fn take_range(&self, plan: &CopyPlan, r: u64, count: u64) -> Result<GranuleRange, Ended> {
        self.take_bytes(r, plan.region_offset(r), plan.run_len(r, count))
    }

    /// Takes `len` bytes at `offset` (from region `r`) in the conflict table.
    fn take_bytes(&self, r: u64, offset: u64, len: u64) -> Result<GranuleRange, Ended> {
        let v = self.v;
        let range = v.conflicts.range(offset, len);
        let deadline = Instant::now() + RANGE_WAIT_MAX;
        let mut pause = Duration::from_micros(50);
        while !v.conflicts.try_acquire(range, RESYNC_OWNER) {
            if Instant::now() > deadline || v.sync.stopping.load(Ordering::Acquire) {
                return Err(format!("region {r} stayed busy with application writes for {RANGE_WAIT_MAX:?}").into());
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        Ok(range)
    }

    /// Reads the run of `count` regions from `r` and sends it in frames of at most
    /// MAX_PAYLOAD, a piece that reads as zeros as a WRITE_ZEROES range (`zeros.rs`); returns
    /// the frames.
    fn send_run(&mut self, plan: &mut CopyPlan, r: u64, count: u64) -> Result<u32, Ended> {
        let v = self.v;
        let (offset, len) = (plan.region_offset(r), plan.run_len(r, count));
        let mut done = 0u64;
        let mut frames = 0;
        while done < len {
            let n = (len - done).min(MAX_PAYLOAD as u64) as usize;
            let read_err = |e: std::io::Error| format!("resync cannot read region {r} from the backing file: {e}");
            let data = zeros::holds_data(&v.file, offset + done, n as u64).map_err(read_err)?;
            if data {
                v.file.read_exact_at(&mut self.buf.as_mut_slice()[..n], offset + done).map_err(read_err)?;
            }
            let seq = self.next_seq();
            if !data || zeros::is_zero(&self.buf.as_slice()[..n]) {
                let f = Frame::write_zeroes(seq, v.epoch(), offset + done, n as u32);
                write_frame(&mut self.s, &f, &[])?;
                v.sync.bytes_resynced_as_zeros.fetch_add(n as u64, Ordering::Relaxed);
                plan.on_sent_as_zeros(n as u64);
            } else {
                let f = Frame::write(
                    seq,
                    v.epoch(),
                    offset + done,
                    &self.buf.as_slice()[..n],
                    false,
                    v.config.payload_checksum.sends_crc(),
                );
                write_frame(&mut self.s, &f, &self.buf.as_slice()[..n])?;
            }
            done += n as u64;
            frames += 1;
        }
        Ok(frames)
    }

    fn read_ack(
        &mut self,
        plan: &mut CopyPlan,
        in_flight: &mut VecDeque<InFlight>,
        flush_seq: &mut Option<u64>,
    ) -> Result<(), Ended> {
        let v = self.v;
        let geo = v.geometry;
        let (f, _) = read_frame(&mut self.r, &geo, self.v.config.payload_checksum, self.buf.as_mut_slice())?;
        if f.status != 0 {
            return Err(format!("the peer failed a resync {}: status {}", f.kind, f.status).into());
        }
        match f.kind {
            FrameKind::WriteAck => {
                let front = in_flight.front_mut().ok_or("a write ack with no copy in flight".to_string())?;
                front.acks_due -= 1;
                if front.acks_due == 0 {
                    let done = in_flight.pop_front().expect("checked");
                    v.conflicts.release(done.range, RESYNC_OWNER);
                    let (regions_before, bytes_before) = (plan.regions_copied, plan.bytes_copied);
                    plan.on_acked(done.region).map_err(|e| e.to_string())?;
                    v.sync.bytes_resynced.fetch_add(plan.bytes_copied - bytes_before, Ordering::Relaxed);
                    v.sync.regions_resynced.fetch_add(plan.regions_copied - regions_before, Ordering::Relaxed);
                    v.sync.update(|i| {
                        i.regions_done = plan.regions_copied;
                        i.bytes_done = plan.bytes_copied;
                    });
                }
            }
            FrameKind::FlushAck if Some(f.seq) == *flush_seq => {
                *flush_seq = None;
                // Durable on the target now; on the primary the data was read from the file,
                // which the application's own FLUSHes (or ours below) make durable: clear
                // only after a local fdatasync too.
                v.file.sync_data().map_err(|e| format!("fdatasync of the backing file: {e}"))?;
                for r in plan.on_flushed().map_err(|e| e.to_string())? {
                    v.intent.request_clear(r);
                }
                v.intent.wake_writer();
            }
            FrameKind::Pong => {}
            other => return Err(format!("unexpected {other} frame on the sync link").into()),
        }
        Ok(())
    }

    /// Keeps the link: pings, runs the cleaner, and returns when an operator asks for a new
    /// exchange or a resync is needed again.
    fn idle(&mut self) -> Result<(), Ended> {
        let v = self.v;
        let mut last_clean = Instant::now();
        loop {
            if v.sync.stopping.load(Ordering::Acquire) {
                return Err("stopping".to_string().into());
            }
            if v.sync.restart.load(Ordering::Acquire) {
                return Ok(());
            }
            if v.intent.resync_needed() && self.data_links_up() {
                // Writes completed alone (or verify marked regions): resync them.
                return Ok(());
            }
            if v.sync.verify_requested.swap(false, Ordering::AcqRel) {
                self.verify()?;
                continue;
            }
            // A tick, cut short when the peer closes the link (a killed peer's kernel does), so
            // that status stops reading in-sync at once rather than at the next ping.
            if peer_closed_within(&self.s, IDLE_TICK) {
                return Err("the peer closed the sync link".to_string().into());
            }
            if last_clean.elapsed() >= CLEAN_INTERVAL {
                last_clean = Instant::now();
                self.clean()?;
            } else {
                let seq = self.next_seq();
                write_frame(&mut self.s, &Frame::ping(seq), &[])?;
                self.wait_for(FrameKind::Pong, seq)?;
            }
        }
    }

    /// Online verify: compares every region's hash with the peer's, marks the differing ones
    /// dirty (a resync follows at once), and records the count for status.
    fn verify(&mut self) -> Result<(), Ended> {
        let v = self.v;
        let name = v.config.name.clone();
        tracing::info!(volume = %name, "online verify starts");
        // After the swap of `verify_requested` (acquire): at least the request that set it.
        let request = v.sync.verify_requests.load(Ordering::Acquire);
        v.sync.update(|i| i.verify = Some(VerifyInfo { request, ..VerifyInfo::default() }));
        let all: Vec<u64> = (0..v.intent.regions()).collect();
        let result = self.compare(&all, false);
        let differing = match result {
            Ok(d) => d,
            Err(e) => {
                v.sync.update(|i| {
                    if let Some(vi) = i.verify.as_mut() {
                        vi.failed = true;
                    }
                });
                return Err(e);
            }
        };
        for &r in &differing {
            v.intent.mark_out_of_sync(r);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !differing.iter().all(|&r| v.intent.is_durable(r, r)) {
            if Instant::now() > deadline {
                return Err("the write-intent writer did not mark the differing regions".to_string().into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if !differing.is_empty() {
            v.intent.set_resync_needed(true);
        }
        tracing::info!(volume = %name, differing = differing.len(), "online verify done");
        v.sync.update(|i| {
            i.verify = Some(VerifyInfo {
                request,
                regions_checked: all.len() as u64,
                regions_differing: differing.len() as u64,
                done: true,
                failed: false,
            })
        });
        Ok(())
    }

    /// Compares the hashes of `regions` (ascending) with the peer's, in runs of consecutive
    /// regions, each under the conflict rule (no write to it in flight on either node while
    /// both hash it). Returns the regions that differ. `reset_touched`: as a copy does, so the
    /// equal ones may be cleared after a both-node flush.
    fn compare(&mut self, regions: &[u64], reset_touched: bool) -> Result<Vec<u64>, Ended> {
        let v = self.v;
        let region = v.intent.region_size();
        let run_max = (HASH_RUN_BYTES / region).max(1);
        let mut local = Vec::with_capacity((run_max as usize) * HASH_LEN);
        let mut scratch = vec![0u8; region as usize];
        let mut differing = Vec::new();
        let mut i = 0;
        while i < regions.len() {
            if v.sync.stopping.load(Ordering::Acquire) {
                return Err("stopping".to_string().into());
            }
            let first = regions[i];
            let mut count = 1;
            while i + (count as usize) < regions.len()
                && count < run_max
                && regions[i + count as usize] == first + count
            {
                count += 1;
            }
            let offset = first * region;
            let len = (v.config.size - offset).min(count * region);
            let range = self.take_bytes(first, offset, len)?;
            let result = (|| -> Result<(), Ended> {
                if reset_touched {
                    for r in first..first + count {
                        v.intent.reset_touched(r);
                    }
                }
                local.clear();
                super::hash::hash_regions(&v.file, offset, len, region, &mut scratch, &mut local)
                    .map_err(|e| format!("verify cannot read the backing file: {e}"))?;
                let seq = self.next_seq();
                write_frame(&mut self.s, &Frame::hash_request(seq, offset, len as u32), &[])?;
                let geo = v.geometry;
                loop {
                    let (f, n) =
                        read_frame(&mut self.r, &geo, self.v.config.payload_checksum, self.buf.as_mut_slice())?;
                    match f.kind {
                        FrameKind::Pong => continue,
                        FrameKind::HashReply if f.seq == seq => {
                            if f.status != 0 || n != local.len() {
                                return Err(format!(
                                    "the peer could not hash {len} bytes at {offset}: status {}",
                                    f.status
                                )
                                .into());
                            }
                            for (k, (a, b)) in local
                                .chunks_exact(HASH_LEN)
                                .zip(self.buf.as_slice()[..n].chunks_exact(HASH_LEN))
                                .enumerate()
                            {
                                if a != b {
                                    differing.push(first + k as u64);
                                }
                            }
                            return Ok(());
                        }
                        other => return Err(format!("unexpected {other} frame while verifying").into()),
                    }
                }
            })();
            v.conflicts.release(range, RESYNC_OWNER);
            result?;
            i += count as usize;
            let checked = i as u64;
            let n_diff = differing.len() as u64;
            v.sync.update(|info| {
                if let Some(vi) = info.verify.as_mut() {
                    vi.regions_checked = checked;
                    vi.regions_differing = n_diff;
                }
            });
        }
        Ok(differing)
    }

    /// Makes everything durable on both nodes: local fdatasync, then the peer's FLUSH.
    fn flush_both(&mut self) -> Result<(), Ended> {
        let v = self.v;
        v.file.sync_data().map_err(|e| format!("fdatasync of the backing file: {e}"))?;
        let seq = self.next_seq();
        write_frame(&mut self.s, &Frame::flush(seq, v.epoch()), &[])?;
        self.wait_for(FrameKind::FlushAck, seq)
    }

    fn data_links_up(&self) -> bool {
        self.v.queue_stats.iter().all(|q| q.link() == LinkState::Connected)
    }

    fn wait_for(&mut self, kind: FrameKind, seq: u64) -> Result<(), Ended> {
        let geo = self.v.geometry;
        loop {
            let (f, _) = read_frame(&mut self.r, &geo, self.v.config.payload_checksum, self.buf.as_mut_slice())?;
            if f.kind == kind && f.seq == seq {
                if f.status != 0 {
                    return Err(format!("the peer failed a {kind}: status {}", f.status).into());
                }
                return Ok(());
            }
            if f.kind != FrameKind::Pong {
                return Err(format!("unexpected {} frame on the sync link", f.kind).into());
            }
        }
    }

    /// One cleaning cycle (see `bitmap/`): take the set regions not written since the last
    /// cycle (idle for a whole period: a region written at least once per period is hot and
    /// keeps its bit) and with no write in flight, make everything durable on both nodes (local
    /// fdatasync, the peer's FLUSH), ask for their bits to be cleared (a region written since
    /// keeps its bit), then start the next period by resetting `touched`.
    fn clean(&mut self) -> Result<(), Ended> {
        let v = self.v;
        if v.intent.clears_pending() {
            return Ok(()); // the last period's clears are not judged yet
        }
        if v.intent.resync_needed() || !self.data_links_up() || v.intent.on_disk_regions() == 0 {
            v.intent.request_touched_reset();
            return Ok(());
        }
        let losses = v.intent.link_losses();
        let region = v.intent.region_size();
        // Regions not written this period: out of sync no more once both nodes flushed. The
        // bit on disk goes too when the region's whole extent is cold; in a hot extent it
        // stays, so the next write there costs no metadata write.
        let (mut clear, mut clear_dirty) = (Vec::new(), Vec::new());
        let (dirty, on_disk) = (v.intent.dirty(), v.intent.on_disk());
        for w in 0..dirty.words() {
            let mut bits = dirty.word(w) | on_disk.word(w);
            while bits != 0 {
                let r = w as u64 * 64 + bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let len = (v.config.size - r * region).min(region);
                if v.intent.is_touched(r) || v.conflicts.is_taken(v.conflicts.range(r * region, len)) {
                    continue;
                }
                if !v.intent.extent_touched(r) {
                    clear.push(r);
                } else if dirty.get(r) {
                    clear_dirty.push(r);
                }
            }
        }
        if clear.is_empty() && clear_dirty.is_empty() {
            v.intent.request_touched_reset();
            return Ok(());
        }
        self.flush_both()?;
        if v.intent.link_losses() == losses && !v.intent.resync_needed() {
            for r in clear {
                v.intent.request_clear(r);
            }
            for r in clear_dirty {
                v.intent.request_clear_dirty(r);
            }
        }
        v.intent.request_touched_reset();
        Ok(())
    }
}
