//! The write-intent writer: one thread per volume that owns the bitmap image and makes it
//! durable. Each round takes every pending set and clear, writes the changed 4 KiB blocks,
//! fdatasyncs once, and only then marks the sets durable and wakes the queues (group commit:
//! every cold write that arrived during the previous round shares this one). It also records
//! "going on alone" (a new generation, the peer `outdated`) before any unreplicated write may
//! complete.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::WriteIntent;
use crate::metadata::{MetadataError, BLOCK_BYTES};
use metroblk_protocol::DiskState;

/// Words of the image in one bitmap block.
const WORDS_PER_BLOCK: usize = BLOCK_BYTES / 8;
/// How long the writer sleeps when nobody wakes it (it also looks for clears then).
const IDLE_WAIT: Duration = Duration::from_millis(200);

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Bits made durable: parked writes may go.
    pub released: bool,
    pub blocks_written: u64,
}

/// The writer's own state: the image of the bitmap on disk (as it will be once the round in
/// progress is durable) and scratch space sized once.
pub struct Image {
    words: Vec<u64>,
    /// Per block: changed this round.
    changed: Vec<bool>,
    /// (word, bits) set this round, to mark durable after the sync.
    sets: Vec<(usize, u64)>,
    block: Box<[u8; BLOCK_BYTES]>,
}

impl Image {
    /// The image of what is on disk now: `durable`, which only the writer changes (a mark
    /// sets `dirty` before its bit is on disk, so `dirty` would not do). Taken before the
    /// writer's first round.
    pub fn new(intent: &WriteIntent) -> Image {
        let words: Vec<u64> = (0..intent.durable.words()).map(|w| intent.durable.word(w)).collect();
        let blocks = words.len().div_ceil(WORDS_PER_BLOCK).max(1);
        Image {
            sets: Vec::with_capacity(words.len()),
            words,
            changed: vec![false; blocks],
            block: Box::new([0; BLOCK_BYTES]),
        }
    }
}

