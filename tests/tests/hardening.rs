//! Nobody without the key can wedge a node, and a node keeps its files to itself. Real
//! processes on loopback: a secondary `metroblk node run`, a primary through the engine API,
//! and attackers that are plain TCP sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use metroblk::config::NodeConfig;
use metroblk::lifecycle::parts::PrimaryEngine;
use metroblk::volume::QueueDriver;
use metroblk_tests::cluster::{
    admit_fake_primary, hello_for, metroblk_bin, pair_configs, wait_until, NodeProcess, TEST_KEY,
};

const VOLUME: u64 = 16 << 20;

fn configs(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, u16) {
    let p = pair_configs(dir, VOLUME);
    (p.alpha, p.beta, p.beta_port)
}

/// Opens the primary engine and returns how long its link took to come up.
fn time_to_link(alpha: &Path) -> Duration {
    let cfg = NodeConfig::load(alpha).unwrap();
    let t0 = Instant::now();
    let vol = PrimaryEngine::open(&cfg.volumes[0], "alpha", 1).unwrap();
    let mut drv = QueueDriver::new(vol.queue(0, 4)).unwrap();
    while !drv.queue().link_is_up() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the primary's link did not come up");
        drv.poll(Some(Duration::from_millis(5)), |_, _| {}).unwrap();
    }
    t0.elapsed()
}

/// True once the other side has closed `s` (EOF or reset), polling for up to `within`.
fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut b = [0u8; 512];
    while Instant::now() < deadline {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn two_hundred_tricklers_do_not_delay_the_real_primary() {
    let dir = tempfile::tempdir().unwrap();
    let (alpha, beta, port) = configs(dir.path());
    let mut secondary = NodeProcess::start(&beta);
    secondary.wait_ready(Duration::from_secs(10));
    let baseline = time_to_link(&alpha);

    // 200 connections from the peer's own address (the worst case: behind the same NAT),
    // each sending a byte of a hello a second and never finishing.
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut attackers: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let started = Instant::now();
    for s in &mut attackers {
        s.write_all(b"M").unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let with_attack = time_to_link(&alpha);
    assert!(
        with_attack < baseline + Duration::from_secs(1),
        "200 trickling connections delayed the link from {baseline:?} to {with_attack:?}"
    );

    // Keep trickling: the listener cuts each at its absolute 5 s deadline, not per byte.
    while started.elapsed() < Duration::from_secs(7) {
        std::thread::sleep(Duration::from_millis(1000));
        for s in &mut attackers {
            let _ = s.write_all(b"B");
        }
    }
    for s in &mut attackers {
        assert!(closed_by_peer(s, Duration::from_secs(2)), "a trickler was still open after {:?}", started.elapsed());
    }
    assert!(secondary.log_text().contains("did not finish the handshake within 5 s"), "{}", secondary.log_text());
}

#[test]
fn a_connection_from_a_non_peer_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_alpha, beta, port) = configs(dir.path());
    let mut secondary = NodeProcess::start(&beta);
    secondary.wait_ready(Duration::from_secs(10));
    // Loopback has all of 127/8: connect from 127.0.0.2, which is not the configured peer.
    let sock = socket2_bind_connect([127, 0, 0, 2], port);
    let mut s = sock;
    assert!(closed_by_peer(&mut s, Duration::from_secs(2)), "a stranger's connection stayed open");
    wait_until(Duration::from_secs(5), "the refusal in the log", || {
        secondary.log_text().contains("refused link from 127.0.0.2:")
            && secondary.log_text().contains("not the peer's address")
    });
}

/// A TCP connection to 127.0.0.1:`port` from the local address `from` (std cannot bind before
/// connect, so this goes through libc).
fn socket2_bind_connect(from: [u8; 4], port: u16) -> TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor we create and own; sockaddr_in is fully
    // initialised and passed with its size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let sa = |ip: [u8; 4], port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip) },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sa(from, 0);
        assert_eq!(libc::bind(fd, &local as *const _ as *const libc::sockaddr, len), 0, "bind 127.0.0.2");
        let remote = sa([127, 0, 0, 1], port);
        assert_eq!(libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len), 0, "connect");
        TcpStream::from_raw_fd(fd)
    }
}

