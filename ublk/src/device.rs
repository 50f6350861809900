//! One ublk block device: add or recover it, serve its queues, stop and delete it.
//!
//! # User recovery: why REISSUE
//!
//! Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`. When the
//! server dies (`kill -9`, a crash), the kernel (ublk_drv, Linux 6.12: `ublk_abort_queue` →
//! `__ublk_fail_req` → `ublk_do_fail_rq`; then `ublk_quiesce_work_fn`) quiesces the device
//! instead of deleting it: `/dev/ublkbN` stays, new I/O waits in the block layer, and the
//! requests the dead server had received but not completed are
//! - with REISSUE: requeued, and dispatched again to the next server once it ends the
//!   recovery (`END_USER_RECOVERY` unquiesces the queue and kicks the requeue list);
//! - without REISSUE: failed with EIO (they are marked `UBLK_IO_FLAG_ABORTED`).
//!
//! Failing them would make a filesystem on the device see write errors (ext4 aborts its
//! journal and goes read-only), so "the mounted filesystem keeps working" needs REISSUE. It is
//! also safe: such a request was never completed, so nobody above the device was told it was
//! done, and executing it again is harmless — a WRITE, DISCARD or WRITE_ZEROES writes the same
//! bytes to the same blocks (idempotent; the block layer never has two overlapping writes in
//! flight whose order matters, since an upper layer that cares waits for the first), a
//! reissued FLUSH is simply executed again and completes only once the new server has made
//! everything durable, and a READ just reads again. Nothing is reported done that was not
//! done. (Linux 6.13 adds `UBLK_F_USER_RECOVERY_FAIL_IO`, the opposite policy; 6.12 does not
//! know it, and it is not what we want.)
//!
//! # Zero copy: detected, asked for, and what a recovered device decides
//!
//! Where the driver offers `UBLK_F_AUTO_BUF_REG` (Linux 6.16+; `GET_FEATURES`, never a kernel
//! version check) and [`DeviceParams::zero_copy`] asks for it, the device is added with it
//! (and `UBLK_F_SUPPORT_ZERO_COPY`, as rublk `-z` does): the kernel registers each READ and
//! WRITE request's own pages in the queue's io_uring as fixed buffer `tag` before the
//! request reaches us (`ublk_auto_buf_reg`, no fallback flag: a failed registration fails the
//! request), and unregisters it when we commit the request; the request itself ends only once
//! every io_uring operation holding that buffer has let go of it (a `SEND_ZC` whose
//! notification is still to come). No buffer of ours, no copy by `ublk_map_io`. Elsewhere
//! (Debian 12's 6.12, the floor) the device copies as before. The mode is the device's: a
//! recovered device keeps the flags it was created with, whatever the new server wants
//! ([`Device::zero_copy`]).
//!
//! A recovered device keeps its id, so the next server must find it: the caller passes a
//! stable `dev_id`, and [`DeviceParams::owner_tag`] (stored in the device's
//! `ublksrv_flags`, which the driver keeps for the device's lifetime) tells our device from
//! someone else's with the same id.
//!
//! # Clean shutdown
//!
//! [`Device::stop`] sends STOP_DEV (the driver waits for the requests in flight, which the
//! queue threads keep serving, then removes the disk and aborts the queues' commands, which
//! ends the queue threads) and then DEL_DEV. Requests a target can never complete (a mirror
//! whose peer is gone) would make STOP_DEV wait; for that case [`Device::abandon`] leaves the
//! device to be recovered, exactly as if the server had been killed.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{squeue, IoUring};
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{sys, BufDesc, BufDescList, UblkError, UblkFlags, UblkIORes};

use crate::driver::check_driver;
use crate::error::{describe, Error};
use crate::signals::TermSignals;
use crate::target::{BlockIo, BlockOp, QueueTarget, SqeSink, UD_TARGET};

/// Default queue depth (requests in flight per queue).
pub const DEFAULT_DEPTH: u16 = 128;
/// The default number of queues: one. The kernel maps each CPU's submissions to one queue
/// and libublk keeps the queue's thread on those CPUs, so with one queue per CPU a single
/// submitter (one fio job, one VM's I/O thread) shares its CPU with the queue thread serving
/// it, and every request costs two context switches on that CPU while the others idle; with
/// one queue the submitter runs beside the queue's thread (on another CPU than the one it is
/// pinned to, [`DeviceParams::single_cpu_affinity`]). Measured in the TCG VM on 2 vCPUs (`benches/fio/run.sh`
/// configs, metroblk standalone, 2 queues -> 1): 4k QD1 846 -> 1158 IOPS, 4k QD32 5304 -> 7927
/// IOPS, 128k QD8 108 -> 154 MiB/s. Workloads with many submitters on many CPUs can ask for
/// more (`queues` in the volume config).
pub const QUEUES_DEFAULT: u16 = 1;
/// Default largest READ/WRITE (also each tag's buffer size).
pub const DEFAULT_MAX_IO_BYTES: u32 = 512 << 10;
/// Largest DISCARD or WRITE_ZEROES the device advertises: a request's length must fit the
/// `u32` of [`BlockIo::len`].
pub const MAX_DISCARD_BYTES: u32 = 1 << 30;
/// Granularity advertised for DISCARD (the page size, the unit a file can punch).
const DISCARD_GRANULARITY: u32 = 4096;
/// Physical block size advertised (also the minimum and optimal I/O size).
const PHYSICAL_BLOCK_SHIFT: u8 = 12;
/// How long a previous server that still exists may take to go away before we give up.
const PREVIOUS_SERVER_GRACE: Duration = Duration::from_secs(5);
/// How long START_USER_RECOVERY may keep answering "busy" (the previous server's io_uring is
/// still being torn down).
const RECOVERY_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Block-layer timeout of the device's requests (`/sys/block/ublkbN/queue/io_timeout`),
/// instead of the kernel's default of 30 s. See [`set_io_timeout`].
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The I/O scheduler a device gets unless its config says otherwise. See [`set_io_scheduler`].
pub const IO_SCHEDULER_DEFAULT: &str = "none";
/// Longest scheduler name accepted (the kernel's `ELV_NAME_MAX` is 16 with the NUL).
pub const IO_SCHEDULER_NAME_LEN_MAX: usize = 15;

