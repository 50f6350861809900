//! The pipeline benchmark: what the mirrored write path costs against its two parts.
//!
//! For random writes of 4, 64 and 128 KiB over a 1 GiB volume, at queue depth 1 and 32, on
//! files in /dev/shm and on disk (O_DIRECT), it measures in one run:
//!   local  — io_uring writes to the backing file only,
//!   echo   — a TCP echo of the same size over loopback at the same depth,
//!   mirror — the engine, with a secondary on loopback (real TCP; the secondary runs in a
//!            process of its own, this binary started again with `--secondary CONFIG`).
//! One JSON line per case, then per size and medium one line of ratios against the goals:
//! mirrored p50 at depth 1 within 15 µs of local p50 + echo p50, and mirrored IOPS at depth 32
//! at least 70 % of the smaller of local and echo.
//!
//! Usage: `cargo run --release -p metroblk-benches --bin pipeline -- [--secs N] [--disk-dir DIR]
//! [--sizes 4k,64k,128k]`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use metroblk::config::NodeConfig;
use metroblk::lifecycle::parts::PrimaryEngine;
use metroblk::volume::{QueueDriver, ReqKind, Request};

const VOLUME: u64 = 1 << 30;
/// Write sizes measured by default: a database page, and the large writes of a filesystem's
/// writeback and of a VM datastore.
const SIZES_DEFAULT: [usize; 3] = [4 << 10, 64 << 10, 128 << 10];

struct Result_ {
    case: &'static str,
    medium: &'static str,
    bs: usize,
    depth: usize,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

impl Result_ {
    fn print(&self) {
        println!(
            "{}",
            serde_json::json!({"case": self.case, "medium": self.medium, "bs": self.bs, "depth": self.depth,
                "iops": self.iops.round(), "p50_us": (self.p50_us * 10.0).round() / 10.0,
                "p99_us": (self.p99_us * 10.0).round() / 10.0})
        );
    }
}

/// Records latencies in a preallocated vector (no allocation while measuring).
struct Lat {
    ns: Vec<u32>,
}

impl Lat {
    fn new() -> Lat {
        Lat { ns: Vec::with_capacity(8 << 20) }
    }
    fn add(&mut self, d: Duration) {
        if self.ns.len() < self.ns.capacity() {
            self.ns.push(d.as_nanos().min(u32::MAX as u128) as u32);
        }
    }
    fn finish(
        mut self,
        case: &'static str,
        medium: &'static str,
        bs: usize,
        depth: usize,
        ops: u64,
        el: Duration,
    ) -> Result_ {
        self.ns.sort_unstable();
        let pct = |p: f64| {
            self.ns.get(((self.ns.len() as f64 * p) as usize).min(self.ns.len() - 1)).copied().unwrap_or(0) as f64
                / 1000.0
        };
        Result_ { case, medium, bs, depth, iops: ops as f64 / el.as_secs_f64(), p50_us: pct(0.50), p99_us: pct(0.99) }
    }
}

/// Random `bs`-aligned offsets within the first `span` bytes of the volume.
struct Rng {
    state: u64,
    span: u64,
    bs: u64,
}
impl Rng {
    fn offset(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state % (self.span / self.bs)) * self.bs
    }
}

/// One `bs` buffer per tag, 4 KiB aligned (O_DIRECT).
struct Aligned {
    mem: Vec<u8>,
    bs: usize,
}
impl Aligned {
    fn new(depth: usize, bs: usize) -> Aligned {
        Aligned { mem: vec![0xa5u8; depth * bs + 4096], bs }
    }
    fn ptr(&mut self, i: usize) -> *mut u8 {
        let base = (self.mem.as_mut_ptr() as usize + 4095) & !4095;
        (base + i * self.bs) as *mut u8
    }
}

fn open_file(path: &Path, direct: bool) -> std::fs::File {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true).create(true);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = o.open(path).expect("open bench file");
    f.set_len(VOLUME).unwrap();
    // Allocated up front, for every case alike: otherwise the first write to each tmpfs page
    // allocates and zeroes it, a cost that a case writing fresh files (each mirror run, on
    // both nodes) pays and one reusing a file (local at depth 32, after depth 1) does not.
    // SAFETY: fallocate on an open descriptor we own; no memory is passed.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, VOLUME as libc::off_t) };
    assert_eq!(r, 0, "fallocate {}: {}", path.display(), std::io::Error::last_os_error());
    f
}

