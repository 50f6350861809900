//! Cost of the write-intent bitmap on the hot path: `mark` of a 4 KiB write to a region whose
//! bit is already durable (no metadata I/O, no allocation, no lock), and the same on four
//! threads at once over one shared working set.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use metroblk::bitmap::writer::Image;
use metroblk::bitmap::{Mark, WriteIntent};
use metroblk::metadata::{self, Superblock};

fn bitmap(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.meta");
    // 1 TiB at 64 KiB regions: 16M regions, a 2 MiB bitmap.
    let (region, size) = (64u64 << 10, 1u64 << 40);
    let uuid = uuid::Uuid::from_u128(1);
    metadata::create_file(&path, &Superblock::new(uuid, "bench", size, region), false).unwrap();
    let expect = metadata::Expected {
        volume_name: "vol0",
        volume_uuid: uuid,
        node_name: "bench",
        size,
        region_size: region,
        config: &path,
    };
    let (file, sb, bits) = metadata::open_file(&path, &expect).unwrap();
    let w = WriteIntent::new(file, sb, bits.as_raw_slice(), false);
    let mut image = Image::new(&w);
    // A hot working set of 1024 regions.
    for r in 0..1024u64 {
        w.mark(r * 7, r * 7);
    }
    w.write_round(&mut image).unwrap();
    let mut i = 0u64;
    c.bench_function("mark_hot_region", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let r = black_box(i * 7);
            assert_eq!(w.mark(r, r), Mark::Ready);
        })
    });
    assert_eq!(w.stats.metadata_writes.load(std::sync::atomic::Ordering::Relaxed), 1, "hot marks wrote nothing");
}

criterion_group!(benches, bitmap);
criterion_main!(benches);