/// What the device looks like to the kernel.
#[derive(Debug, Clone)]
pub struct DeviceParams {
    /// Device id (`/dev/ublkb<id>`), or -1 to let the driver pick one. With an id, an
    /// existing device of that id carrying our `owner_tag` is recovered instead of added.
    pub dev_id: i32,
    /// Size in bytes (a multiple of `logical_block`).
    pub size: u64,
    /// Logical block size: 512 or 4096. The physical block size is always 4096.
    pub logical_block: u32,
    /// Number of queues (one thread each); 0 picks [`QUEUES_DEFAULT`].
    pub queues: u16,
    /// Pins each queue's thread to one CPU of those the kernel maps to its queue (libublk's
    /// `UBLK_DEV_F_SINGLE_CPU_AFFINITY`, rublk's default); otherwise it may run on any of
    /// them. Pinned, the thread keeps one CPU and the submitter settles on the others: no
    /// migrations, fewer wakeups landing on a busy CPU. (io_uring's io-wq workers are not
    /// pinned with it: since 6.x they follow the cpuset, not the thread's affinity.) Measured in the TCG
    /// VM on 2 vCPUs (metroblk standalone, 3 rounds, unpinned -> pinned): 4k QD1 1.8-1.9k ->
    /// 2.9-3.0k IOPS, 4k QD32 10-13k -> 16-17k IOPS (both level with rublk), 128k QD8
    /// 212-225 -> 176-194 MiB/s (rublk 167-177); mirrored, within the run-to-run spread.
    pub single_cpu_affinity: bool,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest READ/WRITE in bytes (a multiple of 4096).
    pub max_io_bytes: u32,
    /// Target name recorded in libublk's device file under /run/ublksrvd.
    pub name: String,
    /// Identifies the device as this target's across server restarts (kept by the driver in
    /// the device's `ublksrv_flags`).
    pub owner_tag: u64,
    /// Submission entries the target may have in flight per request tag, besides ublk's own
    /// command: sizes the queue's io_uring.
    pub target_sqes_per_tag: u16,
    /// Submission entries the target may have in flight per queue, independent of requests.
    pub target_sqes_per_queue: u16,
    /// Asks for zero copy (`UBLK_F_AUTO_BUF_REG`) when the device is added, where the driver
    /// offers it (see the module doc). The target then gets [`BlockIo::buf_index`] instead of
    /// a buffer it can read.
    pub zero_copy: bool,
    /// The block layer's I/O scheduler for the disk (`/sys/block/ublkbN/queue/scheduler`), or
    /// `None` to keep the one the kernel picks. See [`set_io_scheduler`].
    pub io_scheduler: Option<String>,
}

impl DeviceParams {
    /// Defaults for a device of `size` bytes: id picked by the driver, 512-byte logical
    /// blocks, default queues and depth, one target SQE per tag and none per queue.
    pub fn new(name: &str, size: u64) -> DeviceParams {
        DeviceParams {
            dev_id: -1,
            size,
            logical_block: 512,
            queues: 0,
            single_cpu_affinity: true,
            depth: DEFAULT_DEPTH,
            max_io_bytes: DEFAULT_MAX_IO_BYTES,
            name: name.to_string(),
            owner_tag: 0,
            target_sqes_per_tag: 1,
            target_sqes_per_queue: 0,
            zero_copy: false,
            io_scheduler: Some(IO_SCHEDULER_DEFAULT.to_string()),
        }
    }

    /// [`QUEUES_DEFAULT`].
    pub fn default_queues() -> u16 {
        QUEUES_DEFAULT
    }

    fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Params(m));
        if self.logical_block != 512 && self.logical_block != 4096 {
            return bad(format!("logical block size {} is not 512 or 4096", self.logical_block));
        }
        if self.size == 0 || self.size % self.logical_block as u64 != 0 {
            return bad(format!("size {} is not a positive multiple of {}", self.size, self.logical_block));
        }
        if self.depth == 0 || self.depth as u32 > sys::UBLK_MAX_QUEUE_DEPTH {
            return bad(format!("queue depth {} is not between 1 and {}", self.depth, sys::UBLK_MAX_QUEUE_DEPTH));
        }
        if self.queues as u32 > sys::UBLK_MAX_NR_QUEUES {
            return bad(format!("{} queues is above the driver's limit of {}", self.queues, sys::UBLK_MAX_NR_QUEUES));
        }
        if self.max_io_bytes < 4096 || self.max_io_bytes % 4096 != 0 || self.max_io_bytes > 32 << 20 {
            return bad(format!(
                "largest I/O {} is not a multiple of 4096 between 4 KiB and 32 MiB",
                self.max_io_bytes
            ));
        }
        if self.name.is_empty() {
            return bad("the target name is empty".into());
        }
        if let Some(name) = &self.io_scheduler {
            check_io_scheduler_name(name).map_err(Error::Params)?;
        }
        Ok(())
    }

    fn ring_depths(&self, depth: u16) -> (u16, u16) {
        let sq = depth as u32 * (1 + self.target_sqes_per_tag as u32) + self.target_sqes_per_queue as u32 + 8;
        let sq = sq.min(16384);
        // Room for every completion that can be outstanding at once, twice over.
        (sq as u16, (sq * 2).min(u16::MAX as u32) as u16)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// We added the device (it is deleted if we fail before handing it out).
    Add,
    /// We are recovering the device of a previous incarnation (never deleted on failure:
    /// something may have it mounted).
    Recover,
}

/// A ublk device this process adds or recovers and serves.
pub struct Device {
    ctrl: UblkCtrl,
    params: DeviceParams,
    mode: Mode,
    dev_id: i32,
    queues: u16,
    depth: u16,
    dev: Option<Arc<UblkDev>>,
    threads: Vec<(u16, JoinHandle<()>)>,
    /// Stopped, or abandoned for recovery: Drop does nothing more.
    finished: bool,
}

enum ThreadMsg {
    Started { qid: u16, tid: i32 },
    Failed { qid: u16, message: String },
}

