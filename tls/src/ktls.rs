//! The TLS handshake on a connected blocking socket, then the kernel's TLS takes over.
//!
//! After [`secure_client`] / [`secure_server`] return, the socket is in kTLS mode: whatever
//! is written to it with `send`/`write`/SENDMSG goes out as TLS 1.3 application records, and
//! `recv`/`read`/RECVMSG return decrypted, authenticated bytes. The engine's io_uring data
//! path keeps its plain socket operations; the existing HMAC handshake then runs inside the
//! encrypted stream.
//!
//! Rules that keep the hand-off exact:
//! - rustls reads the socket one TLS record at a time during the handshake
//!   ([`RecordReader`]), so no byte that follows the handshake (the peer's first application
//!   record) is left inside rustls when the kernel takes over;
//! - nothing is sent after the handshake by TLS itself: no session tickets, no key updates
//!   (rustls sends a key update only when asked, and after the hand-off it is gone);
//! - a non-data record arriving later (an alert, a key update) makes the kernel's `recvmsg`
//!   fail with EIO unless the caller reads the record type in a control message; the data
//!   path asks for no control message, so such a record is an I/O error, which ends the link,
//!   and is never taken for data. A record that fails authentication (a flipped bit) fails
//!   with EBADMSG and the kernel poisons the socket: the link ends.

use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Instant;

use rustls::{ClientConnection, ConnectionTrafficSecrets, ServerConnection};

use crate::keys::TlsSetup;

/// Why securing a link failed. Each text is one line for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// The network (or a peer that went away, or the deadline).
    #[error("TLS handshake: {0}")]
    Io(String),
    /// The TLS handshake itself failed: wrong keys or certificates, or a peer that does not
    /// speak TLS. Repeating at once would meet the same answer.
    #[error("TLS handshake: {0}")]
    Refused(String),
    /// This kernel cannot take the session over.
    #[error("{0}")]
    KtlsMissing(String),
}

impl TlsError {
    /// The peer (or its configuration) refused, rather than the network failing.
    pub fn is_refusal(&self) -> bool {
        matches!(self, TlsError::Refused(_) | TlsError::KtlsMissing(_))
    }
}

/// The one line a node without kTLS gives for `transport = "tls"`.
pub const KTLS_MISSING: &str = "kernel TLS (kTLS) is not available on this host: transport = \"tls\" needs the kernel's `tls` module (CONFIG_TLS; modprobe tls)";

/// The one line where kTLS exists but not the negotiated cipher.
pub const KTLS_CIPHER_MISSING: &str = "kernel TLS has no AES-GCM or ChaCha20-Poly1305 on this host: load the crypto modules (modprobe gcm aesni_intel chacha20poly1305)";

const SOL_TLS: libc::c_int = 282;
const TCP_ULP: libc::c_int = 31;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// `struct tls_crypto_info` (linux/tls.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct CryptoInfo {
    version: u16,
    cipher_type: u16,
}

/// `struct tls12_crypto_info_aes_gcm_{128,256}` and `_chacha20_poly1305` (linux/tls.h): the
/// same layout with the key, IV and salt sizes as parameters.
#[repr(C)]
#[derive(Clone, Copy)]
struct CipherInfo<const IV: usize, const KEY: usize, const SALT: usize> {
    info: CryptoInfo,
    iv: [u8; IV],
    key: [u8; KEY],
    salt: [u8; SALT],
    rec_seq: [u8; 8],
}

/// Whether this kernel has kTLS: setting the `tls` upper-layer protocol on an unconnected
/// TCP socket fails with ENOTCONN where the module exists (it is loaded on demand) and
/// ENOENT where it does not. No connection, no network namespace's loopback needed.
pub fn ktls_check() -> Result<(), String> {
    // SAFETY: socket(2) has no memory-safety preconditions; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("checking for kernel TLS: {}", std::io::Error::last_os_error()));
    }
    let r = set_ulp(fd);
    // SAFETY: `fd` is the socket made above, closed once.
    unsafe { libc::close(fd) };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Err(KTLS_MISSING.into()),
        Err(e) => Err(format!("checking for kernel TLS: {e}")),
    }
}

