//! The secondary takes frames however TCP cuts them. A test client speaks the real protocol to
//! a real secondary (`metroblk node run`) as a primary would, and sends WRITEs of 512 B to
//! 128 KiB: first many frames in one `write` (so one receive brings many headers and payloads
//! at once, and payloads straddle receives), then frames trickled a few bytes per `write`
//! (every header and payload cut into pieces). Every write must be acknowledged with success,
//! once, and the backing file must hold exactly what was sent.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use metroblk_protocol::{decode_header, Frame, FrameKind, Geometry, HEADER_LEN};
use metroblk_tests::cluster::FakePrimaryTarget;

const VOLUME: u64 = 16 << 20;

/// A WRITE of `len` bytes at `offset`, its bytes derived from `seq`.
fn write_frame(seq: u64, offset: u64, len: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..len).map(|i| (seq as usize * 31 + i * 7 + i / 4096) as u8).collect();
    let mut h = [0u8; HEADER_LEN];
    Frame::write(seq, 1, offset, &data, false, true).encode(&mut h);
    let mut out = h.to_vec();
    out.extend_from_slice(&data);
    out
}

/// Reads `n` acks and checks that each is a successful WRITE_ACK for one of `seqs`, once.
fn expect_acks(s: &mut TcpStream, geo: &Geometry, seqs: &[u64]) {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..seqs.len() {
        let mut ack = [0u8; HEADER_LEN];
        s.read_exact(&mut ack).expect("an ack for every write");
        let f = decode_header(&ack, geo).unwrap();
        assert_eq!((f.kind, f.status), (FrameKind::WriteAck, 0), "ack {f:?}");
        assert!(seqs.contains(&f.seq), "ack for seq {:#x}, never sent", f.seq);
        assert!(seen.insert(f.seq), "seq {:#x} acknowledged twice", f.seq);
    }
}

#[test]
fn frames_are_taken_however_tcp_cuts_them() {
    let dir = tempfile::tempdir().unwrap();
    let t = FakePrimaryTarget::start(dir.path(), VOLUME);
    let geo = t.geo;
    let mut s = t.dial(1);
    s.set_nodelay(true).unwrap();

    let mut expected = vec![0u8; VOLUME as usize];
    let sizes = [512usize, 4096, 65536, 131072, 4096, 8192, 512, 131072];
    let mut offset = 0u64;
    let mut seq = 1u64 << 16;
    let mut next = |len: usize, expected: &mut Vec<u8>| {
        let frame = write_frame(seq, offset, len);
        expected[offset as usize..offset as usize + len].copy_from_slice(&frame[HEADER_LEN..]);
        let out = (seq, frame);
        seq += 1 << 16;
        offset += len as u64;
        out
    };

    // Rounds of 48 frames (fewer than the secondary's 64 slots) in one write each.
    for _round in 0..3 {
        let mut batch = Vec::new();
        let mut seqs = Vec::new();
        for i in 0..48 {
            let (q, f) = next(sizes[i % sizes.len()], &mut expected);
            seqs.push(q);
            batch.extend_from_slice(&f);
        }
        s.write_all(&batch).unwrap();
        expect_acks(&mut s, &geo, &seqs);
    }

    // Frames trickled in pieces of 1 to 7 bytes (the first 600 bytes of a large payload, the
    // rest in one go: the point is the cuts inside headers and at the payload's start).
    for (i, &len) in sizes.iter().enumerate() {
        let (q, f) = next(len, &mut expected);
        let mut at = 0;
        let mut piece = 1 + i % 7;
        while at < f.len().min(HEADER_LEN + 600) {
            let end = (at + piece).min(f.len());
            s.write_all(&f[at..end]).unwrap();
            at = end;
            piece = piece % 7 + 1;
            std::thread::sleep(Duration::from_micros(200));
        }
        s.write_all(&f[at..]).unwrap();
        expect_acks(&mut s, &geo, &[q]);
    }

    // A flush, then the file holds what was written.
    let mut fh = [0u8; HEADER_LEN];
    Frame::flush(seq, 1).encode(&mut fh);
    s.write_all(&fh).unwrap();
    let mut ack = [0u8; HEADER_LEN];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(decode_header(&ack, &geo).unwrap().kind, FrameKind::FlushAck);
    let data = std::fs::read(dir.path().join("beta-vol0.img")).unwrap();
    assert!(offset < VOLUME);
    if data[..offset as usize] != expected[..offset as usize] {
        let first = (0..offset as usize).find(|&i| data[i] != expected[i]).unwrap();
        panic!("the backing file differs from what was sent, first at byte {first}");
    }
}
