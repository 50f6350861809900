//! Two real processes on 127.0.0.1: a primary driven through the engine API in this process,
//! a secondary `metroblk node run`. Checks the write path end to end against a model.

use std::path::Path;
use std::time::{Duration, Instant};

use metroblk::config::NodeConfig;
use metroblk::lifecycle::parts::PrimaryEngine;
use metroblk::volume::{QueueDriver, ReqKind, Request};
use metroblk_tests::cluster::{free_port, wait_until, write_config, NodeProcess, NodeSpec, TEST_KEY};
use rand::{Rng, SeedableRng};

const VOLUME: u64 = 64 << 20;
const MAX_IO: usize = 1 << 20;

struct Pair {
    dir: tempfile::TempDir,
    alpha: std::path::PathBuf,
    beta: std::path::PathBuf,
}

fn pair(beta_size: u64, beta_key: &str) -> Pair {
    pair_with(beta_size, beta_key, "", "")
}

/// A pair whose volume sections get `alpha_extra` and `beta_extra` (TOML lines).
fn pair_with(beta_size: u64, beta_key: &str, alpha_extra: &str, beta_extra: &str) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let alpha = write_config(
        dir.path(),
        &NodeSpec {
            name: "alpha",
            peer: "beta",
            role: "primary",
            size: VOLUME,
            listen_port: pa,
            peer_port: pb,
            key: TEST_KEY,
            extra: alpha_extra,
        },
    );
    let beta = write_config(
        dir.path(),
        &NodeSpec {
            name: "beta",
            peer: "alpha",
            role: "secondary",
            size: beta_size,
            listen_port: pb,
            peer_port: pa,
            key: beta_key,
            extra: beta_extra,
        },
    );
    Pair { dir, alpha, beta }
}

fn open_primary(p: &Pair, depth: u16) -> (PrimaryEngine, QueueDriver) {
    let cfg = NodeConfig::load(&p.alpha).unwrap();
    let vol = PrimaryEngine::open(&cfg.volumes[0], "alpha", 1).unwrap();
    let drv = QueueDriver::new(vol.queue(0, depth)).unwrap();
    (vol, drv)
}

/// Page-aligned request buffers, one per tag (O_DIRECT-safe).
struct Buffers {
    mem: Vec<u8>,
}

impl Buffers {
    fn new(depth: usize) -> Buffers {
        Buffers { mem: vec![0u8; (depth + 1) * MAX_IO] }
    }
    fn ptr(&mut self, tag: u16) -> *mut u8 {
        let base = self.mem.as_mut_ptr() as usize;
        let aligned = (base + 4095) & !4095;
        (aligned + tag as usize * MAX_IO) as *mut u8
    }
}

#[derive(Clone, Copy)]
struct Op {
    kind: ReqKind,
    offset: u64,
    len: u32,
}

/// A random mixed workload against a model of the volume. Never puts two overlapping
/// requests in flight (a block device does not order them, so the model could not either).
struct Workload {
    rng: rand::rngs::StdRng,
    model: Vec<u8>,
    inflight: Vec<Option<Op>>,
    bufs: Buffers,
    submitted: u64,
    completed: u64,
}

impl Workload {
    fn new(depth: u16, seed: u64) -> Workload {
        Workload {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            model: vec![0u8; VOLUME as usize],
            inflight: vec![None; depth as usize],
            bufs: Buffers::new(depth as usize),
            submitted: 0,
            completed: 0,
        }
    }

    fn random_len(&mut self) -> u32 {
        let sectors = match self.rng.gen_range(0..100) {
            0..=69 => self.rng.gen_range(1..=32),    // 512 B .. 16 KiB
            70..=95 => self.rng.gen_range(33..=256), // .. 128 KiB
            _ => self.rng.gen_range(257..=2048),     // .. 1 MiB
        };
        sectors * 512
    }

    fn overlaps(&self, off: u64, len: u32) -> bool {
        self.inflight
            .iter()
            .flatten()
            .any(|o| o.kind != ReqKind::Flush && off < o.offset + o.len as u64 && o.offset < off + len as u64)
    }