/// Something that writes blocks with many in flight: the local baseline or the engine.
trait WriteTarget {
    fn submit(&mut self, tag: usize, buf: *mut u8, offset: u64, len: usize);
    /// Waits for at least one completion and appends the finished tags to `done`.
    fn reap(&mut self, done: &mut Vec<usize>);
}

/// io_uring writes straight to the file.
struct LocalWrites {
    ring: IoUring,
    file: std::fs::File,
}

impl WriteTarget for LocalWrites {
    fn submit(&mut self, tag: usize, buf: *mut u8, offset: u64, len: usize) {
        let fd = types::Fd(self.file.as_raw_fd());
        let sqe =
            opcode::Write::new(fd, buf, len as u32).offset(offset).build().user_data(tag as u64 | (len as u64) << 32);
        // SAFETY: the buffer outlives the operation (every write is reaped before the loop ends).
        unsafe { self.ring.submission().push(&sqe).unwrap() };
    }
    fn reap(&mut self, done: &mut Vec<usize>) {
        self.ring.submit_and_wait(1).unwrap();
        for c in self.ring.completion() {
            assert_eq!(c.result() as u64, c.user_data() >> 32, "local write failed: {}", c.result());
            done.push(c.user_data() as u32 as usize);
        }
    }
}

impl WriteTarget for QueueDriver {
    fn submit(&mut self, tag: usize, buf: *mut u8, offset: u64, len: usize) {
        let req = Request { kind: ReqKind::Write, offset, len: len as u32, fua: false, buf };
        QueueDriver::submit(self, tag as u16, req).unwrap();
    }
    fn reap(&mut self, done: &mut Vec<usize>) {
        self.poll(None, |tag, res| {
            assert!(res > 0, "mirrored write failed: {res}");
            done.push(tag as usize);
        })
        .unwrap();
    }
}

/// Random `bs` writes at `depth` for `secs`: every completion starts the next write on its tag.
fn closed_loop(
    t: &mut impl WriteTarget,
    case: &'static str,
    medium: &'static str,
    bs: usize,
    depth: usize,
    secs: Duration,
) -> Result_ {
    closed_loop_over(t, case, medium, bs, depth, secs, VOLUME)
}

/// The closed loop over random `bs` blocks of the first `span` bytes.
fn closed_loop_over(
    t: &mut impl WriteTarget,
    case: &'static str,
    medium: &'static str,
    bs: usize,
    depth: usize,
    secs: Duration,
    span: u64,
) -> Result_ {
    let mut bufs = Aligned::new(depth, bs);
    let mut rng = Rng { state: 0x9e3779b97f4a7c15, span, bs: bs as u64 };
    let mut started = vec![Instant::now(); depth];
    let mut lat = Lat::new();
    let mut done = Vec::with_capacity(depth);
    let t0 = Instant::now();
    let mut ops = 0u64;
    for (tag, s) in started.iter_mut().enumerate() {
        *s = Instant::now();
        t.submit(tag, bufs.ptr(tag), rng.offset(), bs);
    }
    let mut outstanding = depth;
    while outstanding > 0 {
        done.clear();
        t.reap(&mut done);
        for &tag in &done {
            lat.add(started[tag].elapsed());
            ops += 1;
            if t0.elapsed() < secs {
                started[tag] = Instant::now();
                t.submit(tag, bufs.ptr(tag), rng.offset(), bs);
            } else {
                outstanding -= 1;
            }
        }
    }
    lat.finish(case, medium, bs, depth, ops, t0.elapsed())
}

fn bench_local(path: &Path, direct: bool, medium: &'static str, bs: usize, depth: usize, secs: Duration) -> Result_ {
    let mut t = LocalWrites { ring: IoUring::new(64).unwrap(), file: open_file(path, direct) };
    closed_loop(&mut t, "local", medium, bs, depth, secs)
}

