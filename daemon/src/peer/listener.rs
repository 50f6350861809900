//! Accepting links from the primary (the secondary's side of connection set-up).
//!
//! Every accepted connection is authenticated (HMAC challenge-response over the volume's
//! authkey) and checked against this node's volume (uuid, size, region and block size)
//! before a single data frame is read from it; then it is handed to `replica::serve` on a
//! thread of its own. One connection per primary queue.
//!
//! Nobody without the key can wedge the listener:
//! - only the configured peer's address (or `allow_from`) may connect; others are closed at
//!   once, before a byte is read;
//! - a handshake has one absolute deadline ([`HANDSHAKE_TIMEOUT`] for all of it, not per read),
//!   so a peer trickling a byte a second is cut off;
//! - at most [`HANDSHAKES_MAX`] handshakes run at once (a thread each); a connection beyond
//!   that is closed at once. The cap is far above what a real primary needs (one link per
//!   queue), so a few hundred trickling connections from an allowed address do not keep the
//!   real primary out;
//! - an `accept` error (EMFILE, ENFILE, ENOBUFS) backs off instead of spinning;
//! - refusal details reach the peer only after it proved the key (`protocol::handshake`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metroblk_protocol::{Handshake, HandshakeError, HelloInfo, Role};

use super::connector::local_hello;
use super::replica;
use super::sessions::SessionTable;
use super::transport::HANDSHAKE_TIMEOUT;
use crate::volume::stats::LinkState;
use crate::volume::VolumeShared;

/// Most simultaneous links one volume accepts (one per primary queue, plus slack for a
/// reconnecting primary whose old links are still closing).
pub const MAX_LINKS: u64 = 2 * crate::config::MAX_QUEUES as u64;
/// Most handshakes in progress at once per volume; beyond this a connection is closed at once.
pub const HANDSHAKES_MAX: usize = 512;
/// Stack of a handshake thread, which then serves the link (the replica keeps its buffers on
/// the heap). Reserved address space, touched only as used.
const LINK_THREAD_STACK: usize = 1 << 20;
/// Backoff after a failed `accept` (EMFILE and the like), doubling up to the max.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Refused connections are logged at most once per this interval (plus a count).
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A running listener: accepts and serves the primary's links until [`Listener::stop`] (or
/// drop), which ends every link it serves, so a volume can change role in the running process.
pub struct Listener {
    pub local_addr: std::net::SocketAddr,
    stopping: Arc<AtomicBool>,
    /// The accept loop's socket (a second descriptor of it): shut down to wake `accept`.
    socket: TcpListener,
    sessions: Arc<SessionTable>,
    /// The sync links being served (second descriptors, to shut them down on stop).
    sync_links: Arc<Mutex<Vec<(u64, TcpStream)>>>,
    /// The accept loop and every link thread still running: each holds the volume.
    threads: Arc<AtomicUsize>,
}

/// Counts a listener thread while it runs.
struct ThreadCount(Arc<AtomicUsize>);

impl ThreadCount {
    fn enter(count: &Arc<AtomicUsize>) -> ThreadCount {
        count.fetch_add(1, Ordering::AcqRel);
        ThreadCount(count.clone())
    }
}

impl Drop for ThreadCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Listener {
    /// Stops accepting, ends every link (data links are superseded: they apply nothing more
    /// and drain their local writes; sync links are shut), and waits until every thread of
    /// the listener has ended, or until `deadline`.
    pub fn stop(&self, deadline: Instant) -> Result<(), String> {
        self.stopping.store(true, Ordering::Release);
        // SAFETY: a valid descriptor owned by `self.socket`; shutdown(2) on a listening
        // socket wakes a blocked accept(2) with EINVAL on Linux.
        unsafe { libc::shutdown(self.socket.as_raw_fd(), libc::SHUT_RDWR) };
        for (_, s) in self.sync_links.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let drained = self.sessions.supersede_all(left);
        while self.threads.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} listener threads still running after the deadline ({})",
                    self.threads.load(Ordering::Acquire),
                    drained.err().unwrap_or_else(|| "links drained".into())
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Instant::now() + crate::lifecycle::CLOSE_MAX) {
            tracing::error!("stopping the listener on {}: {e}", self.local_addr);
        }
    }
}

