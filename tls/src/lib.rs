//! TLS 1.3 on metroblk's links (`transport = "tls"`).
//!
//! * [`keys`] — what a link authenticates with: a key pair and self-signed certificate derived
//!   from the shared authkey with HKDF and pinned on both sides (the default), or certificate
//!   files signed by a CA; both make a [`TlsSetup`] (rustls client and server configs).
//! * [`ktls`] — the blocking TLS handshake on a connected socket, then the kernel's TLS (kTLS)
//!   takes the session over: afterwards the socket is used with plain `send`/`recv` (and the
//!   data path's io_uring SENDMSG/RECVMSG), encrypted and authenticated by the kernel.
//! * [`sniff`] — what the first bytes of a connection say about its transport, so a node
//!   refuses a peer whose transport differs with one line naming both.
//!
//! The witness link is tokio: it uses [`TlsSetup`]'s configs with tokio-rustls, without kTLS.

pub mod keys;
pub mod ktls;

pub use keys::{TlsKeys, TlsSetup, Transport};
pub use ktls::{handshake_error_text, ktls_check, secure_client, secure_server, TlsError};

/// What the first bytes a listener received say about the peer's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// A TLS handshake record (a ClientHello): the peer has `transport = "tls"`.
    Tls,
    /// Anything else: a plaintext hello (`transport = "tcp"`) or a stranger.
    Plain,
}

/// First byte of a TLS handshake record (content type 22), followed by the legacy version
/// major 3: a ClientHello always starts `16 03`.
const TLS_HANDSHAKE_RECORD: [u8; 2] = [0x16, 0x03];

/// Classifies a connection by its first two bytes (fewer: by what there is).
pub fn sniff(first: &[u8]) -> Sniffed {
    let n = first.len().min(TLS_HANDSHAKE_RECORD.len());
    if n > 0 && first[..n] == TLS_HANDSHAKE_RECORD[..n] {
        Sniffed::Tls
    } else {
        Sniffed::Plain
    }
}

/// The refusal of a peer whose transport differs, naming both ends' settings.
pub fn transport_mismatch(ours: Transport, theirs: Transport) -> String {
    format!("transport differs: this end has transport = \"{ours}\", the other end \"{theirs}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_hello_is_tls_and_a_peer_hello_is_not() {
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x00]), Sniffed::Tls);
        assert_eq!(sniff(b"MBLKPEER"), Sniffed::Plain);
        assert_eq!(sniff(&[0x16, 0x02]), Sniffed::Plain);
        assert_eq!(sniff(&[0x16]), Sniffed::Tls);
    }
}
