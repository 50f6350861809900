//! metroblk: a synchronous two-site block-device mirror.
//!
//! Start at `ARCHITECTURE.md` in the repository root for the map. In short:
//! - `config`: the node's TOML file, validated into `NodeConfig`.
//! - `volume`: the engine (backing file, per-queue write-path state machine, counters).
//! - `peer`: links between the two data nodes (dial, accept, frame I/O, the replica side).
//! - `frontend`: the engine as a ublk queue target (metroblk-ublk drives it).
//! - `node`: `metroblk node run` — wires a config to volumes, links, the ublk device and the
//!   control socket.
//! - `control`: the control socket and the `status` report.
//! - `metadata`: the metadata file (superblock and dirty bitmap), crash-safe; `create-md`.

pub mod backing;
pub mod bitmap;
pub mod config;
pub mod control;
pub mod demo;
pub mod events;
pub mod export;
pub mod fencing;
pub mod frontend;
pub mod lifecycle;
pub mod metadata;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod resync;
pub mod systemd;
pub mod volume;
