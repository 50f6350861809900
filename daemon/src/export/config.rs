//! `[volume.export]`: how hosts reach the primary's device (design: "Exports").
//!
//! ```toml
//! [volume.export]
//! kind = "iscsi"                  # or "nvme-tcp"
//! address = "192.0.2.50/24"       # the service address the primary holds
//! interface = "eth1"              # where it is added
//! port = 3260                     # default: 3260 (iscsi), 4420 (nvme-tcp)
//! target = "iqn.2024-01.io.metroblk:vol0"   # default: derived from the volume name
//! initiators = ["iqn.1998-01.com.vmware:esx1"]  # default: any initiator
//! chap_user = "esx"               # iSCSI only; with chap_password_file
//! chap_password_file = "chap.secret"
//! ```
//!
//! Both nodes of a volume carry the same section: the target name is the volume's identity
//! towards the hosts, as are the serial numbers derived from its uuid (`identity.rs`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Longest iSCSI name (RFC 3720 3.2.6.1) and NVMe qualified name (NVMe base spec 4.5).
pub const TARGET_NAME_MAX: usize = 223;
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const INTERFACE_NAME_MAX: usize = 15;
/// CHAP secrets: RFC 3720 asks for at least 12 bytes; LIO stores at most 255.
pub const CHAP_SECRET_MIN: usize = 12;
pub const CHAP_SECRET_MAX: usize = 255;
/// The default iSCSI port (RFC 7143) and NVMe/TCP port (NVMe/TCP transport spec).
pub const ISCSI_PORT_DEFAULT: u16 = 3260;
pub const NVME_TCP_PORT_DEFAULT: u16 = 4420;
/// The naming authority of derived target names.
const NAME_AUTHORITY: &str = "2024-01.io.metroblk";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExport {
    kind: ExportKind,
    address: String,
    interface: String,
    port: Option<u16>,
    target: Option<String>,
    #[serde(default)]
    initiators: Vec<String>,
    chap_user: Option<String>,
    chap_password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportKind {
    /// The kernel's LIO target (iscsi_target_mod, target_core_iblock), through configfs.
    Iscsi,
    /// The kernel's NVMe target (nvmet, nvmet-tcp), through configfs.
    NvmeTcp,
}

impl std::fmt::Display for ExportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ExportKind::Iscsi => "iscsi",
            ExportKind::NvmeTcp => "nvme-tcp",
        })
    }
}

/// A validated `[volume.export]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    pub kind: ExportKind,
    /// The service address and its prefix length.
    pub address: IpAddr,
    pub prefix: u8,
    pub interface: String,
    pub port: u16,
    /// The iSCSI target name (IQN) or NVMe subsystem NQN.
    pub target: String,
    /// Allowed initiator IQNs / host NQNs; empty: any.
    pub initiators: Vec<String>,
    pub chap: Option<Chap>,
}

/// iSCSI CHAP credentials (one-way: the target checks the initiator).
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: String,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        write!(f, "Chap {{ user: {:?} }}", self.user)
    }
}

impl ExportConfig {
    /// The service address as `ip` takes it: `ADDR/PREFIX`.
    pub fn address_with_prefix(&self) -> String {
        format!("{}/{}", self.address, self.prefix)
    }
}

/// The target name a volume gets when the config names none: the same on both nodes.
pub fn default_target(kind: ExportKind, volume: &str) -> String {
    // Names are lower case and know no '_' (RFC 3722's stringprep profile, NVMe's NQN rules).
    let name: String = volume.chars().map(|c| if c == '_' { '-' } else { c.to_ascii_lowercase() }).collect();
    match kind {
        ExportKind::Iscsi => format!("iqn.{NAME_AUTHORITY}:{name}"),
        ExportKind::NvmeTcp => format!("nqn.{NAME_AUTHORITY}:{name}"),
    }
}

