//! Node configuration: one TOML file per node.
//!
//! Every problem is reported as one [`ConfigError`] line naming the file, the field and what is
//! wrong, so an operator can fix it without reading code. Parsing is strict: unknown fields are
//! errors (a typo must not silently fall back to a default).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use metroblk_tls::{TlsKeys, TlsSetup, Transport};
use serde::Deserialize;

/// Smallest and largest dirty-bitmap region (design: power of two, 4 KiB .. 64 MiB).
pub const MIN_REGION_SIZE: u64 = 4096;
pub const MAX_REGION_SIZE: u64 = 64 << 20;
/// Largest queue depth a volume may ask for; bounds every per-queue table.
pub const MAX_QUEUE_DEPTH: u16 = 1024;
/// Largest number of queues (one thread and one ring each).
pub const MAX_QUEUES: u16 = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Primary,
    Secondary,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoMode {
    /// Through the page cache; FLUSH/FUA make it durable.
    Buffered,
    /// O_DIRECT: bypasses the page cache (buffers must be 4 KiB aligned).
    Direct,
}

/// Whether WRITE payloads between the nodes carry a crc32c (`payload_checksum`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PayloadChecksum {
    /// Every WRITE and resync copy carries a crc32c, checked before anything is written: a
    /// corruption the network's own checksums miss (a bad NIC, memory, a middlebox) is caught.
    Crc32c,
    /// No payload checksum (TCP's 16-bit sum, or TLS, protects the data): the sender's CPU
    /// never reads the payload, which zero copy needs. A receiver set to `crc32c` refuses it.
    None,
}

impl PayloadChecksum {
    /// Whether WRITE payloads this node sends carry a crc32c.
    pub fn sends_crc(self) -> bool {
        self == PayloadChecksum::Crc32c
    }

    /// A frame's payload may be applied under this setting: a node set to `crc32c` refuses
    /// an unchecked one, so a mismatch of the two nodes' settings is a refusal in one line,
    /// never a silent downgrade.
    pub fn admits(self, frame: &metroblk_protocol::Frame) -> Result<(), String> {
        if frame.unchecked() && self == PayloadChecksum::Crc32c {
            return Err("the peer sends payloads without a checksum (payload_checksum = \"none\" there, \
                        \"crc32c\" here); set payload_checksum the same on both nodes"
                .into());
        }
        Ok(())
    }
}

/// `io_scheduler` value that keeps the scheduler the kernel gives the device.
pub const IO_SCHEDULER_KERNEL: &str = "kernel";

/// Where each ublk queue's thread may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueAffinity {
    /// On one CPU picked from those the kernel maps to the queue (rublk's default).
    SingleCpu,
    /// On any CPU the kernel maps to the queue.
    QueueCpus,
}

/// A config value written as a plain integer or as text with a unit ("64KiB", "5s").
#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrText {
    Int(u64),
    Text(String),
}

/// A byte size written as an integer (bytes) or a string with a binary suffix ("64KiB", "1GiB").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match IntOrText::deserialize(d)? {
            IntOrText::Int(n) => Ok(ByteSize(n)),
            IntOrText::Text(s) => parse_size(&s).map(ByteSize).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses "4096", "64KiB", "64K", "1GiB", "2G" (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (use bytes or a suffix like 64KiB, 1GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        other => return Err(format!("unknown size unit '{other}' in '{s}'")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size '{s}' is too large"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    #[serde(default)]
    volume: Vec<RawVolume>,
    #[serde(default)]
    group: Vec<RawGroup>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    volumes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    control_socket: PathBuf,
    /// `ADDRESS:PORT` serving Prometheus metrics on `/metrics` (none: not served).
    metrics_listen: Option<String>,
    /// A command `metroblk events` runs per event (through `sh -c`).
    on_event: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: String,
    uuid: Option<String>,
    size: ByteSize,
    backing_file: PathBuf,
    metadata_file: PathBuf,
    region_size: Option<ByteSize>,
    block_size: Option<u32>,
    listen: String,
    role: Role,
    io_mode: Option<IoMode>,
    payload_checksum: Option<PayloadChecksum>,
    queues: Option<u16>,
    queue_affinity: Option<QueueAffinity>,
    io_scheduler: Option<String>,
    depth: Option<u16>,
    ublk_id: Option<i32>,
    fencing: Option<Fencing>,
    #[serde(alias = "on-fence")]
    on_fence: Option<OnFence>,
    /// Seconds without the peer before a warning and the status flag (0: never).
    out_of_sync_alert_s: Option<u64>,
    resync_rate: Option<ByteSize>,
    peer: Option<RawPeer>,
    witness: Option<RawWitness>,
    export: Option<crate::export::config::RawExport>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWitness {
    address: String,
    authkey_file: PathBuf,
    lease_ms: Option<u64>,
    /// The same as a duration: "5s", "1500ms", "1m", or whole seconds.
    lease: Option<DurationText>,
    drift_ppm: Option<u32>,
    /// "tcp" (default) or "tls"; TLS keys from the authkey unless all three files are set.
    transport: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
}

/// A duration written as whole seconds or a string with a unit ("5s", "1500ms", "1m").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationText(pub std::time::Duration);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match IntOrText::deserialize(d)? {
            IntOrText::Int(n) => Ok(DurationText(std::time::Duration::from_secs(n))),
            IntOrText::Text(s) => parse_duration(&s).map(DurationText).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses "5s", "1500ms", "2m", "5" (seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a duration (use 5s, 1500ms or 1m)"))?;
    let ms = match unit.trim() {
        "" | "s" => n.checked_mul(1000),
        "ms" => Some(n),
        "m" | "min" => n.checked_mul(60_000),
        other => return Err(format!("unknown duration unit '{other}' in '{s}' (use ms, s or m)")),
    };
    ms.map(std::time::Duration::from_millis).ok_or_else(|| format!("duration '{s}' is too large"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    address: String,
    authkey_file: PathBuf,
    allow_from: Option<Vec<String>>,
    /// "tcp" (default) or "tls"; TLS keys from the authkey unless all three files are set.
    transport: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
}

/// A link's transport and TLS keys (`[volume.peer]`, `[volume.witness]`).
struct RawTls {
    transport: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub path: PathBuf,
    pub name: String,
    pub control_socket: PathBuf,
    /// Where `/metrics` is served (`metrics.rs`); `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The hook `metroblk events` runs per event (`events.rs`).
    pub on_event: Option<String>,
    pub volumes: Vec<VolumeConfig>,
    /// Consistency groups (`[[group]]`); a volume in none is a group of one ([`Self::group_of`]).
    pub groups: Vec<GroupConfig>,
}

/// A consistency group: volumes that share one witness record, epoch and lease and change role
/// together (design: "group"). Each volume is in one group at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    pub name: String,
    /// Names of volumes of this node, in config order, at least one.
    pub volumes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub name: String,
    pub uuid: uuid::Uuid,
    pub size: u64,
    pub backing_file: PathBuf,
    pub metadata_file: PathBuf,
    pub region_size: u64,
    /// Logical block size: the unit every offset and length must be a multiple of.
    pub block_size: u32,
    pub listen: SocketAddr,
    pub role: Role,
    pub io_mode: IoMode,
    /// Whether the payloads this node sends carry a crc32c, and whether it accepts ones that
    /// do not.
    pub payload_checksum: PayloadChecksum,
    pub queues: u16,
    pub queue_affinity: QueueAffinity,
    /// The device's block-layer I/O scheduler, or `None` to keep the kernel's choice
    /// (`io_scheduler = "kernel"`). Default `none`: see `metroblk_ublk::device::set_io_scheduler`.
    pub io_scheduler: Option<String>,
    pub depth: u16,
    /// ublk device id; -1 lets the kernel pick.
    pub ublk_id: i32,
    /// What the primary does when it loses the peer.
    pub fencing: Fencing,
    /// What a fenced primary does with I/O.
    pub on_fence: OnFence,
    /// A volume without its peer for longer than this raises the out-of-sync alert.
    pub out_of_sync_alert: std::time::Duration,
    /// The witness (`fencing = "witness"`, the default when `[volume.witness]` is set).
    pub witness: Option<WitnessConfig>,
    /// Resync rate limit in bytes of data per second (`resync_rate`, e.g. "100MiB"); ranges
    /// sent as zeros are not counted. 0: unlimited.
    pub resync_rate_bps: u64,
    /// None: a standalone volume (no replication; writes complete locally).
    pub peer: Option<PeerConfig>,
    /// The authkey read from `peer.authkey_file` (never logged; empty when standalone).
    pub authkey: Vec<u8>,
    /// `[volume.export]`: the iSCSI or NVMe/TCP target hosts reach the primary through.
    pub export: Option<crate::export::config::ExportConfig>,
}

/// What a primary does when it loses its peer (design: "Losing the peer").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fencing {
    /// Hold writes until the peer returns (or an operator runs `metroblk resume-alone`).
    Hold,
    /// Go on alone at once: writes complete locally, their regions are resynced later. Like
    /// DRBD's `dont-care`: a partition can then lead to split brain.
    None,
    /// Ask the witness: go on alone once it recorded the peer outdated; fence when neither
    /// peer nor witness answers (design: "Losing the peer — fencing").
    Witness,
}

/// What a fenced primary does with I/O (`on_fence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFence {
    /// I/O waits (the kernel keeps it queued) until the node may serve again.
    Suspend,
    /// I/O fails with EIO at once.
    IoError,
}

/// Default witness lease (design: 5 s).
pub const WITNESS_LEASE_DEFAULT: std::time::Duration = std::time::Duration::from_secs(5);
/// Shortest lease a config may name: the renewals (a third of it) must fit round trips.
pub const WITNESS_LEASE_MIN: std::time::Duration = std::time::Duration::from_millis(300);
pub const WITNESS_LEASE_MAX: std::time::Duration = std::time::Duration::from_secs(600);
/// Default clock drift bound between a node and the witness (design: 1 %).
pub const WITNESS_DRIFT_PPM_DEFAULT: u32 = 10_000;
/// Default out-of-sync alert (Tintri's recommendation: one minute).
pub const OUT_OF_SYNC_ALERT_DEFAULT: std::time::Duration = std::time::Duration::from_secs(60);
/// The witness's default port.
pub const WITNESS_PORT_DEFAULT: u16 = 9095;

#[derive(Debug, Clone)]
pub struct WitnessConfig {
    pub address: SocketAddr,
    pub authkey_file: PathBuf,
    /// The key read from `authkey_file` (never logged; empty with `Keys::Skip`).
    pub authkey: Vec<u8>,
    pub lease: std::time::Duration,
    pub drift_ppm: u32,
    /// The witness link's transport; with TLS, its configs (None with `Keys::Skip`).
    pub transport: Transport,
    pub tls: Option<TlsSetup>,
}

#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub name: String,
    pub address: SocketAddr,
    pub authkey_file: PathBuf,
    /// Source addresses the listener accepts links from (default: the peer's address only).
    pub allow_from: Vec<AddrRange>,
    /// The data and sync links' transport; with TLS, their configs (None with `Keys::Skip`).
    pub transport: Transport,
    pub tls: Option<TlsSetup>,
}

/// An address or a CIDR range (`10.0.0.0/8`, `fd00::/8`, `192.0.2.7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrRange {
    pub addr: std::net::IpAddr,
    pub prefix_len: u8,
}

