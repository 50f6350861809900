//! What the secondary's copies cost: the ways a payload can go from a TCP socket into the
//! backing file, each measured alone on loopback (issue 25: "the secondary copies as little as
//! the kernel allows: receive into registered buffers, or splice to the file; measure").
//!
//! A sender thread writes `--size` payloads back to back over 127.0.0.1; the receiver thread
//! puts each at the next offset of a file (cycling over `--file-mib`) by one of:
//!
//! - `recv-pwrite`: `recv` into our buffer, `pwrite` from it (what `peer/replica.rs` does:
//!   two copies, socket → buffer → page cache);
//! - `uring-fixed`: io_uring `READ_FIXED` from the socket into a registered buffer, then
//!   `WRITE_FIXED` from it (registered buffers: the same two copies, no page pinning per call);
//! - `splice`: `splice` socket → pipe → file (the socket's pages move into the pipe; one copy,
//!   into the page cache; a payload checksum is then impossible, nothing reads the bytes).
//!
//! For each it prints one JSON line per round: MiB/s, and the receiving side's CPU time per MiB
//! (the process's `RUSAGE_SELF`, io_uring's workers included, less the sender thread's own),
//! which is what matters on a busy secondary and moves less with the machine's load than
//! throughput does. Then the median per method.
//!
//! `cargo run --release -p metroblk-benches --bin secondary_copy -- [--size 128k] [--mib 512]
//!  [--rounds 5] [--dir /dev/shm] [--parts]`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

const METHODS: [&str; 3] = ["recv-pwrite", "uring-fixed", "splice"];
/// With `--parts`: what one copy of each kind costs, without the network: `pwrite` from our
/// buffer into the page cache (a copy from user space), and `copy_file_range` from one tmpfs
/// file into another (the kernel's own copy, as an in-kernel mirror's is); and the payload
/// checksum alone (`crc32c` of each payload, what each node computes per WRITE by default).
const PARTS: [&str; 3] = ["pwrite-only", "kernel-copy-only", "crc32c-only"];
/// The pipe's capacity for `splice`: a payload of up to this many bytes moves in one go.
const PIPE_BYTES: usize = 1 << 20;

