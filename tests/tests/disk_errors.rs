//! Disk errors latch on the primary: its backing file sits on a 4 MiB tmpfs (a real way to get
//! ENOSPC), the volume is 16 MiB. Once a local write fails, the write completes with the
//! error, the disk state is `failed` with the reason, and every later write and FLUSH is
//! refused with EIO — even one that the filesystem would now accept — so a write error is
//! never turned into a success by a retry. Needs root (it mounts the tmpfs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use metroblk::config::NodeConfig;
use metroblk::lifecycle::parts::PrimaryEngine;
use metroblk::volume::disk::DiskState;
use metroblk::volume::{QueueDriver, ReqKind, Request};
use metroblk_tests::cluster::{pair_configs, NodeProcess, PairConfigs};

const VOLUME: u64 = 16 << 20;

/// A size-limited tmpfs, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, bytes: u64) -> SmallFs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root (run the suite as root, as scripts/test.sh does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run_one(drv: &mut QueueDriver, tag: u16, req: Request) -> i32 {
    if let Err(e) = drv.submit(tag, req) {
        return e.errno();
    }
    let mut res = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while res.is_none() {
        assert!(Instant::now() < deadline, "request did not complete");
        drv.poll(Some(Duration::from_millis(50)), |t, r| {
            assert_eq!(t, tag);
            res = Some(r);
        })
        .unwrap();
    }
    res.unwrap()
}

#[test]
fn a_local_write_error_on_the_primary_latches_failed_and_nothing_writes_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let _fs = SmallFs::mount(&small, 4 << 20);
    let PairConfigs { alpha, beta, .. } = pair_configs(dir.path(), VOLUME);
    let mut secondary = NodeProcess::start(&beta);
    secondary.wait_ready(Duration::from_secs(10));

    let mut cfg = NodeConfig::load(&alpha).unwrap().volumes[0].clone();
    cfg.backing_file = small.join("alpha-vol0.img");
    let vol = PrimaryEngine::open(&cfg, "alpha", 1).unwrap();
    let mut drv = QueueDriver::new(vol.queue(0, 4)).unwrap();
    let mut mem = vec![0x5Au8; (1 << 20) + 4096];
    let buf = ((mem.as_mut_ptr() as usize + 4095) & !4095) as *mut u8;
    let write = |offset| Request { kind: ReqKind::Write, offset, len: 1 << 20, fua: false, buf };
    let flush = Request { kind: ReqKind::Flush, offset: 0, len: 0, fua: false, buf: std::ptr::null_mut() };

    // Fill the volume 1 MiB at a time until the tmpfs is full.
    let mut failed_at = None;
    for i in 0..16u64 {
        let res = run_one(&mut drv, 0, write(i << 20));
        if res < 0 {
            assert_eq!(res, -libc::ENOSPC, "write {i} failed with {res}");
            failed_at = Some(i);
            break;
        }
        assert_eq!(res, 1 << 20);
    }
    let failed_at = failed_at.expect("a 4 MiB tmpfs cannot hold 16 MiB");
    assert!(failed_at >= 2, "the first writes fit");
    assert_eq!(vol.shared.disk.state(), DiskState::Failed);
    let reason = vol.shared.disk.reason().unwrap();
    assert!(reason.contains("No space left on device"), "{reason}");

    // Make room: the filesystem would accept writes again. They must still fail: the error
    // latched, and the data of the failed write is not on disk.
    std::fs::write(small.join("filler"), b"").unwrap();
    assert_eq!(run_one(&mut drv, 1, write(0)), -libc::EIO, "a write after the failure");
    assert_eq!(run_one(&mut drv, 2, flush), -libc::EIO, "a FLUSH after the failure");
    assert_eq!(vol.shared.disk.state(), DiskState::Failed);

    // The secondary was not disturbed: it still has every write that completed.
    drop(drv);
    drop(vol);
    secondary.kill9();
    let copy = std::fs::read(dir.path().join("beta-vol0.img")).unwrap();
    for i in 0..failed_at {
        let r = (i << 20) as usize..((i + 1) << 20) as usize;
        assert!(copy[r].iter().all(|&b| b == 0x5A), "secondary lacks completed write {i}");
    }
}

#[test]
fn a_secondary_out_of_space_gets_nothing_completed_and_shows_failed() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let _fs = SmallFs::mount(&small, 4 << 20);
    // The secondary's backing file: sparse, 16 MiB, on the 4 MiB tmpfs (reached by a symlink
    // at the path its config names).
    let sparse = small.join("beta.img");
    std::fs::File::create(&sparse).unwrap().set_len(VOLUME).unwrap();
    std::os::unix::fs::symlink(&sparse, dir.path().join("beta-vol0.img")).unwrap();
    let PairConfigs { alpha, beta, .. } = pair_configs(dir.path(), VOLUME);
    let mut secondary = NodeProcess::start(&beta);
    secondary.wait_ready(Duration::from_secs(10));

    let cfg = NodeConfig::load(&alpha).unwrap().volumes[0].clone();
    let vol = PrimaryEngine::open(&cfg, "alpha", 1).unwrap();
    let mut drv = QueueDriver::new(vol.queue(0, 4)).unwrap();
    let mut mem = vec![0x3Cu8; (1 << 20) + 4096];
    let buf = ((mem.as_mut_ptr() as usize + 4095) & !4095) as *mut u8;
    let write = |offset| Request { kind: ReqKind::Write, offset, len: 1 << 20, fua: false, buf };

    // Write 1 MiB at a time; the secondary runs out of space after about 4.
    let mut held_at = None;
    for i in 0..16u64 {
        drv.submit(0, write(i << 20)).unwrap();
        let mut res = None;
        let deadline = Instant::now() + Duration::from_secs(3);
        while res.is_none() && Instant::now() < deadline {
            drv.poll(Some(Duration::from_millis(50)), |_, r| res = Some(r)).unwrap();
        }
        match res {
            Some(r) => assert_eq!(r, 1 << 20, "write {i} completed with {r}"),
            None => {
                held_at = Some(i);
                break;
            }
        }
    }
    let held_at = held_at.expect("the secondary cannot hold 16 MiB on 4 MiB");
    assert!(held_at >= 2, "the first writes fit");
    // Not completed while the secondary lacks it: held, not failed, not done.
    assert_eq!(drv.queue().inflight(), 1);
    let st = secondary.status_json();
    let v = &st["volumes"][0];
    assert_eq!(v["disk_state"], "failed", "{st}");
    assert!(v["disk_error"].as_str().unwrap_or("").contains("No space left on device"), "{st}");

    // A FLUSH is not reported done either (the secondary's fsync may not vouch for lost data).
    let flush = Request { kind: ReqKind::Flush, offset: 0, len: 0, fua: false, buf: std::ptr::null_mut() };
    drv.submit(1, flush).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        drv.poll(Some(Duration::from_millis(50)), |tag, r| {
            panic!("tag {tag} completed with {r} after the peer failed")
        })
        .unwrap();
    }
    // Room again on the secondary's filesystem changes nothing: the failure latched.
    drop(_fs);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        drv.poll(Some(Duration::from_millis(50)), |tag, r| {
            panic!("tag {tag} completed with {r} after the peer failed")
        })
        .unwrap();
    }
    assert_eq!(secondary.status_json()["volumes"][0]["disk_state"], "failed");
}