fn bench_echo(bs: usize, depth: usize, secs: Duration) -> Result_ {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let mut reader = c.try_clone().unwrap();
    let msg = vec![0x5au8; bs];
    // The receiver thread times each echo against its send time; the sender keeps `depth`
    // messages outstanding (a token per echoed message comes back over a channel).
    let (tok_tx, tok_rx) = std::sync::mpsc::sync_channel::<()>(depth);
    let (ts_tx, ts_rx) = std::sync::mpsc::sync_channel::<Instant>(depth + 1);
    for _ in 0..depth {
        tok_tx.send(()).unwrap();
    }
    let recv = std::thread::spawn(move || {
        let mut lat = Lat::new();
        let mut buf = vec![0u8; bs];
        let mut ops = 0u64;
        while let Ok(t) = ts_rx.recv() {
            if reader.read_exact(&mut buf).is_err() {
                break;
            }
            lat.add(t.elapsed());
            ops += 1;
            let _ = tok_tx.send(());
        }
        (lat, ops)
    });
    let t0 = Instant::now();
    while t0.elapsed() < secs {
        tok_rx.recv().unwrap();
        ts_tx.send(Instant::now()).unwrap();
        c.write_all(&msg).unwrap();
    }
    drop(ts_tx);
    let (lat, ops) = recv.join().unwrap();
    let el = t0.elapsed();
    drop(c);
    let _ = server.join();
    lat.finish("echo", "loopback", bs, depth, ops, el)
}

/// What the mirror runs with: the conflict rule and the write-intent bitmap (both on in
/// production; each off only to measure its cost), and the span of the random writes.
#[derive(Clone, Copy)]
struct Variant {
    order_conflicts: bool,
    write_intent: bool,
    span: u64,
}

const PRODUCTION: Variant = Variant { order_conflicts: true, write_intent: true, span: VOLUME };

fn bench_mirror(dir: &Path, direct: bool, medium: &'static str, bs: usize, depth: usize, secs: Duration) -> Result_ {
    bench_mirror_with(dir, direct, medium, bs, depth, secs, PRODUCTION)
}

/// The secondary, in a process of its own (so it does not share the primary's allocator,
/// scheduler decisions or address space): this binary again with `--secondary CONFIG`. Killed
/// when dropped.
struct SecondaryProcess(Child);

impl SecondaryProcess {
    fn start(config: &Path) -> SecondaryProcess {
        let exe = std::env::current_exe().expect("the benchmark's own path");
        let child = Command::new(exe).arg("--secondary").arg(config).spawn().expect("start the secondary process");
        SecondaryProcess(child)
    }
}

