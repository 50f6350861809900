//! `metroblk demo --export`: the volume exported over iSCSI, and a host (this machine's own
//! kernel initiator) that writes through it across a failover (issue 24, part 7).
//!
//! Both nodes carry `[volume.export] kind = "iscsi"` with the service address
//! [`SERVICE_ADDRESS`] on `lo`: the config refuses 127.0.0.0/8 (hosts elsewhere could never
//! reach it), and an address of TEST-NET-1 (RFC 5737: documentation only, never a real
//! machine's) on `lo` is as local as 127.0.0.1 and added and removed just as on a real
//! interface. The host is open-iscsi in the initial namespace (the kernel initiator logs in
//! only from there); the demo starts iscsid if none answers, and stops what it started.
//!
//! The failover is a planned `metroblk switchover`, not the showcase's kill -9: both nodes
//! run in one kernel, so they share LIO's configfs tree, in which the target is one
//! directory for both. A node killed with -9 leaves its target there, and its LIO keeps
//! answering on the portal in front of a device whose daemon is gone; the survivor's
//! bring-up waits until that target is removed, which only the killed node's restart does
//! (`export/service.rs`). On two machines the survivor takes over after the lease with no
//! such wait (the VM test's partition, `tests/ublk_export.rs`). The switchover is the
//! failover that releases the target first: the old primary closes its portal, drops the
//! address and removes its target; the new one brings up its own with the same identity.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{status_field, wait_for, Configs};

/// TEST-NET-1 on `lo` (see the module doc); /32: no route beyond the address itself.
pub const SERVICE_ADDRESS: &str = "192.0.2.100";
pub const PORT: u16 = 3260;
pub const IQN: &str = "iqn.2024-01.io.metroblk:demo";
/// The host's own name, when the demo runs its own iscsid.
const HOST_IQN: &str = "iqn.2024-01.io.metroblk:demo-host";

/// The section both nodes' volume carries (after the volume's own keys).
pub fn config_section() -> String {
    format!(
        "[volume.export]\nkind = \"iscsi\"\naddress = \"{SERVICE_ADDRESS}/32\"\ninterface = \"lo\"\ntarget = \"{IQN}\"\n"
    )
}

fn portal() -> String {
    format!("{SERVICE_ADDRESS}:{PORT}")
}

/// `name` on PATH, or in the sbin directories a non-root PATH may lack.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The host's tools, checked before anything starts (and before a VM boots: it runs this
/// machine's binaries).
pub fn check_tools() -> Result<(), String> {
    let missing: Vec<&str> = ["iscsiadm", "iscsid"].into_iter().filter(|t| find_tool(t).is_none()).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "demo --export: {} not found: install the Debian package open-iscsi (apt-get install open-iscsi; scripts/deps.sh installs it)",
            missing.join(" and ")
        ))
    }
}

