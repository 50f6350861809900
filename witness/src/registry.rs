//! The witness's decisions: who may serve each volume, in which epoch.
//!
//! The rule it enforces (design.md, "Losing the peer — fencing"): **at most one node of a volume
//! holds a lease in any epoch, and a node is promoted only when its copy is up-to-date and the
//! old primary's lease has certainly run out.**
//!
//! Pure and sans-I/O: no clock reads (the caller passes `now_ms`, a monotonic millisecond
//! count), no files. [`Registry::handle`] answers one request from an authenticated node and
//! says whether the durable state changed; the server persists before it replies, so a granted
//! decision survives a witness crash.
//!
//! Rules, per volume (known by name):
//!
//! * A request whose uuid or node pair differs from the record is refused; so is a sender that is
//!   not one of the volume's two nodes.
//! * Unknown volume: `Lease` and `Outdate` register it: epoch = the request's, primary = sender,
//!   sender up-to-date, peer up-to-date (outdated for `Outdate`). Anything else is refused.
//! * `Lease`, `Outdate`, `PeerUpToDate`, `Resign`, `Handover` are granted only to the recorded
//!   primary at the recorded epoch; otherwise refused, naming the current primary and epoch (the
//!   node must stop serving). So a primary that was replaced by a promotion is refused for good.
//! * A granted `Lease`/`Outdate` sets the lease expiry to `now + lease × (1 + drift)` (rounded
//!   up) and records lease and drift. The node stops at `t_request + lease × (1 − drift)` by its
//!   own clock, t_request before the witness's grant: the witness always waits longer. A grant
//!   never moves an expiry earlier (a shorter lease takes effect from the next renewal on), since
//!   the node may still be serving under the previous, longer grant.
//! * `Outdate`: the peer is recorded outdated (a peer already inconsistent or failed stays so:
//!   worse states bar a promotion just as well and say more). `PeerUpToDate`: the peer is
//!   up-to-date again.
//! * `Promote` from Y: if Y is already primary at the request's epoch, or at the request's
//!   epoch + 1 (a retry after a lost reply), it is granted again without a durable change, and
//!   the lease is extended as for a `Lease` (Y counts its lease from the retry). Otherwise granted
//!   only if the epochs match, Y is up-to-date both in the record and by its own word, and there
//!   is no primary or the primary's lease has expired. Then epoch + 1, Y primary, the old primary
//!   outdated (it may have written alone before its lease ran out), Y's lease runs from now.
//! * `Resign`: no primary, the sender's disk state as it says, the lease ends now.
//! * `Handover { to }`: `to` must be the peer and up-to-date; epoch + 1, `to` primary with the
//!   recorded lease from now (it must renew), the old primary stays up-to-date.
//! * `Query` and `Status` change nothing.
//! * A restarted witness ([`Registry::from_state`]) knows no lease timing, so it assumes every
//!   primary was granted a lease just now: a restart never shortens a lease.
//!
//! Invariants, checked on every change before it is kept: the epoch never decreases, and the
//! primary, if any, is one of the volume's two nodes. A change that would break one is refused
//! (and is a bug: debug builds panic).

use std::collections::BTreeMap;

use metroblk_protocol::witness::{DiskState, Record, Reply, Request, VolumeId, VolumeStatus};
use serde::{Deserialize, Serialize};

/// Longest lease a node may ask for (1 hour): a larger one is a misconfiguration that would
/// keep a dead primary's volume unavailable for that long.
pub const LEASE_MS_MAX: u64 = 3_600_000;
/// Largest clock drift a node may declare (10 %).
pub const DRIFT_PPM_MAX: u32 = 100_000;

/// What the caller does with one request's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub reply: Reply,
    /// The durable state changed: persist ([`Registry::to_state`]) before sending the reply.
    pub changed: bool,
}

/// Everything the witness must remember across a restart.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub volumes: Vec<VolumeState>,
}

/// One volume's durable record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeState {
    pub volume: VolumeId,
    pub epoch: u64,
    pub primary: Option<String>,
    pub disk_states: BTreeMap<String, DiskState>,
    pub lease_ms: u64,
    pub drift_ppm: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Volume {
    durable: VolumeState,
    /// When the witness considers the primary's lease expired (same clock as `now_ms`).
    lease_expiry_ms: u64,
}

/// The witness's records of every volume. `Hash` lets a model checker keep it in its states
/// (tests/tests/fencing_model.rs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Registry {
    volumes: BTreeMap<String, Volume>,
}

/// `lease × (1 + drift)`, rounded up: how long the witness waits after its own grant.
pub fn lease_with_drift_ms(lease_ms: u64, drift_ppm: u32) -> u64 {
    let scaled = (lease_ms as u128 * (1_000_000 + drift_ppm as u128)).div_ceil(1_000_000);
    u64::try_from(scaled).unwrap_or(u64::MAX)
}