#[test]
fn files_are_private_and_nothing_is_unlinked_that_is_not_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (_alpha, beta, _) = configs(dir.path());
    let mut secondary = NodeProcess::start(&beta);
    secondary.wait_ready(Duration::from_secs(10));
    let mode = std::fs::metadata(dir.path().join("beta-vol0.img")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "backing file created with mode {mode:o}");

    // `status` needs no authkey: it works with the key file gone.
    std::fs::remove_file(dir.path().join("beta.key")).unwrap();
    let out = Command::new(metroblk_bin()).args(["status", "--config"]).arg(&beta).output().unwrap();
    assert!(out.status.success(), "status without a key: {}", String::from_utf8_lossy(&out.stderr));
    drop(secondary);

    // A key readable by others is refused with one line.
    std::fs::write(dir.path().join("beta.key"), TEST_KEY).unwrap();
    std::fs::set_permissions(dir.path().join("beta.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(metroblk_bin()).args(["node", "check", "--config"]).arg(&beta).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("chmod 600") && err.trim().lines().count() == 1, "{err}");
    std::fs::set_permissions(dir.path().join("beta.key"), std::fs::Permissions::from_mode(0o600)).unwrap();

    // A regular file where the control socket goes is an error, and it is left alone.
    let sock = dir.path().join("beta.sock");
    let _ = std::fs::remove_file(&sock);
    std::fs::write(&sock, "precious").unwrap();
    let out = Command::new(metroblk_bin()).args(["node", "run", "--config"]).arg(&beta).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "node started over a regular file: {err}");
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&sock).unwrap(), "precious");
}

#[test]
fn a_silent_authenticated_link_is_closed_by_the_secondary() {
    use metroblk_protocol::{run_handshake, Handshake, HelloInfo, Role};
    let dir = tempfile::tempdir().unwrap();
    let (alpha, beta, port) = configs(dir.path());
    let mut secondary = NodeProcess::start(&beta);
    secondary.wait_ready(Duration::from_secs(10));
    let cfg = NodeConfig::load(&alpha).unwrap().volumes[0].clone();
    // A primary that authenticates and then says nothing, not even PINGs: half-open as far
    // as the secondary can tell.
    admit_fake_primary(port, &cfg);
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = hello_for("alpha", &cfg, 1, 9);
    run_handshake(&mut s, Handshake::new(Role::Dialer, hello.clone(), TEST_KEY.as_bytes(), "beta")).unwrap();
    let t0 = Instant::now();
    assert!(closed_by_peer(&mut s, Duration::from_secs(10)), "the secondary kept a silent link");
    let after = t0.elapsed();
    assert!(after >= Duration::from_secs(4), "closed after {after:?}, before the peer timeout");
    wait_until(Duration::from_secs(3), "the reason in the log", || {
        secondary.log_text().contains("nothing heard from the primary")
    });
    // The slot is free again: the status no longer counts the link.
    wait_until(Duration::from_secs(3), "the link to be gone", || {
        secondary.status_json()["volumes"][0]["link_state"] == "connecting"
    });
    // And so is its session: while it was open, session 1 again would have been refused as
    // not newer; now a link with it is served (a PING is answered).
    let mut again = TcpStream::connect(("127.0.0.1", port)).unwrap();
    again.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let hello = HelloInfo { nonce: [10; 32], ..hello };
    run_handshake(&mut again, Handshake::new(Role::Dialer, hello, TEST_KEY.as_bytes(), "beta")).unwrap();
    let mut ping = [0u8; metroblk_protocol::HEADER_LEN];
    metroblk_protocol::Frame::ping(77).encode(&mut ping);
    again.write_all(&ping).unwrap();
    let mut pong = [0u8; metroblk_protocol::HEADER_LEN];
    again.read_exact(&mut pong).expect("the secondary serves the new link");
    let geo = metroblk_protocol::Geometry { volume_size: cfg.size, block_size: cfg.block_size, max_payload: 1 << 20 };
    let f = metroblk_protocol::decode_header(&pong, &geo).unwrap();
    assert_eq!((f.kind, f.seq), (metroblk_protocol::FrameKind::Pong, 77));
}
