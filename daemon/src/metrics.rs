//! The node's Prometheus metrics on `/metrics` (`node.metrics_listen`).
//!
//! Rendered per scrape from what `status` reports ([`control::volume_figures`]): relaxed
//! atomic loads of the queues' counters and histograms, and the control-plane locks of the
//! lifecycle view, the sync link's info and the witness client's info. Nothing here takes a
//! lock a queue, replica or bitmap writer thread takes, and the HTTP server is one thread of
//! its own with bounded connections and requests (`metroblk_witness::metrics::serve`), so
//! serving metrics never blocks the data path.
//!
//! Names follow Prometheus conventions: `metroblk_` prefix, `_total` counters, base units
//! (`_bytes`, `_seconds`), and states as state sets (one series per state, 1 for the current
//! one), so `metroblk_volume_link_state{state="connected"} == 0` is an alert rule. Every
//! series of a volume has the labels `volume` and `group`; every series the label `node`.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::config::Role;
use crate::control::{self, VolumeStatus};
use crate::lifecycle::runner::{SlotView, VolumeSlot};
use crate::resync::SyncState;
use crate::volume::stats::{LatencyHistogram, LinkState, QueueStats, LATENCY_BUCKETS_NS};

/// Serves the node's metrics on `addr` (its own thread); returns the bound address.
pub fn serve(addr: SocketAddr, node: String, slots: Arc<Vec<Arc<VolumeSlot>>>) -> Result<SocketAddr, String> {
    metroblk_witness::metrics::serve(addr, "metrics", move || render(&node, &slots))
}

/// The Prometheus text of every volume of the node.
pub fn render(node: &str, slots: &[Arc<VolumeSlot>]) -> String {
    let mut r = Registry::with_prefix_and_labels("metroblk", std::iter::once(("node".into(), node.to_string().into())));
    r.register_collector(Box::new(NodeCollector { volumes: snapshot(slots) }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &r);
    out
}

/// One volume as a scrape sees it.
struct VolumeRow {
    name: String,
    group: String,
    /// `None` while it serves in no role (opening, changing role, failed, stopping).
    status: Option<VolumeStatus>,
    /// `opening`, `changing-role`, `failed`, `stopping`, or `serving`.
    state: &'static str,
    /// Write latency, per bucket, and the sum in ns: local, peer, whole.
    latency: [([u64; LATENCY_BUCKETS_NS.len() + 1], u64); 3],
}

fn snapshot(slots: &[Arc<VolumeSlot>]) -> Vec<VolumeRow> {
    slots
        .iter()
        .map(|slot| {
            let mut row = VolumeRow {
                name: slot.name.clone(),
                group: slot.group.clone(),
                status: None,
                state: "serving",
                latency: [([0; LATENCY_BUCKETS_NS.len() + 1], 0); 3],
            };
            match slot.view() {
                SlotView::Serving(h) => {
                    row.status = Some(control::volume_figures(&h));
                    let parts: [fn(&QueueStats) -> &LatencyHistogram; 3] =
                        [|q| &q.write_local, |q| &q.write_peer, |q| &q.write_whole];
                    for (acc, part) in row.latency.iter_mut().zip(parts) {
                        for q in &h.shared.queue_stats {
                            acc.1 += part(q).add_to(&mut acc.0);
                        }
                    }
                }
                SlotView::Opening(_) => row.state = "opening",
                SlotView::Changing { .. } => row.state = "changing-role",
                SlotView::Failed(_) => row.state = "failed",
                SlotView::Stopped => row.state = "stopping",
            }
            row
        })
        .collect()
}

#[derive(Debug)]
struct NodeCollector {
    volumes: Vec<VolumeRow>,
}

impl std::fmt::Debug for VolumeRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeRow").field("name", &self.name).field("state", &self.state).finish()
    }
}

