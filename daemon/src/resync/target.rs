//! The secondary's side of the sync link: answer the exchange, then apply the copies in
//! order. The copy is `inconsistent` (durably, in the superblock) from before the first copy
//! is applied until SYNC_DONE, so an interrupted resync leaves a node that refuses to serve as
//! primary and resumes from the source's bitmap on the next exchange.

use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use metroblk_protocol::{Frame, FrameKind, SyncHello, MAX_PAYLOAD};

use super::decide::{decide, Decision};
use super::source::SYNC_LINK_TIMEOUT;
use super::{facts, local_hello, read_frame, read_hello, send_hello, write_frame, SyncState};
use crate::peer::sessions::{SessionTable, SUPERSEDE_WAIT_MAX};
use crate::volume::local_io::AlignedBuf;
use crate::volume::VolumeShared;
use metroblk_protocol::DiskState;

/// Serves one sync link from the primary until it ends; returns why it ended.
pub fn serve(v: Arc<VolumeShared>, mut s: TcpStream, sessions: &SessionTable) -> String {
    if v.sync.target_busy.swap(true, Ordering::AcqRel) {
        return "refused: a sync link is already being served (the older one ends at its timeout)".into();
    }
    // Before the exchange: no frame of a data link older than this exchange is applied any
    // more, so none can land after a resync copy of its region (`sessions.rs`).
    if let Err(e) = sessions.supersede_all(SUPERSEDE_WAIT_MAX) {
        v.sync.target_busy.store(false, Ordering::Release);
        return format!("refused: {e}");
    }
    let why = match serve_inner(&v, &mut s) {
        Ok(()) => "closed by the primary".to_string(),
        Err(e) => e,
    };
    v.sync.link_ended(&format!("sync link ended: {why}"));
    v.sync.target_busy.store(false, Ordering::Release);
    why
}

fn serve_inner(v: &VolumeShared, s: &mut TcpStream) -> Result<(), String> {
    s.set_read_timeout(Some(SYNC_LINK_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(SYNC_LINK_TIMEOUT)))
        .map_err(|e| format!("sync link: {e}"))?;
    let _ = s.set_nodelay(true);
    let name = &v.config.name;
    let (theirs, their_bitmap) = read_hello(s, v.intent.regions())?;
    let full = v.sync.full_requested();
    let (ours, our_bitmap) = local_hello(&v.intent, v.disk.state(), &v.sync, full, false);
    let decision = decide(&facts(&theirs, &their_bitmap), &facts(&ours, &our_bitmap));
    // Decided before answering: by the time the primary knows, data links are let in here.
    match &decision {
        Decision::InSync | Decision::PrimaryToSecondary { .. } => v.sync.set_admitted(true),
        Decision::SplitBrain | Decision::Refused(_) => v.sync.set_admitted(false),
    }
    send_hello(s, &ours, &our_bitmap)?;
    match decision {
        Decision::SplitBrain => {
            let text = super::decide::SPLIT_BRAIN_TEXT;
            tracing::error!(volume = %name, "{text}");
            v.sync.set_state(SyncState::SplitBrain, Some(text.into()));
            return Err("split brain".into());
        }
        Decision::Refused(text) => {
            tracing::error!(volume = %name, "resync refused: {text}");
            v.sync.set_state(SyncState::Refused, Some(text.clone()));
            return Err(text);
        }
        Decision::InSync => v.sync.set_state(SyncState::InSync, None),
        Decision::PrimaryToSecondary { full } => {
            if v.disk.state() != DiskState::Inconsistent {
                v.intent.update_superblock(|sb| sb.disk_state = DiskState::Inconsistent).map_err(|e| e.to_string())?;
                v.disk.set(DiskState::Inconsistent);
            }
            tracing::info!(volume = %name, full, "resync from the primary starts; this copy is inconsistent until it ends");
            v.sync.set_state(SyncState::SyncTarget, None);
            v.sync.update(|i| {
                i.bytes_done = 0;
                i.regions_done = 0;
                i.started = Some(std::time::Instant::now());
            });
        }
    }
    apply(v, s, &theirs)
}

/// A primary answers a sync link from a peer that is primary too (two primaries: a split
/// brain of roles): the exchange only, so that both nodes see and report it. Nothing that
/// follows the exchange is ever read, let alone applied: a primary's copy is its
/// applications' data. Returns why the link ended.
pub fn answer_as_primary(v: &VolumeShared, mut s: TcpStream) -> String {
    let name = &v.config.name;
    let r = (|| -> Result<String, String> {
        s.set_read_timeout(Some(SYNC_LINK_TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(SYNC_LINK_TIMEOUT)))
            .map_err(|e| format!("sync link: {e}"))?;
        let (theirs, their_bitmap) = read_hello(&mut s, v.intent.regions())?;
        let (ours, our_bitmap) = local_hello(&v.intent, v.disk.state(), &v.sync, false, true);
        let decision = decide(&facts(&theirs, &their_bitmap), &facts(&ours, &our_bitmap));
        send_hello(&mut s, &ours, &our_bitmap)?;
        v.sync.set_admitted(false);
        Ok(match decision {
            Decision::SplitBrain => {
                tracing::error!(volume = %name, "{}", super::decide::SPLIT_BRAIN_TEXT);
                v.sync.set_state(SyncState::SplitBrain, Some(super::decide::SPLIT_BRAIN_TEXT.into()));
                "split brain".to_string()
            }
            Decision::Refused(text) => {
                tracing::error!(volume = %name, "both nodes are primary: {text}");
                v.sync.set_state(SyncState::Refused, Some(text.clone()));
                text
            }
            // `decide` never copies between two primaries; should that ever change, this
            // node still applies nothing.
            other => format!("the exchange said {other:?}, but this node is primary: nothing is applied"),
        })
    })();
    let _ = s.shutdown(std::net::Shutdown::Both);
    r.unwrap_or_else(|e| e)
}

