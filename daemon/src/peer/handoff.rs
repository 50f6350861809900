//! The hand-off of a dialled link from the connector thread to its primary queue.
//!
//! Each primary queue has one [`LinkHandoff`]. When the queue needs a link it calls
//! [`LinkHandoff::request`]; the connector (`connector.rs`) dials, authenticates, puts the
//! ready socket here and signals the eventfd the queue's ring watches. The queue takes the
//! socket on its own thread, so the data path never waits on a lock or on connection set-up:
//! the mutex is touched only at link up and down.
//!
//! API Boundary: the engine (`volume/queue.rs`) sees only this type, never the connector, so
//! the engine does not depend on the parts that depend on it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

#[derive(Default)]
struct HandoffInner {
    wanted: bool,
    ready: Option<OwnedFd>,
    shutdown: bool,
    last_error: Option<String>,
    /// The last link ended in an error from the peer (set by the queue, read by the connector).
    ended_by_peer: bool,
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

    /// The queue's link ended; `peer_error`: the peer ended it with an error of its own (an
    /// error ack, an ERROR frame such as a stale-epoch refusal), so redialling at once would
    /// only meet the same error.
    pub fn link_ended(&self, peer_error: bool) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).ended_by_peer = peer_error;
    }

    pub(super) fn take_ended_by_peer(&self) -> bool {
        std::mem::take(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()).ended_by_peer)
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

    pub(super) fn deliver(&self, sock: OwnedFd) {
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
    pub(super) fn wait_wanted(&self) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while !g.wanted && !g.shutdown {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        !g.shutdown
    }

    /// Sleeps for `d` unless shut down first; returns false on shutdown.
    pub(super) fn sleep(&self, d: Duration) -> bool {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self.cv.wait_timeout_while(g, d, |g| !g.shutdown).unwrap_or_else(|p| p.into_inner());
        !g.shutdown
    }
}