impl Device {
    /// Adds the device, or finds the one a previous incarnation left (same id, same owner
    /// tag, state LIVE with its server gone or QUIESCED) and prepares to recover it. A stale
    /// device of ours that was never started or already stopped (DEAD) is deleted and added
    /// again with the same id. Nothing is served until [`Device::start`].
    pub fn open(params: &DeviceParams) -> Result<Device, Error> {
        params.validate()?;
        check_driver()?;
        ensure_ctrl_ring()?;
        let id = params.dev_id;
        if id < 0 || !device_exists(id) {
            return Device::add(params, id);
        }
        let probe = UblkCtrl::new_simple(id).map_err(|e| Error::command(id, "GET_DEV_INFO", e))?;
        let info = probe.dev_info();
        if info.ublksrv_flags != params.owner_tag {
            return Err(Error::NotOurs { dev_id: id });
        }
        match info.state as u32 {
            sys::UBLK_S_DEV_DEAD => {
                tracing::info!(dev_id = id, "found our device stopped or never started; deleting and adding it again");
                probe.del_dev().map_err(|e| Error::command(id, "DEL_DEV", e))?;
                drop(probe);
                return Device::add(params, id);
            }
            sys::UBLK_S_DEV_LIVE | sys::UBLK_S_DEV_QUIESCED => {}
            other => {
                return Err(Error::Device {
                    dev_id: id,
                    message: format!("is in state {other}, which cannot be recovered"),
                })
            }
        }
        if info.flags & sys::UBLK_F_USER_RECOVERY as u64 == 0 {
            return Err(Error::Device {
                dev_id: id,
                message: "was created without user recovery, so it cannot be taken over".into(),
            });
        }
        if info.state as u32 == sys::UBLK_S_DEV_LIVE {
            wait_for_exit(id, info.ublksrv_pid)?;
        }
        let mut p = sys::ublk_params::default();
        probe.get_params(&mut p).map_err(|e| Error::command(id, "GET_PARAMS", e))?;
        let size = p.basic.dev_sectors << 9;
        if size != params.size {
            return Err(Error::Device {
                dev_id: id,
                message: format!("is {size} bytes but this volume is {} bytes", params.size),
            });
        }
        if 1u32 << p.basic.logical_bs_shift != params.logical_block {
            return Err(Error::Device {
                dev_id: id,
                message: format!(
                    "has {}-byte logical blocks but this volume has {}",
                    1u32 << p.basic.logical_bs_shift,
                    params.logical_block
                ),
            });
        }
        drop(probe);
        // The kernel's queue count and depth win: a recovered device keeps its geometry.
        let (queues, depth) = (info.nr_hw_queues, info.queue_depth);
        if (params.queues != 0 && params.queues != queues) || params.depth != depth {
            tracing::warn!(
                dev_id = id,
                queues,
                depth,
                "recovering with the device's own queue count and depth, not the configured ones"
            );
        }
        let ctrl = builder(params, id, queues, depth, info.max_io_buf_bytes, 0)
            .dev_flags(dev_flags(params, UblkFlags::UBLK_DEV_F_RECOVER_DEV))
            .build()
            .map_err(|e| Error::command(id, "GET_DEV_INFO", e))?;
        tracing::info!(
            dev_id = id,
            state = state_name(info.state),
            "found the device of a previous server; recovering it"
        );
        Ok(Device {
            ctrl,
            params: params.clone(),
            mode: Mode::Recover,
            dev_id: id,
            queues,
            depth,
            dev: None,
            threads: Vec::new(),
            finished: false,
        })
    }

    fn add(params: &DeviceParams, id: i32) -> Result<Device, Error> {
        let queues = if params.queues == 0 { DeviceParams::default_queues() } else { params.queues };
        let zero_copy = if params.zero_copy && zero_copy_supported() { ZERO_COPY_FLAGS } else { 0 };
        // Only reached for an id that does not exist (or -1): libublk deletes the device of
        // the id it was given when ADD_DEV fails, which must never be someone else's.
        let ctrl = builder(params, id, queues, params.depth, params.max_io_bytes, zero_copy)
            .dev_flags(dev_flags(params, UblkFlags::UBLK_DEV_F_ADD_DEV))
            .build()
            .map_err(|e| Error::command(id, "ADD_DEV", e))?;
        let info = ctrl.dev_info();
        let dev_id = info.dev_id as i32;
        if info.flags & sys::UBLK_F_USER_RECOVERY_REISSUE as u64 == 0 {
            // Dropping `ctrl` deletes the device we just added.
            return Err(Error::Device {
                dev_id,
                message: "the ublk driver does not support user recovery (UBLK_F_USER_RECOVERY_REISSUE)".into(),
            });
        }
        tracing::info!(
            dev_id,
            queues = info.nr_hw_queues,
            depth = info.queue_depth,
            zero_copy = info.flags & sys::UBLK_F_AUTO_BUF_REG as u64 != 0,
            "added ublk device"
        );
        Ok(Device {
            ctrl,
            params: params.clone(),
            mode: Mode::Add,
            dev_id,
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            dev: None,
            threads: Vec::new(),
            finished: false,
        })
    }

    pub fn dev_id(&self) -> i32 {
        self.dev_id
    }

