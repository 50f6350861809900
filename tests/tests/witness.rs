//! The witness as operators run it: `metroblk witness run` as a real process on loopback,
//! talked to by the nodes' client over real TCP. Its decisions survive a `kill -9` and a
//! restart; a torn state file is refused; a wrong key is refused and logged with the address;
//! the admin commands work. Also the out-of-sync alert of a node that lost its peer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metroblk_protocol::witness::{DiskState, Reply, Request, VolumeId};
use metroblk_tests::cluster::{free_port, metroblk_bin, wait_until, write_config, NodeProcess, NodeSpec, TEST_KEY};
use metroblk_witness::client::Client;

const KEY: &str = "witness-test-key-0123456789abcdef";
const TIMEOUT: Duration = Duration::from_secs(5);

struct Witness {
    child: Child,
    log: PathBuf,
}

impl Witness {
    fn start(config: &Path, log: &Path) -> Witness {
        let err = std::fs::File::create(log).unwrap();
        let child = Command::new(metroblk_bin())
            .args(["witness", "run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn metroblk witness run");
        Witness { child, log: log.to_path_buf() }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn witness_config(dir: &Path, port: u16) -> PathBuf {
    let key = dir.join("witness.key");
    std::fs::write(&key, KEY).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let cfg = dir.join("witness.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1\"\nport = {port}\nauthkey_file = \"{}\"\nstate_file = \"{}\"\n",
            key.display(),
            dir.join("witness.state").display()
        ),
    )
    .unwrap();
    cfg
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Connects (retrying while the witness starts) and sends one request.
fn ask(port: u16, node: &str, key: &str, req: &Request) -> Result<Reply, String> {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    runtime().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut c = loop {
            match Client::connect(addr, node, key.as_bytes(), TIMEOUT).await {
                Ok(c) => break c,
                Err(e) if e.contains("refused") && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => return Err(e),
            }
        };
        c.request(req, TIMEOUT).await
    })
}

fn vol() -> VolumeId {
    VolumeId::new("vol0", "7d4ad3e4-0000-4000-8000-000000000001", "alpha", "beta")
}

fn record(reply: Reply) -> metroblk_protocol::witness::Record {
    match reply {
        Reply::Granted { record } => record,
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[test]
fn a_restarted_witness_keeps_every_decision_and_refuses_a_torn_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = witness_config(dir.path(), port);
    let mut w = Witness::start(&cfg, &dir.path().join("w1.log"));
    let lease = Request::Lease { volume: vol(), epoch: 1, lease_ms: 300, drift_ppm: 10_000 };
    assert_eq!(record(ask(port, "alpha", KEY, &lease).unwrap()).primary.as_deref(), Some("alpha"));
    let promote =
        Request::Promote { volume: vol(), epoch: 1, disk_state: DiskState::UpToDate, lease_ms: 300, drift_ppm: 10_000 };
    match ask(port, "beta", KEY, &promote).unwrap() {
        Reply::Refused { reason, .. } => assert!(reason.contains("lease"), "{reason}"),
        other => panic!("promotion during alpha's lease: {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(400));
    let r = record(ask(port, "beta", KEY, &promote).unwrap());
    assert_eq!((r.epoch, r.primary.as_deref()), (2, Some("beta")));
    // kill -9: no clean shutdown; the decision was on disk before the answer.
    w.kill9();
    let w2 = Witness::start(&cfg, &dir.path().join("w2.log"));
    let r = record(ask(port, "alpha", KEY, &Request::Query { volume: vol() }).unwrap());
    assert_eq!((r.epoch, r.primary.as_deref()), (2, Some("beta")), "{}", w2.log_text());
    assert_eq!(r.disk_states.get("alpha"), Some(&DiskState::Outdated));
    // The old primary is refused, naming the new one.
    match ask(port, "alpha", KEY, &lease).unwrap() {
        Reply::Refused { reason, record } => {
            assert!(reason.contains("beta"), "{reason}");
            assert_eq!(record.map(|r| r.epoch), Some(2));
        }
        other => panic!("a lease for the old primary: {other:?}"),
    }
    drop(w2);
    // A torn state file (cut short) is refused at start with one line naming it.
    let state = dir.path().join("witness.state");
    let bytes = std::fs::read(&state).unwrap();
    std::fs::write(&state, &bytes[..bytes.len() / 2]).unwrap();
    let out = Command::new(metroblk_bin()).args(["witness", "run", "--config"]).arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("witness.state"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read(&state).unwrap(), &bytes[..bytes.len() / 2], "the torn file is left for the operator");
}

#[test]
fn a_wrong_key_is_refused_and_logged_with_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let w = Witness::start(&witness_config(dir.path(), port), &dir.path().join("w.log"));
    let e = ask(port, "alpha", "not-the-witness-key-0123456789", &Request::Query { volume: vol() }).unwrap_err();
    assert!(e.to_lowercase().contains("auth") || e.contains("refused"), "{e}");
    wait_until(TIMEOUT, "the refusal in the witness's log", || w.log_text().contains("127.0.0.1"));
    // It still serves the nodes that hold the key.
    assert!(matches!(
        ask(port, "alpha", KEY, &Request::Lease { volume: vol(), epoch: 1, lease_ms: 5000, drift_ppm: 0 }).unwrap(),
        Reply::Granted { .. }
    ));
}

#[test]
fn the_admin_commands_set_and_print_the_key_and_port_and_show_status() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = witness_config(dir.path(), 9095);
    let run = |args: &[&str]| {
        let out = Command::new(metroblk_bin()).arg("witness").args(args).arg("--config").arg(&cfg).output().unwrap();
        assert!(out.status.success(), "witness {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run(&["print-port"]), "9095");
    let p = port.to_string();
    run(&["set-port", &p]);
    assert_eq!(run(&["print-port"]), p);
    run(&["set-authkey", KEY]);
    assert_eq!(run(&["print-authkey"]), KEY);
    let _w = Witness::start(&cfg, &dir.path().join("w.log"));
    assert!(matches!(
        ask(port, "alpha", KEY, &Request::Lease { volume: vol(), epoch: 3, lease_ms: 5000, drift_ppm: 0 }).unwrap(),
        Reply::Granted { .. }
    ));
    let status = run(&["status"]);
    assert!(status.contains("vol0") && status.contains("alpha") && status.contains('3'), "{status}");
}

#[test]
fn a_node_without_its_peer_raises_the_out_of_sync_alert() {
    let dir = tempfile::tempdir().unwrap();
    let (port, peer_port) = (free_port(), free_port());
    let cfg = write_config(
        dir.path(),
        &NodeSpec {
            name: "beta",
            peer: "alpha",
            role: "secondary",
            size: 16 << 20,
            listen_port: port,
            peer_port,
            key: TEST_KEY,
            extra: "out_of_sync_alert_s = 1",
        },
    );
    let mut node = NodeProcess::start(&cfg);
    node.wait_ready(Duration::from_secs(20));
    wait_until(Duration::from_secs(10), "the out-of-sync alert", || {
        node.status_json()["volumes"][0]["out_of_sync_alert"] == serde_json::json!(true)
    });
    wait_until(TIMEOUT, "the alert's warning in the log", || node.log_text().contains("out of sync"));
    let table = Command::new(metroblk_bin()).args(["status", "--config"]).arg(&cfg).output().unwrap();
    assert!(String::from_utf8_lossy(&table.stdout).contains("ALERT: out of sync"));
}
