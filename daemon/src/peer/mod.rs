//! The peer link: everything that crosses the wire between the two data nodes.
//!
//! - `link`: the primary's link phases and keepalive, as pure state (sans-I/O).
//! - `connector`: the primary dials the peer (backoff, handshake) and hands sockets to queues.
//! - `listener`: the secondary accepts and authenticates links from the primary.
//! - `sender` / `receiver`: in-order batched frame I/O on a socket through io_uring.
//! - `replica`: the secondary applies replicated writes and acknowledges them.

pub mod connector;
pub mod link;
pub mod listener;
pub mod receiver;
pub mod replica;
pub mod sender;