struct Args {
    size: usize,
    mib: usize,
    file_mib: usize,
    rounds: usize,
    dir: String,
    parts: bool,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1 << 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<usize>().map(|n| n * mult).map_err(|e| format!("bad size {s:?}: {e}"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { size: 128 << 10, mib: 512, file_mib: 64, rounds: 5, dir: "/dev/shm".into(), parts: false };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--size" => a.size = parse_size(&v()?)?,
            "--mib" => a.mib = v()?.parse().map_err(|e| format!("--mib: {e}"))?,
            "--file-mib" => a.file_mib = v()?.parse().map_err(|e| format!("--file-mib: {e}"))?,
            "--rounds" => a.rounds = v()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--dir" => a.dir = v()?,
            "--parts" => a.parts = true,
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.size == 0 || a.size > PIPE_BYTES || a.size & 4095 != 0 {
        return Err(format!("--size must be a multiple of 4 KiB up to {} KiB", PIPE_BYTES >> 10));
    }
    if a.file_mib << 20 < a.size || a.mib == 0 || a.rounds == 0 {
        return Err("--file-mib must hold one payload; --mib and --rounds must be positive".into());
    }
    Ok(a)
}

/// CPU time of this thread (`RUSAGE_THREAD`) or of the whole process (`RUSAGE_SELF`: io_uring's
/// workers included, which run a punted write).
fn cpu_ns(who: i32) -> u64 {
    // SAFETY: getrusage fills the struct we pass; all-zero is a valid rusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: plain syscall on our own struct.
    unsafe { libc::getrusage(who, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn check(ret: isize, what: &str) -> Result<usize, String> {
    if ret < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(ret as usize)
}

/// Receives `count` payloads of `size` from `sock` into `file` by `method`.
fn receive(
    method: &str,
    sock: &TcpStream,
    file: &std::fs::File,
    size: usize,
    count: usize,
    file_bytes: usize,
) -> Result<(), String> {
    let slots = file_bytes / size;
    let fd = file.as_raw_fd();
    let s = sock.as_raw_fd();
    match method {
        "recv-pwrite" => {
            let mut buf = vec![0u8; size];
            let mut sock = sock;
            for i in 0..count {
                sock.read_exact(&mut buf).map_err(|e| format!("recv: {e}"))?;
                let off = ((i % slots) * size) as libc::off_t;
                // SAFETY: buf is ours and `size` long.
                let n = check(unsafe { libc::pwrite(fd, buf.as_ptr().cast(), size, off) }, "pwrite")?;
                assert_eq!(n, size, "short pwrite to a tmpfs file");
            }
        }
        "uring-fixed" => {
            // Declared before the ring, so dropped after it: registered for the ring's life.
            let mut buf = vec![0u8; size];
            let mut ring = io_uring::IoUring::new(8).map_err(|e| format!("io_uring: {e}"))?;
            let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: size };
            // SAFETY: `buf` outlives the ring (dropped after it) and is not moved meanwhile.
            unsafe { ring.submitter().register_buffers(&[iov]) }.map_err(|e| format!("register: {e}"))?;
            let mut run = |sqe: io_uring::squeue::Entry| -> Result<usize, String> {
                // SAFETY: the entry points at `buf`, registered above and alive until the ring ends.
                unsafe { ring.submission().push(&sqe) }.map_err(|_| "submission queue full".to_string())?;
                ring.submit_and_wait(1).map_err(|e| format!("submit: {e}"))?;
                let cqe = ring.completion().next().ok_or("no completion")?;
                check(cqe.result() as isize, "io_uring op").map_err(|_| format!("io_uring op: errno {}", -cqe.result()))
            };
            for i in 0..count {
                let mut got = 0;
                while got < size {
                    // SAFETY: got < size: inside the registered buffer.
                    let p = unsafe { buf.as_mut_ptr().add(got) };
                    let op = io_uring::opcode::ReadFixed::new(io_uring::types::Fd(s), p, (size - got) as u32, 0);
                    let n = run(op.offset(u64::MAX).build())?;
                    if n == 0 {
                        return Err("the sender closed early".into());
                    }
                    got += n;
                }
                let off = ((i % slots) * size) as u64;
                let op = io_uring::opcode::WriteFixed::new(io_uring::types::Fd(fd), buf.as_ptr(), size as u32, 0);
                let n = run(op.offset(off).build())?;
                assert_eq!(n, size, "short write to a tmpfs file");
            }
        }
        "splice" => {
            let mut p = [0i32; 2];
            // SAFETY: pipe2 fills the two fds.
            check(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } as isize, "pipe")?;
            // SAFETY: plain fcntl on our pipe.
            check(unsafe { libc::fcntl(p[1], libc::F_SETPIPE_SZ, PIPE_BYTES as i32) } as isize, "F_SETPIPE_SZ")?;
            let result = (|| {
                for i in 0..count {
                    let mut moved = 0;
                    while moved < size {
                        // SAFETY: plain splice between our fds.
                        let n = unsafe {
                            libc::splice(
                                s,
                                std::ptr::null_mut(),
                                p[1],
                                std::ptr::null_mut(),
                                size - moved,
                                libc::SPLICE_F_MOVE,
                            )
                        };
                        let n = check(n, "splice from the socket")?;
                        if n == 0 {
                            return Err("the sender closed early".to_string());
                        }
                        moved += n;
                    }
                    let mut off = ((i % slots) * size) as libc::loff_t;
                    let mut out = 0;
                    while out < size {
                        // SAFETY: plain splice between our fds; `off` is ours.
                        let n = unsafe {
                            libc::splice(p[0], std::ptr::null_mut(), fd, &mut off, size - out, libc::SPLICE_F_MOVE)
                        };
                        out += check(n, "splice to the file")?;
                    }
                }
                Ok(())
            })();
            // SAFETY: closing our own pipe.
            unsafe { libc::close(p[0]) };
            // SAFETY: as above.
            unsafe { libc::close(p[1]) };
            result?;
        }
        _ => return Err(format!("unknown method {method}")),
    }
    Ok(())
}

/// The same volume of data through one copy alone: see [`PARTS`].
fn one_part(a: &Args, method: &str, round: usize) -> Result<(f64, f64), String> {
    let open = |name: &str| {
        let path = std::path::Path::new(&a.dir).join(format!("metroblk-secondary-copy-{}-{name}", std::process::id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path);
        let _ = std::fs::remove_file(&path);
        let f = f.map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: plain fallocate on our file.
        check(
            unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, (a.file_mib << 20) as libc::off_t) } as isize,
            "fallocate",
        )?;
        Ok::<_, String>(f)
    };
    let (src, dst) = (open("src")?, open("dst")?);
    let count = (a.mib << 20) / a.size;
    let slots = (a.file_mib << 20) / a.size;
    let buf: Vec<u8> = (0..a.size).map(|i| (i * 7 + i / 4096) as u8).collect();
    let (t0, c0) = (Instant::now(), cpu_ns(libc::RUSAGE_SELF));
    let mut crc_sum = 0u32;
    for i in 0..count {
        let off = ((i % slots) * a.size) as libc::loff_t;
        let n = if method == "crc32c-only" {
            crc_sum ^= crc32c::crc32c(&buf);
            a.size as isize
        } else if method == "pwrite-only" {
            // SAFETY: buf is ours and `size` long.
            unsafe { libc::pwrite(dst.as_raw_fd(), buf.as_ptr().cast(), a.size, off) }
        } else {
            let (mut from, mut to) = (off, off);
            // SAFETY: plain copy_file_range between our files, offsets ours.
            unsafe { libc::copy_file_range(src.as_raw_fd(), &mut from, dst.as_raw_fd(), &mut to, a.size, 0) as isize }
        };
        if check(n, method)? != a.size {
            return Err(format!("{method}: short copy"));
        }
    }
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), cpu_ns(libc::RUSAGE_SELF) - c0);
    std::hint::black_box(crc_sum);
    Ok(report(method, round, a.size, count, secs, cpu))
}

