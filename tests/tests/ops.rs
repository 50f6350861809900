//! Operations as a monitoring system and a service manager meet them: the real Prometheus
//! server scrapes a node pair and the witness (`metrics_listen`), `promtool` checks what they
//! serve, and systemd's notify protocol (READY, WATCHDOG, STOPPING) arrives on a socket the
//! test owns.
//!
//! The primary `alpha` is the engine in this process (no ublk; it serves its metrics through
//! `metroblk::metrics::serve` as `node run` does); the secondary `beta` and the witness are
//! real processes. Two sites in network namespaces: alpha, the witness and Prometheus in
//! site A, beta in site B, so cutting the veth link is a real partition that Prometheus
//! sees (alpha's link state, beta's target going down).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metroblk::config::NodeConfig;
use metroblk_tests::cluster::{free_port, metroblk_bin, site_pair_configs, NodeProcess, TEST_KEY};
use metroblk_tests::netns::Sites;
use metroblk_tests::writer::TestPrimary;

const VOLUME: u64 = 64 << 20;
const LONG: Duration = Duration::from_secs(60);

/// A child process killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Runs `program args` inside network namespace `ns`, its output into `log`.
    fn start_in(ns: &str, program: &Path, args: &[&str], log: &Path) -> Proc {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Proc { child, log: log.to_path_buf() }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Debian program the test needs, or a failure that says what to install.
fn require(program: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let p = Path::new(dir).join(program);
        if p.exists() {
            return p;
        }
    }
    panic!("{program} is missing: install the Debian package {package} (scripts/deps.sh does)");
}

