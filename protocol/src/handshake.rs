//! Peer-link handshake: compatibility check and mutual authentication.
//!
//! Before any data frame flows, the two nodes of a volume prove to each other that they serve the
//! same volume with the same geometry and that both hold the volume's authkey. The key never
//! crosses the wire: each side proves it by an HMAC-SHA256 over both hellos, and each hello carries
//! a fresh 32-byte nonce from its sender, so a recorded exchange cannot be replayed.
//!
//! Messages are fixed-size little-endian records:
//!
//! * Hello (156 bytes): magic `MBLKPEER`, version, node name (64 bytes, NUL-padded UTF-8), volume
//!   uuid, volume size, region size, block size, queue, session, epoch, nonce.
//! * Verdict (124 bytes): code (0 = ok, else why) and a NUL-padded UTF-8 reason.
//! * Auth (32 bytes): the HMAC.
//!
//! Flow (D = dialer, L = listener):
//!
//! ```text
//! D -> L  Hello_D
//! L -> D  Verdict (unparsable hello: generic refusal)  | ok + Hello_L
//! D -> L  Verdict (unparsable hello: generic refusal)  | ok + Auth_D = HMAC(key, "metroblk-peer-v1 dialer" || Hello_D || Hello_L)
//! L -> D  Verdict (wrong key: "authentication failed"; else the volume check: detailed reason)
//!                                                      | ok + Auth_L = HMAC(key, "metroblk-peer-v1 listener" || Hello_D || Hello_L)
//! D -> L  Verdict (wrong key, or the volume check: detailed reason) | ok
//! ```
//!
//! Each side compares the peer's hello with its own (peer name, volume uuid, size, region and
//! block size) only once the peer has proven it holds the key, and only then tells it which
//! field differs: a stranger without the key gets "authentication failed" or a generic refusal
//! and learns nothing about this node's volumes; the detail goes to the local log.
//!
//! The last verdict lets the listener know that the dialer accepted it before it starts
//! replicating; without it a listener could believe a link is up that the dialer already dropped.
//! A refusal after authentication is sent to the other side as a verdict whose text is the
//! refuser's own error message, so the operator sees the same reason on both nodes.
//!
//! [`Handshake`] is a sans-I/O state machine (the daemon drives it from its event loop or through
//! [`run_handshake`]); it never panics, whatever bytes it is fed.

use std::collections::VecDeque;
use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First bytes of a hello.
pub const PEER_MAGIC: [u8; 8] = *b"MBLKPEER";
/// Peer protocol version; both sides must speak the same one. v2: the hello carries a link
/// session number. v3: a resync may send a range that reads as zeros as a WRITE_ZEROES frame,
/// which a v2 node would answer with "unexpected frame" halfway through a resync. v4: the
/// sync hello's flag bit 2 (the sender serves as primary, so two primaries report their split
/// brain), which a v3 node refuses as an unknown flag after the handshake: the version
/// mismatch says it before.
pub const PEER_PROTOCOL_VERSION: u16 = 4;
/// Longest node name a hello can carry, in bytes.
pub const MAX_NODE_NAME: usize = 64;
/// Longest verdict reason, in bytes.
const REASON_LEN: usize = 120;

const DIALER_LABEL: &[u8] = b"metroblk-peer-v1 dialer";
const LISTENER_LABEL: &[u8] = b"metroblk-peer-v1 listener";

// Verdict codes. The text carries the detail; the code lets a peer react without parsing text.
const V_OK: u32 = 0;
const V_BAD_MAGIC: u32 = 1;
const V_VERSION: u32 = 2;
const V_WRONG_PEER: u32 = 3;
const V_UUID: u32 = 4;
const V_SIZE: u32 = 5;
const V_REGION_SIZE: u32 = 6;
const V_BLOCK_SIZE: u32 = 7;
const V_AUTH: u32 = 8;
const V_PEER_AUTH: u32 = 9;
const V_OTHER: u32 = 10;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WireHello {
    // magic and version first and forever: a later version can change the rest and still be
    // recognised and refused with a clear reason.
    magic: [u8; 8],
    version: U16,
    node_name: [u8; MAX_NODE_NAME],
    volume_uuid: [u8; 16],
    volume_size: U64,
    region_size: U32,
    block_size: U32,
    queue: U16,
    session: U64,
    epoch: U64,
    nonce: [u8; 32],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WireVerdict {
    code: U32,
    reason: [u8; REASON_LEN],
}

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct WireAuth {
    mac: [u8; 32],
}

const HELLO_LEN: usize = core::mem::size_of::<WireHello>();
const VERDICT_LEN: usize = core::mem::size_of::<WireVerdict>();
const AUTH_LEN: usize = core::mem::size_of::<WireAuth>();
const _: () = assert!(HELLO_LEN == 156);
const _: () = assert!(VERDICT_LEN == 124);
const _: () = assert!(AUTH_LEN == 32);

/// What a node tells its peer about itself and the volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloInfo {
    /// The node's name from its config (at most 64 bytes of UTF-8, no NUL).
    pub node_name: String,
    pub volume_uuid: [u8; 16],
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Dirty-bitmap region size in bytes.
    pub region_size: u32,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Which ublk queue's link this connection is (informational; the daemon pairs links).
    pub queue: u16,
    /// The dialer's link session for this queue: it rises with every new connection the
    /// dialer makes for the queue, so the listener can tell a newer link from a superseded one.
    pub session: u64,
    /// The sender's current epoch (informational; the daemon compares epochs after the handshake).
    pub epoch: u64,
    /// Fresh random bytes for this connection; the caller fills them from a CSPRNG.
    pub nonce: [u8; 32],
}

