//! A lying peer: a fake secondary in this test speaks the real handshake over real TCP and
//! then acknowledges frames it was never sent, or with the wrong kind. The primary must drop
//! the link (never complete the write on such an ack, never panic) and go on working: on a
//! link whose peer behaves, the held write is re-sent and completes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metroblk::config::NodeConfig;
use metroblk::lifecycle::parts::PrimaryEngine;
use metroblk::volume::{QueueDriver, ReqKind, Request};
use metroblk_protocol::{decode_header, run_handshake, Frame, FrameKind, Geometry, Handshake, Role, HEADER_LEN};
use metroblk_tests::cluster::{answer_sync_as_fake_secondary, free_port, hello_for, write_config, NodeSpec, TEST_KEY};

const VOLUME: u64 = 16 << 20;

/// Accepts one data link as the secondary "beta" would and authenticates it; sync links that
/// arrive meanwhile are answered as an in-sync copy.
fn accept_link(listener: &TcpListener, cfg: &metroblk::config::VolumeConfig) -> TcpStream {
    loop {
        let (s, _) = listener.accept().unwrap();
        if let Some(s) = handshake_accepted(s, cfg) {
            return s;
        }
    }
}

/// Authenticates an accepted link; a sync link is answered (and None returned).
fn handshake_accepted(mut s: TcpStream, cfg: &metroblk::config::VolumeConfig) -> Option<TcpStream> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = hello_for("beta", cfg, 0, 7);
    let peer = run_handshake(&mut s, Handshake::new(Role::Listener, hello, TEST_KEY.as_bytes(), "alpha")).unwrap();
    if peer.queue == metroblk_protocol::SYNC_QUEUE {
        answer_sync_as_fake_secondary(s, cfg);
        return None;
    }
    Some(s)
}

