//! What the witness client tells the queues: the lease, whether this primary was deposed,
//! and the policy for fenced I/O. Atomics only: a queue reads them with one load per request
//! (two and a clock read while its link is down), never a lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{Fencing, OnFence, VolumeConfig};

/// The witness link as status shows it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct WitnessInfo {
    pub address: String,
    pub connected: bool,
    pub last_error: Option<String>,
    /// The last refusal's reason, as the witness gave it.
    pub last_refusal: Option<String>,
}

/// A primary without a lease serves only while it heard its peer within this (pings go out
/// every 500 ms).
pub const PEER_FRESH: Duration = Duration::from_millis(1000);
/// A secondary that has not heard its primary for this long asks to be promoted (the witness
/// refuses while the primary's lease runs). Longer than [`PEER_FRESH`], by more than a
/// network delay.
pub const PRIMARY_SILENCE: Duration = Duration::from_millis(1500);

pub struct FenceShared {
    /// The witness arbitrates this volume (`fencing = "witness"`); false: nothing here applies.
    pub enabled: bool,
    pub on_fence: OnFence,
    /// The clock the lease is kept in (nanoseconds since this instant).
    base: Instant,
    /// End of the lease, in ns since `base`; 0: none.
    lease_until_ns: AtomicU64,
    /// Another node is primary in a newer epoch: this one serves nothing, for good.
    deposed: AtomicBool,
    /// This node once served (held a lease or had its peer) since it started: from then on a
    /// fence fails I/O under `io-error`; before, I/O waits for the first answer.
    served: AtomicBool,
    /// Fenced since the lease and the peer were both lost; cleared only by a new lease.
    fenced_latched: AtomicBool,
    /// Since when the peer has been missing (ns since `base`; 0: it is here).
    peer_missing_since_ns: AtomicU64,
    /// Secondary: when a frame from the primary was last received (ns since `base`).
    peer_heard_ns: AtomicU64,
    pub witness: Mutex<WitnessInfo>,
    /// A resync to the peer finished (or an exchange found it in sync): 1 + the count of
    /// attempts to complete writes alone when that copy began (0: nothing to report). The
    /// witness client revokes going alone and tells the witness, unless an attempt came since.
    peer_in_sync_mark: AtomicU64,
    /// A planned switchover is under way: new I/O parks (never fails) while in-flight I/O
    /// drains; then `handover_requested` asks the witness client to hand the role over.
    pub switching: AtomicBool,
    pub handover_requested: AtomicBool,
    /// The handover's outcome, for the operator's command: Ok(new epoch) or the refusal.
    pub handover_outcome: Mutex<Option<Result<u64, String>>>,
    /// This node holds the volume's export service address (`export/`): a switchover waits
    /// until it is dropped before it hands over, so no host hears this node after that.
    pub export_address_held: AtomicBool,
}

