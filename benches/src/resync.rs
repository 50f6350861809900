//! The resync benchmark: how fast the copies catch up, against a plain TCP copy of the same
//! bytes in the same run.
//!
//! On files in /dev/shm (or `--dir`), a volume of `--size` (default 4 GiB):
//! 1. the primary goes on alone (no secondary yet) and writes one 64 KiB block into 1 % of the
//!    regions; the secondary starts; the time to be in sync again is measured (`dirty-1pct`);
//! 2. a full resync (`resync --full`) of the whole volume is timed (`full`);
//! 3. a plain TCP copy of the primary's file over loopback (pread, send; recv, pwrite in 64
//!    KiB pieces, one thread each side) is timed (`tcp-copy`).
//!
//! Steps 2 and 3 are repeated `--rounds` times (default 3); it prints one JSON line per run and
//! a summary: full-resync throughput over TCP-copy throughput (median, min, max; goal ≥ 0.9)
//! and the 1 % case's time against the full resync's.
//!
//! Usage: `cargo run --release -p metroblk-benches --bin resync -- [--size 4GiB] [--rounds 3] [--dir DIR]`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use metroblk::config::NodeConfig;
use metroblk::lifecycle::parts::PrimaryEngine;
use metroblk::resync::SyncState;
use metroblk::volume::{QueueDriver, ReqKind, Request};

const REGION: u64 = 64 << 10;

fn configs(dir: &Path, size: u64) -> (NodeConfig, NodeConfig) {
    let key = dir.join("bench.key");
    std::fs::write(&key, "resync-benchmark-authkey-0123456").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let port = || TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (pa, pb) = (port(), port());
    let cfg = |name: &str, peer: &str, role: &str, listen: u16, peer_port: u16| {
        let text = format!(
            "[node]\nname = \"{name}\"\ncontrol_socket = \"{name}.sock\"\n[[volume]]\nname = \"bench\"\nsize = {size}\n\
             backing_file = \"{name}.img\"\nmetadata_file = \"{name}.meta\"\nlisten = \"127.0.0.1:{listen}\"\nrole = \"{role}\"\n\
             fencing = \"none\"\n[volume.peer]\nname = \"{peer}\"\naddress = \"127.0.0.1:{peer_port}\"\nauthkey_file = \"bench.key\"\n"
        );
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        metroblk::metadata::create_md_command(&p, "bench", true).unwrap();
        NodeConfig::load(&p).unwrap()
    };
    (cfg("p", "s", "primary", pa, pb), cfg("s", "p", "secondary", pb, pa))
}

/// Waits until the primary's sync link reports in sync with `bytes` more resynced than
/// `before`; returns the time it took from `t0`.
fn wait_resynced(vol: &PrimaryEngine, drv: &mut QueueDriver, before: u64, bytes: u64, t0: Instant) -> Duration {
    let deadline = t0 + Duration::from_secs(600);
    loop {
        drv.poll(Some(Duration::from_millis(1)), |_, _| {}).unwrap();
        let done = vol.shared.sync.bytes_resynced.load(Ordering::Relaxed) - before;
        if done >= bytes && vol.shared.sync.info().state == SyncState::InSync && !vol.shared.intent.resync_needed() {
            return t0.elapsed();
        }
        assert!(Instant::now() < deadline, "resync did not finish: {:?}", vol.shared.sync.info());
    }
}

/// A plain TCP copy of `src` into `dst` over loopback; returns the time.
fn tcp_copy(src: &Path, dst: &Path, size: u64) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let dst = dst.to_path_buf();
    let t0 = Instant::now();
    let receiver = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&dst).unwrap();
        let mut buf = vec![0u8; REGION as usize];
        let mut off = 0u64;
        while off < size {
            let n = ((size - off) as usize).min(buf.len());
            s.read_exact(&mut buf[..n]).unwrap();
            f.write_all_at(&buf[..n], off).unwrap();
            off += n as u64;
        }
        s.write_all(&[1]).unwrap(); // done: the receiver wrote everything
    });
    let mut s = TcpStream::connect(addr).unwrap();
    let f = std::fs::File::open(src).unwrap();
    let mut buf = vec![0u8; REGION as usize];
    let mut off = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], off).unwrap();
        s.write_all(&buf[..n]).unwrap();
        off += n as u64;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).unwrap();
    receiver.join().unwrap();
    t0.elapsed()
}

