//! Cost of the write-intent bitmap on the hot path: `mark` + `on_write_done` of a 4 KiB write
//! to a region whose bit is already durable: no metadata I/O, no allocation, no lock.

use bitvec::prelude::*;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use metroblk::bitmap::{FlushBatch, Limits, Mark, WriteIntent, BATCH_BLOCKS_MAX};

fn bitmap(c: &mut Criterion) {
    // 1 TiB at 64 KiB regions: 16M regions, a 2 MiB bitmap.
    let regions = 1u64 << 24;
    let on_disk: BitVec<u8, Lsb0> = BitVec::repeat(false, regions as usize);
    let mut w = WriteIntent::new(Limits { regions, slots: 128, batch_blocks_max: BATCH_BLOCKS_MAX }, &on_disk);
    let mut batch = FlushBatch::new(BATCH_BLOCKS_MAX);
    // Make a working set of 1024 regions hot.
    for r in 0..1024u64 {
        assert_eq!(w.mark(0, r * 7, r * 7), Mark::Wait);
        assert!(w.poll_flush(0, &mut batch));
        w.on_flushed(&batch, |_| {});
        w.on_write_done(0, Some(1));
    }
    let mut i = 0u64;
    c.bench_function("mark_hot_region", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let r = black_box(i * 7);
            let m = w.mark(black_box(3), r, r);
            w.on_write_done(3, Some(1));
            m
        })
    });
    assert_eq!(w.stats().metadata_writes, 1024, "hot marks wrote no metadata");
}

criterion_group!(benches, bitmap);
criterion_main!(benches);
