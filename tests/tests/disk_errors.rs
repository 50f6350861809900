//! Disk errors latch on the primary: its backing file sits on a 4 MiB tmpfs (a real way to get
//! ENOSPC), the volume is 16 MiB. Once a local write fails, the write completes with the
//! error, the disk state is `failed` with the reason, and every later write and FLUSH is
//! refused with EIO — even one that the filesystem would now accept — so a write error is
//! never turned into a success by a retry. Needs root (it mounts the tmpfs).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use metroblk::config::NodeConfig;
use metroblk::volume::disk::DiskState;
use metroblk::volume::{QueueDriver, ReqKind, Request, Volume};
use metroblk_tests::cluster::{free_port, write_config, NodeProcess, NodeSpec, TEST_KEY};

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
    let (pa, pb) = (free_port(), free_port());
    let spec = |name, peer, role, listen_port, peer_port, extra| NodeSpec {
        name,
        peer,
        role,
        size: VOLUME,
        listen_port,
        peer_port,
        key: TEST_KEY,
        extra,
    };
    let alpha = write_config(dir.path(), &spec("alpha", "beta", "primary", pa, pb, ""));
    let beta = write_config(dir.path(), &spec("beta", "alpha", "secondary", pb, pa, ""));
    let mut secondary = NodeProcess::start(&beta);
    secondary.wait_ready(Duration::from_secs(10));

    let mut cfg = NodeConfig::load(&alpha).unwrap().volumes[0].clone();
    cfg.backing_file = small.join("alpha-vol0.img");
    let vol = Volume::open_primary(&cfg, "alpha", 1).unwrap();
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
