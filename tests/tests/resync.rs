//! Resync as users meet it: a partition healed, a primary killed during writes, a resync cut
//! short twice, writes hammering the regions being copied, a split brain resolved by an
//! operator. The primary is the engine in this process (or a `write_load` process to kill);
//! the secondary is a real `metroblk node run`. Each test ends with byte-identical backing
//! files, and checks that only dirty regions were copied.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use metroblk::config::NodeConfig;
use metroblk::resync::SyncState;
use metroblk_tests::cluster::{metroblk_bin, site_pair_configs, wait_until, NodeProcess};
use metroblk_tests::netns::Sites;
use metroblk_tests::writer::TestPrimary;

const VOLUME: u64 = 64 << 20;
const REGION: u64 = 64 << 10;
const LONG: Duration = Duration::from_secs(60);

struct Pair {
    dir: tempfile::TempDir,
    alpha: PathBuf,
    beta: PathBuf,
}

/// Configs of alpha (primary, going on alone when it loses beta) and beta (secondary);
/// `ips`: listen on these addresses (site A, site B) instead of loopback.
fn pair(alpha_extra: &str, beta_extra: &str, ips: Option<(&str, &str)>) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let c = site_pair_configs(dir.path(), VOLUME, alpha_extra, beta_extra, ips);
    Pair { dir, alpha: c.alpha, beta: c.beta }
}

fn volume_cfg(path: &Path) -> (metroblk::config::VolumeConfig, String) {
    let c = NodeConfig::load(path).unwrap();
    (c.volumes[0].clone(), c.name)
}

fn assert_identical(dir: &Path) {
    let a = std::fs::read(dir.join("alpha-vol0.img")).unwrap();
    let b = std::fs::read(dir.join("beta-vol0.img")).unwrap();
    assert_eq!(a.len(), b.len());
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("the copies differ first at byte {i} (region {})", i as u64 / REGION);
    }
}

fn sync_state(p: &TestPrimary) -> SyncState {
    p.vol.shared.sync.info().state
}

