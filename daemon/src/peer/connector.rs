//! Dialling the peer: connection set-up is control plane, off the queue threads.
//!
//! Each primary queue has a [`LinkHandoff`]. When the queue needs a link it calls
//! [`LinkHandoff::request`]; a connector thread dials the peer with capped exponential
//! backoff, runs the authenticated handshake, puts the ready socket in the hand-off and
//! signals the queue's eventfd, which the queue's ring is watching. The queue picks the socket
//! up on its own thread, so the data path never waits on a lock or on connection set-up.

use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use metroblk_protocol::{run_handshake, Handshake, HelloInfo, Role};

use crate::volume::VolumeShared;

/// Backoff between dial attempts: starts small so a restarted peer is picked up quickly,
/// capped so a long outage costs little.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A link must stay up this long to reset the backoff: one that the peer ends sooner (error
/// acks, a stale epoch, an ERROR frame) is a failure cycle and keeps backing off.
pub const LINK_HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Bounds on connection set-up so a half-open peer cannot stall the connector.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct HandoffInner {
    wanted: bool,
    ready: Option<OwnedFd>,
    shutdown: bool,
    last_error: Option<String>,
}

pub struct LinkHandoff {
    inner: Mutex<HandoffInner>,
    cv: Condvar,
    eventfd: OwnedFd,
}

impl LinkHandoff {
    pub fn new() -> std::io::Result<LinkHandoff> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(LinkHandoff { inner: Mutex::new(HandoffInner::default()), cv: Condvar::new(), eventfd })
    }

    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// The queue needs a (new) link.
    pub fn request(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.wanted = true;
        self.cv.notify_all();
    }

    /// The socket the connector made ready, if any.
    pub fn take(&self) -> Option<OwnedFd> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).ready.take()
    }

    pub fn set_error(&self, e: &str) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).last_error = Some(e.to_string());
    }

    /// The last reason a link failed or was refused (for status and tests).
    pub fn last_error(&self) -> Option<String> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).last_error.clone()
    }

    pub fn shut_down(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.shutdown = true;
        self.cv.notify_all();
    }

    fn deliver(&self, sock: OwnedFd) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.ready = Some(sock);
        g.wanted = false;
        g.last_error = None;
        drop(g);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        let n = unsafe { libc::write(self.eventfd.as_raw_fd(), &one as *const u64 as *const _, 8) };
        if n != 8 {
            tracing::error!("cannot signal the queue's eventfd: {}", std::io::Error::last_os_error());
        }
    }

    /// Blocks until a link is wanted (true) or the volume shuts down (false).
    fn wait_wanted(&self) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while !g.wanted && !g.shutdown {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        !g.shutdown
    }

    /// Sleeps for `d` unless shut down first; returns false on shutdown.
    fn sleep(&self, d: Duration) -> bool {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self.cv.wait_timeout_while(g, d, |g| !g.shutdown).unwrap_or_else(|p| p.into_inner());
        !g.shutdown
    }
}

/// The session number of the next link of a queue: above the last one, and above any a
/// previous run of this daemon can have used (wall-clock nanoseconds), so the secondary always
/// sees a restarted primary's links as newer. If the clock stepped back by more than the
/// previous run's lifetime, the secondary refuses the new links until the old ones end (peer
/// timeout, 5 s) and frees their sessions.
pub fn next_session(last: u64) -> u64 {
    let now_ns =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    now_ns.max(last + 1)
}

pub fn random_nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    // SAFETY: getrandom writes at most `len` bytes into the live buffer.
    let r = unsafe { libc::getrandom(n.as_mut_ptr() as *mut _, n.len(), 0) };
    assert_eq!(r, 32, "getrandom failed: {}", std::io::Error::last_os_error());
    n
}

pub fn local_hello(v: &VolumeShared, queue: u16, session: u64) -> HelloInfo {
    let c = &v.config;
    HelloInfo {
        node_name: v.node_name.clone(),
        volume_uuid: *c.uuid.as_bytes(),
        volume_size: c.size,
        region_size: c.region_size as u32,
        block_size: c.block_size,
        queue,
        session,
        epoch: v.epoch(),
        nonce: random_nonce(),
    }
}

/// Dials and authenticates one link for `queue`.
pub fn dial(v: &VolumeShared, queue: u16, session: u64) -> Result<OwnedFd, String> {
    let c = &v.config;
    let p = c.peer.as_ref().ok_or_else(|| format!("volume {} is standalone: it has no peer to dial", c.name))?;
    let stream = TcpStream::connect_timeout(&p.address, CONNECT_TIMEOUT)
        .map_err(|e| format!("cannot connect to peer {} at {}: {e}", p.name, p.address))?;
    let _ = stream.set_nodelay(true);
    super::set_dead_peer_detection(&stream).map_err(|e| format!("cannot set keepalive on the link: {e}"))?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
    let hs = Handshake::new(Role::Dialer, local_hello(v, queue, session), &c.authkey, &p.name);
    let mut s = stream;
    let peer = run_handshake(&mut s, hs).map_err(|e| format!("peer {} at {}: {e}", p.name, p.address))?;
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    s.set_write_timeout(None).map_err(|e| e.to_string())?;
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    tracing::debug!(volume = %c.name, queue, peer = %peer.node_name, "handshake done");
    Ok(OwnedFd::from(s))
}

pub fn spawn(v: Arc<VolumeShared>, queue: u16, h: Arc<LinkHandoff>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("connect-{}-q{queue}", v.config.name))
        .spawn(move || {
            let mut backoff = BACKOFF_MIN;
            let mut last_logged: Option<String> = None;
            let mut link_up_at: Option<std::time::Instant> = None;
            let mut session = 0;
            while h.wait_wanted() {
                if let Some(up_at) = link_up_at.take() {
                    if up_at.elapsed() >= LINK_HEALTHY_AFTER {
                        backoff = BACKOFF_MIN;
                    } else {
                        // The last link died young: do not dial straight back into the same
                        // refusal.
                        if !h.sleep(backoff) {
                            break;
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
                session = next_session(session);
                match dial(&v, queue, session) {
                    Ok(sock) => {
                        tracing::info!(volume = %v.config.name, queue, "connected to peer");
                        h.deliver(sock);
                        link_up_at = Some(std::time::Instant::now());
                        last_logged = None;
                    }
                    Err(e) => {
                        // Log a reason once, not once per retry.
                        if last_logged.as_deref() != Some(e.as_str()) {
                            tracing::warn!(volume = %v.config.name, queue, "{e}; retrying");
                            last_logged = Some(e.clone());
                        }
                        h.set_error(&e);
                        if !h.sleep(backoff) {
                            break;
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        })
        .expect("spawning a connector thread")
}
