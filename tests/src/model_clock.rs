//! What the model checks (`tests/fencing_model.rs`, `tests/group_model.rs`) share: the two
//! nodes, one global clock in steps and the lease, so their states stay deterministic.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use metroblk::fencing::lease::LeaseClock;

/// One step of the global clock.
pub const STEP_MS: u64 = 250;
pub const LEASE_MS: u64 = 1000;
/// The configured clock drift bound (1 %).
pub const DRIFT_PPM: u32 = 10_000;
pub const NAMES: [&str; 2] = ["alpha", "beta"];
pub const A: usize = 0;
pub const B: usize = 1;

/// The fixed origin of every `Instant` in a model.
pub fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// The instant of step `step`.
pub fn instant(step: u8) -> Instant {
    base() + Duration::from_millis(step as u64 * STEP_MS)
}

pub fn lease_clock() -> LeaseClock {
    LeaseClock::new(Duration::from_millis(LEASE_MS), DRIFT_PPM)
}