fn main() {
    let mut size: u64 = 4 << 30;
    let mut rounds = 3usize;
    let mut dir = std::path::PathBuf::from("/dev/shm");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => size = metroblk::config::parse_size(&args.next().expect("--size SIZE")).expect("--size"),
            "--rounds" => rounds = args.next().and_then(|s| s.parse().ok()).expect("--rounds N"),
            "--dir" => dir = args.next().expect("--dir DIR").into(),
            _ => {
                eprintln!("usage: resync [--size 4GiB] [--rounds 3] [--dir DIR]");
                std::process::exit(2);
            }
        }
    }
    let tmp = tempfile::tempdir_in(&dir).expect("bench dir");
    let d = tmp.path();
    let (primary, secondary) = configs(d, size);
    // The secondary's file exists from the start (as after an earlier full sync), all zeros.
    std::fs::File::create(d.join("s.img")).unwrap().set_len(size).unwrap();
    let p = primary.volumes[0].clone();
    let vol = PrimaryEngine::open(&p, "p", 1).expect("primary");
    let mut drv = QueueDriver::new(vol.queue(0, 32)).unwrap();
    // 1 % of the regions, one 64 KiB write each, while alone.
    let regions = size / REGION;
    let dirty = (regions / 100).max(1);
    let mut buf = vec![0x5au8; REGION as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut written = 0;
    let mut busy = [false; 32];
    while written < dirty || busy.iter().any(|b| *b) {
        if written < dirty {
            if let Some(tag) = busy.iter().position(|b| !b) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let r = x % regions;
                let req = Request {
                    kind: ReqKind::Write,
                    offset: r * REGION,
                    len: REGION as u32,
                    fua: false,
                    buf: buf.as_mut_ptr(),
                };
                drv.submit(tag as u16, req).unwrap();
                busy[tag] = true;
                written += 1;
                continue;
            }
        }
        drv.poll(Some(Duration::from_millis(10)), |tag, res| {
            assert!(res >= 0);
            busy[tag as usize] = false;
        })
        .unwrap();
    }
    let dirty_bytes = vol.shared.intent.dirty_regions() * REGION;
    let t0 = Instant::now();
    let _sec =
        metroblk::lifecycle::runner::start_secondary(&secondary.volumes[0], "s", &secondary.path).expect("secondary");
    let t_dirty = wait_resynced(&vol, &mut drv, 0, dirty_bytes, t0);
    println!(
        "{}",
        serde_json::json!({"case": "dirty-1pct", "volume_bytes": size, "dirty_bytes": dirty_bytes,
            "secs": t_dirty.as_secs_f64(), "mib_per_s": dirty_bytes as f64 / (1 << 20) as f64 / t_dirty.as_secs_f64()})
    );
    // A full resync of this thin volume (99 % holes): the holes go as zero ranges
    // (`resync/zeros.rs`), not as payload.
    let (before, zeros_before) = (
        vol.shared.sync.bytes_resynced.load(Ordering::Relaxed),
        vol.shared.sync.bytes_resynced_as_zeros.load(Ordering::Relaxed),
    );
    vol.shared.sync.request(metroblk::resync::Requested { full: true, checksum: false });
    let t0 = Instant::now();
    vol.shared.sync.restart.store(true, Ordering::Release);
    let t_thin = wait_resynced(&vol, &mut drv, before, size, t0).as_secs_f64();
    let zero_bytes = vol.shared.sync.bytes_resynced_as_zeros.load(Ordering::Relaxed) - zeros_before;
    println!(
        "{}",
        serde_json::json!({"case": "full-thin", "secs": t_thin, "zero_range_bytes": zero_bytes,
            "mib_per_s": (size as f64 / (1 << 20) as f64 / t_thin).round()})
    );
    // From here every byte is data (written behind the engine's back: each full resync below
    // copies all of it anyway), so the comparison with a plain TCP copy is like for like.
    let p_img = std::fs::OpenOptions::new().write(true).open(d.join("p.img")).unwrap();
    let fill: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1).collect();
    for off in (0..size).step_by(fill.len()) {
        p_img.write_all_at(&fill[..(size - off).min(fill.len() as u64) as usize], off).unwrap();
    }
    let mut ratios = Vec::new();
    let mut t_full_min = f64::MAX;
    for round in 0..rounds {
        let before = vol.shared.sync.bytes_resynced.load(Ordering::Relaxed);
        vol.shared.sync.request(metroblk::resync::Requested { full: true, checksum: false });
        let t0 = Instant::now();
        vol.shared.sync.restart.store(true, Ordering::Release);
        let t_full = wait_resynced(&vol, &mut drv, before, size, t0).as_secs_f64();
        t_full_min = t_full_min.min(t_full);
        let full_rate = size as f64 / (1 << 20) as f64 / t_full;
        let t_tcp = tcp_copy(&d.join("p.img"), &d.join("copy.img"), size).as_secs_f64();
        let tcp_rate = size as f64 / (1 << 20) as f64 / t_tcp;
        let _ = std::fs::remove_file(d.join("copy.img"));
        println!(
            "{}",
            serde_json::json!({"case": "full", "round": round, "secs": t_full, "mib_per_s": full_rate.round()})
        );
        println!(
            "{}",
            serde_json::json!({"case": "tcp-copy", "round": round, "secs": t_tcp, "mib_per_s": tcp_rate.round()})
        );
        ratios.push(full_rate / tcp_rate);
    }
    ratios.sort_by(|a, b| a.total_cmp(b));
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    println!(
        "{}",
        serde_json::json!({"summary": "resync", "volume_bytes": size, "rounds": rounds,
            "full_resync_over_tcp_copy_median": r3(ratios[ratios.len() / 2]), "min": r3(ratios[0]),
            "max": r3(ratios[ratios.len() - 1]), "goal": 0.9,
            "dirty_1pct_secs": r3(t_dirty.as_secs_f64()), "full_secs_min": r3(t_full_min),
            "full_thin_secs": r3(t_thin), "full_thin_over_full_time": r3(t_thin / t_full_min),
            "dirty_1pct_over_full_time": r3(t_dirty.as_secs_f64() / t_full_min)})
    );
}
