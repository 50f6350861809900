//! The primary's view of one peer link, as pure state (sans-I/O).
//!
//! Phases: `Down` (no socket; a connector is dialling) → `Up` (frames flow) → `Closing` (the
//! socket is shut down; its in-flight operations are draining) → `Down`. Keepalive: on each
//! tick an up link sends a PING if none is outstanding; a link from which nothing has been
//! heard for the peer timeout while a PING is outstanding is declared failed. `queue.rs` does
//! the I/O and feeds events here; time is passed in, so every path is testable without a clock.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPhase {
    Down,
    Up,
    Closing,
}

/// What the owner must do after a tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickAction {
    Nothing,
    /// Send a PING with this sequence number.
    SendPing(u64),
    /// The peer has been silent too long: fail the link with this reason.
    Fail(String),
}

#[derive(Debug)]
pub struct LinkMachine {
    phase: LinkPhase,
    generation: u16,
    ping_sent: Option<(u64, Instant)>,
    last_heard: Instant,
    ping_seq: u64,
    peer_timeout: Duration,
}

impl LinkMachine {
    pub fn new(now: Instant, peer_timeout: Duration) -> LinkMachine {
        LinkMachine {
            phase: LinkPhase::Down,
            generation: 0,
            ping_sent: None,
            last_heard: now,
            ping_seq: 0,
            peer_timeout,
        }
    }

    pub fn phase(&self) -> LinkPhase {
        self.phase
    }

    pub fn is_up(&self) -> bool {
        self.phase == LinkPhase::Up
    }

    /// Up, and the peer was heard from within `within` (a ping goes out every tick).
    pub fn is_fresh(&self, now: Instant, within: Duration) -> bool {
        self.is_up() && now.saturating_duration_since(self.last_heard) < within
    }

    /// Identifies the current socket's operations (wraps; only one socket is live at a time).
    pub fn generation(&self) -> u16 {
        self.generation
    }

    /// A socket arrived. Only a down link accepts one; returns false (and changes nothing)
    /// otherwise, and the owner keeps the socket for later.
    pub fn on_connected(&mut self, now: Instant) -> bool {
        if self.phase != LinkPhase::Down {
            return false;
        }
        self.phase = LinkPhase::Up;
        self.generation = self.generation.wrapping_add(1);
        self.ping_sent = None;
        self.last_heard = now;
        true
    }

    /// Something went wrong on the link. Returns true the first time (Up → Closing): the owner
    /// then shuts the socket down and holds every unacknowledged request again.
    pub fn on_failed(&mut self) -> bool {
        if self.phase != LinkPhase::Up {
            return false;
        }
        self.phase = LinkPhase::Closing;
        self.ping_sent = None;
        true
    }

    /// The owner reports whether the closing socket still has operations in flight. Returns
    /// true on Closing → Down: the owner closes the socket and asks for a new link.
    pub fn on_drained(&mut self, ops_in_flight: bool) -> bool {
        if self.phase != LinkPhase::Closing || ops_in_flight {
            return false;
        }
        self.phase = LinkPhase::Down;
        true
    }

    /// Bytes arrived from the peer.
    pub fn on_heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// A PONG arrived; returns the round trip if it answers the outstanding PING.
    pub fn on_pong(&mut self, seq: u64, now: Instant) -> Option<Duration> {
        match self.ping_sent {
            Some((s, sent)) if s == seq => {
                self.ping_sent = None;
                Some(now.saturating_duration_since(sent))
            }
            _ => None,
        }
    }