fn set_ulp(fd: libc::c_int) -> std::io::Result<()> {
    let name = b"tls";
    // SAFETY: passes a live 3-byte buffer with its length; the kernel copies it.
    let r = unsafe { libc::setsockopt(fd, libc::SOL_TCP, TCP_ULP, name.as_ptr() as *const libc::c_void, 3) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Feeds rustls exactly one TLS record at a time (5-byte header, then its body), so the
/// handshake never reads past its last record.
struct RecordReader<'a> {
    stream: &'a TcpStream,
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
}

impl Read for RecordReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut s = self.stream;
        if self.body_left > 0 {
            let want = buf.len().min(self.body_left);
            let n = s.read(&mut buf[..want])?;
            self.body_left -= n;
            return Ok(n);
        }
        let want = buf.len().min(self.header.len() - self.header_len);
        let n = s.read(&mut buf[..want])?;
        self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[..n]);
        self.header_len += n;
        if self.header_len == self.header.len() {
            self.body_left = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
            self.header_len = 0;
        }
        Ok(n)
    }
}

fn io_text(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            "the peer did not finish the TLS handshake in time".into()
        }
        _ => e.to_string(),
    }
}

/// One line for a failed rustls handshake, saying what it most likely means.
fn rustls_text(e: &rustls::Error, first_record: bool) -> String {
    use rustls::{AlertDescription as A, Error as E};
    match e {
        E::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => {
            "the peer does not speak TLS (is its transport \"tcp\"?)".into()
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } if first_record => {
            "the peer does not speak TLS (is its transport \"tcp\"?)".into()
        }
        E::InvalidCertificate(rustls::CertificateError::Other(o)) => format!("refused the peer's certificate: {o}"),
        E::InvalidCertificate(c) => format!("refused the peer's certificate: {c:?}"),
        E::AlertReceived(A::BadCertificate | A::CertificateUnknown | A::UnknownCA | A::DecryptError)
        | E::AlertReceived(A::CertificateRequired | A::AccessDenied) => {
            format!("the peer refused our certificate ({e}): different authkeys or certificates, its log says which")
        }
        other => other.to_string(),
    }
}

/// One line for a TLS handshake error as tokio-rustls reports it (an I/O error around
/// rustls's own).
pub fn handshake_error_text(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(r) => rustls_text(r, false),
        None => io_text(e),
    }
}

/// Runs the handshake of `conn` over `stream` until done or `deadline`, then hands the
/// session to the kernel.
fn run(stream: &TcpStream, mut conn: rustls::Connection, deadline: Instant) -> Result<(), TlsError> {
    let mut reader = RecordReader { stream, header: [0; 5], header_len: 0, body_left: 0 };
    let mut records = 0u32;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| TlsError::Io("the peer did not finish the TLS handshake in time".into()))
    };
    loop {
        while conn.wants_write() {
            stream.set_write_timeout(Some(left()?)).map_err(|e| TlsError::Io(e.to_string()))?;
            let mut w = stream;
            conn.write_tls(&mut w).map_err(|e| TlsError::Io(io_text(&e)))?;
        }
        if !conn.is_handshaking() {
            break;
        }
        stream.set_read_timeout(Some(left()?)).map_err(|e| TlsError::Io(e.to_string()))?;
        match conn.read_tls(&mut reader) {
            Ok(0) => {
                return Err(TlsError::Refused(if records == 0 {
                    "the peer closed the connection without answering: is its transport \"tls\" too (its log says)?"
                        .into()
                } else {
                    "the peer closed the connection during the handshake (its log says why)".into()
                }))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(TlsError::Io(io_text(&e))),
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer (an alert), best effort, then report our own reason.
            let _ = stream.set_write_timeout(Some(std::time::Duration::from_millis(100)));
            let mut w = stream;
            let _ = conn.write_tls(&mut w);
            return Err(TlsError::Refused(rustls_text(&e, records == 0)));
        }
        records += 1;
    }
    // The handshake read no record past its last one, and TLS sends nothing of its own from
    // here on; what rustls holds as plaintext would be lost, so refuse rather than lose it.
    let pending = conn.process_new_packets().map(|s| s.plaintext_bytes_to_read()).unwrap_or(0);
    if pending > 0 {
        return Err(TlsError::Refused(format!("the peer sent {pending} bytes of data inside the handshake")));
    }
    stream.set_read_timeout(None).map_err(|e| TlsError::Io(e.to_string()))?;
    stream.set_write_timeout(None).map_err(|e| TlsError::Io(e.to_string()))?;
    let secrets =
        conn.dangerous_extract_secrets().map_err(|e| TlsError::Refused(format!("extracting the session keys: {e}")))?;
    install(stream.as_raw_fd(), secrets)
}

/// The dialer's side: TLS handshake on the connected `stream` (blocking), then kTLS.
pub fn secure_client(stream: &TcpStream, setup: &TlsSetup, deadline: Instant) -> Result<(), TlsError> {
    let conn = ClientConnection::new(setup.client.clone(), setup.server_name.clone())
        .map_err(|e| TlsError::Refused(e.to_string()))?;
    run(stream, conn.into(), deadline)
}

