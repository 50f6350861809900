//! Helpers to run real metroblk nodes as separate processes on loopback.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `metroblk` binary cargo built next to the test executable.
pub fn metroblk_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/metroblk
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("metroblk");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p metroblk` (cargo test --workspace does)",
        bin.display()
    );
    bin
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub const TEST_KEY: &str = "metroblk-test-authkey-0123456789";

/// Everything one node's config needs.
pub struct NodeSpec<'a> {
    pub name: &'a str,
    pub peer: &'a str,
    pub role: &'a str,
    pub size: u64,
    pub listen_port: u16,
    pub peer_port: u16,
    pub key: &'a str,
    pub extra: &'a str,
}

/// Writes `<dir>/<name>.toml` (and its key file), creates the volume's metadata file (as
/// `metroblk create-md --force` would), and returns the config path.
pub fn write_config(dir: &Path, s: &NodeSpec) -> PathBuf {
    let key = dir.join(format!("{}.key", s.name));
    std::fs::write(&key, s.key).unwrap();
    // A key readable by others is refused (config.rs), as ssh refuses such a private key.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let text = format!(
        r#"[node]
name = "{name}"
control_socket = "{name}.sock"

[[volume]]
name = "vol0"
size = {size}
backing_file = "{name}-vol0.img"
metadata_file = "{name}-vol0.meta"
listen = "127.0.0.1:{listen}"
role = "{role}"
{extra}
[volume.peer]
name = "{peer}"
address = "127.0.0.1:{peer_port}"
authkey_file = "{name}.key"
"#,
        name = s.name,
        size = s.size,
        listen = s.listen_port,
        role = s.role,
        extra = s.extra,
        peer = s.peer,
        peer_port = s.peer_port,
    );
    let path = dir.join(format!("{}.toml", s.name));
    std::fs::write(&path, text).unwrap();
    // A node refuses to start without its metadata file; an operator makes it with create-md.
    metroblk::metadata::create_md_command(&path, "vol0", true).unwrap();
    path
}

/// The configs of a primary `alpha` and a secondary `beta` of volume `vol0` (`size` bytes) on
/// loopback, written into `dir`, with the ports each listens on.
pub struct PairConfigs {
    pub alpha: PathBuf,
    pub beta: PathBuf,
    pub alpha_port: u16,
    pub beta_port: u16,
}

pub fn pair_configs(dir: &Path, size: u64) -> PairConfigs {
    let (alpha_port, beta_port) = (free_port(), free_port());
    let spec = |name, peer, role, listen_port, peer_port| NodeSpec {
        name,
        peer,
        role,
        size,
        listen_port,
        peer_port,
        key: TEST_KEY,
        extra: "",
    };
    PairConfigs {
        alpha: write_config(dir, &spec("alpha", "beta", "primary", alpha_port, beta_port)),
        beta: write_config(dir, &spec("beta", "alpha", "secondary", beta_port, alpha_port)),
        alpha_port,
        beta_port,
    }
}

/// The hello node `node` sends for `cfg`'s volume, for tests that speak the peer protocol
/// themselves (a fake primary or secondary).
pub fn hello_for(
    node: &str,
    cfg: &metroblk::config::VolumeConfig,
    session: u64,
    nonce: u8,
) -> metroblk_protocol::HelloInfo {
    metroblk_protocol::HelloInfo {
        node_name: node.into(),
        volume_uuid: *cfg.uuid.as_bytes(),
        volume_size: cfg.size,
        region_size: cfg.region_size as u32,
        block_size: cfg.block_size,
        queue: 0,
        session,
        epoch: 1,
        nonce: [nonce; 32],
    }
}

/// A `metroblk node run` child process; killed on drop.
pub struct NodeProcess {
    pub child: Child,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl NodeProcess {
    pub fn start(config: &Path) -> NodeProcess {
        // A new log per start, so a restarted node's log shows only its own run.
        let log = PathBuf::from(format!("{}.{}.log", config.display(), next_id()));
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(metroblk_bin())
            .args(["node", "run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn metroblk node run");
        NodeProcess { child, config: config.to_path_buf(), log }
    }

    /// Waits until the node answers on its control socket.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("node exited with {st} before it was ready; log:\n{}", self.log_text());
            }
            let out =
                Command::new(metroblk_bin()).args(["status", "--json", "--config"]).arg(&self.config).output().unwrap();
            if out.status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "node not ready after {timeout:?}; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out =
            Command::new(metroblk_bin()).args(["status", "--json", "--config"]).arg(&self.config).output().unwrap();
        assert!(out.status.success(), "status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Waits for `cond` or panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