/// Which end of the TCP connection this node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Listener,
}

/// Why a handshake failed. The texts are single lines meant for the operator's log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer handshake I/O error: {0}")]
    Io(String),
    #[error("peer is not a metroblk node (bad handshake magic)")]
    BadMagic,
    #[error("peer protocol version mismatch: local {local}, peer {peer}")]
    VersionMismatch { local: u16, peer: u16 },
    #[error("wrong peer: expected node {expected:?}, the peer says it is {actual:?}")]
    WrongPeer { expected: String, actual: String },
    #[error("volume uuid mismatch: local {}, peer {}", fmt_uuid(.local), fmt_uuid(.peer))]
    UuidMismatch { local: [u8; 16], peer: [u8; 16] },
    #[error("volume size mismatch: local {local} bytes, peer {peer} bytes")]
    SizeMismatch { local: u64, peer: u64 },
    #[error("region size mismatch: local {local} bytes, peer {peer} bytes")]
    RegionSizeMismatch { local: u32, peer: u32 },
    #[error("block size mismatch: local {local} bytes, peer {peer} bytes")]
    BlockSizeMismatch { local: u32, peer: u32 },
    /// The peer could not prove it holds our authkey (seen by the side that checked).
    #[error("authentication failed: wrong authkey")]
    AuthFailed,
    /// The listener's proof did not verify at the dialer.
    #[error("authentication failed: the peer's proof does not match our authkey (wrong authkey)")]
    PeerAuthFailed,
    /// The peer refused the link; the text is its reason.
    #[error("peer refused the link: {0}")]
    Rejected(String),
    #[error("malformed handshake: {0}")]
    Malformed(String),
}

/// What an unauthenticated peer is told when it is refused; the detail goes to our own log.
pub const REFUSED_BEFORE_AUTH: &str = "handshake refused before authentication (the refusing node's log says why)";

impl HandshakeError {
    /// The refusal text the peer gets. Which field differs and our expected values are told
    /// only to a peer that has proven it holds the key (the mismatch checks run only after
    /// authentication); a failed proof is named as such; anything else before authentication
    /// gets a generic text, so a stranger learns nothing about this node's volumes.
    fn peer_text(&self) -> String {
        match self {
            HandshakeError::WrongPeer { .. }
            | HandshakeError::UuidMismatch { .. }
            | HandshakeError::SizeMismatch { .. }
            | HandshakeError::RegionSizeMismatch { .. }
            | HandshakeError::BlockSizeMismatch { .. }
            | HandshakeError::AuthFailed
            | HandshakeError::PeerAuthFailed => self.to_string(),
            _ => REFUSED_BEFORE_AUTH.to_owned(),
        }
    }

    fn verdict_code(&self) -> u32 {
        match self {
            HandshakeError::BadMagic => V_BAD_MAGIC,
            HandshakeError::VersionMismatch { .. } => V_VERSION,
            HandshakeError::WrongPeer { .. } => V_WRONG_PEER,
            HandshakeError::UuidMismatch { .. } => V_UUID,
            HandshakeError::SizeMismatch { .. } => V_SIZE,
            HandshakeError::RegionSizeMismatch { .. } => V_REGION_SIZE,
            HandshakeError::BlockSizeMismatch { .. } => V_BLOCK_SIZE,
            HandshakeError::AuthFailed => V_AUTH,
            HandshakeError::PeerAuthFailed => V_PEER_AUTH,
            _ => V_OTHER,
        }
    }
}