/// The listener's side: TLS handshake on the accepted `stream` (blocking), then kTLS.
pub fn secure_server(stream: &TcpStream, setup: &TlsSetup, deadline: Instant) -> Result<(), TlsError> {
    let conn = ServerConnection::new(setup.server.clone()).map_err(|e| TlsError::Refused(e.to_string()))?;
    run(stream, conn.into(), deadline)
}

/// Sets the kernel's TLS on `fd` with the session's keys and sequence numbers.
fn install(fd: libc::c_int, secrets: rustls::ExtractedSecrets) -> Result<(), TlsError> {
    set_ulp(fd).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => TlsError::KtlsMissing(KTLS_MISSING.into()),
        _ => TlsError::Io(format!("handing the session to kernel TLS: {e}")),
    })?;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    set_keys(fd, TLS_TX, tx_seq, &tx)?;
    set_keys(fd, TLS_RX, rx_seq, &rx)
}

fn set_keys(fd: libc::c_int, dir: libc::c_int, seq: u64, s: &ConnectionTrafficSecrets) -> Result<(), TlsError> {
    let rec_seq = seq.to_be_bytes();
    let unsupported = || TlsError::Refused("the negotiated cipher has no kernel TLS support".into());
    match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            let info = gcm::<16>(TLS_CIPHER_AES_GCM_128, key.as_ref(), iv.as_ref(), rec_seq).ok_or_else(unsupported)?;
            set_info(fd, dir, &info)
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            let info = gcm::<32>(TLS_CIPHER_AES_GCM_256, key.as_ref(), iv.as_ref(), rec_seq).ok_or_else(unsupported)?;
            set_info(fd, dir, &info)
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            let info = CipherInfo::<12, 32, 0> {
                info: CryptoInfo { version: TLS_1_3_VERSION, cipher_type: TLS_CIPHER_CHACHA20_POLY1305 },
                iv: iv.as_ref().try_into().map_err(|_| unsupported())?,
                key: key.as_ref().try_into().map_err(|_| unsupported())?,
                salt: [],
                rec_seq,
            };
            set_info(fd, dir, &info)
        }
        _ => Err(unsupported()),
    }
}

/// AES-GCM: the 12-byte IV is the 4-byte salt and the 8-byte explicit part.
fn gcm<const KEY: usize>(cipher: u16, key: &[u8], iv: &[u8], rec_seq: [u8; 8]) -> Option<CipherInfo<8, KEY, 4>> {
    Some(CipherInfo {
        info: CryptoInfo { version: TLS_1_3_VERSION, cipher_type: cipher },
        iv: iv.get(4..12)?.try_into().ok()?,
        key: key.try_into().ok()?,
        salt: iv.get(..4)?.try_into().ok()?,
        rec_seq,
    })
}

