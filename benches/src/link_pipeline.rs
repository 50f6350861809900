//! What the link alone allows: a mirror that does no work at all, over one TCP connection on
//! 127.0.0.1. The client keeps `--depth` requests of `--size` bytes in flight (header plus a
//! 4 KiB payload, as a 4 KiB WRITE frame is); the server answers each whole request with a
//! 16-byte reply, as the secondary acks a write. It prints one JSON line: requests per second,
//! and the p50 / p99 of the time from a request's send to its reply.
//!
//! `benches/fio/run.sh --rtt-ms MS` runs it in the VM beside DRBD and metroblk, under the same
//! netem: at depth 1 it measures the round trip the link really has (netem's delay plus the
//! kernel's and the VM's own time), at depth 32 the bound a zero-work pipeline reaches, so the
//! mirrors' `depth / RTT` ratios can be read against both.
//!
//! `cargo run --release -p metroblk-benches --bin link_pipeline -- [--depth 32] [--size 4136]
//!  [--seconds 5]`

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The reply to one request (an ack frame is 40 bytes; the size matters little here).
const REPLY_LEN: usize = 16;
/// Limits on the arguments: requests in flight and bytes per request.
const DEPTH_MAX: usize = 1024;
const SIZE_MAX: usize = 1 << 20;
const SECONDS_MAX: u64 = 600;
/// A reply that takes longer than this ends the run with an error (a link that stopped).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

struct Args {
    depth: usize,
    size: usize,
    seconds: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { depth: 32, size: 4096 + 40, seconds: 5 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let n: u64 = value.parse().map_err(|_| format!("{flag} {value}: not a whole number"))?;
        match flag.as_str() {
            "--depth" if (1..=DEPTH_MAX as u64).contains(&n) => a.depth = n as usize,
            "--size" if (1..=SIZE_MAX as u64).contains(&n) => a.size = n as usize,
            "--seconds" if (1..=SECONDS_MAX).contains(&n) => a.seconds = n,
            "--depth" | "--size" | "--seconds" => return Err(format!("{flag} {value}: out of range")),
            _ => return Err(format!("unknown option {flag} (--depth, --size, --seconds)")),
        }
    }
    Ok(a)
}

/// Answers each whole request with one reply; the replies of what one read brought leave in
/// one write, as the secondary's acks of one receive do.
fn serve(mut conn: TcpStream, size: usize) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = vec![0u8; 1 << 20];
    let replies = vec![b'a'; REPLY_LEN * DEPTH_MAX];
    let mut partial = 0usize;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        partial += n;
        let whole = partial / size;
        partial %= size;
        // At most DEPTH_MAX requests are in flight, so one read holds no more whole ones.
        assert!(whole <= DEPTH_MAX);
        conn.write_all(&replies[..whole * REPLY_LEN])?;
    }
}

fn run(a: &Args) -> std::io::Result<(u64, Duration, Vec<Duration>)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let size = a.size;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (conn, _) = listener.accept()?;
        serve(conn, size)
    });
    let conn = TcpStream::connect(addr)?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut reader = conn.try_clone()?;
    let mut writer = conn.try_clone()?;
    // The writer sends a request for each reply the reader counted (`more`), stamping its
    // send time (`sent`) in order: replies come back in order on one connection.
    let (sent_tx, sent_rx) = mpsc::channel::<Instant>();
    let (more_tx, more_rx) = mpsc::channel::<usize>();
    let request = vec![b'x'; a.size];
    let depth = a.depth;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut n = depth;
        loop {
            for _ in 0..n {
                // The receiver is gone only when the run ended.
                if sent_tx.send(Instant::now()).is_err() {
                    return Ok(());
                }
                writer.write_all(&request)?;
            }
            match more_rx.recv() {
                Ok(k) => n = k,
                Err(_) => return Ok(()),
            }
        }
    });
    let start = Instant::now();
    let end = start + Duration::from_secs(a.seconds);
    // The latencies of the first 64 Ki replies (a bound on memory); the rate counts them all.
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut done = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let mut partial = 0usize;
    while Instant::now() < end {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other("the server closed the connection"));
        }
        partial += n;
        let whole = partial / REPLY_LEN;
        partial %= REPLY_LEN;
        let now = Instant::now();
        for _ in 0..whole {
            let sent = sent_rx.recv().map_err(|_| std::io::Error::other("a reply to nothing sent"))?;
            if latencies.len() < latencies.capacity() {
                latencies.push(now - sent);
            }
        }
        done += whole as u64;
        if whole > 0 && more_tx.send(whole).is_err() {
            return Err(std::io::Error::other("the sender stopped"));
        }
    }
    let elapsed = start.elapsed();
    drop(more_tx);
    drop(sent_rx);
    conn.shutdown(Shutdown::Both)?;
    // Either side may see the shutdown as an error: the run is over.
    let _ = sender.join();
    let _ = server.join();
    Ok((done, elapsed, latencies))
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("link_pipeline: {e}");
            std::process::exit(2);
        }
    };
    let (done, elapsed, mut lat) = match run(&a) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("link_pipeline: {e}");
            std::process::exit(1);
        }
    };
    if lat.is_empty() {
        eprintln!("link_pipeline: no reply came back in {} s", a.seconds);
        std::process::exit(1);
    }
    lat.sort_unstable();
    let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)].as_secs_f64() * 1e3;
    let line = serde_json::json!({
        "depth": a.depth,
        "size": a.size,
        "requests_per_s": (done as f64 / elapsed.as_secs_f64()).round(),
        "lat_p50_ms": pct(50),
        "lat_p99_ms": pct(99),
    });
    println!("{line}");
}
