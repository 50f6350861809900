//! Property tests: no input makes a decoder panic, and every valid frame survives the wire.

use metroblk_protocol::{
    decode_header, verify_payload, Frame, FrameKind, Geometry, Handshake, HelloInfo, Role, FLAG_FUA, FLAG_UNCHECKED,
    HEADER_LEN, MAX_ERROR_TEXT, MAX_PAYLOAD,
};
use proptest::prelude::*;

fn geometry() -> impl Strategy<Value = Geometry> {
    (any::<u64>(), prop_oneof![Just(0u32), Just(512), Just(4096), any::<u32>()], any::<u32>())
        .prop_map(|(volume_size, block_size, max_payload)| Geometry { volume_size, block_size, max_payload })
}

const GEO: Geometry = Geometry { volume_size: 1 << 40, block_size: 512, max_payload: MAX_PAYLOAD };

fn hello(name: &str, nonce: [u8; 32]) -> HelloInfo {
    HelloInfo {
        node_name: name.into(),
        volume_uuid: [9; 16],
        volume_size: 1 << 30,
        region_size: 65536,
        block_size: 4096,
        queue: 1,
        session: 7,
        epoch: 2,
        nonce,
    }
}

/// A valid frame of any kind, with the payload it carries.
fn valid_frame() -> impl Strategy<Value = (Frame, Vec<u8>)> {
    // Offsets in 512-byte sectors up to half of GEO, so that offset + the longest length
    // (512 MiB) stays inside it.
    let sector = 0u64..(1 << 30);
    prop_oneof![
        (any::<u64>(), any::<u64>(), sector.clone(), 1usize..=64, any::<bool>(), any::<u8>()).prop_map(
            |(seq, epoch, s, n, fua, fill)| {
                let data = vec![fill; n * 512];
                (Frame::write(seq, epoch, s * 512, &data, fua, true), data)
            }
        ),
        (any::<u64>(), any::<i32>()).prop_map(|(s, st)| (Frame::write_ack(s, st), vec![])),
        (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(|(s, e, fua)| {
            let mut f = Frame::flush(s, e);
            if fua {
                f.flags = FLAG_FUA;
            }
            (f, vec![])
        }),
        (any::<u64>(), any::<i32>()).prop_map(|(s, st)| (Frame::flush_ack(s, st), vec![])),
        (any::<u64>(), any::<u64>(), sector.clone(), 1u32..=(1 << 20))
            .prop_map(|(s, e, o, n)| (Frame::discard(s, e, o * 512, n * 512), vec![])),
        (any::<u64>(), any::<u64>(), sector, 1u32..=(1 << 20))
            .prop_map(|(s, e, o, n)| (Frame::write_zeroes(s, e, o * 512, n * 512), vec![])),
        any::<u64>().prop_map(|s| (Frame::ping(s), vec![])),
        any::<u64>().prop_map(|s| (Frame::pong(s), vec![])),
        (any::<i32>(), proptest::collection::vec(any::<u8>(), 0..=MAX_ERROR_TEXT as usize))
            .prop_map(|(c, t)| (Frame::error(c, &t), t)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decode_header_never_panics(bytes in proptest::array::uniform32(any::<u8>()),
                                  tail in proptest::array::uniform8(any::<u8>()),
                                  geo in geometry()) {
        let mut buf = [0u8; HEADER_LEN];
        buf[..32].copy_from_slice(&bytes);
        buf[32..].copy_from_slice(&tail);
        if let Ok(f) = decode_header(&buf, &geo) {
            let _ = f.payload_len();
            let _ = verify_payload(&f, &bytes);
        }
        // Same bytes behind a valid magic and kind reach the deeper checks.
        buf[0..2].copy_from_slice(&0xB10Cu16.to_le_bytes());
        buf[2] = 1 + bytes[2] % 9;
        if let Ok(f) = decode_header(&buf, &geo) {
            prop_assert!(f.flags & !(FLAG_FUA | FLAG_UNCHECKED) == 0);
            let _ = verify_payload(&f, &tail);
        }
    }

    #[test]
    fn valid_frames_round_trip((frame, payload) in valid_frame()) {
        let mut buf = [0u8; HEADER_LEN];
        frame.encode(&mut buf);
        let back = decode_header(&buf, &GEO);
        prop_assert_eq!(back, Ok(frame));
        prop_assert_eq!(frame.payload_len(), payload.len());
        prop_assert_eq!(verify_payload(&frame, &payload), Ok(()));
        if frame.kind == FrameKind::Write {
            let mut bad = payload.clone();
            bad[0] ^= 0xFF;
            prop_assert!(verify_payload(&frame, &bad).is_err());
        }
    }

    #[test]
    fn handshake_survives_random_bytes(listener in any::<bool>(),
                                       chunks in proptest::collection::vec(
                                           proptest::collection::vec(any::<u8>(), 0..200), 0..12)) {
        let role = if listener { Role::Listener } else { Role::Dialer };
        let mut hs = Handshake::new(role, hello("a", [1; 32]), b"key", "b");
        for chunk in chunks {
            while hs.poll_output().is_some() {}
            // Honour wants() for most chunks, but also throw oversize chunks at it.
            let n = if chunk.len() % 3 == 0 { chunk.len() } else { hs.wants().min(chunk.len()) };
            let _ = hs.feed(&chunk[..n]);
            let _ = hs.outcome();
            let _ = hs.wants();
        }
    }

    /// Random bytes that start like real messages reach the later states of both machines.
    #[test]
    fn handshake_survives_random_bytes_mid_protocol(garbage in proptest::collection::vec(any::<u8>(), 0..400),
                                                    flip in any::<usize>()) {
        let key = b"key";
        let mut d = Handshake::new(Role::Dialer, hello("a", [1; 32]), key, "b");
        let mut l = Handshake::new(Role::Listener, hello("b", [2; 32]), key, "a");
        let mut to_l: Vec<u8> = Vec::new();
        let mut to_d: Vec<u8> = Vec::new();
        let mut budget = garbage.len();
        for _ in 0..32 {
            while let Some(o) = d.poll_output() { to_l.extend(o); }
            while let Some(o) = l.poll_output() { to_d.extend(o); }
            // Corrupt one byte of the traffic somewhere and append garbage while it lasts.
            if let Some(b) = to_l.get_mut(flip % 600) { *b ^= 0x5A; }
            if budget > 0 {
                to_d.extend_from_slice(&garbage[garbage.len() - budget..]);
                budget = 0;
            }
            for (m, q) in [(&mut d, &mut to_d), (&mut l, &mut to_l)] {
                let n = m.wants().min(q.len());
                if n > 0 {
                    let chunk: Vec<u8> = q.drain(..n).collect();
                    let _ = m.feed(&chunk);
                }
            }
        }
        let _ = (d.outcome(), l.outcome());
    }
}
