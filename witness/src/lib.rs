//! The witness server (third site). It arbitrates fencing and promotion between the two data
//! nodes of each volume; see `../shared/design.md`, "Losing the peer — fencing".
//!
//! [`registry`] decides (pure, sans-I/O); [`state`] keeps the decisions in a checksummed state
//! file; [`server`] serves nodes over TCP (tokio) and [`client`] is what a data node uses to ask;
//! [`metrics`] serves Prometheus metrics (its HTTP server serves the node's too);
//! [`cli`] is the operator's `metroblk witness ...`. The crate depends on the protocol crate only
//! (never on the daemon or ublk), so a witness host needs no ublk.

pub mod cli;
pub mod client;
pub mod config;
mod io;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod state;
