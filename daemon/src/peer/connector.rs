//! Dialling the peer: connection set-up is control plane, off the queue threads.
//!
//! Each primary queue has a [`LinkHandoff`] (`handoff.rs`). When the queue needs a link it calls
//! [`LinkHandoff::request`]; a connector thread dials the peer with capped exponential
//! backoff, runs the authenticated handshake, puts the ready socket in the hand-off and
//! signals the queue's eventfd, which the queue's ring is watching. The queue picks the socket
//! up on its own thread, so the data path never waits on a lock or on connection set-up.

use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use metroblk_protocol::{run_handshake, Handshake, HandshakeError, HelloInfo, Role};

use super::handoff::LinkHandoff;
use super::transport::{secure_client, HANDSHAKE_TIMEOUT};
use crate::volume::VolumeShared;

/// Backoff between dial attempts: starts small so a restarted peer is picked up quickly,
/// capped so a long outage costs little.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A link must stay up this long to reset the backoff: one that ends sooner is a failure
/// cycle and keeps backing off.
pub const LINK_HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Bound on the TCP connect so a half-open peer cannot stall the connector (the set-up after
/// it is bounded by [`HANDSHAKE_TIMEOUT`]).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// When the connector dials again, as pure state (time passed in as durations).
///
/// Failures the peer causes deliberately (a handshake refusal, an error ack, an ERROR frame:
/// a failed disk, a stale epoch, a wrong key) will repeat, so they back off to the maximum at
/// once; an unreachable peer (connect refused, timeouts) doubles from the minimum, so a
/// restarted peer is picked up quickly; only a link that stayed up for [`LINK_HEALTHY_AFTER`]
/// and did not end in a peer error resets the backoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    delay: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { delay: BACKOFF_MIN }
    }
}

impl Backoff {
    /// A dial failed; `peer_refused`: the peer answered the handshake and refused (or failed
    /// to prove the key). Returns how long to wait before the next dial.
    pub fn dial_failed(&mut self, peer_refused: bool) -> Duration {
        let wait = if peer_refused { BACKOFF_MAX } else { self.delay };
        self.delay = if peer_refused { BACKOFF_MAX } else { (self.delay * 2).min(BACKOFF_MAX) };
        wait
    }

    /// A delivered link ended after being up for `up_for`; `peer_error` as in
    /// [`LinkHandoff::link_ended`]. Returns how long to wait before dialling again.
    pub fn link_ended(&mut self, up_for: Duration, peer_error: bool) -> Duration {
        if peer_error {
            self.delay = BACKOFF_MAX;
            return BACKOFF_MAX;
        }
        if up_for >= LINK_HEALTHY_AFTER {
            self.delay = BACKOFF_MIN;
            return Duration::ZERO;
        }
        let wait = self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        wait
    }
}

/// Why a dial failed: one line for logs and status, and whether the peer itself refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialError {
    pub text: String,
    pub peer_refused: bool,
}

impl DialError {
    fn local(text: String) -> DialError {
        DialError { text, peer_refused: false }
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

/// Dials and authenticates one link for `queue`, handing it over non-blocking.
pub fn dial(v: &VolumeShared, queue: u16, session: u64) -> Result<OwnedFd, DialError> {
    let s = dial_stream(v, queue, session)?;
    s.set_nonblocking(true).map_err(|e| DialError::local(format!("cannot make the link non-blocking: {e}")))?;
    Ok(OwnedFd::from(s))
}

/// Dials and authenticates one link for `queue` (blocking, no timeouts left set).
pub fn dial_stream(v: &VolumeShared, queue: u16, session: u64) -> Result<TcpStream, DialError> {
    let c = &v.config;
    let p = c
        .peer
        .as_ref()
        .ok_or_else(|| DialError::local(format!("volume {} is standalone: it has no peer to dial", c.name)))?;
    let stream = TcpStream::connect_timeout(&p.address, CONNECT_TIMEOUT)
        .map_err(|e| DialError::local(format!("cannot connect to peer {} at {}: {e}", p.name, p.address)))?;
    let _ = stream.set_nodelay(true);
    super::set_dead_peer_detection(&stream)
        .map_err(|e| DialError::local(format!("cannot set keepalive on the link: {e}")))?;
    // The transport (`transport.rs`): for TLS, the session is the kernel's from here on.
    secure_client(&stream, p, std::time::Instant::now() + HANDSHAKE_TIMEOUT).map_err(|e| DialError {
        text: format!("peer {} at {}: {e}", p.name, p.address),
        peer_refused: e.is_refusal(),
    })?;
    let io = |e: std::io::Error| DialError::local(format!("peer {} at {}: {e}", p.name, p.address));
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io)?;
    let hs = Handshake::new(Role::Dialer, local_hello(v, queue, session), &c.authkey, &p.name);
    let mut s = stream;
    let peer = run_handshake(&mut s, hs).map_err(|e| DialError {
        text: format!("peer {} at {}: {e}", p.name, p.address),
        // An I/O error is the network's (or a peer that is not up yet); anything else is
        // the peer's answer, and dialling again at once would get the same one.
        peer_refused: !matches!(e, HandshakeError::Io(_)),
    })?;
    s.set_read_timeout(None).map_err(io)?;
    s.set_write_timeout(None).map_err(io)?;
    tracing::debug!(volume = %c.name, queue, peer = %peer.node_name, "handshake done");
    Ok(s)
}

/// Sleeps the backoff, cut short when a new sync exchange admits the peer (it is back:
/// every moment without data links is a write held or completed alone). False: shut down.
fn sleep_until_admitted_again(v: &VolumeShared, h: &LinkHandoff, wait: Duration) -> bool {
    let admissions = v.sync.admissions();
    let until = std::time::Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || v.sync.admissions() != admissions {
            return true;
        }
        if !h.sleep(left.min(Duration::from_millis(50))) {
            return false;
        }
    }
}