impl AddrRange {
    pub fn parse(s: &str) -> Result<AddrRange, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a.trim().parse().map_err(|_| format!("'{s}' is not an address or CIDR range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match p {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("'{s}': the prefix length must be 0..={max}")),
            },
        };
        Ok(AddrRange { addr, prefix_len })
    }

    /// Does `ip` fall in this range? IPv4-mapped IPv6 sources match IPv4 ranges.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        let bits = |x: u128, total: u32| if self.prefix_len == 0 { 0 } else { x >> (total - self.prefix_len as u32) };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => bits(u32::from(a) as u128, 32) == bits(u32::from(b) as u128, 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => bits(u128::from(a), 128) == bits(u128::from(b), 128),
            _ => false,
        }
    }
}

/// Whether [`NodeConfig::load_with`] reads the authkey files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    Read,
    /// For commands that only talk to the local control socket (`status`): they need no key.
    Skip,
}

/// UUIDv5 namespace for volume uuids derived from the volume name, so that two nodes whose
/// configs name the same volume agree on its uuid without an extra field.
/// Most volumes in one consistency group (Tintri's service-group limit is 16).
pub const GROUP_VOLUMES_MAX: usize = 64;

/// UUIDv5 namespace of consistency groups' witness records (both nodes derive the same from
/// the group's name).
const GROUP_UUID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d65_7472_6f62_6c6b_0000_0000_0000_0002);

/// Volumes that change role as one, with their witness record's name and uuid.
#[derive(Debug, Clone)]
pub struct RoleGroup {
    pub name: String,
    pub uuid: uuid::Uuid,
    pub volumes: Vec<VolumeConfig>,
}

const VOLUME_UUID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6d65_7472_6f62_6c6b_0000_0000_0000_0001);

