//! An in-process primary for tests: the volume engine on a `QueueDriver` (no ublk), writing
//! blocks of recognisable data at a queue depth and checking every completion.

use std::time::{Duration, Instant};

use metroblk::config::VolumeConfig;
use metroblk::lifecycle::parts::PrimaryEngine;
use metroblk::volume::{QueueDriver, ReqKind, Request};
use rand::{Rng, SeedableRng};

pub const BLOCK: u32 = 4096;

pub struct TestPrimary {
    pub vol: PrimaryEngine,
    pub drv: QueueDriver,
    bufs: Vec<Vec<u8>>,
    busy: Vec<bool>,
    rng: rand::rngs::StdRng,
    pub completed: u64,
}

impl TestPrimary {
    pub fn open(cfg: &VolumeConfig, node: &str, depth: u16, seed: u64) -> TestPrimary {
        let vol = PrimaryEngine::open(cfg, node, 1).expect("open the primary");
        let drv = QueueDriver::new(vol.queue(0, depth)).unwrap();
        TestPrimary {
            vol,
            drv,
            bufs: (0..depth).map(|_| vec![0u8; 1 << 20]).collect(),
            busy: vec![false; depth as usize],
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            completed: 0,
        }
    }

    /// Polls the engine once (link hand-offs, completions).
    pub fn poll(&mut self) {
        let (busy, completed) = (&mut self.busy, &mut self.completed);
        self.drv
            .poll(Some(Duration::from_millis(10)), |tag, res| {
                assert!(res >= 0, "request on tag {tag} failed: {res}");
                busy[tag as usize] = false;
                *completed += 1;
            })
            .unwrap();
    }

    pub fn wait_link(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.drv.queue().link_is_up() {
            assert!(Instant::now() < deadline, "the primary's data link did not come up in {timeout:?}");
            self.poll();
        }
    }

    /// Submits a write of `len` bytes of `fill` at `offset`, waiting for a free tag.
    pub fn submit_write(&mut self, offset: u64, len: u32, fill: u8, deadline: Instant) {
        let tag = loop {
            if let Some(t) = self.busy.iter().position(|b| !b) {
                break t;
            }
            assert!(Instant::now() < deadline, "no write completed before the deadline");
            self.poll();
        };
        self.busy[tag] = true;
        let buf = &mut self.bufs[tag];
        buf[..len as usize].fill(fill);
        let req = Request { kind: ReqKind::Write, offset, len, fua: false, buf: buf.as_mut_ptr() };
        self.drv.submit(tag as u16, req).expect("submit");
    }

    /// `count` writes of one block at random block offsets in `[lo, hi)`, random fill bytes.
    pub fn write_random(&mut self, count: u64, lo: u64, hi: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for _ in 0..count {
            let block = self.rng.gen_range(lo / BLOCK as u64..hi / BLOCK as u64);
            let fill = self.rng.gen();
            self.submit_write(block * BLOCK as u64, BLOCK, fill, deadline);
        }
        self.drain(deadline);
    }

    /// Waits for every request in flight.
    pub fn drain(&mut self, deadline: Instant) {
        while self.busy.iter().any(|b| *b) {
            assert!(Instant::now() < deadline, "writes still in flight at the deadline");
            self.poll();
        }
    }

    /// A FLUSH through the engine (both nodes, or locally when alone).
    pub fn flush(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.drain(deadline);
        self.busy[0] = true;
        let req = Request { kind: ReqKind::Flush, offset: 0, len: 0, fua: false, buf: std::ptr::null_mut() };
        self.drv.submit(0, req).expect("submit flush");
        self.drain(deadline);
    }
}