    /// `/dev/ublkb<id>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.dev_id))
    }

    /// The number of queues the device has (the driver caps it at the number of CPUs; a
    /// recovered device keeps the count it was created with).
    pub fn queues(&self) -> u16 {
        self.queues
    }

    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// Whether the device runs in zero copy (`UBLK_F_AUTO_BUF_REG`): asked for and offered
    /// when it was added, or, recovered, whatever it was created with.
    pub fn zero_copy(&self) -> bool {
        self.ctrl.dev_info().flags & sys::UBLK_F_AUTO_BUF_REG as u64 != 0
    }

    /// True when this is a previous server's device being recovered.
    pub fn is_recovery(&self) -> bool {
        self.mode == Mode::Recover
    }

    /// Starts one thread per queue, each driving the target `make_queue(qid, depth)` on its
    /// own io_uring, and makes the device LIVE (START_DEV, or the user-recovery pair
    /// START/END_USER_RECOVERY for a recovered device, whose waiting and reissued requests
    /// then flow to the new targets).
    pub fn start<F>(&mut self, mut make_queue: F) -> Result<(), Error>
    where
        F: FnMut(u16, u16) -> Box<dyn QueueTarget>,
    {
        assert!(self.dev.is_none(), "Device::start called twice");
        ensure_ctrl_ring()?;
        let id = self.dev_id;
        if self.mode == Mode::Recover {
            self.start_recovery()?;
        }
        let params = self.params.clone();
        let (sq_depth, cq_depth) = params.ring_depths(self.depth);
        let tgt_init = move |dev: &mut UblkDev| -> Result<(), UblkError> {
            dev.tgt.dev_size = params.size;
            dev.tgt.sq_depth = sq_depth;
            dev.tgt.cq_depth = cq_depth;
            dev.tgt.params = device_params(&params, dev.dev_info.max_io_buf_bytes);
            Ok(())
        };
        let dev = Arc::new(
            UblkDev::new(self.params.name.clone(), tgt_init, &self.ctrl)
                .map_err(|e| Error::command(id, "opening the device's char device", e))?,
        );
        self.dev = Some(dev.clone());
        let (tx, rx) = mpsc::channel();
        for qid in 0..self.queues {
            let target = make_queue(qid, self.depth);
            let (thread_dev, tx) = (dev.clone(), tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("ublk{id}-q{qid}"))
                .spawn(move || queue_thread(thread_dev, qid, target, tx));
            match spawned {
                Ok(h) => self.threads.push((qid, h)),
                Err(e) => {
                    // Unblock the start below for the queues that will never report.
                    for _ in qid..self.queues {
                        dev.notify_buffer_registration_complete(true);
                    }
                    return Err(Error::Setup { op: "starting a queue thread", reason: e.to_string() });
                }
            }
        }
        drop(tx);
        // Affinity and libublk's device file need every queue thread's tid.
        let mut failures = Vec::new();
        let mut started = 0;
        while started < self.queues {
            match rx.recv() {
                Ok(ThreadMsg::Started { qid, tid }) => {
                    started += 1;
                    self.ctrl.set_thread_affinity(qid, tid);
                    if let Err(e) = self.ctrl.configure_queue(&dev, qid, tid) {
                        tracing::warn!(
                            dev_id = id,
                            qid,
                            "cannot record the queue in libublk's device file: {}",
                            describe(&e)
                        );
                    }
                }
                Ok(ThreadMsg::Failed { qid, message }) => failures.push(format!("queue {qid}: {message}")),
                Err(_) => break,
            }
        }
        let op = if self.mode == Mode::Recover { "END_USER_RECOVERY" } else { "START_DEV" };
        let res = self.ctrl.start_dev(&dev);
        failures.extend(rx.try_iter().filter_map(|m| match m {
            ThreadMsg::Failed { qid, message } => Some(format!("queue {qid}: {message}")),
            ThreadMsg::Started { .. } => None,
        }));
        match res {
            Ok(_) if failures.is_empty() => {}
            Ok(_) => {
                return Err(Error::Device { dev_id: id, message: failures.join("; ") });
            }
            Err(e) => {
                let reason = if failures.is_empty() { describe(&e) } else { failures.join("; ") };
                return Err(Error::Command { dev_id: id, op, reason });
            }
        }
        set_io_timeout(id);
        // Only on a device just added: see set_io_scheduler for why a recovered one keeps its own.
        if let (Mode::Add, Some(name)) = (self.mode, &self.params.io_scheduler) {
            set_io_scheduler(id, name);
        }
        if self.zero_copy() {
            set_stable_writes(id);
        }
        tracing::info!(
            dev_id = id,
            device = %self.path().display(),
            queues = self.queues,
            depth = self.depth,
            recovered = self.mode == Mode::Recover,
            "ublk device is live"
        );
        Ok(())
    }

    fn start_recovery(&self) -> Result<(), Error> {
        let id = self.dev_id;
        let deadline = Instant::now() + RECOVERY_START_TIMEOUT;
        loop {
            // libublk retries "busy" (the dying server's io_uring is still being torn down)
            // for up to 30 s itself, then returns it as Ok(-EBUSY).
            match self.ctrl.start_user_recover() {
                Ok(r) if r >= 0 => return Ok(()),
                Ok(_) if Instant::now() < deadline => continue,
                Ok(r) => {
                    return Err(Error::Command {
                        dev_id: id,
                        op: "START_USER_RECOVERY",
                        reason: format!(
                            "{} for {} s: the previous server has not let go of the device",
                            crate::error::errno_text(r),
                            RECOVERY_START_TIMEOUT.as_secs()
                        ),
                    })
                }
                Err(UblkError::UringIOError(e)) if e == -libc::EINVAL => {
                    return Err(Error::Device {
                        dev_id: id,
                        message: "cannot be recovered (an earlier recovery attempt did not finish); \
                                  unmount it and delete the device to start afresh"
                            .into(),
                    })
                }
                Err(e) => return Err(Error::command(id, "START_USER_RECOVERY", e)),
            }
        }
    }

    /// Whether something holds the block device exclusively: a mounted filesystem, a device
    /// mapper or md member, a swap area. Stopping the device would pull it from under them.
    pub fn in_use(&self) -> bool {
        device_in_use(&self.path())
    }

    /// Clean shutdown: STOP_DEV (waits for the requests in flight, which the queues keep
    /// serving; the disk goes away), waits for the queue threads to end, then DEL_DEV.
    pub fn stop(mut self) -> Result<(), Error> {
        self.finished = true;
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), Error> {
        let id = self.dev_id;
        ensure_ctrl_ring()?;
        self.ctrl.kill_dev().map_err(|e| Error::command(id, "STOP_DEV", e))?;
        for (qid, h) in self.threads.drain(..) {
            if h.join().is_err() {
                tracing::error!(dev_id = id, qid, "queue thread panicked");
            }
        }
        // The char device must be closed before DEL_DEV, which waits for its release.
        self.dev = None;
        self.ctrl.del_dev().map_err(|e| Error::command(id, "DEL_DEV", e))?;
        tracing::info!(dev_id = id, "ublk device stopped and deleted");
        Ok(())
    }

    /// Leaves the device for the next server to recover, as `kill -9` would: the queue
    /// threads keep serving until this process exits, then the kernel quiesces the device and
    /// holds its I/O. Call right before exiting.
    pub fn abandon(mut self) {
        self.finished = true;
        self.ctrl.disown();
        tracing::info!(dev_id = self.dev_id, "leaving the ublk device in place for recovery");
    }
}

