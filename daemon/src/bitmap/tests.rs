use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::writer::Image;
use super::*;
use crate::metadata::{self, Expected};

const REGION: u64 = 64 << 10;
const REGIONS: u64 = 40_000; // more than one 4 KiB bitmap block (32768 regions)

fn open(dir: &std::path::Path) -> (WriteIntent, std::path::PathBuf) {
    let path = dir.join("m.meta");
    let uuid = uuid::Uuid::from_u128(7);
    if !path.exists() {
        let sb = Superblock::new(uuid, "alpha", REGIONS * REGION, REGION);
        metadata::create_file(&path, &sb, false).unwrap();
    }
    let expect = Expected {
        volume_name: "vol0",
        volume_uuid: uuid,
        node_name: "alpha",
        size: REGIONS * REGION,
        region_size: REGION,
        config: std::path::Path::new("x.toml"),
    };
    let (file, sb, bits) = metadata::open_file(&path, &expect).unwrap();
    (WriteIntent::new(file, sb, bits.as_raw_slice(), false), path)
}

#[test]
fn a_cold_write_waits_for_one_durable_write_shared_by_its_group_and_hot_writes_cost_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = open(dir.path());
    let mut image = Image::new(&w);
    // A group of cold writes, one spanning two regions and two bitmap blocks.
    assert_eq!(w.mark(5, 5), Mark::Wait);
    assert_eq!(w.mark(32767, 32768), Mark::Wait);
    assert_eq!(w.mark(5, 5), Mark::Wait, "not durable yet");
    assert!(!w.is_durable(5, 5));
    let r = w.write_round(&mut image).unwrap();
    assert!(r.released);
    assert_eq!(r.blocks_written, 2);
    assert_eq!(w.stats.metadata_writes.load(Ordering::Relaxed), 1, "one metadata write for the group");
    assert!(w.is_durable(5, 5) && w.is_durable(32767, 32768));
    // Hot: no wait, and a round finds nothing to write.
    for _ in 0..1000 {
        assert_eq!(w.mark(5, 5), Mark::Ready);
    }
    assert_eq!(w.write_round(&mut image).unwrap(), writer::Round::default());
    assert_eq!(w.stats.metadata_writes.load(Ordering::Relaxed), 1);
    assert_eq!(w.dirty_regions(), 3);
}

#[test]
fn a_sequential_writer_costs_one_metadata_write_per_readahead_span_and_a_random_one_no_more_bits() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = open(dir.path());
    let mut image = Image::new(&w);
    // 128 KiB writes (two regions each) from region 100 on, 8 MiB in all.
    let span = READAHEAD_REGIONS + 1;
    let mut cold = 0;
    for i in 0..64u64 {
        let first = 100 + 2 * i;
        if w.mark_write(first * REGION, 2 * REGION) == Mark::Wait {
            cold += 1;
            w.write_round(&mut image).unwrap();
            assert!(w.is_durable(first, first + 1));
        }
    }
    // The first write is cold without readahead (nothing before it was written); after it,
    // each cold write brings READAHEAD_REGIONS more.
    let regions = 128;
    let expected = 1 + (regions - 2u64).div_ceil(span + 1);
    assert!(cold <= expected && cold < 16, "{cold} cold writes for {regions} sequential regions");
    assert_eq!(w.stats.metadata_writes.load(Ordering::Relaxed), cold);
    assert!(w.dirty_regions() <= regions + READAHEAD_REGIONS, "readahead stays within its span");
    // A write after an untouched region, or inside a region after a touched one, sets only
    // its own bits.
    let before = w.dirty_regions();
    assert_eq!(w.mark_write(20_000 * REGION, 4096), Mark::Wait);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.mark_write(20_001 * REGION + 4096, 4096), Mark::Wait);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.dirty_regions(), before + 2);
    // Readahead stops at the end of the volume.
    w.mark_write((REGIONS - 3) * REGION, 4096);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.mark_write((REGIONS - 2) * REGION, 4096), Mark::Wait);
    w.write_round(&mut image).unwrap();
    assert!(w.is_durable(REGIONS - 1, REGIONS - 1), "the last region was read ahead");
}