fn record_of(v: &VolumeState) -> Record {
    Record { epoch: v.epoch, primary: v.primary.clone(), disk_states: v.disk_states.clone(), lease_ms: v.lease_ms }
}

fn describe_primary(v: &VolumeState) -> String {
    match &v.primary {
        Some(p) => format!("the primary is {p} at epoch {}", v.epoch),
        None => format!("it has no primary at epoch {}", v.epoch),
    }
}

fn check_lease(lease_ms: u64, drift_ppm: u32) -> Result<(), String> {
    if lease_ms == 0 || lease_ms > LEASE_MS_MAX {
        return Err(format!("lease of {lease_ms} ms is not between 1 and {LEASE_MS_MAX} ms"));
    }
    if drift_ppm > DRIFT_PPM_MAX {
        return Err(format!("clock drift of {drift_ppm} ppm is above the limit of {DRIFT_PPM_MAX} ppm"));
    }
    Ok(())
}

fn check_state(v: &VolumeState) -> Result<(), String> {
    v.volume.check().map_err(|e| e.to_string())?;
    let [a, b] = v.volume.nodes_sorted();
    if let Some(p) = &v.primary {
        if p != a && p != b {
            return Err(format!("volume {}: primary {p} is not one of its nodes", v.volume.name));
        }
    }
    if v.disk_states.len() != 2 || !v.disk_states.contains_key(a) || !v.disk_states.contains_key(b) {
        return Err(format!("volume {}: disk states must name exactly its two nodes", v.volume.name));
    }
    Ok(())
}

impl Registry {
    /// An empty registry (a witness without a state file yet).
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The durable state, for the state file.
    pub fn to_state(&self) -> State {
        State { volumes: self.volumes.values().map(|v| v.durable.clone()).collect() }
    }

    /// The registry of a restarted witness. It cannot know when leases were granted, so every
    /// primary's lease is taken to run from `now_ms` (never shorter than before the restart).
    pub fn from_state(state: State, now_ms: u64) -> Result<Registry, String> {
        let mut volumes = BTreeMap::new();
        for v in state.volumes {
            check_state(&v)?;
            let lease_expiry_ms = now_ms.saturating_add(lease_with_drift_ms(v.lease_ms, v.drift_ppm));
            let name = v.volume.name.clone();
            if volumes.insert(name.clone(), Volume { durable: v, lease_expiry_ms }).is_some() {
                return Err(format!("volume {name} is recorded twice"));
            }
        }
        Ok(Registry { volumes })
    }

    /// The record of a volume, if known.
    pub fn record(&self, name: &str) -> Option<Record> {
        self.volumes.get(name).map(|v| record_of(&v.durable))
    }

    /// Every volume's status at `now_ms`.
    pub fn status(&self, now_ms: u64) -> Vec<VolumeStatus> {
        self.volumes
            .values()
            .map(|v| {
                let d = &v.durable;
                VolumeStatus {
                    name: d.volume.name.clone(),
                    uuid: d.volume.uuid.clone(),
                    nodes: d.volume.nodes.clone(),
                    epoch: d.epoch,
                    primary: d.primary.clone(),
                    disk_states: d.disk_states.clone(),
                    lease_ms: d.lease_ms,
                    drift_ppm: d.drift_ppm,
                    lease_left_ms: if d.primary.is_some() { v.lease_expiry_ms.saturating_sub(now_ms) } else { 0 },
                }
            })
            .collect()
    }

