//! Wire format of the witness link: what a data node and the witness say to each other.
//!
//! The rule: **nothing a node asks of the witness is believed before the node has proven it
//! holds the authkey, and a node believes no answer before the witness has proven the same.**
//! The key never crosses the wire; each side proves it with an HMAC-SHA256 over both sides'
//! fresh nonces and the node's name, so a recorded exchange cannot be replayed and a fake
//! witness (one without the key) is detected by the node before it acts on any reply.
//!
//! Framing: every message is a `u32` little-endian length (at most [`WITNESS_FRAME_BYTES_MAX`])
//! followed by that many bytes of JSON. JSON keeps the link debuggable with `tcpdump -A`; the
//! messages are few (a lease renewal every second or so per volume), so its cost does not matter.
//!
//! ```text
//! witness -> node  ServerHello { magic "metroblk-witness", version 1, nonce Ns }
//! node -> witness  ClientHello { node N, nonce Nc,
//!                                proof HMAC(key, "metroblk-witness-v1 client" || Ns || Nc || N) }
//! witness -> node  Welcome { proof HMAC(key, "metroblk-witness-v1 server" || Ns || Nc || N) }
//!                | Refused { reason }
//! node -> witness  Request      (any number of times, each answered by one Reply)
//! witness -> node  Reply
//! ```
//!
//! Nonces and proofs are lowercase hex. A request never names its sender: the witness acts for
//! the node that authenticated on the connection.
//!
//! Sans-I/O: this module encodes, decodes and checks; the witness server and its client do the
//! socket work. The decoders never panic whatever the bytes, and the text of an error that quotes
//! the wire is short and made printable ([`crate::handshake::printable`]) so a hostile peer
//! cannot write control characters into a log.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::handshake::printable;

/// What a [`ServerHello`] says first: not a metroblk witness otherwise.
pub const WITNESS_MAGIC: &str = "metroblk-witness";
/// Witness protocol version; node and witness must speak the same one.
pub const WITNESS_VERSION: u32 = 1;
/// Largest JSON body of one message. A status reply of a witness with many volumes is the
/// largest message; 16 KiB holds about 60 volumes' status (the CLI asks for it), and every
/// request is far smaller.
pub const WITNESS_FRAME_BYTES_MAX: usize = 16384;
/// Bytes of the length prefix before each message.
pub const WITNESS_FRAME_PREFIX_LEN: usize = 4;
/// Random bytes in each side's nonce.
pub const WITNESS_NONCE_LEN: usize = 32;
/// Longest node or volume name, in bytes (the same limit as the node config's names).
pub const WITNESS_NAME_BYTES_MAX: usize = 64;
/// Longest volume uuid text accepted (a uuid is 36 characters; some slack for other spellings).
pub const WITNESS_UUID_BYTES_MAX: usize = 64;
/// Longest excerpt of a bad message quoted in an error.
const EXCERPT_CHARS_MAX: usize = 60;

const CLIENT_LABEL: &[u8] = b"metroblk-witness-v1 client";
const SERVER_LABEL: &[u8] = b"metroblk-witness-v1 server";

/// Why a witness message could not be decoded or a handshake step failed. Single lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitnessError {
    #[error("witness message of {len} bytes is over the limit of {WITNESS_FRAME_BYTES_MAX}")]
    FrameTooLarge { len: u64 },
    #[error("malformed witness message ({error}): {excerpt:?}")]
    BadMessage { error: String, excerpt: String },
    #[error("not a metroblk witness (the server greeted with magic {0:?})")]
    BadMagic(String),
    #[error("witness protocol version mismatch: local {local}, witness {peer}")]
    VersionMismatch { local: u32, peer: u32 },
    #[error("bad {what}: {problem}")]
    BadField { what: &'static str, problem: String },
    /// The node's proof does not match the witness's key (seen by the witness).
    #[error("authentication failed: wrong authkey")]
    AuthFailed,
    /// The witness's proof does not match the node's key: a fake witness or a wrong key.
    #[error(
        "authentication failed: the witness's proof does not match our authkey (wrong authkey or not our witness)"
    )]
    ServerAuthFailed,
    /// The witness refused the connection; the text is its reason.
    #[error("the witness refused the connection: {0}")]
    Refused(String),
}

