//! metroblk integration test support.
//!
//! - [`vm`]: runs a shell script as root inside a QEMU VM whose kernel has ublk_drv
//!   (`tests/vm/run.sh`), for machines whose own kernel lacks ublk.
//! - [`ublk_env`]: decides whether ublk tests run natively or in that VM, and runs them there.
//! - [`ublk_script`]: the bash prelude of the ublk end-to-end tests (two nodes, the device).

pub mod cluster;
pub mod ublk_env;
pub mod ublk_script;
pub mod vm;

mod capture;