/// Logs the first refusal of a kind, then at most one summary line per interval: a flood of
/// strangers must not flood the log either.
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn log(&mut self, volume: &str, what: &str) {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < REFUSAL_LOG_INTERVAL => self.suppressed += 1,
            _ => {
                let more = std::mem::take(&mut self.suppressed);
                if more > 0 {
                    tracing::warn!(volume, "{what} (and {more} more since the last report)");
                } else {
                    tracing::warn!(volume, "{what}");
                }
                self.last = Some(now);
            }
        }
    }
}

/// Whom a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// A secondary: the primary's data links and sync link.
    Secondary,
    /// A primary: only the exchange of a sync link from a peer that is primary too, so that
    /// both report the split brain (`resync::target::answer_as_primary`). Data links are
    /// refused, and nothing a peer sends is ever applied.
    PrimaryExchange,
}

/// Binds the volume's listen address and serves links from the primary on background threads.
pub fn start(v: Arc<VolumeShared>) -> Result<Listener, String> {
    start_serving(v, Serving::Secondary)
}

/// [`start`], for a secondary or (the exchange only) a primary.
pub fn start_serving(v: Arc<VolumeShared>, serving: Serving) -> Result<Listener, String> {
    if let Some(p) = &v.config.peer {
        super::transport::check(p).map_err(|e| format!("volume {}: {e}", v.config.name))?;
    }
    let listener = TcpListener::bind(v.config.listen)
        .map_err(|e| format!("volume {}: cannot listen on {}: {e}", v.config.name, v.config.listen))?;
    let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
    if serving == Serving::Secondary {
        tracing::info!(volume = %v.config.name, %local_addr, "secondary: waiting for the primary");
        v.queue_stats[0].set_link(LinkState::Connecting);
    } else {
        tracing::info!(volume = %v.config.name, %local_addr, "primary: answering a peer that is primary too (the exchange only)");
    }
    let socket = listener.try_clone().map_err(|e| format!("volume {}: {e}", v.config.name))?;
    let stopping = Arc::new(AtomicBool::new(false));
    let threads = Arc::new(AtomicUsize::new(0));
    let sync_links = Arc::new(Mutex::new(Vec::new()));
    let sessions = Arc::new(SessionTable::default());
    let shared = Accepting {
        links: Arc::new(AtomicU64::new(0)),
        handshakes: Arc::new(AtomicUsize::new(0)),
        sessions: sessions.clone(),
        stopping: stopping.clone(),
        threads: threads.clone(),
        sync_links: sync_links.clone(),
        sync_link_ids: Arc::new(AtomicU64::new(0)),
        serving,
    };
    let count = ThreadCount::enter(&threads);
    std::thread::Builder::new()
        .name(format!("listen-{}", v.config.name))
        .spawn(move || {
            let _count = count;
            accept_loop(v, listener, shared)
        })
        .map_err(|e| e.to_string())?;
    Ok(Listener { local_addr, stopping, socket, sessions, sync_links, threads })
}

/// What the accept loop shares with the link threads it starts.
#[derive(Clone)]
struct Accepting {
    links: Arc<AtomicU64>,
    handshakes: Arc<AtomicUsize>,
    sessions: Arc<SessionTable>,
    stopping: Arc<AtomicBool>,
    threads: Arc<AtomicUsize>,
    sync_links: Arc<Mutex<Vec<(u64, TcpStream)>>>,
    sync_link_ids: Arc<AtomicU64>,
    serving: Serving,
}