fn fmt_uuid(u: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Turns peer-supplied text into one printable line: a hostile peer must not be able to forge
/// log lines or terminal escapes through its node name, refusal reason or ERROR frame text.
/// Stops at the first NUL.
pub fn printable(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(bytes.get(..end).unwrap_or(bytes))
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Copies `text` into a NUL-padded field, cut at a character boundary.
fn pad_text<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let mut cut = text.len().min(N);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let src = text.as_bytes().get(..cut).unwrap_or_default();
    if let Some(dst) = out.get_mut(..cut) {
        dst.copy_from_slice(src);
    }
    out
}

fn encode_hello(h: &HelloInfo) -> Result<Vec<u8>, HandshakeError> {
    if h.node_name.len() > MAX_NODE_NAME || h.node_name.contains('\0') {
        return Err(HandshakeError::Malformed(format!(
            "local node name {:?} must be at most {MAX_NODE_NAME} bytes without NUL",
            h.node_name
        )));
    }
    let wire = WireHello {
        magic: PEER_MAGIC,
        version: U16::new(PEER_PROTOCOL_VERSION),
        node_name: pad_text::<MAX_NODE_NAME>(&h.node_name),
        volume_uuid: h.volume_uuid,
        volume_size: U64::new(h.volume_size),
        region_size: U32::new(h.region_size),
        block_size: U32::new(h.block_size),
        queue: U16::new(h.queue),
        session: U64::new(h.session),
        epoch: U64::new(h.epoch),
        nonce: h.nonce,
    };
    Ok(wire.as_bytes().to_vec())
}

/// Parses a hello (magic, version, a UTF-8 name). Nothing is compared with ours yet: that waits
/// until the peer has proven it holds the key (`check_compat`).
fn parse_hello(bytes: &[u8]) -> Result<HelloInfo, HandshakeError> {
    let w = WireHello::read_from_bytes(bytes)
        .map_err(|_| HandshakeError::Malformed(format!("hello is not {HELLO_LEN} bytes")))?;
    if w.magic != PEER_MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    let version = w.version.get();
    if version != PEER_PROTOCOL_VERSION {
        return Err(HandshakeError::VersionMismatch { local: PEER_PROTOCOL_VERSION, peer: version });
    }
    let end = w.node_name.iter().position(|&b| b == 0).unwrap_or(MAX_NODE_NAME);
    let name_bytes = w.node_name.get(..end).unwrap_or_default();
    let node_name = match std::str::from_utf8(name_bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => {
            return Err(HandshakeError::Malformed(format!("peer node name {:?} is not UTF-8", printable(name_bytes))))
        }
    };
    let peer = HelloInfo {
        node_name,
        volume_uuid: w.volume_uuid,
        volume_size: w.volume_size.get(),
        region_size: w.region_size.get(),
        block_size: w.block_size.get(),
        queue: w.queue.get(),
        session: w.session.get(),
        epoch: w.epoch.get(),
        nonce: w.nonce,
    };
    Ok(peer)
}

/// Checks an authenticated peer's hello against ours; the error is what we tell the peer (it
/// has authenticated, so it may learn which field differs) and the operator.
fn check_compat(peer: &HelloInfo, local: &HelloInfo, expected_peer: &str) -> Result<(), HandshakeError> {
    if peer.node_name != expected_peer {
        return Err(HandshakeError::WrongPeer {
            expected: expected_peer.to_owned(),
            actual: printable(peer.node_name.as_bytes()),
        });
    }
    if peer.volume_uuid != local.volume_uuid {
        return Err(HandshakeError::UuidMismatch { local: local.volume_uuid, peer: peer.volume_uuid });
    }
    if peer.volume_size != local.volume_size {
        return Err(HandshakeError::SizeMismatch { local: local.volume_size, peer: peer.volume_size });
    }
    if peer.region_size != local.region_size {
        return Err(HandshakeError::RegionSizeMismatch { local: local.region_size, peer: peer.region_size });
    }
    if peer.block_size != local.block_size {
        return Err(HandshakeError::BlockSizeMismatch { local: local.block_size, peer: peer.block_size });
    }
    Ok(())
}

fn verdict(code: u32, reason: &str) -> Vec<u8> {
    WireVerdict { code: U32::new(code), reason: pad_text::<REASON_LEN>(reason) }.as_bytes().to_vec()
}

/// A refusal a listener sends in place of its answer to a hello, before any authentication:
/// the dialer reads it as [`HandshakeError::Rejected`] with `reason`. Only for what any
/// stranger may learn anyway (the transport the listener speaks).
pub fn refusal_verdict(reason: &str) -> Vec<u8> {
    verdict(V_OTHER, reason)
}

/// Ok(()) for an ok verdict, Rejected(reason) otherwise.
fn read_verdict(bytes: &[u8]) -> Result<(), HandshakeError> {
    let v = WireVerdict::read_from_bytes(bytes)
        .map_err(|_| HandshakeError::Malformed(format!("verdict is not {VERDICT_LEN} bytes")))?;
    let code = v.code.get();
    if code == V_OK {
        return Ok(());
    }
    let reason = printable(&v.reason);
    let reason = reason.trim();
    Err(HandshakeError::Rejected(if reason.is_empty() {
        format!("refusal code {code} without a reason")
    } else {
        reason.to_owned()
    }))
}

/// What the machine waits for next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Listener: the dialer's hello.
    HelloD,
    /// Dialer: the listener's verdict on our hello.
    VerdictOnHelloD,
    /// Dialer: the listener's hello.
    HelloL,
    /// Listener: the dialer's verdict on our hello.
    VerdictOnHelloL,
    /// Listener: the dialer's proof.
    AuthD,
    /// Dialer: the listener's verdict on our proof.
    VerdictOnAuthD,
    /// Dialer: the listener's proof.
    AuthL,
    /// Listener: the dialer's verdict on our proof.
    VerdictOnAuthL,
}

impl Step {
    fn len(self) -> usize {
        match self {
            Step::HelloD | Step::HelloL => HELLO_LEN,
            Step::AuthD | Step::AuthL => AUTH_LEN,
            _ => VERDICT_LEN,
        }
    }
}

enum State {
    Waiting(Step),
    Done(HelloInfo),
    Failed(HandshakeError),
}

/// Sans-I/O handshake state machine for one peer connection.
///
/// Drive it as: after [`Handshake::new`] and after every [`Handshake::feed`], send everything
/// [`Handshake::poll_output`] returns; then read exactly [`Handshake::wants`] bytes and feed them;
/// stop when [`Handshake::outcome`] is `Some` and the output is drained.
pub struct Handshake {
    role: Role,
    local: HelloInfo,
    expected_peer: String,
    /// Keyed once; cloned per MAC so the raw key is not kept around.
    mac: Option<Hmac<Sha256>>,
    hello_d: Vec<u8>,
    hello_l: Vec<u8>,
    peer: Option<HelloInfo>,
    inbuf: Vec<u8>,
    out: VecDeque<Vec<u8>>,
    state: State,
}

