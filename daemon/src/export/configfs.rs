//! The kernel targets through configfs: LIO (`target/`: iblock storage object, iSCSI target,
//! portal group, LUN, ACLs, network portal) and nvmet (`nvmet/`: subsystem, namespace,
//! allowed hosts, port). One function adds a [`Part`], one removes it; removing what is not
//! there succeeds, so a tear-down can run over a half-built or a stale export.
//!
//! Names: the storage object is `<node>-<volume>` (this node's own); the target is the
//! configured IQN/NQN, the same on both nodes. configfs is one per kernel: when the target's
//! directory exists and this node did not make it, adding it reports [`AddError::Busy`] and
//! the caller waits (two nodes in one kernel, as in the tests, hand over in strict order).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::config::{ExportConfig, ExportKind};
use super::identity::{self, NvmeIdentity, ScsiIdentity};
use super::Part;

/// Where configfs is mounted.
pub const CONFIGFS_ROOT: &str = "/sys/kernel/config";
/// The LIO HBA our storage objects live in.
const IBLOCK_HBA: &str = "iblock_0";

/// Everything a step needs: the export's config, its identity and its names.
#[derive(Debug, Clone)]
pub struct Plan {
    pub root: PathBuf,
    pub export: ExportConfig,
    /// The storage object's name, this node's own.
    pub store_name: String,
    pub scsi: ScsiIdentity,
    pub nvme: NvmeIdentity,
    /// nvmet's port id, this node's own (ports are numbered, one per kernel).
    pub nvme_port: u16,
}

#[derive(Debug)]
pub enum AddError {
    /// The target exists and is not ours: wait for its owner to remove it.
    Busy(String),
    /// Something failed; what was made of the part must be removed before a retry.
    Failed(String),
}

impl Plan {
    pub fn new(export: ExportConfig, node: &str, volume: &str, uuid: uuid::Uuid, node_index: u8) -> Plan {
        let nvme_port = 1 + (crc32c::crc32c(format!("{node}/{volume}").as_bytes()) % 0xfff0) as u16;
        Plan {
            root: PathBuf::from(CONFIGFS_ROOT),
            export,
            store_name: format!("{node}-{volume}"),
            scsi: ScsiIdentity::of(uuid),
            nvme: NvmeIdentity::of(uuid, node_index),
            nvme_port,
        }
    }

    fn lio(&self) -> PathBuf {
        self.root.join("target")
    }
    fn store(&self) -> PathBuf {
        self.lio().join("core").join(IBLOCK_HBA).join(&self.store_name)
    }
    fn tpg(&self) -> PathBuf {
        self.lio().join("iscsi").join(&self.export.target).join(format!("tpgt_{}", identity::TPG_TAG))
    }
    fn np(&self) -> PathBuf {
        let a = match self.export.address {
            std::net::IpAddr::V4(v4) => v4.to_string(),
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        };
        self.tpg().join("np").join(format!("{a}:{}", self.export.port))
    }
    fn lun(&self) -> PathBuf {
        self.tpg().join("lun").join(format!("lun_{}", identity::LUN))
    }
    fn nvmet(&self) -> PathBuf {
        self.root.join("nvmet")
    }
    fn subsystem(&self) -> PathBuf {
        self.nvmet().join("subsystems").join(&self.export.target)
    }
    fn namespace(&self) -> PathBuf {
        self.subsystem().join("namespaces").join(identity::NVME_NSID.to_string())
    }
    fn port(&self) -> PathBuf {
        self.nvmet().join("ports").join(self.nvme_port.to_string())
    }

    /// The kernel side is there: configfs mounted, the target modules loaded (loaded here
    /// when missing). One line saying what to do otherwise.
    pub fn check_kernel(&self) -> Result<(), String> {
        let (dir, modules) = match self.export.kind {
            ExportKind::Iscsi => (self.lio(), ["target_core_iblock", "iscsi_target_mod"]),
            ExportKind::NvmeTcp => (self.nvmet(), ["nvmet", "nvmet_tcp"]),
        };
        if !configfs_mounted(&self.root) {
            // As targetcli does. (`ip netns exec` mounts a fresh /sys for the namespace,
            // which hides a configfs mounted before: configfs is one per kernel, so mounting
            // it again shows the same tree.)
            let _ = std::process::Command::new("mount").args(["-t", "configfs", "configfs"]).arg(&self.root).status();
        }
        let loaded = |m: &str| Path::new("/sys/module").join(m).exists();
        if !dir.is_dir() || !modules.iter().all(|m| loaded(m)) {
            let _ = std::process::Command::new("modprobe").args(["-a"]).args(modules).status();
        }
        if !dir.is_dir() {
            return Err(format!(
                "export kind = \"{}\" needs configfs mounted on {} (mount -t configfs none {}) and the kernel modules {} \
                 (modprobe -a {})",
                self.export.kind,
                self.root.display(),
                self.root.display(),
                modules.join(", "),
                modules.join(" ")
            ));
        }
        Ok(())
    }

