//! The witness server: authenticates nodes and answers their requests from the [`Registry`].
//!
//! The rule: **a decision that changed the state is in the state file before any node hears of
//! it.** One mutex serialises the registry and the state file: a request is decided, saved (off
//! the async threads) and only then answered, so a witness that crashes and restarts never
//! contradicts an answer it gave. A save that fails undoes the decision and refuses the request.
//!
//! Per connection: the handshake must finish within [`HANDSHAKE_TIMEOUT`]; a node with the wrong
//! key is refused and logged with its address. Then requests and replies alternate until the
//! node closes, sends something malformed, or is idle for [`IDLE_TIMEOUT`] (a node renews its
//! leases every lease/3, so an idle connection is a dead one). At most [`CONNECTIONS_MAX`]
//! connections at a time; more are closed at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metroblk_protocol::witness::{
    ClientHello, ConnectedNode, Reply, Request, ServerHello, ServerVerdict, WitnessError,
};
use metroblk_tls::{Sniffed, Transport};
use rand::RngCore;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};
use tracing::{debug, info, warn};

use crate::config::WitnessConfig;
use crate::io::{io_text, read_body, read_message, write_message, BoxStream};
use crate::metrics::WitnessMetrics;
use crate::registry::Registry;
use crate::state;

/// Time a connection has to authenticate.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A TLS node sends its ClientHello as soon as it connected; a connection silent this long at
/// a TLS witness is a plaintext node waiting for the witness's hello (well within a node's
/// connect timeout, so the node is refused before it gives up).
const CLIENT_HELLO_WAIT: Duration = Duration::from_secs(1);
/// An authenticated connection without a request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most connections served at once.
pub const CONNECTIONS_MAX: usize = 256;

struct Inner {
    registry: Registry,
    /// Authenticated connections by id: node, address, since.
    connected: BTreeMap<u64, (String, SocketAddr, Instant)>,
}

struct Shared {
    inner: Mutex<Inner>,
    key: Vec<u8>,
    /// With transport = "tls": every connection is TLS first (tokio-rustls).
    tls: Option<tokio_rustls::TlsAcceptor>,
    state_file: std::path::PathBuf,
    /// The registry's clock: milliseconds since the server started (monotonic).
    start: Instant,
    metrics: Arc<WitnessMetrics>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Runs the witness from `config` until Ctrl-C or SIGTERM. Refuses to start when the state file
/// is corrupt or the authkey unreadable.
pub fn run(config: WitnessConfig) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    rt.block_on(async {
        let addr = SocketAddr::new(config.listen, config.port);
        let listener = TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            info!("stopping");
        };
        serve(listener, &config, shutdown).await
    })
}

/// Serves on `listener` until `shutdown` completes. Loads the authkey and the state file first
/// and returns their error without serving anything.
pub async fn serve(
    listener: TcpListener,
    config: &WitnessConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let key = config.read_authkey()?;
    let tls = config.tls_setup(&key, &config.listen.to_string())?.map(|t| tokio_rustls::TlsAcceptor::from(t.server));
    let path = config.state_file.clone();
    let loaded = tokio::task::spawn_blocking(move || state::load(&path))
        .await
        .map_err(|e| format!("loading the state file: {e}"))?
        .map_err(|e| format!("{e}; the witness does not start on a state it cannot trust (restore the file, or remove it to start empty and let the primaries register again)"))?;
    let start = Instant::now();
    let registry = match loaded {
        Some(st) => Registry::from_state(st, 0)
            .map_err(|e| format!("witness state file {}: {e}", config.state_file.display()))?,
        None => Registry::new(),
    };
    let volumes = registry.to_state().volumes.len();
    let metrics = Arc::new(WitnessMetrics::default());
    metrics.set_volumes(volumes);
    if let Some(addr) = config.metrics_listen {
        let m = metrics.clone();
        let bound = crate::metrics::serve(addr, "witness-metrics", move || m.render())?;
        info!("metrics on http://{bound}/metrics");
    }
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner { registry, connected: BTreeMap::new() }),
        key,
        tls,
        state_file: config.state_file.clone(),
        start,
        metrics,
    });
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    info!("witness listening on {local}, {volumes} volume(s) in {}", config.state_file.display());
    // systemd (Type=notify): serving now; the watchdog is fed from this loop, after taking
    // the registry's lock, so a witness whose decisions are stuck is restarted.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let mut watchdog =
        tokio::time::interval(sd_notify::watchdog_enabled().map_or(Duration::from_secs(3600), |d| d / 3));
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                return Ok(());
            }
            _ = watchdog.tick() => {
                if sd_notify::watchdog_enabled().is_some() {
                    drop(shared.inner.lock().await);
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
            }
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and the like: wait instead of spinning.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    warn!("refusing {peer}: {CONNECTIONS_MAX} connections already");
                    continue;
                };
                next_id += 1;
                let (shared, id) = (shared.clone(), next_id);
                tokio::spawn(async move {
                    let _permit = permit;
                    let _ = stream.set_nodelay(true);
                    if let Some(stream) = secure(&shared, stream, peer).await {
                        connection(shared.clone(), stream, peer, id).await;
                    }
                    let mut inner = shared.inner.lock().await;
                    inner.connected.remove(&id);
                    shared.metrics.set_nodes_connected(inner.connected.len());
                });
            }
        }
    }
}