type Labels = Vec<(&'static str, String)>;

const ROLES: [Role; 2] = [Role::Primary, Role::Secondary];
const DISK_STATES: [&str; 4] = ["up-to-date", "outdated", "inconsistent", "failed"];
const LINK_STATES: [LinkState; 5] =
    [LinkState::Connected, LinkState::Connecting, LinkState::Standalone, LinkState::SyncSource, LinkState::SyncTarget];
const SYNC_STATES: [SyncState; 6] = [
    SyncState::Unknown,
    SyncState::InSync,
    SyncState::SyncSource,
    SyncState::SyncTarget,
    SyncState::SplitBrain,
    SyncState::Refused,
];
const SERVING_STATES: [&str; 5] = ["serving", "opening", "changing-role", "failed", "stopping"];

/// A number a serving volume reports, with its descriptor.
struct Figure {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: MetricType,
    value: fn(&VolumeStatus) -> f64,
}

fn counter(name: &'static str, help: &'static str, unit: Option<Unit>, value: fn(&VolumeStatus) -> f64) -> Figure {
    Figure { name, help, unit, kind: MetricType::Counter, value }
}

fn gauge(name: &'static str, help: &'static str, unit: Option<Unit>, value: fn(&VolumeStatus) -> f64) -> Figure {
    Figure { name, help, unit, kind: MetricType::Gauge, value }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

fn figures() -> Vec<Figure> {
    use Unit::{Bytes, Seconds};
    vec![
        gauge("volume_epoch", "The volume's epoch (raised at every promotion)", None, |s| s.epoch as f64),
        gauge("volume_size", "The volume's size", Some(Bytes), |s| s.size as f64),
        counter("local_write_requests", "WRITE requests written to the local disk", None, |s| {
            s.local_write_requests as f64
        }),
        counter("local_write", "Bytes written to the local disk", Some(Bytes), |s| s.local_write_bytes as f64),
        counter("peer_write_requests", "WRITE requests the peer acknowledged", None, |s| s.peer_write_requests as f64),
        counter("peer_write", "Bytes the peer acknowledged", Some(Bytes), |s| s.peer_write_bytes as f64),
        counter("read_requests", "READ requests served", None, |s| s.read_requests as f64),
        counter("read", "Bytes read", Some(Bytes), |s| s.read_bytes as f64),
        counter("flushes", "FLUSH requests served", None, |s| s.flushes as f64),
        counter("reconnects", "Data links established again after a loss", None, |s| s.reconnects as f64),
        counter("conflict_waits", "Requests that waited for an overlapping one to complete on both nodes", None, |s| {
            s.conflict_waits as f64
        }),
        counter("intent_waits", "Requests that waited for a write-intent bit to become durable", None, |s| {
            s.intent_waits as f64
        }),
        counter("metadata_writes", "Write-intent metadata writes", None, |s| s.metadata_writes as f64),
        counter("completed_alone", "Replicated requests completed without the peer", None, |s| {
            s.completed_alone as f64
        }),
        counter("resynced", "Bytes copied by resyncs since the node started", Some(Bytes), |s| s.resynced_bytes as f64),
        counter("resynced_regions", "Regions copied by resyncs since the node started", None, |s| {
            s.resynced_regions as f64
        }),
        gauge("requests_in_flight", "Requests submitted and not completed", None, |s| s.requests_in_flight as f64),
        gauge("requests_held", "Requests whose peer half waits for the peer", None, |s| s.requests_held as f64),
        gauge("out_of_sync", "Bytes marked in the write-intent bitmap (what a resync would copy)", Some(Bytes), |s| {
            s.out_of_sync_bytes as f64
        }),
        gauge("dirty_regions", "Regions marked in the write-intent bitmap", None, |s| s.dirty_regions as f64),
        gauge("alone", "1 while the volume goes on alone (writes complete without the peer)", None, |s| flag(s.alone)),
        gauge("resync_pending", "1 while a resync is due and has not run yet", None, |s| flag(s.resync_pending)),
        gauge("resync_progress_ratio", "Part of the running resync done (0 to 1; 0 when none runs)", None, |s| {
            s.resync_percent.unwrap_or(0.0) / 100.0
        }),
        gauge("resync_remaining", "Bytes the running resync has left to copy", Some(Bytes), |s| {
            s.resync_bytes_left.unwrap_or(0) as f64
        }),
        gauge("resync_rate", "The running resync's rate", Some(Unit::Other("bytes_per_second".into())), |s| {
            s.resync_rate_bps.unwrap_or(0.0)
        }),
        gauge("link_rtt", "Last PING/PONG round trip to the peer (primary; 0 before the first)", Some(Seconds), |s| {
            s.link_rtt_us.unwrap_or(0.0) / 1e6
        }),
        gauge("peer_missing", "How long the peer has been missing", Some(Seconds), |s| s.peer_missing_s as f64),
        gauge("out_of_sync_alert", "1 while the peer has been missing longer than out_of_sync_alert_s", None, |s| {
            flag(s.out_of_sync_alert)
        }),
        gauge("fenced", "1 while the volume serves no I/O (no peer and no lease, or deposed)", None, |s| {
            flag(s.fenced)
        }),
        gauge("deposed", "1 once the witness named another primary", None, |s| flag(s.deposed)),
        gauge("witness_connected", "1 while the witness link is up (0 without a witness)", None, |s| {
            flag(s.witness_connected)
        }),
        gauge("lease_remaining", "What is left of the primary's lease (0 on a secondary)", Some(Seconds), |s| {
            s.lease_left_ms.unwrap_or(0) as f64 / 1000.0
        }),
        gauge("verify_regions_checked", "Regions the last online verify compared", None, |s| {
            s.verify.as_ref().map_or(0.0, |v| v.regions_checked as f64)
        }),
        gauge("verify_regions_differing", "Regions the last online verify found different", None, |s| {
            s.verify.as_ref().map_or(0.0, |v| v.regions_differing as f64)
        }),
    ]
}

impl NodeCollector {
    fn labels(row: &VolumeRow) -> Labels {
        vec![("volume", row.name.clone()), ("group", row.group.clone())]
    }

    /// One state-set gauge: a series per state, 1 for the current one.
    fn state_set(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        states: &[String],
        current: impl Fn(&VolumeStatus) -> String,
    ) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for row in &self.volumes {
            let Some(s) = &row.status else { continue };
            let now = current(s);
            for state in states {
                let mut l = Self::labels(row);
                l.push(("state", state.clone()));
                ConstGauge::new(flag(*state == now)).encode(m.encode_family(&l)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Serving or not: every volume of the node.
        let mut m = enc.encode_descriptor(
            "volume_serving_state",
            "Whether the volume serves in a role (serving) or not (opening, changing-role, failed, stopping)",
            None,
            MetricType::Gauge,
        )?;
        for row in &self.volumes {
            for state in SERVING_STATES {
                let mut l = Self::labels(row);
                l.push(("state", state.to_string()));
                ConstGauge::new(flag(row.state == state)).encode(m.encode_family(&l)?)?;
            }
        }
        self.state_set(
            &mut enc,
            "volume_role",
            "The volume's role on this node",
            &ROLES.map(|r| r.to_string()),
            |s| s.role.to_string(),
        )?;
        self.state_set(&mut enc, "volume_disk_state", "The local disk's state", &DISK_STATES.map(String::from), |s| {
            s.disk_state.clone()
        })?;
        self.state_set(
            &mut enc,
            "volume_link_state",
            "The link to the peer",
            &LINK_STATES.map(|r| r.to_string()),
            |s| s.link_state.to_string(),
        )?;
        self.state_set(
            &mut enc,
            "volume_sync_state",
            "What the last exchange on the sync link found",
            &SYNC_STATES.map(|r| r.to_string()),
            |s| s.sync_state.to_string(),
        )?;
        for f in figures() {
            let mut m = enc.encode_descriptor(f.name, f.help, f.unit.as_ref(), f.kind)?;
            for row in &self.volumes {
                let Some(s) = &row.status else { continue };
                let v = (f.value)(s);
                let l = Self::labels(row);
                match f.kind {
                    MetricType::Counter => ConstCounter::new(v).encode(m.encode_family(&l)?)?,
                    _ => ConstGauge::new(v).encode(m.encode_family(&l)?)?,
                }
            }
        }
        let mut m = enc.encode_descriptor(
            "write_duration",
            "WRITE latency from submission: the local half done (local), the peer's ack (peer), completed (whole)",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for row in self.volumes.iter().filter(|r| r.status.is_some()) {
            for (part, (buckets, sum_ns)) in ["local", "peer", "whole"].into_iter().zip(&row.latency) {
                let mut l = Self::labels(row);
                l.push(("part", part.to_string()));
                let bounds = LATENCY_BUCKETS_NS.iter().map(|&b| b as f64 / 1e9).chain(std::iter::once(f64::INFINITY));
                let pairs: Vec<(f64, u64)> = bounds.zip(buckets.iter().copied()).collect();
                let count = buckets.iter().sum();
                m.encode_family(&l)?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    *sum_ns as f64 / 1e9,
                    count,
                    &pairs,
                    None,
                )?;
            }
        }
        Ok(())
    }
}
