//! The control socket (a Unix socket per node) and the status report it serves.
//!
//! Protocol: the client sends one JSON line (`{"command":"status"}`), the node answers with
//! one JSON line and closes. Control plane only: it reads counters with relaxed atomic loads
//! and never touches the data path.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Role;
use crate::peer::connector::LinkHandoff;
use crate::volume::stats::{LinkState, QueueStats};
use crate::volume::VolumeShared;

/// Largest request line accepted on the control socket.
pub const MAX_REQUEST: u64 = 64 << 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub volumes: Vec<VolumeStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub uuid: String,
    pub size: u64,
    pub role: Role,
    pub disk_state: String,
    /// Why the disk state is `failed` (the first error; errors latch).
    pub disk_error: Option<String>,
    pub link_state: LinkState,
    pub epoch: u64,
    pub peer: String,
    pub peer_address: String,
    pub requests_in_flight: u64,
    pub requests_held: u64,
    pub local_write_bytes: u64,
    pub local_write_requests: u64,
    pub peer_write_bytes: u64,
    pub peer_write_requests: u64,
    pub read_bytes: u64,
    pub read_requests: u64,
    pub flushes: u64,
    pub reconnects: u64,
    /// Requests that waited for an overlapping request to complete on both nodes.
    pub conflict_waits: u64,
    /// Last PING/PONG round trip in microseconds (primary only; null before the first).
    pub link_rtt_us: Option<f64>,
    pub last_link_error: Option<String>,
    pub ublk_device: Option<String>,
}

/// What the control socket reports on, per volume.
pub struct VolumeHandle {
    pub shared: Arc<VolumeShared>,
    pub role: Role,
    pub handoffs: Vec<Arc<LinkHandoff>>,
    pub ublk_device: Option<String>,
}

pub fn volume_status(h: &VolumeHandle) -> VolumeStatus {
    let v = &h.shared;
    let c = &v.config;
    let sum = |f: fn(&QueueStats) -> &std::sync::atomic::AtomicU64| -> u64 {
        v.queue_stats.iter().map(|q| QueueStats::get(f(q))).sum()
    };
    let link_state = if c.peer.is_none() {
        LinkState::Standalone
    } else if h.role == Role::Secondary {
        // The listener keeps the secondary's link state in the first counters.
        v.queue_stats[0].link()
    } else if v.queue_stats.iter().all(|q| q.link() == LinkState::Connected) {
        LinkState::Connected
    } else {
        LinkState::Connecting
    };
    let rtts: Vec<u64> = v.queue_stats.iter().map(|q| QueueStats::get(&q.rtt_ns)).filter(|&r| r > 0).collect();
    let link_rtt_us =
        if rtts.is_empty() { None } else { Some(rtts.iter().sum::<u64>() as f64 / rtts.len() as f64 / 1000.0) };
    VolumeStatus {
        name: c.name.clone(),
        uuid: c.uuid.to_string(),
        size: c.size,
        role: h.role,
        disk_state: v.disk.state().to_string(),
        disk_error: v.disk.reason(),
        link_state,
        epoch: v.epoch(),
        peer: c.peer.as_ref().map(|p| p.name.clone()).unwrap_or_else(|| "-".into()),
        peer_address: c.peer.as_ref().map(|p| p.address.to_string()).unwrap_or_else(|| "-".into()),
        requests_in_flight: sum(|q| &q.inflight),
        requests_held: sum(|q| &q.held),
        local_write_bytes: sum(|q| &q.local_write_bytes),
        local_write_requests: sum(|q| &q.local_write_requests),
        peer_write_bytes: sum(|q| &q.peer_write_bytes),
        peer_write_requests: sum(|q| &q.peer_write_requests),
        read_bytes: sum(|q| &q.read_bytes),
        read_requests: sum(|q| &q.read_requests),
        flushes: sum(|q| &q.flushes),
        reconnects: sum(|q| &q.reconnects),
        conflict_waits: sum(|q| &q.conflict_waits),
        link_rtt_us,
        last_link_error: h.handoffs.iter().find_map(|h| h.last_error()),
        ublk_device: h.ublk_device.clone(),
    }
}

#[derive(Debug, Deserialize)]
struct ControlRequest {
    command: String,
}

/// Serves the control socket on a background thread. A stale socket file from a crashed
/// daemon is replaced; a live one (another daemon answering) is an error, and so is anything
/// at that path that is not a socket: a mistyped path must never delete someone's file.
pub fn serve(path: &Path, node: String, volumes: Arc<Vec<VolumeHandle>>) -> Result<(), String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!(
                "control socket {} exists and is not a socket; refusing to replace it (fix node.control_socket)",
                path.display()
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!("control socket {} is in use by another running node", path.display()));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale control socket {}: {e}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind control socket {}: {e}", path.display()))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = handle(conn, &node, &volumes);
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn handle(conn: UnixStream, node: &str, volumes: &[VolumeHandle]) -> std::io::Result<()> {
    let mut line = String::new();
    BufReader::new(std::io::Read::take(&conn, MAX_REQUEST)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(r) if r.command == "status" => {
            let s = NodeStatus { node: node.to_string(), volumes: volumes.iter().map(volume_status).collect() };
            serde_json::to_value(s).unwrap_or_default()
        }
        Ok(r) => serde_json::json!({"error": format!("unknown command '{}'", r.command)}),
        Err(e) => serde_json::json!({"error": format!("malformed request: {e}")}),
    };
    let mut w = &conn;
    writeln!(w, "{reply}")
}

/// Asks a running node for its status.
pub fn query_status(path: &PathBuf) -> Result<NodeStatus, String> {
    let conn = UnixStream::connect(path)
        .map_err(|e| format!("cannot reach the node at {}: {e} (is `metroblk node run` running?)", path.display()))?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut w = &conn;
    writeln!(w, "{{\"command\":\"status\"}}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(|e| format!("no answer from {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("bad answer from node: {e}"))?;
    if let Some(e) = v.get("error") {
        return Err(format!("node answered: {e}"));
    }
    serde_json::from_value(v).map_err(|e| format!("bad answer from node: {e}"))
}

/// The human-readable status table.
pub fn render(s: &NodeStatus) -> String {
    let mut out = format!("node {}\n", s.node);
    for v in &s.volumes {
        out += &format!(
            "  volume {}  role {}  disk {}  link {}  epoch {}\n",
            v.name, v.role, v.disk_state, v.link_state, v.epoch
        );
        out += &format!("    peer {} at {}", v.peer, v.peer_address);
        if let Some(rtt) = v.link_rtt_us {
            out += &format!("  rtt {rtt:.0} us");
        }
        out += "\n";
        out += &format!(
            "    in flight {}  held {}  written locally {} req / {} B  to peer {} req / {} B  reads {}  flushes {}\n",
            v.requests_in_flight,
            v.requests_held,
            v.local_write_requests,
            v.local_write_bytes,
            v.peer_write_requests,
            v.peer_write_bytes,
            v.read_requests,
            v.flushes
        );
        if let Some(d) = &v.ublk_device {
            out += &format!("    device {d}\n");
        }
        if let Some(e) = &v.disk_error {
            out += &format!("    disk error: {e}\n");
        }
        if let Some(e) = &v.last_link_error {
            out += &format!("    last link error: {e}\n");
        }
    }
    out
}