fn iscsiadm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(find_tool("iscsiadm").unwrap_or_else(|| "iscsiadm".into()))
        .args(args)
        .output()
        .map_err(|e| format!("cannot run iscsiadm: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("iscsiadm {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Does an iscsid (or systemd's socket for it) answer on iscsiadm's socket?
fn iscsid_answers() -> bool {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(b"ISCSIADM_ABSTRACT_NAMESPACE")
        .and_then(|a| std::os::unix::net::UnixStream::connect_addr(&a))
        .is_ok()
}

/// The host: open-iscsi logged in to the demo's target.
pub struct Host {
    /// The iscsid this demo started (none if one was running).
    iscsid: Option<Child>,
    /// /etc/iscsi was read-only (the VM's shared root): a writable copy is bound over it.
    etc_bound: bool,
    logged_in: bool,
    closed: bool,
    pub disk: PathBuf,
}

impl Host {
    /// Starts iscsid if none answers, waits for the portal, discovers and logs in, and
    /// finds the disk. On an error, what was done is undone.
    pub fn login(dir: &Path) -> Result<Host, String> {
        let mut host = Host { iscsid: None, etc_bound: false, logged_in: false, closed: false, disk: PathBuf::new() };
        match host.login_inner(dir) {
            Ok(()) => Ok(host),
            Err(e) => {
                host.close();
                Err(e)
            }
        }
    }

    fn login_inner(&mut self, dir: &Path) -> Result<(), String> {
        let _ = Command::new("modprobe").arg("iscsi_tcp").stderr(Stdio::null()).status();
        if !Path::new("/sys/module/iscsi_tcp").exists() {
            return Err(
                "demo --export: this kernel has no iSCSI initiator (module iscsi_tcp): modprobe iscsi_tcp, or run the demo with --vm"
                    .into(),
            );
        }
        // iscsiadm keeps its records under /etc/iscsi and its locks under /run/lock/iscsi.
        let _ = std::fs::create_dir_all("/run/lock/iscsi");
        let probe = Path::new("/etc/iscsi/.metroblk-demo-probe");
        if std::fs::write(probe, b"").is_ok() {
            let _ = std::fs::remove_file(probe);
        } else {
            let copy = dir.join("etc-iscsi");
            super::sh(&format!(
                "rm -rf {0} && mkdir -p {0} && cp -a /etc/iscsi/. {0}/ && mount --bind {0} /etc/iscsi",
                copy.display()
            ))?;
            self.etc_bound = true;
            println!("(/etc/iscsi is read-only here: a writable copy from {} is mounted over it)", copy.display());
        }
        if !iscsid_answers() {
            let name = dir.join("initiatorname.iscsi");
            std::fs::write(&name, format!("InitiatorName={HOST_IQN}\n"))
                .map_err(|e| format!("cannot write {}: {e}", name.display()))?;
            let log = File::create(dir.join("iscsid.log")).map_err(|e| format!("cannot create iscsid.log: {e}"))?;
            let iscsid = find_tool("iscsid").unwrap_or_else(|| "iscsid".into());
            let child = Command::new(iscsid)
                .args(["-f", "-n", "-i"])
                .arg(&name)
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log)
                // Its own process group: on SIGTERM iscsid signals its whole group.
                .process_group(0)
                .spawn()
                .map_err(|e| format!("cannot start iscsid: {e}"))?;
            self.iscsid = Some(child);
            wait_for("iscsid to answer", Duration::from_secs(10), iscsid_answers)?;
            println!("started iscsid for the host (log {})", dir.join("iscsid.log").display());
        }
        // The portal opens last in the primary's bring-up: once it is in configfs, the LUN is.
        let np = Path::new("/sys/kernel/config/target/iscsi").join(IQN).join("tpgt_1/np").join(portal());
        wait_for("site-a's iSCSI portal", Duration::from_secs(60), || np.exists())?;
        println!("$ iscsiadm -m discovery -t sendtargets -p {}", portal());
        let found = iscsiadm(&["-m", "discovery", "-t", "sendtargets", "-p", &portal()])?;
        print!("{found}");
        if !found.contains(IQN) {
            return Err(format!("the discovery at {} did not list {IQN}", portal()));
        }
        // Queue I/O across a failover instead of failing it, and notice a silent portal in
        // seconds (the settings the README gives for Linux hosts).
        for (k, v) in [
            ("node.session.timeo.replacement_timeout", "120"),
            ("node.conn[0].timeo.noop_out_interval", "1"),
            ("node.conn[0].timeo.noop_out_timeout", "2"),
        ] {
            iscsiadm(&["-m", "node", "-T", IQN, "-p", &portal(), "-o", "update", "-n", k, "-v", v])?;
        }
        println!("$ iscsiadm -m node -T {IQN} -p {} --login", portal());
        iscsiadm(&["-m", "node", "-T", IQN, "-p", &portal(), "--login"])?;
        self.logged_in = true;
        let mut disk = None;
        wait_for("the host's disk", Duration::from_secs(30), || {
            disk = session_disk();
            disk.as_ref().is_some_and(|d| d.exists())
        })?;
        self.disk = disk.unwrap_or_default();
        let name = self.disk.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // As long as a failover may take, and more: the SCSI layer must not fail a command
        // that the session is still waiting to resend.
        let _ = std::fs::write(format!("/sys/block/{name}/device/timeout"), "120");
        Ok(())
    }

    /// Logs out, removes the records the demo made, stops its iscsid, unmounts its copy.
    pub fn close(&mut self) {
        if std::mem::replace(&mut self.closed, true) {
            return;
        }
        if self.logged_in {
            if let Err(e) = iscsiadm(&["-m", "node", "-T", IQN, "-p", &portal(), "--logout"]) {
                eprintln!("{e}");
            }
            self.logged_in = false;
        }
        let _ = iscsiadm(&["-m", "node", "-T", IQN, "-p", &portal(), "-o", "delete"]);
        let _ = iscsiadm(&["-m", "discoverydb", "-t", "sendtargets", "-p", &portal(), "-o", "delete"]);
        if let Some(mut c) = self.iscsid.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        if self.etc_bound {
            let _ = super::sh("umount /etc/iscsi");
            self.etc_bound = false;
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.close();
    }
}

/// The disk of the session with the demo's target (other sessions of this host untouched).
fn session_disk() -> Option<PathBuf> {
    for s in std::fs::read_dir("/sys/class/iscsi_session").ok()?.flatten() {
        let target = std::fs::read_to_string(s.path().join("targetname")).unwrap_or_default();
        if target.trim() != IQN {
            continue;
        }
        for t in std::fs::read_dir(s.path().join("device")).ok()?.flatten() {
            if !t.file_name().to_string_lossy().starts_with("target") {
                continue;
            }
            for lun in std::fs::read_dir(t.path()).ok()?.flatten() {
                if let Ok(mut blocks) = std::fs::read_dir(lun.path().join("block")) {
                    if let Some(Ok(b)) = blocks.next() {
                        return Some(Path::new("/dev").join(b.file_name()));
                    }
                }
            }
        }
    }
    None
}

/// The serial (VPD page 0x80) and the NAA (page 0x83) the target reports now: the SCSI
/// layer asked again (rescan), so after a failover it is the new primary's answer.
fn identity(disk: &Path) -> Result<(String, String), String> {
    let name = disk.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dev = PathBuf::from(format!("/sys/block/{name}/device"));
    std::fs::write(dev.join("rescan"), "1").map_err(|e| format!("cannot rescan {}: {e}", disk.display()))?;
    let pg80 = std::fs::read(dev.join("vpd_pg80")).map_err(|e| format!("{}: no VPD page 0x80: {e}", disk.display()))?;
    let serial: String =
        pg80.get(4..).unwrap_or_default().iter().filter(|b| b.is_ascii_graphic()).map(|&b| b as char).collect();
    let wwid = std::fs::read_to_string(dev.join("wwid")).map_err(|e| format!("{}: no wwid: {e}", disk.display()))?;
    Ok((serial, wwid.trim().to_string()))
}

const BLOCK: usize = 4096;
/// The writer cycles over the first 16 MiB of the disk.
const BLOCKS: u64 = 4096;

/// Block `block`'s content as written by write number `seq`.
fn pattern(seq: u64, block: u64, buf: &mut [u8]) {
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block;
    for b in &mut buf[16..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// A 4 KiB-aligned 4 KiB buffer for O_DIRECT, inside `store`.
fn aligned(store: &mut [u8]) -> &mut [u8] {
    let off = store.as_ptr().align_offset(BLOCK);
    &mut store[off..off + BLOCK]
}

fn open_direct(dev: &Path, write: bool) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| format!("cannot open {}: {e}", dev.display()))
}

/// What the writer did: each block's last acknowledged write, the failures, the longest wait.
struct WriteLog {
    last: Vec<u64>,
    writes: u64,
    errors: u64,
    first_error: Option<String>,
    longest: Duration,
}

/// One O_DIRECT writer on the host's disk, as an application would be: 4 KiB writes one
/// after the other, each acknowledged one recorded.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: JoinHandle<WriteLog>,
}

impl Writer {
    fn start(disk: &Path) -> Result<Writer, String> {
        let file = open_direct(disk, true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::Builder::new()
                .name("demo-writer".into())
                .spawn(move || {
                    let mut store = vec![0u8; 2 * BLOCK];
                    let buf = aligned(&mut store);
                    let mut log = WriteLog {
                        last: vec![0; BLOCKS as usize],
                        writes: 0,
                        errors: 0,
                        first_error: None,
                        longest: Duration::ZERO,
                    };
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let block = (seq - 1) % BLOCKS;
                        pattern(seq, block, buf);
                        let t = Instant::now();
                        let r = file.write_at(buf, block * BLOCK as u64);
                        log.longest = log.longest.max(t.elapsed());
                        match r {
                            Ok(n) if n == BLOCK => {
                                log.last[block as usize] = seq;
                                log.writes += 1;
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                log.errors += 1;
                                if log.first_error.is_none() {
                                    log.first_error = Some(match other {
                                        Ok(n) => format!("short write ({n} bytes) at block {block}"),
                                        Err(e) => format!("block {block}: {e}"),
                                    });
                                }
                            }
                        }
                    }
                    log
                })
                .map_err(|e| format!("cannot start the writer: {e}"))?
        };
        Ok(Writer { stop, acked, thread })
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    fn finish(self) -> Result<WriteLog, String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| "the writer thread panicked".to_string())
    }
}

/// Every acknowledged write of `log` reads back from `dev`; returns how many blocks.
fn verify(dev: &Path, log: &WriteLog) -> Result<usize, String> {
    let file = open_direct(dev, false)?;
    let mut store = vec![0u8; 2 * BLOCK];
    let mut want = vec![0u8; BLOCK];
    let mut checked = 0;
    for (block, &seq) in log.last.iter().enumerate() {
        if seq == 0 {
            continue;
        }
        let buf = aligned(&mut store);
        file.read_exact_at(buf, block as u64 * BLOCK as u64)
            .map_err(|e| format!("{}: block {block}: {e}", dev.display()))?;
        pattern(seq, block as u64, &mut want);
        if buf != want.as_slice() {
            let got = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
            return Err(format!(
                "{}: block {block} does not hold acknowledged write {seq} (it holds write {got})",
                dev.display()
            ));
        }
        checked += 1;
    }
    Ok(checked)
}

/// The export leg: the host logs in to site A's target, and (scripted) writes through it
/// across a switchover to site B; interactive, it says what to try and waits for Ctrl-C.
pub fn host_leg(dir: &Path, cfgs: &Configs, scripted: bool) -> Result<(), String> {
    println!(
        "\n--- the export: site-a's iSCSI target (LIO) at {} on lo, the host is this machine's open-iscsi",
        portal()
    );
    let mut host = Host::login(dir)?;
    let disk = host.disk.clone();
    let (serial, naa) = identity(&disk)?;
    println!("the host logged in: {} is the volume, serial {serial}, {naa}", disk.display());
    if !scripted {
        let exe = std::env::current_exe().unwrap_or_default();
        println!("\nTry it (in another shell):");
        println!("  fio --name=w --filename={} --rw=randwrite --bs=4k --direct=1 --time_based --runtime=60 --verify=crc32c &", disk.display());
        println!("  {} switchover --config {} demo", exe.display(), cfgs.primary.display());
        println!("  (the portal and {SERVICE_ADDRESS} move to site-b; the host's writes wait and go on; same serial and NAA)");
        println!("  cat /sys/block/{}/device/wwid", disk.file_name().unwrap_or_default().to_string_lossy());
        println!("\nCtrl-C logs the host out and stops both nodes.");
        super::wait_for_interrupt();
        println!("\nstopping");
        host.close();
        return Ok(());
    }
    let result = across_switchover(cfgs, &disk, &serial, &naa);
    println!("$ iscsiadm -m node -T {IQN} -p {} --logout", portal());
    host.close();
    result
}

fn across_switchover(cfgs: &Configs, disk: &Path, serial: &str, naa: &str) -> Result<(), String> {
    wait_for("site-b in sync", Duration::from_secs(60), || {
        status_field(&cfgs.primary, "sync_state").as_deref() == Some("in-sync")
            && status_field(&cfgs.secondary, "disk_state").as_deref() == Some("up-to-date")
    })?;
    println!(
        "\n--- failover of the export: a host writes through {} while site-a hands over to site-b",
        disk.display()
    );
    println!("(a planned switchover: both nodes share this kernel's LIO configfs, where a node killed with -9 would");
    println!(" leave its target behind until it is restarted; on two machines a lost site fails over after the lease)");
    let writer = Writer::start(disk)?;
    wait_for("the host's first writes", Duration::from_secs(30), || writer.acked() > 100)?;
    std::thread::sleep(Duration::from_secs(1));
    let before = writer.acked();
    println!("the host's writer runs: {before} writes of 4 KiB acknowledged so far");
    println!("$ metroblk switchover --config {} demo", cfgs.primary.display());
    let t0 = Instant::now();
    let switched = crate::resync::command::switchover(&cfgs.primary, "demo").and_then(|answer| {
        println!("  {answer}");
        wait_for("site-b serving as primary", Duration::from_secs(60), || {
            status_field(&cfgs.secondary, "role").as_deref() == Some("primary")
                && status_field(&cfgs.secondary, "ublk_device").is_some_and(|d| Path::new(&d).exists())
        })?;
        let serving = t0.elapsed();
        let at_switch = writer.acked();
        wait_for("the host's writes through site-b", Duration::from_secs(90), || writer.acked() > at_switch + 200)?;
        Ok(serving)
    });
    let log = writer.finish()?;
    let serving = switched?;
    println!(
        "site-b serves the volume {:.1} s after the command; the host went on: {} writes acknowledged in all, {} failed, the longest took {:.1} s",
        serving.as_secs_f64(),
        log.writes,
        log.errors,
        log.longest.as_secs_f64()
    );
    if log.errors > 0 {
        return Err(format!(
            "{} of the host's writes failed across the switchover (first: {})",
            log.errors,
            log.first_error.unwrap_or_default()
        ));
    }
    println!("no write failed at the host");
    let (serial2, naa2) = identity(disk)?;
    println!("the host's disk now (site-b's target): serial {serial2}, {naa2}");
    if serial2 != serial || naa2 != naa {
        return Err(format!(
            "the identity changed across the switchover: serial {serial} -> {serial2}, {naa} -> {naa2}"
        ));
    }
    println!("the same serial and NAA before and after: to the host it is the same LUN");
    let n = verify(disk, &log)?;
    let b_dev = status_field(&cfgs.secondary, "ublk_device").unwrap_or_default();
    verify(Path::new(&b_dev), &log)?;
    println!(
        "every acknowledged write ({n} blocks, the last write to each) reads back through {} and on site-b's {b_dev}",
        disk.display()
    );
    Ok(())
}