pub use crate::disk_state::DiskState;

/// Which volume a request is about. The witness knows a volume by name and refuses a request
/// whose uuid or node pair differs from what it recorded, so two clusters that happen to share
/// a volume name and a witness cannot fence each other.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeId {
    pub name: String,
    pub uuid: String,
    /// The volume's two nodes, sorted, so both nodes send the same id.
    pub nodes: [String; 2],
}

impl VolumeId {
    /// A volume id with its nodes sorted (either node may build it in either order).
    pub fn new(name: &str, uuid: &str, node_a: &str, node_b: &str) -> VolumeId {
        let mut nodes = [node_a.to_owned(), node_b.to_owned()];
        nodes.sort();
        VolumeId { name: name.to_owned(), uuid: uuid.to_owned(), nodes }
    }

    /// The nodes sorted, whatever order a decoded id carried them in.
    pub fn nodes_sorted(&self) -> [&str; 2] {
        let [a, b] = &self.nodes;
        if a <= b {
            [a, b]
        } else {
            [b, a]
        }
    }

    /// The other node of the volume, if `node` is one of its two.
    pub fn peer_of(&self, node: &str) -> Option<&str> {
        let [a, b] = &self.nodes;
        if a == node {
            Some(b)
        } else if b == node {
            Some(a)
        } else {
            None
        }
    }

    /// Checks what a decoded id must satisfy before the witness records it: valid names, a
    /// non-empty uuid, two different nodes.
    pub fn check(&self) -> Result<(), WitnessError> {
        check_name("volume name", &self.name)?;
        if self.uuid.is_empty() || self.uuid.len() > WITNESS_UUID_BYTES_MAX {
            return Err(WitnessError::BadField {
                what: "volume uuid",
                problem: format!("{:?} must be 1 to {WITNESS_UUID_BYTES_MAX} bytes", excerpt(self.uuid.as_bytes())),
            });
        }
        for n in &self.nodes {
            check_name("node name", n)?;
        }
        if self.nodes[0] == self.nodes[1] {
            return Err(WitnessError::BadField {
                what: "volume nodes",
                problem: format!("both nodes are named {:?}", self.nodes[0]),
            });
        }
        Ok(())
    }
}

/// Checks a node or volume name: 1 to 64 bytes of letters, digits, '-', '_' and '.' (the node
/// config's rule), so a name is always safe to print.
pub fn check_name(what: &'static str, name: &str) -> Result<(), WitnessError> {
    let ok = !name.is_empty()
        && name.len() <= WITNESS_NAME_BYTES_MAX
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(WitnessError::BadField {
            what,
            problem: format!(
                "{:?} must be 1 to {WITNESS_NAME_BYTES_MAX} letters, digits, '-', '_' or '.'",
                excerpt(name.as_bytes())
            ),
        })
    }
}

/// What an authenticated node asks. The sender is the node that authenticated on the
/// connection, never a field, so a node cannot act for its peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The primary renews its lease. The first request naming an unknown volume registers it
    /// with the sender as primary at `epoch`.
    Lease { volume: VolumeId, epoch: u64, lease_ms: u64, drift_ppm: u32 },
    /// The primary lost its peer: record the peer outdated (also renews the lease).
    Outdate { volume: VolumeId, epoch: u64, lease_ms: u64, drift_ppm: u32 },
    /// The primary finished a resync: the peer is up-to-date again.
    PeerUpToDate { volume: VolumeId, epoch: u64 },
    /// A secondary that lost its primary asks to become primary at `epoch + 1`.
    Promote { volume: VolumeId, epoch: u64, disk_state: DiskState, lease_ms: u64, drift_ppm: u32 },
    /// The primary gives up (its disk failed, or it stops): its lease ends now.
    Resign { volume: VolumeId, epoch: u64, disk_state: DiskState },
    /// Planned switchover: the primary hands the volume to its peer at `epoch + 1`.
    Handover { volume: VolumeId, epoch: u64, to: String },
    /// The witness's current record of a volume (any node of the volume may ask).
    Query { volume: VolumeId },
    /// Everything the witness knows (the operator's `metroblk witness status`).
    Status,
}