impl Drop for SecondaryProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--secondary CONFIG`: serves the benchmark volume as its secondary until killed.
fn run_secondary(config: &Path) -> ! {
    let cfg = NodeConfig::load(config).expect("secondary config");
    let _sec = metroblk::lifecycle::runner::start_secondary(&cfg.volumes[0], &cfg.name, &cfg.path).expect("secondary");
    loop {
        std::thread::park();
    }
}

fn bench_mirror_with(
    dir: &Path,
    direct: bool,
    medium: &'static str,
    bs: usize,
    depth: usize,
    secs: Duration,
    variant: Variant,
) -> Result_ {
    let key = dir.join("bench.key");
    std::fs::write(&key, "pipeline-benchmark-authkey-0123").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let port = |()| TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (pa, pb) = (port(()), port(()));
    let mode = if direct { "direct" } else { "buffered" };
    let cfg = |name: &str, peer: &str, role: &str, listen: u16, peer_port: u16| {
        let text = format!(
            "[node]\nname = \"{name}\"\ncontrol_socket = \"{name}.sock\"\n[[volume]]\nname = \"bench\"\nsize = {VOLUME}\n\
             backing_file = \"{name}.img\"\nmetadata_file = \"{name}.meta\"\nlisten = \"127.0.0.1:{listen}\"\nrole = \"{role}\"\n\
             io_mode = \"{mode}\"\nblock_size = 4096\n[volume.peer]\nname = \"{peer}\"\naddress = \"127.0.0.1:{peer_port}\"\nauthkey_file = \"bench.key\"\n"
        );
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        metroblk::metadata::create_md_command(&p, "bench", true).unwrap();
        NodeConfig::load(&p).unwrap()
    };
    for n in ["p.img", "s.img"] {
        open_file(&dir.join(n), false);
    }
    let secondary = cfg("s", "p", "secondary", pb, pa);
    let _sec = SecondaryProcess::start(&secondary.path);
    let primary = cfg("p", "s", "primary", pa, pb);
    let vol = PrimaryEngine::open(&primary.volumes[0], "p", 1).expect("primary");
    let queue = vol.queue(0, depth as u16);
    let queue = if variant.order_conflicts { queue } else { queue.without_conflict_ordering_for_benchmark() };
    let queue = if variant.write_intent { queue } else { queue.without_write_intent_for_benchmark() };
    let mut drv = QueueDriver::new(queue).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !drv.queue().link_is_up() {
        assert!(Instant::now() < deadline, "link to the benchmark secondary did not come up");
        drv.poll(Some(Duration::from_millis(10)), |_, _| {}).unwrap();
    }
    let case = match (variant.order_conflicts, variant.write_intent) {
        (true, true) => "mirror",
        (false, _) => "mirror-no-conflict-check",
        (true, false) => "mirror-no-write-intent",
    };
    let r = closed_loop_over(&mut drv, case, medium, bs, depth, secs, variant.span);
    let s = &vol.shared.intent.stats;
    let cold = s.marks_cold.load(std::sync::atomic::Ordering::Relaxed);
    let writes = s.metadata_writes.load(std::sync::atomic::Ordering::Relaxed);
    if variant.write_intent {
        println!(
            "{}",
            serde_json::json!({"case": case, "bs": bs, "depth": depth, "cold_writes": cold, "metadata_writes": writes,
                "cold_writes_per_metadata_write": if writes > 0 { (cold as f64 / writes as f64 * 10.0).round() / 10.0 } else { 0.0 }})
        );
    }
    drop(drv);
    drop(vol);
    r
}

fn main() {
    let mut secs = Duration::from_secs(3);
    let mut disk_dir = PathBuf::from("/var/tmp");
    let mut conflict_ab = 0usize;
    let mut bitmap_ab = 0usize;
    let mut sizes = SIZES_DEFAULT.to_vec();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = Duration::from_secs(args.next().and_then(|s| s.parse().ok()).expect("--secs N")),
            "--disk-dir" => disk_dir = PathBuf::from(args.next().expect("--disk-dir DIR")),
            "--conflict-ab" => conflict_ab = args.next().and_then(|s| s.parse().ok()).expect("--conflict-ab ROUNDS"),
            "--bitmap-ab" => bitmap_ab = args.next().and_then(|s| s.parse().ok()).expect("--bitmap-ab ROUNDS"),
            "--sizes" => sizes = parse_sizes(&args.next().expect("--sizes 4k,64k,128k")),
            "--secondary" => run_secondary(Path::new(&args.next().expect("--secondary CONFIG"))),
            _ => {
                eprintln!(
                    "usage: pipeline [--secs N] [--disk-dir DIR] [--sizes 4k,64k,128k] [--conflict-ab ROUNDS] [--bitmap-ab ROUNDS]"
                );
                std::process::exit(2);
            }
        }
    }
    let shm = tempfile::tempdir_in("/dev/shm").expect("/dev/shm");
    if conflict_ab > 0 {
        for &bs in &sizes {
            conflict_ab_runs(shm.path(), conflict_ab, secs, bs);
        }
        return;
    }
    if bitmap_ab > 0 {
        for &bs in &sizes {
            bitmap_ab_runs(shm.path(), bitmap_ab, secs, bs);
        }
        return;
    }
    let disk = tempfile::tempdir_in(&disk_dir).expect("disk dir");
    let mut results = Vec::new();
    for &bs in &sizes {
        for depth in [1usize, 32] {
            let r = bench_echo(bs, depth, secs);
            r.print();
            results.push(r);
        }
        for (dir, direct, medium) in [(shm.path(), false, "shm"), (disk.path(), true, "disk")] {
            for depth in [1usize, 32] {
                let r = bench_local(&dir.join("local.img"), direct, medium, bs, depth, secs);
                r.print();
                results.push(r);
                let sub = dir.join(format!("mirror{depth}"));
                std::fs::create_dir_all(&sub).unwrap();
                let r = bench_mirror(&sub, direct, medium, bs, depth, secs);
                r.print();
                results.push(r);
                let _ = std::fs::remove_dir_all(&sub);
            }
        }
    }
    let find = |case: &str, medium: &str, bs: usize, depth: usize| {
        results
            .iter()
            .find(|r| r.case == case && (r.medium == medium || case == "echo") && r.bs == bs && r.depth == depth)
            .unwrap()
    };
    for &bs in &sizes {
        for medium in ["shm", "disk"] {
            let (l1, e1, m1) =
                (find("local", medium, bs, 1), find("echo", medium, bs, 1), find("mirror", medium, bs, 1));
            let (l32, e32, m32) =
                (find("local", medium, bs, 32), find("echo", medium, bs, 32), find("mirror", medium, bs, 32));
            let overhead = m1.p50_us - (l1.p50_us + e1.p50_us);
            let ratio = m32.iops / l32.iops.min(e32.iops);
            println!(
                "{}",
                serde_json::json!({"summary": medium, "bs": bs,
                    "mirror_p50_qd1_minus_local_plus_echo_us": (overhead * 10.0).round() / 10.0,
                    "goal_p50_overhead_us": 15.0, "p50_goal_met": overhead <= 15.0,
                    "mirror_iops_qd32_over_min_local_echo": (ratio * 1000.0).round() / 1000.0,
                    "goal_iops_ratio": 0.7, "iops_goal_met": ratio >= 0.7})
            );
        }
    }
}

/// "4k,64k,128k" (k = KiB; a plain number is bytes) into sizes, each a multiple of 4 KiB.
fn parse_sizes(text: &str) -> Vec<usize> {
    text.split(',')
        .map(|t| {
            let t = t.trim().to_ascii_lowercase();
            let n = match t.strip_suffix('k') {
                Some(k) => k.parse::<usize>().map(|k| k << 10),
                None => t.parse::<usize>(),
            };
            match n {
                Ok(n) if n > 0 && n % 4096 == 0 && n <= 512 << 10 => n,
                _ => {
                    eprintln!("--sizes: {t:?} is not a multiple of 4 KiB up to 512 KiB");
                    std::process::exit(2);
                }
            }
        })
        .collect()
}

/// The mirror on /dev/shm with a feature on and off (`with` and `without`), alternating (and
/// alternating which goes first), `rounds` times per depth; prints each run and the on/off IOPS ratios (median, min, max).
fn ab_runs(dir: &Path, rounds: usize, secs: Duration, bs: usize, label: &str, with: Variant, without: Variant) {
    for depth in [1usize, 32] {
        let mut ratios = Vec::new();
        for round in 0..rounds {
            let mut iops = [0.0f64; 2];
            // Which goes first alternates, so a drift within a round favours neither.
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let variant = [with, without][i];
                let sub = dir.join(format!("{label}{depth}-{round}-{i}"));
                std::fs::create_dir_all(&sub).unwrap();
                let r = bench_mirror_with(&sub, false, "shm", bs, depth, secs, variant);
                r.print();
                iops[i] = r.iops;
                let _ = std::fs::remove_dir_all(&sub);
            }
            ratios.push(iops[0] / iops[1]);
        }
        ratios.sort_by(|a, b| a.total_cmp(b));
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        println!(
            "{}",
            serde_json::json!({"summary": label, "bs": bs, "depth": depth, "rounds": rounds, "span_bytes": with.span,
                "iops_with_over_without_median": r3(ratios[ratios.len() / 2]),
                "min": r3(ratios[0]), "max": r3(ratios[ratios.len() - 1])})
        );
    }
}

/// What the conflict rule costs (random writes over the whole volume).
fn conflict_ab_runs(dir: &Path, rounds: usize, secs: Duration, bs: usize) {
    ab_runs(dir, rounds, secs, bs, "conflict-ab", PRODUCTION, Variant { order_conflicts: false, ..PRODUCTION });
}

/// What the write-intent bitmap costs over a hot working set (64 MiB: 1024 regions, each
/// written many times a second, as a filesystem's journal and hot files are; goal: under 3 %
/// at depth 32). A final run over the whole 1 GiB (16384 regions, most writes to a region
/// not yet marked) shows the group commit: cold writes per metadata write.
fn bitmap_ab_runs(dir: &Path, rounds: usize, secs: Duration, bs: usize) {
    let hot = Variant { span: 64 << 20, ..PRODUCTION };
    ab_runs(dir, rounds, secs, bs, "bitmap-ab", hot, Variant { write_intent: false, ..hot });
    // Over the whole volume, most writes cold: with the bitmap and without.
    ab_runs(dir, rounds, secs, bs, "bitmap-ab-cold", PRODUCTION, Variant { write_intent: false, ..PRODUCTION });
    let sub = dir.join("bm-cold");
    std::fs::create_dir_all(&sub).unwrap();
    let r = bench_mirror_with(&sub, false, "shm", bs, 32, secs, PRODUCTION);
    r.print();
    let _ = std::fs::remove_dir_all(&sub);
}
