//! A superseded link can never apply a frame. A test client speaks the real protocol to a real
//! secondary (`metroblk node run`) as the primary would: it leaves a WRITE half-sent on link
//! session 1, opens session 2 for the same queue, writes the same block there and gets the ack,
//! then finishes session 1's write. The secondary must hold session 2's data, and session 1
//! must get no ack.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use metroblk::config::NodeConfig;
use metroblk_protocol::{decode_header, run_handshake, Frame, FrameKind, Geometry, Handshake, Role, HEADER_LEN};
use metroblk_tests::cluster::{
    admit_fake_primary, free_port, hello_for, wait_until, write_config, NodeProcess, NodeSpec, TEST_KEY,
};

const VOLUME: u64 = 16 << 20;
const BLOCK: u64 = 8 << 20;

fn dial(port: u16, cfg: &metroblk::config::VolumeConfig, session: u64) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = hello_for("alpha", cfg, session, session as u8);
    run_handshake(&mut s, Handshake::new(Role::Dialer, hello, TEST_KEY.as_bytes(), "beta")).unwrap();
    s
}

fn write_frame(seq: u64, fill: u8) -> ([u8; HEADER_LEN], Vec<u8>) {
    let data = vec![fill; 4096];
    let mut h = [0u8; HEADER_LEN];
    Frame::write(seq, 1, BLOCK, &data, false).encode(&mut h);
    (h, data)
}

#[test]
fn a_write_half_sent_on_a_superseded_link_is_never_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let beta = write_config(
        dir.path(),
        &NodeSpec {
            name: "beta",
            peer: "alpha",
            role: "secondary",
            size: VOLUME,
            listen_port: pb,
            peer_port: pa,
            key: TEST_KEY,
            extra: "",
        },
    );
    let mut secondary = NodeProcess::start(&beta);
    secondary.wait_ready(Duration::from_secs(10));
    let cfg = NodeConfig::load(&beta).unwrap().volumes[0].clone();
    let geo = Geometry { volume_size: cfg.size, block_size: cfg.block_size, max_payload: 1 << 20 };

    // Session 1: a WRITE of 0xAA whose payload is only half sent.
    // The sync exchange first, as a real primary does, so the secondary lets data links in.
    admit_fake_primary(pb, &cfg);
    let mut old = dial(pb, &cfg, 1);
    let (h1, d1) = write_frame(1 << 16, 0xAA);
    old.write_all(&h1).unwrap();
    old.write_all(&d1[..2048]).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    // Session 2 for the same queue: 0xBB to the same block, acknowledged.
    let mut new = dial(pb, &cfg, 2);
    let (h2, d2) = write_frame(2 << 16, 0xBB);
    new.write_all(&h2).unwrap();
    new.write_all(&d2).unwrap();
    let mut ack = [0u8; HEADER_LEN];
    new.read_exact(&mut ack).unwrap();
    let f = decode_header(&ack, &geo).unwrap();
    assert_eq!((f.kind, f.seq, f.status), (FrameKind::WriteAck, 2 << 16, 0));

    // The rest of session 1's write arrives late (if its socket still takes it).
    let _ = old.write_all(&d1[2048..]);
    // Session 1 gets no ack: it ends (EOF or reset) without one.
    old.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; HEADER_LEN];
    let t0 = Instant::now();
    match old.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => {
            let got = decode_header(&buf, &geo);
            panic!("the superseded link sent {n} bytes: {got:?}");
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "the superseded link was not closed");

    // A flush on the live link, then the block must hold session 2's data.
    let mut fh = [0u8; HEADER_LEN];
    Frame::flush(3 << 16, 1).encode(&mut fh);
    new.write_all(&fh).unwrap();
    new.read_exact(&mut ack).unwrap();
    assert_eq!(decode_header(&ack, &geo).unwrap().kind, FrameKind::FlushAck);
    let data = std::fs::read(dir.path().join("beta-vol0.img")).unwrap();
    let block = &data[BLOCK as usize..BLOCK as usize + 4096];
    assert!(block.iter().all(|&b| b == 0xBB), "the block holds {:#x}.. : a superseded write landed", block[0]);
    assert!(secondary.log_text().contains("superseded by a newer link"), "{}", secondary.log_text());

    // An older session than the live one is refused.
    let mut stale = dial(pb, &cfg, 1);
    let mut one = [0u8; 1];
    assert!(matches!(stale.read(&mut one), Ok(0) | Err(_)), "an older session was served");
    // The refusal is logged just after the socket closed.
    wait_until(Duration::from_secs(5), "the refusal of the older session in the log", || {
        secondary.log_text().contains("is not newer than session 2, which is still open")
    });
}
