//! The writer and checker of the failover tests, run against a block device like any user's
//! program (O_DIRECT, one 4 KiB write at a time).
//!
//! `blk_writer write DEV LOG BLOCKS`: writes block `seq % BLOCKS` with a record of `seq`
//! (seq = 1, 2, ...) until killed or until a write fails; after each write *completed* it
//! appends `seq offset time_ms` to LOG (time: CLOCK_REALTIME, ms), so LOG lists exactly the
//! acknowledged writes. A failed write appends `error seq errno time_ms` and exits 3.
//!
//! With `--control DIR` the writer can be quiesced like an application around a planned
//! switchover: while `DIR/pause` exists it finishes its write in flight, creates `DIR/paused`
//! and waits; when `pause` is gone it reopens the device named in `DIR/device` (if any) and
//! goes on with the next sequence number.
//!
//! `blk_writer check DEV LOG`: every block LOG names holds the record of the last
//! acknowledged write to it, or of a later one (a write can complete on the device and the
//! writer die before logging it). Prints `checked N blocks, M acknowledged writes` or each
//! loss, and exits 1 on a loss.

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

fn open(dev: &str, write: bool) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {dev}: {e}"))
}

fn follow(control: Option<&str>, dev: &mut String, f: &mut std::fs::File) {
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
            *f = open(&next, true);
            *dev = next;
        }
    }
}

fn write(dev: &str, log: &str, blocks: u64, control: Option<&str>) -> ! {
    let mut dev = dev.to_string();
    let mut f = open(&dev, true);
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open the log");
    let mut buf = Aligned::new();
    for seq in 1.. {
        follow(control, &mut dev, &mut f);
        let offset = (seq % blocks) * BLOCK as u64;
        record(seq, offset, buf.buf());
        match f.write_at(buf.buf(), offset) {
            Ok(n) if n == BLOCK => {
                writeln!(log, "{seq} {offset} {}", now_ms()).expect("log");
            }
            Ok(n) => {
                writeln!(log, "error {seq} short:{n} {}", now_ms()).ok();
                std::process::exit(3);
            }
            Err(e) => {
                writeln!(log, "error {seq} {} {}", e.raw_os_error().unwrap_or(0), now_ms()).ok();
                std::process::exit(3);
            }
        }
    }
    unreachable!()
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
    let f = open(dev, false);
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [_, "write", dev, log, blocks] => write(dev, log, blocks.parse().expect("BLOCKS"), None),
        [_, "write", dev, log, blocks, "--control", dir] => write(dev, log, blocks.parse().expect("BLOCKS"), Some(dir)),
        [_, "check", dev, log] => check(dev, log),
        _ => {
            eprintln!("usage: blk_writer write DEV LOG BLOCKS [--control DIR] | blk_writer check DEV LOG");
            std::process::exit(2);
        }
    }
}