/// Whether something holds the block device at `path` exclusively (see [`Device::in_use`]):
/// an exclusive open is refused with EBUSY while it is mounted or claimed.
pub fn device_in_use(path: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL | libc::O_CLOEXEC).open(path) {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// Deletes the device `params.dev_id` if it exists, is ours (`owner_tag`) and has no live
/// server: what a killed primary left behind, on a node that is no longer primary. Its
/// queued I/O fails (a node that lost its role must never resume it: the data moved on at
/// the other site). Returns whether a device was deleted.
pub fn delete_orphan(params: &DeviceParams) -> Result<bool, Error> {
    let id = params.dev_id;
    if id < 0 || check_driver().is_err() || !device_exists(id) {
        return Ok(false);
    }
    ensure_ctrl_ring()?;
    let ctrl = UblkCtrl::new_simple(id).map_err(|e| Error::command(id, "GET_DEV_INFO", e))?;
    let info = ctrl.dev_info();
    if info.ublksrv_flags != params.owner_tag {
        return Err(Error::NotOurs { dev_id: id });
    }
    if info.state as u32 == sys::UBLK_S_DEV_LIVE {
        wait_for_exit(id, info.ublksrv_pid)?;
    }
    // Best effort: a device that was never started has nothing to stop.
    let _ = ctrl.kill_dev();
    ctrl.del_dev().map_err(|e| Error::command(id, "DEL_DEV", e))?;
    tracing::warn!(dev_id = id, "deleted the ublk device a previous primary incarnation left (its queued I/O fails)");
    Ok(true)
}

impl Drop for Device {
    fn drop(&mut self) {
        // A device we added and then failed to hand out is removed again (libublk deletes an
        // added device that was never started when its control drops). A recovered device is
        // never removed here: something may have it mounted.
        if !self.finished && self.mode == Mode::Add && self.dev.is_some() {
            if let Err(e) = self.shutdown() {
                tracing::error!(dev_id = self.dev_id, "cannot remove the ublk device: {e}");
            }
        }
    }
}

/// Opens (or recovers) the device, starts it, calls `on_live`, serves until SIGINT or
/// SIGTERM (blocked beforehand with [`TermSignals::block`]), then stops and deletes it.
pub fn serve<F, G>(params: &DeviceParams, signals: &TermSignals, make_queue: F, on_live: G) -> Result<(), Error>
where
    F: FnMut(u16, u16) -> Box<dyn QueueTarget>,
    G: FnOnce(&Device),
{
    let mut device = Device::open(params)?;
    device.start(make_queue)?;
    on_live(&device);
    let sig = signals.wait();
    tracing::info!(signal = sig, device = %device.path().display(), "stopping");
    device.stop()
}

/// Our device flags and `mode` (`UBLK_DEV_F_ADD_DEV` or `UBLK_DEV_F_RECOVER_DEV`).
fn dev_flags(params: &DeviceParams, mode: UblkFlags) -> UblkFlags {
    if params.single_cpu_affinity {
        mode | UblkFlags::UBLK_DEV_F_SINGLE_CPU_AFFINITY
    } else {
        mode
    }
}

/// The device flags zero copy adds: the request's pages registered for us
/// (`UBLK_F_AUTO_BUF_REG`), with the zero-copy capability it builds on (rublk `-z` sets both).
const ZERO_COPY_FLAGS: u64 = (sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_SUPPORT_ZERO_COPY) as u64;

/// Whether the ublk driver offers zero copy with automatic buffer registration: asked of the
/// driver (`GET_FEATURES`, Linux 6.5+), so a backported feature counts and a kernel without it
/// (6.12) answers no. Not fatal: an unanswered question is a no, and the device copies.
pub fn zero_copy_supported() -> bool {
    if check_driver().is_err() || ensure_ctrl_ring().is_err() {
        return false;
    }
    UblkCtrl::get_features().is_some_and(|f| f & sys::UBLK_F_AUTO_BUF_REG as u64 != 0)
}

fn builder(
    params: &DeviceParams,
    id: i32,
    queues: u16,
    depth: u16,
    io_buf_bytes: u32,
    extra_flags: u64,
) -> UblkCtrlBuilder<'_> {
    UblkCtrlBuilder::default()
        .name(params.name.as_str())
        .id(id)
        .nr_queues(queues)
        .depth(depth)
        .io_buf_bytes(io_buf_bytes)
        .ctrl_flags((sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64 | extra_flags)
        .ctrl_target_flags(params.owner_tag)
}

/// The device's parameters: block sizes, volatile write cache with FUA (so the kernel sends
/// FLUSH and FUA writes), discard and write-zeroes, not rotational.
fn device_params(p: &DeviceParams, max_io_buf_bytes: u32) -> sys::ublk_params {
    let max_discard_sectors = MAX_DISCARD_BYTES >> 9;
    sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: p.logical_block.trailing_zeros() as u8,
            physical_bs_shift: PHYSICAL_BLOCK_SHIFT,
            io_opt_shift: PHYSICAL_BLOCK_SHIFT,
            io_min_shift: PHYSICAL_BLOCK_SHIFT,
            max_sectors: max_io_buf_bytes >> 9,
            dev_sectors: p.size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: DISCARD_GRANULARITY,
            max_discard_sectors,
            max_write_zeroes_sectors: max_discard_sectors,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Turns a ublk io descriptor into a [`BlockIo`] (without its buffer), or the errno to fail
/// it with: operations other than READ, WRITE, FLUSH, DISCARD and WRITE_ZEROES get -EINVAL.
pub fn decode_io(op_flags: u32, nr_sectors: u32, start_sector: u64) -> Result<BlockIo, i32> {
    let op = match op_flags & 0xff {
        sys::UBLK_IO_OP_READ => BlockOp::Read,
        sys::UBLK_IO_OP_WRITE => BlockOp::Write,
        sys::UBLK_IO_OP_FLUSH => BlockOp::Flush,
        sys::UBLK_IO_OP_DISCARD => BlockOp::Discard,
        sys::UBLK_IO_OP_WRITE_ZEROES => BlockOp::WriteZeroes,
        _ => return Err(-libc::EINVAL),
    };
    let fua = op_flags & sys::UBLK_IO_F_FUA != 0;
    if op == BlockOp::Flush {
        return Ok(BlockIo { op, offset: 0, len: 0, fua, buf: std::ptr::null_mut(), buf_index: None });
    }
    let len = u32::try_from(nr_sectors as u64 * 512).map_err(|_| -libc::EINVAL)?;
    let offset = start_sector.checked_mul(512).ok_or(-libc::EINVAL)?;
    Ok(BlockIo { op, offset, len, fua, buf: std::ptr::null_mut(), buf_index: None })
}

/// The queue's io_uring (libublk's per-thread ring), as the target sees it.
struct RingSink<'a> {
    queue: &'a UblkQueue<'a>,
}

impl SqeSink for RingSink<'_> {
    fn push(&mut self, sqe: squeue::Entry) {
        // Retries, submitting what is queued, while the submission queue is full; fails only
        // if io_uring_enter itself fails.
        if let Err(e) = self.queue.ublk_submit_sqe_sync(sqe) {
            tracing::error!(qid = self.queue.get_qid(), "cannot queue a target SQE: {}", describe(&e));
        }
    }

    fn submit_now(&mut self) {
        if let Err(e) = libublk::with_task_io_ring_mut(|ring| ring.submit()) {
            tracing::error!(qid = self.queue.get_qid(), "cannot submit the queued SQEs: {e}");
        }
    }
}