/// Prints one round's JSON line; returns its MiB/s and CPU µs per MiB.
fn report(method: &str, round: usize, size: usize, count: usize, secs: f64, cpu_ns: u64) -> (f64, f64) {
    let mib = (count * size) as f64 / (1 << 20) as f64;
    let (mibps, cpu_us_per_mib) = (mib / secs, cpu_ns as f64 / 1000.0 / mib);
    println!(
        "{{\"method\":\"{method}\",\"round\":{round},\"size\":{size},\"MiBps\":{mibps:.1},\"cpu_us_per_MiB\":{cpu_us_per_mib:.0}}}"
    );
    (mibps, cpu_us_per_mib)
}

fn one_round(a: &Args, method: &str, round: usize) -> Result<(f64, f64), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let count = (a.mib << 20) / a.size;
    let size = a.size;
    // The sender reports its own CPU time: the receiver's is the process's less it.
    let sender = std::thread::spawn(move || -> Result<u64, String> {
        let c0 = cpu_ns(libc::RUSAGE_THREAD);
        let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        let _ = s.set_nodelay(true);
        let payload = vec![0x5au8; size];
        for _ in 0..count {
            s.write_all(&payload).map_err(|e| format!("send: {e}"))?;
        }
        Ok(cpu_ns(libc::RUSAGE_THREAD) - c0)
    });
    let (sock, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
    let path = std::path::Path::new(&a.dir).join(format!("metroblk-secondary-copy-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // Allocated before the clock starts, as a secondary's backing file is.
    // SAFETY: plain fallocate on our file.
    check(unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, (a.file_mib << 20) as libc::off_t) } as isize, "fallocate")?;
    let (t0, c0) = (Instant::now(), cpu_ns(libc::RUSAGE_SELF));
    let r = receive(method, &sock, &file, a.size, count, a.file_mib << 20);
    let secs = t0.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    r?;
    let sender_cpu = sender.join().map_err(|_| "the sender panicked".to_string())??;
    let cpu = (cpu_ns(libc::RUSAGE_SELF) - c0).saturating_sub(sender_cpu);
    Ok(report(method, round, a.size, count, secs, cpu))
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("secondary_copy: {e}");
            std::process::exit(2);
        }
    };
    let methods: &[&str] = if a.parts { &PARTS } else { &METHODS };
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); methods.len()];
    // Rounds interleave the methods, so drift in the machine's load favours none.
    for round in 0..a.rounds {
        for (i, m) in methods.iter().enumerate() {
            let r = if a.parts { one_part(&a, m, round) } else { one_round(&a, m, round) };
            match r {
                Ok((bw, cpu)) => {
                    results[i].0.push(bw);
                    results[i].1.push(cpu);
                }
                Err(e) => {
                    eprintln!("secondary_copy: {m}: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
    println!("# median (min..max) of {} rounds, {} KiB payloads, {} MiB each", a.rounds, a.size >> 10, a.mib);
    for (i, m) in methods.iter().enumerate() {
        let (b, b0, b1) = median(results[i].0.clone());
        let (c, c0, c1) = median(results[i].1.clone());
        println!("# {m:16} {b:8.1} MiB/s ({b0:.1}..{b1:.1})   CPU {c:6.0} us/MiB ({c0:.0}..{c1:.0})");
    }
}
