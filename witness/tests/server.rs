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
    config_with(dir, "")
}

/// The config with `extra` lines (a transport, certificate files).
fn config_with(dir: &Path, extra: &str) -> WitnessConfig {
    let key = dir.join("authkey");
    std::fs::write(&key, KEY).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let path = dir.join("witness.toml");
    let text = format!("listen = \"127.0.0.1\"\nauthkey_file = \"authkey\"\nstate_file = \"state.json\"\n{extra}");
    std::fs::write(&path, text).unwrap();
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

/// `transport = "tls"`: the witness link is TLS 1.3 with keys derived from the authkey; a
/// node with another authkey, or with the other transport, is refused with a line naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_keys_from_the_authkey_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with(dir.path(), "transport = \"tls\"\n");
    let w = start(&cfg).await;
    let tls = cfg.tls_setup(KEY, "127.0.0.1").unwrap().unwrap();
    let mut alpha = Client::connect_over(w.addr, "alpha", KEY, Some(&tls), T).await.unwrap();
    let rec = expect_granted(alpha.request(&lease(1), T).await.unwrap());
    assert_eq!(rec.primary.as_deref(), Some("alpha"));

    let other = b"another authkey, not the witness's";
    let wrong = cfg.tls_setup(other, "127.0.0.1").unwrap().unwrap();
    let e = Client::connect_over(w.addr, "beta", other, Some(&wrong), T).await.unwrap_err();
    assert!(e.contains("different authkeys") && !e.contains('\n'), "{e}");

    let e = Client::connect(w.addr, "beta", KEY, T).await.unwrap_err();
    assert!(e.contains("transport") && e.contains("\"tls\""), "a plaintext node at a TLS witness: {e}");
    w.stop.send(()).unwrap();
    w.task.await.unwrap().unwrap();

    // A TLS node at a plaintext witness.
    let plain = config(dir.path());
    let w = start(&plain).await;
    let e = Client::connect_over(w.addr, "beta", KEY, Some(&tls), T).await.unwrap_err();
    assert!(e.contains("does not speak TLS") && e.contains("\"tcp\""), "{e}");
    w.stop.send(()).unwrap();
    w.task.await.unwrap().unwrap();
}

/// Certificate files signed by a CA: a node whose certificate the CA signed is served; one
/// signed by another CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_certificate_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = make_ca();
    let other_ca = make_ca();
    issue(&ca, "127.0.0.1", &d.join("witness"));
    issue(&ca, "alpha", &d.join("alpha"));
    issue(&other_ca, "mallory", &d.join("mallory"));
    std::fs::write(d.join("ca.pem"), ca.0.pem()).unwrap();
    std::fs::write(d.join("other-ca.pem"), other_ca.0.pem()).unwrap();
    let files = |who: &str, ca: &str| {
        format!("transport = \"tls\"\ntls_cert = \"{who}.pem\"\ntls_key = \"{who}.key\"\ntls_ca = \"{ca}\"\n")
    };
    let cfg = config_with(d, &files("witness", "ca.pem"));
    let w = start(&cfg).await;
    let node = |who: &str, ca: &str| {
        metroblk_tls::TlsSetup::new(
            &metroblk_tls::TlsKeys::Files {
                cert: d.join(format!("{who}.pem")),
                key: d.join(format!("{who}.key")),
                ca: d.join(ca),
            },
            "metroblk-witness",
            "127.0.0.1",
        )
        .unwrap()
    };
    let mut alpha = Client::connect_over(w.addr, "alpha", KEY, Some(&node("alpha", "ca.pem")), T).await.unwrap();
    expect_granted(alpha.request(&lease(1), T).await.unwrap());
    let e = Client::connect_over(w.addr, "mallory", KEY, Some(&node("mallory", "other-ca.pem")), T).await.unwrap_err();
    assert!(e.contains("TLS handshake") && !e.contains('\n'), "{e}");
    w.stop.send(()).unwrap();
    w.task.await.unwrap().unwrap();
}

fn make_ca() -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    (p.self_signed(&key).unwrap(), key)
}

/// Writes `<base>.pem` and `<base>.key`: a certificate for `name` signed by `ca`.
fn issue(ca: &(rcgen::Certificate, rcgen::KeyPair), name: &str, base: &Path) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap().signed_by(&key, &ca.0, &ca.1).unwrap();
    std::fs::write(base.with_extension("pem"), cert.pem()).unwrap();
    std::fs::write(base.with_extension("key"), key.serialize_pem()).unwrap();
}
