//! The local disk's state (design vocabulary: `up-to-date`, `outdated`, `inconsistent`,
//! `failed`) and the rule that disk errors latch.
//!
//! Linux reports a writeback error once per open file: after a failed fsync the next one may
//! succeed although the data is gone. So an error from a local write or fsync is never retried
//! into success; it moves the disk to `failed` for good (until an operator re-attaches it), and
//! every part of the engine checks [`DiskHealth::is_failed`] before it reports success.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

pub use metroblk_protocol::DiskState;

/// The disk state of one volume on this node, shared by its queue and replica threads.
/// The hot path reads it with one relaxed load; the reason is written once, on failure.
pub struct DiskHealth {
    state: AtomicU8,
    reason: Mutex<Option<String>>,
}

impl DiskHealth {
    pub fn new(state: DiskState) -> DiskHealth {
        DiskHealth { state: AtomicU8::new(state.code()), reason: Mutex::new(None) }
    }

    pub fn state(&self) -> DiskState {
        DiskState::from_code(self.state.load(Ordering::Acquire)).unwrap_or(DiskState::Failed)
    }

    #[inline]
    pub fn is_failed(&self) -> bool {
        self.state() == DiskState::Failed
    }

    /// Latches `failed` with the first reason; later failures only keep the first reason.
    /// Returns true the first time, so the caller logs once.
    pub fn latch_failed(&self, volume: &str, why: &str) -> bool {
        let prev = self.state.swap(DiskState::Failed.code(), Ordering::AcqRel);
        if prev == DiskState::Failed.code() {
            return false;
        }
        tracing::error!(
            volume,
            "local disk failed: {why}; disk state is now failed (errors latch: nothing is retried into success)"
        );
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
        true
    }

    /// Moves between the states other than `failed` (a resync makes the copy `inconsistent`,
    /// then `up-to-date`). Returns false, changing nothing, once `failed` latched.
    pub fn set(&self, to: DiskState) -> bool {
        assert_ne!(to, DiskState::Failed, "failure latches through latch_failed");
        let failed = DiskState::Failed.code();
        self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| (s != failed).then_some(to.code())).is_ok()
    }

    /// Why the disk failed, if it did.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_latches_and_keeps_the_first_reason() {
        let d = DiskHealth::new(DiskState::UpToDate);
        assert!(!d.is_failed());
        assert!(d.latch_failed("v", "write: EIO"));
        assert!(!d.latch_failed("v", "fsync: ENOSPC"));
        assert_eq!(d.state(), DiskState::Failed);
        assert_eq!(d.reason().as_deref(), Some("write: EIO"));
        assert_eq!(d.state().to_string(), "failed");
    }
}