/// The uuid of a volume whose config names none.
fn derived_uuid(name: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(&VOLUME_UUID_NAMESPACE, name.as_bytes())
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        Self::load_with(path, Keys::Read)
    }

    pub fn load_with(path: &Path, keys: Keys) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            field: String::new(),
            message: format!("cannot read config: {e}"),
        })?;
        Self::parse_with(path, &text, keys)
    }

    pub fn parse(path: &Path, text: &str) -> Result<NodeConfig, ConfigError> {
        Self::parse_with(path, text, Keys::Read)
    }

    pub fn parse_with(path: &Path, text: &str, keys: Keys) -> Result<NodeConfig, ConfigError> {
        let err =
            |field: &str, message: String| ConfigError { file: path.to_path_buf(), field: field.to_string(), message };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's message is multi-line (it quotes the source); keep it to one line.
            let msg = e.message().to_string();
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].lines().count().max(1);
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            err("", format!("{msg}{at}"))
        })?;
        check_name(&raw.node.name).map_err(|m| err("node.name", m))?;
        if raw.volume.is_empty() {
            return Err(err("volume", "no [[volume]] is configured".into()));
        }
        let mut volumes = Vec::with_capacity(raw.volume.len());
        // Each volume's (backing_file, metadata_file) identities, beside `volumes`.
        let mut files: Vec<(FileIdentity, FileIdentity)> = Vec::with_capacity(raw.volume.len());
        for (i, v) in raw.volume.into_iter().enumerate() {
            let f = |name: &str| format!("volume[{i}].{name}");
            check_name(&v.name).map_err(|m| err(&f("name"), m))?;
            if volumes.iter().any(|o: &VolumeConfig| o.name == v.name) {
                return Err(err(&f("name"), format!("volume '{}' is configured twice", v.name)));
            }
            let uuid = match &v.uuid {
                Some(s) => {
                    uuid::Uuid::parse_str(s).map_err(|e| err(&f("uuid"), format!("'{s}' is not a uuid: {e}")))?
                }
                None => derived_uuid(&v.name),
            };
            let block_size = v.block_size.unwrap_or(512);
            if block_size != 512 && block_size != 4096 {
                return Err(err(&f("block_size"), format!("{block_size} is not 512 or 4096")));
            }
            let size = v.size.0;
            if size == 0 || size % 4096 != 0 {
                return Err(err(&f("size"), format!("{size} bytes is not a positive multiple of 4096")));
            }
            let region_size = v.region_size.map(|r| r.0).unwrap_or(64 << 10);
            if !region_size.is_power_of_two() || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&region_size) {
                return Err(err(
                    &f("region_size"),
                    format!("{region_size} is not a power of two between 4KiB and 64MiB"),
                ));
            }
            let listen: SocketAddr = v
                .listen
                .parse()
                .map_err(|_| err(&f("listen"), format!("'{}' is not an address like 0.0.0.0:7789", v.listen)))?;
            let queues = v.queues.unwrap_or(0);
            if queues > MAX_QUEUES {
                return Err(err(&f("queues"), format!("{queues} is above the limit of {MAX_QUEUES}")));
            }
            let depth = v.depth.unwrap_or(128);
            if depth == 0 || depth > MAX_QUEUE_DEPTH {
                return Err(err(&f("depth"), format!("{depth} is not between 1 and {MAX_QUEUE_DEPTH}")));
            }
            let (peer, authkey) = match v.peer {
                None if v.role == Role::Secondary => {
                    return Err(err(&f("peer"), "a secondary needs a [volume.peer] to replicate from".into()))
                }
                None => (None, Vec::new()),
                Some(p) => {
                    check_name(&p.name).map_err(|m| err(&f("peer.name"), m))?;
                    if p.name == raw.node.name {
                        return Err(err(&f("peer.name"), "the peer has this node's own name".into()));
                    }
                    let address: SocketAddr = p.address.parse().map_err(|_| {
                        err(&f("peer.address"), format!("'{}' is not an address like 10.0.0.2:7789", p.address))
                    })?;
                    let authkey_file = resolve(path, &p.authkey_file);
                    let authkey = match keys {
                        Keys::Read => read_authkey(&authkey_file).map_err(|m| err(&f("peer.authkey_file"), m))?,
                        Keys::Skip => Vec::new(),
                    };
                    let allow_from = match &p.allow_from {
                        None => {
                            vec![AddrRange { addr: address.ip(), prefix_len: if address.is_ipv4() { 32 } else { 128 } }]
                        }
                        Some(list) => {
                            let mut out = Vec::with_capacity(list.len());
                            for a in list {
                                out.push(AddrRange::parse(a).map_err(|m| err(&f("peer.allow_from"), m))?);
                            }
                            out
                        }
                    };
                    let (transport, tls) = link_tls(
                        path,
                        RawTls { transport: p.transport, tls_cert: p.tls_cert, tls_key: p.tls_key, tls_ca: p.tls_ca },
                        &authkey,
                        PEER_TLS_LABEL,
                        &p.name,
                        keys,
                        &|x| f(&format!("peer.{x}")),
                    )?;
                    (Some(PeerConfig { name: p.name, address, authkey_file, allow_from, transport, tls }), authkey)
                }
            };
            let witness = match v.witness {
                None => None,
                Some(w) => {
                    let address = parse_witness_address(&w.address).map_err(|m| err(&f("witness.address"), m))?;
                    let authkey_file = resolve(path, &w.authkey_file);
                    let authkey = match keys {
                        Keys::Read => read_authkey(&authkey_file).map_err(|m| err(&f("witness.authkey_file"), m))?,
                        Keys::Skip => Vec::new(),
                    };
                    let lease = match (w.lease_ms, w.lease) {
                        (Some(_), Some(_)) => {
                            return Err(err(&f("witness.lease"), "set lease or lease_ms, not both".into()))
                        }
                        (Some(ms), None) => std::time::Duration::from_millis(ms),
                        (None, Some(d)) => d.0,
                        (None, None) => WITNESS_LEASE_DEFAULT,
                    };
                    if !(WITNESS_LEASE_MIN..=WITNESS_LEASE_MAX).contains(&lease) {
                        return Err(err(
                            &f("witness.lease_ms"),
                            format!(
                                "{} ms is not between {} and {} ms",
                                lease.as_millis(),
                                WITNESS_LEASE_MIN.as_millis(),
                                WITNESS_LEASE_MAX.as_millis()
                            ),
                        ));
                    }
                    let drift_ppm = w.drift_ppm.unwrap_or(WITNESS_DRIFT_PPM_DEFAULT);
                    if drift_ppm > crate::fencing::lease::DRIFT_PPM_MAX {
                        return Err(err(
                            &f("witness.drift_ppm"),
                            format!("{drift_ppm} is above {} (10 %)", crate::fencing::lease::DRIFT_PPM_MAX),
                        ));
                    }
                    if peer.is_none() {
                        return Err(err(
                            &f("witness"),
                            "a witness arbitrates between two nodes: add [volume.peer]".into(),
                        ));
                    }
                    // Certificate files: the witness's certificate names its IP address.
                    let (transport, tls) = link_tls(
                        path,
                        RawTls { transport: w.transport, tls_cert: w.tls_cert, tls_key: w.tls_key, tls_ca: w.tls_ca },
                        &authkey,
                        WITNESS_TLS_LABEL,
                        &address.ip().to_string(),
                        keys,
                        &|x| f(&format!("witness.{x}")),
                    )?;
                    Some(WitnessConfig { address, authkey_file, authkey, lease, drift_ppm, transport, tls })
                }
            };
            let fencing = match (v.fencing, &witness) {
                (Some(Fencing::Witness), None) => {
                    return Err(err(&f("fencing"), "\"witness\" needs a [volume.witness] section".into()))
                }
                (Some(x), _) => x,
                (None, Some(_)) => Fencing::Witness,
                (None, None) => Fencing::Hold,
            };
            let backing_file = resolve(path, &v.backing_file);
            let metadata_file = resolve(path, &v.metadata_file);
            let backing_id = FileIdentity::of(&backing_file);
            let metadata_id = FileIdentity::of(&metadata_file);
            if backing_id.same_file(&metadata_id) {
                return Err(err(&f("metadata_file"), "is the same file as backing_file".into()));
            }
            let ublk_id = v.ublk_id.unwrap_or(-1);
            // Two volumes on one file, port, device id or uuid would corrupt each other, fail to
            // start, or be taken for one another by the peer and the witness. Each clash names
            // both volumes: the one being read (by its index, in the field) and the earlier one.
            let me = format!("volume '{}'", v.name);
            for (o, o_files) in volumes.iter().zip(&files) {
                let mine =
                    [("backing_file", &backing_file, &backing_id), ("metadata_file", &metadata_file, &metadata_id)];
                let theirs =
                    [("backing_file", &o.backing_file, &o_files.0), ("metadata_file", &o.metadata_file, &o_files.1)];
                for (field, file, id) in mine {
                    for (o_field, o_file, o_id) in theirs {
                        if id.same_file(o_id) {
                            return Err(err(
                                &f(field),
                                format!(
                                    "{} of {me} is the same file as {}, the {o_field} of volume '{}'",
                                    file.display(),
                                    o_file.display(),
                                    o.name
                                ),
                            ));
                        }
                    }
                }
                if listen_collides(listen, o.listen) {
                    let why =
                        if listen == o.listen { "" } else { " (a wildcard address takes its port on every address)" };
                    return Err(err(
                        &f("listen"),
                        format!("{listen} of {me} collides with {}, the listen of volume '{}'{why}", o.listen, o.name),
                    ));
                }
                // A negative id lets the driver pick (`node.rs`), so only explicit ids can clash.
                if ublk_id >= 0 && o.ublk_id == ublk_id {
                    return Err(err(
                        &f("ublk_id"),
                        format!(
                            "{ublk_id} of {me} is already the ublk_id of volume '{}' (leave it unset or -1 to let \
                             the driver pick)",
                            o.name
                        ),
                    ));
                }
                // Derived uuids differ because names do; an explicit one can still repeat another
                // volume's (explicit or derived), and the uuid is the volume's identity in the
                // metadata, on the wire and at the witness.
                if o.uuid == uuid {
                    let derived = if o.uuid == derived_uuid(&o.name) { " (derived from its name)" } else { "" };
                    return Err(err(
                        &f("uuid"),
                        format!("{uuid} of {me} is already the uuid of volume '{}'{derived}", o.name),
                    ));
                }
            }
            let export = match v.export {
                Some(raw) => Some(
                    crate::export::config::parse(raw, &v.name, path)
                        .map_err(|(field, m)| err(&f(&format!("export.{field}")), m))?,
                ),
                None => None,
            };
            let io_scheduler = match v.io_scheduler.as_deref() {
                None => Some(metroblk_ublk::IO_SCHEDULER_DEFAULT.to_string()),
                Some(IO_SCHEDULER_KERNEL) => None,
                Some(name) => {
                    metroblk_ublk::check_io_scheduler_name(name).map_err(|m| err(&f("io_scheduler"), m))?;
                    Some(name.to_string())
                }
            };
            files.push((backing_id, metadata_id));
            volumes.push(VolumeConfig {
                name: v.name,
                uuid,
                size,
                backing_file,
                metadata_file,
                region_size,
                block_size,
                listen,
                role: v.role,
                io_mode: v.io_mode.unwrap_or(IoMode::Buffered),
                payload_checksum: v.payload_checksum.unwrap_or(PayloadChecksum::Crc32c),
                queues,
                queue_affinity: v.queue_affinity.unwrap_or(QueueAffinity::SingleCpu),
                io_scheduler,
                depth,
                ublk_id,
                fencing,
                on_fence: v.on_fence.unwrap_or(OnFence::Suspend),
                out_of_sync_alert: v
                    .out_of_sync_alert_s
                    .map_or(OUT_OF_SYNC_ALERT_DEFAULT, std::time::Duration::from_secs),
                witness,
                resync_rate_bps: v.resync_rate.map_or(0, |r| r.0),
                peer,
                authkey,
                export,
            });
        }
        let exports: Vec<_> = volumes.iter().filter_map(|v| v.export.as_ref().map(|e| (v.name.as_str(), e))).collect();
        crate::export::config::check_distinct(&exports).map_err(|(i, m)| {
            let index = volumes.iter().position(|v| v.name == exports[i].0).unwrap_or(0);
            err(&format!("volume[{index}].export"), m)
        })?;
        let groups = check_groups(raw.group, &volumes).map_err(|(field, m)| err(&field, m))?;
        let metrics_listen = match &raw.node.metrics_listen {
            None => None,
            Some(s) => Some(s.parse::<SocketAddr>().map_err(|_| {
                err("node.metrics_listen", format!("'{s}' is not an address like 127.0.0.1:9942 or [::]:9942"))
            })?),
        };
        let on_event = raw.node.on_event.filter(|c| !c.trim().is_empty());
        Ok(NodeConfig {
            path: path.to_path_buf(),
            name: raw.node.name,
            control_socket: resolve(path, &raw.node.control_socket),
            metrics_listen,
            on_event,
            volumes,
            groups,
        })
    }

    /// The node's volumes as they change role: each `[[group]]` in config order, then each
    /// volume outside any group as a group of one (its record at the witness is the volume's
    /// own, as before groups existed).
    pub fn role_groups(&self) -> Vec<RoleGroup> {
        let mut out: Vec<RoleGroup> = Vec::new();
        for v in &self.volumes {
            let name = self.group_of(&v.name);
            if let Some(g) = out.iter_mut().find(|g| g.name == name) {
                g.volumes.push(v.clone());
                continue;
            }
            let alone = !self.groups.iter().any(|g| g.name == name && g.volumes != [v.name.as_str()]);
            let uuid = if alone && name == v.name {
                v.uuid
            } else {
                uuid::Uuid::new_v5(&GROUP_UUID_NAMESPACE, name.as_bytes())
            };
            out.push(RoleGroup { name, uuid, volumes: vec![v.clone()] });
        }
        out
    }

    /// The name of the group `volume` changes role with: its `[[group]]`'s, or, for a volume in
    /// none, the volume's own (a group of one).
    pub fn group_of(&self, volume: &str) -> String {
        self.groups
            .iter()
            .find(|g| g.volumes.iter().any(|v| v == volume))
            .map_or_else(|| volume.to_string(), |g| g.name.clone())
    }
}

