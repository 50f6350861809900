//! The witness server (third site). It arbitrates fencing and promotion between the two data
//! nodes of each volume; see `../shared/design.md`, "Losing the peer — fencing".
//!
//! Not built yet: until it exists a primary that loses its peer holds its writes (see the
//! daemon's `volume::queue`). The crate is in the workspace now so that the dependency
//! direction (`daemon` -> `witness` -> `protocol`, never `ublk`) is fixed from the start.