/// Polls the primary until its sync link reports in sync and the secondary is up to date.
fn wait_in_sync(p: &mut TestPrimary, beta: &NodeProcess, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        p.poll();
        let s = beta.status_json();
        let v = &s["volumes"][0];
        if sync_state(p) == SyncState::InSync
            && v["disk_state"] == "up-to-date"
            && v["sync_state"] == "in-sync"
            && !p.vol.shared.intent.resync_needed()
            && !p.vol.shared.intent.is_alone()
        {
            return;
        }
        if Instant::now() > deadline {
            let log = beta.log_text();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "not in sync after {timeout:?}: primary {:?}, secondary {}\nsecondary log (last lines first):\n{}",
                p.vol.shared.sync.info(),
                v,
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn resynced_bytes(p: &TestPrimary) -> u64 {
    p.vol.shared.sync.bytes_resynced.load(std::sync::atomic::Ordering::Relaxed)
}

/// Starts beta, opens alpha's engine in this process, and waits until they are in sync.
fn start_in_sync(p: &Pair) -> (NodeProcess, TestPrimary) {
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    let (cfg, name) = volume_cfg(&p.alpha);
    let mut a = TestPrimary::open(&cfg, &name, 16, 1);
    a.wait_link(Duration::from_secs(20));
    wait_in_sync(&mut a, &beta, LONG);
    (beta, a)
}

#[test]
fn status_stops_reading_in_sync_on_both_nodes_once_the_other_is_gone() {
    let p = pair("", "", None);
    let (mut beta, mut a) = start_in_sync(&p);
    a.write_random(50, 0, VOLUME, LONG);
    wait_in_sync(&mut a, &beta, LONG);

    // The secondary dies: the primary knows nothing of its copy any more.
    beta.kill9();
    wait_until(Duration::from_secs(10), "the primary's sync state to leave in-sync", || {
        a.poll();
        sync_state(&a) == SyncState::Unknown
    });
    let info = a.vol.shared.sync.info();
    assert!(info.message.as_deref().is_some_and(|m| m.contains("sync link")), "{info:?}");

    // Back, in sync again; then the primary goes away and the secondary says so.
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    wait_in_sync(&mut a, &beta, LONG);
    drop(a);
    wait_until(Duration::from_secs(10), "the secondary's sync state to leave in-sync", || {
        beta.status_json()["volumes"][0]["sync_state"] == "unknown"
    });
    assert_identical(p.dir.path());
}

#[test]
fn writes_just_before_the_peer_is_lost_resync_their_regions_not_their_extents() {
    let p = pair("", "", None);
    let (mut beta, mut a) = start_in_sync(&p);
    let intent = a.vol.shared.intent.clone();
    let extent = metroblk::bitmap::INTENT_EXTENT_BYTES;
    wait_until(LONG, "the cleaner to clear every bit", || {
        a.poll();
        intent.on_disk_regions() == 0
    });
    // One 4 KiB write into each of 10 extents, linked and in sync: each sets its extent on disk
    // in one metadata write; a second write into each extent costs none.
    let deadline = Instant::now() + LONG;
    let writes_before = intent.stats.metadata_writes.load(std::sync::atomic::Ordering::Relaxed);
    for i in 0..10 {
        a.submit_write(i * extent + 8192, 4096, 0x5a, deadline);
        a.drain(deadline);
    }
    for i in 0..10 {
        a.submit_write(i * extent + extent / 2, 4096, 0xa5, deadline);
    }
    a.drain(deadline);
    let writes = intent.stats.metadata_writes.load(std::sync::atomic::Ordering::Relaxed) - writes_before;
    assert!(writes <= 10, "{writes} metadata writes for 20 writes into 10 extents");
    let dirty = intent.dirty_regions();
    assert!(dirty <= 20, "{dirty} regions out of sync after writes to 20");
    assert!(intent.on_disk_regions() >= dirty, "the bits on disk cover what is out of sync");
    assert!(intent.on_disk_regions() >= 640 || dirty < 20, "the extents are on disk");

    // The secondary dies and returns: only the regions written are copied, not the extents.
    beta.kill9();
    let before = resynced_bytes(&a);
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    wait_in_sync(&mut a, &beta, LONG);
    let copied = resynced_bytes(&a) - before;
    assert!(copied <= dirty * REGION, "{copied} B copied for {dirty} regions out of sync");
    a.flush(LONG);
    assert_identical(p.dir.path());
}

#[test]
fn a_partition_healed_resyncs_only_the_regions_written_while_apart() {
    let sites = Sites::create(11);
    let p = pair("fencing = \"none\"\n", "", Some((&sites.addr_a, &sites.addr_b)));
    let beta = NodeProcess::start_in(Some(&sites.b), &p.beta);
    let mut beta = beta;
    beta.wait_ready(Duration::from_secs(10));
    // This thread (and the engine's threads it starts) live in site A.
    sites.enter_a();
    let (cfg, name) = volume_cfg(&p.alpha);
    let mut a = TestPrimary::open(&cfg, &name, 16, 1);
    a.wait_link(Duration::from_secs(20));
    a.write_random(500, 0, VOLUME, LONG);
    a.flush(LONG);
    wait_in_sync(&mut a, &beta, LONG);
    // Cold and on both nodes: the cleaner clears the bits of those writes (lazily, within a
    // couple of its 5 s periods) and writes the cleared blocks.
    assert!(a.vol.shared.intent.dirty_regions() > 300);
    wait_until(Duration::from_secs(30), "the cleaner to clear the bits of cold regions", || {
        a.poll();
        a.vol.shared.intent.dirty_regions() == 0
    });

    sites.cut();
    // Apart: the first writes wait until the primary declares the peer lost, then every
    // write completes alone. Only the first 8 MiB are written.
    a.write_random(400, 0, 8 << 20, LONG);
    a.flush(LONG);
    assert!(a.vol.shared.intent.is_alone(), "the primary did not go on alone");
    let dirty = a.vol.shared.intent.dirty_regions();
    // A write that starts a region right after a written one also sets the next few
    // (readahead for sequential writers): at most that many past the written ones.
    let dirty_max = 128 + metroblk::bitmap::READAHEAD_REGIONS;
    assert!(dirty > 0 && dirty <= dirty_max, "{dirty} dirty regions for writes to 128 regions");
    let before = resynced_bytes(&a);

    sites.heal();
    wait_in_sync(&mut a, &beta, LONG);
    a.wait_link(LONG);
    a.flush(LONG);
    let copied = resynced_bytes(&a) - before;
    assert!(copied > 0, "nothing was resynced");
    assert!(copied <= dirty * REGION, "resynced {copied} B, more than the {dirty} dirty regions");
    assert!(copied < VOLUME / 4, "resynced {copied} B of a {VOLUME} B volume");
    if a.vol.shared.intent.is_alone() {
        let log = beta.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "still alone after the resync: primary {:?}, {} link losses, queue reconnects {}\nsecondary log (last lines first):\n{}",
            a.vol.shared.sync.info(),
            a.vol.shared.intent.link_losses(),
            a.vol.shared.queue_stats[0].reconnects.load(std::sync::atomic::Ordering::Relaxed),
            tail.join("\n")
        );
    }
    assert_identical(p.dir.path());
}

#[test]
fn a_primary_killed_during_writes_resyncs_every_region_marked_at_the_crash() {
    let p = pair("", "", None);
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    let load_bin = PathBuf::from(env!("CARGO_BIN_EXE_write_load"));
    let mut load = Command::new(load_bin).arg(&p.alpha).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut out = load.stdout.take().unwrap();
    let mut line = [0u8; 8];
    std::io::Read::read_exact(&mut out, &mut line).expect("the load process did not start writing");
    std::thread::sleep(Duration::from_millis(1500));
    load.kill().unwrap(); // SIGKILL, with writes in flight on both sides
    load.wait().unwrap();

    let (cfg, name) = volume_cfg(&p.alpha);
    let mut a = TestPrimary::open(&cfg, &name, 16, 2);
    let dirty = a.vol.shared.intent.dirty_regions();
    assert!(dirty > 0, "no region was marked at the crash");
    assert!(a.vol.shared.intent.resync_needed());
    wait_in_sync(&mut a, &beta, LONG);
    let copied = resynced_bytes(&a);
    assert!(copied > 0 && copied <= dirty * REGION, "resynced {copied} B for {dirty} marked regions");
    a.flush(LONG);
    assert_identical(p.dir.path());
}

/// Writes one full region in each of `regions` regions while the secondary is down.
fn dirty_regions_alone(a: &mut TestPrimary, regions: u64) {
    let deadline = Instant::now() + LONG;
    for r in 0..regions {
        a.submit_write(r * 2 * REGION, REGION as u32, (r % 251) as u8 + 1, deadline);
    }
    a.drain(deadline);
    a.flush(LONG);
    assert!(a.vol.shared.intent.is_alone());
}

#[test]
fn a_resync_cut_twice_resumes_and_the_target_cannot_be_primary_meanwhile() {
    let sites = Sites::create(12);
    let p = pair("fencing = \"none\"\nresync_rate = \"6MiB\"\n", "", Some((&sites.addr_a, &sites.addr_b)));
    sites.enter_a();
    let (cfg, name) = volume_cfg(&p.alpha);
    let mut a = TestPrimary::open(&cfg, &name, 16, 3);
    // No secondary yet: the primary goes on alone.
    dirty_regions_alone(&mut a, 400); // 25 MiB dirty: about 4 s at 6 MiB/s
    let dirty_bytes = a.vol.shared.intent.dirty_regions() * REGION;
    assert_eq!(dirty_bytes, 400 * REGION);

    let beta_as_primary = p.dir.path().join("beta-as-primary.toml");
    let text = std::fs::read_to_string(&p.beta).unwrap().replace("role = \"secondary\"", "role = \"primary\"");
    std::fs::write(&beta_as_primary, text).unwrap();
    let mut beta = NodeProcess::start_in(Some(&sites.b), &p.beta);
    beta.wait_ready(Duration::from_secs(10));
    for cut in 0..2u64 {
        wait_until(LONG, "the resync to be under way", || {
            a.poll();
            beta.status_json()["volumes"][0]["disk_state"] == "inconsistent"
                && resynced_bytes(&a) > (cut + 1) * (4 << 20)
        });
        sites.cut();
        wait_until(LONG, "the primary to see its sync link end", || {
            a.poll();
            a.vol.shared.sync.info().message.is_some()
        });
        // The target, inconsistent, refuses to serve as primary.
        let out =
            Command::new(metroblk_bin()).args(["node", "run", "--config"]).arg(&beta_as_primary).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "an inconsistent copy started as primary");
        assert!(err.contains("copy is inconsistent") && err.trim().lines().count() == 1, "{err}");
        sites.heal();
    }
    wait_in_sync(&mut a, &beta, Duration::from_secs(120));
    let copied = resynced_bytes(&a);
    // Resumed, not restarted: each cut costs at most what was not yet flushed on the target.
    let slack = 2 * (metroblk::resync::copy::BYTES_PER_FLUSH_MAX + 32 * REGION);
    assert!(copied >= dirty_bytes && copied <= dirty_bytes + slack, "copied {copied} B for {dirty_bytes} B dirty");
    a.flush(LONG);
    assert_identical(p.dir.path());
}