/// Validates the `[[group]]` tables against the node's volumes; an error is `(field, problem)`.
fn check_groups(raw: Vec<RawGroup>, volumes: &[VolumeConfig]) -> Result<Vec<GroupConfig>, (String, String)> {
    let mut groups: Vec<GroupConfig> = Vec::with_capacity(raw.len());
    for (i, g) in raw.into_iter().enumerate() {
        let f = |name: &str| format!("group[{i}].{name}");
        let me = format!("group '{}'", g.name);
        check_name(&g.name).map_err(|m| (f("name"), m))?;
        if let Some(o) = groups.iter().position(|o| o.name == g.name) {
            return Err((f("name"), format!("{me} is configured twice (as group[{o}] and group[{i}])")));
        }
        if g.volumes.is_empty() {
            return Err((f("volumes"), format!("{me} has no volumes")));
        }
        for (k, v) in g.volumes.iter().enumerate() {
            if !volumes.iter().any(|c| &c.name == v) {
                return Err((f("volumes"), format!("{me} names volume '{v}', which is not configured on this node")));
            }
            if g.volumes[..k].contains(v) {
                return Err((f("volumes"), format!("{me} names volume '{v}' twice")));
            }
            if let Some(o) = groups.iter().find(|o| o.volumes.contains(v)) {
                return Err((
                    f("volumes"),
                    format!("volume '{v}' is in {me} and in group '{}' (a volume is in one group at most)", o.name),
                ));
            }
        }
        // Groups and the volumes outside any group (groups of one, named after the volume)
        // share one namespace: the witness keeps one record per name, and `status` and the
        // logs speak of groups by name. So a name must mean one set of volumes: a group named
        // after a volume may hold that volume alone (the same as no group at all); holding any
        // other volume, it would name two sets on this node or, where the peer's config groups
        // differently, across the pair.
        if let Some(v) = volumes.iter().find(|v| v.name == g.name) {
            if g.volumes != [v.name.as_str()] {
                return Err((
                    f("name"),
                    format!(
                        "{me} has the name of volume '{}' but holds '{}'; a group named after a volume may \
                         hold only that volume",
                        v.name,
                        g.volumes.join("', '")
                    ),
                ));
            }
        }
        if g.volumes.len() > GROUP_VOLUMES_MAX {
            return Err((f("volumes"), format!("{me} has {} volumes, more than {GROUP_VOLUMES_MAX}", g.volumes.len())));
        }
        // A group changes role as one across exactly two nodes, under one witness record:
        // its volumes must name the same peer, the same witness and the same fencing.
        let members: Vec<&VolumeConfig> =
            g.volumes.iter().filter_map(|n| volumes.iter().find(|v| &v.name == n)).collect();
        if let Some((first, rest)) = members.split_first() {
            let peer_of = |v: &VolumeConfig| v.peer.as_ref().map(|p| p.name.clone());
            let witness_of = |v: &VolumeConfig| v.witness.as_ref().map(|w| w.address);
            for v in rest {
                let differs = if peer_of(v) != peer_of(first) {
                    Some("peer")
                } else if witness_of(v) != witness_of(first) {
                    Some("witness")
                } else if v.fencing != first.fencing {
                    Some("fencing")
                } else if v.role != first.role {
                    Some("role")
                } else {
                    None
                };
                if let Some(what) = differs {
                    return Err((
                        f("volumes"),
                        format!(
                            "{me}: volumes '{}' and '{}' have different {what} settings; a group changes role as one \
                             between the same two nodes under one witness",
                            first.name, v.name
                        ),
                    ));
                }
            }
        }
        groups.push(GroupConfig { name: g.name, volumes: g.volumes });
    }
    Ok(groups)
}

/// `host:port` or `host` (port 9095); a name is resolved once, at start.
fn parse_witness_address(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, WITNESS_PORT_DEFAULT));
    }
    let with_port = if s.contains(':') { s.to_string() } else { format!("{s}:{WITNESS_PORT_DEFAULT}") };
    with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("'{s}' is not an address like 10.0.0.3:9095 (or a host name that resolves)"))
}