fn accept_loop(v: Arc<VolumeShared>, listener: TcpListener, a: Accepting) {
    let name = v.config.name.clone();
    let handshakes = a.handshakes.clone();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut not_allowed = RateLimitedLog { last: None, suppressed: 0 };
    let mut over_cap = RateLimitedLog { last: None, suppressed: 0 };
    loop {
        let accepted = listener.accept();
        if a.stopping.load(Ordering::Acquire) {
            tracing::info!(volume = %name, "secondary: no longer accepting links");
            return;
        }
        let (stream, from) = match accepted {
            Ok(c) => {
                backoff = ACCEPT_BACKOFF_MIN;
                c
            }
            Err(e) => {
                // EMFILE and friends persist until something closes: retrying at once would spin.
                tracing::warn!(volume = %name, "accept failed: {e}; retrying in {} ms", backoff.as_millis());
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Some(peer) = v.config.peer.as_ref() else {
            not_allowed.log(&name, &format!("refused link from {from}: this volume is standalone"));
            continue;
        };
        if !peer.allow_from.iter().any(|r| r.contains(from.ip())) {
            not_allowed.log(
                &name,
                &format!("refused link from {from}: not the peer's address (set volume.peer.allow_from to allow it)"),
            );
            continue;
        }
        if handshakes.fetch_add(1, Ordering::AcqRel) >= HANDSHAKES_MAX {
            handshakes.fetch_sub(1, Ordering::AcqRel);
            over_cap.log(&name, &format!("refused link from {from}: {HANDSHAKES_MAX} handshakes already in progress"));
            continue;
        }
        let (v, a2) = (v.clone(), a.clone());
        let count = ThreadCount::enter(&a.threads);
        let spawned = std::thread::Builder::new().name(format!("replica-{name}")).stack_size(LINK_THREAD_STACK).spawn(
            move || {
                let _count = count;
                accept_one(v, stream, from, &a2)
            },
        );
        if let Err(e) = spawned {
            // The closure (and the stream) is gone with the error; give the slot back.
            handshakes.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(volume = %name, "cannot start a thread for the link from {from}: {e}");
        }
    }
}

/// Runs `hs` over a blocking stream until it ends or `deadline` passes, whatever the peer
/// sends and however slowly: every read and write is bounded by the time left.
pub fn handshake_until(
    stream: &mut TcpStream,
    mut hs: Handshake,
    deadline: Instant,
) -> Result<HelloInfo, HandshakeError> {
    let late = || {
        HandshakeError::Io(format!("the peer did not finish the handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()))
    };
    let mut buf = [0u8; 256];
    loop {
        while let Some(out) = hs.poll_output() {
            let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or_else(late)?;
            stream.set_write_timeout(Some(left)).map_err(|e| HandshakeError::Io(e.to_string()))?;
            stream.write_all(&out).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => late(),
                _ => HandshakeError::Io(e.to_string()),
            })?;
        }
        if let Some(result) = hs.outcome() {
            return result;
        }
        let want = hs.wants().min(buf.len());
        if want == 0 {
            return Err(HandshakeError::Malformed("handshake stalled".into()));
        }
        let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or_else(late)?;
        stream.set_read_timeout(Some(left)).map_err(|e| HandshakeError::Io(e.to_string()))?;
        let n = match stream.read(&mut buf[..want]) {
            Ok(0) => return Err(HandshakeError::Io("the peer closed the connection during the handshake".into())),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(late())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HandshakeError::Io(e.to_string())),
        };
        // A refusal verdict is queued before the error returns; send it before giving up.
        if let Err(e) = hs.feed(&buf[..n]) {
            while let Some(out) = hs.poll_output() {
                let _ = stream.write_all(&out);
            }
            return Err(e);
        }
    }
}

fn accept_one(v: Arc<VolumeShared>, mut stream: TcpStream, from: SocketAddr, a: &Accepting) {
    let (links, handshakes, sessions) = (&a.links, &a.handshakes, &*a.sessions);
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let expected = v.config.peer.as_ref().map(|p| p.name.clone()).unwrap_or_default();
    let hs = Handshake::new(Role::Listener, local_hello(&v, 0, 0), &v.config.authkey, &expected);
    // The transport (`transport.rs`): a peer of the other transport is refused here; for
    // TLS, the session is the kernel's from here on.
    let secured = v.config.peer.as_ref().map_or(Ok(()), |p| super::transport::secure_server(&stream, p, deadline));
    let result = secured.and_then(|()| handshake_until(&mut stream, hs, deadline).map_err(|e| e.to_string()));
    handshakes.fetch_sub(1, Ordering::AcqRel);
    let peer = match result {
        Ok(p) => p,
        Err(e) => {
            // The full reason stays here; the peer got a generic refusal unless it had proven
            // the key (protocol::handshake).
            tracing::error!(volume = %v.config.name, "refused link from {from}: {e}");
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(None);
    if a.stopping.load(Ordering::Acquire) {
        return;
    }
    if a.serving == Serving::PrimaryExchange {
        if peer.queue != metroblk_protocol::SYNC_QUEUE {
            tracing::warn!(volume = %v.config.name, "refused a data link from {from}: this node is primary");
            return;
        }
        let id = a.sync_link_ids.fetch_add(1, Ordering::Relaxed);
        if let Ok(second) = stream.try_clone() {
            a.sync_links.lock().unwrap_or_else(|p| p.into_inner()).push((id, second));
        }
        if a.stopping.load(Ordering::Acquire) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let why = crate::resync::target::answer_as_primary(&v, stream);
        a.sync_links.lock().unwrap_or_else(|p| p.into_inner()).retain(|(i, _)| *i != id);
        tracing::info!(volume = %v.config.name, peer = %peer.node_name, "sync link from a peer that is primary too: {why}");
        return;
    }
    if peer.queue == metroblk_protocol::SYNC_QUEUE {
        tracing::info!(volume = %v.config.name, peer = %peer.node_name, "sync link from primary up");
        // Registered (a second descriptor) so that a stop can shut it; checked again after,
        // so a stop that raced the registration still ends it.
        let id = a.sync_link_ids.fetch_add(1, Ordering::Relaxed);
        if let Ok(second) = stream.try_clone() {
            a.sync_links.lock().unwrap_or_else(|p| p.into_inner()).push((id, second));
        }
        if a.stopping.load(Ordering::Acquire) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let why = crate::resync::target::serve(v.clone(), stream, sessions);
        a.sync_links.lock().unwrap_or_else(|p| p.into_inner()).retain(|(i, _)| *i != id);
        tracing::info!(volume = %v.config.name, peer = %peer.node_name, "sync link from primary ended: {why}");
        return;
    }
    // Data links join the copies only after the sync link's exchange allowed it in this run
    // (`resync/`): never write a split-brain peer's data over.
    if !v.sync.is_admitted() {
        tracing::warn!(volume = %v.config.name, "refused a data link from {from}: the sync link's exchange has not allowed it (status says why)");
        return;
    }
    // A primary has at most MAX_QUEUES queues; the number also picks the link's counters.
    if peer.queue >= crate::config::MAX_QUEUES {
        tracing::warn!(volume = %v.config.name, "refused link from {from}: queue {} is above the limit of {} queues", peer.queue, crate::config::MAX_QUEUES);
        return;
    }
    // Session rule (`sessions.rs`): the older links of this queue stop and drain first. The
    // table owns the socket from here until `finish`.
    let control = match sessions.admit(peer.queue, peer.session, stream) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(volume = %v.config.name, "refused link from {from}: {e}");
            return;
        }
    };
    let stats = &v.queue_stats[0];
    let open_before = links.fetch_add(1, Ordering::Relaxed);
    if open_before >= MAX_LINKS {
        links.fetch_sub(1, Ordering::Relaxed);
        sessions.finish(&control);
        tracing::warn!(volume = %v.config.name, "refusing a link from {from}: {MAX_LINKS} already open");
        return;
    }
    // Any link up: connected. Decided on the counter's own transition, so two links accepted
    // at once cannot both miss it.
    stats.set_link(LinkState::Connected);
    tracing::info!(volume = %v.config.name, peer = %peer.node_name, queue = peer.queue, session = peer.session, "link from primary up");
    // Each queue's link has its own counters: one link per queue serves at a time
    // (`sessions.rs`), and the queue number was checked above.
    let link_stats = v.queue_stats[peer.queue as usize % v.queue_stats.len()].clone();
    let why = replica::serve(v.clone(), peer.node_name.clone(), control.clone(), link_stats);
    tracing::warn!(volume = %v.config.name, peer = %peer.node_name, queue = peer.queue, session = peer.session, "link from primary ended: {why}");
    // Closes the socket (nothing is in flight on it any more), then lets a newer link start.
    sessions.finish(&control);
    if links.fetch_sub(1, Ordering::Relaxed) == 1 {
        stats.set_link(LinkState::Connecting);
    }
}