/// Validates a raw section; `Err((field, problem))` with the field relative to the section.
pub fn parse(raw: RawExport, volume: &str, config_path: &Path) -> Result<ExportConfig, (&'static str, String)> {
    let (address, prefix) = parse_address(&raw.address).map_err(|m| ("address", m))?;
    check_interface(&raw.interface).map_err(|m| ("interface", m))?;
    let port = raw.port.unwrap_or(match raw.kind {
        ExportKind::Iscsi => ISCSI_PORT_DEFAULT,
        ExportKind::NvmeTcp => NVME_TCP_PORT_DEFAULT,
    });
    if port == 0 {
        return Err(("port", "0 is not a port".into()));
    }
    let target = raw.target.unwrap_or_else(|| default_target(raw.kind, volume));
    check_name(raw.kind, &target).map_err(|m| ("target", m))?;
    for i in &raw.initiators {
        check_name(raw.kind, i).map_err(|m| ("initiators", m))?;
    }
    let chap = match (raw.chap_user, raw.chap_password_file) {
        (None, None) => None,
        (Some(_), Some(_)) if raw.kind != ExportKind::Iscsi => {
            return Err(("chap_user", "CHAP is for kind = \"iscsi\" only".into()))
        }
        (Some(user), Some(file)) => {
            if user.is_empty() || user.len() > CHAP_SECRET_MAX || user.chars().any(|c| c.is_whitespace()) {
                return Err((
                    "chap_user",
                    format!("'{user}' must be 1 to {CHAP_SECRET_MAX} characters without spaces"),
                ));
            }
            let file =
                if file.is_relative() { config_path.parent().unwrap_or(Path::new(".")).join(file) } else { file };
            let secret = read_secret(&file).map_err(|m| ("chap_password_file", m))?;
            Some(Chap { user, secret })
        }
        (Some(_), None) => return Err(("chap_password_file", "chap_user needs chap_password_file".into())),
        (None, Some(_)) => return Err(("chap_user", "chap_password_file needs chap_user".into())),
    };
    Ok(ExportConfig {
        kind: raw.kind,
        address,
        prefix,
        interface: raw.interface,
        port,
        target,
        initiators: raw.initiators,
        chap,
    })
}

fn parse_address(s: &str) -> Result<(IpAddr, u8), String> {
    let (ip, prefix) = s.split_once('/').ok_or_else(|| format!("'{s}' is not ADDRESS/PREFIX like 192.0.2.50/24"))?;
    let ip: IpAddr = ip.parse().map_err(|_| format!("'{ip}' is not an IP address"))?;
    let prefix: u8 = prefix.parse().map_err(|_| format!("'{prefix}' is not a prefix length"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix == 0 || prefix > max {
        return Err(format!("prefix length {prefix} is not between 1 and {max}"));
    }
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return Err(format!("{ip} cannot be a service address"));
    }
    Ok((ip, prefix))
}

fn check_interface(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > INTERFACE_NAME_MAX
        || name == "."
        || name == ".."
        || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "'{name}' is not an interface name (1 to {INTERFACE_NAME_MAX} characters, no '/', ':' or spaces)"
        ));
    }
    Ok(())
}

/// An IQN/EUI/NAA name for iSCSI, an NQN for NVMe: lower case, no spaces, no '/' (they are
/// configfs directory names).
fn check_name(kind: ExportKind, name: &str) -> Result<(), String> {
    let prefixes: &[&str] = match kind {
        ExportKind::Iscsi => &["iqn.", "eui.", "naa."],
        ExportKind::NvmeTcp => &["nqn."],
    };
    if !prefixes.iter().any(|p| name.starts_with(p)) {
        return Err(format!("'{name}' does not start with {}", prefixes.join(" or ")));
    }
    if name.len() > TARGET_NAME_MAX {
        return Err(format!("'{name}' is longer than {TARGET_NAME_MAX} characters"));
    }
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | ':');
    let ok_nvme = |c: char| ok(c) || (kind == ExportKind::NvmeTcp && c.is_ascii_uppercase());
    if !name.chars().all(ok_nvme) {
        return Err(format!("'{name}' may hold only lower-case letters, digits, '.', '-' and ':'"));
    }
    Ok(())
}