/// With TLS: refuses a plaintext node (naming both transports) and runs the TLS handshake.
async fn secure(shared: &Shared, stream: TcpStream, peer: SocketAddr) -> Option<BoxStream> {
    let Some(acceptor) = &shared.tls else { return Some(Box::new(stream)) };
    let mut first = [0u8; 2];
    let theirs = match tokio::time::timeout(CLIENT_HELLO_WAIT, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => metroblk_tls::sniff(&first[..n]),
        Ok(_) => return None,
        // Silent: a plaintext node waits for the witness to speak first.
        Err(_) => Sniffed::Plain,
    };
    if theirs == Sniffed::Plain {
        warn!("{peer}: refused: {}", metroblk_tls::transport_mismatch(Transport::Tls, Transport::Tcp));
        return None;
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(Box::new(s)),
        Ok(Err(e)) => {
            warn!("{peer}: refused: TLS handshake: {}", metroblk_tls::handshake_error_text(&e));
            None
        }
        Err(_) => {
            debug!("{peer}: no TLS handshake within {} s", HANDSHAKE_TIMEOUT.as_secs());
            None
        }
    }
}

async fn connection(shared: Arc<Shared>, mut stream: BoxStream, peer: SocketAddr, id: u64) {
    let node = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&shared, &mut stream)).await {
        Err(_) => {
            debug!("{peer}: no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs());
            return;
        }
        Ok(Err(HandshakeFail::Auth(node))) => {
            warn!("{peer}: refused node {node}: authentication failed (wrong authkey)");
            return;
        }
        Ok(Err(HandshakeFail::Transport(e))) => {
            warn!("{peer}: refused: {e}");
            return;
        }
        Ok(Err(HandshakeFail::Other(e))) => {
            debug!("{peer}: handshake failed: {e}");
            return;
        }
        Ok(Ok(node)) => node,
    };
    debug!("{peer}: node {node} authenticated");
    {
        let mut inner = shared.inner.lock().await;
        inner.connected.insert(id, (node.clone(), peer, Instant::now()));
        shared.metrics.set_nodes_connected(inner.connected.len());
    }
    loop {
        let req: Request = match tokio::time::timeout(IDLE_TIMEOUT, read_message(&mut stream)).await {
            Err(_) => {
                debug!("{peer}: node {node} idle for {} s, closing", IDLE_TIMEOUT.as_secs());
                return;
            }
            Ok(Err(e)) => {
                debug!("{peer}: node {node}: {e}");
                if e.starts_with("malformed") {
                    let refused = Reply::Refused { reason: e, record: None };
                    let _ = write_message(&mut stream, &refused).await;
                }
                return;
            }
            Ok(Ok(r)) => r,
        };
        let reply = decide(&shared, &node, &req).await;
        if let Err(e) = write_message(&mut stream, &reply).await {
            debug!("{peer}: node {node}: {e}");
            return;
        }
    }
}

enum HandshakeFail {
    /// The named node's proof did not verify.
    Auth(String),
    /// The node speaks another transport (the line names both).
    Transport(String),
    Other(String),
}