impl FenceShared {
    pub fn new(cfg: &VolumeConfig) -> FenceShared {
        FenceShared {
            enabled: cfg.fencing == Fencing::Witness,
            on_fence: cfg.on_fence,
            base: Instant::now(),
            lease_until_ns: AtomicU64::new(0),
            deposed: AtomicBool::new(false),
            served: AtomicBool::new(false),
            fenced_latched: AtomicBool::new(false),
            peer_missing_since_ns: AtomicU64::new(0),
            // As if heard at start: a fresh secondary gives its primary PRIMARY_SILENCE to
            // connect before it asks to be promoted.
            peer_heard_ns: AtomicU64::new(1),
            peer_in_sync_mark: AtomicU64::new(0),
            switching: AtomicBool::new(false),
            handover_requested: AtomicBool::new(false),
            handover_outcome: Mutex::new(None),
            export_address_held: AtomicBool::new(false),
            witness: Mutex::new(WitnessInfo {
                address: cfg.witness.as_ref().map_or(String::new(), |w| w.address.to_string()),
                ..WitnessInfo::default()
            }),
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64
    }

    pub fn set_lease_until(&self, until: Option<Instant>) {
        // At least 1: 0 means none.
        self.lease_until_ns.store(until.map_or(0, |u| self.ns(u).max(1)), Ordering::Release);
        if until.is_some() {
            self.served.store(true, Ordering::Release);
        }
    }

    pub fn lease_valid(&self, now: Instant) -> bool {
        let until = self.lease_until_ns.load(Ordering::Acquire);
        until != 0 && self.ns(now) < until
    }

    pub fn lease_left(&self, now: Instant) -> Duration {
        let until = self.lease_until_ns.load(Ordering::Acquire);
        Duration::from_nanos(until.saturating_sub(self.ns(now)))
    }

    pub fn depose(&self) {
        self.deposed.store(true, Ordering::Release);
        self.lease_until_ns.store(0, Ordering::Release);
    }

    pub fn is_deposed(&self) -> bool {
        self.deposed.load(Ordering::Acquire)
    }

    /// The peer link came up: from now on a fence is a fence, not a start-up wait.
    pub fn on_peer_connected(&self) {
        self.served.store(true, Ordering::Release);
    }

    /// May a queue whose link is down serve I/O (reads, and writes completed alone) now?
    #[inline]
    pub fn may_serve_without_peer(&self, now: Instant) -> bool {
        !self.enabled || (!self.is_deposed() && self.lease_valid(now))
    }

    /// Is a queue fenced now? `link_fresh(now)`: its own link to the peer is up and the peer
    /// was heard from within [`PEER_FRESH`]. Without a lease a primary serves only while it
    /// hears its peer: the peer asks to be promoted only after [`PRIMARY_SILENCE`] without
    /// hearing it (longer), and the witness grants that only once the lease ran out. Once a
    /// node that served is fenced, only a new lease lifts the fence (the latch).
    #[inline]
    pub fn is_fenced(&self, link_fresh: impl FnOnce(Instant) -> bool) -> bool {
        if !self.enabled {
            return false;
        }
        if self.is_deposed() || self.switching.load(Ordering::Acquire) {
            return true;
        }
        let now = Instant::now();
        if self.lease_valid(now) {
            if self.fenced_latched.load(Ordering::Relaxed) {
                self.fenced_latched.store(false, Ordering::Release);
            }
            return false;
        }
        // Once fallen, only a new lease lifts the fence: the peer heard again proves nothing
        // (its old connection can deliver bytes sent before it was promoted).
        if self.fenced_latched.load(Ordering::Acquire) {
            return true;
        }
        if link_fresh(now) {
            return false;
        }
        // Armed only once this node has served: a primary starting without a lease waits
        // for its peer or the witness, whichever comes first.
        if self.served.load(Ordering::Acquire) {
            self.fenced_latched.store(true, Ordering::Release);
        }
        true
    }

    /// The fence fell and only a new lease lifts it (read only; the queues set it).
    pub fn is_latched(&self) -> bool {
        self.fenced_latched.load(Ordering::Acquire)
    }

    /// Secondary: a frame from the primary arrived (one relaxed store per receive).
    #[inline]
    pub fn on_peer_heard(&self, now: Instant) {
        self.peer_heard_ns.store(self.ns(now).max(1), Ordering::Relaxed);
    }

    /// Secondary: the primary was heard from within [`PRIMARY_SILENCE`].
    pub fn primary_heard_recently(&self, now: Instant) -> bool {
        let t = self.peer_heard_ns.load(Ordering::Relaxed);
        t != 0 && self.ns(now).saturating_sub(t) < PRIMARY_SILENCE.as_nanos() as u64
    }

    /// Whether fenced I/O fails now (`io-error`, and the node served before) or waits.
    /// A deposed primary fails everything: its device is about to be deleted.
    pub fn fails_fenced_io(&self) -> bool {
        self.is_deposed()
            || (self.on_fence == OnFence::IoError
                && self.served.load(Ordering::Acquire)
                && !self.switching.load(Ordering::Acquire))
    }

    /// The sync source: the peer is up to date as of `attempts_mark` (see the field).
    pub fn report_peer_in_sync(&self, attempts_mark: u64) {
        self.peer_in_sync_mark.store(attempts_mark + 1, Ordering::Release);
    }

    /// The witness client takes the report, if any.
    pub fn take_peer_in_sync(&self) -> Option<u64> {
        match self.peer_in_sync_mark.swap(0, Ordering::AcqRel) {
            0 => None,
            m => Some(m - 1),
        }
    }

    /// Records whether the peer is here; returns how long it has been missing.
    pub fn note_peer(&self, present: bool, now: Instant) -> Duration {
        if present {
            self.peer_missing_since_ns.store(0, Ordering::Relaxed);
            return Duration::ZERO;
        }
        let since = self.peer_missing_since_ns.load(Ordering::Relaxed);
        if since == 0 {
            self.peer_missing_since_ns.store(self.ns(now).max(1), Ordering::Relaxed);
            return Duration::ZERO;
        }
        Duration::from_nanos(self.ns(now).saturating_sub(since))
    }

    /// How long the peer has been missing (as last noted by the witness client's thread).
    pub fn peer_missing(&self, now: Instant) -> Duration {
        let since = self.peer_missing_since_ns.load(Ordering::Relaxed);
        if since == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.ns(now).saturating_sub(since))
    }

    pub fn witness_info(&self) -> WitnessInfo {
        self.witness.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Keys, NodeConfig};

    fn witness_volume() -> FenceShared {
        let text = "[node]\nname = \"alpha\"\ncontrol_socket = \"a.sock\"\n[[volume]]\nname = \"v\"\nsize = \"16MiB\"\n\
                    backing_file = \"a.img\"\nmetadata_file = \"a.meta\"\nlisten = \"127.0.0.1:7801\"\nrole = \"primary\"\n\
                    [volume.peer]\nname = \"beta\"\naddress = \"127.0.0.2:7802\"\nauthkey_file = \"key\"\n\
                    [volume.witness]\naddress = \"127.0.0.3\"\nauthkey_file = \"key\"\n";
        let cfg = NodeConfig::parse_with(std::path::Path::new("/nonexistent/alpha.toml"), text, Keys::Skip).unwrap();
        FenceShared::new(&cfg.volumes[0])
    }

    #[test]
    fn once_fenced_only_a_new_lease_lifts_the_fence_not_the_peer_heard_again() {
        let f = witness_volume();
        let now = Instant::now();
        // Before it ever served, a primary without a lease serves while it hears its peer.
        assert!(f.is_fenced(|_| false));
        assert!(!f.is_fenced(|_| true), "not served yet: no latch");
        f.set_lease_until(Some(now + Duration::from_secs(5)));
        assert!(!f.is_fenced(|_| false), "a lease: not fenced");
        // The lease runs out while the peer is silent: fenced, and it stays so when bytes
        // from the peer arrive again (they may be an ack its old connection sent late).
        f.set_lease_until(Some(now));
        assert!(!f.is_fenced(|_| true), "the peer alone keeps it serving before the fence falls");
        assert!(f.is_fenced(|_| false));
        assert!(f.is_fenced(|_| true), "latched: the peer heard again does not lift it");
        f.set_lease_until(Some(Instant::now() + Duration::from_secs(5)));
        assert!(!f.is_fenced(|_| false), "a new lease lifts it");
        assert!(!f.is_fenced(|_| true));
    }
}
