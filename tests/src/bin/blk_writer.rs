//! The writer and checker of the failover tests, run against a block device like any user's
//! program (O_DIRECT, 4 KiB writes, one at a time per thread).
//!
//! `blk_writer write DEV LOG BLOCKS [--control DIR] [--threads N] [--dsync] [--interval-ms MS]`: writes blocks
//! with a record of a sequence number (seq = 1, 2, ..., shared by all threads) until killed
//! or until a write fails. With one thread (the default) the write of `seq` goes to block
//! `seq % BLOCKS`; with N threads, thread `t`'s k-th write goes to block `(t + N*k) % BLOCKS`
//! (BLOCKS a multiple of N), so no two threads write the same block and each block's records
//! rise. After each write *completed* it appends `seq offset time_ms latency_us thread` to
//! LOG (time: CLOCK_REALTIME, ms; latency: the write call's duration), so LOG lists exactly
//! the acknowledged writes. A failed write appends `error seq errno time_ms` and the process
//! exits 3. `--dsync` opens the device O_DIRECT|O_DSYNC (every write is FUA).
//! `--interval-ms MS` makes each thread sleep MS after each acknowledged write (a light,
//! paced writer: many of them can run at once under TCG).
//!
//! With `--control DIR` (one thread only) the writer can be quiesced like an application
//! around a planned switchover: while `DIR/pause` exists it finishes its write in flight,
//! creates `DIR/paused` and waits; when `pause` is gone it reopens the device named in
//! `DIR/device` (if any) and goes on with the next sequence number.
//!
//! `blk_writer check DEV LOG`: every block LOG names holds the record of the last
//! acknowledged write to it, or of a later one (a write can complete on the device and the
//! writer die before logging it). Prints `checked N blocks, M acknowledged writes` or each
//! loss, and exits 1 on a loss.
//!
//! `blk_writer dependent DEV_X DEV_Y LOG BLOCKS`: dependent writes across two devices (a
//! database's log and data, two volumes of one consistency group): for seq = 1, 2, ... it
//! writes X = the record of `seq` to block `seq % BLOCKS` of DEV_X, and only after that write
//! completed writes Y, the same record, to the same block of DEV_Y; after Y completed it
//! appends `seq offset time_ms` to LOG. Both devices are opened O_DIRECT|O_DSYNC. Stops at
//! the first failed write (exit 3), as `write` does.
//!
//! `blk_writer check-dependent DEV_X DEV_Y LOG BLOCKS`: every block among DEV_Y's first
//! BLOCKS that holds a record has its X on DEV_X (the same block holds that record or a
//! later one: X is always written first), and every block LOG names holds on DEV_Y the last
//! acknowledged Y or a later one.
//! Exits 1 on a Y without its X or a lost write.
//!
//! `blk_writer stats LOG`: one `KEY VALUE` line each: `acknowledged` (writes), `errors`,
//! `max_latency_ms` (the slowest acknowledged write) and `max_latency_at_ms` (when it
//! completed), `threads` (that logged a write) and `stalest_last_ack_ms` (the oldest of the
//! threads' last acknowledgements: a thread stuck in a write shows as a stale one).
//!
//! `blk_writer scribble DEV BLOCKS WRITES`: a client that changes its buffer while its write
//! is in flight (a VM's guest, a database reusing a page): WRITES O_DIRECT writes of 64 KiB,
//! the k-th to 64 KiB block `k % BLOCKS`, from one buffer that a second thread rewrites
//! without pause the whole time. What lands on the device is some mix of versions; the mirror
//! must land the same mix on both copies. Prints `scribbled N writes, M buffer changes`.

use std::io::{BufRead, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"MBLKTEST";

struct Aligned(*mut u8);

impl Aligned {
    fn new() -> Aligned {
        let layout = std::alloc::Layout::from_size_align(BLOCK, BLOCK).unwrap();
        // SAFETY: a non-zero size with a valid alignment.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!p.is_null());
        Aligned(p)
    }
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: BLOCK bytes allocated in `new`, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.0, BLOCK) }
    }
}

fn record(seq: u64, offset: u64, out: &mut [u8]) {
    out.fill((seq % 251) as u8);
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out[16..24].copy_from_slice(&offset.to_le_bytes());
}