impl Handshake {
    /// Starts a handshake. `expected_peer` is the node name the config says the peer has.
    /// A local hello that cannot be encoded (node name too long) makes the handshake fail at once;
    /// `outcome()` says why.
    pub fn new(role: Role, local: HelloInfo, key: &[u8], expected_peer: &str) -> Handshake {
        let mut hs = Handshake {
            role,
            local,
            expected_peer: expected_peer.to_owned(),
            // HMAC accepts keys of any length, so this is always Some.
            mac: Hmac::<Sha256>::new_from_slice(key).ok(),
            hello_d: Vec::new(),
            hello_l: Vec::new(),
            peer: None,
            inbuf: Vec::with_capacity(HELLO_LEN),
            out: VecDeque::new(),
            state: State::Waiting(match role {
                Role::Dialer => Step::VerdictOnHelloD,
                Role::Listener => Step::HelloD,
            }),
        };
        match encode_hello(&hs.local) {
            Ok(hello) => {
                if role == Role::Dialer {
                    hs.out.push_back(hello.clone());
                    hs.hello_d = hello;
                } else {
                    hs.hello_l = hello;
                }
            }
            Err(e) => hs.state = State::Failed(e),
        }
        hs
    }

    /// Bytes to send now, if any. Call until `None` after `new()` and after every `feed()`,
    /// including a failed one: a refusal is sent before the machine gives up.
    pub fn poll_output(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// How many more bytes the machine needs before it can progress; 0 when it is done, has
    /// failed, or has output that must be sent first.
    pub fn wants(&self) -> usize {
        match self.state {
            State::Waiting(step) if self.out.is_empty() => step.len().saturating_sub(self.inbuf.len()),
            _ => 0,
        }
    }

    /// Feeds bytes read from the peer: at most `wants()` of them. Feeding more, or feeding a
    /// machine that is not waiting for input, is refused without changing its state.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), HandshakeError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let step = match &self.state {
            State::Waiting(step) => *step,
            State::Done(_) => return Err(HandshakeError::Malformed("bytes fed after the handshake finished".into())),
            State::Failed(e) => return Err(e.clone()),
        };
        let wants = self.wants();
        if bytes.len() > wants {
            return Err(HandshakeError::Malformed(format!(
                "fed {} bytes where the handshake wants {wants}",
                bytes.len()
            )));
        }
        self.inbuf.extend_from_slice(bytes);
        if self.inbuf.len() < step.len() {
            return Ok(());
        }
        let msg = std::mem::take(&mut self.inbuf);
        match self.step(step, &msg) {
            Ok(next) => {
                self.state = next;
                Ok(())
            }
            Err((e, tell_peer)) => {
                if tell_peer {
                    self.out.push_back(verdict(e.verdict_code(), &e.peer_text()));
                }
                self.state = State::Failed(e.clone());
                Err(e)
            }
        }
    }

    /// `Some(Ok(peer hello))` once both sides are authenticated, `Some(Err)` once failed,
    /// `None` while in progress.
    pub fn outcome(&self) -> Option<Result<HelloInfo, HandshakeError>> {
        match &self.state {
            State::Waiting(_) => None,
            State::Done(peer) => Some(Ok(peer.clone())),
            State::Failed(e) => Some(Err(e.clone())),
        }
    }

    /// Handles one complete message. On error, the bool says whether to send a refusal verdict
    /// (not when the peer has already refused: it is no longer listening).
    fn step(&mut self, step: Step, msg: &[u8]) -> Result<State, (HandshakeError, bool)> {
        match step {
            Step::HelloD => {
                let peer = parse_hello(msg).map_err(|e| (e, true))?;
                self.hello_d = msg.to_vec();
                self.peer = Some(peer);
                self.out.push_back(verdict(V_OK, ""));
                self.out.push_back(self.hello_l.clone());
                Ok(State::Waiting(Step::VerdictOnHelloL))
            }
            Step::VerdictOnHelloD => {
                read_verdict(msg).map_err(|e| (e, false))?;
                Ok(State::Waiting(Step::HelloL))
            }
            Step::HelloL => {
                let peer = parse_hello(msg).map_err(|e| (e, true))?;
                self.hello_l = msg.to_vec();
                self.peer = Some(peer);
                let mac = self.mac_for(DIALER_LABEL).map_err(|e| (e, true))?;
                self.out.push_back(verdict(V_OK, ""));
                self.out.push_back(mac.finalize().into_bytes().to_vec());
                Ok(State::Waiting(Step::VerdictOnAuthD))
            }
            Step::VerdictOnHelloL => {
                read_verdict(msg).map_err(|e| (e, false))?;
                Ok(State::Waiting(Step::AuthD))
            }
            Step::AuthD => {
                let mac = self.mac_for(DIALER_LABEL).map_err(|e| (e, true))?;
                // verify_slice compares in constant time.
                mac.verify_slice(msg).map_err(|_| (HandshakeError::AuthFailed, true))?;
                // The dialer holds the key: it may now learn what does not match.
                self.check_peer().map_err(|e| (e, true))?;
                let mine = self.mac_for(LISTENER_LABEL).map_err(|e| (e, true))?;
                self.out.push_back(verdict(V_OK, ""));
                self.out.push_back(mine.finalize().into_bytes().to_vec());
                Ok(State::Waiting(Step::VerdictOnAuthL))
            }
            Step::VerdictOnAuthD => {
                read_verdict(msg).map_err(|e| (e, false))?;
                Ok(State::Waiting(Step::AuthL))
            }
            Step::AuthL => {
                let mac = self.mac_for(LISTENER_LABEL).map_err(|e| (e, true))?;
                mac.verify_slice(msg).map_err(|_| (HandshakeError::PeerAuthFailed, true))?;
                self.check_peer().map_err(|e| (e, true))?;
                self.out.push_back(verdict(V_OK, ""));
                self.done()
            }
            Step::VerdictOnAuthL => {
                read_verdict(msg).map_err(|e| (e, false))?;
                self.done()
            }
        }
    }

    fn check_peer(&self) -> Result<(), HandshakeError> {
        match &self.peer {
            Some(peer) => check_compat(peer, &self.local, &self.expected_peer),
            None => Err(HandshakeError::Malformed("no peer hello".into())),
        }
    }

    fn done(&mut self) -> Result<State, (HandshakeError, bool)> {
        match self.peer.take() {
            Some(peer) => Ok(State::Done(peer)),
            None => Err((HandshakeError::Malformed("finished without a peer hello".into()), true)),
        }
    }

    /// HMAC state over label || Hello_D || Hello_L, ready to finalize or verify.
    fn mac_for(&self, label: &[u8]) -> Result<Hmac<Sha256>, HandshakeError> {
        let mut mac = self.mac.clone().ok_or_else(|| HandshakeError::Malformed("authkey unusable".into()))?;
        mac.update(label);
        mac.update(&self.hello_d);
        mac.update(&self.hello_l);
        Ok(mac)
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }
}