#[test]
fn writes_hammering_the_regions_being_copied_leave_identical_copies() {
    let p = pair("fencing = \"none\"\nresync_rate = \"10MiB\"\n", "", None);
    let (cfg, name) = volume_cfg(&p.alpha);
    let mut a = TestPrimary::open(&cfg, &name, 16, 4);
    dirty_regions_alone(&mut a, 256);
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    // While the copy runs, write into the very regions being copied (every other region
    // from 0 to 512 is dirty).
    let deadline = Instant::now() + LONG;
    let mut rounds = 0;
    while sync_state(&a) != SyncState::InSync || rounds < 3 {
        assert!(Instant::now() < deadline, "the resync did not finish under load");
        a.write_random(200, 0, 512 * REGION, LONG);
        rounds += 1;
    }
    assert!(a.vol.shared.conflicts.granule_size() > 0);
    wait_in_sync(&mut a, &beta, LONG);
    a.flush(LONG);
    assert_identical(p.dir.path());
}

#[test]
fn a_split_brain_is_refused_until_discard_local_resolves_it_with_a_bitmap_resync() {
    let p = pair("fencing = \"none\"\n", "", None);
    // alpha goes on alone (beta is down) and writes regions 0..64.
    {
        let (cfg, name) = volume_cfg(&p.alpha);
        let mut a = TestPrimary::open(&cfg, &name, 16, 5);
        dirty_regions_alone(&mut a, 32);
    }
    // beta is made primary while alpha is down, and writes regions 100..164 alone.
    let beta_primary = p.dir.path().join("beta-primary.toml");
    let text = std::fs::read_to_string(&p.beta)
        .unwrap()
        .replace("role = \"secondary\"", "role = \"primary\"\nfencing = \"none\"");
    std::fs::write(&beta_primary, text).unwrap();
    {
        let (cfg, name) = volume_cfg(&beta_primary);
        let mut b = TestPrimary::open(&cfg, &name, 16, 6);
        let deadline = Instant::now() + LONG;
        for r in 0..32 {
            b.submit_write((100 + r * 2) * REGION, REGION as u32, 0xEE, deadline);
        }
        b.drain(deadline);
        b.flush(LONG);
        assert!(b.vol.shared.intent.is_alone());
    }
    // Both back in their roles: the generations diverged.
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    let (cfg, name) = volume_cfg(&p.alpha);
    let mut a = TestPrimary::open(&cfg, &name, 16, 7);
    wait_until(LONG, "both nodes to report the split brain", || {
        a.poll();
        sync_state(&a) == SyncState::SplitBrain && beta.status_json()["volumes"][0]["sync_state"] == "split-brain"
    });
    let status = Command::new(metroblk_bin()).args(["status", "--config"]).arg(&p.beta).output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("split-brain") && text.contains("--discard-local"), "{text}");
    for _ in 0..20 {
        a.poll();
    }
    assert!(!a.drv.queue().link_is_up(), "a data link joined split-brain copies");

    let out = Command::new(metroblk_bin())
        .args(["resync", "--config"])
        .arg(&p.beta)
        .args(["vol0", "--discard-local"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_in_sync(&mut a, &beta, LONG);
    let copied = resynced_bytes(&a);
    // The union of both sides' changes (64 regions), not the volume.
    assert_eq!(copied, 64 * REGION, "a bitmap-based resync copies both sides' changed regions");
    a.flush(LONG);
    assert_identical(p.dir.path());
    let data = std::fs::read(p.dir.path().join("beta-vol0.img")).unwrap();
    assert_eq!(data[(100 * REGION) as usize], 0, "beta's own change survived --discard-local");
}

/// Writes through the primary, waits until the copies are in sync and the cleaner cleared
/// every bit, then stops the secondary and changes `regions` of its file behind its back.
fn in_sync_then_tamper(p: &Pair, a: &mut TestPrimary, beta: &mut NodeProcess, regions: &[u64]) {
    beta.wait_ready(Duration::from_secs(10));
    a.wait_link(Duration::from_secs(20));
    a.write_random(300, 0, VOLUME, LONG);
    a.flush(LONG);
    wait_in_sync(a, beta, LONG);
    wait_until(Duration::from_secs(30), "the cleaner to clear every bit", || {
        a.poll();
        a.vol.shared.intent.dirty_regions() == 0
    });
    beta.kill9();
    let f = std::fs::OpenOptions::new().write(true).open(p.dir.path().join("beta-vol0.img")).unwrap();
    for &r in regions {
        std::os::unix::fs::FileExt::write_all_at(&f, b"changed behind the daemon's back", r * REGION + 1000).unwrap();
    }
}

#[test]
fn verify_finds_regions_changed_behind_the_daemons_back_and_a_resync_repairs_them() {
    let p = pair("", "", None);
    let mut beta = NodeProcess::start(&p.beta);
    let (cfg, name) = volume_cfg(&p.alpha);
    let mut a = TestPrimary::open(&cfg, &name, 16, 8);
    in_sync_then_tamper(&p, &mut a, &mut beta, &[5, 77, 1000]);
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    wait_in_sync(&mut a, &beta, LONG);
    a.wait_link(LONG);
    let before = resynced_bytes(&a);
    a.vol.shared.sync.verify_requested.store(true, std::sync::atomic::Ordering::Release);
    wait_until(LONG, "the verify to finish", || {
        a.poll();
        a.vol.shared.sync.info().verify.is_some_and(|v| v.done)
    });
    let v = a.vol.shared.sync.info().verify.unwrap();
    assert_eq!(v.regions_checked, VOLUME / REGION);
    assert_eq!(v.regions_differing, 3, "{v:?}");
    wait_in_sync(&mut a, &beta, LONG);
    assert_eq!(resynced_bytes(&a) - before, 3 * REGION, "the resync copies the three regions");
    a.flush(LONG);
    assert_identical(p.dir.path());
}

#[test]
fn a_checksum_resync_sends_only_the_regions_whose_hashes_differ() {
    let p = pair("", "", None);
    let mut beta = NodeProcess::start(&p.beta);
    let (cfg, name) = volume_cfg(&p.alpha);
    let mut a = TestPrimary::open(&cfg, &name, 16, 9);
    in_sync_then_tamper(&p, &mut a, &mut beta, &[12, 700]);
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    wait_in_sync(&mut a, &beta, LONG);
    let before = resynced_bytes(&a);
    let sync = &a.vol.shared.sync;
    sync.request(metroblk::resync::Requested { full: true, checksum: true });
    sync.restart.store(true, std::sync::atomic::Ordering::Release);
    // Until the 2 regions are resent (the state may read in-sync before the exchange starts).
    wait_until(LONG, "the checksum resync to resend the changed regions", || {
        a.poll();
        !a.vol.shared.sync.is_pending() && resynced_bytes(&a) - before >= 2 * REGION
    });
    wait_in_sync(&mut a, &beta, LONG);
    assert_eq!(
        resynced_bytes(&a) - before,
        2 * REGION,
        "a full checksum resync sends only the 2 changed regions; primary {:?}, secondary log:\n{}",
        a.vol.shared.sync.info(),
        beta.log_text()
    );
    a.flush(LONG);
    assert_identical(p.dir.path());
}

#[test]
fn a_replaced_disk_is_attached_and_resynced_in_full() {
    let p = pair("", "", None);
    let mut beta = NodeProcess::start(&p.beta);
    let (cfg, name) = volume_cfg(&p.alpha);
    let mut a = TestPrimary::open(&cfg, &name, 16, 10);
    in_sync_then_tamper(&p, &mut a, &mut beta, &[]);
    let attach = |expect_ok: bool| {
        let out = Command::new(metroblk_bin()).args(["attach", "--config"]).arg(&p.beta).arg("vol0").output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.success(), expect_ok, "{text}");
        text
    };
    // The disk is replaced: a new, empty backing file.
    let img = p.dir.path().join("beta-vol0.img");
    std::fs::remove_file(&img).unwrap();
    std::fs::File::create(&img).unwrap().set_len(VOLUME).unwrap();
    let text = attach(true);
    assert!(text.contains("inconsistent until a full resync"), "{text}");
    // Read before the secondary starts: its resync may begin before `wait_ready` returns.
    let before = resynced_bytes(&a);
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    assert!(attach(false).contains("is running"), "attach must refuse a running node");
    wait_in_sync(&mut a, &beta, LONG);
    assert_eq!(resynced_bytes(&a) - before, VOLUME, "an attached disk is resynced in full");
    a.flush(LONG);
    assert_identical(p.dir.path());
}