#[test]
fn bits_survive_a_restart_and_mark_the_volume_for_resync() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (w, _) = open(dir.path());
        assert!(!w.resync_needed());
        let mut image = Image::new(&w);
        w.mark(100, 101);
        w.write_round(&mut image).unwrap();
    }
    let (w, _) = open(dir.path());
    assert!(w.resync_needed(), "bits on disk at start may differ between the nodes");
    assert_eq!(w.dirty().ones().collect::<Vec<_>>(), vec![100, 101]);
    assert_eq!(w.mark(100, 100), Mark::Ready, "a bit on disk is durable");
}

#[test]
fn a_clear_is_written_only_for_a_region_not_written_since_the_reset() {
    let dir = tempfile::tempdir().unwrap();
    let (w, path) = open(dir.path());
    let mut image = Image::new(&w);
    w.mark(1, 3);
    w.write_round(&mut image).unwrap();
    w.reset_all_touched();
    w.mark(2, 2); // written after the reset: must stay
    for r in 1..=3 {
        w.request_clear(r);
    }
    w.write_round(&mut image).unwrap();
    assert_eq!(w.dirty().ones().collect::<Vec<_>>(), vec![2], "2 was written since; 1 and 3 cleared");
    assert_eq!(w.mark(1, 1), Mark::Wait, "a cleared region is cold again");
    w.write_round(&mut image).unwrap();
    assert_eq!(w.dirty().ones().collect::<Vec<_>>(), vec![1, 2]);
    drop(w);
    let (w, _) = open(dir.path());
    assert_eq!(w.dirty().ones().collect::<Vec<_>>(), vec![1, 2], "the clear reached the disk");
    assert!(path.exists());
}

/// Writers mark random regions on four threads while a clearer resets and clears in cycles
/// and the writer thread runs rounds: whenever a writer is told Ready (or its wait ends), the
/// bit must be on disk. The disk is read back from the file after every round.
#[test]
fn no_write_is_released_on_a_bit_that_is_not_on_disk_under_racing_clears() {
    let dir = tempfile::tempdir().unwrap();
    let (w, path) = open(dir.path());
    let w = Arc::new(w);
    let stop = Arc::new(AtomicBool::new(false));
    // Writes "in flight" per region: the real cleaner leaves such regions alone (it checks the
    // conflict table after its reset); so does this one.
    let inflight: Arc<Vec<std::sync::atomic::AtomicU32>> = Arc::new((0..64).map(|_| Default::default()).collect());
    let on_disk = |path: &std::path::Path, r: u64| {
        let bytes = std::fs::read(path).unwrap();
        bytes[(metadata::BITMAP_OFFSET + r / 8) as usize] & (1 << (r % 8)) != 0
    };
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let (w, stop, path, inflight) = (w.clone(), stop.clone(), path.clone(), inflight.clone());
        threads.push(std::thread::spawn(move || {
            let mut x = t * 7919 + 1;
            let mut checked = 0;
            while !stop.load(Ordering::Relaxed) && checked < 300 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let r = (x >> 33) % 64;
                inflight[r as usize].fetch_add(1, Ordering::SeqCst);
                if w.mark(r, r) == Mark::Wait {
                    while !w.is_durable(r, r) {
                        std::thread::yield_now();
                    }
                }
                // "Issued" now: the bit must be on disk until this write is done.
                assert!(on_disk(&path, r), "region {r} released without its bit on disk");
                inflight[r as usize].fetch_sub(1, Ordering::SeqCst);
                checked += 1;
            }
        }));
    }
    let mut image = Image::new(&w);
    for cycle in 0..400 {
        w.write_round(&mut image).unwrap();
        if cycle % 3 == 0 {
            w.request_touched_reset();
        }
        if cycle % 3 == 2 {
            for r in 0..64 {
                if inflight[r as usize].load(Ordering::SeqCst) == 0 {
                    w.request_clear(r);
                }
            }
        }
        if threads.iter().all(|t| t.is_finished()) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    // Let the writers finish their last waits.
    for _ in 0..100 {
        w.write_round(&mut image).unwrap();
        if threads.iter().all(|t| t.is_finished()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for t in threads {
        t.join().unwrap();
    }
    assert!(w.stats.regions_cleared.load(Ordering::Relaxed) > 0, "the test cleared nothing: it proves nothing");
}