async fn handshake(shared: &Shared, stream: &mut BoxStream) -> Result<String, HandshakeFail> {
    let mut server_nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut server_nonce);
    write_message(stream, &ServerHello::new(&server_nonce)).await.map_err(HandshakeFail::Other)?;
    let mut prefix = [0u8; metroblk_protocol::witness::WITNESS_FRAME_PREFIX_LEN];
    stream.read_exact(&mut prefix).await.map_err(|e| HandshakeFail::Other(io_text(e)))?;
    // A plaintext witness: a TLS ClientHello is a node with transport = "tls".
    if shared.tls.is_none() && metroblk_tls::sniff(&prefix) == Sniffed::Tls {
        return Err(HandshakeFail::Transport(metroblk_tls::transport_mismatch(Transport::Tcp, Transport::Tls)));
    }
    let hello: ClientHello = read_body(stream, prefix).await.map_err(HandshakeFail::Other)?;
    match hello.verify(&shared.key, &server_nonce) {
        Ok(client_nonce) => {
            let welcome = ServerVerdict::welcome(&shared.key, &server_nonce, &client_nonce, &hello.node);
            write_message(stream, &welcome).await.map_err(HandshakeFail::Other)?;
            Ok(hello.node)
        }
        Err(e) => {
            let refused = ServerVerdict::Refused { reason: e.to_string() };
            let _ = write_message(stream, &refused).await;
            Err(match e {
                // The name is checked before the proof: it is printable.
                WitnessError::AuthFailed => HandshakeFail::Auth(hello.node),
                other => HandshakeFail::Other(other.to_string()),
            })
        }
    }
}

/// Decides, persists if needed, and returns the reply, all under the one mutex.
async fn decide(shared: &Shared, node: &str, req: &Request) -> Reply {
    let mut inner = shared.inner.lock().await;
    let now_ms = shared.now_ms();
    let before = inner.registry.clone();
    let decision = inner.registry.handle(now_ms, node, req);
    if decision.changed {
        let st = inner.registry.to_state();
        let path = shared.state_file.clone();
        let saved = tokio::task::spawn_blocking(move || state::save(&path, &st))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = saved {
            // Unsaved means undecided: a restart would not know it.
            inner.registry = before;
            warn!("cannot save the state, refusing {} from {node}: {e}", req.kind());
            return Reply::Refused { reason: format!("the witness cannot save its state: {e}"), record: None };
        }
    }
    log_decision(node, req, &decision.reply);
    let outcome = match decision.reply {
        Reply::Granted { .. } => "granted",
        Reply::Refused { .. } => "refused",
        Reply::Status { .. } => "status",
    };
    shared.metrics.decided(req.kind(), outcome);
    if decision.changed {
        shared.metrics.set_volumes(inner.registry.to_state().volumes.len());
    }
    match decision.reply {
        Reply::Status { volumes, .. } => {
            let nodes_connected = inner
                .connected
                .values()
                .map(|(n, a, since)| ConnectedNode {
                    node: n.clone(),
                    address: a.to_string(),
                    connected_ms: u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX),
                })
                .collect();
            Reply::Status { volumes, nodes_connected }
        }
        other => other,
    }
}

fn log_decision(node: &str, req: &Request, reply: &Reply) {
    let volume = req.volume().map(|v| v.name.as_str()).unwrap_or("-");
    let kind = req.kind();
    match (req, reply) {
        // A refused renewal tells a node to stop serving: worth the operator's attention.
        (Request::Lease { .. }, Reply::Refused { reason, .. }) => {
            info!("volume {volume}: refused {kind} from {node}: {reason}")
        }
        (Request::Query { .. } | Request::Status, Reply::Refused { reason, .. }) => {
            debug!("volume {volume}: refused {kind} from {node}: {reason}")
        }
        (Request::Lease { .. } | Request::Query { .. } | Request::Status, _) => {}
        (_, Reply::Granted { record }) => info!(
            "volume {volume}: granted {kind} from {node}: epoch {}, primary {}",
            record.epoch,
            record.primary.as_deref().unwrap_or("none")
        ),
        (_, Reply::Refused { reason, .. }) => warn!("volume {volume}: refused {kind} from {node}: {reason}"),
        (_, Reply::Status { .. }) => {}
    }
}
