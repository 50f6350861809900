//! Link sessions on the secondary: a newer link for a queue supersedes the older one, and no
//! frame of a superseded link is ever applied after the newer one starts.
//!
//! Why: when the primary gives up a link (peer timeout during a partition) and dials again,
//! the old TCP connection may still hold writes that the secondary has not read. If it went
//! on reading them, an old write could land after a newer write to the same block that came
//! over the new link and was acknowledged. So each dialled link carries a session number that
//! rises with every connection the primary makes for a queue, and here:
//!
//! 1. a link whose session is not newer than the live one for its queue is refused;
//! 2. a newer one first marks the live one superseded (its thread applies and acks nothing it
//!    reads after that) and shuts its socket for reading, then waits until that thread has
//!    finished its in-flight local writes and closed it, and only then starts serving.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long a newer link waits for the superseded one to drain before it is refused (the
/// primary dials again): local writes in flight finish in far less on a healthy disk.
pub const SUPERSEDE_WAIT_MAX: Duration = Duration::from_secs(10);

/// Shared between a link's thread and the table: the flag that stops it and the signal that
/// it has stopped.
pub struct LinkControl {
    pub queue: u16,
    pub session: u64,
    superseded: AtomicBool,
    fd: RawFd,
    finished: Mutex<bool>,
    cv: Condvar,
}

impl LinkControl {
    /// Checked by the link's thread before it applies anything it has read.
    #[inline]
    pub fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    fn wait_finished(&self, max: Duration) -> bool {
        let g = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self.cv.wait_timeout_while(g, max, |done| !*done).unwrap_or_else(|p| p.into_inner());
        *g
    }
}

#[derive(Default)]
pub struct SessionTable {
    live: Mutex<HashMap<u16, Arc<LinkControl>>>,
}

impl SessionTable {
    /// Admits a link for `queue` with `session` on socket `fd`. Supersedes and waits for the
    /// live link of that queue if this one is newer; refuses it if not. Returns the control the
    /// link's thread must check and hand back to [`SessionTable::finish`].
    pub fn admit(&self, queue: u16, session: u64, fd: RawFd) -> Result<Arc<LinkControl>, String> {
        let control = Arc::new(LinkControl {
            queue,
            session,
            superseded: AtomicBool::new(false),
            fd,
            finished: Mutex::new(false),
            cv: Condvar::new(),
        });
        let old = {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(cur) = live.get(&queue) {
                if cur.session >= session {
                    return Err(format!(
                        "link session {session} for queue {queue} is not newer than the live session {}",
                        cur.session
                    ));
                }
            }
            live.insert(queue, control.clone())
        };
        if let Some(old) = old {
            old.superseded.store(true, Ordering::Release);
            // SAFETY: plain syscall on the old link's socket, which its thread keeps open until
            // it has finished (and it finishes only after we stop waiting or it drained). A
            // socket already closed makes this fail with EBADF, harmlessly: a finished link
            // no longer needs waking.
            unsafe { libc::shutdown(old.fd, libc::SHUT_RD) };
            if !old.wait_finished(SUPERSEDE_WAIT_MAX) {
                self.finish(&control);
                return Err(format!(
                    "the superseded link (session {}) of queue {queue} did not drain within {} s",
                    old.session,
                    SUPERSEDE_WAIT_MAX.as_secs()
                ));
            }
        }
        Ok(control)
    }

    /// The link's thread has stopped: nothing of it is in flight any more.
    pub fn finish(&self, control: &Arc<LinkControl>) {
        {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            if live.get(&control.queue).is_some_and(|c| Arc::ptr_eq(c, control)) {
                live.remove(&control.queue);
            }
        }
        *control.finished.lock().unwrap_or_else(|p| p.into_inner()) = true;
        control.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_or_equal_sessions_are_refused_and_newer_ones_supersede_after_the_old_finished() {
        let t = Arc::new(SessionTable::default());
        let a = t.admit(0, 10, -1).unwrap();
        assert!(t.admit(0, 10, -1).is_err());
        assert!(t.admit(0, 9, -1).is_err());
        // Another queue is independent.
        let other = t.admit(1, 1, -1).unwrap();
        // A newer session waits until the old link has finished.
        let t2 = t.clone();
        let newer = std::thread::spawn(move || t2.admit(0, 11, -1).map(|c| c.session));
        std::thread::sleep(Duration::from_millis(100));
        assert!(a.is_superseded());
        assert!(!newer.is_finished(), "served before the superseded link finished");
        assert!(!other.is_superseded());
        t.finish(&a);
        assert_eq!(newer.join().unwrap(), Ok(11));
        assert!(t.admit(0, 11, -1).is_err(), "11 is live now");
    }
}