/// One queue's state on its thread.
struct QueueLoop<'a> {
    queue: &'a UblkQueue<'a>,
    bufs: Bufs<'a>,
    /// ublk io commands (FETCH / COMMIT_AND_FETCH) the kernel holds for us. When the queue is
    /// stopping and this reaches 0, the queue is done. (libublk's own check also wants an
    /// empty submission queue, which a target with a periodic timer never has.)
    commands_in_kernel: u32,
}

impl QueueLoop<'_> {
    fn handle(&mut self, target: &mut dyn QueueTarget, user_data: u64, res: i32, flags: u32) {
        let queue = self.queue;
        let mut sink = RingSink { queue };
        if user_data & UD_TARGET != 0 {
            let (bufs, cmds) = (self.bufs, &mut self.commands_in_kernel);
            target.complete(&mut sink, user_data, res, flags, &mut |tag, r| commit(queue, bufs, cmds, tag, r));
            return;
        }
        self.commands_in_kernel = self.commands_in_kernel.saturating_sub(1);
        if res != sys::UBLK_IO_RES_OK as i32 {
            // UBLK_IO_RES_ABORT: the device is stopping (or this server is being replaced);
            // the command is finished and no request came with it.
            return;
        }
        let tag = user_data as u16;
        let iod = queue.get_iod(tag);
        let io = decode_io(iod.op_flags, iod.nr_sectors, iod.start_sector).map(|mut io| {
            match self.bufs {
                Bufs::Copy(bufs) => io.buf = bufs[tag as usize].as_mut_ptr(),
                // Only requests with data have pages registered (`ublk_need_map_req`).
                Bufs::AutoReg(_) if matches!(io.op, BlockOp::Read | BlockOp::Write) => io.buf_index = Some(tag),
                Bufs::AutoReg(_) => {}
            }
            io
        });
        let res = match io {
            Ok(io) => match target.submit(&mut sink, tag, io) {
                Ok(()) => return,
                Err(errno) => errno,
            },
            Err(errno) => {
                tracing::debug!(qid = queue.get_qid(), tag, op_flags = iod.op_flags, "unsupported ublk operation");
                errno
            }
        };
        commit(queue, self.bufs, &mut self.commands_in_kernel, tag, res);
    }
}

impl QueueLoop<'_> {
    fn end_batch(&mut self, target: &mut dyn QueueTarget) {
        let queue = self.queue;
        let (bufs, cmds) = (self.bufs, &mut self.commands_in_kernel);
        target.end_batch(&mut RingSink { queue }, &mut |tag, r| commit(queue, bufs, cmds, tag, r));
    }
}

/// Where a queue's requests keep their data.
#[derive(Clone, Copy)]
enum Bufs<'a> {
    /// One buffer per tag, which the kernel copies a WRITE into and a READ out of.
    Copy(&'a [IoBuf<u8>]),
    /// Zero copy: the kernel registers each request's pages as fixed buffer `tag`, as each
    /// tag's entry asks (the next request's registration rides on FETCH and COMMIT_AND_FETCH).
    AutoReg(&'a [sys::ublk_auto_buf_reg]),
}

/// The registration each tag asks for under zero copy: fixed buffer index = tag (libublk
/// registered a sparse table of `depth` entries on the queue's ring), no fallback flag (a
/// request whose pages cannot be registered fails instead of arriving without a buffer).
fn auto_buf_regs(depth: u16) -> Vec<sys::ublk_auto_buf_reg> {
    (0..depth).map(|tag| sys::ublk_auto_buf_reg { index: tag, ..Default::default() }).collect()
}

/// Completes request `tag` to the kernel (COMMIT_AND_FETCH, which also fetches the tag's next
/// request). libublk queues nothing once the queue is stopping.
fn commit(queue: &UblkQueue, bufs: Bufs, commands_in_kernel: &mut u32, tag: u16, res: i32) {
    let queued = !queue.is_stopping();
    let buf = match bufs {
        Bufs::Copy(bufs) => BufDesc::Slice(bufs[tag as usize].as_slice()),
        Bufs::AutoReg(regs) => BufDesc::AutoReg(regs[tag as usize]),
    };
    match queue.complete_io_cmd_unified(tag, buf, Ok(UblkIORes::Result(res))) {
        Ok(()) if queued => *commands_in_kernel += 1,
        Ok(()) => {}
        Err(e) => tracing::error!(qid = queue.get_qid(), tag, "cannot complete the request: {}", describe(&e)),
    }
}

fn queue_thread(dev: Arc<UblkDev>, qid: u16, target: Box<dyn QueueTarget>, tx: mpsc::Sender<ThreadMsg>) {
    let tid = UblkCtrl::init_queue_thread();
    let _ = tx.send(ThreadMsg::Started { qid, tid });
    let fail = |message: String| {
        tracing::error!(dev_id = dev.dev_info.dev_id, qid, "queue setup failed: {message}");
        let _ = tx.send(ThreadMsg::Failed { qid, message });
        // Wakes the start, which waits for every queue's buffers (reported as a failure).
        dev.notify_buffer_registration_complete(true);
    };
    let queue = match UblkQueue::new(qid, &dev) {
        Ok(q) => q,
        Err(e) => return fail(describe(&e)),
    };
    let zero_copy = dev.dev_info.flags & sys::UBLK_F_AUTO_BUF_REG as u64 != 0;
    let (copy_bufs, regs) = if zero_copy {
        (Vec::new(), auto_buf_regs(dev.dev_info.queue_depth))
    } else {
        (dev.alloc_queue_io_bufs(), Vec::new())
    };
    let (bufs, list) = if zero_copy {
        (Bufs::AutoReg(&regs), BufDescList::AutoRegs(&regs))
    } else {
        (Bufs::Copy(&copy_bufs), BufDescList::Slices(Some(&copy_bufs)))
    };
    let queue = match queue.submit_fetch_commands_unified(list) {
        Ok(q) => q,
        Err(e) => return fail(describe(&e)),
    };
    let mut state = QueueLoop { queue: &queue, bufs, commands_in_kernel: queue.nr_tags() };
    let mut target = target;
    target.start(&mut RingSink { queue: &queue });
    loop {
        let r = queue
            .flush_and_wake_io_tasks(|ud, cqe, _last| state.handle(&mut *target, ud, cqe.result(), cqe.flags()), 1);
        state.end_batch(&mut *target);
        match r {
            Ok(_) if queue.is_stopping() && state.commands_in_kernel == 0 => break,
            Ok(_) => {}
            Err(UblkError::QueueIsDown) => break,
            Err(UblkError::IOError(e)) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                tracing::error!(
                    dev_id = dev.dev_info.dev_id,
                    qid,
                    "queue stopped on an io_uring error: {}",
                    describe(&e)
                );
                break;
            }
        }
    }
    // The target may still have operations in flight on this ring (a timer, a socket
    // receive) that point into its memory; the ring is torn down asynchronously after this
    // thread exits. The target keeps that memory alive and releases the rest.
    target.retire();
    tracing::debug!(dev_id = dev.dev_info.dev_id, qid, "queue thread done");
}

