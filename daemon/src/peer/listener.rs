//! Accepting links from the primary (the secondary's side of connection set-up).
//!
//! Every accepted connection is authenticated (HMAC challenge-response over the volume's
//! authkey) and checked against this node's volume (uuid, size, region and block size)
//! before a single data frame is read from it; then it is handed to `replica::serve` on a
//! thread of its own. One connection per primary queue.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metroblk_protocol::{run_handshake, Handshake, Role};

use super::connector::{local_hello, HANDSHAKE_TIMEOUT};
use super::replica;
use crate::volume::stats::LinkState;
use crate::volume::VolumeShared;

/// Most simultaneous links one volume accepts (one per primary queue, plus slack for a
/// reconnecting primary whose old links are still closing).
pub const MAX_LINKS: u64 = 2 * crate::config::MAX_QUEUES as u64;

pub struct Listener {
    pub local_addr: std::net::SocketAddr,
}

/// Binds the volume's listen address and serves links from the primary on background threads.
pub fn start(v: Arc<VolumeShared>) -> Result<Listener, String> {
    let listener = TcpListener::bind(v.config.listen)
        .map_err(|e| format!("volume {}: cannot listen on {}: {e}", v.config.name, v.config.listen))?;
    let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(volume = %v.config.name, %local_addr, "secondary: waiting for the primary");
    v.queue_stats[0].set_link(LinkState::Connecting);
    let links = Arc::new(AtomicU64::new(0));
    std::thread::Builder::new()
        .name(format!("listen-{}", v.config.name))
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if links.load(Ordering::Relaxed) >= MAX_LINKS {
                            tracing::warn!(volume = %v.config.name, "refusing a link: {MAX_LINKS} already open");
                            continue;
                        }
                        let v = v.clone();
                        let links = links.clone();
                        let _ = std::thread::Builder::new()
                            .name(format!("replica-{}", v.config.name))
                            .spawn(move || accept_one(v, stream, links));
                    }
                    Err(e) => tracing::warn!(volume = %v.config.name, "accept failed: {e}"),
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(Listener { local_addr })
}

fn accept_one(v: Arc<VolumeShared>, mut stream: TcpStream, links: Arc<AtomicU64>) {
    let from = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let Some(expected) = v.config.peer.as_ref().map(|p| p.name.clone()) else {
        tracing::error!(volume = %v.config.name, "refused link from {from}: this volume is standalone");
        return;
    };
    let hs = Handshake::new(Role::Listener, local_hello(&v, 0), &v.config.authkey, &expected);
    let peer = match run_handshake(&mut stream, hs) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(volume = %v.config.name, "refused link from {from}: {e}");
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(None);
    let stats = &v.queue_stats[0];
    if links.fetch_add(1, Ordering::Relaxed) == 0 {
        stats.set_link(LinkState::Connected);
    }
    tracing::info!(volume = %v.config.name, peer = %peer.node_name, queue = peer.queue, "link from primary up");
    let why = replica::serve(v.clone(), stream, peer.node_name.clone());
    tracing::warn!(volume = %v.config.name, peer = %peer.node_name, queue = peer.queue, "link from primary ended: {why}");
    if links.fetch_sub(1, Ordering::Relaxed) == 1 {
        stats.set_link(LinkState::Connecting);
    }
}