fn io_err(e: std::io::Error) -> HandshakeError {
    use std::io::ErrorKind;
    HandshakeError::Io(match e.kind() {
        ErrorKind::UnexpectedEof => "the peer closed the connection during the handshake".into(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "the peer did not answer the handshake in time".into(),
        _ => e.to_string(),
    })
}

/// Runs `hs` to completion over a blocking stream (the caller sets socket timeouts) and returns
/// the peer's hello. On failure any refusal is still sent to the peer, best effort.
pub fn run_handshake<S: Read + Write>(stream: &mut S, mut hs: Handshake) -> Result<HelloInfo, HandshakeError> {
    let mut buf = [0u8; HELLO_LEN];
    loop {
        while let Some(out) = hs.poll_output() {
            stream.write_all(&out).map_err(io_err)?;
        }
        stream.flush().map_err(io_err)?;
        if let Some(result) = hs.outcome() {
            return result;
        }
        let n = hs.wants();
        let chunk = buf
            .get_mut(..n)
            .filter(|c| !c.is_empty())
            .ok_or_else(|| HandshakeError::Malformed(format!("handshake stalled wanting {n} bytes")))?;
        stream.read_exact(chunk).map_err(io_err)?;
        if let Err(e) = hs.feed(chunk) {
            // Tell the peer why, if we can; the original error is what matters.
            while let Some(out) = hs.poll_output() {
                if stream.write_all(&out).is_err() {
                    break;
                }
            }
            let _ = stream.flush();
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"correct horse battery staple";

    fn info(name: &str, nonce: u8) -> HelloInfo {
        HelloInfo {
            node_name: name.into(),
            volume_uuid: [0x11; 16],
            volume_size: 1 << 30,
            region_size: 65536,
            block_size: 4096,
            queue: 0,
            session: 0,
            epoch: 3,
            nonce: [nonce; 32],
        }
    }

    /// Wires two machines back to back in memory, feeding each what it wants, until neither
    /// can progress.
    fn pump(a: &mut Handshake, b: &mut Handshake) {
        let mut to_a: VecDeque<u8> = VecDeque::new();
        let mut to_b: VecDeque<u8> = VecDeque::new();
        loop {
            let mut moved = false;
            while let Some(o) = a.poll_output() {
                to_b.extend(o);
                moved = true;
            }
            while let Some(o) = b.poll_output() {
                to_a.extend(o);
                moved = true;
            }
            for (m, q) in [(&mut *a, &mut to_a), (&mut *b, &mut to_b)] {
                let n = m.wants().min(q.len());
                if n > 0 {
                    let chunk: Vec<u8> = q.drain(..n).collect();
                    let _ = m.feed(&chunk);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn run_pair(
        dialer: HelloInfo,
        dkey: &[u8],
        dexpect: &str,
        listener: HelloInfo,
        lkey: &[u8],
        lexpect: &str,
    ) -> (Result<HelloInfo, HandshakeError>, Result<HelloInfo, HandshakeError>) {
        let mut d = Handshake::new(Role::Dialer, dialer, dkey, dexpect);
        let mut l = Handshake::new(Role::Listener, listener, lkey, lexpect);
        pump(&mut d, &mut l);
        (d.outcome().expect("dialer finished"), l.outcome().expect("listener finished"))
    }

    #[test]
    fn success_both_ways() {
        let (d, l) = run_pair(info("a", 1), KEY, "b", info("b", 2), KEY, "a");
        assert_eq!(d.unwrap(), info("b", 2));
        assert_eq!(l.unwrap(), info("a", 1));
    }

    #[test]
    fn byte_by_byte_feeding_works() {
        let mut d = Handshake::new(Role::Dialer, info("a", 1), KEY, "b");
        let mut l = Handshake::new(Role::Listener, info("b", 2), KEY, "a");
        let mut to_l: VecDeque<u8> = VecDeque::new();
        let mut to_d: VecDeque<u8> = VecDeque::new();
        for _ in 0..10_000 {
            while let Some(o) = d.poll_output() {
                to_l.extend(o);
            }
            while let Some(o) = l.poll_output() {
                to_d.extend(o);
            }
            if d.outcome().is_some() && l.outcome().is_some() {
                break;
            }
            if d.wants() > 0 {
                if let Some(b) = to_d.pop_front() {
                    d.feed(&[b]).unwrap();
                }
            }
            if l.wants() > 0 {
                if let Some(b) = to_l.pop_front() {
                    l.feed(&[b]).unwrap();
                }
            }
        }
        assert!(matches!(d.outcome(), Some(Ok(_))));
        assert!(matches!(l.outcome(), Some(Ok(_))));
        assert!(to_d.is_empty() && to_l.is_empty());
    }

    #[test]
    fn wrong_key_on_dialer_fails_both() {
        let (d, l) = run_pair(info("a", 1), b"other key", "b", info("b", 2), KEY, "a");
        assert_eq!(l, Err(HandshakeError::AuthFailed));
        let e = d.unwrap_err();
        assert!(matches!(&e, HandshakeError::Rejected(r) if r.contains("authentication failed")));
        assert_eq!(e.to_string(), "peer refused the link: authentication failed: wrong authkey");
    }

    #[test]
    fn wrong_key_on_listener_fails_both() {
        let (d, l) = run_pair(info("a", 1), KEY, "b", info("b", 2), b"nope", "a");
        assert_eq!(l, Err(HandshakeError::AuthFailed));
        assert!(matches!(d, Err(HandshakeError::Rejected(ref r)) if r.contains("authentication failed")));
    }

    #[test]
    fn forged_listener_proof_fails_dialer_and_tells_listener() {
        // A listener that passes the dialer's check but answers with a bogus proof.
        let mut d = Handshake::new(Role::Dialer, info("a", 1), KEY, "b");
        let mut l = Handshake::new(Role::Listener, info("b", 2), KEY, "a");
        let hello_d = d.poll_output().unwrap();
        l.feed(&hello_d).unwrap();
        d.feed(&l.poll_output().unwrap()).unwrap(); // verdict ok
        d.feed(&l.poll_output().unwrap()).unwrap(); // hello_l
        l.feed(&d.poll_output().unwrap()).unwrap(); // verdict ok
        l.feed(&d.poll_output().unwrap()).unwrap(); // auth_d
        d.feed(&l.poll_output().unwrap()).unwrap(); // verdict ok
        let mut auth_l = l.poll_output().unwrap();
        auth_l[0] ^= 1;
        assert_eq!(d.feed(&auth_l), Err(HandshakeError::PeerAuthFailed));
        l.feed(&d.poll_output().unwrap()).unwrap_err();
        assert!(matches!(l.outcome(), Some(Err(HandshakeError::Rejected(r))) if r.contains("authentication failed")));
    }

    #[test]
    fn replayed_dialer_proof_is_refused() {
        // A proof recorded from one session must not open another (the listener's nonce differs).
        let mut d = Handshake::new(Role::Dialer, info("a", 1), KEY, "b");
        let mut l = Handshake::new(Role::Listener, info("b", 2), KEY, "a");
        l.feed(&d.poll_output().unwrap()).unwrap();
        d.feed(&l.poll_output().unwrap()).unwrap();
        d.feed(&l.poll_output().unwrap()).unwrap();
        let _ok = d.poll_output().unwrap();
        let recorded = d.poll_output().unwrap();

        let mut d2 = Handshake::new(Role::Dialer, info("a", 1), b"attacker", "b");
        let mut l2 = Handshake::new(Role::Listener, info("b", 3), KEY, "a");
        l2.feed(&d2.poll_output().unwrap()).unwrap();
        d2.feed(&l2.poll_output().unwrap()).unwrap();
        d2.feed(&l2.poll_output().unwrap()).unwrap();
        l2.feed(&d2.poll_output().unwrap()).unwrap();
        assert_eq!(l2.feed(&recorded), Err(HandshakeError::AuthFailed));
    }

    fn assert_refused(dialer: HelloInfo, listener: HelloInfo, want: impl Fn(&HandshakeError) -> bool, text: &str) {
        let (d, l) = run_pair(dialer, KEY, "b", listener, KEY, "a");
        let (refuser, refused) = match (&d, &l) {
            (Err(HandshakeError::Rejected(_)), Err(e)) => (e.clone(), d.clone().unwrap_err()),
            (Err(e), Err(HandshakeError::Rejected(_))) => (e.clone(), l.clone().unwrap_err()),
            other => panic!("expected one side to refuse, got {other:?}"),
        };
        assert!(want(&refuser), "{refuser:?}");
        assert!(refuser.to_string().contains(text), "{refuser}");
        assert_eq!(refused, HandshakeError::Rejected(refuser.to_string()));
        assert_eq!(refused.to_string(), format!("peer refused the link: {refuser}"));
    }

    #[test]
    fn uuid_mismatch_refused() {
        let mut b = info("b", 2);
        b.volume_uuid = [0x22; 16];
        assert_refused(
            info("a", 1),
            b,
            |e| matches!(e, HandshakeError::UuidMismatch { .. }),
            "volume uuid mismatch: local 22222222-2222-2222-2222-222222222222, peer 11111111-1111-1111-1111-111111111111",
        );
    }

    #[test]
    fn size_mismatch_refused() {
        let mut b = info("b", 2);
        b.volume_size = 2 << 30;
        assert_refused(
            info("a", 1),
            b,
            |e| matches!(e, HandshakeError::SizeMismatch { .. }),
            "volume size mismatch: local 2147483648 bytes, peer 1073741824 bytes",
        );
    }

    #[test]
    fn region_size_mismatch_refused() {
        let mut b = info("b", 2);
        b.region_size = 4096;
        assert_refused(
            info("a", 1),
            b,
            |e| matches!(e, HandshakeError::RegionSizeMismatch { .. }),
            "region size mismatch: local 4096 bytes, peer 65536 bytes",
        );
    }

    #[test]
    fn block_size_mismatch_refused() {
        let mut b = info("b", 2);
        b.block_size = 512;
        assert_refused(
            info("a", 1),
            b,
            |e| matches!(e, HandshakeError::BlockSizeMismatch { .. }),
            "block size mismatch: local 512 bytes, peer 4096 bytes",
        );
    }

    #[test]
    fn wrong_peer_name_refused_by_listener() {
        assert_refused(
            info("x", 1),
            info("b", 2),
            |e| matches!(e, HandshakeError::WrongPeer { .. }),
            "wrong peer: expected node \"a\", the peer says it is \"x\"",
        );
    }

    #[test]
    fn wrong_peer_name_refused_by_dialer() {
        // The listener accepts the dialer, the dialer finds the listener is not who it expected.
        let (d, l) = run_pair(info("a", 1), KEY, "c", info("b", 2), KEY, "a");
        assert_eq!(d, Err(HandshakeError::WrongPeer { expected: "c".into(), actual: "b".into() }));
        assert_eq!(
            l.unwrap_err().to_string(),
            "peer refused the link: wrong peer: expected node \"c\", the peer says it is \"b\""
        );
    }

    #[test]
    fn a_peer_without_the_key_learns_nothing_about_the_volume() {
        // Wrong key and a different size: the listener checks the proof first, so the stranger
        // hears only that authentication failed, never which size this node has.
        let mut stranger = info("a", 1);
        stranger.volume_size = 4096;
        let (d, l) = run_pair(stranger, b"not-the-key-at-all-0123", "b", info("b", 2), KEY, "a");
        assert_eq!(l, Err(HandshakeError::AuthFailed));
        let text = d.unwrap_err().to_string();
        assert_eq!(text, "peer refused the link: authentication failed: wrong authkey");
        assert!(!text.contains("1073741824") && !text.contains("size"), "{text}");
    }

    #[test]
    fn the_volume_check_runs_only_after_the_proof() {
        // Right key, wrong size: refused in detail, but only after the dialer's proof arrived.
        let mut d = Handshake::new(Role::Dialer, info("a", 1), KEY, "b");
        let mut other = info("b", 2);
        other.volume_size = 4096;
        let mut l = Handshake::new(Role::Listener, other, KEY, "a");
        l.feed(&d.poll_output().unwrap()).unwrap(); // Hello_D: parsed, not yet compared
        assert_eq!(read_verdict(&l.poll_output().unwrap()), Ok(()));
        d.feed(&verdict(V_OK, "")).unwrap();
        d.feed(&l.poll_output().unwrap()).unwrap(); // Hello_L
        l.feed(&d.poll_output().unwrap()).unwrap(); // verdict ok
        let auth_d = d.poll_output().unwrap();
        assert_eq!(l.feed(&auth_d), Err(HandshakeError::SizeMismatch { local: 4096, peer: 1 << 30 }));
        d.feed(&l.poll_output().unwrap()).unwrap_err();
        assert_eq!(
            d.outcome().unwrap().unwrap_err().to_string(),
            "peer refused the link: volume size mismatch: local 4096 bytes, peer 1073741824 bytes"
        );
    }

    /// Sends a hand-made hello to a listener and checks both the refusal and the verdict text.
    fn listener_refuses(raw: &[u8], want: HandshakeError) {
        let mut l = Handshake::new(Role::Listener, info("b", 2), KEY, "a");
        assert_eq!(l.feed(raw), Err(want.clone()));
        let v = l.poll_output().expect("a refusal verdict");
        // Before authentication the peer gets a generic text; the detail is ours to log.
        assert_eq!(read_verdict(&v), Err(HandshakeError::Rejected(REFUSED_BEFORE_AUTH.into())));
        assert_eq!(l.wants(), 0);
        assert_eq!(l.outcome(), Some(Err(want)));
    }

    fn dialer_refuses(raw: &[u8], want: HandshakeError) {
        let mut d = Handshake::new(Role::Dialer, info("a", 1), KEY, "b");
        d.poll_output().unwrap();
        d.feed(&verdict(V_OK, "")).unwrap();
        assert_eq!(d.feed(raw), Err(want.clone()));
        let v = d.poll_output().expect("a refusal verdict");
        assert_eq!(read_verdict(&v), Err(HandshakeError::Rejected(REFUSED_BEFORE_AUTH.into())));
        assert_eq!(d.outcome(), Some(Err(want)));
    }

    #[test]
    fn version_mismatch_refused_both_sides() {
        let mut raw = encode_hello(&info("a", 1)).unwrap();
        raw[8..10].copy_from_slice(&7u16.to_le_bytes());
        let want = HandshakeError::VersionMismatch { local: PEER_PROTOCOL_VERSION, peer: 7 };
        assert_eq!(want.to_string(), "peer protocol version mismatch: local 4, peer 7");
        listener_refuses(&raw, want.clone());
        let mut raw = encode_hello(&info("b", 2)).unwrap();
        raw[8..10].copy_from_slice(&7u16.to_le_bytes());
        dialer_refuses(&raw, want);
    }

    #[test]
    fn bad_magic_refused_both_sides() {
        let mut raw = encode_hello(&info("a", 1)).unwrap();
        raw[0] = b'X';
        listener_refuses(&raw, HandshakeError::BadMagic);
        let mut raw = encode_hello(&info("b", 2)).unwrap();
        raw[..8].copy_from_slice(b"GET / HT");
        dialer_refuses(&raw, HandshakeError::BadMagic);
    }

    #[test]
    fn non_utf8_peer_name_is_malformed() {
        let mut raw = encode_hello(&info("a", 1)).unwrap();
        raw[10] = 0xFF;
        let mut l = Handshake::new(Role::Listener, info("b", 2), KEY, "a");
        assert!(matches!(l.feed(&raw), Err(HandshakeError::Malformed(_))));
    }

    #[test]
    fn hostile_text_is_sanitised() {
        let mut d = Handshake::new(Role::Dialer, info("a", 1), KEY, "b");
        d.poll_output().unwrap();
        let e = d.feed(&verdict(V_OTHER, "evil\nFAKE LOG LINE\x1b[31m")).unwrap_err();
        let s = e.to_string();
        assert!(!s.contains('\n') && !s.contains('\x1b'), "{s}");
        assert_eq!(s, "peer refused the link: evil?FAKE LOG LINE?[31m");
        let mut d = Handshake::new(Role::Dialer, info("a", 1), KEY, "b");
        d.poll_output().unwrap();
        assert_eq!(
            d.feed(&verdict(42, "")).unwrap_err().to_string(),
            "peer refused the link: refusal code 42 without a reason"
        );
    }

    #[test]
    fn long_node_name_fails_locally() {
        let d = Handshake::new(Role::Dialer, info(&"n".repeat(65), 1), KEY, "b");
        assert!(matches!(d.outcome(), Some(Err(HandshakeError::Malformed(_)))));
        assert_eq!(d.wants(), 0);
        // Exactly 64 bytes is fine and survives the trip.
        let name = "é".repeat(32);
        let (d, l) = run_pair(info(&name, 1), KEY, "b", info("b", 2), KEY, &name);
        assert!(d.is_ok());
        assert_eq!(l.unwrap().node_name, name);
    }

    #[test]
    fn feed_contract_is_enforced() {
        let mut l = Handshake::new(Role::Listener, info("b", 2), KEY, "a");
        assert_eq!(l.wants(), HELLO_LEN);
        assert!(l.feed(&[0u8; HELLO_LEN + 1]).is_err());
        assert_eq!(l.wants(), HELLO_LEN);
        assert_eq!(l.outcome(), None);
        let d = Handshake::new(Role::Dialer, info("a", 1), KEY, "b");
        assert_eq!(d.wants(), 0, "output pending first");
    }

    #[test]
    fn reason_is_cut_at_char_boundary() {
        let long = "ü".repeat(100);
        let v = verdict(V_OTHER, &long);
        match read_verdict(&v) {
            Err(HandshakeError::Rejected(r)) => assert_eq!(r, "ü".repeat(60)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn run_handshake_over_unix_socket() {
        use std::os::unix::net::UnixStream;
        use std::time::Duration;
        let (mut a, mut b) = UnixStream::pair().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        let t = std::thread::spawn(move || {
            let hs = Handshake::new(Role::Listener, info("b", 2), KEY, "a");
            run_handshake(&mut b, hs)
        });
        let hs = Handshake::new(Role::Dialer, info("a", 1), KEY, "b");
        let d = run_handshake(&mut a, hs);
        let l = t.join().unwrap();
        assert_eq!(d.unwrap(), info("b", 2));
        assert_eq!(l.unwrap(), info("a", 1));
    }

    #[test]
    fn run_handshake_over_unix_socket_wrong_key() {
        use std::os::unix::net::UnixStream;
        use std::time::Duration;
        let (mut a, mut b) = UnixStream::pair().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        let t = std::thread::spawn(move || {
            let hs = Handshake::new(Role::Listener, info("b", 2), b"key two", "a");
            run_handshake(&mut b, hs)
        });
        let hs = Handshake::new(Role::Dialer, info("a", 1), KEY, "b");
        let d = run_handshake(&mut a, hs);
        let l = t.join().unwrap();
        assert_eq!(l, Err(HandshakeError::AuthFailed));
        assert_eq!(d.unwrap_err().to_string(), "peer refused the link: authentication failed: wrong authkey");
    }

    #[test]
    fn run_handshake_reports_eof() {
        use std::os::unix::net::UnixStream;
        let (mut a, b) = UnixStream::pair().unwrap();
        drop(b);
        let hs = Handshake::new(Role::Listener, info("b", 2), KEY, "a");
        assert_eq!(
            run_handshake(&mut a, hs),
            Err(HandshakeError::Io("the peer closed the connection during the handshake".into()))
        );
    }
}