impl Request {
    /// The request's name on the wire, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Lease { .. } => "lease",
            Request::Outdate { .. } => "outdate",
            Request::PeerUpToDate { .. } => "peer-up-to-date",
            Request::Promote { .. } => "promote",
            Request::Resign { .. } => "resign",
            Request::Handover { .. } => "handover",
            Request::Query { .. } => "query",
            Request::Status => "status",
        }
    }

    /// The volume the request is about (none for `Status`).
    pub fn volume(&self) -> Option<&VolumeId> {
        match self {
            Request::Lease { volume, .. }
            | Request::Outdate { volume, .. }
            | Request::PeerUpToDate { volume, .. }
            | Request::Promote { volume, .. }
            | Request::Resign { volume, .. }
            | Request::Handover { volume, .. }
            | Request::Query { volume } => Some(volume),
            Request::Status => None,
        }
    }
}

/// The witness's record of one volume, as a reply carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub epoch: u64,
    /// The node allowed to serve the volume in this epoch; none after a resignation.
    pub primary: Option<String>,
    /// Each of the two nodes' disk state.
    pub disk_states: BTreeMap<String, DiskState>,
    /// The lease the primary last asked for, in milliseconds.
    pub lease_ms: u64,
}

/// One volume in a status reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeStatus {
    pub name: String,
    pub uuid: String,
    pub nodes: [String; 2],
    pub epoch: u64,
    pub primary: Option<String>,
    pub disk_states: BTreeMap<String, DiskState>,
    pub lease_ms: u64,
    pub drift_ppm: u32,
    /// Milliseconds until the witness considers the primary's lease expired (0: expired).
    pub lease_left_ms: u64,
}

/// One authenticated connection in a status reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectedNode {
    pub node: String,
    /// The peer's address as `ip:port`.
    pub address: String,
    /// How long the connection has been authenticated, in milliseconds.
    pub connected_ms: u64,
}

/// The witness's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reply {
    Granted {
        record: Record,
    },
    /// Refused: the reason says which condition failed; the record (when the volume is known)
    /// tells a node that must stop serving who the primary is now.
    Refused {
        reason: String,
        record: Option<Record>,
    },
    Status {
        volumes: Vec<VolumeStatus>,
        nodes_connected: Vec<ConnectedNode>,
    },
}

/// The witness's greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerHello {
    pub magic: String,
    pub version: u32,
    /// Hex of [`WITNESS_NONCE_LEN`] random bytes.
    pub nonce: String,
}

impl ServerHello {
    /// The greeting with the witness's fresh nonce (the caller draws it from a CSPRNG).
    pub fn new(nonce: &[u8; WITNESS_NONCE_LEN]) -> ServerHello {
        ServerHello { magic: WITNESS_MAGIC.to_owned(), version: WITNESS_VERSION, nonce: hex_encode(nonce) }
    }

    /// Checks magic and version (magic first: a stranger is named as such) and returns the
    /// witness's nonce.
    pub fn check(&self) -> Result<[u8; WITNESS_NONCE_LEN], WitnessError> {
        if self.magic != WITNESS_MAGIC {
            return Err(WitnessError::BadMagic(excerpt(self.magic.as_bytes())));
        }
        if self.version != WITNESS_VERSION {
            return Err(WitnessError::VersionMismatch { local: WITNESS_VERSION, peer: self.version });
        }
        parse_nonce("witness nonce", &self.nonce)
    }
}

/// The node's answer to the greeting: who it is and the proof that it holds the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientHello {
    pub node: String,
    /// Hex of [`WITNESS_NONCE_LEN`] random bytes.
    pub nonce: String,
    /// Hex of the client proof ([`client_proof`]).
    pub proof: String,
}

impl ClientHello {
    /// The node's hello for the witness's nonce `server_nonce`; `client_nonce` comes fresh
    /// from a CSPRNG.
    pub fn new(
        key: &[u8],
        server_nonce: &[u8; WITNESS_NONCE_LEN],
        client_nonce: &[u8; WITNESS_NONCE_LEN],
        node: &str,
    ) -> Result<ClientHello, WitnessError> {
        check_name("node name", node)?;
        Ok(ClientHello {
            node: node.to_owned(),
            nonce: hex_encode(client_nonce),
            proof: hex_encode(&client_proof(key, server_nonce, client_nonce, node)),
        })
    }

