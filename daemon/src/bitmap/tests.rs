use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::writer::Image;
use super::*;
use crate::metadata::{self, Expected};

const REGION: u64 = 64 << 10;
const REGIONS: u64 = 40_000; // more than one 4 KiB bitmap block (32768 regions)

/// An intent with one bit per region (the extents have tests of their own below).
fn open(dir: &std::path::Path) -> (WriteIntent, std::path::PathBuf) {
    let (w, path) = open_with_extents(dir);
    (w.without_extents(), path)
}

fn open_with_extents(dir: &std::path::Path) -> (WriteIntent, std::path::PathBuf) {
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
        if w.mark_write(first * REGION, 2 * REGION, false) == Mark::Wait {
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
    assert_eq!(w.mark_write(20_000 * REGION, 4096, false), Mark::Wait);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.mark_write(20_001 * REGION + 4096, 4096, false), Mark::Wait);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.dirty_regions(), before + 2);
    // Readahead stops at the end of the volume.
    w.mark_write((REGIONS - 3) * REGION, 4096, false);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.mark_write((REGIONS - 2) * REGION, 4096, false), Mark::Wait);
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

#[test]
fn a_random_writer_pays_one_metadata_write_per_extent_it_enters() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = open_with_extents(dir.path());
    let mut image = Image::new(&w);
    let n = w.extent_regions();
    assert_eq!(n * REGION, INTENT_EXTENT_BYTES);
    // A 4 KiB write in region 70: the whole extent 64..128 comes in the same write.
    assert_eq!(w.mark_write(70 * REGION + 8192, 4096, true), Mark::Wait);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.on_disk().ones().collect::<Vec<_>>(), (64..128).collect::<Vec<_>>());
    assert_eq!(w.dirty().ones().collect::<Vec<_>>(), vec![70], "out of sync: only what was written");
    for r in [64, 65, 100, 127] {
        assert_eq!(w.mark_write(r * REGION, 4096, true), Mark::Ready, "region {r} is in a hot extent");
    }
    assert_eq!(w.mark_write(128 * REGION, 4096, true), Mark::Wait, "the next extent is cold");
    // A write across two extents sets both; the last extent stops at the end of the volume.
    assert_eq!(w.mark_write((REGIONS - 70) * REGION, 11 * REGION, true), Mark::Wait);
    w.write_round(&mut image).unwrap();
    let last_start = (REGIONS - 70) & !(n - 1);
    assert!(w.is_durable(last_start, REGIONS - 1));
    assert_eq!(w.on_disk_regions(), 128 + (REGIONS - last_start));
    assert_eq!(w.dirty_regions(), 6 + 11);
    assert_eq!(w.stats.metadata_writes.load(Ordering::Relaxed), 2);
}

#[test]
fn unlinked_alone_or_with_a_resync_to_come_the_bits_stay_one_per_region() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = open_with_extents(dir.path());
    let mut image = Image::new(&w);
    assert_eq!(w.mark_write(2 * REGION, 4096, false), Mark::Wait);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.on_disk().ones().collect::<Vec<_>>(), vec![2], "the queue's link is down");
    w.set_resync_needed(true);
    assert_eq!(w.mark_write(5 * REGION, 4096, true), Mark::Wait);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.on_disk().ones().collect::<Vec<_>>(), vec![2, 5], "a resync to come: no extents");
    w.set_resync_needed(false);
    w.allow_alone();
    assert!(!w.may_complete_alone());
    w.record_alone("vol0").unwrap();
    assert!(w.is_alone());
    assert_eq!(w.mark_write(300 * REGION, 4096, true), Mark::Wait);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.on_disk().ones().collect::<Vec<_>>(), vec![2, 5, 300], "alone: no extents");
}

#[test]
fn extents_stop_once_the_dirty_budget_is_spent() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = open_with_extents(dir.path());
    let mut image = Image::new(&w);
    let budget = INTENT_WIDEN_DIRTY_BYTES_MAX / REGION;
    assert!(budget + 200 < REGIONS);
    assert_eq!(w.mark(0, budget - 1), Mark::Wait);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.on_disk_regions(), budget);
    assert_eq!(w.mark_write((budget + 100) * REGION, 4096, true), Mark::Wait);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.on_disk_regions(), budget + 1, "past the budget one bit per region");
}

#[test]
fn the_cleaner_sees_an_extent_as_touched_while_any_of_its_regions_is() {
    let dir = tempfile::tempdir().unwrap();
    let (w, _) = open_with_extents(dir.path());
    let mut image = Image::new(&w);
    w.mark_write(130 * REGION, 4096, true);
    w.write_round(&mut image).unwrap();
    assert_eq!((w.on_disk_regions(), w.dirty_regions()), (64, 1));
    w.reset_all_touched();
    assert!(!w.extent_touched(128) && !w.extent_touched(191));
    assert_eq!(w.mark(190, 190), Mark::Ready);
    assert!(w.extent_touched(128) && w.extent_touched(130) && w.extent_touched(191));
    assert!(!w.extent_touched(127) && !w.extent_touched(192));
}

