//! A man in the middle of the peer link, for tests/tests/tls.rs: relays every connection made
//! to `LISTEN` on to `TARGET`, appends every byte the dialer sent to `CAPTURE` (what a tap on
//! the wire would see), and, once the file `FLIP` exists, flips one bit in the middle of the
//! next chunk of at least 1 KiB the dialer sends on a link that is past its handshake (up for
//! a second), then removes `FLIP` and prints `flipped` (one flip per `FLIP`).
//!
//! Usage: `mitm_relay LISTEN TARGET CAPTURE FLIP`. Runs until killed.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A link younger than this may still be in its TLS handshake: never tampered with.
const HANDSHAKE_DONE_AFTER: Duration = Duration::from_secs(1);
/// The smallest chunk that is surely a data record with a payload (not a keepalive).
const FLIP_CHUNK_MIN: usize = 1024;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, target, capture, flip] = &args[..] else {
        eprintln!("usage: mitm_relay LISTEN TARGET CAPTURE FLIP");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(listen).unwrap_or_else(|e| {
        eprintln!("mitm_relay: cannot listen on {listen}: {e}");
        std::process::exit(1)
    });
    let capture = Arc::new(Mutex::new(
        OpenOptions::new().create(true).append(true).open(capture).expect("opening the capture file"),
    ));
    let flip = PathBuf::from(flip);
    eprintln!("mitm_relay: {listen} -> {target}");
    for dialer in listener.incoming().flatten() {
        let Ok(server) = TcpStream::connect(target) else {
            eprintln!("mitm_relay: cannot reach {target}");
            continue;
        };
        let (d2, s2) = (dialer.try_clone().expect("clone"), server.try_clone().expect("clone"));
        let (capture, flip) = (capture.clone(), flip.clone());
        std::thread::spawn(move || forward(dialer, server, Some((capture, flip))));
        std::thread::spawn(move || forward(s2, d2, None));
    }
}

/// Copies `from` to `to` until either ends; the dialer's direction is captured and may flip.
fn forward(mut from: TcpStream, mut to: TcpStream, tap: Option<(Arc<Mutex<std::fs::File>>, PathBuf)>) {
    let up_since = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((capture, flip)) = &tap {
            let _ = capture.lock().unwrap_or_else(|p| p.into_inner()).write_all(&buf[..n]);
            if n >= FLIP_CHUNK_MIN && up_since.elapsed() >= HANDSHAKE_DONE_AFTER && take(flip) {
                buf[n / 2] ^= 0x01;
                println!("flipped");
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// True once for each appearance of the trigger file (removing it is the claim).
fn take(flip: &Path) -> bool {
    std::fs::remove_file(flip).is_ok()
}