fn parse(buf: &[u8]) -> Option<(u64, u64)> {
    if &buf[..8] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(buf[8..16].try_into().ok()?);
    let offset = u64::from_le_bytes(buf[16..24].try_into().ok()?);
    buf[24..].iter().all(|&b| b == (seq % 251) as u8).then_some((seq, offset))
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

fn open(dev: &str, write: bool, dsync: bool) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT | if dsync { libc::O_DSYNC } else { 0 })
        .open(dev)
        .unwrap_or_else(|e| panic!("open {dev}: {e}"))
}

fn follow(control: Option<&str>, dev: &mut String, f: &mut std::fs::File, dsync: bool) {
    let Some(dir) = control else { return };
    let dir = std::path::Path::new(dir);
    if !dir.join("pause").exists() {
        return;
    }
    std::fs::write(dir.join("paused"), b"").expect("write the paused marker");
    while dir.join("pause").exists() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = std::fs::remove_file(dir.join("paused"));
    if let Ok(next) = std::fs::read_to_string(dir.join("device")) {
        let next = next.trim().to_string();
        if !next.is_empty() && next != *dev {
            *f = open(&next, true, dsync);
            *dev = next;
        }
    }
}

struct WriteArgs<'a> {
    dev: &'a str,
    log: &'a str,
    blocks: u64,
    control: Option<&'a str>,
    threads: u64,
    dsync: bool,
    interval: std::time::Duration,
}

fn write(a: &WriteArgs) -> ! {
    assert!(a.threads >= 1 && a.blocks % a.threads == 0, "BLOCKS must be a multiple of --threads");
    assert!(a.control.is_none() || a.threads == 1, "--control takes one thread");
    let log =
        std::sync::Mutex::new(std::fs::OpenOptions::new().create(true).append(true).open(a.log).expect("open the log"));
    let seqs = std::sync::atomic::AtomicU64::new(1);
    std::thread::scope(|s| {
        for t in 0..a.threads {
            let (log, seqs) = (&log, &seqs);
            s.spawn(move || write_thread(a, t, log, seqs));
        }
    });
    unreachable!()
}

fn write_thread(
    a: &WriteArgs,
    thread: u64,
    log: &std::sync::Mutex<std::fs::File>,
    seqs: &std::sync::atomic::AtomicU64,
) -> ! {
    let mut dev = a.dev.to_string();
    let mut f = open(&dev, true, a.dsync);
    let mut buf = Aligned::new();
    let append = |line: String| {
        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
        log.write_all(line.as_bytes()).expect("log");
    };
    for k in 1.. {
        follow(a.control, &mut dev, &mut f, a.dsync);
        let seq = seqs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let offset = ((thread + a.threads * k) % a.blocks) * BLOCK as u64;
        record(seq, offset, buf.buf());
        let start = std::time::Instant::now();
        match f.write_at(buf.buf(), offset) {
            Ok(n) if n == BLOCK => {
                let us = start.elapsed().as_micros();
                append(format!("{seq} {offset} {} {us} {thread}\n", now_ms()));
                if !a.interval.is_zero() {
                    std::thread::sleep(a.interval);
                }
            }
            Ok(n) => {
                append(format!("error {seq} short:{n} {}\n", now_ms()));
                std::process::exit(3);
            }
            Err(e) => {
                append(format!("error {seq} {} {}\n", e.raw_os_error().unwrap_or(0), now_ms()));
                std::process::exit(3);
            }
        }
    }
    unreachable!()
}

fn stats(log: &str) -> ! {
    let (mut acked, mut errors, mut max_us, mut max_at) = (0u64, 0u64, 0u128, 0u128);
    let mut last = std::collections::BTreeMap::<u64, u128>::new();
    for line in std::io::BufReader::new(std::fs::File::open(log).expect("open the log")).lines() {
        let line = line.expect("read the log");
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.first() == Some(&"error") {
            errors += 1;
            continue;
        }
        let num = |i: usize| w.get(i).and_then(|x| x.parse::<u128>().ok());
        let (Some(_seq), Some(_offset), Some(time)) = (num(0), num(1), num(2)) else { continue };
        acked += 1;
        if let Some(us) = num(3).filter(|&us| us > max_us) {
            (max_us, max_at) = (us, time);
        }
        last.insert(num(4).unwrap_or(0) as u64, time);
    }
    println!("acknowledged {acked}");
    println!("errors {errors}");
    println!("max_latency_ms {}", max_us / 1000);
    println!("max_latency_at_ms {max_at}");
    println!("threads {}", last.len());
    println!("stalest_last_ack_ms {}", last.values().min().copied().unwrap_or(0));
    std::process::exit(0);
}

