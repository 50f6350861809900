//! metroblk integration test support.
//!
//! - [`vm`]: runs a shell script as root inside a QEMU VM whose kernel has ublk_drv
//!   (`tests/vm/run.sh`), for machines whose own kernel lacks ublk.
//! - [`ublk_env`]: decides whether ublk tests run natively or in that VM, and runs them there.
//! - [`ublk_script`]: the bash prelude of the ublk end-to-end tests (two nodes, the device).
//! - [`netns`]: two sites in network namespaces joined by a veth link a test cuts.
//! - [`writer`]: an in-process primary (the engine without ublk) writing at a queue depth;
//!   `src/bin/write_load.rs` runs one as a process a test can kill.

pub mod cluster;
pub mod model_clock;
pub mod netns;
pub mod ublk_env;
pub mod ublk_script;
pub mod vm;
pub mod writer;

mod capture;
