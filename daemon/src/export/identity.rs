//! One identity on both nodes, derived from the volume uuid (design: "Exports").
//!
//! A host keys a LUN or namespace on ids that must not change when the volume fails over:
//! ESXi mounts a VMFS datastore only on the NAA it was created on (another NAA is a snapshot
//! LUN to it), and Linux drops a namespace whose NGUID/UUID changed. Both nodes compute these
//! from the same config (uuid, target name), never from anything local, so the node that
//! takes over presents the same ids as the one before.
//!
//! - SCSI (LIO): `vpd_unit_serial` is the uuid's 32 hex digits (VPD page 0x80). LIO derives
//!   the NAA designator of page 0x83 from it: `6` + the company id (LIO's default OUI
//!   `001405`) + the serial's first 25 hex digits ([`ScsiIdentity::naa`]). Vendor and
//!   product ids, LUN 0, TPG tag 1 and relative target port id 1 are fixed.
//! - NVMe (nvmet): the subsystem serial is the uuid's first 20 hex digits (the field is 20
//!   bytes), the namespace's NGUID and UUID are the volume uuid, the namespace id is 1. The
//!   controller ids of the two nodes come from disjoint ranges: a host that sees the same
//!   cntlid twice in one subsystem treats the second controller as a duplicate.

use crate::config::VolumeConfig;

/// What INQUIRY reports as vendor (8 bytes), product (16) and revision (4).
pub const SCSI_VENDOR: &str = "METROBLK";
pub const SCSI_PRODUCT: &str = "metroblk";
pub const SCSI_REVISION: &str = "1";
/// LIO's default IEEE company id, the one its NAA designators carry.
pub const LIO_COMPANY_ID: &str = "001405";
/// The one LUN, TPG tag and relative target port of a volume's target.
pub const LUN: u32 = 0;
pub const TPG_TAG: u16 = 1;
pub const RELATIVE_PORT_ID: u16 = 1;
/// NVMe: the one namespace, and the model string.
pub const NVME_NSID: u32 = 1;
pub const NVME_MODEL: &str = "metroblk";
/// Valid controller ids are 1..=0xffef (0xfff0.. are reserved).
pub const NVME_CNTLID_MAX: u16 = 0xffef;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiIdentity {
    pub unit_serial: String,
}

impl ScsiIdentity {
    pub fn of(uuid: uuid::Uuid) -> ScsiIdentity {
        ScsiIdentity { unit_serial: uuid.simple().to_string() }
    }

    /// The NAA IEEE Registered Extended designator LIO builds from the serial (page 0x83),
    /// as `sg_vpd` prints it after `0x`.
    pub fn naa(&self) -> String {
        let digits: String = self.unit_serial.chars().filter(|c| c.is_ascii_hexdigit()).take(25).collect();
        format!("6{LIO_COMPANY_ID}{digits:0<25}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeIdentity {
    pub serial: String,
    /// Both as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, what nvmet's configfs takes.
    pub nguid: String,
    pub ns_uuid: String,
    pub cntlid_min: u16,
    pub cntlid_max: u16,
}

impl NvmeIdentity {
    /// `node_index`: this node's place in the pair ([`node_index`]).
    pub fn of(uuid: uuid::Uuid, node_index: u8) -> NvmeIdentity {
        let (cntlid_min, cntlid_max) = cntlid_range(node_index);
        NvmeIdentity {
            serial: uuid.simple().to_string()[..20].to_string(),
            nguid: uuid.hyphenated().to_string(),
            ns_uuid: uuid.hyphenated().to_string(),
            cntlid_min,
            cntlid_max,
        }
    }
}

/// The node's place in the volume's pair: 0 for the name that sorts first, 1 for the other
/// (both nodes agree without talking); a volume without a peer is 0.
pub fn node_index(cfg: &VolumeConfig, node_name: &str) -> u8 {
    match &cfg.peer {
        Some(p) if p.name.as_str() < node_name => 1,
        _ => 0,
    }
}

/// The half of the controller id space of node `index` (0 or 1).
pub fn cntlid_range(index: u8) -> (u16, u16) {
    let half = NVME_CNTLID_MAX / 2;
    if index == 0 {
        (1, half)
    } else {
        (half + 1, NVME_CNTLID_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "6d657472-6f62-6c6b-0001-0123456789ab";

    #[test]
    fn scsi_serial_and_naa_come_from_the_uuid() {
        let id = ScsiIdentity::of(UUID.parse().unwrap());
        assert_eq!(id.unit_serial, "6d6574726f626c6b00010123456789ab");
        // 6, company id 001405, then the serial's first 25 hex digits.
        assert_eq!(id.naa(), "60014056d6574726f626c6b000101234");
        assert_eq!(id.naa().len(), 32, "an NAA IEEE Registered Extended designator is 16 bytes");
    }

    #[test]
    fn nvme_ids_come_from_the_uuid_and_controller_ids_are_disjoint() {
        let a = NvmeIdentity::of(UUID.parse().unwrap(), 0);
        let b = NvmeIdentity::of(UUID.parse().unwrap(), 1);
        assert_eq!(a.serial, "6d6574726f626c6b0001");
        assert_eq!(a.nguid, UUID);
        assert_eq!((a.serial.clone(), a.nguid.clone(), a.ns_uuid.clone()), (b.serial, b.nguid, b.ns_uuid));
        assert!(a.cntlid_min >= 1 && a.cntlid_min <= a.cntlid_max);
        assert!(a.cntlid_max < b.cntlid_min && b.cntlid_max == NVME_CNTLID_MAX);
    }

    #[test]
    fn both_nodes_agree_on_their_places() {
        let text = |node: &str, peer: &str| {
            format!(
                "[node]\nname = \"{node}\"\ncontrol_socket = \"/run/x.sock\"\n[[volume]]\nname = \"v\"\nsize = \"1MiB\"\n\
                 backing_file = \"/tmp/b\"\nmetadata_file = \"/tmp/m\"\nlisten = \"127.0.0.1:7000\"\nrole = \"primary\"\n\
                 [volume.peer]\nname = \"{peer}\"\naddress = \"127.0.0.1:7001\"\nauthkey_file = \"/nonexistent\"\n"
            )
        };
        let keys = crate::config::Keys::Skip;
        let a = crate::config::NodeConfig::parse_with(std::path::Path::new("/a.toml"), &text("alpha", "beta"), keys)
            .unwrap();
        let b = crate::config::NodeConfig::parse_with(std::path::Path::new("/b.toml"), &text("beta", "alpha"), keys)
            .unwrap();
        assert_eq!(node_index(&a.volumes[0], "alpha"), 0);
        assert_eq!(node_index(&b.volumes[0], "beta"), 1);
    }
}