    /// Submits one random request on a free tag; returns false if no tag is free.
    fn submit_one(&mut self, drv: &mut QueueDriver) -> bool {
        let Some(tag) = self.inflight.iter().position(|o| o.is_none()) else { return false };
        let tag = tag as u16;
        let roll = self.rng.gen_range(0..100);
        let kind = match roll {
            0..=1 => ReqKind::Flush,
            2 => ReqKind::Discard,
            3 => ReqKind::WriteZeroes,
            _ => ReqKind::Write,
        };
        let (mut offset, mut len) = (0, 0);
        if kind != ReqKind::Flush {
            loop {
                len = self.random_len();
                offset = self.rng.gen_range(0..(VOLUME - len as u64) / 512) * 512;
                if !self.overlaps(offset, len) {
                    break;
                }
            }
        }
        let buf = self.bufs.ptr(tag);
        if kind == ReqKind::Write {
            // SAFETY: each tag owns MAX_IO bytes of `bufs`.
            let data = unsafe { std::slice::from_raw_parts_mut(buf, len as usize) };
            self.rng.fill(data);
            self.model[offset as usize..offset as usize + len as usize].copy_from_slice(data);
        } else if kind != ReqKind::Flush {
            self.model[offset as usize..offset as usize + len as usize].fill(0);
        }
        let fua = kind == ReqKind::Write && self.rng.gen_range(0..10) == 0;
        drv.submit(tag, Request { kind, offset, len, fua, buf }).expect("valid request");
        self.inflight[tag as usize] = Some(Op { kind, offset, len });
        self.submitted += 1;
        true
    }

    fn reap(&mut self, drv: &mut QueueDriver, timeout: Duration) -> usize {
        let inflight = &mut self.inflight;
        let n = drv
            .poll(Some(timeout), |tag, res| {
                let op = inflight[tag as usize].take().expect("completion for a tag in flight");
                assert!(res >= 0, "{:?} at {} len {} failed: {res}", op.kind, op.offset, op.len);
                if matches!(op.kind, ReqKind::Write) {
                    assert_eq!(res as u32, op.len);
                }
            })
            .unwrap();
        self.completed += n as u64;
        n
    }

    fn drain(&mut self, drv: &mut QueueDriver, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.inflight.iter().any(|o| o.is_some()) {
            assert!(Instant::now() < deadline, "requests still in flight after {timeout:?}");
            self.reap(drv, Duration::from_millis(50));
        }
    }

    fn flush(&mut self, drv: &mut QueueDriver) {
        self.drain(drv, Duration::from_secs(30));
        let tag = 0;
        drv.submit(tag, Request { kind: ReqKind::Flush, offset: 0, len: 0, fua: false, buf: std::ptr::null_mut() })
            .unwrap();
        self.inflight[tag as usize] = Some(Op { kind: ReqKind::Flush, offset: 0, len: 0 });
        self.drain(drv, Duration::from_secs(30));
    }
}

fn assert_file_equals_model(path: &Path, model: &[u8]) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(data.len(), model.len(), "{} has the wrong size", path.display());
    if let Some(i) = data.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{} differs from the model at byte {i} (sector {})", path.display(), i / 512);
    }
}

/// Both nodes' backing files hold exactly the model.
fn assert_both_copies_equal_model(p: &Pair, model: &[u8]) {
    assert_file_equals_model(&p.dir.path().join("alpha-vol0.img"), model);
    assert_file_equals_model(&p.dir.path().join("beta-vol0.img"), model);
}

fn wait_link(drv: &mut QueueDriver) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !drv.queue().link_is_up() {
        assert!(Instant::now() < deadline, "link did not come up");
        drv.poll(Some(Duration::from_millis(50)), |_, _| panic!("nothing submitted")).unwrap();
    }
}