#[test]
fn a_full_resync_sends_what_reads_as_zeros_as_ranges_and_leaves_the_secondary_sparse() {
    let p = pair("", "", None);
    let mut beta = NodeProcess::start(&p.beta);
    let (cfg, name) = volume_cfg(&p.alpha);
    let mut a = TestPrimary::open(&cfg, &name, 16, 12);
    beta.wait_ready(Duration::from_secs(10));
    a.wait_link(Duration::from_secs(20));
    // Data in the first 4 MiB only, and 1 MiB of zeros written at 32 MiB (allocated zeros,
    // not a hole); the rest of the volume was never written (a hole on both nodes).
    a.write_random(200, 0, 4 << 20, LONG);
    let deadline = Instant::now() + LONG;
    for i in 0..16u64 {
        a.submit_write((32 << 20) + i * (64 << 10), 64 << 10, 0, deadline);
    }
    a.flush(LONG);
    wait_in_sync(&mut a, &beta, LONG);
    beta.kill9();
    // The secondary's disk is replaced by one full of old data: every byte must be rewritten,
    // the zeros included.
    let img = p.dir.path().join("beta-vol0.img");
    std::fs::write(&img, vec![0xa5u8; VOLUME as usize]).unwrap();
    let (ok, text) = cli(&["attach", "vol0"], &p.beta);
    assert!(ok, "{text}");
    // Read before the secondary starts: its resync may begin before `wait_ready` returns (CI
    // once counted 59 of the 64 MiB when these were read after it).
    let (before, zeros_before) = (resynced_bytes(&a), resynced_zero_bytes(&a));
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    wait_in_sync(&mut a, &beta, LONG);
    assert_eq!(resynced_bytes(&a) - before, VOLUME, "an attached disk is resynced in full");
    let zeros = resynced_zero_bytes(&a) - zeros_before;
    assert!(
        (VOLUME - (4 << 20)..VOLUME).contains(&zeros),
        "{zeros} B went as zero ranges: everything but the written first 4 MiB should"
    );
    a.flush(LONG);
    assert_identical(p.dir.path());
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&img).unwrap()) * 512;
    assert!(
        allocated <= 8 << 20,
        "the secondary's file has {allocated} B allocated after the resync: the zeros were written, not punched"
    );
}

