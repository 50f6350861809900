//! A superseded link can never apply a frame. A test client speaks the real protocol to a real
//! secondary (`metroblk node run`) as the primary would: it leaves a WRITE half-sent on link
//! session 1, opens session 2 for the same queue, writes the same block there and gets the ack,
//! then finishes session 1's write. The secondary must hold session 2's data, and session 1
//! must get no ack.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use metroblk_protocol::{decode_header, Frame, FrameKind, HEADER_LEN};
use metroblk_tests::cluster::{wait_until, FakePrimaryTarget};

const VOLUME: u64 = 16 << 20;
const BLOCK: u64 = 8 << 20;

fn write_frame(seq: u64, fill: u8) -> ([u8; HEADER_LEN], Vec<u8>) {
    let data = vec![fill; 4096];
    let mut h = [0u8; HEADER_LEN];
    Frame::write(seq, 1, BLOCK, &data, false, true).encode(&mut h);
    (h, data)
}

#[test]
fn a_write_half_sent_on_a_superseded_link_is_never_applied() {
    let dir = tempfile::tempdir().unwrap();
    // The sync exchange first, as a real primary does, so the secondary lets data links in.
    let t = FakePrimaryTarget::start(dir.path(), VOLUME);
    let geo = t.geo;

    // Session 1: a WRITE of 0xAA whose payload is only half sent.
    let mut old = t.dial(1);
    let (h1, d1) = write_frame(1 << 16, 0xAA);
    old.write_all(&h1).unwrap();
    old.write_all(&d1[..2048]).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    // Session 2 for the same queue: 0xBB to the same block, acknowledged.
    let mut new = t.dial(2);
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
    assert!(t.secondary.log_text().contains("superseded by a newer link"), "{}", t.secondary.log_text());

    // An older session than the live one is refused.
    let mut stale = t.dial(1);
    let mut one = [0u8; 1];
    assert!(matches!(stale.read(&mut one), Ok(0) | Err(_)), "an older session was served");
    // The refusal is logged just after the socket closed.
    wait_until(Duration::from_secs(5), "the refusal of the older session in the log", || {
        t.secondary.log_text().contains("is not newer than session 2, which is still open")
    });
}