/// Reads frames until a WRITE arrives (PINGs are answered); returns it.
fn read_write_frame(s: &mut TcpStream, geo: &Geometry) -> Frame {
    loop {
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let f = decode_header(&h, geo).unwrap();
        let mut payload = vec![0u8; f.payload_len()];
        s.read_exact(&mut payload).unwrap();
        match f.kind {
            FrameKind::Write => return f,
            FrameKind::Ping => send(s, Frame::pong(f.seq)),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn send(s: &mut TcpStream, f: Frame) {
    let mut h = [0u8; HEADER_LEN];
    f.encode(&mut h);
    s.write_all(&h).unwrap();
}

/// True once the primary has closed the connection (EOF or reset).
fn closed_by_primary(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn acks_for_frames_not_sent_or_of_the_wrong_kind_drop_the_link_and_complete_nothing() {
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
            extra: "",
        },
    );
    let listener = TcpListener::bind(("127.0.0.1", pb)).unwrap();
    let cfg = NodeConfig::load(&alpha).unwrap().volumes[0].clone();
    let geo = Geometry { volume_size: cfg.size, block_size: cfg.block_size, max_payload: 1 << 20 };

    let good_ack = Arc::new(AtomicBool::new(false));
    let fake = std::thread::spawn({
        let good_ack = good_ack.clone();
        move || {
            // 1: an ack for a request never sent.
            let mut s = accept_link(&listener, &cfg);
            let f = read_write_frame(&mut s, &geo);
            send(&mut s, Frame::write_ack(f.seq ^ 0x5, 0));
            assert!(closed_by_primary(&mut s, Duration::from_secs(5)), "link kept after an ack for a frame not sent");
            // 2: the held write comes again; ack it with the wrong kind.
            let mut s = accept_link(&listener, &cfg);
            let g = read_write_frame(&mut s, &geo);
            assert_eq!((g.offset, g.length), (f.offset, f.length), "the held write is re-sent");
            send(&mut s, Frame::flush_ack(g.seq, 0));
            assert!(closed_by_primary(&mut s, Duration::from_secs(5)), "link kept after a FLUSH_ACK for a WRITE");
            // 3: an ack naming a tag beyond the queue's depth.
            let mut s = accept_link(&listener, &cfg);
            send(&mut s, Frame::write_ack((g.seq & !0xffff) | 1000, 0));
            let closed = closed_by_primary(&mut s, Duration::from_secs(5));
            // 4: a well-behaved link: the write completes.
            let mut s4 = accept_link(&listener, &cfg);
            let h = read_write_frame(&mut s4, &geo);
            good_ack.store(true, Ordering::SeqCst);
            send(&mut s4, Frame::write_ack(h.seq, 0));
            (closed, s4)
        }
    });

    let vol = PrimaryEngine::open(&cfg_of(&alpha), "alpha", 1).unwrap();
    let mut drv = QueueDriver::new(vol.queue(0, 4)).unwrap();
    let mut mem = vec![0xA5u8; 8192];
    let buf = ((mem.as_mut_ptr() as usize + 4095) & !4095) as *mut u8;
    drv.submit(1, Request { kind: ReqKind::Write, offset: 4096, len: 4096, fua: false, buf }).unwrap();
    let mut result = None;
    let deadline = Instant::now() + Duration::from_secs(40);
    while result.is_none() {
        assert!(Instant::now() < deadline, "the write never completed");
        drv.poll(Some(Duration::from_millis(50)), |tag, res| {
            assert_eq!(tag, 1);
            result = Some(res);
        })
        .unwrap();
        if result.is_some() {
            assert!(good_ack.load(Ordering::SeqCst), "the write completed before the well-behaved peer acked it");
        }
    }
    assert_eq!(result, Some(4096));
    let (third_closed, _s4) = fake.join().unwrap();
    assert!(third_closed, "link kept after an ack on a link that had sent nothing");
    let reconnects = metroblk::volume::stats::QueueStats::get(&vol.shared.queue_stats[0].reconnects);
    assert_eq!(reconnects, 3, "each lying link was dropped once");
}

fn cfg_of(path: &std::path::Path) -> metroblk::config::VolumeConfig {
    NodeConfig::load(path).unwrap().volumes[0].clone()
}

#[test]
fn hostile_error_text_from_the_peer_is_sanitised_before_logs_and_status() {
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
            extra: "",
        },
    );
    let listener = TcpListener::bind(("127.0.0.1", pb)).unwrap();
    let cfg = cfg_of(&alpha);
    let fake = std::thread::spawn({
        let cfg = cfg.clone();
        move || {
            let mut s = accept_link(&listener, &cfg);
            let text = b"\x1b[2J\x1b[31mdisk on fire\nINFO forged: all good\r";
            let mut h = [0u8; HEADER_LEN];
            Frame::error(-libc::EIO, text).encode(&mut h);
            s.write_all(&h).unwrap();
            s.write_all(text).unwrap();
            closed_by_primary(&mut s, Duration::from_secs(5))
        }
    });
    let vol = PrimaryEngine::open(&cfg, "alpha", 1).unwrap();
    let mut drv = QueueDriver::new(vol.queue(0, 4)).unwrap();
    let h = vol.handoff(0).clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.last_error().is_some_and(|e| e.contains("disk on fire")) {
        assert!(Instant::now() < deadline, "the peer's error never reached the link error");
        drv.poll(Some(Duration::from_millis(20)), |_, _| {}).unwrap();
    }
    let e = h.last_error().unwrap();
    assert!(!e.chars().any(|c| c.is_control()), "control characters reached status: {e:?}");
    assert!(fake.join().unwrap(), "the primary kept the link after an ERROR frame");
}

#[test]
fn a_peer_that_ends_every_link_with_an_error_is_redialled_at_the_longest_backoff() {
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
            extra: "",
        },
    );
    let listener = TcpListener::bind(("127.0.0.1", pb)).unwrap();
    let cfg = cfg_of(&alpha);
    // Every link is authenticated and then ended at once with an ERROR frame, as a peer with a
    // failed disk or a newer epoch does. Count the links in 4 s.
    let counter = std::thread::spawn({
        let cfg = cfg.clone();
        move || {
            listener.set_nonblocking(true).unwrap();
            let t0 = Instant::now();
            let mut links = 0;
            while t0.elapsed() < Duration::from_secs(4) {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        let Some(mut s) = handshake_accepted(s, &cfg) else { continue };
                        let text = b"stale epoch";
                        let mut h = [0u8; HEADER_LEN];
                        Frame::error(-libc::ESTALE, text).encode(&mut h);
                        let _ = s.write_all(&h).and_then(|()| s.write_all(text));
                        links += 1;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            links
        }
    });
    let vol = PrimaryEngine::open(&cfg, "alpha", 1).unwrap();
    let mut drv = QueueDriver::new(vol.queue(0, 4)).unwrap();
    while !counter.is_finished() {
        drv.poll(Some(Duration::from_millis(10)), |_, _| {}).unwrap();
    }
    let links = counter.join().unwrap();
    // Every link ends in a peer error, so the primary waits the longest backoff (2 s) each
    // time: about 2 links in 4 s (doubling from 50 ms would give about 7; no backoff, hundreds).
    assert!((2..=4).contains(&links), "{links} links in 4 s");
}
