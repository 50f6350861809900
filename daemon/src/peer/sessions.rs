//! Link sessions on the secondary: a newer link for a queue supersedes the older ones, and no
//! frame of a superseded link is ever applied after the newer one starts.
//!
//! Why: when the primary gives up a link (peer timeout during a partition) and dials again,
//! the old TCP connection may still hold writes that the secondary has not read. If it went
//! on reading them, an old write could land after a newer write to the same block that came
//! over the new link and was acknowledged. So each dialled link carries a session number that
//! rises with every connection the primary makes for a queue, and here:
//!
//! 1. a link whose session is not newer than every link of its queue still open here is
//!    refused;
//! 2. a newer one first marks every older link of the queue superseded (its thread applies and
//!    acks nothing it reads or completes after that) and shuts their sockets for reading, then
//!    waits until each has finished its in-flight local I/O and closed its socket, and only
//!    then starts serving;
//! 3. a link that gives up waiting (the old one's disk hangs) or is itself superseded while it
//!    waits never serves; the older links stay in the table, still draining, so whoever comes
//!    next waits for them too. "Finished" always means closed with nothing in flight.
//!
//! The table owns each link's socket from admission to [`SessionTable::finish`], so the
//! `shutdown` a newer link does on an older one can never hit a reused descriptor number.

use std::collections::HashMap;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a newer link waits for the superseded ones to drain before it is refused (the
/// primary dials again): local writes in flight finish in far less on a healthy disk.
pub const SUPERSEDE_WAIT_MAX: Duration = Duration::from_secs(10);

/// One admitted link, shared between its thread and the table.
pub struct LinkControl {
    pub queue: u16,
    pub session: u64,
    superseded: AtomicBool,
    /// The link's socket, owned here until the link finishes; only the link's thread does I/O
    /// on it (through [`LinkControl::fd`]); the table only shuts it down.
    sock: Mutex<Option<TcpStream>>,
}

impl LinkControl {
    /// Checked by the link's thread before it applies or acknowledges anything.
    #[inline]
    pub fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    /// The socket's descriptor; valid until [`SessionTable::finish`] is called for this link,
    /// which its own thread does once it stopped using it.
    pub fn fd(&self) -> RawFd {
        self.sock.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(-1, |s| s.as_raw_fd())
    }

    /// The socket, to set options on before serving.
    pub fn with_socket<R>(&self, f: impl FnOnce(&TcpStream) -> R) -> Option<R> {
        self.sock.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(f)
    }

    fn supersede(&self) {
        self.superseded.store(true, Ordering::Release);
        if let Some(s) = self.sock.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            // Makes an in-flight RECV of that link finish, so its thread sees the flag.
            let _ = s.shutdown(std::net::Shutdown::Read);
        }
    }
}

/// The links of one volume that are open (admitted and not finished), per queue.
#[derive(Default)]
pub struct SessionTable {
    open: Mutex<HashMap<u16, Vec<Arc<LinkControl>>>>,
    changed: Condvar,
}

