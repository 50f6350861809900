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
    site_pair_configs(dir, size, "", "", None)
}

/// The configs of alpha (primary) and beta (secondary) of `vol0` in `dir`, each with its
/// extra volume lines; `ips`: listen on these addresses (site A, site B, as `netns::Sites`
/// makes them) instead of loopback.
pub fn site_pair_configs(
    dir: &Path,
    size: u64,
    alpha_extra: &str,
    beta_extra: &str,
    ips: Option<(&str, &str)>,
) -> PairConfigs {
    let (pa, pb) = (free_port(), free_port());
    let spec = |name, peer, role, listen_port, peer_port, extra| NodeSpec {
        name,
        peer,
        role,
        size,
        listen_port,
        peer_port,
        key: TEST_KEY,
        extra,
    };
    let alpha = write_config(dir, &spec("alpha", "beta", "primary", pa, pb, alpha_extra));
    let beta = write_config(dir, &spec("beta", "alpha", "secondary", pb, pa, beta_extra));
    if let Some((a, b)) = ips {
        for (path, me, peer) in [(&alpha, a, b), (&beta, b, a)] {
            let t = std::fs::read_to_string(path).unwrap();
            let t = t.replacen("listen = \"127.0.0.1:", &format!("listen = \"{me}:"), 1);
            let t = t.replacen("address = \"127.0.0.1:", &format!("address = \"{peer}:"), 1);
            std::fs::write(path, t).unwrap();
        }
    }
    PairConfigs { alpha, beta, alpha_port: pa, beta_port: pb }
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
        Self::start_in(None, config)
    }

    /// Starts the node inside network namespace `netns` (`ip netns exec`), if given.
    pub fn start_in(netns: Option<&str>, config: &Path) -> NodeProcess {
        // A new log per start, so a restarted node's log shows only its own run.
        let log = PathBuf::from(format!("{}.{}.log", config.display(), next_id()));
        let err = std::fs::File::create(&log).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(metroblk_bin());
                c
            }
            None => Command::new(metroblk_bin()),
        };
        let child = cmd
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

/// The sync hello of a fresh, in-sync copy of `cfg`'s volume (what `create-md` makes).
fn fresh_sync_hello(cfg: &metroblk::config::VolumeConfig) -> (metroblk_protocol::SyncHello, Vec<u8>) {
    let regions = cfg.size.div_ceil(cfg.region_size);
    let bitmap = vec![0u8; (regions.div_ceil(64) * 8) as usize];
    let hello = metroblk_protocol::SyncHello {
        generation: metroblk::metadata::initial_generation(cfg.uuid).into_bytes(),
        history: Vec::new(),
        disk_state: 0,
        discard_local: false,
        full: false,
        primary: false,
        regions,
        bitmap_bytes: bitmap.len() as u64,
    };
    (hello, bitmap)
}