#[test]
fn out_of_sync_clears_per_region_and_the_bits_on_disk_with_their_extent() {
    let dir = tempfile::tempdir().unwrap();
    let (w, path) = open_with_extents(dir.path());
    let mut image = Image::new(&w);
    w.mark_write(130 * REGION, 4096, true);
    w.write_round(&mut image).unwrap();
    w.reset_all_touched();
    assert_eq!(w.mark_write(190 * REGION, 4096, true), Mark::Ready);
    // 130 is cold, its extent is not: out of sync no more, its bit stays on disk.
    w.request_clear_dirty(130);
    let writes = w.stats.metadata_writes.load(Ordering::Relaxed);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.dirty().ones().collect::<Vec<_>>(), vec![190]);
    assert_eq!(w.on_disk_regions(), 64);
    assert_eq!(w.stats.metadata_writes.load(Ordering::Relaxed), writes, "a clear of dirty alone writes nothing");
    // A clear of dirty for a region written since is refused.
    w.request_clear_dirty(190);
    w.write_round(&mut image).unwrap();
    assert_eq!(w.dirty().ones().collect::<Vec<_>>(), vec![190]);
    // The whole extent cold: both go, on disk too.
    w.reset_all_touched();
    for r in 128..192 {
        w.request_clear(r);
    }
    w.write_round(&mut image).unwrap();
    assert_eq!((w.on_disk_regions(), w.dirty_regions()), (0, 0));
    drop(w);
    let (w, _) = open_with_extents(dir.path());
    assert_eq!(w.dirty_regions(), 0, "the clears reached {}", path.display());
}

/// A write marked before the writer's image is taken still gets its bit written: the image
/// is what is on disk, not what is marked (a queue can mark before the writer thread runs).
#[test]
fn a_cold_mark_made_before_the_writer_starts_is_written_before_it_is_released() {
    let dir = tempfile::tempdir().unwrap();
    let (w, path) = open(dir.path());
    assert_eq!(w.mark(5, 5), Mark::Wait);
    let mut image = Image::new(&w);
    let round = w.write_round(&mut image).unwrap();
    assert!(round.released && round.blocks_written == 1, "{round:?}");
    assert!(w.is_durable(5, 5));
    let bytes = std::fs::read(&path).unwrap();
    // Region 5: byte 0 of the bitmap, bit 5.
    assert_ne!(bytes[metadata::BITMAP_OFFSET as usize] & (1 << 5), 0, "bit 5 released but not on disk");
}

/// Writers mark random regions on four threads while a clearer resets and clears in cycles
/// and the writer thread runs rounds: whenever a writer is told Ready (or its wait ends), the
/// bit must be on disk. The disk is read back from the file after every round.
#[test]
fn no_write_is_released_on_a_bit_that_is_not_on_disk_under_racing_clears() {
    racing_clears(false);
}

/// The same with extents: a clear of a region the writers never wrote may race with a
/// widening set of it.
#[test]
fn no_write_is_released_on_a_bit_that_is_not_on_disk_under_racing_clears_with_extents() {
    racing_clears(true);
}

fn racing_clears(extents: bool) {
    let dir = tempfile::tempdir().unwrap();
    let (w, path) = if extents { open_with_extents(dir.path()) } else { open(dir.path()) };
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
                let mark = if extents { w.mark_write(r * REGION, 4096, true) } else { w.mark(r, r) };
                if mark == Mark::Wait {
                    while !w.is_durable(r, r) {
                        std::thread::yield_now();
                    }
                }
                // "Issued" now: the bit must be on disk until this write is done.
                assert!(on_disk(&path, r), "region {r} released without its bit on disk");
                // A clear of `dirty` alone is the writer's half of a Dekker pair: it clears the
                // bit, then restores it if the region was touched meanwhile, so the bit can read
                // clear for an instant. It must come back within the writer's round.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while !w.dirty().get(r) {
                    assert!(std::time::Instant::now() < deadline, "region {r} written but not out of sync");
                    std::thread::yield_now();
                }
                inflight[r as usize].fetch_sub(1, Ordering::SeqCst);
                checked += 1;
                // Spread over many of the clearer's cycles (on a fast machine 300 writes in a
                // row end before its first clear).
                std::thread::sleep(std::time::Duration::from_micros(x % 400));
            }
        }));
    }
    // Taken after the writers started, as the writer thread may be: it must not take their
    // marks for bits on disk.
    let mut image = Image::new(&w);
    // Paced like the writers, so that clears are judged while they write.
    for cycle in 0..400 {
        std::thread::sleep(std::time::Duration::from_micros(200));
        w.write_round(&mut image).unwrap();
        if cycle % 3 == 0 {
            w.request_touched_reset();
        }
        if cycle % 3 == 2 {
            for r in 0..64 {
                if inflight[r as usize].load(Ordering::SeqCst) == 0 {
                    if extents && cycle % 2 == 0 {
                        w.request_clear_dirty(r);
                    } else {
                        w.request_clear(r);
                    }
                }
            }
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
