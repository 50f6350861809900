//! `metroblk node run`: one node's daemon, in the foreground.
//!
//! Opens every configured volume in its configured role, starts the links (the primary dials,
//! the secondary listens), exposes the primary's block device through the frontend, and
//! serves the control socket.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::config::{NodeConfig, Role, VolumeConfig};
use crate::control::{self, VolumeHandle};
use crate::peer::listener;
use crate::volume::stats::QueueStats;
use crate::volume::{self, VolumeShared};

/// Opens a volume as secondary: backing file, shared state, listener.
pub fn start_secondary(cfg: &VolumeConfig, node_name: &str) -> Result<VolumeHandle, String> {
    let file = volume::open_backing_file(cfg).map_err(|e| e.to_string())?;
    let shared = Arc::new(VolumeShared {
        config: cfg.clone(),
        node_name: node_name.to_string(),
        geometry: volume::geometry(cfg),
        epoch: AtomicU64::new(1),
        file,
        queue_stats: vec![Arc::new(QueueStats::default())],
    });
    listener::start(shared.clone())?;
    Ok(VolumeHandle { shared, role: Role::Secondary, handoffs: Vec::new(), ublk_device: None })
}

/// Runs the node until it is killed. Returns only on a start-up error.
pub fn run(cfg: NodeConfig) -> Result<(), String> {
    let mut handles = Vec::new();
    let mut primaries = Vec::new();
    for v in &cfg.volumes {
        match v.role {
            Role::Secondary => handles.push(start_secondary(v, &cfg.name)?),
            Role::Primary => primaries.push(v.clone()),
        }
    }
    if !primaries.is_empty() {
        return Err(format!(
            "volume {}: role primary needs the ublk frontend, which this build does not have yet",
            primaries[0].name
        ));
    }
    control::serve(&cfg.control_socket, cfg.name.clone(), Arc::new(handles))?;
    tracing::info!(node = %cfg.name, control = %cfg.control_socket.display(), "node running");
    loop {
        std::thread::park();
    }
}
