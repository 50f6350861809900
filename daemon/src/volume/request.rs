//! The life of one replicated request on the primary, as pure state (sans-I/O).
//!
//! A request has a local half (the backing-file I/O) and a peer half (the peer's
//! acknowledgement). `queue.rs` does the I/O and feeds the outcomes here; this module decides
//! what may happen next and, above all, when the request may complete. The rule it enforces is
//! the design's: a request completes only when its local I/O is done and, if it is
//! replicated, the peer has acknowledged it. Losing the link never completes anything; it
//! turns an unacknowledged peer half back into *held*.

/// State of one half of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// Not part of this request (a READ's peer half, or a standalone volume's).
    None,
    /// Issued; waiting for the outcome.
    Pending,
    /// Peer half only: waiting for a link to be sent on.
    Held,
    Done,
}

/// An event the request state cannot accept: a bug on our side or a lying peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unexpected {
    #[error("peer acknowledged a request it was not sent")]
    AckNotSent,
    #[error("local completion for a request with no local I/O in flight")]
    LocalNotPending,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestState {
    pub local: Half,
    pub peer: Half,
}

impl RequestState {
    /// A new request: its local I/O is issued at once; a replicated one's peer half waits
    /// for `on_sent` (at once if the link is up, when it comes back otherwise).
    pub fn new(replicated: bool) -> RequestState {
        RequestState { local: Half::Pending, peer: if replicated { Half::Held } else { Half::None } }
    }

    pub fn is_held(&self) -> bool {
        self.peer == Half::Held
    }

    /// The frame was queued on a live link.
    pub fn on_sent(&mut self) {
        assert_eq!(self.peer, Half::Held, "only a held request is sent");
        self.peer = Half::Pending;
    }

    /// The link died. Returns true if this request's peer half is now held again.
    pub fn on_link_lost(&mut self) -> bool {
        if self.peer == Half::Pending {
            self.peer = Half::Held;
            return true;
        }
        false
    }

    /// The peer acknowledged it (with success; an error ack is a link failure).
    pub fn on_peer_ack(&mut self) -> Result<(), Unexpected> {
        if self.peer != Half::Pending {
            return Err(Unexpected::AckNotSent);
        }
        self.peer = Half::Done;
        Ok(())
    }

    /// The local I/O finished (whatever its result).
    pub fn on_local_done(&mut self) -> Result<(), Unexpected> {
        if self.local != Half::Pending {
            return Err(Unexpected::LocalNotPending);
        }
        self.local = Half::Done;
        Ok(())
    }

    /// The volume went on alone (durably recorded): a held peer half is waived. Returns true
    /// if it was held. A pending one is not: it was sent and may still be acknowledged.
    pub fn waive_peer(&mut self) -> bool {
        if self.peer == Half::Held {
            self.peer = Half::Done;
            return true;
        }
        false
    }

    /// May the request be completed to the frontend now?
    pub fn is_complete(&self) -> bool {
        self.local == Half::Done && matches!(self.peer, Half::None | Half::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy)]
    enum Event {
        Send,
        LinkLost,
        PeerAck,
        LocalDone,
    }
    const EVENTS: [Event; 4] = [Event::Send, Event::LinkLost, Event::PeerAck, Event::LocalDone];

    /// Every sequence of up to 8 events from a new request (4^8 = 65536 per start), checking
    /// the invariants after each step against an independent record of what happened.
    #[test]
    fn exhaustive_sequences_never_complete_an_unacknowledged_request() {
        for replicated in [false, true] {
            for n in 0..=8u32 {
                for code in 0..4usize.pow(n) {
                    let mut s = RequestState::new(replicated);
                    // Independent model: was the most recent send acknowledged on its link?
                    let mut sent_on_live_link = false;
                    let mut acked = false;
                    let mut local_done = false;
                    let mut c = code;
                    for _ in 0..n {
                        let e = EVENTS[c % 4];
                        c /= 4;
                        let before = s;
                        match e {
                            Event::Send => {
                                if s.is_held() {
                                    s.on_sent();
                                    sent_on_live_link = true;
                                }
                            }
                            Event::LinkLost => {
                                let reheld = s.on_link_lost();
                                assert_eq!(reheld, before.peer == Half::Pending);
                                sent_on_live_link = false;
                            }
                            Event::PeerAck => {
                                let r = s.on_peer_ack();
                                // Only an ack for a frame in flight on the live link is accepted.
                                assert_eq!(r.is_ok(), sent_on_live_link && !acked, "{before:?} {e:?}");
                                if r.is_ok() {
                                    acked = true;
                                } else {
                                    assert_eq!(s, before, "a refused event changes nothing");
                                }
                            }
                            Event::LocalDone => {
                                let r = s.on_local_done();
                                assert_eq!(r.is_ok(), !local_done);
                                local_done = true;
                            }
                        }
                        // The rule: complete only with the local I/O done and, if replicated,
                        // the peer's ack in hand.
                        assert_eq!(s.is_complete(), local_done && (!replicated || acked), "{s:?} after {e:?}");
                        // Once acknowledged, a link loss never takes it back.
                        if acked {
                            assert_eq!(s.peer, Half::Done);
                        }
                        if !replicated {
                            assert_eq!(s.peer, Half::None);
                        }
                    }
                }
            }
        }
    }
}