impl WriteIntent {
    /// One writer round (see the module doc). On a write error nothing is marked durable and
    /// the intent is failed for good: a cold write is never released on a bit that may not be
    /// on disk.
    pub fn write_round(&self, image: &mut Image) -> Result<Round, MetadataError> {
        assert!(image.sets.is_empty() && image.changed.iter().all(|c| !c));
        // Clears of `dirty` alone: no metadata I/O. Dirty off first, then the check (the
        // Dekker pair of the module doc, with `dirty` in place of `durable`).
        for w in 0..self.to_clear_dirty.words() {
            let mut c = self.to_clear_dirty.take_word(w);
            while c != 0 {
                let r = w as u64 * 64 + c.trailing_zeros() as u64;
                c &= c - 1;
                if self.dirty.clear(r) && (self.touched.get(r) || self.pending.get(r)) {
                    self.dirty.set(r);
                }
            }
        }
        // Clears first, sets second: a region both cleared and set this round stays set.
        for w in 0..self.to_clear.words() {
            let mut c = self.to_clear.take_word(w);
            while c != 0 {
                let b = c.trailing_zeros() as u64;
                c &= c - 1;
                let r = w as u64 * 64 + b;
                // Durable and dirty off first, then the check (the Dekker pair of the module doc).
                let was_durable = self.durable.clear(r);
                let was_dirty = self.dirty.clear(r);
                if !was_durable || self.touched.get(r) || self.pending.get(r) {
                    // Written since the clear was asked for (or a set is on its way): keep the
                    // bit; if it was durable it still is (the image never lost it).
                    if was_durable {
                        self.durable.set(r);
                    }
                    if was_dirty {
                        self.dirty.set(r);
                    }
                    continue;
                }
                if image.words[w] & (1 << b) != 0 {
                    image.words[w] &= !(1 << b);
                    image.changed[w / WORDS_PER_BLOCK] = true;
                    self.stats.regions_cleared.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // The cleaner's next period starts only now that the clears asked before it are judged.
        if self.touched_reset_wanted.swap(false, Ordering::SeqCst) {
            for w in 0..self.touched.words() {
                self.touched.take_word(w);
            }
        }
        for w in 0..self.pending.words() {
            let p = self.pending.take_word(w);
            if p == 0 {
                continue;
            }
            if p & !image.words[w] != 0 {
                image.words[w] |= p;
                image.changed[w / WORDS_PER_BLOCK] = true;
            }
            image.sets.push((w, p));
        }
        let mut round = Round::default();
        if image.changed.iter().any(|c| *c) {
            let mut g = self.meta.lock().unwrap_or_else(|p| p.into_inner());
            let result = (|| {
                for block in 0..image.changed.len() {
                    if !image.changed[block] {
                        continue;
                    }
                    image.block.fill(0);
                    let words =
                        &image.words[block * WORDS_PER_BLOCK..image.words.len().min((block + 1) * WORDS_PER_BLOCK)];
                    for (i, w) in words.iter().enumerate() {
                        image.block[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
                    }
                    g.file.write_bitmap_block(block as u64, &image.block[..])?;
                    round.blocks_written += 1;
                }
                g.file.sync()
            })();
            image.changed.fill(false);
            if let Err(e) = result {
                self.failed.store(true, Ordering::Release);
                image.sets.clear();
                return Err(e);
            }
            self.stats.metadata_writes.fetch_add(1, Ordering::Relaxed);
            self.stats.blocks_written.fetch_add(round.blocks_written, Ordering::Relaxed);
        }
        let ones = image.words.iter().map(|w| w.count_ones() as u64).sum();
        self.on_disk_count.store(ones, Ordering::Relaxed);
        for (w, bits) in image.sets.drain(..) {
            self.durable.or_word(w, bits);
            round.released = true;
        }
        Ok(round)
    }

    /// Records going on alone if a queue asked and it is allowed: a new generation unless the
    /// peer is already known outdated, and the peer `outdated`, durably. Returns whether it did.
    pub fn record_alone(&self, volume: &str) -> Result<bool, MetadataError> {
        if !self.alone_wanted.load(Ordering::Acquire)
            || self.alone_ready.load(Ordering::Acquire)
            || !self.alone_allowed()
        {
            return Ok(false);
        }
        let sb = self.update_superblock(|sb| {
            if sb.peer_disk_state != Some(DiskState::Outdated) {
                sb.new_generation(uuid::Uuid::new_v4());
            }
            sb.peer_disk_state = Some(DiskState::Outdated);
        })?;
        self.resync_needed.store(true, Ordering::SeqCst);
        self.alone_ready.store(true, Ordering::Release);
        tracing::warn!(
            volume,
            generation = %sb.generation,
            "peer lost and going on alone is allowed: writes complete locally and their regions are \
             marked for resync; the peer is recorded outdated"
        );
        Ok(true)
    }
}

/// The running writer thread; stopping it writes what is pending first.
pub struct Writer {
    stop: Arc<AtomicBool>,
    intent: Arc<WriteIntent>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Starts the writer of `intent`; `wake_queues` is called whenever parked writes may go.
pub fn spawn(intent: Arc<WriteIntent>, volume: String, wake_queues: impl Fn() + Send + 'static) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let (s, i) = (stop.clone(), intent.clone());
    // Here, not on the thread: queues may mark before the thread first runs.
    let mut image = Image::new(&intent);
    let thread = std::thread::Builder::new()
        .name(format!("intent-{volume}"))
        .spawn(move || loop {
            let stopping = s.load(Ordering::Acquire);
            match i.write_round(&mut image) {
                Ok(r) if r.released => wake_queues(),
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(volume = %volume, "write-intent bitmap: {e}; writes to cold regions now fail");
                    wake_queues();
                    return;
                }
            }
            match i.record_alone(&volume) {
                Ok(true) => wake_queues(),
                Ok(false) => {}
                Err(e) => tracing::error!(volume = %volume, "cannot record going on alone: {e}; writes stay held"),
            }
            if stopping {
                return;
            }
            std::thread::park_timeout(IDLE_WAIT);
        })
        .expect("spawning the write-intent writer");
    intent.set_writer(thread.thread().clone());
    Writer { stop, intent, thread: Some(thread) }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.intent.wake_writer();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl WriteIntent {
    /// Clears every bit, on disk and in memory (a resync target that became up to date: the
    /// source copied every region it had marked). Only for a volume without a running writer.
    pub fn clear_all_on_disk(&self) -> Result<(), MetadataError> {
        let zero = [0u8; BLOCK_BYTES];
        let mut g = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        for block in 0..g.file.bitmap_blocks() {
            g.file.write_bitmap_block(block, &zero)?;
        }
        g.file.sync()?;
        for w in 0..self.dirty.words() {
            self.dirty.store_word(w, 0);
            self.durable.store_word(w, 0);
        }
        self.on_disk_count.store(0, Ordering::Relaxed);
        Ok(())
    }
}