/// Relative paths in a config are relative to the config file's directory, not the cwd, so a
/// config means the same thing whoever starts the daemon.
fn resolve(config: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Can two volumes' `listen` addresses not both be bound? On one port, equal addresses clash,
/// and so does a wildcard with any address: `0.0.0.0:P` takes P on every IPv4 address and
/// `[::]:P` on every IPv6 one and, dual-stack being Linux's default (`net.ipv6.bindv6only = 0`),
/// on every IPv4 one too. We do not read that sysctl: the config must mean the same on every
/// host, so any wildcard clashes with any address on its port. An IPv4-mapped IPv6 address
/// (`[::ffff:10.0.0.1]`) is the IPv4 address it maps.
fn listen_collides(a: SocketAddr, b: SocketAddr) -> bool {
    let (ip_a, ip_b) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() == b.port() && (ip_a == ip_b || ip_a.is_unspecified() || ip_b.is_unspecified())
}

/// What makes two config paths one file, for refusing two volumes (or a volume's data and
/// metadata) on one file: the path with every symlink resolved, and, where the file exists,
/// its device and inode (a hard link has its own path), or for a block device the device it
/// opens (two device nodes can name one disk).
#[derive(Debug)]
struct FileIdentity {
    path: PathBuf,
    inode: Option<(u64, u64)>,
    block_device: Option<u64>,
}

impl FileIdentity {
    fn of(p: &Path) -> FileIdentity {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(p).ok();
        FileIdentity {
            path: canonical_path(p),
            inode: meta.as_ref().map(|m| (m.dev(), m.ino())),
            block_device: meta.filter(|m| m.file_type().is_block_device()).map(|m| m.rdev()),
        }
    }

    fn same_file(&self, other: &FileIdentity) -> bool {
        let both = |a: Option<u64>, b: Option<u64>| a.is_some() && a == b;
        self.path == other.path
            || (self.inode.is_some() && self.inode == other.inode)
            || both(self.block_device, other.block_device)
    }
}

/// `p` with its longest existing prefix canonicalised (symlinks resolved, made absolute) and
/// the rest, which does not exist yet (a backing or metadata file is created at first start),
/// appended with `.` and `..` taken lexically. The prefix is resolved by the kernel rather than
/// lexically because `link/..` is the parent of the link's target, not `.`. A dangling symlink
/// is followed by hand: creating the file through it creates its target. A path that cannot be
/// resolved at all (the cwd is gone) is taken lexically as a whole.
fn canonical_path(p: &Path) -> PathBuf {
    canonical_path_within(p, SYMLINK_HOPS_MAX)
}

/// As many dangling symlinks as Linux follows in one lookup before ELOOP.
const SYMLINK_HOPS_MAX: u32 = 40;

fn canonical_path_within(p: &Path, hops_left: u32) -> PathBuf {
    use std::path::Component;
    let parts: Vec<Component> = p.components().collect();
    let lexical = |mut out: PathBuf, rest: &[Component]| {
        for part in rest {
            match part {
                Component::CurDir => {}
                Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                    out.pop();
                }
                // `..` of the root is the root; of a relative path that cannot be resolved, kept.
                Component::ParentDir if out.has_root() => {}
                other => out.push(other),
            }
        }
        out
    };
    for existing in (0..=parts.len()).rev() {
        let prefix: PathBuf = parts[..existing].iter().collect();
        let probe = if prefix.as_os_str().is_empty() { Path::new(".") } else { prefix.as_path() };
        if let Ok(out) = std::fs::canonicalize(probe) {
            return lexical(out, &parts[existing..]);
        }
        if let (Ok(target), true) = (std::fs::read_link(probe), hops_left > 0) {
            let target = probe.parent().unwrap_or(Path::new("")).join(target);
            let rest: PathBuf = parts[existing..].iter().collect();
            return canonical_path_within(&target.join(rest), hops_left - 1);
        }
    }
    lexical(PathBuf::new(), &parts)
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("'{name}' must be 1 to 64 characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
        return Err(format!("'{name}' may hold only letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

/// An authkey: the file's content, trimmed, at least 16 bytes (a placeholder like "secret"
/// is refused), in a file only its owner can read. One rule for the peer's and the
/// witness's keys, on nodes and witness alike (`metroblk_witness::config::read_authkey`).
/// What the peer links derive their TLS keys for (`metroblk_tls::keys`).
pub const PEER_TLS_LABEL: &str = "metroblk-peer";
pub use metroblk_witness::config::WITNESS_TLS_LABEL;

/// A link section's transport and, for TLS with keys read, its rustls configs. Certificate
/// files are read here, so a bad one is a config error naming its field.
fn link_tls(
    path: &Path,
    raw: RawTls,
    authkey: &[u8],
    label: &str,
    peer_name: &str,
    keys: Keys,
    field: &dyn Fn(&str) -> String,
) -> Result<(Transport, Option<TlsSetup>), ConfigError> {
    let err = |f: &str, message: String| ConfigError { file: path.to_path_buf(), field: field(f), message };
    let transport = match &raw.transport {
        None => Transport::Tcp,
        Some(t) => Transport::parse(t).map_err(|m| err("transport", m))?,
    };
    let r = |p: Option<PathBuf>| p.map(|p| resolve(path, &p));
    let files = (r(raw.tls_cert), r(raw.tls_key), r(raw.tls_ca));
    if transport == Transport::Tcp {
        if files != (None, None, None) {
            return Err(err("tls_cert", "certificates need transport = \"tls\"".into()));
        }
        return Ok((transport, None));
    }
    let tls_keys = TlsKeys::from_fields(authkey, files.0, files.1, files.2).map_err(|(f, m)| err(f, m))?;
    let setup = match keys {
        Keys::Skip => None,
        Keys::Read => Some(TlsSetup::new(&tls_keys, label, peer_name).map_err(|m| err("tls_cert", m))?),
    };
    Ok((transport, setup))
}

fn read_authkey(path: &Path) -> Result<Vec<u8>, String> {
    metroblk_witness::config::read_authkey(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_key(dir: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(dir.join("key"), "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(dir.join("key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn good(dir: &Path) -> String {
        write_key(dir);
        r#"
[node]
name = "alpha"
control_socket = "alpha.sock"

[[volume]]
name = "vol0"
size = "64MiB"
backing_file = "vol0.img"
metadata_file = "vol0.meta"
listen = "127.0.0.1:7789"
role = "primary"
[volume.peer]
name = "beta"
address = "127.0.0.1:7790"
authkey_file = "key"
"#
        .to_string()
    }

    #[test]
    fn parses_a_good_config_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alpha.toml");
        let c = NodeConfig::parse(&path, &good(dir.path())).unwrap();
        let v = &c.volumes[0];
        assert_eq!(v.size, 64 << 20);
        assert_eq!(v.region_size, 64 << 10);
        assert_eq!(v.block_size, 512);
        assert_eq!(v.depth, 128);
        assert_eq!(v.queue_affinity, QueueAffinity::SingleCpu);
        assert_eq!(v.payload_checksum, PayloadChecksum::Crc32c);
        let unchecked =
            good(dir.path()).replace("role = \"primary\"", "role = \"primary\"\npayload_checksum = \"none\"");
        assert_eq!(NodeConfig::parse(&path, &unchecked).unwrap().volumes[0].payload_checksum, PayloadChecksum::None);
        assert_eq!(v.backing_file, dir.path().join("vol0.img"));
        let spread =
            good(dir.path()).replace("role = \"primary\"", "role = \"primary\"\nqueue_affinity = \"queue-cpus\"");
        assert_eq!(NodeConfig::parse(&path, &spread).unwrap().volumes[0].queue_affinity, QueueAffinity::QueueCpus);
        assert_eq!(v.io_scheduler.as_deref(), Some("none"));
        for (text, want) in [("kernel", None), ("mq-deadline", Some("mq-deadline"))] {
            let c = good(dir.path())
                .replace("role = \"primary\"", &format!("role = \"primary\"\nio_scheduler = \"{text}\""));
            assert_eq!(NodeConfig::parse(&path, &c).unwrap().volumes[0].io_scheduler.as_deref(), want);
        }
        assert_eq!(v.authkey, b"0123456789abcdef0123");
        assert_eq!((c.metrics_listen, c.on_event.as_deref()), (None, None));
        let ops = good(dir.path()).replace(
            "control_socket = \"alpha.sock\"",
            "control_socket = \"alpha.sock\"\nmetrics_listen = \"[::1]:9942\"\non_event = \"logger -t mb\"",
        );
        let o = NodeConfig::parse(&path, &ops).unwrap();
        assert_eq!(o.metrics_listen, Some("[::1]:9942".parse().unwrap()));
        assert_eq!(o.on_event.as_deref(), Some("logger -t mb"));
        // Both nodes derive the same uuid from the name.
        assert_eq!(v.uuid, uuid::Uuid::new_v5(&VOLUME_UUID_NAMESPACE, b"vol0"));
    }

    #[test]
    fn errors_name_file_field_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alpha.toml");
        let cases = [
            ("size = \"64MiB\"", "size = \"1000\"", "volume[0].size: 1000 bytes is not a positive multiple of 4096"),
            ("size = \"64MiB\"", "size = \"12XB\"", "unknown size unit"),
            ("role = \"primary\"", "role = \"boss\"", "unknown variant `boss`"),
            ("listen = \"127.0.0.1:7789\"", "listen = \"nowhere\"", "volume[0].listen: 'nowhere' is not an address"),
            ("authkey_file = \"key\"", "authkey_file = \"nokey\"", "volume[0].peer.authkey_file: cannot read"),
            ("role = \"primary\"", "role = \"primary\"\nregion_size = \"3KiB\"", "volume[0].region_size"),
            ("role = \"primary\"", "role = \"primary\"\ncolour = 1", "unknown field `colour`"),
            ("role = \"primary\"", "role = \"primary\"\nqueue_affinity = \"cpu0\"", "unknown variant `cpu0`"),
            (
                "role = \"primary\"",
                "role = \"primary\"\nio_scheduler = \"../none\"",
                "volume[0].io_scheduler: I/O scheduler \"../none\" is not a scheduler's name",
            ),
            ("role = \"primary\"", "role = \"primary\"\npayload_checksum = \"md5\"", "unknown variant `md5`"),
            ("name = \"beta\"", "name = \"alpha\"", "the peer has this node's own name"),
            (
                "control_socket = \"alpha.sock\"",
                "control_socket = \"alpha.sock\"\nmetrics_listen = \"localhost\"",
                "node.metrics_listen: 'localhost' is not an address",
            ),
        ];
        for (from, to, want) in cases {
            let text = good(dir.path()).replace(from, to);
            let e = NodeConfig::parse(&path, &text).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
            assert!(e.starts_with(&path.display().to_string()), "{e}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }

    #[test]
    fn transport_tls_derives_keys_from_the_authkey_or_takes_all_three_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alpha.toml");
        let p = &NodeConfig::parse(&path, &good(dir.path())).unwrap().volumes[0];
        assert_eq!(p.peer.as_ref().unwrap().transport, Transport::Tcp, "the default");
        let tls = good(dir.path()).replace("authkey_file = \"key\"", "authkey_file = \"key\"\ntransport = \"tls\"");
        let c = NodeConfig::parse(&path, &tls).unwrap();
        let peer = c.volumes[0].peer.as_ref().unwrap();
        assert_eq!(peer.transport, Transport::Tls);
        assert!(peer.tls.is_some());
        assert!(NodeConfig::parse_with(&path, &tls, Keys::Skip).unwrap().volumes[0]
            .peer
            .as_ref()
            .unwrap()
            .tls
            .is_none());
        let cases = [
            ("transport = \"tls\"", "transport = \"ssl\"", "volume[0].peer.transport: 'ssl' is not a transport"),
            (
                "transport = \"tls\"",
                "transport = \"tls\"\ntls_cert = \"c.pem\"",
                "volume[0].peer.tls_key: set tls_cert",
            ),
            ("transport = \"tls\"", "tls_cert = \"c.pem\"", "volume[0].peer.tls_cert: certificates need transport"),
            (
                "transport = \"tls\"",
                "transport = \"tls\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\ntls_ca = \"ca.pem\"",
                "volume[0].peer.tls_cert: ",
            ),
        ];
        for (from, to, want) in cases {
            let e = NodeConfig::parse(&path, &tls.replace(from, to)).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }

    #[test]
    fn a_primary_without_peer_is_standalone_and_a_secondary_needs_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alpha.toml");
        let text = good(dir.path());
        let solo = &text[..text.find("[volume.peer]").unwrap()];
        let c = NodeConfig::parse(&path, solo).unwrap();
        assert!(c.volumes[0].peer.is_none() && c.volumes[0].authkey.is_empty());
        let e = NodeConfig::parse(&path, &solo.replace("\"primary\"", "\"secondary\"")).unwrap_err().to_string();
        assert!(e.contains("volume[0].peer: a secondary needs"), "{e}");
    }

    #[test]
    fn a_witness_section_sets_fencing_lease_and_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alpha.toml");
        let with = |extra: &str, witness: &str| {
            good(dir.path()).replace("role = \"primary\"", &format!("role = \"primary\"\n{extra}"))
                + &format!("[volume.witness]\naddress = \"10.0.0.9\"\nauthkey_file = \"key\"\n{witness}")
        };
        let c = NodeConfig::parse(&path, &with("", "")).unwrap();
        let v = &c.volumes[0];
        let w = v.witness.as_ref().unwrap();
        assert_eq!((v.fencing, v.on_fence), (Fencing::Witness, OnFence::Suspend));
        assert_eq!((w.address.port(), w.lease, w.drift_ppm), (9095, WITNESS_LEASE_DEFAULT, 10_000));
        assert_eq!(v.out_of_sync_alert, OUT_OF_SYNC_ALERT_DEFAULT);
        let c =
            NodeConfig::parse(&path, &with("on-fence = \"io-error\"\nout_of_sync_alert_s = 5", "lease = \"1500ms\""))
                .unwrap();
        let v = &c.volumes[0];
        assert_eq!((v.on_fence, v.out_of_sync_alert), (OnFence::IoError, std::time::Duration::from_secs(5)));
        assert_eq!(v.witness.as_ref().unwrap().lease, std::time::Duration::from_millis(1500));
        let c = NodeConfig::parse(&path, &with("", "lease = 3")).unwrap();
        assert_eq!(c.volumes[0].witness.as_ref().unwrap().lease, std::time::Duration::from_secs(3));
        for (extra, witness, want) in [
            ("", "lease_ms = 100", "volume[0].witness.lease_ms: 100 ms is not between"),
            ("", "lease_ms = 5000\nlease = \"5s\"", "volume[0].witness.lease: set lease or lease_ms"),
            ("", "lease = \"5 parsecs\"", "unknown duration unit"),
            ("", "drift_ppm = 500000", "volume[0].witness.drift_ppm"),
        ] {
            let e = NodeConfig::parse(&path, &with(extra, witness)).unwrap_err().to_string();
            assert!(e.contains(want) && !e.contains('\n'), "{e:?} should contain {want:?}");
        }
        let e = NodeConfig::parse(
            &path,
            &good(dir.path()).replace("role = \"primary\"", "role = \"primary\"\nfencing = \"witness\""),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("volume[0].fencing: \"witness\" needs a [volume.witness] section"), "{e}");
    }

    #[test]
    fn short_authkey_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alpha.toml");
        let text = good(dir.path());
        std::fs::write(dir.path().join("key"), "secret").unwrap();
        let e = NodeConfig::parse(&path, &text).unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn a_key_readable_by_others_is_refused_and_status_needs_no_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alpha.toml");
        let text = good(dir.path());
        std::fs::set_permissions(dir.path().join("key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = NodeConfig::parse(&path, &text).unwrap_err().to_string();
        assert!(
            e.contains("volume[0].peer.authkey_file:") && e.contains("(mode 0644)") && e.contains("chmod 600"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        // `status` reads no key: it works with an unreadable or missing key file.
        std::fs::remove_file(dir.path().join("key")).unwrap();
        let c = NodeConfig::parse_with(&path, &text, Keys::Skip).unwrap();
        assert!(c.volumes[0].authkey.is_empty());
    }

    /// `good` plus a standalone volume 'vol1' on the given files and listen address, with
    /// `extra0` and `extra1` added to vol0's and vol1's tables.
    fn two_volumes(dir: &Path, extra0: &str, backing: &str, meta: &str, listen: &str, extra1: &str) -> String {
        let base = good(dir).replace("role = \"primary\"", &format!("role = \"primary\"\n{extra0}"));
        format!(
            "{base}\n[[volume]]\nname = \"vol1\"\nsize = \"64MiB\"\nbacking_file = \"{backing}\"\n\
             metadata_file = \"{meta}\"\nlisten = \"{listen}\"\nrole = \"primary\"\n{extra1}\n"
        )
    }

    /// A refusal: one line in the `FILE: FIELD: problem` form that names `field` and every one
    /// of `names` (quoted, as the messages quote volumes and groups).
    fn refused(path: &Path, text: &str, field: &str, names: &[&str]) -> String {
        let e = NodeConfig::parse(path, text).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: {field}: ", path.display())), "{e:?} should be about {field}");
        for name in names {
            assert!(e.contains(&format!("'{name}'")), "{e:?} should name '{name}'");
        }
        assert!(!e.contains('\n'), "one line: {e:?}");
        e
    }

    #[test]
    fn two_volumes_may_not_share_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let path = d.join("alpha.toml");
        let vol1 = |backing: &str, meta: &str| two_volumes(d, "", backing, meta, "127.0.0.1:7791", "");
        assert_eq!(NodeConfig::parse(&path, &vol1("vol1.img", "vol1.meta")).unwrap().volumes.len(), 2);
        let show = |name: &str| d.join(name).display().to_string();
        let e = refused(&path, &vol1("vol0.img", "vol1.meta"), "volume[1].backing_file", &["vol1", "vol0"]);
        assert!(e.ends_with(&format!("is the same file as {}, the backing_file of volume 'vol0'", show("vol0.img"))));
        let e = refused(&path, &vol1("vol0.meta", "vol1.meta"), "volume[1].backing_file", &["vol1", "vol0"]);
        assert!(e.contains("the metadata_file of volume 'vol0'"), "{e}");
        let e = refused(&path, &vol1("vol1.img", "vol0.meta"), "volume[1].metadata_file", &["vol1", "vol0"]);
        assert!(e.contains("the metadata_file of volume 'vol0'"), "{e}");
        let e = refused(&path, &vol1("vol1.img", "vol0.img"), "volume[1].metadata_file", &["vol1", "vol0"]);
        assert!(e.contains("the backing_file of volume 'vol0'"), "{e}");
        // None of the files exists yet: `.` and `..` are taken lexically, and a directory on
        // the way is canonicalised (here a symlink to the config's own directory).
        std::fs::create_dir(d.join("sub")).unwrap();
        std::os::unix::fs::symlink(d, d.join("here")).unwrap();
        for alias in ["./vol0.img", "sub/../vol0.img", "sub/./../vol0.img", "here/vol0.img", "nodir/../vol0.img"] {
            refused(&path, &vol1(alias, "vol1.meta"), "volume[1].backing_file", &["vol1", "vol0"]);
        }
        let absolute = show("sub/../vol0.meta");
        refused(&path, &vol1(&absolute, "vol1.meta"), "volume[1].backing_file", &["vol1", "vol0"]);
        // A symlink to a file that does not exist yet: creating one creates the other.
        std::os::unix::fs::symlink("vol0.meta", d.join("dangling")).unwrap();
        refused(&path, &vol1("vol1.img", "dangling"), "volume[1].metadata_file", &["vol1", "vol0"]);
        // Files that exist: a symlink, a hard link, `..` after a symlinked directory (which is
        // the parent of the link's target, not the link's own directory).
        std::fs::write(d.join("vol0.img"), b"").unwrap();
        std::fs::write(d.join("vol0.meta"), b"").unwrap();
        std::os::unix::fs::symlink(d.join("vol0.img"), d.join("link.img")).unwrap();
        std::fs::hard_link(d.join("vol0.meta"), d.join("hard.meta")).unwrap();
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::os::unix::fs::symlink(d.join("a/b"), d.join("sub/to-b")).unwrap();
        std::fs::write(d.join("a/x.img"), b"").unwrap();
        refused(&path, &vol1("link.img", "vol1.meta"), "volume[1].backing_file", &["vol1", "vol0"]);
        refused(&path, &vol1("vol1.img", "hard.meta"), "volume[1].metadata_file", &["vol1", "vol0"]);
        refused(&path, &vol1("hard.meta", "vol1.meta"), "volume[1].backing_file", &["vol1", "vol0"]);
        let clash = format!("{}\n", vol1("a/x.img", "vol1.meta"))
            + "[[volume]]\nname = \"vol2\"\nsize = \"64MiB\"\nbacking_file = \"sub/to-b/../x.img\"\n\
               metadata_file = \"vol2.meta\"\nlisten = \"127.0.0.1:7792\"\nrole = \"primary\"\n";
        refused(&path, &clash, "volume[2].backing_file", &["vol2", "vol1"]);
        // `sub/to-b/../vol1.img` is `a/vol1.img`, not `sub/vol1.img`.
        assert!(NodeConfig::parse(&path, &vol1("sub/to-b/../vol1.img", "sub/vol1.img")).is_ok());
        // One volume's own data and metadata, by path or through a link.
        let e = NodeConfig::parse(&path, &vol1("vol1.img", "vol1.img")).unwrap_err().to_string();
        assert!(e.contains("volume[1].metadata_file: is the same file as backing_file"), "{e}");
        let e = NodeConfig::parse(&path, &vol1("link.img", "vol0.img")).unwrap_err().to_string();
        assert!(e.contains("volume[1].metadata_file: is the same file as backing_file"), "{e}");
    }

    #[test]
    fn two_volumes_may_not_share_a_listen_port_on_colliding_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let path = d.join("alpha.toml");
        let listens =
            |l0: &str, l1: &str| two_volumes(d, "", "vol1.img", "vol1.meta", l1, "").replacen("127.0.0.1:7789", l0, 1);
        for (l0, l1) in [
            ("127.0.0.1:7789", "127.0.0.1:7789"),
            ("0.0.0.0:7789", "127.0.0.1:7789"),
            ("127.0.0.1:7789", "0.0.0.0:7789"),
            ("0.0.0.0:7789", "0.0.0.0:7789"),
            // Dual-stack: `[::]` takes the port on IPv4 addresses too.
            ("[::]:7789", "10.0.0.1:7789"),
            ("10.0.0.1:7789", "[::]:7789"),
            ("0.0.0.0:7789", "[::1]:7789"),
            ("[::]:7789", "0.0.0.0:7789"),
            ("[::1]:7789", "[::1]:7789"),
            ("[::ffff:127.0.0.1]:7789", "127.0.0.1:7789"),
        ] {
            let e = refused(&path, &listens(l0, l1), "volume[1].listen", &["vol1", "vol0"]);
            assert!(e.contains(&format!("collides with {}", l0.parse::<SocketAddr>().unwrap())), "{e}");
        }
        let e = refused(&path, &listens("0.0.0.0:7789", "127.0.0.1:7789"), "volume[1].listen", &["vol1", "vol0"]);
        assert!(e.ends_with("(a wildcard address takes its port on every address)"), "{e}");
        for (l0, l1) in [
            ("127.0.0.1:7789", "127.0.0.1:7791"),
            ("0.0.0.0:7789", "0.0.0.0:7791"),
            ("[::]:7789", "127.0.0.1:7791"),
            ("127.0.0.1:7789", "127.0.0.2:7789"),
            ("10.0.0.1:7789", "[fd00::1]:7789"),
            ("[::1]:7789", "[fd00::1]:7789"),
        ] {
            assert!(NodeConfig::parse(&path, &listens(l0, l1)).is_ok(), "{l0} and {l1} should both bind");
        }
    }

    #[test]
    fn two_volumes_may_not_share_an_explicit_ublk_id_or_a_uuid() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let path = d.join("alpha.toml");
        let extras = |e0: &str, e1: &str| two_volumes(d, e0, "vol1.img", "vol1.meta", "127.0.0.1:7791", e1);
        let e = refused(&path, &extras("ublk_id = 3", "ublk_id = 3"), "volume[1].ublk_id", &["vol1", "vol0"]);
        assert!(e.contains("3 of volume 'vol1' is already the ublk_id of volume 'vol0'"), "{e}");
        for (e0, e1) in
            [("ublk_id = 0", "ublk_id = 1"), ("ublk_id = -1", "ublk_id = -1"), ("", ""), ("ublk_id = -1", "")]
        {
            let c = NodeConfig::parse(&path, &extras(e0, e1)).unwrap();
            assert_eq!(c.volumes.len(), 2, "{e0:?} and {e1:?}");
        }
        let same = "uuid = \"1b4e28ba-2fa1-11d2-883f-0016d3cca427\"";
        let e = refused(&path, &extras(same, same), "volume[1].uuid", &["vol1", "vol0"]);
        assert!(e.ends_with("is already the uuid of volume 'vol0'"), "{e}");
        // An explicit uuid that repeats another volume's derived one.
        let derived = format!("uuid = \"{}\"", uuid::Uuid::new_v5(&VOLUME_UUID_NAMESPACE, b"vol0"));
        let e = refused(&path, &extras("", &derived), "volume[1].uuid", &["vol1", "vol0"]);
        assert!(e.ends_with("(derived from its name)"), "{e}");
        assert!(NodeConfig::parse(&path, &extras(same, "")).is_ok());
    }

    #[test]
    fn groups_parse_and_name_the_group_of_each_volume() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let path = d.join("alpha.toml");
        let vol2 = "[[volume]]\nname = \"vol2\"\nsize = \"64MiB\"\nbacking_file = \"vol2.img\"\n\
                    metadata_file = \"vol2.meta\"\nlisten = \"127.0.0.1:7792\"\nrole = \"primary\"\n\
                    [volume.peer]\nname = \"beta\"\naddress = \"127.0.0.1:7793\"\nauthkey_file = \"key\"\n";
        let with = |groups: &str| {
            format!("{}{vol2}\n{groups}", two_volumes(d, "", "vol1.img", "vol1.meta", "127.0.0.1:7791", ""))
        };
        let c = NodeConfig::parse(&path, &with("")).unwrap();
        assert!(c.groups.is_empty());
        assert_eq!(c.group_of("vol0"), "vol0");
        let c = NodeConfig::parse(&path, &with("[[group]]\nname = \"db\"\nvolumes = [\"vol0\", \"vol2\"]\n")).unwrap();
        let groups = c.role_groups();
        let names: Vec<(&str, Vec<&str>)> =
            groups.iter().map(|g| (g.name.as_str(), g.volumes.iter().map(|v| v.name.as_str()).collect())).collect();
        assert_eq!(names, [("db", vec!["vol0", "vol2"]), ("vol1", vec!["vol1"])]);
        assert_eq!(groups[1].uuid, c.volumes[1].uuid, "a lone volume keeps its own witness record");
        assert_ne!(groups[0].uuid, c.volumes[0].uuid);
        // A group changes role between the same two nodes: vol1 has no peer.
        let e = refused(
            &path,
            &with("[[group]]\nname = \"db\"\nvolumes = [\"vol0\", \"vol1\"]\n"),
            "group[0].volumes",
            &["vol0", "vol1"],
        );
        assert!(e.contains("different peer settings"), "{e}");
        assert_eq!(c.groups, [GroupConfig { name: "db".into(), volumes: vec!["vol0".into(), "vol2".into()] }]);
        assert_eq!(
            (c.group_of("vol0"), c.group_of("vol1"), c.group_of("vol2")),
            ("db".into(), "vol1".into(), "db".into())
        );
        // A group named after its only volume is the same as none.
        let c = NodeConfig::parse(
            &path,
            &with("[[group]]\nname = \"vol1\"\nvolumes = [\"vol1\"]\n[[group]]\nname = \"db\"\nvolumes = [\"vol0\"]\n"),
        )
        .unwrap();
        assert_eq!(
            (c.group_of("vol0"), c.group_of("vol1"), c.group_of("vol2")),
            ("db".into(), "vol1".into(), "vol2".into())
        );
        let group = |name: &str, volumes: &str| format!("[[group]]\nname = \"{name}\"\nvolumes = [{volumes}]\n");
        for (groups, field, names, want) in [
            (
                group("db", "\"vol0\", \"vol9\""),
                "group[0].volumes",
                ["db", "vol9"],
                "which is not configured on this node",
            ),
            (group("db", ""), "group[0].volumes", ["db", "db"], "group 'db' has no volumes"),
            (group("db", "\"vol0\", \"vol0\""), "group[0].volumes", ["db", "vol0"], "names volume 'vol0' twice"),
            (
                group("db", "\"vol0\"") + &group("web", "\"vol1\", \"vol0\""),
                "group[1].volumes",
                ["web", "db"],
                "volume 'vol0' is in group 'web' and in group 'db'",
            ),
            (
                group("db", "\"vol0\"") + &group("db", "\"vol1\""),
                "group[1].name",
                ["db", "db"],
                "group 'db' is configured twice (as group[0] and group[1])",
            ),
            (
                group("vol0", "\"vol1\""),
                "group[0].name",
                ["vol0", "vol1"],
                "has the name of volume 'vol0' but holds 'vol1'",
            ),
            (
                group("vol0", "\"vol0\", \"vol1\""),
                "group[0].name",
                ["vol0", "vol1"],
                "but holds 'vol0', 'vol1'; a group named after a volume may hold only that volume",
            ),
            (group("a b", "\"vol0\""), "group[0].name", ["a b", "a b"], "may hold only letters"),
        ] {
            let e = refused(&path, &with(&groups), field, &names);
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
        let e = NodeConfig::parse(&path, &with("[[group]]\nname = \"db\"\nvolumes = [\"vol0\"]\nrole = \"primary\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `role`") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn allow_from_defaults_to_the_peer_and_takes_cidr_ranges() {
        use std::net::IpAddr;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alpha.toml");
        let c = NodeConfig::parse(&path, &good(dir.path())).unwrap();
        let allow = &c.volumes[0].peer.as_ref().unwrap().allow_from;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(allow.iter().any(|r| r.contains(ip("127.0.0.1"))));
        assert!(!allow.iter().any(|r| r.contains(ip("127.0.0.2"))));
        let text = good(dir.path())
            .replace("authkey_file = \"key\"", "authkey_file = \"key\"\nallow_from = [\"10.0.0.0/8\", \"192.0.2.7\"]");
        let c = NodeConfig::parse(&path, &text).unwrap();
        let allow = &c.volumes[0].peer.as_ref().unwrap().allow_from;
        assert!(allow.iter().any(|r| r.contains(ip("10.200.3.4"))));
        assert!(allow.iter().any(|r| r.contains(ip("::ffff:10.1.1.1"))));
        assert!(allow.iter().any(|r| r.contains(ip("192.0.2.7"))));
        assert!(!allow.iter().any(|r| r.contains(ip("192.0.2.8")) || r.contains(ip("127.0.0.1"))));
        let bad = good(dir.path())
            .replace("authkey_file = \"key\"", "authkey_file = \"key\"\nallow_from = [\"10.0.0.0/33\"]");
        let e = NodeConfig::parse(&path, &bad).unwrap_err().to_string();
        assert!(e.contains("volume[0].peer.allow_from: '10.0.0.0/33'"), "{e}");
    }
}