    pub fn add(&self, part: Part, device: &Path) -> Result<(), AddError> {
        let failed = AddError::Failed;
        match (self.export.kind, part) {
            (_, Part::Address) => super::net::add_address(&self.export).map_err(failed),
            (ExportKind::Iscsi, Part::Store) => self.add_lio_store(device).map_err(failed),
            (ExportKind::Iscsi, Part::Target) => {
                let iqn = self.tpg().parent().map(Path::to_path_buf).unwrap_or_default();
                if iqn.exists() {
                    return Err(AddError::Busy(format!(
                        "{} exists: another node in this kernel, or another tool, still holds target {}",
                        iqn.display(),
                        self.export.target
                    )));
                }
                self.add_lio_target().map_err(failed)
            }
            (ExportKind::Iscsi, Part::Lun) => self.add_lio_lun().map_err(failed),
            (ExportKind::Iscsi, Part::Enabled) => write(&self.tpg().join("enable"), "1").map_err(failed),
            (ExportKind::Iscsi, Part::Portal) => mkdir(&self.np()).map_err(failed),
            (ExportKind::NvmeTcp, Part::Store) => {
                if self.subsystem().exists() {
                    return Err(AddError::Busy(format!(
                        "{} exists: another node in this kernel, or another tool, still holds subsystem {}",
                        self.subsystem().display(),
                        self.export.target
                    )));
                }
                self.add_nvmet_subsystem().map_err(failed)
            }
            (ExportKind::NvmeTcp, Part::Target) => self.add_nvmet_hosts().map_err(failed),
            (ExportKind::NvmeTcp, Part::Lun) => self.add_nvmet_namespace(device).map_err(failed),
            (ExportKind::NvmeTcp, Part::Enabled) => self.add_nvmet_port().map_err(failed),
            (ExportKind::NvmeTcp, Part::Portal) => {
                symlink(&self.subsystem(), &self.port().join("subsystems").join(&self.export.target)).map_err(failed)
            }
        }
    }

    pub fn remove(&self, part: Part) -> Result<(), String> {
        match (self.export.kind, part) {
            (_, Part::Address) => super::net::remove_address(&self.export),
            (ExportKind::Iscsi, Part::Portal) => rmdir(&self.np()),
            (ExportKind::Iscsi, Part::Enabled) => {
                // Ends every session; waits for the commands they have in flight.
                let enable = self.tpg().join("enable");
                match std::fs::read_to_string(&enable) {
                    Ok(v) if v.trim() == "1" => write(&enable, "0"),
                    _ => Ok(()),
                }
            }
            (ExportKind::Iscsi, Part::Lun) => self.remove_lio_lun(),
            (ExportKind::Iscsi, Part::Target) => self.remove_lio_target(),
            (ExportKind::Iscsi, Part::Store) => {
                rmdir(&self.store())?;
                // The HBA goes once empty; another storage object keeps it.
                let _ = std::fs::remove_dir(self.lio().join("core").join(IBLOCK_HBA));
                Ok(())
            }
            (ExportKind::NvmeTcp, Part::Portal) => unlink(&self.port().join("subsystems").join(&self.export.target)),
            (ExportKind::NvmeTcp, Part::Enabled) => rmdir(&self.port()),
            (ExportKind::NvmeTcp, Part::Lun) => {
                let enable = self.namespace().join("enable");
                if let Ok(v) = std::fs::read_to_string(&enable) {
                    if v.trim() == "1" {
                        // Waits for the namespace's I/O in flight.
                        write(&enable, "0")?;
                    }
                }
                rmdir(&self.namespace())
            }
            (ExportKind::NvmeTcp, Part::Target) => {
                for link in entries(&self.subsystem().join("allowed_hosts")) {
                    unlink(&link)?;
                }
                for h in &self.export.initiators {
                    // Another subsystem may still allow this host: then it stays.
                    let _ = std::fs::remove_dir(self.nvmet().join("hosts").join(h));
                }
                Ok(())
            }
            (ExportKind::NvmeTcp, Part::Store) => rmdir(&self.subsystem()),
        }
    }