/// GET `path` from `addr` (HTTP/1.0, the whole answer): (status line, body).
fn http_get(addr: &str, path: &str) -> Result<(String, String), String> {
    let mut c = std::net::TcpStream::connect(addr).map_err(|e| format!("{addr}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    c.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or("no end of the head")?;
    Ok((head.lines().next().unwrap_or_default().to_string(), body.to_string()))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of an instant query through Prometheus's HTTP API (`None`: no series).
fn query(prom: &str, q: &str) -> Option<f64> {
    let (status, body) = http_get(prom, &format!("/api/v1/query?query={}", url_encode(q))).ok()?;
    assert!(status.contains("200"), "query {q}: {status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
    let result = v["data"]["result"].as_array()?;
    let first = result.first()?;
    first["value"][1].as_str()?.parse().ok()
}

/// Polls the primary (the engine runs on this thread) until `q` satisfies `ok`.
fn wait_query(a: &mut TestPrimary, prom: &str, q: &str, what: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + LONG;
    loop {
        a.poll();
        if let Some(v) = query(prom, q).filter(|v| ok(*v)) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {q} is {:?} after {LONG:?}", query(prom, q));
        for _ in 0..10 {
            a.poll();
        }
    }
}

/// Adds `line` to the `[node]` table of a node config.
fn add_to_node(config: &Path, line: &str) {
    let t = std::fs::read_to_string(config).unwrap();
    let t = t.replacen("[node]\n", &format!("[node]\n{line}\n"), 1);
    std::fs::write(config, t).unwrap();
}

/// `promtool check metrics` on `text`: its complaints, if any.
fn promtool_check(promtool: &Path, text: &str) -> String {
    let mut c = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && said.trim().is_empty() {
        String::new()
    } else {
        format!("exit {}: {said}", out.status)
    }
}

#[test]
fn prometheus_scrapes_the_pair_and_the_witness_and_sees_writes_and_a_cut() {
    let prometheus = require("prometheus", "prometheus");
    let promtool = require("promtool", "prometheus");
    let sites = Sites::create(41);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pair = site_pair_configs(d, VOLUME, "fencing = \"none\"\n", "", Some((&sites.addr_a, &sites.addr_b)));
    let (alpha_cfg, beta_cfg) = (pair.alpha, pair.beta);
    let (alpha_metrics, beta_metrics, witness_metrics, prom) = (
        format!("{}:{}", sites.addr_a, free_port()),
        format!("{}:{}", sites.addr_b, free_port()),
        format!("{}:{}", sites.addr_a, free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    add_to_node(&beta_cfg, &format!("metrics_listen = \"{beta_metrics}\""));

    // The witness, in site A.
    std::fs::write(d.join("witness.key"), TEST_KEY).unwrap();
    std::fs::set_permissions(d.join("witness.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let witness_port = free_port();
    let witness_cfg = d.join("witness.toml");
    std::fs::write(
        &witness_cfg,
        format!(
            "port = {witness_port}\nauthkey_file = \"witness.key\"\nstate_file = \"witness.state\"\n\
             metrics_listen = \"{witness_metrics}\"\n"
        ),
    )
    .unwrap();
    let _witness = Proc::start_in(
        &sites.a,
        &metroblk_bin(),
        &["witness", "run", "--config", witness_cfg.to_str().unwrap()],
        &d.join("witness.log"),
    );

    let mut beta = NodeProcess::start_in(Some(&sites.b), &beta_cfg);
    beta.wait_ready(Duration::from_secs(10));
    sites.enter_a();
    let cfg = NodeConfig::load(&alpha_cfg).unwrap();
    let mut a = TestPrimary::open(&cfg.volumes[0], &cfg.name, 16, 1);
    let handle = metroblk::lifecycle::runner::VolumeHandle {
        shared: a.vol.shared.clone(),
        role: metroblk::config::Role::Primary,
        handoffs: Vec::new(),
        ublk_device: None,
    };
    let slots = std::sync::Arc::new(vec![metroblk::lifecycle::runner::VolumeSlot::serving(handle)]);
    metroblk::metrics::serve(alpha_metrics.parse().unwrap(), "alpha".into(), slots).unwrap();
    a.wait_link(Duration::from_secs(20));

    // Prometheus, in site A, scraping every second.
    std::fs::write(
        d.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n\
             - job_name: alpha\n  static_configs:\n  - targets: ['{alpha_metrics}']\n\
             - job_name: beta\n  static_configs:\n  - targets: ['{beta_metrics}']\n\
             - job_name: witness\n  static_configs:\n  - targets: ['{witness_metrics}']\n"
        ),
    )
    .unwrap();
    let prom_proc = Proc::start_in(
        &sites.a,
        &prometheus,
        &[
            &format!("--config.file={}", d.join("prometheus.yml").display()),
            &format!("--storage.tsdb.path={}", d.join("tsdb").display()),
            &format!("--web.listen-address={prom}"),
        ],
        &d.join("prometheus.log"),
    );
    let ready = Instant::now() + LONG;
    while http_get(&prom, "/-/ready").map_or(true, |(s, _)| !s.contains("200")) {
        assert!(Instant::now() < ready, "Prometheus not ready; its log:\n{}", prom_proc.log_text());
        a.poll();
    }

    // Every target is up and says what it is.
    for job in ["alpha", "beta", "witness"] {
        wait_query(&mut a, &prom, &format!("up{{job=\"{job}\"}}"), &format!("{job} scraped"), |v| v == 1.0);
    }
    let connected = "metroblk_volume_link_state{node=\"alpha\",volume=\"vol0\",state=\"connected\"}";
    wait_query(&mut a, &prom, connected, "alpha's link up", |v| v == 1.0);
    wait_query(&mut a, &prom, "metroblk_volume_role{node=\"beta\",state=\"secondary\"}", "beta's role", |v| v == 1.0);
    wait_query(&mut a, &prom, "metroblk_witness_volumes", "the witness's volume count", |v| v == 0.0);

    // The write counter rises with the writes, on both nodes' sides.
    let writes = "metroblk_local_write_requests_total{node=\"alpha\",volume=\"vol0\"}";
    let before = wait_query(&mut a, &prom, writes, "the write counter", |_| true);
    a.write_random(300, 0, VOLUME, LONG);
    a.flush(LONG);
    wait_query(&mut a, &prom, writes, "the write counter after 300 writes", |v| v >= before + 300.0);
    wait_query(&mut a, &prom, "metroblk_peer_write_requests_total{node=\"alpha\"}", "the peer's acks", |v| v >= 300.0);
    wait_query(
        &mut a,
        &prom,
        "metroblk_local_write_requests_total{node=\"beta\"}",
        "the secondary's write counter",
        |v| v >= 300.0,
    );
    wait_query(
        &mut a,
        &prom,
        "metroblk_write_duration_seconds_count{node=\"alpha\",part=\"whole\"}",
        "the write latency histogram",
        |v| v >= 300.0,
    );
    // A status request to the witness is a decision Prometheus counts.
    let st = Command::new("ip")
        .args(["netns", "exec", &sites.a])
        .arg(metroblk_bin())
        .args(["witness", "status", "--config"])
        .arg(&witness_cfg)
        .output()
        .unwrap();
    assert!(st.status.success(), "witness status: {}", String::from_utf8_lossy(&st.stderr));
    wait_query(
        &mut a,
        &prom,
        "metroblk_witness_decisions_total{request=\"status\",outcome=\"status\"}",
        "the witness's decision count",
        |v| v >= 1.0,
    );

    // promtool accepts what every target serves.
    for (who, addr) in [("alpha", &alpha_metrics), ("beta", &beta_metrics), ("witness", &witness_metrics)] {
        let (status, text) = http_get(addr, "/metrics").unwrap();
        assert!(status.contains("200"), "{who}: {status}");
        assert!(text.contains("# TYPE"), "{who} served no metrics:\n{text}");
        let said = promtool_check(&promtool, &text);
        assert!(said.is_empty(), "promtool check metrics on {who}'s /metrics: {said}\n{text}");
    }

    // The cut: alpha's link goes down (and Prometheus loses beta); writes go on alone.
    sites.cut();
    a.write_random(50, 0, 8 << 20, LONG);
    wait_query(&mut a, &prom, connected, "alpha's link down after the cut", |v| v == 0.0);
    wait_query(&mut a, &prom, "up{job=\"beta\"}", "beta unreachable after the cut", |v| v == 0.0);
    wait_query(&mut a, &prom, "metroblk_alone{node=\"alpha\"}", "alpha alone", |v| v == 1.0);
    wait_query(&mut a, &prom, "metroblk_out_of_sync_bytes{node=\"alpha\"}", "regions out of sync", |v| v > 0.0);

    // Healed: the link and the scrape come back, the resync copies what was written apart.
    sites.heal();
    wait_query(&mut a, &prom, connected, "alpha's link up after the heal", |v| v == 1.0);
    wait_query(&mut a, &prom, "up{job=\"beta\"}", "beta scraped after the heal", |v| v == 1.0);
    wait_query(&mut a, &prom, "metroblk_resynced_bytes_total{node=\"alpha\"}", "the resync", |v| v > 0.0);
    wait_query(&mut a, &prom, "metroblk_reconnects_total{node=\"alpha\"}", "the reconnect", |v| v >= 1.0);
    drop(beta);
}

/// Receives datagrams on `sock` until `want` arrived (each datagram's lines), or panics.
fn wait_notify(sock: &std::os::unix::net::UnixDatagram, want: &str, seen: &mut Vec<String>, who: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = [0u8; 4096];
    while !seen.iter().any(|l| l == want) {
        assert!(Instant::now() < deadline, "no {want} from the service; got {seen:?}; its log:\n{}", who.log_text());
        if let Ok(n) = sock.recv(&mut buf) {
            seen.extend(String::from_utf8_lossy(&buf[..n]).lines().map(String::from));
        }
    }
}

/// Runs `args` of `metroblk` as systemd would under `Type=notify` with `WatchdogSec=0.6`, and
/// checks READY, two watchdog feeds, then STOPPING after SIGTERM and a clean exit.
fn check_notify(dir: &Path, args: &[&str], what: &str) {
    let path = dir.join(format!("{what}.notify"));
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let log = dir.join(format!("{what}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(metroblk_bin())
        .args(args)
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "600000")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut p = Proc { child, log };
    let mut seen = Vec::new();
    wait_notify(&sock, "READY=1", &mut seen, &p);
    let ready_at = seen.len();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen[ready_at..].iter().filter(|l| *l == "WATCHDOG=1").count() < 2 {
        assert!(Instant::now() < deadline, "{what}: the watchdog was not fed twice after READY: {seen:?}");
        let mut more = Vec::new();
        let mut buf = [0u8; 4096];
        if let Ok(n) = sock.recv(&mut buf) {
            more.extend(String::from_utf8_lossy(&buf[..n]).lines().map(String::from));
        }
        seen.extend(more);
    }
    assert!(!seen.iter().any(|l| l == "STOPPING=1"), "{what}: STOPPING before SIGTERM: {seen:?}");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) }, 0);
    wait_notify(&sock, "STOPPING=1", &mut seen, &p);
    let status = p.child.wait().unwrap();
    assert!(status.success(), "{what} exited with {status} after SIGTERM; log:\n{}", p.log_text());
}

#[test]
fn a_node_and_the_witness_notify_ready_feed_the_watchdog_and_notify_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pair = metroblk_tests::cluster::pair_configs(d, VOLUME);
    check_notify(d, &["node", "run", "--config", pair.beta.to_str().unwrap()], "node");
    std::fs::write(d.join("witness.key"), TEST_KEY).unwrap();
    std::fs::set_permissions(d.join("witness.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let witness_cfg = d.join("witness.toml");
    std::fs::write(
        &witness_cfg,
        format!(
            "listen = \"127.0.0.1\"\nport = {}\nauthkey_file = \"witness.key\"\nstate_file = \"witness.state\"\n",
            free_port()
        ),
    )
    .unwrap();
    check_notify(d, &["witness", "run", "--config", witness_cfg.to_str().unwrap()], "witness");
}

/// The unit files as installed, with `/usr/bin/metroblk` replaced by the binary under test and
/// the man pages they name generated from the clap definitions (on `MANPATH`).
#[test]
fn the_systemd_units_verify_clean() {
    let analyze = require("systemd-analyze", "systemd");
    require("man", "man-db");
    let dir = tempfile::tempdir().unwrap();
    let bin = metroblk_bin();
    let man = dir.path().join("man");
    let gen = Command::new(&bin).args(["generate", "man"]).arg(man.join("man1")).status().unwrap();
    assert!(gen.success());
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd");
    for (unit, as_name) in [("metroblk@.service", "metroblk@alpha.service"), ("metroblk-witness.service", "")] {
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        let name = if as_name.is_empty() { unit } else { as_name };
        std::fs::write(dir.path().join(name), text.replace("/usr/bin/metroblk", bin.to_str().unwrap())).unwrap();
        let out =
            Command::new(&analyze).arg("verify").arg(dir.path().join(name)).env("MANPATH", &man).output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {unit}: {said}");
    }
}

/// `scripts/deb.sh` (with the binary under test): the package holds what it should, lintian
/// finds nothing wrong with it, and its binary runs.
#[test]
fn the_debian_package_holds_the_binary_units_configs_man_pages_and_completions() {
    require("dpkg-shlibdeps", "dpkg-dev");
    let lintian = require("lintian", "lintian");
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/deb.sh"))
        .arg("--bin")
        .arg(metroblk_bin())
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "scripts/deb.sh: {}", String::from_utf8_lossy(&out.stderr));
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
    assert!(deb.is_file(), "{} is not the package", deb.display());

    let list = Command::new("dpkg-deb").arg("-c").arg(&deb).output().unwrap();
    assert!(list.status.success());
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    let files: Vec<(&str, &str)> = list
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((*f.get(1)?, *f.last()?))
        })
        .collect();
    for want in [
        "./usr/bin/metroblk",
        "./lib/systemd/system/metroblk@.service",
        "./lib/systemd/system/metroblk-witness.service",
        "./usr/share/doc/metroblk/examples/node.toml",
        "./usr/share/doc/metroblk/examples/witness.toml",
        "./usr/share/doc/metroblk/copyright",
        "./usr/share/doc/metroblk/changelog.gz",
        "./usr/share/man/man1/metroblk.1.gz",
        "./usr/share/man/man1/metroblk-events.1.gz",
        "./usr/share/man/man1/metroblk-node-run.1.gz",
        "./usr/share/man/man1/metroblk-witness-run.1.gz",
        "./usr/share/bash-completion/completions/metroblk",
        "./usr/share/zsh/vendor-completions/_metroblk",
        "./usr/share/fish/vendor_completions.d/metroblk.fish",
    ] {
        assert!(files.iter().any(|(_, p)| *p == want), "{want} missing from the package:\n{list}");
    }
    assert!(files.iter().all(|(owner, _)| *owner == "root/root"), "files not owned by root:\n{list}");
    assert!(!list.contains("generate"), "the hidden generate command got a man page:\n{list}");
    let expected = [
        "./usr/bin/metroblk",
        "./lib/systemd/system/",
        "./usr/share/doc/metroblk/",
        "./usr/share/man/man1/metroblk",
        "./usr/share/bash-completion/",
        "./usr/share/zsh/",
        "./usr/share/fish/",
    ];
    for (_, p) in files.iter().filter(|(_, p)| !p.ends_with('/')) {
        assert!(expected.iter().any(|e| p.starts_with(e)), "unexpected file {p} in the package:\n{list}");
    }
    let info = Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends").output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("libc6"), "Depends lacks libc6");
    let lint = Command::new(&lintian).arg(&deb).output().unwrap();
    let said = String::from_utf8_lossy(&lint.stdout).to_string();
    let complaints: Vec<&str> = said.lines().filter(|l| l.starts_with("E:") || l.starts_with("W:")).collect();
    assert!(lint.status.success() && complaints.is_empty(), "lintian: {said}{}", String::from_utf8_lossy(&lint.stderr));

    // The packaged (stripped) binary runs, and its examples parse.
    let x = dir.path().join("x");
    assert!(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x).status().unwrap().success());
    let v = Command::new(x.join("usr/bin/metroblk")).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("metroblk "), "{v:?}");
    let ex = x.join("usr/share/doc/metroblk/examples");
    let node = std::fs::read_to_string(ex.join("node.toml")).unwrap();
    NodeConfig::parse_with(&ex.join("node.toml"), &node, metroblk::config::Keys::Skip).unwrap();
    let witness = std::fs::read_to_string(ex.join("witness.toml")).unwrap();
    metroblk_witness::config::WitnessConfig::parse(&ex.join("witness.toml"), &witness).unwrap();
}

/// `metroblk events` on the secondary of a pair with a witness, through the device in the VM
/// (or natively where ublk works): a partition (the inter-site link cut while alpha writes),
/// the resync once it heals (rate-limited so that it lasts), then alpha's site lost and beta
/// promoted. The stream shows them in that order, and the `on_event` hook saw them.
const EVENTS: &str = r#"
printf '#!/bin/sh\necho "$METROBLK_VOLUME $METROBLK_EVENT $METROBLK_OLD -> $METROBLK_NEW" >> %s\n' "$W/hook.txt" > "$W/hook.sh"
sed -i "/^\[node\]/a on_event = \"sh $W/hook.sh\"" "$W/beta.toml"
start_all
"$BIN" events --config "$W/beta.toml" > "$W/events.txt" 2> "$W/events.log" &
EPID=$!
wait_for 30 "the first events" grep -q ' vol0 exists ' "$W/events.txt"
step "events: $(head -n 1 "$W/events.txt")"
cut_link sa ab
step "inter-site link cut"
# Writes while apart: held until the witness outdates beta, then alpha goes on alone.
dd if=/dev/urandom of="$DEV_A" bs=1M count=8 oflag=direct status=none &
DD=$!
wait_for 60 "alpha to go on alone" field_is alpha alone true
wait "$DD"
heal_link sa ab
wait_for 120 "the resync" in_sync_as alpha beta
step "healed and resynced"
kill9 alpha; cut_link sa ab; cut_link sa aw
wait_for 60 "beta to be promoted" promoted beta
step "site A lost, beta promoted"
sleep 1
kill "$EPID"; wait "$EPID" || true
cat "$W/events.txt"
STAGE=$(awk '
    stage == 0 && / vol0 link connected -> / { stage = 1; next }
    stage == 1 && / vol0 sync [^ ]+ -> sync-target/ { stage = 2; next }
    stage == 2 && / vol0 sync sync-target -> in-sync/ { stage = 3; next }
    stage == 3 && / vol0 role secondary -> primary/ { stage = 4 }
    END { print stage }' "$W/events.txt")
[ "$STAGE" = 4 ] || { echo "events out of order: stage $STAGE"; exit 1; }
step "events in order: partition, resync, failover"
grep -q ' vol0 resync - -> receiving' "$W/events.txt"
grep -q '^vol0 role secondary -> primary$' "$W/hook.txt"
grep -q '^vol0 link connected -> ' "$W/hook.txt"
step "the hook saw the partition and the failover"
stop beta
step "all good"
"#;

#[test]
fn events_show_a_partition_a_resync_and_a_failover_in_order() {
    use metroblk_tests::ublk_script::{self, Opts, SITE_HELPERS};
    let body = format!("{SITE_HELPERS}\n{EVENTS}");
    ublk_script::run(
        &body,
        &Opts { sites: true, alpha_extra: "resync_rate = \"2MiB\"", lease_ms: 2000, ..Opts::default() },
        &[
            "events:",
            "inter-site link cut",
            "healed and resynced",
            "beta promoted",
            "events in order",
            "the hook saw",
            "all good",
        ],
    );
}

/// `metroblk events --json` against a real node, natively: the state at start, then the node
/// going away is one event, which the `on_event` hook receives in its environment.
#[test]
fn events_json_reports_the_state_then_the_node_going_away_and_runs_the_hook() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pair = metroblk_tests::cluster::pair_configs(d, VOLUME);
    let hook_out = d.join("hook.out");
    add_to_node(
        &pair.beta,
        &format!("on_event = \"echo \\\"$METROBLK_EVENT $METROBLK_NEW\\\" >> {}\"", hook_out.display()),
    );
    let mut beta = NodeProcess::start(&pair.beta);
    beta.wait_ready(Duration::from_secs(10));
    let log = d.join("events.log");
    let child = Command::new(metroblk_bin())
        .args(["events", "--json", "--config"])
        .arg(&pair.beta)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Killed on drop, however the test ends.
    let mut events = Proc { child, log };
    let mut lines = std::io::BufReader::new(events.child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!((first["node"].as_str(), first["volume"].as_str()), (Some("beta"), Some("vol0")));
    assert_eq!(first["event"], "exists");
    let state = first["new"].as_str().unwrap();
    assert!(state.contains("role=secondary") && state.contains("link=connecting"), "{state}");
    beta.kill9();
    let next: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!((next["volume"].as_str(), next["event"].as_str()), (Some("-"), Some("node")));
    assert_eq!(next["old"], "reachable");
    assert!(next["new"].as_str().unwrap().starts_with("unreachable"), "{next}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&hook_out).unwrap_or_default().starts_with("node unreachable") {
        assert!(Instant::now() < deadline, "the hook did not run: {:?}", std::fs::read_to_string(&hook_out));
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(events);
}