fn set_info<T>(fd: libc::c_int, dir: libc::c_int, info: &T) -> Result<(), TlsError> {
    // SAFETY: passes a live, fully initialised #[repr(C)] struct with its size; the kernel
    // copies it.
    let r = unsafe {
        libc::setsockopt(fd, SOL_TLS, dir, info as *const T as *const libc::c_void, std::mem::size_of::<T>() as u32)
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOENT) {
            // The `tls` module is there but the cipher's crypto module could not be loaded.
            return Err(TlsError::KtlsMissing(KTLS_CIPHER_MISSING.into()));
        }
        return Err(TlsError::Io(format!(
            "handing the session's {} keys to kernel TLS: {e}",
            if dir == TLS_TX { "send" } else { "receive" }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::TlsSetup;
    use std::io::Write;
    use std::net::TcpListener;
    use std::time::Duration;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    fn both(client: TlsSetup, server: TlsSetup) -> (Result<(), TlsError>, Result<(), TlsError>) {
        let (c, s) = pair();
        let deadline = Instant::now() + Duration::from_secs(5);
        let t = std::thread::spawn(move || secure_server(&s, &server, deadline));
        let rc = secure_client(&c, &client, deadline);
        drop(c);
        (rc, t.join().unwrap())
    }

    /// Where the kernel has kTLS the session is handed over (and echoes through the kernel's
    /// encryption); where it has not, the hand-off fails with the one clear line, after a
    /// complete, authenticated handshake.
    #[test]
    fn the_same_authkey_completes_the_handshake_and_hands_over_or_says_ktls_is_missing() {
        let a = TlsSetup::from_authkey(b"a shared authkey of enough bytes", "metroblk-peer").unwrap();
        let (rc, rs) = both(a.clone(), a);
        match ktls_check() {
            Ok(()) => {
                assert_eq!(rc, Ok(()));
                assert_eq!(rs, Ok(()));
            }
            Err(_) => {
                assert_eq!(rc, Err(TlsError::KtlsMissing(KTLS_MISSING.into())));
                assert_eq!(rs, Err(TlsError::KtlsMissing(KTLS_MISSING.into())));
            }
        }
    }

    #[test]
    fn a_different_authkey_is_refused_in_one_line_naming_the_authkeys() {
        let a = TlsSetup::from_authkey(b"a shared authkey of enough bytes", "metroblk-peer").unwrap();
        let b = TlsSetup::from_authkey(b"another authkey, not the same one", "metroblk-peer").unwrap();
        let (rc, rs) = both(a, b);
        let rc = rc.unwrap_err();
        assert!(rc.is_refusal(), "{rc}");
        assert!(rc.to_string().contains("different authkeys"), "{rc}");
        assert!(!rc.to_string().contains('\n'));
        let rs = rs.unwrap_err();
        assert!(rs.to_string().contains("different authkeys"), "{rs}");
    }

    /// A CA's certificate and key.
    fn ca() -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (p.self_signed(&key).unwrap(), key)
    }

    /// Writes `<dir>/<name>.pem` and `.key`: a certificate for `name` signed by `ca`.
    fn issue(ca: &(rcgen::Certificate, rcgen::KeyPair), dir: &std::path::Path, name: &str) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec![name.to_string()]).unwrap().signed_by(&key, &ca.0, &ca.1).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    /// Certificate files: alpha dials beta; beta's certificate must name "beta" and chain to
    /// the CA, alpha's must chain to it too.
    #[test]
    fn certificate_files_complete_the_handshake_and_a_stranger_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (good, other) = (ca(), ca());
        std::fs::write(d.join("ca.pem"), good.0.pem()).unwrap();
        issue(&good, d, "alpha");
        issue(&good, d, "beta");
        issue(&other, d, "mallory");
        let setup = |who: &str, peer: &str| {
            TlsSetup::from_files(&d.join(format!("{who}.pem")), &d.join(format!("{who}.key")), &d.join("ca.pem"), peer)
                .unwrap()
        };
        let handed_over = |r: Result<(), TlsError>| match r {
            Ok(()) => true,
            Err(TlsError::KtlsMissing(_)) => ktls_check().is_err(),
            Err(_) => false,
        };
        let (rc, rs) = both(setup("alpha", "beta"), setup("beta", "alpha"));
        assert!(handed_over(rc.clone()) && handed_over(rs.clone()), "{rc:?} {rs:?}");
        // A dialer expecting another name refuses beta's certificate.
        let (rc, _) = both(setup("alpha", "gamma"), setup("beta", "alpha"));
        assert!(rc.unwrap_err().to_string().contains("refused the peer's certificate"));
        // A dialer whose certificate another CA signed is refused by the listener.
        let (_, rs) = both(setup("mallory", "beta"), setup("beta", "alpha"));
        let rs = rs.unwrap_err().to_string();
        assert!(rs.contains("refused the peer's certificate") && !rs.contains('\n'), "{rs}");
    }

    #[test]
    fn a_plaintext_answer_is_named_as_a_transport_mismatch() {
        let a = TlsSetup::from_authkey(b"a shared authkey of enough bytes", "metroblk-peer").unwrap();
        let (c, s) = pair();
        let t = std::thread::spawn(move || {
            let mut s = s;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            let _ = s.write_all(b"MBLKPEER and more plaintext");
            std::thread::sleep(Duration::from_millis(200));
        });
        let e = secure_client(&c, &a, Instant::now() + Duration::from_secs(5)).unwrap_err();
        t.join().unwrap();
        assert!(e.to_string().contains("does not speak TLS"), "{e}");
    }

    #[test]
    fn the_record_reader_never_reads_past_a_record() {
        let (mut c, s) = pair();
        // Two records (type 23, version 0303, lengths 3 and 2) and trailing bytes.
        c.write_all(&[23, 3, 3, 0, 3, 1, 2, 3, 23, 3, 3, 0, 2, 4, 5, 9, 9]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut r = RecordReader { stream: &s, header: [0; 5], header_len: 0, body_left: 0 };
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < 15 {
            let n = r.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got.len(), 15);
        // The trailing bytes are still in the socket.
        let mut rest = [0u8; 2];
        let mut s2 = &s;
        s2.read_exact(&mut rest).unwrap();
        assert_eq!(rest, [9, 9]);
    }
}