    /// Decides one request from the authenticated node `sender`.
    pub fn handle(&mut self, now_ms: u64, sender: &str, req: &Request) -> Decision {
        let refuse = |reason: String, record: Option<Record>| Decision {
            reply: Reply::Refused { reason, record },
            changed: false,
        };
        let Some(id) = req.volume() else {
            // Status: the server adds the connected nodes.
            return Decision {
                reply: Reply::Status { volumes: self.status(now_ms), nodes_connected: Vec::new() },
                changed: false,
            };
        };
        if let Err(e) = id.check() {
            return refuse(format!("request for an invalid volume: {e}"), None);
        }
        if id.peer_of(sender).is_none() {
            return refuse(
                format!("{sender} is not one of volume {}'s nodes ({} and {})", id.name, id.nodes[0], id.nodes[1]),
                None,
            );
        }
        let Some(old) = self.volumes.get(&id.name) else {
            return self.register(now_ms, sender, req, id);
        };
        let rec = &old.durable;
        if rec.volume.uuid != id.uuid {
            return refuse(
                format!(
                    "volume {} has uuid {} in the witness's record, the request names {}",
                    id.name, rec.volume.uuid, id.uuid
                ),
                None,
            );
        }
        if rec.volume.nodes_sorted() != id.nodes_sorted() {
            let [a, b] = rec.volume.nodes_sorted();
            let [c, d] = id.nodes_sorted();
            return refuse(
                format!(
                    "volume {} has nodes {a} and {b} in the witness's record, the request names {c} and {d}",
                    id.name
                ),
                None,
            );
        }
        let mut new = old.clone();
        let outcome = decide(&mut new, now_ms, sender, req);
        let old_record = record_of(&old.durable);
        match outcome {
            Err(reason) => refuse(reason, Some(old_record)),
            Ok(()) => {
                if let Err(broken) = check_invariants(&old.durable, &new.durable) {
                    debug_assert!(false, "witness invariant broken: {broken}");
                    return refuse(format!("internal error, nothing changed: {broken}"), Some(old_record));
                }
                let changed = new.durable != old.durable;
                let record = record_of(&new.durable);
                self.volumes.insert(id.name.clone(), new);
                Decision { reply: Reply::Granted { record }, changed }
            }
        }
    }

    fn register(&mut self, now_ms: u64, sender: &str, req: &Request, id: &VolumeId) -> Decision {
        let (epoch, lease_ms, drift_ppm, peer_state) = match req {
            Request::Lease { epoch, lease_ms, drift_ppm, .. } => (*epoch, *lease_ms, *drift_ppm, DiskState::UpToDate),
            Request::Outdate { epoch, lease_ms, drift_ppm, .. } => (*epoch, *lease_ms, *drift_ppm, DiskState::Outdated),
            _ => {
                return Decision {
                    reply: Reply::Refused {
                        reason: format!(
                            "the witness has no record of volume {}; its primary has not registered",
                            id.name
                        ),
                        record: None,
                    },
                    changed: false,
                }
            }
        };
        if let Err(reason) = check_lease(lease_ms, drift_ppm) {
            return Decision { reply: Reply::Refused { reason, record: None }, changed: false };
        }
        let [a, b] = id.nodes_sorted();
        let peer = if a == sender { b } else { a };
        let mut disk_states = BTreeMap::new();
        disk_states.insert(sender.to_owned(), DiskState::UpToDate);
        disk_states.insert(peer.to_owned(), peer_state);
        let durable = VolumeState {
            volume: VolumeId::new(&id.name, &id.uuid, a, b),
            epoch,
            primary: Some(sender.to_owned()),
            disk_states,
            lease_ms,
            drift_ppm,
        };
        let record = record_of(&durable);
        let lease_expiry_ms = now_ms.saturating_add(lease_with_drift_ms(lease_ms, drift_ppm));
        self.volumes.insert(id.name.clone(), Volume { durable, lease_expiry_ms });
        Decision { reply: Reply::Granted { record }, changed: true }
    }
}

fn check_invariants(old: &VolumeState, new: &VolumeState) -> Result<(), String> {
    if new.epoch < old.epoch {
        return Err(format!("epoch of volume {} would go from {} down to {}", old.volume.name, old.epoch, new.epoch));
    }
    check_state(new)
}

/// Grants the primary's lease: expiry at `now + lease × (1 + drift)`, never earlier than now.
fn renew(v: &mut Volume, now_ms: u64, lease_ms: u64, drift_ppm: u32) {
    v.durable.lease_ms = lease_ms;
    v.durable.drift_ppm = drift_ppm;
    v.lease_expiry_ms = v.lease_expiry_ms.max(now_ms.saturating_add(lease_with_drift_ms(lease_ms, drift_ppm)));
}

/// Requires `sender` to be the primary at `epoch`.
fn require_primary(v: &VolumeState, sender: &str, epoch: u64) -> Result<(), String> {
    let name = &v.volume.name;
    if v.primary.as_deref() != Some(sender) {
        return Err(format!("{sender} is not the primary of volume {name}: {}", describe_primary(v)));
    }
    if epoch != v.epoch {
        return Err(format!("{sender} asks at epoch {epoch}, but volume {name} is at epoch {}", v.epoch));
    }
    Ok(())
}

fn peer_of<'a>(v: &'a VolumeState, node: &str) -> &'a str {
    v.volume.peer_of(node).unwrap_or_default()
}

fn set_disk(v: &mut VolumeState, node: &str, state: DiskState) {
    if let Some(s) = v.disk_states.get_mut(node) {
        *s = state;
    }
}

fn disk(v: &VolumeState, node: &str) -> DiskState {
    // check_state guarantees both nodes have a state; a missing one would be treated as the
    // worst, so it can never enable a promotion.
    v.disk_states.get(node).copied().unwrap_or(DiskState::Failed)
}