fn read_secret(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!("{} is readable by others (chmod 600 it)", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let secret = text.trim().to_string();
    if secret.len() < CHAP_SECRET_MIN || secret.len() > CHAP_SECRET_MAX || secret.chars().any(|c| c.is_whitespace()) {
        return Err(format!(
            "{}: the CHAP secret must be {CHAP_SECRET_MIN} to {CHAP_SECRET_MAX} characters without spaces",
            path.display()
        ));
    }
    Ok(secret)
}

/// Checks across the node's volumes: two exports never share a service address or a target
/// name (each volume's export comes and goes with its own group's role). `exports` holds
/// (volume name, export) in config order; returns (index into `exports`, problem).
pub fn check_distinct(exports: &[(&str, &ExportConfig)]) -> Result<(), (usize, String)> {
    for (i, (name, e)) in exports.iter().enumerate() {
        for (o_name, o) in &exports[..i] {
            if o.address == e.address {
                return Err((
                    i,
                    format!(
                        "address {} of volume '{name}' is already the export address of volume '{o_name}'",
                        e.address
                    ),
                ));
            }
            if o.target == e.target {
                return Err((
                    i,
                    format!("target {} of volume '{name}' is already the target of volume '{o_name}'", e.target),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawExport {
        toml::from_str(text).unwrap()
    }

    fn parse_text(text: &str) -> Result<ExportConfig, (&'static str, String)> {
        parse(raw(text), "vol_0", Path::new("/etc/metroblk/node.toml"))
    }

    #[test]
    fn defaults_derive_the_target_and_port() {
        let e = parse_text("kind = \"iscsi\"\naddress = \"192.0.2.50/24\"\ninterface = \"eth1\"").unwrap();
        assert_eq!(e.target, "iqn.2024-01.io.metroblk:vol-0");
        assert_eq!(e.port, 3260);
        assert_eq!(e.address_with_prefix(), "192.0.2.50/24");
        assert!(e.initiators.is_empty() && e.chap.is_none());
        let n = parse_text("kind = \"nvme-tcp\"\naddress = \"2001:db8::5/64\"\ninterface = \"eth1\"").unwrap();
        assert_eq!(n.target, "nqn.2024-01.io.metroblk:vol-0");
        assert_eq!(n.port, 4420);
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("kind = \"iscsi\"\naddress = \"192.0.2.50\"\ninterface = \"eth1\"", "address"),
            ("kind = \"iscsi\"\naddress = \"192.0.2.50/33\"\ninterface = \"eth1\"", "address"),
            ("kind = \"iscsi\"\naddress = \"127.0.0.1/8\"\ninterface = \"eth1\"", "address"),
            ("kind = \"iscsi\"\naddress = \"192.0.2.50/24\"\ninterface = \"a/b\"", "interface"),
            ("kind = \"iscsi\"\naddress = \"192.0.2.50/24\"\ninterface = \"averyveryverylongname\"", "interface"),
            ("kind = \"iscsi\"\naddress = \"192.0.2.50/24\"\ninterface = \"eth1\"\nport = 0", "port"),
            ("kind = \"iscsi\"\naddress = \"192.0.2.50/24\"\ninterface = \"eth1\"\ntarget = \"nqn.x:y\"", "target"),
            ("kind = \"iscsi\"\naddress = \"192.0.2.50/24\"\ninterface = \"eth1\"\ntarget = \"iqn.x:Y\"", "target"),
            ("kind = \"nvme-tcp\"\naddress = \"192.0.2.50/24\"\ninterface = \"eth1\"\ntarget = \"iqn.x:y\"", "target"),
            (
                "kind = \"iscsi\"\naddress = \"192.0.2.50/24\"\ninterface = \"eth1\"\ninitiators = [\"iqn.a\", \"x\"]",
                "initiators",
            ),
            ("kind = \"iscsi\"\naddress = \"192.0.2.50/24\"\ninterface = \"eth1\"\nchap_user = \"u\"", "chap_password_file"),
            (
                "kind = \"nvme-tcp\"\naddress = \"192.0.2.50/24\"\ninterface = \"eth1\"\nchap_user = \"u\"\nchap_password_file = \"p\"",
                "chap_user",
            ),
        ];
        for (text, field) in cases {
            let e = parse_text(text).unwrap_err();
            assert_eq!(e.0, field, "{text}: {}", e.1);
        }
    }

    #[test]
    fn chap_secret_comes_from_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("chap");
        std::fs::write(&file, "a-secret-of-16ch\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = "kind = \"iscsi\"\naddress = \"192.0.2.50/24\"\ninterface = \"eth1\"\nchap_user = \"esx\"\nchap_password_file = \"chap\"";
        let config = dir.path().join("node.toml");
        let e = parse(raw(text), "v", &config).unwrap_err();
        assert!(e.0 == "chap_password_file" && e.1.contains("readable by others"), "{e:?}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = parse(raw(text), "v", &config).unwrap();
        let chap = e.chap.unwrap();
        assert_eq!((chap.user.as_str(), chap.secret.as_str()), ("esx", "a-secret-of-16ch"));
        assert!(!format!("{chap:?}").contains("secret-of"), "Debug never shows the secret");
        std::fs::write(&file, "short\n").unwrap();
        assert_eq!(parse(raw(text), "v", &config).unwrap_err().0, "chap_password_file");
    }

    #[test]
    fn two_exports_never_share_an_address_or_a_target() {
        let a = parse_text("kind = \"iscsi\"\naddress = \"192.0.2.50/24\"\ninterface = \"eth1\"").unwrap();
        let mut b = a.clone();
        b.target = default_target(ExportKind::Iscsi, "other");
        assert!(check_distinct(&[("a", &a), ("b", &b)]).unwrap_err().1.contains("address"));
        b.address = "192.0.2.51".parse().unwrap();
        assert!(check_distinct(&[("a", &a), ("b", &b)]).is_ok());
        b.target = a.target.clone();
        assert_eq!(check_distinct(&[("a", &a), ("b", &b)]).unwrap_err().0, 1);
    }
}
