//! Per-request costs of the data-link codec on the hot path: header encode, header decode and
//! payload verification (crc32c) of a 4 KiB write.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use metroblk_protocol::{decode_header, verify_payload, Frame, Geometry, HEADER_LEN, MAX_PAYLOAD};

fn frames(c: &mut Criterion) {
    let payload = vec![0xA5u8; 4096];
    let frame = Frame::write(42, 7, 1 << 20, &payload, false, true);
    let geo = Geometry { volume_size: 1 << 30, block_size: 4096, max_payload: MAX_PAYLOAD };
    let mut header = [0u8; HEADER_LEN];
    frame.encode(&mut header);

    c.bench_function("encode_header", |b| {
        let mut out = [0u8; HEADER_LEN];
        b.iter(|| {
            black_box(&frame).encode(&mut out);
            black_box(&out);
        })
    });
    c.bench_function("decode_header", |b| b.iter(|| decode_header(black_box(&header), black_box(&geo))));
    let mut g = c.benchmark_group("verify_payload");
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("4KiB", |b| b.iter(|| verify_payload(black_box(&frame), black_box(&payload))));
    g.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