/// Applies one request to a copy of the volume's record; `Err` is the refusal's reason.
fn decide(v: &mut Volume, now_ms: u64, sender: &str, req: &Request) -> Result<(), String> {
    match req {
        Request::Lease { epoch, lease_ms, drift_ppm, .. } => {
            require_primary(&v.durable, sender, *epoch)?;
            check_lease(*lease_ms, *drift_ppm)?;
            renew(v, now_ms, *lease_ms, *drift_ppm);
            Ok(())
        }
        Request::Outdate { epoch, lease_ms, drift_ppm, .. } => {
            require_primary(&v.durable, sender, *epoch)?;
            check_lease(*lease_ms, *drift_ppm)?;
            renew(v, now_ms, *lease_ms, *drift_ppm);
            let peer = peer_of(&v.durable, sender).to_owned();
            if disk(&v.durable, &peer) == DiskState::UpToDate {
                set_disk(&mut v.durable, &peer, DiskState::Outdated);
            }
            Ok(())
        }
        Request::PeerUpToDate { epoch, .. } => {
            require_primary(&v.durable, sender, *epoch)?;
            let peer = peer_of(&v.durable, sender).to_owned();
            set_disk(&mut v.durable, &peer, DiskState::UpToDate);
            Ok(())
        }
        Request::Resign { epoch, disk_state, .. } => {
            require_primary(&v.durable, sender, *epoch)?;
            v.durable.primary = None;
            set_disk(&mut v.durable, sender, *disk_state);
            v.lease_expiry_ms = now_ms;
            Ok(())
        }
        Request::Handover { epoch, to, .. } => {
            require_primary(&v.durable, sender, *epoch)?;
            let name = &v.durable.volume.name;
            let peer = peer_of(&v.durable, sender).to_owned();
            if *to != peer {
                return Err(format!("volume {name} can be handed over only to {peer}, not to {to}"));
            }
            let state = disk(&v.durable, &peer);
            if state != DiskState::UpToDate {
                return Err(format!("{peer} is {state} in the witness's record: it cannot take over volume {name}"));
            }
            v.durable.epoch += 1;
            v.durable.primary = Some(peer);
            let (lease_ms, drift_ppm) = (v.durable.lease_ms, v.durable.drift_ppm);
            renew(v, now_ms, lease_ms, drift_ppm);
            Ok(())
        }
        Request::Promote { epoch, disk_state, lease_ms, drift_ppm, .. } => {
            check_lease(*lease_ms, *drift_ppm)?;
            let d = &v.durable;
            let name = &d.volume.name;
            if d.primary.as_deref() == Some(sender) && (d.epoch == *epoch || Some(d.epoch) == epoch.checked_add(1)) {
                // Already granted (a retry after a lost reply): grant again. The node counts its
                // lease from this request, so the witness's expiry must move with it.
                renew(v, now_ms, *lease_ms, *drift_ppm);
                return Ok(());
            }
            if *epoch != d.epoch {
                return Err(format!(
                    "{sender} asks to be promoted at epoch {epoch}, but volume {name} is at epoch {}: {}",
                    d.epoch,
                    describe_primary(d)
                ));
            }
            let recorded = disk(d, sender);
            if recorded != DiskState::UpToDate {
                return Err(format!("{sender} is {recorded} in the witness's record: it cannot be promoted"));
            }
            if *disk_state != DiskState::UpToDate {
                return Err(format!("{sender} reports its disk {disk_state}: it cannot be promoted"));
            }
            if let Some(primary) = &d.primary {
                if now_ms < v.lease_expiry_ms {
                    return Err(format!("the primary {primary}'s lease has {} ms left", v.lease_expiry_ms - now_ms));
                }
            }
            let old_primary = d.primary.clone();
            v.durable.epoch += 1;
            v.durable.primary = Some(sender.to_owned());
            if let Some(p) = old_primary {
                // It may have completed writes alone until its lease ran out.
                set_disk(&mut v.durable, &p, DiskState::Outdated);
            }
            v.durable.lease_ms = *lease_ms;
            v.durable.drift_ppm = *drift_ppm;
            v.lease_expiry_ms = now_ms.saturating_add(lease_with_drift_ms(*lease_ms, *drift_ppm));
            Ok(())
        }
        Request::Query { .. } => Ok(()),
        Request::Status => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "6d657472-6f62-6c6b-0000-000000000001";

    fn vol() -> VolumeId {
        VolumeId::new("vol0", UUID, "alpha", "beta")
    }
    fn lease(epoch: u64) -> Request {
        Request::Lease { volume: vol(), epoch, lease_ms: 1000, drift_ppm: 10_000 }
    }
    fn outdate(epoch: u64) -> Request {
        Request::Outdate { volume: vol(), epoch, lease_ms: 1000, drift_ppm: 10_000 }
    }
    fn promote(epoch: u64, disk_state: DiskState) -> Request {
        Request::Promote { volume: vol(), epoch, disk_state, lease_ms: 1000, drift_ppm: 10_000 }
    }
    fn granted(d: &Decision) -> &Record {
        match &d.reply {
            Reply::Granted { record } => record,
            other => panic!("expected a grant, got {other:?}"),
        }
    }
    fn refused(d: &Decision) -> &str {
        assert!(!d.changed);
        match &d.reply {
            Reply::Refused { reason, .. } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    /// alpha registered as primary at epoch 5 at t = 0 (lease 1000 ms, 1 %: expiry 1010).
    fn registered() -> Registry {
        let mut r = Registry::new();
        let d = r.handle(0, "alpha", &lease(5));
        assert!(d.changed);
        r
    }

    #[test]
    fn lease_with_drift_rounds_up() {
        assert_eq!(lease_with_drift_ms(1000, 10_000), 1010);
        assert_eq!(lease_with_drift_ms(1, 1), 2);
        assert_eq!(lease_with_drift_ms(1000, 0), 1000);
        assert_eq!(lease_with_drift_ms(u64::MAX, 100_000), u64::MAX);
    }

    #[test]
    fn lease_registers_an_unknown_volume() {
        let r = registered();
        let rec = r.record("vol0").unwrap();
        assert_eq!(rec.epoch, 5);
        assert_eq!(rec.primary.as_deref(), Some("alpha"));
        assert_eq!(rec.disk_states["alpha"], DiskState::UpToDate);
        assert_eq!(rec.disk_states["beta"], DiskState::UpToDate);
        assert_eq!(r.status(10)[0].lease_left_ms, 1000);
    }

    #[test]
    fn outdate_registers_with_the_peer_outdated() {
        let mut r = Registry::new();
        let rec = granted(&r.handle(0, "beta", &outdate(2))).clone();
        assert_eq!(rec.primary.as_deref(), Some("beta"));
        assert_eq!(rec.disk_states["alpha"], DiskState::Outdated);
    }

    #[test]
    fn other_requests_on_an_unknown_volume_are_refused() {
        let mut r = Registry::new();
        for req in [
            promote(1, DiskState::UpToDate),
            Request::PeerUpToDate { volume: vol(), epoch: 1 },
            Request::Resign { volume: vol(), epoch: 1, disk_state: DiskState::Failed },
            Request::Handover { volume: vol(), epoch: 1, to: "beta".into() },
            Request::Query { volume: vol() },
        ] {
            let d = r.handle(0, "alpha", &req);
            assert_eq!(refused(&d), "the witness has no record of volume vol0; its primary has not registered");
        }
        assert!(r.to_state().volumes.is_empty());
    }

    #[test]
    fn mismatched_uuid_nodes_and_strangers_are_refused() {
        let mut r = registered();
        let other_uuid = Request::Query { volume: VolumeId::new("vol0", "other", "alpha", "beta") };
        assert!(refused(&r.handle(0, "alpha", &other_uuid)).contains("has uuid"));
        let other_nodes = Request::Query { volume: VolumeId::new("vol0", UUID, "alpha", "gamma") };
        assert!(refused(&r.handle(0, "alpha", &other_nodes)).contains("has nodes alpha and beta"));
        assert!(refused(&r.handle(0, "gamma", &lease(5))).contains("gamma is not one of volume vol0's nodes"));
        let bad =
            Request::Lease { volume: VolumeId::new("vol 0", UUID, "a", "b"), epoch: 1, lease_ms: 1, drift_ppm: 0 };
        assert!(refused(&r.handle(0, "a", &bad)).contains("invalid volume"));
        // Nodes in the other order are the same volume.
        let swapped = VolumeId { nodes: ["beta".into(), "alpha".into()], ..vol() };
        granted(&r.handle(0, "beta", &Request::Query { volume: swapped }));
    }

    #[test]
    fn bad_leases_are_refused() {
        let mut r = Registry::new();
        let zero = Request::Lease { volume: vol(), epoch: 1, lease_ms: 0, drift_ppm: 0 };
        assert!(refused(&r.handle(0, "alpha", &zero)).contains("lease of 0 ms"));
        let drift = Request::Lease { volume: vol(), epoch: 1, lease_ms: 10, drift_ppm: DRIFT_PPM_MAX + 1 };
        assert!(refused(&r.handle(0, "alpha", &drift)).contains("clock drift"));
    }

    #[test]
    fn lease_renewal_is_not_a_durable_change_and_never_shortens() {
        let mut r = registered();
        let d = r.handle(500, "alpha", &lease(5));
        granted(&d);
        assert!(!d.changed, "a plain renewal needs no state file write");
        assert_eq!(r.status(500)[0].lease_left_ms, 1010);
        let shorter = Request::Lease { volume: vol(), epoch: 5, lease_ms: 100, drift_ppm: 10_000 };
        let d = r.handle(600, "alpha", &shorter);
        assert!(d.changed, "a new lease length is recorded");
        assert_eq!(r.status(600)[0].lease_left_ms, 910, "the earlier, longer grant still holds");
    }

    #[test]
    fn lease_from_non_primary_or_wrong_epoch_is_refused() {
        let mut r = registered();
        let e = refused(&r.handle(0, "beta", &lease(5))).to_owned();
        assert_eq!(e, "beta is not the primary of volume vol0: the primary is alpha at epoch 5");
        assert_eq!(refused(&r.handle(0, "alpha", &lease(4))), "alpha asks at epoch 4, but volume vol0 is at epoch 5");
        assert!(refused(&r.handle(0, "alpha", &lease(6))).contains("at epoch 6"));
        match r.handle(0, "beta", &outdate(5)).reply {
            Reply::Refused { record: Some(rec), .. } => assert_eq!(rec.primary.as_deref(), Some("alpha")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn outdate_and_peer_up_to_date() {
        let mut r = registered();
        let d = r.handle(100, "alpha", &outdate(5));
        assert!(d.changed);
        assert_eq!(granted(&d).disk_states["beta"], DiskState::Outdated);
        assert_eq!(r.status(100)[0].lease_left_ms, 1010);
        // beta cannot be promoted now, even after alpha's lease.
        let e = refused(&r.handle(5000, "beta", &promote(5, DiskState::UpToDate))).to_owned();
        assert_eq!(e, "beta is outdated in the witness's record: it cannot be promoted");
        // Only the primary says the peer is back.
        let back = Request::PeerUpToDate { volume: vol(), epoch: 5 };
        assert!(refused(&r.handle(0, "beta", &back)).contains("not the primary"));
        let d = r.handle(200, "alpha", &back);
        assert!(d.changed);
        assert_eq!(granted(&d).disk_states["beta"], DiskState::UpToDate);
    }

    #[test]
    fn outdate_keeps_a_worse_state() {
        let mut r = registered();
        let mut st = r.to_state();
        st.volumes[0].disk_states.insert("beta".into(), DiskState::Failed);
        r = Registry::from_state(st, 0).unwrap();
        assert_eq!(granted(&r.handle(0, "alpha", &outdate(5))).disk_states["beta"], DiskState::Failed);
    }

    #[test]
    fn promote_waits_for_the_lease() {
        let mut r = registered();
        r.handle(400, "alpha", &lease(5)); // expiry 1410
        let e = refused(&r.handle(1000, "beta", &promote(5, DiskState::UpToDate))).to_owned();
        assert_eq!(e, "the primary alpha's lease has 410 ms left");
        let d = r.handle(1410, "beta", &promote(5, DiskState::UpToDate));
        assert!(d.changed);
        let rec = granted(&d);
        assert_eq!(rec.epoch, 6);
        assert_eq!(rec.primary.as_deref(), Some("beta"));
        assert_eq!(rec.disk_states["alpha"], DiskState::Outdated);
        assert_eq!(r.status(1410)[0].lease_left_ms, 1010);
        // The old primary is refused from now on, at its epoch or any other.
        assert_eq!(
            refused(&r.handle(1500, "alpha", &lease(5))),
            "alpha is not the primary of volume vol0: the primary is beta at epoch 6"
        );
        assert!(refused(&r.handle(1500, "alpha", &lease(6))).contains("not the primary"));
        assert!(refused(&r.handle(9000, "alpha", &promote(6, DiskState::UpToDate))).contains("alpha is outdated"));
    }

    #[test]
    fn promote_is_idempotent_for_a_retry() {
        let mut r = registered();
        granted(&r.handle(2000, "beta", &promote(5, DiskState::UpToDate)));
        // The reply was lost; beta retries with the epoch it knew.
        let d = r.handle(2500, "beta", &promote(5, DiskState::UpToDate));
        assert!(!d.changed);
        assert_eq!(granted(&d).epoch, 6);
        assert_eq!(r.status(2500)[0].lease_left_ms, 1010, "the retry's lease counts from the retry");
        // And at the new epoch.
        let d = r.handle(2600, "beta", &promote(6, DiskState::UpToDate));
        assert!(!d.changed);
        assert_eq!(granted(&d).epoch, 6);
        // But not from two epochs back.
        assert!(refused(&r.handle(2600, "beta", &promote(4, DiskState::UpToDate))).contains("at epoch 4"));
    }

    #[test]
    fn promote_refusals_name_the_condition() {
        let mut r = registered();
        assert_eq!(
            refused(&r.handle(5000, "beta", &promote(4, DiskState::UpToDate))),
            "beta asks to be promoted at epoch 4, but volume vol0 is at epoch 5: the primary is alpha at epoch 5"
        );
        assert_eq!(
            refused(&r.handle(5000, "beta", &promote(5, DiskState::Inconsistent))),
            "beta reports its disk inconsistent: it cannot be promoted"
        );
        let long = Request::Promote {
            volume: vol(),
            epoch: 5,
            disk_state: DiskState::UpToDate,
            lease_ms: LEASE_MS_MAX + 1,
            drift_ppm: 0,
        };
        assert!(refused(&r.handle(5000, "beta", &long)).contains("lease of"));
    }

    #[test]
    fn resign_ends_the_lease_and_lets_the_peer_in() {
        let mut r = registered();
        let resign = Request::Resign { volume: vol(), epoch: 5, disk_state: DiskState::Failed };
        assert!(refused(&r.handle(10, "beta", &resign)).contains("not the primary"));
        let d = r.handle(10, "alpha", &resign);
        assert!(d.changed);
        let rec = granted(&d);
        assert_eq!(rec.primary, None);
        assert_eq!(rec.disk_states["alpha"], DiskState::Failed);
        assert_eq!(r.status(10)[0].lease_left_ms, 0);
        // alpha may not renew any more; beta is promoted at once.
        assert_eq!(
            refused(&r.handle(11, "alpha", &lease(5))),
            "alpha is not the primary of volume vol0: it has no primary at epoch 5"
        );
        let rec = granted(&r.handle(11, "beta", &promote(5, DiskState::UpToDate))).clone();
        assert_eq!((rec.epoch, rec.primary.as_deref()), (6, Some("beta")));
        assert_eq!(rec.disk_states["alpha"], DiskState::Failed, "no primary to outdate");
        // A failed node cannot come back by promotion.
        let resign = Request::Resign { volume: vol(), epoch: 6, disk_state: DiskState::UpToDate };
        granted(&r.handle(12, "beta", &resign));
        assert!(refused(&r.handle(13, "alpha", &promote(6, DiskState::UpToDate))).contains("alpha is failed"));
    }

    #[test]
    fn handover_moves_the_primary() {
        let mut r = registered();
        let to_gamma = Request::Handover { volume: vol(), epoch: 5, to: "gamma".into() };
        assert_eq!(
            refused(&r.handle(0, "alpha", &to_gamma)),
            "volume vol0 can be handed over only to beta, not to gamma"
        );
        let to_beta = Request::Handover { volume: vol(), epoch: 5, to: "beta".into() };
        assert!(refused(&r.handle(0, "beta", &to_beta)).contains("not the primary"));
        r.handle(0, "alpha", &outdate(5));
        assert!(refused(&r.handle(0, "alpha", &to_beta)).contains("beta is outdated"));
        r.handle(0, "alpha", &Request::PeerUpToDate { volume: vol(), epoch: 5 });
        let d = r.handle(100, "alpha", &to_beta);
        assert!(d.changed);
        let rec = granted(&d);
        assert_eq!((rec.epoch, rec.primary.as_deref()), (6, Some("beta")));
        assert_eq!(rec.disk_states["alpha"], DiskState::UpToDate);
        granted(&r.handle(200, "beta", &lease(6)));
        assert!(refused(&r.handle(200, "alpha", &lease(5))).contains("the primary is beta at epoch 6"));
    }

    #[test]
    fn query_and_status_are_read_only() {
        let mut r = registered();
        let before = r.clone();
        let d = r.handle(0, "beta", &Request::Query { volume: vol() });
        assert!(!d.changed);
        assert_eq!(granted(&d).epoch, 5);
        let d = r.handle(0, "anyone", &Request::Status);
        assert!(!d.changed);
        match d.reply {
            Reply::Status { volumes, .. } => assert_eq!(volumes[0].primary.as_deref(), Some("alpha")),
            other => panic!("{other:?}"),
        }
        assert_eq!(r, before);
    }

    #[test]
    fn restart_restores_records_and_restarts_leases() {
        let mut r = registered();
        r.handle(100, "alpha", &outdate(5));
        let st = r.to_state();
        let back = serde_json::from_str::<State>(&serde_json::to_string(&st).unwrap()).unwrap();
        let mut r2 = Registry::from_state(back, 50_000).unwrap();
        assert_eq!(r2.to_state(), st);
        assert_eq!(r2.status(50_000)[0].lease_left_ms, 1010);
        // Even a node that was up-to-date waits for the full lease after a restart.
        r2.handle(50_000, "alpha", &Request::PeerUpToDate { volume: vol(), epoch: 5 });
        assert!(refused(&r2.handle(51_000, "beta", &promote(5, DiskState::UpToDate))).contains("10 ms left"));
        granted(&r2.handle(51_010, "beta", &promote(5, DiskState::UpToDate)));
    }

    #[test]
    fn from_state_refuses_inconsistent_states() {
        let st = registered().to_state();
        let mut bad = st.clone();
        bad.volumes[0].primary = Some("gamma".into());
        assert!(Registry::from_state(bad, 0).unwrap_err().contains("primary gamma is not one of its nodes"));
        let mut bad = st.clone();
        bad.volumes[0].disk_states.remove("beta");
        assert!(Registry::from_state(bad, 0).is_err());
        let mut bad = st.clone();
        bad.volumes.push(st.volumes[0].clone());
        assert!(Registry::from_state(bad, 0).unwrap_err().contains("recorded twice"));
    }

    fn alphabet() -> Vec<(&'static str, Request)> {
        let nodes = ["alpha", "beta"];
        let mut out = Vec::new();
        for (n, node) in nodes.iter().enumerate() {
            let peer = nodes[1 - n];
            for epoch in [1u64, 2] {
                out.push((*node, lease(epoch)));
                out.push((*node, outdate(epoch)));
                out.push((*node, promote(epoch, DiskState::UpToDate)));
                out.push((*node, promote(epoch, DiskState::Outdated)));
                out.push((*node, Request::PeerUpToDate { volume: vol(), epoch }));
                out.push((*node, Request::Resign { volume: vol(), epoch, disk_state: DiskState::Failed }));
                out.push((*node, Request::Resign { volume: vol(), epoch, disk_state: DiskState::UpToDate }));
                out.push((*node, Request::Handover { volume: vol(), epoch, to: peer.to_owned() }));
            }
        }
        out
    }

    /// Runs `seq` (alphabet index, milliseconds since the previous request) and checks the
    /// safety properties after every step.
    fn check_sequence(alphabet: &[(&'static str, Request)], seq: &[(usize, u64)]) {
        let mut r = Registry::new();
        let mut now = 0u64;
        // Which node was granted a lease in which epoch.
        let mut lease_holder: BTreeMap<u64, &str> = BTreeMap::new();
        for &(i, step) in seq {
            let (node, req) = &alphabet[i];
            now += step;
            let before = r.clone();
            let d = r.handle(now, node, req);
            if let (Some(a), Some(b)) = (before.record("vol0"), r.record("vol0")) {
                assert!(b.epoch >= a.epoch, "epoch went down: {seq:?}");
            }
            match &d.reply {
                Reply::Granted { record } => {
                    if matches!(req, Request::Lease { .. } | Request::Outdate { .. }) {
                        let holder = lease_holder.entry(record.epoch).or_insert(node);
                        assert_eq!(holder, node, "two lease holders in epoch {}: {seq:?}", record.epoch);
                    }
                    if let (Request::Promote { .. }, Some(prev)) = (req, before.record("vol0")) {
                        let was = prev.disk_states[*node];
                        let already = prev.primary.as_deref() == Some(*node);
                        assert!(already || was == DiskState::UpToDate, "promoted a {was} node: {seq:?}");
                    }
                }
                _ => assert_eq!(r, before, "a refusal changed the registry: {seq:?}"),
            }
        }
    }

    /// Every sequence of 3 requests from a 32-letter alphabet (both nodes, epochs 1 and 2, every
    /// kind that changes something), each either at the same instant or after the lease.
    #[test]
    fn safety_over_all_short_sequences() {
        let alphabet = alphabet();
        let letters = alphabet.len() * 2;
        for code in 0..letters.pow(3) {
            let seq: Vec<(usize, u64)> = (0..3)
                .map(|k| {
                    let l = code / letters.pow(k) % letters;
                    (l / 2, if l % 2 == 0 { 0 } else { 2000 })
                })
                .collect();
            check_sequence(&alphabet, &seq);
        }
    }

    proptest::proptest! {
        /// Longer random sequences, at times within and past a lease.
        #[test]
        fn safety_over_random_sequences(
            seq in proptest::collection::vec((0usize..32, proptest::sample::select(vec![0u64, 300, 1009, 1010, 2000])), 1..16)
        ) {
            check_sequence(&alphabet(), &seq);
        }
    }
}