    /// The witness's check: a valid name and nonce, and a proof made with `key` for this
    /// connection's `server_nonce`. Returns the client's nonce (for the witness's own proof).
    pub fn verify(
        &self,
        key: &[u8],
        server_nonce: &[u8; WITNESS_NONCE_LEN],
    ) -> Result<[u8; WITNESS_NONCE_LEN], WitnessError> {
        check_name("node name", &self.node)?;
        let client_nonce = parse_nonce("node nonce", &self.nonce)?;
        let proof = hex_decode(&self.proof).ok_or(WitnessError::AuthFailed)?;
        // verify_slice compares in constant time, so the time taken reveals nothing of the key.
        keyed(key, CLIENT_LABEL, server_nonce, &client_nonce, &self.node)
            .verify_slice(&proof)
            .map_err(|_| WitnessError::AuthFailed)?;
        Ok(client_nonce)
    }
}

/// The witness's last handshake message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ServerVerdict {
    /// Hex of the server proof ([`server_proof`]).
    Welcome {
        proof: String,
    },
    Refused {
        reason: String,
    },
}

impl ServerVerdict {
    /// The witness's welcome to an authenticated node.
    pub fn welcome(
        key: &[u8],
        server_nonce: &[u8; WITNESS_NONCE_LEN],
        client_nonce: &[u8; WITNESS_NONCE_LEN],
        node: &str,
    ) -> ServerVerdict {
        ServerVerdict::Welcome { proof: hex_encode(&server_proof(key, server_nonce, client_nonce, node)) }
    }

    /// The node's check: a welcome whose proof was made with `key` for this connection.
    pub fn verify(
        &self,
        key: &[u8],
        server_nonce: &[u8; WITNESS_NONCE_LEN],
        client_nonce: &[u8; WITNESS_NONCE_LEN],
        node: &str,
    ) -> Result<(), WitnessError> {
        match self {
            ServerVerdict::Refused { reason } => Err(WitnessError::Refused(excerpt_long(reason))),
            ServerVerdict::Welcome { proof } => {
                let proof = hex_decode(proof).ok_or(WitnessError::ServerAuthFailed)?;
                keyed(key, SERVER_LABEL, server_nonce, client_nonce, node)
                    .verify_slice(&proof)
                    .map_err(|_| WitnessError::ServerAuthFailed)
            }
        }
    }
}

/// HMAC(key, "metroblk-witness-v1 client" || server_nonce || client_nonce || node).
pub fn client_proof(
    key: &[u8],
    server_nonce: &[u8; WITNESS_NONCE_LEN],
    client_nonce: &[u8; WITNESS_NONCE_LEN],
    node: &str,
) -> [u8; 32] {
    keyed(key, CLIENT_LABEL, server_nonce, client_nonce, node).finalize().into_bytes().into()
}

/// HMAC(key, "metroblk-witness-v1 server" || server_nonce || client_nonce || node). A different
/// label from the client's, so the witness's proof cannot be replayed as a node's.
pub fn server_proof(
    key: &[u8],
    server_nonce: &[u8; WITNESS_NONCE_LEN],
    client_nonce: &[u8; WITNESS_NONCE_LEN],
    node: &str,
) -> [u8; 32] {
    keyed(key, SERVER_LABEL, server_nonce, client_nonce, node).finalize().into_bytes().into()
}

fn keyed(
    key: &[u8],
    label: &[u8],
    server_nonce: &[u8; WITNESS_NONCE_LEN],
    client_nonce: &[u8; WITNESS_NONCE_LEN],
    node: &str,
) -> Hmac<Sha256> {
    // HMAC accepts keys of any length (a long one is hashed first): the error cannot happen.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    };
    mac.update(label);
    mac.update(server_nonce);
    mac.update(client_nonce);
    // The name is last and the nonces fixed-size, so the concatenation is unambiguous.
    mac.update(node.as_bytes());
    mac
}

