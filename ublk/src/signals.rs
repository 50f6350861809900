//! SIGINT/SIGTERM as a clean-shutdown request.
//!
//! The signals are blocked in the calling thread, and so in every thread it starts after
//! that, and one thread waits for them with `sigwait`: no handler runs in the middle of a
//! queue thread's io_uring wait (which would return EINTR), and the shutdown itself (stop and
//! delete the device) runs on an ordinary thread. Call [`TermSignals::block`] first thing in
//! `main`, before any thread exists. SIGKILL cannot be caught: after `kill -9` the device is
//! left for recovery by the next incarnation.

use crate::error::Error;

/// The termination signals, blocked; [`TermSignals::wait`] returns when one arrives.
pub struct TermSignals {
    set: libc::sigset_t,
}

impl TermSignals {
    /// Blocks SIGINT and SIGTERM in the calling thread (inherited by threads it starts later).
    pub fn block() -> Result<TermSignals, Error> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; these calls only write to it.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
        }
        // SAFETY: `set` is initialised; the old mask is not asked for.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(Error::Signals(format!(
                "cannot block SIGINT/SIGTERM: {}",
                std::io::Error::from_raw_os_error(rc)
            )));
        }
        Ok(TermSignals { set })
    }

    /// Waits for SIGINT or SIGTERM and returns its name.
    pub fn wait(&self) -> &'static str {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `self.set` is an initialised signal set and `sig` is writable.
            let rc = unsafe { libc::sigwait(&self.set, &mut sig) };
            if rc == 0 {
                return match sig {
                    libc::SIGINT => "SIGINT",
                    libc::SIGTERM => "SIGTERM",
                    _ => continue,
                };
            }
        }
    }
}
