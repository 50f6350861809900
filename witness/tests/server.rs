//! The witness server in-process: authentication, a failover, a restart on the same state file,
//! and a torn state file.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use metroblk_protocol::witness::{DiskState, Reply, Request, VolumeId};
use metroblk_witness::client::Client;
use metroblk_witness::config::WitnessConfig;
use metroblk_witness::server::serve;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
const T: Duration = Duration::from_secs(5);

fn config(dir: &Path) -> WitnessConfig {
    let key = dir.join("authkey");
    std::fs::write(&key, KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = dir.join("witness.toml");
    std::fs::write(&path, "listen = \"127.0.0.1\"\nauthkey_file = \"authkey\"\nstate_file = \"state.json\"\n").unwrap();
    WitnessConfig::load(&path).unwrap()
}

struct Running {
    addr: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

async fn start(cfg: &WitnessConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let cfg = cfg.clone();
    let task = tokio::spawn(async move {
        serve(listener, &cfg, async {
            let _ = rx.await;
        })
        .await
    });
    Running { addr, stop, task }
}

fn vol() -> VolumeId {
    VolumeId::new("vol0", "6d657472-6f62-6c6b-0000-000000000001", "alpha", "beta")
}

fn lease(epoch: u64) -> Request {
    Request::Lease { volume: vol(), epoch, lease_ms: 300, drift_ppm: 10_000 }
}

fn promote(epoch: u64) -> Request {
    Request::Promote { volume: vol(), epoch, disk_state: DiskState::UpToDate, lease_ms: 300, drift_ppm: 10_000 }
}

fn expect_granted(r: Reply) -> metroblk_protocol::witness::Record {
    match r {
        Reply::Granted { record } => record,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn expect_refused(r: Reply) -> String {
    match r {
        Reply::Refused { reason, .. } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_restart_and_torn_state() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let w = start(&cfg).await;

    // A wrong key is refused; a fake witness would be detected the same way from the other side.
    let e = Client::connect(w.addr, "alpha", b"not the right key at all", T).await.unwrap_err();
    assert!(e.contains("authentication failed"), "{e}");

    let mut alpha = Client::connect(w.addr, "alpha", KEY, T).await.unwrap();
    let mut beta = Client::connect(w.addr, "beta", KEY, T).await.unwrap();
    let rec = expect_granted(alpha.request(&lease(1), T).await.unwrap());
    assert_eq!((rec.epoch, rec.primary.as_deref()), (1, Some("alpha")));

    // alpha's lease runs: beta may not take over.
    let reason = expect_refused(beta.request(&promote(1), T).await.unwrap());
    assert!(reason.starts_with("the primary alpha's lease has"), "{reason}");

    // After the lease (300 ms + 1 %), beta is promoted.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let rec = expect_granted(beta.request(&promote(1), T).await.unwrap());
    assert_eq!((rec.epoch, rec.primary.as_deref()), (2, Some("beta")));
    assert_eq!(rec.disk_states["alpha"], DiskState::Outdated);

    // alpha learns it must stop.
    let reason = expect_refused(alpha.request(&lease(1), T).await.unwrap());
    assert!(reason.contains("the primary is beta at epoch 2"), "{reason}");

    match beta.request(&Request::Status, T).await.unwrap() {
        Reply::Status { volumes, nodes_connected } => {
            assert_eq!(volumes.len(), 1);
            assert_eq!(volumes[0].primary.as_deref(), Some("beta"));
            let mut names: Vec<_> = nodes_connected.iter().map(|n| n.node.as_str()).collect();
            names.sort();
            assert_eq!(names, ["alpha", "beta"]);
        }
        other => panic!("{other:?}"),
    }

    w.stop.send(()).unwrap();
    w.task.await.unwrap().unwrap();
    drop((alpha, beta));

    // Restarted on the same state file: the record is kept.
    let w = start(&cfg).await;
    let mut beta = Client::connect(w.addr, "beta", KEY, T).await.unwrap();
    let rec = expect_granted(beta.request(&Request::Query { volume: vol() }, T).await.unwrap());
    assert_eq!((rec.epoch, rec.primary.as_deref()), (2, Some("beta")));
    assert_eq!(rec.disk_states["alpha"], DiskState::Outdated);
    expect_granted(beta.request(&lease(2), T).await.unwrap());
    let mut alpha = Client::connect(w.addr, "alpha", KEY, T).await.unwrap();
    assert!(expect_refused(alpha.request(&lease(1), T).await.unwrap()).contains("not the primary"));
    w.stop.send(()).unwrap();
    w.task.await.unwrap().unwrap();

    // A torn state file: the witness does not start, and says which file.
    let bytes = std::fs::read(&cfg.state_file).unwrap();
    std::fs::write(&cfg.state_file, &bytes[..bytes.len() - 10]).unwrap();
    let w = start(&cfg).await;
    let e = w.task.await.unwrap().unwrap_err();
    assert!(e.contains(&cfg.state_file.display().to_string()) && e.contains("torn"), "{e}");
}