fn check(dev: &str, log: &str) -> ! {
    let mut last = std::collections::BTreeMap::<u64, u64>::new();
    let mut acked = 0u64;
    for line in std::io::BufReader::new(std::fs::File::open(log).expect("open the log")).lines() {
        let line = line.expect("read the log");
        let mut w = line.split_whitespace();
        let (Some(seq), Some(offset)) = (w.next(), w.next()) else { continue };
        let (Ok(seq), Ok(offset)) = (seq.parse::<u64>(), offset.parse::<u64>()) else { continue };
        last.insert(offset, seq);
        acked += 1;
    }
    let f = open(dev, false, false);
    let mut buf = Aligned::new();
    let mut lost = 0;
    for (&offset, &seq) in &last {
        f.read_exact_at(buf.buf(), offset).unwrap_or_else(|e| panic!("read {dev} at {offset}: {e}"));
        match parse(buf.buf()) {
            Some((s, o)) if o == offset && s >= seq => {}
            found => {
                lost += 1;
                if lost <= 10 {
                    println!("LOST: block at {offset} should hold write {seq} or later, holds {found:?}");
                }
            }
        }
    }
    println!("checked {} blocks, {acked} acknowledged writes, {lost} lost", last.len());
    std::process::exit(if lost == 0 && acked > 0 { 0 } else { 1 });
}

fn dependent(dev_x: &str, dev_y: &str, log: &str, blocks: u64) -> ! {
    let (x, y) = (open(dev_x, true, true), open(dev_y, true, true));
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open the log");
    let mut buf = Aligned::new();
    for seq in 1.. {
        let offset = (seq % blocks) * BLOCK as u64;
        record(seq, offset, buf.buf());
        for (f, which) in [(&x, "x"), (&y, "y")] {
            match f.write_at(buf.buf(), offset) {
                Ok(n) if n == BLOCK => {}
                r => {
                    let why = r.map_or_else(|e| e.raw_os_error().unwrap_or(0).to_string(), |n| format!("short:{n}"));
                    let _ = writeln!(log, "error {seq} {which}:{why} {}", now_ms());
                    std::process::exit(3);
                }
            }
        }
        writeln!(log, "{seq} {offset} {}", now_ms()).expect("log");
    }
    unreachable!()
}

fn check_dependent(dev_x: &str, dev_y: &str, log: &str, blocks: u64) -> ! {
    let (x, y) = (open(dev_x, false, false), open(dev_y, false, false));
    let size = blocks * BLOCK as u64;
    let (mut bx, mut by) = (Aligned::new(), Aligned::new());
    let (mut ys, mut orphans) = (0u64, 0u64);
    for offset in (0..size).step_by(BLOCK) {
        y.read_exact_at(by.buf(), offset).unwrap_or_else(|e| panic!("read {dev_y} at {offset}: {e}"));
        let Some((sy, _)) = parse(by.buf()) else { continue };
        ys += 1;
        x.read_exact_at(bx.buf(), offset).unwrap_or_else(|e| panic!("read {dev_x} at {offset}: {e}"));
        match parse(bx.buf()) {
            Some((sx, o)) if o == offset && sx >= sy => {}
            found => {
                orphans += 1;
                if orphans <= 10 {
                    println!("ORPHAN: {dev_y} at {offset} holds write {sy}, but {dev_x} there holds {found:?}");
                }
            }
        }
    }
    let mut last = std::collections::BTreeMap::<u64, u64>::new();
    for line in std::io::BufReader::new(std::fs::File::open(log).expect("open the log")).lines() {
        let line = line.expect("read the log");
        let mut w = line.split_whitespace();
        let (Some(Ok(seq)), Some(Ok(offset))) = (w.next().map(str::parse::<u64>), w.next().map(str::parse::<u64>))
        else {
            continue;
        };
        last.insert(offset, seq);
    }
    let mut lost = 0u64;
    for (&offset, &seq) in &last {
        y.read_exact_at(by.buf(), offset).unwrap_or_else(|e| panic!("read {dev_y} at {offset}: {e}"));
        if !matches!(parse(by.buf()), Some((s, o)) if o == offset && s >= seq) {
            lost += 1;
            if lost <= 10 {
                println!("LOST: {dev_y} at {offset} should hold write {seq} or later");
            }
        }
    }
    println!("{ys} dependent writes on {dev_y}, {orphans} without their write on {dev_x}, {lost} acknowledged lost");
    std::process::exit(if orphans == 0 && lost == 0 && ys > 0 { 0 } else { 1 });
}