#[test]
fn twenty_thousand_random_writes_are_mirrored_exactly() {
    let p = pair(VOLUME, TEST_KEY);
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    let (vol, mut drv) = open_primary(&p, 32);
    wait_link(&mut drv);
    let mut w = Workload::new(32, 1);
    while w.submitted < 20_000 {
        while w.submitted < 20_000 && w.submit_one(&mut drv) {}
        w.reap(&mut drv, Duration::from_secs(10));
    }
    w.flush(&mut drv);
    assert_eq!(w.completed, w.submitted + 1);

    let st = beta.status_json();
    let v = &st["volumes"][0];
    assert_eq!(v["role"], "secondary");
    assert_eq!(v["link_state"], "connected");
    assert!(v["local_write_requests"].as_u64().unwrap() > 15_000, "{v}");
    let peer_writes = metroblk::control::volume_status(&metroblk::lifecycle::runner::VolumeHandle {
        shared: vol.shared.clone(),
        role: metroblk::config::Role::Primary,
        handoffs: vol.handoffs().to_vec(),
        ublk_device: None,
    });
    assert_eq!(peer_writes.peer_write_requests, peer_writes.local_write_requests);
    assert_eq!(peer_writes.requests_in_flight, 0);
    assert!(peer_writes.link_rtt_us.is_some() || peer_writes.reconnects == 0);

    drop(drv);
    drop(vol);
    assert_both_copies_equal_model(&p, &w.model);
}

const NO_CHECKSUM: &str = "payload_checksum = \"none\"\n";

/// `payload_checksum = "none"` on both nodes: the primary sends its payloads unchecked, and a
/// mixed workload is mirrored exactly.
#[test]
fn writes_without_a_payload_checksum_are_mirrored_exactly() {
    let p = pair_with(VOLUME, TEST_KEY, NO_CHECKSUM, NO_CHECKSUM);
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    let (vol, mut drv) = open_primary(&p, 32);
    wait_link(&mut drv);
    let mut w = Workload::new(32, 3);
    while w.submitted < 3000 {
        while w.submitted < 3000 && w.submit_one(&mut drv) {}
        w.reap(&mut drv, Duration::from_secs(10));
    }
    w.flush(&mut drv);
    drop(drv);
    drop(vol);
    assert_both_copies_equal_model(&p, &w.model);
    drop(beta);
}

/// A secondary set to `crc32c` refuses the unchecked payloads of a primary set to `none`, in
/// one line naming the setting, and writes none of them: the writes are held. Restarted with
/// the same setting as the primary, it takes them, and the copies end identical.
#[test]
fn a_secondary_requiring_checksums_refuses_unchecked_payloads() {
    let p = pair_with(VOLUME, TEST_KEY, NO_CHECKSUM, "");
    // Both copies start equal (fresh metadata on both says so): the same pattern.
    let seed = seed_secondary_file(&p, VOLUME);
    std::fs::write(p.dir.path().join("alpha-vol0.img"), &seed).unwrap();
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    let (vol, mut drv) = open_primary(&p, 4);
    let mut w = Workload::new(4, 4);
    // The first write goes out once the data link is up; the secondary refuses its payload.
    w.model.copy_from_slice(&seed);
    while w.submit_one(&mut drv) {}
    let want = "set payload_checksum the same on both nodes";
    wait_until(Duration::from_secs(15), "the secondary to refuse the unchecked payload", || {
        w.reap(&mut drv, Duration::from_millis(20));
        beta.log_text().contains(want)
    });
    let line = beta.log_text().lines().find(|l| l.contains(want)).unwrap_or_default().to_string();
    assert!(line.contains("none") && line.contains("crc32c"), "names both settings: {line}");
    assert_eq!(w.completed, 0, "a write completed without the peer");
    drop(beta);
    assert_eq!(
        std::fs::read(p.dir.path().join("beta-vol0.img")).unwrap(),
        seed,
        "the secondary wrote a refused payload"
    );

    // The operator sets the secondary like the primary: the held writes complete.
    let text = std::fs::read_to_string(&p.beta)
        .unwrap()
        .replace("role = \"secondary\"\n", &format!("role = \"secondary\"\n{NO_CHECKSUM}"));
    std::fs::write(&p.beta, text).unwrap();
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    w.flush(&mut drv);
    drop(drv);
    drop(vol);
    assert_both_copies_equal_model(&p, &w.model);
    drop(beta);
}

