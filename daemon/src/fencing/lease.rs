//! The primary's lease with the witness, as pure state (time passed in).
//!
//! # The rule
//! A lease granted for a request sent at `t_request` is valid on this node until
//! `t_request + lease × (1 − drift)`. The witness waits `lease × (1 + drift)` after its own
//! grant (which is later than `t_request`) before it may promote the peer, so with clocks
//! that run at most `drift` apart the node stops serving before the peer can start.
//!
//! Renewal: a new request goes out every `lease / 3` after the last one was sent, one at a
//! time; a request that is lost or refused leaves the lease to run out.

use std::time::{Duration, Instant};

/// Renewals per lease: two may be lost before the lease runs out.
pub const RENEWALS_PER_LEASE: u32 = 3;
/// Parts per million in one.
pub const PPM: u64 = 1_000_000;
/// Largest clock drift a config may name (10 %): beyond it a lease means little.
pub const DRIFT_PPM_MAX: u32 = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseClock {
    lease: Duration,
    drift_ppm: u32,
    /// When the request in flight was sent (`t_request`).
    in_flight: Option<Instant>,
    /// When the last request was sent, granted or not.
    last_sent: Option<Instant>,
    valid_until: Option<Instant>,
}

impl LeaseClock {
    pub fn new(lease: Duration, drift_ppm: u32) -> LeaseClock {
        assert!(lease >= Duration::from_millis(RENEWALS_PER_LEASE as u64), "a lease must be longer than its renewals");
        assert!(drift_ppm <= DRIFT_PPM_MAX);
        LeaseClock { lease, drift_ppm, in_flight: None, last_sent: None, valid_until: None }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    pub fn drift_ppm(&self) -> u32 {
        self.drift_ppm
    }

    /// Whether a renewal is due now (none in flight, and a third of a lease since the last).
    pub fn renewal_due(&self, now: Instant) -> bool {
        self.in_flight.is_none() && self.last_sent.is_none_or(|t| now >= t + self.lease / RENEWALS_PER_LEASE)
    }

    /// A request that renews the lease (Lease, Outdate) is about to be sent.
    pub fn on_request_sent(&mut self, now: Instant) {
        self.in_flight = Some(now);
        self.last_sent = Some(now);
    }

    /// The witness granted the request in flight.
    pub fn handle_granted(&mut self) {
        let Some(t_request) = self.in_flight.take() else { return };
        let shrink = self.lease.as_nanos() as u64 * self.drift_ppm as u64 / PPM;
        let until = t_request + self.lease - Duration::from_nanos(shrink);
        // A reply to an older request never shortens a newer grant.
        self.valid_until = Some(self.valid_until.map_or(until, |v| v.max(until)));
    }

    /// The request in flight was refused or lost: the lease runs out where it was.
    pub fn handle_failed(&mut self) {
        self.in_flight = None;
    }

    /// The lease ends now (the witness named another primary; this node resigned).
    pub fn revoke(&mut self) {
        self.in_flight = None;
        self.valid_until = None;
    }

    pub fn is_valid(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|v| now < v)
    }

    pub fn valid_until(&self) -> Option<Instant> {
        self.valid_until
    }

    /// Time left on the lease (zero when it ran out or was never granted).
    pub fn left(&self, now: Instant) -> Duration {
        self.valid_until.map_or(Duration::ZERO, |v| v.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_is_valid_from_the_request_for_lease_minus_drift() {
        let t0 = Instant::now();
        let mut l = LeaseClock::new(Duration::from_secs(5), 10_000);
        assert!(!l.is_valid(t0) && l.renewal_due(t0));
        l.on_request_sent(t0);
        assert!(!l.renewal_due(t0 + Duration::from_secs(4)), "one request at a time");
        l.handle_granted();
        // 5 s × 0.99 = 4.95 s after the request, however late the reply came.
        assert!(l.is_valid(t0 + Duration::from_millis(4949)));
        assert!(!l.is_valid(t0 + Duration::from_millis(4950)));
        assert!(!l.renewal_due(t0 + Duration::from_millis(1666)));
        assert!(l.renewal_due(t0 + Duration::from_millis(1667)));
    }

    #[test]
    fn a_lost_request_lets_the_lease_run_out_and_a_late_reply_never_shortens_it() {
        let t0 = Instant::now();
        let mut l = LeaseClock::new(Duration::from_secs(3), 0);
        l.on_request_sent(t0);
        l.handle_granted();
        l.on_request_sent(t0 + Duration::from_secs(1));
        l.handle_failed();
        assert!(l.is_valid(t0 + Duration::from_millis(2999)) && !l.is_valid(t0 + Duration::from_secs(3)));
        l.on_request_sent(t0 + Duration::from_secs(2));
        l.handle_granted();
        assert!(l.is_valid(t0 + Duration::from_millis(4999)));
        l.handle_granted(); // a duplicate reply: nothing in flight, nothing changes
        assert_eq!(l.valid_until(), Some(t0 + Duration::from_secs(5)));
        l.revoke();
        assert!(!l.is_valid(t0 + Duration::from_secs(2)));
    }
}