fn device_exists(id: i32) -> bool {
    std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

fn state_name(state: u16) -> &'static str {
    match state as u32 {
        sys::UBLK_S_DEV_DEAD => "dead",
        sys::UBLK_S_DEV_LIVE => "live",
        sys::UBLK_S_DEV_QUIESCED => "quiesced",
        _ => "unknown",
    }
}

/// A LIVE device whose server process still exists is someone else's to serve. A server
/// killed a moment ago may still be exiting: give it a few seconds.
fn wait_for_exit(id: i32, pid: i32) -> Result<(), Error> {
    let deadline = Instant::now() + PREVIOUS_SERVER_GRACE;
    while process_alive(pid) {
        if Instant::now() >= deadline {
            return Err(Error::InUse { dev_id: id, pid });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether `pid` is a running process other than this one (a zombie has released its files,
/// and with them the device).
fn process_alive(pid: i32) -> bool {
    if pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')').and_then(|i| stat[i + 1..].trim_start().chars().next()) {
            Some('Z') | Some('X') | None => false,
            Some(_) => true,
        },
        Err(_) => false,
    }
}

/// Sets the device's request timeout to [`IO_TIMEOUT`]: how long a dead server can keep a
/// full queue's requests before the kernel notices.
///
/// Linux 6.12's ublk_drv learns that the server died by cancelling the server's ublk
/// commands still queued in its io_uring (`ublk_uring_cmd_cancel_fn`). A queue whose every
/// tag was in flight at the server at that moment (a saturated queue: e.g. fio with iodepth
/// = queue depth) has no such command, so its requests are only aborted (and, with REISSUE,
/// requeued) by `ublk_timeout` when the block layer's request timer fires, 30 s by default.
/// Until then the device cannot be recovered (and when another queue's cancellation started
/// the quiesce work, that work holds the device's mutex waiting for those requests, so the
/// restarted server blocks even reading the device's parameters): a `kill -9` under load
/// stalled the device for 30 s. While the server lives, `ublk_timeout` only
/// re-arms the timer (`BLK_EH_RESET_TIMER`; devices without `UBLK_F_UNPRIVILEGED_DEV`), so
/// a short timeout costs nothing else. (Newer kernels also abort such requests when the
/// server's char device is released, "ublk: improve detection and handling of ublk server
/// exit", and do not need this.)
///
/// Not fatal: without it recovery still works, only later.
fn set_io_timeout(id: i32) {
    let path = format!("/sys/block/ublkb{id}/queue/io_timeout");
    if let Err(e) = std::fs::write(&path, IO_TIMEOUT.as_millis().to_string()) {
        tracing::warn!(
            dev_id = id,
            "cannot set {path}: {e}; after a crash under full load, recovery waits for the kernel's \
             request timeout (30 s by default)"
        );
    }
}

/// Selects the disk's I/O scheduler; by default `none` ([`IO_SCHEDULER_DEFAULT`]). The kernel
/// gives a disk with one hardware queue `mq-deadline` (`elevator_get_default`), and with a
/// scheduler blk-mq queues each request in it and runs the queue afterwards. On Linux 7.3
/// that is one more thread hop per request: with fio's io_uring O_DIRECT writes no plug was
/// in effect and `blk_mq_submit_bio` handed every request to a kblockd worker (ftrace of
/// `kblockd_mod_delayed_work_on`; block tracepoints: 16398 of 16622 requests issued by
/// `kworker/…H-kblockd`, where 6.12 issues them from fio's context when its per-bio plug is
/// flushed). Without a scheduler the request goes to the server from the submitter's own
/// context. The ordering a scheduler buys is of no use here: the server's io_uring and the
/// peer reorder anyway, and the backing file's own device has its scheduler. Loop and DRBD
/// (bio-based) have none either. Measured in the TCG VM, metroblk standalone,
/// `mq-deadline` -> `none`, two rounds: 7.3 4k QD32 4.5k/6.1k -> 11.0k/16.8k IOPS, 128k QD8
/// 199/361 -> 396/473 MiB/s; 6.12 4k QD32 8.7k/13.1k -> 13.7k/17.6k IOPS, 4k QD1 1.4k/1.9k ->
/// 1.9k/2.2k IOPS.
///
/// Only for a device just added. A recovered device keeps its disk and so the scheduler it
/// was given: switching freezes the queue, which waits for every request in flight, and a
/// recovering server may hold some until its peer or the witness answers. For the same reason
/// the write is skipped when the scheduler is already the one asked for. Not fatal: a
/// scheduler the kernel lacks is a warning, and the device works with the kernel's.
fn set_io_scheduler(id: i32, name: &str) {
    let path = format!("/sys/block/ublkb{id}/queue/scheduler");
    let offered = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!(dev_id = id, "cannot read {path}: {e}; the device keeps the kernel's I/O scheduler");
            return;
        }
    };
    if scheduler_current(&offered) == Some(name) {
        return;
    }
    if let Err(e) = std::fs::write(&path, name) {
        tracing::warn!(
            dev_id = id,
            offered = offered.trim(),
            "cannot select the I/O scheduler {name:?} in {path}: {e}; the device keeps the kernel's"
        );
    }
}

/// Accepts a word that can name a kernel I/O scheduler (`none`, `mq-deadline`, `kyber`,
/// `bfq`): lower-case letters, digits, `-` and `_`, at most [`IO_SCHEDULER_NAME_LEN_MAX`].
/// Whether this kernel has it is known only when the device is started.
pub fn check_io_scheduler_name(name: &str) -> Result<(), String> {
    let word = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    if name.is_empty() || name.len() > IO_SCHEDULER_NAME_LEN_MAX || !name.chars().all(word) {
        return Err(format!(
            "I/O scheduler {name:?} is not a scheduler's name (lower-case letters, digits, '-' and '_', \
             at most {IO_SCHEDULER_NAME_LEN_MAX}; e.g. \"none\", \"mq-deadline\")"
        ));
    }
    Ok(())
}