    fn add_lio_store(&self, device: &Path) -> Result<(), String> {
        let so = self.store();
        mkdir_all(so.parent().unwrap_or(&so))?;
        if so.exists() {
            // A storage object of ours left by a bring-up that did not finish.
            rmdir(&so)?;
        }
        mkdir(&so)?;
        write(&so.join("control"), &format!("udev_path={}", device.display()))?;
        write(&so.join("enable"), "1")?;
        // The identity, before anything links the object (LIO refuses a new serial then).
        let wwn = so.join("wwn");
        write(&wwn.join("vpd_unit_serial"), &self.scsi.unit_serial)?;
        for (file, value) in [
            ("vendor_id", identity::SCSI_VENDOR),
            ("product_id", identity::SCSI_PRODUCT),
            ("revision", identity::SCSI_REVISION),
            ("company_id", &format!("0x{}", identity::LIO_COMPANY_ID)),
        ] {
            // Older kernels lack some of these: their defaults are the same on both nodes.
            if wwn.join(file).exists() {
                write(&wwn.join(file), value)?;
            }
        }
        // What VMFS needs: ATS (COMPARE AND WRITE), XCOPY, UNMAP and WRITE SAME (the device
        // advertises discard and write-zeroes, so LIO can map them).
        let attrib = so.join("attrib");
        for a in ["emulate_caw", "emulate_3pc", "emulate_tpu", "emulate_tpws"] {
            write(&attrib.join(a), "1")?;
        }
        if let Ok(bs) = std::fs::read_to_string(attrib.join("block_size")) {
            if bs.trim() != "512" {
                tracing::warn!(
                    store = %self.store_name,
                    block_size = bs.trim(),
                    "the exported LUN's logical blocks are not 512 bytes: VMFS wants 512 (block_size = 512 in the volume)"
                );
            }
        }
        Ok(())
    }

    fn add_lio_target(&self) -> Result<(), String> {
        let tpg = self.tpg();
        mkdir_all(&tpg)?;
        let rtpi = tpg.join("rtpi");
        if rtpi.exists() {
            write(&rtpi, &identity::RELATIVE_PORT_ID.to_string())?;
        }
        let attrib = tpg.join("attrib");
        let open = self.export.initiators.is_empty();
        write(&attrib.join("authentication"), if self.export.chap.is_some() { "1" } else { "0" })?;
        write(&attrib.join("generate_node_acls"), if open { "1" } else { "0" })?;
        write(&attrib.join("cache_dynamic_acls"), if open { "1" } else { "0" })?;
        write(&attrib.join("demo_mode_write_protect"), "0")?;
        if let Some(chap) = &self.export.chap {
            if open {
                write(&tpg.join("auth").join("userid"), &chap.user)?;
                write(&tpg.join("auth").join("password"), &chap.secret)?;
            }
        }
        for i in &self.export.initiators {
            let acl = tpg.join("acls").join(i);
            mkdir(&acl)?;
            if let Some(chap) = &self.export.chap {
                write(&acl.join("auth").join("userid"), &chap.user)?;
                write(&acl.join("auth").join("password"), &chap.secret)?;
            }
        }
        Ok(())
    }

    fn add_lio_lun(&self) -> Result<(), String> {
        let lun = self.lun();
        mkdir(&lun)?;
        symlink(&self.store(), &lun.join(&self.store_name))?;
        for i in &self.export.initiators {
            let mapped = self.tpg().join("acls").join(i).join(format!("lun_{}", identity::LUN));
            mkdir(&mapped)?;
            symlink(&lun, &mapped.join("lun"))?;
        }
        Ok(())
    }

