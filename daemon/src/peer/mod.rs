//! The peer link: everything that crosses the wire between the two data nodes.
//!
//! - `link`: the primary's link phases and keepalive, as pure state (sans-I/O).
//! - `connector`: the primary dials the peer (backoff, handshake) and hands sockets to queues.
//! - `listener`: the secondary accepts and authenticates links from the primary.
//! - `sender` / `receiver`: in-order batched frame I/O on a socket through io_uring.
//! - `replica`: the secondary applies replicated writes and acknowledges them.
//! - `replica_state`: the secondary's link rules as pure state, tested exhaustively.
//! - `sessions`: on the secondary, a newer link for a queue supersedes the older one.
//! - `transport`: plain TCP or TLS handed to kernel TLS, right after connect/accept.

pub mod connector;
pub mod handoff;
pub mod link;
pub mod listener;
pub mod receiver;
pub mod replica;
pub mod replica_state;
pub mod sender;
pub mod sessions;
pub mod transport;

use std::os::fd::AsRawFd;

/// Kernel-level dead-peer detection for a data link, on both ends: TCP keepalive probes after
/// 2 s of silence (every 1 s, 3 of them) end a half-open connection whose peer vanished, and
/// TCP_USER_TIMEOUT ends one whose sent data stays unacknowledged for the peer timeout. The
/// application-level timeouts (PING on the primary, silence on the secondary) catch a peer
/// whose kernel is alive but whose daemon is not.
pub fn set_dead_peer_detection(sock: &impl AsRawFd) -> std::io::Result<()> {
    let fd = sock.as_raw_fd();
    let user_timeout_ms = crate::volume::queue::PEER_TIMEOUT.as_millis() as libc::c_int;
    for (level, opt, val) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 2),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
        (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, user_timeout_ms),
    ] {
        let v: libc::c_int = val;
        // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int; `fd` is an
        // open socket owned by the caller for the duration of the call.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