pub fn spawn(v: Arc<VolumeShared>, queue: u16, h: Arc<LinkHandoff>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("connect-{}-q{queue}", v.config.name))
        .spawn(move || {
            let mut backoff = Backoff::default();
            let mut last_logged: Option<String> = None;
            let mut link_up_at: Option<std::time::Instant> = None;
            let mut session = 0;
            while h.wait_wanted() {
                if let Some(up_at) = link_up_at.take() {
                    // The queue asks again only once the last link has ended.
                    let wait = backoff.link_ended(up_at.elapsed(), h.take_ended_by_peer());
                    if !wait.is_zero() && !sleep_until_admitted_again(&v, &h, wait) {
                        break;
                    }
                }
                // Data links join the copies only once the sync link's exchange allowed it
                // (`resync/`): a split-brain peer never receives a write.
                while !v.sync.is_admitted() {
                    if !h.sleep(Duration::from_millis(50)) {
                        return;
                    }
                }
                // A primary the witness replaced dials no more: its peer must see it gone.
                if v.fence.is_deposed() {
                    return;
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
                        if last_logged.as_deref() != Some(e.text.as_str()) {
                            tracing::warn!(volume = %v.config.name, queue, "{}; retrying", e.text);
                            last_logged = Some(e.text.clone());
                        }
                        h.set_error(&e.text);
                        if !sleep_until_admitted_again(&v, &h, backoff.dial_failed(e.peer_refused)) {
                            break;
                        }
                    }
                }
            }
        })
        .expect("spawning a connector thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(100);
    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn an_unreachable_peer_doubles_from_the_minimum_to_the_maximum() {
        let mut b = Backoff::default();
        let waits: Vec<_> = (0..8).map(|_| b.dial_failed(false).as_millis()).collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
    }

    #[test]
    fn peer_errors_back_off_to_the_maximum_at_once_and_never_reset() {
        let mut b = Backoff::default();
        assert_eq!(b.dial_failed(true), BACKOFF_MAX, "a handshake refusal");
        let mut b = Backoff::default();
        // Error acks / a stale epoch: every link ends in a peer error, whether young or old.
        for up_for in [SHORT, LONG, SHORT] {
            assert_eq!(b.link_ended(up_for, true), BACKOFF_MAX);
        }
        // Even a refusal after a long healthy link does not let the next cycle start small.
        assert_eq!(b.dial_failed(false), BACKOFF_MAX);
    }

    #[test]
    fn only_a_link_healthy_for_a_while_resets_the_backoff() {
        let mut b = Backoff::default();
        for _ in 0..10 {
            b.dial_failed(false);
        }
        // A link that dies young (for no error of the peer's) keeps backing off.
        assert_eq!(b.link_ended(SHORT, false), BACKOFF_MAX);
        assert_eq!(b.link_ended(LINK_HEALTHY_AFTER - SHORT, false), BACKOFF_MAX);
        // A healthy one: dial again at once, and start small.
        assert_eq!(b.link_ended(LINK_HEALTHY_AFTER, false), Duration::ZERO);
        assert_eq!(b.dial_failed(false), BACKOFF_MIN);
        assert_eq!(b.link_ended(SHORT, false), 2 * BACKOFF_MIN);
    }
}