    fn remove_lio_lun(&self) -> Result<(), String> {
        for acl in entries(&self.tpg().join("acls")) {
            for mapped in entries(&acl).into_iter().filter(|p| is_named_lun(p)) {
                for link in entries(&mapped).into_iter().filter(|p| p.is_symlink()) {
                    unlink(&link)?;
                }
                rmdir(&mapped)?;
            }
        }
        let lun = self.lun();
        for link in entries(&lun).into_iter().filter(|p| p.is_symlink()) {
            // Waits for the LUN's commands in flight.
            unlink(&link)?;
        }
        rmdir(&lun)
    }

    fn remove_lio_target(&self) -> Result<(), String> {
        let tpg = self.tpg();
        for np in entries(&tpg.join("np")) {
            rmdir(&np)?;
        }
        for acl in entries(&tpg.join("acls")) {
            rmdir(&acl)?;
        }
        rmdir(&tpg)?;
        rmdir(tpg.parent().unwrap_or(&tpg))
    }

    fn add_nvmet_subsystem(&self) -> Result<(), String> {
        let s = self.subsystem();
        mkdir_all(&s)?;
        write(&s.join("attr_serial"), &self.nvme.serial)?;
        if s.join("attr_model").exists() {
            write(&s.join("attr_model"), identity::NVME_MODEL)?;
        }
        write(&s.join("attr_cntlid_min"), &self.nvme.cntlid_min.to_string())?;
        write(&s.join("attr_cntlid_max"), &self.nvme.cntlid_max.to_string())?;
        write(&s.join("attr_allow_any_host"), if self.export.initiators.is_empty() { "1" } else { "0" })
    }

    fn add_nvmet_hosts(&self) -> Result<(), String> {
        for h in &self.export.initiators {
            let host = self.nvmet().join("hosts").join(h);
            if !host.exists() {
                mkdir(&host)?;
            }
            symlink(&host, &self.subsystem().join("allowed_hosts").join(h))?;
        }
        Ok(())
    }

    fn add_nvmet_namespace(&self, device: &Path) -> Result<(), String> {
        let ns = self.namespace();
        mkdir(&ns)?;
        write(&ns.join("device_path"), &device.display().to_string())?;
        write(&ns.join("device_nguid"), &self.nvme.nguid)?;
        write(&ns.join("device_uuid"), &self.nvme.ns_uuid)?;
        write(&ns.join("enable"), "1")
    }

    fn add_nvmet_port(&self) -> Result<(), String> {
        let p = self.port();
        if p.exists() {
            // Ours (the id is this node's), left by a bring-up that did not finish.
            for link in entries(&p.join("subsystems")) {
                unlink(&link)?;
            }
            rmdir(&p)?;
        }
        mkdir(&p)?;
        write(&p.join("addr_trtype"), "tcp")?;
        write(&p.join("addr_adrfam"), if self.export.address.is_ipv4() { "ipv4" } else { "ipv6" })?;
        write(&p.join("addr_traddr"), &self.export.address.to_string())?;
        write(&p.join("addr_trsvcid"), &self.export.port.to_string())
    }
}

/// Is configfs mounted on `root` (in this mount namespace)?
fn configfs_mounted(root: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, at, fstype) = (f.next(), f.next(), f.next());
        fstype == Some("configfs") && at.map(Path::new) == Some(root)
    })
}

fn is_named_lun(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("lun_"))
}

fn ctx(what: &str, p: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {e}", p.display())
}

fn mkdir(p: &Path) -> Result<(), String> {
    std::fs::create_dir(p).map_err(|e| ctx("mkdir", p, e))
}

fn mkdir_all(p: &Path) -> Result<(), String> {
    std::fs::create_dir_all(p).map_err(|e| ctx("mkdir", p, e))
}

fn write(p: &Path, value: &str) -> Result<(), String> {
    std::fs::write(p, value)
        .map_err(|e| ctx(&format!("write '{}' to", if p.ends_with("password") { "*" } else { value }), p, e))
}

fn symlink(target: &Path, link: &Path) -> Result<(), String> {
    std::os::unix::fs::symlink(target, link).map_err(|e| ctx("symlink", link, e))
}

fn rmdir(p: &Path) -> Result<(), String> {
    match std::fs::remove_dir(p) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(ctx("rmdir", p, e)),
        _ => Ok(()),
    }
}

fn unlink(p: &Path) -> Result<(), String> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(ctx("unlink", p, e)),
        _ => Ok(()),
    }
}

/// The entries of a directory (none when it is missing).
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default()
}