/// One message framed for the wire: length prefix and JSON. The messages of this module always
/// serialize; an empty JSON object would only come from a caller's own type failing to.
pub fn encode_message<T: Serialize>(message: &T) -> Vec<u8> {
    let body = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = Vec::with_capacity(WITNESS_FRAME_PREFIX_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// The body length a length prefix announces, refused if over the limit (checked before any
/// buffer is allocated for it).
pub fn frame_body_len(prefix: [u8; WITNESS_FRAME_PREFIX_LEN]) -> Result<usize, WitnessError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > WITNESS_FRAME_BYTES_MAX {
        return Err(WitnessError::FrameTooLarge { len: len as u64 });
    }
    Ok(len)
}

/// Decodes one message body (the bytes after the length prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, WitnessError> {
    serde_json::from_slice(body).map_err(|e| WitnessError::BadMessage {
        // serde_json's message can quote the input (an unknown variant's name): keep it short
        // and printable like the excerpt.
        error: excerpt_long(&e.to_string()),
        excerpt: excerpt(body),
    })
}

/// Decodes the first message in `buf`: `Ok(None)` when more bytes are needed, else the message
/// and the bytes it took.
pub fn decode_message<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, WitnessError> {
    let Some(prefix) = buf.get(..WITNESS_FRAME_PREFIX_LEN) else { return Ok(None) };
    let mut p = [0u8; WITNESS_FRAME_PREFIX_LEN];
    p.copy_from_slice(prefix);
    let len = frame_body_len(p)?;
    let end = WITNESS_FRAME_PREFIX_LEN + len;
    let Some(body) = buf.get(WITNESS_FRAME_PREFIX_LEN..end) else { return Ok(None) };
    Ok(Some((decode_body(body)?, end)))
}