/// The bytes of one scribbled write.
const SCRIBBLE_BYTES: usize = 64 << 10;

/// A page-aligned buffer that one thread writes through atomics while the kernel reads it for
/// a write: no Rust reference to its bytes exists while the kernel reads.
#[repr(C, align(4096))]
struct ScribbleBuf([std::sync::atomic::AtomicU64; SCRIBBLE_BYTES / 8]);

fn scribble(dev: &str, blocks: u64, writes: u64) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    let buf: &'static ScribbleBuf = Box::leak(Box::new(ScribbleBuf(std::array::from_fn(|_| AtomicU64::new(0)))));
    let done: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let scribbler = std::thread::spawn(move || {
        let mut changes = 0u64;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        while !done.load(Relaxed) {
            for w in &buf.0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.store(x, Relaxed);
            }
            changes += 1;
        }
        changes
    });
    let f = open(dev, true, false);
    for k in 0..writes {
        let offset = (k % blocks) * SCRIBBLE_BYTES as u64;
        let ptr = buf.0.as_ptr() as *const libc::c_void;
        // SAFETY: `buf` is leaked (lives for the process) and SCRIBBLE_BYTES long; the kernel
        // reads it while the scribbler stores to it through atomics, which is the point.
        let n = unsafe { libc::pwrite(std::os::fd::AsRawFd::as_raw_fd(&f), ptr, SCRIBBLE_BYTES, offset as i64) };
        if n != SCRIBBLE_BYTES as isize {
            eprintln!("write {k} at {offset}: {}", std::io::Error::last_os_error());
            std::process::exit(3);
        }
    }
    done.store(true, Relaxed);
    let changes = scribbler.join().expect("the scribbler");
    println!("scribbled {writes} writes, {changes} buffer changes");
}

fn usage() -> ! {
    eprintln!(
        "usage: blk_writer write DEV LOG BLOCKS [--control DIR] [--threads N] [--dsync] \
         [--interval-ms MS] | blk_writer check DEV LOG | blk_writer stats LOG \
         | blk_writer dependent DEV_X DEV_Y LOG BLOCKS | blk_writer check-dependent DEV_X DEV_Y LOG BLOCKS \
         | blk_writer scribble DEV BLOCKS WRITES"
    );
    std::process::exit(2);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [_, "write", dev, log, blocks, opts @ ..] => {
            let mut a = WriteArgs {
                dev,
                log,
                blocks: blocks.parse().expect("BLOCKS"),
                control: None,
                threads: 1,
                dsync: false,
                interval: std::time::Duration::ZERO,
            };
            let mut opts = opts.iter();
            while let Some(o) = opts.next() {
                match (*o, opts.clone().next()) {
                    ("--control", Some(dir)) => {
                        a.control = Some(dir);
                        opts.next();
                    }
                    ("--threads", Some(n)) => {
                        a.threads = n.parse().expect("--threads N");
                        opts.next();
                    }
                    ("--dsync", _) => a.dsync = true,
                    ("--interval-ms", Some(ms)) => {
                        a.interval = std::time::Duration::from_millis(ms.parse().expect("--interval-ms MS"));
                        opts.next();
                    }
                    _ => usage(),
                }
            }
            write(&a)
        }
        [_, "check", dev, log] => check(dev, log),
        [_, "dependent", x, y, log, blocks] => dependent(x, y, log, blocks.parse().expect("BLOCKS")),
        [_, "check-dependent", x, y, log, blocks] => check_dependent(x, y, log, blocks.parse().expect("BLOCKS")),
        [_, "stats", log] => stats(log),
        [_, "scribble", dev, blocks, writes] => {
            scribble(dev, blocks.parse().expect("BLOCKS"), writes.parse().expect("WRITES"))
        }
        _ => usage(),
    }
}
