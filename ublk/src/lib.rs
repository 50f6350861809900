//! The ublk frontend of metroblk: exposes a block target as `/dev/ublkbN` through libublk.
//!
//! This crate knows nothing of replication. It drives a [`QueueTarget`] per ublk queue, one
//! thread and one io_uring per queue (libublk's queue ring): the target gets every request of
//! its queue through [`QueueTarget::submit`], may put its own I/O on the same ring through the
//! [`SqeSink`], and gets every completion of that I/O back through [`QueueTarget::complete`].
//! Target I/O follows libublk's `user_data` layout (`tag | op << 16 | aux << 24 | 1 << 63`):
//! bit 63 marks a completion as the target's.
//!
//! Device lifecycle ([`Device`]):
//! - [`check_driver`] turns a missing or unusable ublk driver into one clear line.
//! - [`Device::open`] adds a new device, or finds the device of a previous incarnation of this
//!   server by its id (and the owner tag stored in it) and prepares to recover it
//!   (`UBLK_F_USER_RECOVERY`, see [`device`] for the reasoning about REISSUE).
//! - [`Device::start`] runs the queue threads and makes the device LIVE. Where the driver
//!   offers it and the target asks, requests come in zero copy: their pages registered in
//!   the queue's io_uring ([`BlockIo::buf_index`]), not copied into a buffer of ours.
//! - [`Device::stop`] stops and deletes it (clean shutdown); [`Device::abandon`] leaves it
//!   for the next incarnation to recover, as `kill -9` does.
//! - [`TermSignals`] blocks SIGINT/SIGTERM in every thread and waits for them, so a clean
//!   shutdown runs on one thread; [`serve`] ties it all together.

pub mod device;
pub mod driver;
pub mod error;
pub mod signals;
pub mod target;

pub use device::{
    check_io_scheduler_name, delete_orphan, device_in_use, serve, zero_copy_supported, Device, DeviceParams,
    DEFAULT_DEPTH, DEFAULT_MAX_IO_BYTES, IO_SCHEDULER_DEFAULT, QUEUES_DEFAULT,
};
pub use driver::{check_driver, UBLK_CONTROL};
pub use error::Error;
pub use signals::TermSignals;
pub use target::{BlockIo, BlockOp, QueueTarget, SqeSink, UD_TARGET};