/// Lowercase hex of `bytes`.
pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Bytes of lowercase hex; `None` for odd length or any other character (uppercase included:
/// one spelling only, so a checksum's text has one form).
pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let bytes = text.as_bytes();
    if bytes.len() % 2 != 0 {
        return None;
    }
    bytes.chunks_exact(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

fn parse_nonce(what: &'static str, text: &str) -> Result<[u8; WITNESS_NONCE_LEN], WitnessError> {
    hex_decode(text).and_then(|v| <[u8; WITNESS_NONCE_LEN]>::try_from(v).ok()).ok_or_else(|| WitnessError::BadField {
        what,
        problem: format!("{:?} is not {} hex digits", excerpt(text.as_bytes()), WITNESS_NONCE_LEN * 2),
    })
}

/// A short printable excerpt of hostile bytes for an error message.
fn excerpt(bytes: &[u8]) -> String {
    shorten(&printable(bytes), EXCERPT_CHARS_MAX)
}

/// Like [`excerpt`] for a reason or an error text: longer, still one printable line.
fn excerpt_long(text: &str) -> String {
    shorten(&printable(text.as_bytes()), 200)
}

fn shorten(text: &str, chars_max: usize) -> String {
    match text.char_indices().nth(chars_max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123";

    fn vol() -> VolumeId {
        VolumeId::new("vol0", "6d657472-6f62-6c6b-0000-000000000001", "beta", "alpha")
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(m: &T) {
        let wire = encode_message(m);
        let (back, used) = decode_message::<T>(&wire).unwrap().unwrap();
        assert_eq!(&back, m);
        assert_eq!(used, wire.len());
        // Every strict prefix asks for more bytes instead of failing or guessing.
        for cut in 0..wire.len() {
            assert!(decode_message::<T>(&wire[..cut]).unwrap().is_none(), "prefix {cut}");
        }
    }

    #[test]
    fn volume_id_sorts_its_nodes() {
        let v = vol();
        assert_eq!(v.nodes, ["alpha".to_owned(), "beta".to_owned()]);
        assert_eq!(v.peer_of("alpha"), Some("beta"));
        assert_eq!(v.peer_of("beta"), Some("alpha"));
        assert_eq!(v.peer_of("gamma"), None);
        let swapped = VolumeId { nodes: ["beta".into(), "alpha".into()], ..v.clone() };
        assert_eq!(swapped.nodes_sorted(), v.nodes_sorted());
        v.check().unwrap();
    }

    #[test]
    fn volume_id_check_refuses_bad_names() {
        let same = VolumeId::new("v", "u", "alpha", "alpha");
        assert!(same.check().unwrap_err().to_string().contains("both nodes are named"));
        let bad = VolumeId::new("v\x1b[2J", "u", "a", "b");
        let e = bad.check().unwrap_err().to_string();
        assert!(e.contains("volume name") && !e.contains('\x1b'), "{e}");
        assert!(VolumeId::new("v", "", "a", "b").check().is_err());
        assert!(VolumeId::new(&"v".repeat(65), "u", "a", "b").check().is_err());
    }

    #[test]
    fn messages_round_trip() {
        let v = vol();
        let mut states = BTreeMap::new();
        states.insert("alpha".to_owned(), DiskState::UpToDate);
        states.insert("beta".to_owned(), DiskState::Outdated);
        let record = Record { epoch: 7, primary: Some("alpha".into()), disk_states: states.clone(), lease_ms: 5000 };
        for r in [
            Request::Lease { volume: v.clone(), epoch: 1, lease_ms: 5000, drift_ppm: 10_000 },
            Request::Outdate { volume: v.clone(), epoch: 1, lease_ms: 5000, drift_ppm: 10_000 },
            Request::PeerUpToDate { volume: v.clone(), epoch: 1 },
            Request::Promote {
                volume: v.clone(),
                epoch: 1,
                disk_state: DiskState::UpToDate,
                lease_ms: 5000,
                drift_ppm: 0,
            },
            Request::Resign { volume: v.clone(), epoch: 1, disk_state: DiskState::Failed },
            Request::Handover { volume: v.clone(), epoch: 1, to: "beta".into() },
            Request::Query { volume: v.clone() },
            Request::Status,
        ] {
            round_trip(&r);
            assert!(r.volume().is_some() == !matches!(r, Request::Status));
        }
        round_trip(&Reply::Granted { record: record.clone() });
        round_trip(&Reply::Refused { reason: "no".into(), record: None });
        round_trip(&Reply::Status {
            volumes: vec![VolumeStatus {
                name: v.name.clone(),
                uuid: v.uuid.clone(),
                nodes: v.nodes.clone(),
                epoch: 7,
                primary: None,
                disk_states: states,
                lease_ms: 5000,
                drift_ppm: 10_000,
                lease_left_ms: 0,
            }],
            nodes_connected: vec![ConnectedNode {
                node: "alpha".into(),
                address: "10.0.0.1:5".into(),
                connected_ms: 3,
            }],
        });
        round_trip(&ServerHello::new(&[7; 32]));
        round_trip(&ServerVerdict::Refused { reason: "x".into() });
    }

    #[test]
    fn wire_spelling_is_kebab_case() {
        let text = serde_json::to_string(&Request::PeerUpToDate { volume: vol(), epoch: 3 }).unwrap();
        assert!(text.starts_with(r#"{"request":"peer-up-to-date","volume":{"name":"vol0""#), "{text}");
        assert_eq!(serde_json::to_string(&DiskState::UpToDate).unwrap(), r#""up-to-date""#);
        assert_eq!(DiskState::Inconsistent.to_string(), "inconsistent");
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_it() {
        let mut wire = ((WITNESS_FRAME_BYTES_MAX + 1) as u32).to_le_bytes().to_vec();
        assert_eq!(
            decode_message::<Request>(&wire),
            Err(WitnessError::FrameTooLarge { len: WITNESS_FRAME_BYTES_MAX as u64 + 1 })
        );
        wire = u32::MAX.to_le_bytes().to_vec();
        assert!(matches!(decode_message::<Request>(&wire), Err(WitnessError::FrameTooLarge { .. })));
        assert_eq!(frame_body_len((WITNESS_FRAME_BYTES_MAX as u32).to_le_bytes()), Ok(WITNESS_FRAME_BYTES_MAX));
    }

    #[test]
    fn bad_json_error_is_short_and_printable() {
        let hostile = format!("{{\"request\":\"\x1b[31m{}\"}}", "x".repeat(500));
        let mut wire = (hostile.len() as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(hostile.as_bytes());
        let e = decode_message::<Request>(&wire).unwrap_err().to_string();
        assert!(e.starts_with("malformed witness message"), "{e}");
        assert!(!e.contains('\x1b') && e.len() < 400, "{e}");
        // Unknown fields are refused, not ignored.
        let extra = br#"{"request":"peer-up-to-date","volume":{"name":"v","uuid":"u","nodes":["a","b"]},"epoch":1,"sender":"a"}"#;
        assert!(decode_body::<Request>(extra).is_err());
    }

    #[test]
    fn handshake_authenticates_both_ways() {
        let (ns, nc) = ([1u8; 32], [2u8; 32]);
        let hello = ServerHello::new(&ns);
        assert_eq!(hello.check().unwrap(), ns);
        let ch = ClientHello::new(KEY, &ns, &nc, "alpha").unwrap();
        assert_eq!(ch.verify(KEY, &ns).unwrap(), nc);
        // Wrong key, another connection's nonce, another name: refused.
        assert_eq!(ch.verify(b"another key entirely", &ns), Err(WitnessError::AuthFailed));
        assert_eq!(ch.verify(KEY, &[9; 32]), Err(WitnessError::AuthFailed));
        let renamed = ClientHello { node: "beta".into(), ..ch.clone() };
        assert_eq!(renamed.verify(KEY, &ns), Err(WitnessError::AuthFailed));
        let garbled = ClientHello { proof: "zz".into(), ..ch.clone() };
        assert_eq!(garbled.verify(KEY, &ns), Err(WitnessError::AuthFailed));
        // The witness's welcome verifies only with the same key, nonces and name.
        let welcome = ServerVerdict::welcome(KEY, &ns, &nc, "alpha");
        welcome.verify(KEY, &ns, &nc, "alpha").unwrap();
        assert_eq!(welcome.verify(b"fake witness key!", &ns, &nc, "alpha"), Err(WitnessError::ServerAuthFailed));
        assert_eq!(welcome.verify(KEY, &ns, &nc, "beta"), Err(WitnessError::ServerAuthFailed));
        // The client's proof is no server proof (different labels).
        let replayed = ServerVerdict::Welcome { proof: ch.proof.clone() };
        assert_eq!(replayed.verify(KEY, &ns, &nc, "alpha"), Err(WitnessError::ServerAuthFailed));
        assert_ne!(client_proof(KEY, &ns, &nc, "alpha"), server_proof(KEY, &ns, &nc, "alpha"));
        let refused = ServerVerdict::Refused { reason: "authentication failed\x07".into() };
        assert_eq!(refused.verify(KEY, &ns, &nc, "alpha"), Err(WitnessError::Refused("authentication failed?".into())));
    }

    #[test]
    fn server_hello_check() {
        let mut h = ServerHello::new(&[0; 32]);
        h.magic = "metroblk-peer".into();
        assert!(matches!(h.check(), Err(WitnessError::BadMagic(_))));
        let mut h = ServerHello::new(&[0; 32]);
        h.version = 2;
        assert_eq!(h.check(), Err(WitnessError::VersionMismatch { local: 1, peer: 2 }));
        let mut h = ServerHello::new(&[0; 32]);
        h.nonce.pop();
        assert!(matches!(h.check(), Err(WitnessError::BadField { .. })));
        assert!(ClientHello::new(KEY, &[0; 32], &[0; 32], "bad name").is_err());
    }

    #[test]
    fn hex_helpers() {
        assert_eq!(hex_encode(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(hex_decode("00ab10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(hex_decode("00AB10"), None);
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("é0"), None);
        assert_eq!(hex_decode(""), Some(vec![]));
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode_message::<Request>(&bytes);
            let _ = decode_message::<Reply>(&bytes);
            let _ = decode_message::<ClientHello>(&bytes);
            let _ = decode_body::<ServerVerdict>(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_framed_json_like_bytes(
            body in proptest::string::string_regex(r#"[{}\[\]":,a-z0-9 \-]{0,200}"#).unwrap()
        ) {
            let mut wire = (body.len() as u32).to_le_bytes().to_vec();
            wire.extend_from_slice(body.as_bytes());
            let _ = decode_message::<Request>(&wire);
            let _ = decode_message::<Reply>(&wire);
        }
    }
}