/// The selected scheduler in the text of `queue/scheduler` ("none [mq-deadline] kyber").
fn scheduler_current(offered: &str) -> Option<&str> {
    offered.split_whitespace().find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
}

/// Asks writers through the page cache to keep a page unchanged while it is being written
/// (`/sys/block/ublkbN/queue/stable_writes`: `folio_wait_stable` before a page under writeback
/// is changed again), for a device in zero copy. There the local write and the send to the
/// peer each read the request's pages, at different times: a file system or an mmap writer
/// that changed a page between the two would leave the copies different. (In copy mode ublk
/// copies the pages once, and both go from that copy.) A client that changes its own O_DIRECT
/// buffer mid-write is not covered: no kernel setting stops that (README, "Zero copy").
///
/// Not fatal: without it such a page is found by `verify` instead.
fn set_stable_writes(id: i32) {
    let path = format!("/sys/block/ublkb{id}/queue/stable_writes");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::warn!(
            dev_id = id,
            "cannot set {path}: {e}; a page changed while it is written can reach the two copies in \
             different versions (an online verify finds and resyncs it)"
        );
    }
}

/// libublk's control commands go through a per-thread io_uring; make sure this thread has one.
fn ensure_ctrl_ring() -> Result<(), Error> {
    libublk::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(IoUring::<squeue::Entry128>::builder().build(16).map_err(UblkError::IOError)?);
        }
        Ok(())
    })
    .map_err(|e| Error::Setup { op: "creating the io_uring for ublk control commands", reason: describe(&e) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selected_scheduler_is_the_bracketed_one() {
        assert_eq!(scheduler_current("none [mq-deadline] kyber bfq\n"), Some("mq-deadline"));
        assert_eq!(scheduler_current("[none] mq-deadline\n"), Some("none"));
        assert_eq!(scheduler_current("none\n"), None);
        assert_eq!(scheduler_current(""), None);
    }

    #[test]
    fn scheduler_names_are_words() {
        for ok in ["none", "mq-deadline", "kyber", "bfq", "a_1"] {
            check_io_scheduler_name(ok).unwrap();
        }
        for bad in ["", "None", "mq deadline", "none\n", "../x", "a-very-long-scheduler-name"] {
            assert!(check_io_scheduler_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn io_descriptors_decode() {
        let w = decode_io(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA, 8, 16).unwrap();
        assert_eq!((w.op, w.offset, w.len, w.fua), (BlockOp::Write, 8192, 4096, true));
        let r = decode_io(sys::UBLK_IO_OP_READ, 1, 0).unwrap();
        assert_eq!((r.op, r.offset, r.len, r.fua), (BlockOp::Read, 0, 512, false));
        let f = decode_io(sys::UBLK_IO_OP_FLUSH, 0, 77).unwrap();
        assert_eq!((f.op, f.offset, f.len), (BlockOp::Flush, 0, 0));
        assert_eq!(decode_io(sys::UBLK_IO_OP_DISCARD, 2048, 8).unwrap().op, BlockOp::Discard);
        assert_eq!(decode_io(sys::UBLK_IO_OP_WRITE_ZEROES, 2048, 8).unwrap().op, BlockOp::WriteZeroes);
        assert_eq!(decode_io(sys::UBLK_IO_OP_WRITE_SAME, 8, 0).unwrap_err(), -libc::EINVAL);
        assert_eq!(decode_io(sys::UBLK_IO_OP_ZONE_APPEND, 8, 0).unwrap_err(), -libc::EINVAL);
        // A length that does not fit the request's u32 is refused, not truncated.
        assert_eq!(decode_io(sys::UBLK_IO_OP_DISCARD, u32::MAX, 0).unwrap_err(), -libc::EINVAL);
    }

    #[test]
    fn params_are_validated() {
        let ok = DeviceParams::new("metroblk", 256 << 20);
        assert!(ok.validate().is_ok());
        type Case = (fn(&mut DeviceParams), &'static str);
        let cases: [Case; 4] = [
            (|p| p.logical_block = 1024, "not 512 or 4096"),
            (|p| p.size = 1000, "not a positive multiple"),
            (|p| p.depth = 0, "queue depth 0"),
            (|p| p.max_io_bytes = 1000, "largest I/O"),
        ];
        for (change, want) in cases {
            let mut p = ok.clone();
            change(&mut p);
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn device_parameters_advertise_cache_fua_and_discard() {
        let mut p = DeviceParams::new("metroblk", 256 << 20);
        p.logical_block = 4096;
        let d = device_params(&p, 512 << 10);
        assert_eq!(d.types, sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD);
        assert_eq!(d.basic.attrs, sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA);
        assert_eq!(d.basic.attrs & sys::UBLK_ATTR_ROTATIONAL, 0);
        assert_eq!((d.basic.logical_bs_shift, d.basic.physical_bs_shift), (12, 12));
        assert_eq!(d.basic.dev_sectors, (256 << 20) >> 9);
        assert_eq!(d.basic.max_sectors, 1024);
        assert_eq!(d.discard.max_discard_segments, 1);
        assert!(d.discard.discard_granularity > 0);
        assert!(d.discard.max_write_zeroes_sectors > 0);
    }

    #[test]
    fn ring_has_room_for_target_operations() {
        let mut p = DeviceParams::new("metroblk", 1 << 30);
        p.target_sqes_per_tag = 1;
        p.target_sqes_per_queue = 4;
        let (sq, cq) = p.ring_depths(128);
        assert!(sq >= 128 + 128 + 4, "{sq}");
        assert!(cq >= sq);
        let (sq, cq) = p.ring_depths(4096);
        assert!(sq as u32 <= 16384 && cq >= sq);
    }

    #[test]
    fn process_liveness() {
        assert!(!process_alive(std::process::id() as i32), "ourselves");
        assert!(!process_alive(-1));
        assert!(!process_alive(i32::MAX));
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        assert!(process_alive(child.id() as i32));
        child.kill().unwrap();
        // Killed but not yet reaped: a zombie holds no files any more.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!process_alive(child.id() as i32));
        child.wait().unwrap();
    }
}