/// Answers PINGs with PONGs and FLUSHes with FLUSH_ACKs on a sync link until it ends, on a
/// thread of its own; `ping`: also send a PING every second (a fake primary keeps the link).
fn keep_sync_link(mut s: std::net::TcpStream, cfg: &metroblk::config::VolumeConfig, ping: bool) {
    use metroblk_protocol::{decode_header, Frame, FrameKind, HEADER_LEN};
    use std::io::{Read, Write};
    let geo = metroblk::volume::geometry(cfg);
    if ping {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            for seq in 1.. {
                let mut h = [0u8; HEADER_LEN];
                Frame::ping(seq).encode(&mut h);
                if w.write_all(&h).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
    }
    std::thread::spawn(move || loop {
        let mut h = [0u8; HEADER_LEN];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let Ok(f) = decode_header(&h, &geo) else { return };
        let mut payload = vec![0u8; f.payload_len()];
        if s.read_exact(&mut payload).is_err() {
            return;
        }
        let reply = match f.kind {
            FrameKind::Ping => Frame::pong(f.seq),
            FrameKind::Flush | FrameKind::SyncDone => Frame::flush_ack(f.seq, 0),
            _ => continue,
        };
        let mut out = [0u8; HEADER_LEN];
        reply.encode(&mut out);
        if s.write_all(&out).is_err() {
            return;
        }
    });
}

/// For a fake secondary that accepted a sync link (`SYNC_QUEUE` in the hello): answers the
/// exchange as a fresh, in-sync copy, then keeps the link answered on a thread.
pub fn answer_sync_as_fake_secondary(mut s: std::net::TcpStream, cfg: &metroblk::config::VolumeConfig) {
    use std::io::{Read, Write};
    let mut buf = [0u8; metroblk_protocol::SYNC_HELLO_LEN];
    s.read_exact(&mut buf).unwrap();
    let theirs = metroblk_protocol::SyncHello::decode(&buf).unwrap();
    let mut bitmap = vec![0u8; theirs.bitmap_bytes as usize];
    s.read_exact(&mut bitmap).unwrap();
    let (hello, bitmap) = fresh_sync_hello(cfg);
    s.write_all(&hello.encode()).unwrap();
    s.write_all(&bitmap).unwrap();
    keep_sync_link(s, cfg, false);
}

/// For a fake primary: opens the sync link to the secondary listening on `port` and makes the
/// exchange as a fresh, in-sync copy, so that the secondary lets data links in; the link is
/// kept (pinged) on a thread.
pub fn admit_fake_primary(port: u16, cfg: &metroblk::config::VolumeConfig) {
    use metroblk_protocol::{run_handshake, Handshake, Role, SYNC_QUEUE};
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = hello_for("alpha", cfg, 1, 3);
    hello.queue = SYNC_QUEUE;
    run_handshake(&mut s, Handshake::new(Role::Dialer, hello, TEST_KEY.as_bytes(), "beta")).unwrap();
    let (ours, bitmap) = fresh_sync_hello(cfg);
    s.write_all(&ours.encode()).unwrap();
    s.write_all(&bitmap).unwrap();
    let mut buf = [0u8; metroblk_protocol::SYNC_HELLO_LEN];
    s.read_exact(&mut buf).unwrap();
    let theirs = metroblk_protocol::SyncHello::decode(&buf).unwrap();
    let mut their_bitmap = vec![0u8; theirs.bitmap_bytes as usize];
    s.read_exact(&mut their_bitmap).unwrap();
    assert_eq!(theirs.generation, ours.generation, "the secondary is not a fresh copy");
    keep_sync_link(s, cfg, true);
}

/// A real secondary (`metroblk node run`, node "beta") that a test speaks to as its primary
/// "alpha" would: started, admitted through the sync exchange as a fresh in-sync copy, ready
/// for data links on `port`.
pub struct FakePrimaryTarget {
    pub secondary: NodeProcess,
    pub cfg: metroblk::config::VolumeConfig,
    pub geo: metroblk_protocol::Geometry,
    pub port: u16,
}

impl FakePrimaryTarget {
    pub fn start(dir: &Path, size: u64) -> FakePrimaryTarget {
        let (pa, pb) = (free_port(), free_port());
        let beta = write_config(
            dir,
            &NodeSpec {
                name: "beta",
                peer: "alpha",
                role: "secondary",
                size,
                listen_port: pb,
                peer_port: pa,
                key: TEST_KEY,
                extra: "",
            },
        );
        let mut secondary = NodeProcess::start(&beta);
        secondary.wait_ready(Duration::from_secs(10));
        let cfg = metroblk::config::NodeConfig::load(&beta).unwrap().volumes[0].clone();
        let geo =
            metroblk_protocol::Geometry { volume_size: cfg.size, block_size: cfg.block_size, max_payload: 1 << 20 };
        admit_fake_primary(pb, &cfg);
        FakePrimaryTarget { secondary, cfg, geo, port: pb }
    }

    /// A data link for queue 0 with this session number, through the real handshake.
    pub fn dial(&self, session: u64) -> std::net::TcpStream {
        use metroblk_protocol::{run_handshake, Handshake, Role};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let hello = hello_for("alpha", &self.cfg, session, session as u8);
        run_handshake(&mut s, Handshake::new(Role::Dialer, hello, TEST_KEY.as_bytes(), "beta")).unwrap();
        s
    }
}