fn resynced_zero_bytes(p: &TestPrimary) -> u64 {
    p.vol.shared.sync.bytes_resynced_as_zeros.load(std::sync::atomic::Ordering::Relaxed)
}

/// Serves the control socket of alpha's config for the in-process primary, so the operator
/// commands (`status`, `resume-alone`, `resync`, `verify`) run as real processes against it.
fn serve_control(config: &Path, a: &TestPrimary) {
    let cfg = NodeConfig::load(config).unwrap();
    let handle = metroblk::lifecycle::runner::VolumeHandle {
        shared: a.vol.shared.clone(),
        role: metroblk::config::Role::Primary,
        handoffs: a.vol.handoffs().to_vec(),
        ublk_device: None,
    };
    metroblk::control::serve(
        &cfg.control_socket,
        cfg.name.clone(),
        std::sync::Arc::new(vec![metroblk::lifecycle::runner::VolumeSlot::serving(handle)]),
    )
    .unwrap();
}

fn cli(args: &[&str], config: &Path) -> (bool, String) {
    let out = Command::new(metroblk_bin()).arg(args[0]).arg("--config").arg(config).args(&args[1..]).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A pair with default configs, beta a process, alpha a `TestPrimary` serving its control
/// socket (so the CLI can drive it), linked and in sync after `writes` random 4 KiB writes.
fn in_sync_with_control(writes: u64) -> (Pair, NodeProcess, TestPrimary) {
    let p = pair("", "", None);
    let mut beta = NodeProcess::start(&p.beta);
    beta.wait_ready(Duration::from_secs(10));
    let (cfg, name) = volume_cfg(&p.alpha);
    let mut a = TestPrimary::open(&cfg, &name, 16, 11);
    serve_control(&p.alpha, &a);
    a.wait_link(Duration::from_secs(20));
    a.write_random(writes, 0, VOLUME, LONG);
    wait_in_sync(&mut a, &beta, LONG);
    (p, beta, a)
}

#[test]
fn an_operator_lets_a_holding_primary_go_on_alone_then_resyncs_and_verifies_from_the_cli() {
    let (p, mut beta, mut a) = in_sync_with_control(100); // fencing = "hold", the default

    beta.kill9();
    let done_before = a.completed;
    a.submit_write(3 * REGION, 4096, 0x77, Instant::now() + LONG);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(7) {
        a.poll();
    }
    assert_eq!(a.completed, done_before, "a write completed without the peer under fencing = hold");
    let (ok, status) = cli(&["status", "--json"], &p.alpha);
    assert!(ok && status.contains("\"requests_held\": 1"), "{status}");

    let (ok, text) = cli(&["resume-alone", "vol0"], &p.alpha);
    assert!(ok && text.contains("going on alone"), "{text}");
    a.drain(Instant::now() + Duration::from_secs(10));
    assert!(a.vol.shared.intent.is_alone());

    let _beta = NodeProcess::start(&p.beta);
    let (ok, text) = cli(&["resync", "vol0", "--wait"], &p.alpha);
    assert!(ok && text.contains("in sync"), "{text}");
    a.wait_link(LONG);
    let (ok, text) = cli(&["verify", "vol0"], &p.alpha);
    assert!(ok && text.contains("regions checked, 0 differ"), "{text}");
    let (ok, text) = cli(&["resync", "vol0", "--full", "--checksum", "--wait"], &p.alpha);
    assert!(ok && text.contains("in sync"), "{text}");
    let (ok, text) = cli(&["resync", "vol0", "--checksum"], &p.beta);
    assert!(!ok && text.contains("run resync --checksum on the primary"), "{text}");
    a.flush(LONG);
    assert_identical(p.dir.path());
}

/// Runs the CLI like `cli`, but fails the test if it has not returned within `limit`.
fn cli_within(args: &[&str], config: &Path, limit: Duration) -> (bool, String) {
    let mut child = Command::new(metroblk_bin())
        .arg(args[0])
        .arg("--config")
        .arg(config)
        .args(&args[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("`metroblk {}` did not return within {limit:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn verify_from_the_cli_returns_when_the_whole_verify_runs_between_two_of_its_polls() {
    // A small, almost empty volume: its verify takes less than the CLI's 200 ms poll, so the
    // CLI never sees it running. It used to wait for that forever (CI hung here once).
    let (p, _beta, a) = in_sync_with_control(20);
    // Each run waits for a verify of its own: none takes the result of the one before.
    let mut requests = Vec::new();
    for _ in 0..3 {
        let (ok, text) = cli_within(&["verify", "vol0"], &p.alpha, Duration::from_secs(30));
        assert!(ok && text.contains("1024 regions checked, 0 differ"), "{text}");
        let vi = a.vol.shared.sync.info().verify.expect("a verify result in status");
        assert!(vi.done && !vi.failed);
        requests.push(vi.request);
    }
    assert!(requests.windows(2).all(|w| w[0] < w[1]), "each verify answered a newer request: {requests:?}");
}