    /// The periodic tick. `can_send_ping` is false while the previous PING's header is still
    /// queued for sending (it may not be rewritten yet).
    pub fn on_tick(&mut self, now: Instant, can_send_ping: bool) -> TickAction {
        if self.phase != LinkPhase::Up {
            return TickAction::Nothing;
        }
        if let Some((_, sent)) = self.ping_sent {
            let silent = now.saturating_duration_since(self.last_heard);
            if now.saturating_duration_since(sent) > self.peer_timeout && silent > self.peer_timeout {
                return TickAction::Fail(format!("peer did not answer for {} s", self.peer_timeout.as_secs()));
            }
            return TickAction::Nothing;
        }
        if !can_send_ping {
            return TickAction::Nothing;
        }
        self.ping_seq += 1;
        self.ping_sent = Some((self.ping_seq, now));
        TickAction::SendPing(self.ping_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);
    const TICK: Duration = Duration::from_millis(500);

    #[test]
    fn phases_move_only_along_down_up_closing_down() {
        let t0 = Instant::now();
        let mut l = LinkMachine::new(t0, T);
        assert!(!l.on_failed(), "a down link cannot fail");
        assert!(!l.on_drained(false));
        assert!(l.on_connected(t0));
        assert_eq!(l.generation(), 1);
        assert!(!l.on_connected(t0), "an up link takes no second socket");
        assert!(l.on_failed());
        assert!(!l.on_failed(), "failing twice transitions once");
        assert!(!l.on_connected(t0), "a closing link takes no socket");
        assert!(!l.on_drained(true), "still draining");
        assert!(l.on_drained(false));
        assert_eq!(l.phase(), LinkPhase::Down);
        assert!(l.on_connected(t0));
        assert_eq!(l.generation(), 2);
    }

    #[test]
    fn a_silent_peer_fails_after_the_timeout_and_not_before() {
        let t0 = Instant::now();
        let mut l = LinkMachine::new(t0, T);
        l.on_connected(t0);
        let mut now = t0;
        let mut failed_at = None;
        for _ in 0..40 {
            now += TICK;
            if let TickAction::Fail(why) = l.on_tick(now, true) {
                assert!(why.contains("5 s"));
                failed_at = Some(now);
                break;
            }
        }
        let at = failed_at.expect("a silent peer must be declared lost").duration_since(t0);
        assert!(at > T && at <= T + 2 * TICK, "failed after {at:?}");
    }

    #[test]
    fn an_answering_peer_never_fails_and_rtt_is_measured() {
        let t0 = Instant::now();
        let mut l = LinkMachine::new(t0, T);
        l.on_connected(t0);
        let mut now = t0;
        for _ in 0..100 {
            now += TICK;
            match l.on_tick(now, true) {
                TickAction::SendPing(seq) => {
                    let back = now + Duration::from_micros(300);
                    l.on_heard(back);
                    assert_eq!(l.on_pong(seq + 1, back), None, "a pong for another ping is ignored");
                    assert_eq!(l.on_pong(seq, back), Some(Duration::from_micros(300)));
                }
                TickAction::Nothing => {}
                TickAction::Fail(why) => panic!("failed an answering peer: {why}"),
            }
        }
    }

    #[test]
    fn traffic_without_pongs_keeps_the_link_up() {
        // Acks count as life: a peer busy acking writes whose PONG is queued behind them is alive.
        let t0 = Instant::now();
        let mut l = LinkMachine::new(t0, T);
        l.on_connected(t0);
        let mut now = t0;
        for _ in 0..100 {
            now += TICK;
            l.on_heard(now);
            assert!(!matches!(l.on_tick(now, true), TickAction::Fail(_)));
        }
    }

    #[test]
    fn no_ping_while_the_previous_header_is_queued_and_none_when_down() {
        let t0 = Instant::now();
        let mut l = LinkMachine::new(t0, T);
        assert_eq!(l.on_tick(t0 + TICK, true), TickAction::Nothing, "down: nothing to ping");
        l.on_connected(t0);
        assert_eq!(l.on_tick(t0 + TICK, false), TickAction::Nothing);
        assert_eq!(l.on_tick(t0 + 2 * TICK, true), TickAction::SendPing(1));
        l.on_failed();
        assert_eq!(l.on_tick(t0 + 3 * TICK, true), TickAction::Nothing, "closing: nothing to ping");
    }
}