#[test]
fn writes_are_held_while_the_secondary_is_dead_and_complete_after_it_returns() {
    let p = pair(VOLUME, TEST_KEY);
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    let (vol, mut drv) = open_primary(&p, 32);
    wait_link(&mut drv);
    let mut w = Workload::new(32, 2);
    // Mirrored traffic, then SIGKILL the secondary with writes in flight.
    while w.completed < 2000 {
        while w.submit_one(&mut drv) {}
        w.reap(&mut drv, Duration::from_secs(10));
    }
    while w.submit_one(&mut drv) {}
    beta.kill9();
    // Until the primary notices, acks already on the wire may still complete writes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while drv.queue().link_is_up() {
        assert!(Instant::now() < deadline, "primary did not notice the dead secondary");
        w.reap(&mut drv, Duration::from_millis(20));
        while w.submit_one(&mut drv) {}
    }
    // A write the peer acknowledged before it died still completes when its local write
    // does: wait until every request in flight is one the peer never acknowledged, or one
    // not issued yet (a write sharing a 4 KiB granule with a held one waits for it).
    let settled = |q: &metroblk::volume::Queue| q.inflight() == q.held() + q.not_issued();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !settled(drv.queue()) {
        let q = drv.queue();
        assert!(
            Instant::now() < deadline,
            "acknowledged writes did not finish locally: {} in flight, {} held, {} not issued",
            q.inflight(),
            q.held(),
            q.not_issued()
        );
        w.reap(&mut drv, Duration::from_millis(20));
    }
    // From now on nothing may complete: the peer has none of it.
    let before = w.completed;
    let down_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < down_until {
        w.reap(&mut drv, Duration::from_millis(50));
        while w.submit_one(&mut drv) {}
    }
    assert_eq!(w.completed, before, "a write completed while the secondary was down");
    let inflight = w.inflight.iter().flatten().count();
    assert!(drv.queue().held() > 0, "writes should be held");
    assert_eq!(drv.queue().inflight(), inflight);
    assert!(settled(drv.queue()), "{} in flight, {} held", drv.queue().inflight(), drv.queue().held());

    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    w.drain(&mut drv, Duration::from_secs(30));
    assert!(drv.queue().link_is_up());
    for _ in 0..500 {
        while !w.submit_one(&mut drv) {
            w.reap(&mut drv, Duration::from_secs(5));
        }
    }
    w.flush(&mut drv);
    drop(drv);
    drop(vol);
    assert_both_copies_equal_model(&p, &w.model);
    drop(beta);
}

/// Fills the secondary's file with a pattern so "untouched" can be checked.
fn seed_secondary_file(p: &Pair, size: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    std::fs::write(p.dir.path().join("beta-vol0.img"), &data).unwrap();
    data
}

fn refused_link(p: &Pair, beta_size: u64, want_primary: &str, want_secondary: &str) {
    let seed = seed_secondary_file(p, beta_size);
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    let (vol, mut drv) = open_primary(p, 4);
    // The sync link is dialled first, so it meets the refusal (and the data links wait).
    let last_error = || vol.shared.sync.info().message;
    wait_until(Duration::from_secs(10), "the primary to report the refusal", || {
        drv.poll(Some(Duration::from_millis(20)), |_, _| {}).unwrap();
        last_error().is_some_and(|e| e.contains(want_primary))
    });
    assert!(!drv.queue().link_is_up());
    let err = last_error().unwrap();
    assert!(!err.contains('\n'), "one line: {err}");
    wait_until(Duration::from_secs(5), "the secondary to log the refusal", || beta.log_text().contains(want_secondary));
    drop(drv);
    drop(vol);
    drop(beta);
    assert_eq!(std::fs::read(p.dir.path().join("beta-vol0.img")).unwrap(), seed, "secondary data changed");
}

#[test]
fn wrong_authkey_is_refused_on_both_sides() {
    let p = pair(VOLUME, "a-different-authkey-of-enough-bytes");
    refused_link(&p, VOLUME, "authentication failed", "authentication failed");
}

#[test]
fn size_mismatch_is_refused_on_both_sides() {
    let p = pair(VOLUME * 2, TEST_KEY);
    refused_link(&p, VOLUME * 2, "volume size mismatch", "volume size mismatch");
}

#[test]
fn bad_config_gives_one_clear_line_and_touches_nothing() {
    let p = pair(VOLUME, TEST_KEY);
    let text = std::fs::read_to_string(&p.beta).unwrap();
    let cases = [
        (text.replace("size = 67108864", "size = 1000"), "volume[0].size"),
        (text.replace("role = \"secondary\"", "role = \"boss\""), "unknown variant `boss`"),
        (text.replace("authkey_file = \"beta.key\"", "authkey_file = \"missing.key\""), "volume[0].peer.authkey_file"),
        (text.replace("[node]", "[node]\nflavour = 1"), "unknown field `flavour`"),
    ];
    for (bad, want) in cases {
        std::fs::write(&p.beta, &bad).unwrap();
        let out = std::process::Command::new(metroblk_tests::cluster::metroblk_bin())
            .args(["node", "run", "--config"])
            .arg(&p.beta)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(want) && err.contains("beta.toml"), "{err:?} should name the file and {want:?}");
        assert!(!p.dir.path().join("beta-vol0.img").exists(), "a bad config must not create data files");
    }
}