/// Applies the frames of the sync link in order, acking each after it is done.
fn apply(v: &VolumeShared, s: &mut TcpStream, source: &SyncHello) -> Result<(), String> {
    let geo = v.geometry;
    let mut buf = AlignedBuf::new(MAX_PAYLOAD as usize);
    let mut r = std::io::BufReader::with_capacity(256 << 10, s.try_clone().map_err(|e| format!("sync link: {e}"))?);
    // Scratch for HASH_REQUEST: one region, and the hashes of the largest range.
    let mut hash_buf = vec![0u8; v.intent.region_size() as usize];
    let mut hashes: Vec<u8> = Vec::with_capacity(metroblk_protocol::MAX_PAYLOAD as usize);
    loop {
        let (f, n) = match read_frame(&mut r, &geo, v.config.payload_checksum, buf.as_mut_slice()) {
            Ok(x) => x,
            Err(e) if e.contains("failed to fill whole buffer") || e.contains("UnexpectedEof") => {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let reply = match f.kind {
            FrameKind::Write => {
                if v.disk.is_failed() {
                    Frame::write_ack(f.seq, -libc::EIO)
                } else if let Err(e) = v.file.write_all_at(&buf.as_slice()[..n], f.offset) {
                    let why = format!("resync write at {} (+{n}) failed: {e}", f.offset);
                    v.disk.latch_failed(&v.config.name, &why);
                    Frame::write_ack(f.seq, -e.raw_os_error().unwrap_or(libc::EIO))
                } else {
                    v.sync.bytes_resynced.fetch_add(n as u64, Ordering::Relaxed);
                    v.sync.update(|i| i.bytes_done += n as u64);
                    Frame::write_ack(f.seq, 0)
                }
            }
            FrameKind::WriteZeroes => {
                let len = f.length as u64;
                if v.disk.is_failed() {
                    Frame::write_ack(f.seq, -libc::EIO)
                } else if let Err(e) = super::zeros::zero_range(&v.file, f.offset, len, buf.as_mut_slice()) {
                    let why = format!("resync zeroing at {} (+{len}) failed: {e}", f.offset);
                    v.disk.latch_failed(&v.config.name, &why);
                    Frame::write_ack(f.seq, -e.raw_os_error().unwrap_or(libc::EIO))
                } else {
                    v.sync.bytes_resynced.fetch_add(len, Ordering::Relaxed);
                    v.sync.update(|i| i.bytes_done += len);
                    Frame::write_ack(f.seq, 0)
                }
            }
            FrameKind::Flush => Frame::flush_ack(f.seq, flush(v)),
            FrameKind::Ping => Frame::pong(f.seq),
            FrameKind::HashRequest => {
                let region = v.intent.region_size();
                hashes.clear();
                let status = if f.offset % region != 0 {
                    -libc::EINVAL
                } else {
                    match super::hash::hash_regions(
                        &v.file,
                        f.offset,
                        f.length as u64,
                        region,
                        &mut hash_buf,
                        &mut hashes,
                    ) {
                        Ok(()) => 0,
                        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                    }
                };
                let payload = if status == 0 { &hashes[..] } else { &[][..] };
                write_frame(s, &Frame::hash_reply(f.seq, payload, status), payload)?;
                continue;
            }
            FrameKind::SyncDone => {
                let status = flush(v);
                if status == 0 {
                    become_up_to_date(v, source)?;
                }
                Frame::flush_ack(f.seq, status)
            }
            other => return Err(format!("unexpected {other} frame on the sync link")),
        };
        write_frame(s, &reply, &[])?;
        if reply.status != 0 {
            return Err(format!("answered {} with status {}", f.kind, reply.status));
        }
    }
}

fn flush(v: &VolumeShared) -> i32 {
    if v.disk.is_failed() {
        return -libc::EIO;
    }
    match v.file.sync_data() {
        Ok(()) => 0,
        Err(e) => {
            v.disk.latch_failed(&v.config.name, &format!("fdatasync failed: {e}"));
            -e.raw_os_error().unwrap_or(libc::EIO)
        }
    }
}

/// The resync is complete and durable: adopt the source's generation and history, clear our
/// own bitmap (its regions were copied over), and become up to date.
fn become_up_to_date(v: &VolumeShared, source: &SyncHello) -> Result<(), String> {
    v.intent.clear_all_on_disk().map_err(|e| e.to_string())?;
    v.intent
        .update_superblock(|sb| {
            sb.generation = uuid::Uuid::from_bytes(source.generation);
            sb.history = source.history.iter().map(|g| uuid::Uuid::from_bytes(*g)).collect();
            sb.disk_state = DiskState::UpToDate;
            sb.peer_disk_state = Some(DiskState::UpToDate);
            sb.full_resync = false;
            sb.discard_local = false;
        })
        .map_err(|e| e.to_string())?;
    v.disk.set(DiskState::UpToDate);
    v.sync.discard_local.store(false, Ordering::Release);
    v.sync.full_done();
    v.sync.set_state(SyncState::InSync, None);
    tracing::info!(volume = %v.config.name, "resync complete: this copy is up to date");
    Ok(())
}
