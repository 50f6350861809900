//! The link's transport, one step right after connect/accept: plain TCP, or TLS 1.3 handed to
//! the kernel's TLS (`[volume.peer] transport = "tls"`, `metroblk_tls`). Afterwards the socket
//! is used exactly as a plain one (the handshake, the data path's io_uring operations, the
//! sync link's reads and writes); the kernel encrypts and authenticates every byte.
//!
//! A listener looks at the first bytes before anything else: a TLS ClientHello at a plain
//! listener, or a plaintext hello at a TLS listener, is refused with one line naming both
//! settings, logged here and sent to the dialer (a plaintext verdict its handshake reads as the
//! refusal; a TLS dialer reads it as "the peer does not speak TLS").

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use metroblk_tls::{Sniffed, TlsError, Transport};

use crate::config::PeerConfig;

/// Bound on a link's set-up after connect or accept (the TLS hand-off, then the metroblk
/// handshake), on both ends, so a half-open peer cannot stall a connector or a listener.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The dialer's side: nothing for TCP; for TLS, the handshake and the kTLS hand-off.
pub fn secure_client(stream: &TcpStream, peer: &PeerConfig, deadline: Instant) -> Result<(), TlsError> {
    match (peer.transport, &peer.tls) {
        (Transport::Tcp, _) => Ok(()),
        (Transport::Tls, Some(setup)) => metroblk_tls::secure_client(stream, setup, deadline),
        (Transport::Tls, None) => Err(TlsError::Refused("the config was read without its keys".into())),
    }
}

/// The listener's side: checks that the peer speaks this volume's transport, then for TLS
/// runs the handshake and the kTLS hand-off. The error is the one line to log.
pub fn secure_server(stream: &TcpStream, peer: &PeerConfig, deadline: Instant) -> Result<(), String> {
    let theirs = match first_bytes(stream, deadline)? {
        Sniffed::Tls => Transport::Tls,
        Sniffed::Plain => Transport::Tcp,
    };
    if theirs != peer.transport {
        let why = metroblk_tls::transport_mismatch(peer.transport, theirs);
        // Best effort: the dialer shows the same line (a 124-byte write on a fresh socket).
        let mut s = stream;
        let _ = s.set_write_timeout(Some(std::time::Duration::from_millis(200)));
        let _ = s.write_all(&metroblk_protocol::refusal_verdict(&why));
        return Err(why);
    }
    match (peer.transport, &peer.tls) {
        (Transport::Tcp, _) => Ok(()),
        (Transport::Tls, Some(setup)) => {
            metroblk_tls::secure_server(stream, setup, deadline).map_err(|e| e.to_string())
        }
        (Transport::Tls, None) => Err("the config was read without its TLS keys".into()),
    }
}

/// What the first bytes (peeked, not consumed) say, waiting for them until `deadline`.
fn first_bytes(stream: &TcpStream, deadline: Instant) -> Result<Sniffed, String> {
    let late = || format!("the peer did not finish the handshake within {} s", HANDSHAKE_TIMEOUT.as_secs());
    let mut buf = [0u8; 2];
    loop {
        let left = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or_else(late)?;
        stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match stream.peek(&mut buf) {
            Ok(0) => return Err("the peer closed the connection before its hello".into()),
            Ok(n) => return Ok(metroblk_tls::sniff(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Err(late())
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Where a volume's links use TLS, the kernel must be able to take the sessions over: one
/// line at start rather than a refusal per link.
pub fn check(peer: &PeerConfig) -> Result<(), String> {
    match peer.transport {
        Transport::Tcp => Ok(()),
        Transport::Tls => metroblk_tls::ktls_check(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::time::Duration;

    fn peer(transport: Transport) -> PeerConfig {
        let key = b"0123456789abcdef0123456789abcdef";
        PeerConfig {
            name: "b".into(),
            address: "127.0.0.1:1".parse().unwrap(),
            authkey_file: "k".into(),
            allow_from: vec![],
            transport,
            tls: (transport == Transport::Tls)
                .then(|| metroblk_tls::TlsSetup::from_authkey(key, crate::config::PEER_TLS_LABEL).unwrap()),
        }
    }

    /// A dialer of one transport at a listener of the other: the listener refuses in one line
    /// naming both, and the dialer learns it too.
    #[test]
    fn a_peer_whose_transport_differs_is_refused_naming_both() {
        for (dialer, listener) in [(Transport::Tcp, Transport::Tls), (Transport::Tls, Transport::Tcp)] {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let server = std::thread::spawn(move || secure_server(&s, &peer(listener), deadline));
            let dialer_saw = match dialer {
                Transport::Tcp => {
                    let mut c = c;
                    c.write_all(b"MBLKPEER").unwrap();
                    let mut v = vec![0u8; 124];
                    c.read_exact(&mut v).unwrap();
                    metroblk_protocol::printable(&v[4..])
                }
                Transport::Tls => secure_client(&c, &peer(Transport::Tls), deadline).unwrap_err().to_string(),
            };
            let refused = server.join().unwrap().unwrap_err();
            assert_eq!(refused, metroblk_tls::transport_mismatch(listener, dialer));
            assert!(refused.contains("\"tls\"") && refused.contains("\"tcp\""), "{refused}");
            match dialer {
                Transport::Tcp => assert_eq!(dialer_saw, refused),
                Transport::Tls => assert!(dialer_saw.contains("does not speak TLS"), "{dialer_saw}"),
            }
        }
    }
}