#[test]
fn a_standalone_volume_completes_writes_locally() {
    let p = pair(VOLUME, TEST_KEY);
    let text = std::fs::read_to_string(&p.alpha).unwrap();
    std::fs::write(&p.alpha, &text[..text.find("[volume.peer]").unwrap()]).unwrap();
    let (vol, mut drv) = open_primary(&p, 8);
    let mut w = Workload::new(8, 3);
    for _ in 0..500 {
        while !w.submit_one(&mut drv) {
            w.reap(&mut drv, Duration::from_secs(5));
        }
    }
    w.flush(&mut drv);
    let st = metroblk::control::volume_status(&metroblk::lifecycle::runner::VolumeHandle {
        shared: vol.shared.clone(),
        role: metroblk::config::Role::Primary,
        handoffs: vol.handoffs().to_vec(),
        ublk_device: None,
    });
    assert_eq!(st.link_state, metroblk::volume::stats::LinkState::Standalone);
    assert_eq!(st.peer_write_requests, 0);
    assert!(st.local_write_requests > 400);
    drop(drv);
    drop(vol);
    assert_file_equals_model(&p.dir.path().join("alpha-vol0.img"), &w.model);
    assert!(!p.dir.path().join("beta-vol0.img").exists());
}

#[test]
fn the_secondary_refuses_writes_from_a_lower_epoch() {
    let p = pair(VOLUME, TEST_KEY);
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));

    // A primary at epoch 5 writes: the secondary learns epoch 5.
    let (vol, mut drv) = open_primary(&p, 4);
    vol.shared.epoch.store(5, std::sync::atomic::Ordering::Relaxed);
    wait_link(&mut drv);
    let mut w = Workload::new(4, 4);
    for _ in 0..50 {
        while !w.submit_one(&mut drv) {
            w.reap(&mut drv, Duration::from_secs(5));
        }
    }
    w.flush(&mut drv);
    drop(drv);
    drop(vol);
    wait_until(Duration::from_secs(5), "the secondary to report epoch 5", || {
        beta.status_json()["volumes"][0]["epoch"] == 5
    });
    let before = std::fs::read(p.dir.path().join("beta-vol0.img")).unwrap();

    // A stale primary at epoch 3 (one the witness has since replaced) tries to write.
    let (vol, mut drv) = open_primary(&p, 4);
    vol.shared.epoch.store(3, std::sync::atomic::Ordering::Relaxed);
    wait_link(&mut drv);
    let mut buf = Buffers::new(1);
    let ptr = buf.ptr(0);
    // SAFETY: tag 0 owns MAX_IO bytes of `buf`.
    unsafe { std::ptr::write_bytes(ptr, 0xee, 4096) };
    drv.submit(0, Request { kind: ReqKind::Write, offset: 0, len: 4096, fua: false, buf: ptr }).unwrap();
    let h = vol.handoff(0).clone();
    let mut completed = false;
    wait_until(Duration::from_secs(10), "the primary to see the refusal", || {
        drv.poll(Some(Duration::from_millis(20)), |_, _| completed = true).unwrap();
        h.last_error().is_some_and(|e| e.contains("epoch 3 refused"))
    });
    // The write is held, not completed: the peer does not have it.
    for _ in 0..20 {
        drv.poll(Some(Duration::from_millis(20)), |_, _| completed = true).unwrap();
    }
    assert!(!completed, "a write the secondary refused was completed");
    assert_eq!(drv.queue().inflight(), 1);
    wait_until(Duration::from_secs(5), "the secondary to log the refusal", || {
        beta.log_text().contains("epoch 3 refused")
    });
    assert_eq!(
        std::fs::read(p.dir.path().join("beta-vol0.img")).unwrap(),
        before,
        "a stale write reached the secondary's data"
    );
}