impl SessionTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<u16, Vec<Arc<LinkControl>>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a link for `queue` with `session` on `sock`. Supersedes every older open link of
    /// that queue and waits until they have finished; refuses the link if one is not older.
    /// Returns the control the link's thread must check and hand back to
    /// [`SessionTable::finish`].
    pub fn admit(&self, queue: u16, session: u64, sock: TcpStream) -> Result<Arc<LinkControl>, String> {
        self.admit_within(queue, session, sock, SUPERSEDE_WAIT_MAX)
    }

    fn admit_within(
        &self,
        queue: u16,
        session: u64,
        sock: TcpStream,
        wait_max: Duration,
    ) -> Result<Arc<LinkControl>, String> {
        let control =
            Arc::new(LinkControl { queue, session, superseded: AtomicBool::new(false), sock: Mutex::new(Some(sock)) });
        let mut open = self.lock();
        let links = open.entry(queue).or_default();
        if let Some(newest) = links.iter().map(|c| c.session).max().filter(|&s| s >= session) {
            return Err(format!(
                "link session {session} for queue {queue} is not newer than session {newest}, which is still open"
            ));
        }
        for old in links.iter() {
            old.supersede();
        }
        links.push(control.clone());
        // An older link still waiting to start must see that it was superseded.
        self.changed.notify_all();
        let deadline = Instant::now() + wait_max;
        loop {
            let links = open.get(&queue).map(Vec::as_slice).unwrap_or_default();
            let older = links.iter().filter(|c| c.session < session).map(|c| c.session).min();
            let Some(older) = older else { break };
            let why = if control.is_superseded() {
                format!("link session {session} for queue {queue} was superseded before it started")
            } else if let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
                open = self.changed.wait_timeout(open, left).unwrap_or_else(|p| p.into_inner()).0;
                continue;
            } else {
                format!(
                    "the superseded link (session {older}) of queue {queue} did not drain within {} s",
                    wait_max.as_secs()
                )
            };
            // This link never served: it leaves at once; the older ones stay until they drain.
            drop(open);
            self.finish(&control);
            return Err(why);
        }
        if control.is_superseded() {
            drop(open);
            self.finish(&control);
            return Err(format!("link session {session} for queue {queue} was superseded before it started"));
        }
        Ok(control)
    }

    /// The link's thread has stopped: nothing of it is in flight any more. Closes its socket,
    /// then lets the links waiting for it start.
    pub fn finish(&self, control: &Arc<LinkControl>) {
        let mut open = self.lock();
        drop(control.sock.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(links) = open.get_mut(&control.queue) {
            links.retain(|c| !Arc::ptr_eq(c, control));
            if links.is_empty() {
                open.remove(&control.queue);
            }
        }
        drop(open);
        self.changed.notify_all();
    }

    /// Supersedes every open link of every queue and waits until they all finished. A sync
    /// exchange does this first: a data frame still buffered on an old link (or retransmitted
    /// after a partition heals) must never be applied after a resync copy of its region.
    pub fn supersede_all(&self, wait_max: Duration) -> Result<(), String> {
        let mut open = self.lock();
        let old: Vec<Arc<LinkControl>> = open.values().flatten().cloned().collect();
        for c in &old {
            c.supersede();
        }
        let deadline = Instant::now() + wait_max;
        loop {
            let left = old.iter().filter(|c| open.values().flatten().any(|o| Arc::ptr_eq(o, c))).count();
            if left == 0 {
                return Ok(());
            }
            let Some(wait) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                return Err(format!("{left} superseded data links did not drain within {} s", wait_max.as_secs()));
            };
            open = self.changed.wait_timeout(open, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Open links of `queue` (for tests and status).
    pub fn open_links(&self, queue: u16) -> usize {
        self.lock().get(&queue).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected TCP socket on loopback (the table owns real sockets).
    fn sock() -> TcpStream {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        // The accepted end is dropped: the table only needs a socket it can shut down.
        drop(l.accept().unwrap());
        s
    }

    fn admit_in_thread(t: &Arc<SessionTable>, q: u16, s: u64) -> std::thread::JoinHandle<Result<u64, String>> {
        let t = t.clone();
        let s2 = sock();
        std::thread::spawn(move || t.admit(q, s, s2).map(|c| c.session))
    }

    #[test]
    fn older_or_equal_sessions_are_refused_and_newer_ones_supersede_after_the_old_finished() {
        let t = Arc::new(SessionTable::default());
        let a = t.admit(0, 10, sock()).unwrap();
        assert!(t.admit(0, 10, sock()).is_err());
        assert!(t.admit(0, 9, sock()).is_err());
        // Another queue is independent.
        let other = t.admit(1, 1, sock()).unwrap();
        // A newer session waits until the old link has finished.
        let newer = admit_in_thread(&t, 0, 11);
        std::thread::sleep(Duration::from_millis(100));
        assert!(a.is_superseded());
        assert!(!newer.is_finished(), "served before the superseded link finished");
        assert!(!other.is_superseded());
        assert!(a.fd() >= 0, "the socket stays open until the link finished");
        t.finish(&a);
        assert_eq!(a.fd(), -1, "finish closes the socket");
        assert_eq!(newer.join().unwrap(), Ok(11));
        assert!(t.admit(0, 11, sock()).is_err(), "11 is open now");
        // Once nothing is open for a queue, any session may start (the old links are gone).
        let eleven = {
            let open = t.lock();
            open[&0][0].clone()
        };
        t.finish(&eleven);
        assert_eq!(t.open_links(0), 0);
        assert!(t.admit(0, 3, sock()).is_ok());
    }

    #[test]
    fn a_link_superseded_while_it_waits_never_serves_and_the_newest_waits_for_all() {
        let t = Arc::new(SessionTable::default());
        let s1 = t.admit(0, 1, sock()).unwrap();
        let s2 = admit_in_thread(&t, 0, 2);
        std::thread::sleep(Duration::from_millis(50));
        let s3 = admit_in_thread(&t, 0, 3);
        std::thread::sleep(Duration::from_millis(50));
        // 2 was superseded by 3 while waiting for 1: it gives up at once and never serves.
        let r2 = s2.join().unwrap();
        assert!(r2.as_ref().is_err_and(|e| e.contains("superseded before it started")), "{r2:?}");
        // 3 still waits for 1, which is draining.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!s3.is_finished(), "3 served while session 1 was still draining");
        t.finish(&s1);
        assert_eq!(s3.join().unwrap(), Ok(3));
    }

    #[test]
    fn a_newer_link_that_gives_up_waiting_leaves_the_draining_one_blocking_the_next() {
        let t = Arc::new(SessionTable::default());
        let s1 = t.admit(0, 1, sock()).unwrap();
        let r = t.admit_within(0, 2, sock(), Duration::from_millis(50));
        assert!(r.as_ref().is_err_and(|e| e.contains("did not drain")), "{:?}", r.err());
        // Session 1 is still open and draining: the next link waits for it too.
        assert_eq!(t.open_links(0), 1);
        let s3 = admit_in_thread(&t, 0, 3);
        std::thread::sleep(Duration::from_millis(100));
        assert!(!s3.is_finished(), "3 served while session 1 was still draining");
        t.finish(&s1);
        assert_eq!(s3.join().unwrap(), Ok(3));
    }
}
