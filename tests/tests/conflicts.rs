//! Conflicting writes (design, "Write path" 7): writers on several queues put overlapping
//! writes in flight at once; both backing files must end byte-identical and equal to the last
//! write per byte in completion order. The primary is driven through the engine API in this
//! process (one thread per queue), the secondary is a real `metroblk node run` on loopback.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metroblk::config::NodeConfig;
use metroblk::lifecycle::parts::PrimaryEngine;
use metroblk::volume::{QueueDriver, ReqKind, Request};
use metroblk_tests::cluster::{pair_configs, NodeProcess, PairConfigs};
use rand::{Rng, SeedableRng};

const VOLUME: u64 = 16 << 20;
/// All writes land in this many bytes at the start of the volume, so they overlap often.
const HOT: u64 = 1 << 20;
const MAX_LEN: usize = 64 << 10;
const QUEUES: u16 = 4;
const DEPTH: u16 = 32;
const WRITES_PER_QUEUE: u64 = 2500;

#[derive(Clone, Copy)]
struct Op {
    kind: ReqKind,
    offset: u64,
    len: u32,
}

/// Runs one queue's writer: random overlapping writes at full depth. On each completion the
/// request's bytes are applied to the shared model, under its lock, inside the engine's
/// completion callback — the order the engine reported them done.
fn writer(vol: &PrimaryEngine, qid: u16, model: Arc<Mutex<Vec<u8>>>) -> u64 {
    let mut drv = QueueDriver::new(vol.queue(qid, DEPTH)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !drv.queue().link_is_up() {
        assert!(Instant::now() < deadline, "link did not come up");
        drv.poll(Some(Duration::from_millis(50)), |_, _| panic!("nothing submitted")).unwrap();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xC0FF_EE00 + qid as u64);
    let mut mem = vec![0u8; (DEPTH as usize + 1) * MAX_LEN];
    let base = (mem.as_mut_ptr() as usize + 4095) & !4095;
    let buf = |tag: u16| (base + tag as usize * MAX_LEN) as *mut u8;
    let mut inflight: Vec<Option<Op>> = vec![None; DEPTH as usize];
    let (mut submitted, mut completed) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(120);
    while completed < WRITES_PER_QUEUE {
        assert!(Instant::now() < deadline, "queue {qid}: only {completed} writes completed");
        while submitted < WRITES_PER_QUEUE {
            let Some(tag) = inflight.iter().position(|o| o.is_none()) else { break };
            let tag = tag as u16;
            let len = rng.gen_range(1..=(MAX_LEN as u32 / 512)) * 512;
            let offset = rng.gen_range(0..=(HOT - len as u64) / 512) * 512;
            let kind = if rng.gen_range(0..20) == 0 { ReqKind::WriteZeroes } else { ReqKind::Write };
            if kind == ReqKind::Write {
                // SAFETY: each tag owns MAX_LEN bytes of `mem`, untouched while in flight.
                rng.fill(unsafe { std::slice::from_raw_parts_mut(buf(tag), len as usize) });
            }
            drv.submit(tag, Request { kind, offset, len, fua: false, buf: buf(tag) }).expect("valid request");
            inflight[tag as usize] = Some(Op { kind, offset, len });
            submitted += 1;
        }
        completed += drv
            .poll(Some(Duration::from_millis(100)), |tag, res| {
                let op = inflight[tag as usize].take().expect("completion for a tag in flight");
                assert!(res >= 0, "queue {qid}: write at {} failed: {res}", op.offset);
                let range = op.offset as usize..op.offset as usize + op.len as usize;
                let mut m = model.lock().unwrap();
                if op.kind == ReqKind::Write {
                    // SAFETY: the buffer holds the request's bytes until this completion.
                    m[range].copy_from_slice(unsafe { std::slice::from_raw_parts(buf(tag), op.len as usize) });
                } else {
                    m[range].fill(0);
                }
            })
            .unwrap() as u64;
    }
    // A FLUSH, so the secondary has everything durable too.
    drv.submit(0, Request { kind: ReqKind::Flush, offset: 0, len: 0, fua: false, buf: std::ptr::null_mut() }).unwrap();
    let mut flushed = false;
    while !flushed {
        drv.poll(Some(Duration::from_millis(100)), |_, res| {
            assert_eq!(res, 0);
            flushed = true;
        })
        .unwrap();
    }
    metroblk::volume::stats::QueueStats::get(&vol.shared.queue_stats[qid as usize].conflict_waits)
}

#[test]
fn overlapping_writes_on_several_queues_leave_identical_copies() {
    let dir = tempfile::tempdir().unwrap();
    let PairConfigs { alpha, beta, .. } = pair_configs(dir.path(), VOLUME);
    let mut secondary = NodeProcess::start(&beta);
    secondary.wait_ready(Duration::from_secs(10));

    let cfg = NodeConfig::load(&alpha).unwrap();
    let vol = PrimaryEngine::open(&cfg.volumes[0], "alpha", QUEUES).unwrap();
    let model = Arc::new(Mutex::new(vec![0u8; VOLUME as usize]));
    let waits: u64 = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..QUEUES)
            .map(|q| {
                let (vol, model) = (&vol, model.clone());
                sc.spawn(move || writer(vol, q, model))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    drop(vol);
    secondary.kill9();

    // The workload must really have raced: otherwise this test proves nothing.
    assert!(waits > 100, "only {waits} writes waited for an overlapping one");
    let model = model.lock().unwrap();
    for name in ["alpha", "beta"] {
        let path = dir.path().join(format!("{name}-vol0.img"));
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), model.len());
        if let Some(i) = data.iter().zip(model.iter()).position(|(a, b)| a != b) {
            panic!("{name}'s copy differs from the completion-order model at byte {i} (sector {})", i / 512);
        }
    }
}
