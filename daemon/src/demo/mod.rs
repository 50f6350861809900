//! `metroblk demo`: a witness and two nodes on loopback with a mirrored `/dev/ublkb0`.
//!
//! Natively (the kernel has ublk_drv) it starts `metroblk witness run`, a primary and a
//! secondary `metroblk node run` with backing files in a state directory, waits for the
//! device, prints what to do with it, and tears everything down on Ctrl-C. On a kernel
//! without ublk it boots the QEMU VM of the test harness (tests/vm/run.sh, from the source
//! checkout this binary was built in) and runs the scripted showcase there: mkfs, mount,
//! write, sync, umount, both copies compared; then a failover: the primary is killed, the
//! witness promotes the secondary, whose device shows the same files; the old primary
//! returns as secondary and is resynced.
//!
//! `--export` adds the iSCSI export to both nodes and a host (this machine's open-iscsi)
//! that writes through it across a planned switchover (`export.rs`, which says why not a
//! kill -9); without it, everything here runs as before.

mod export;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The demo's volume: small enough for the VM's tmpfs and a quick mkfs under TCG.
pub const DEMO_SIZE: &str = "256MiB";
const DEMO_KEY: &str = "metroblk-demo-authkey-change-me-0123";
const DEMO_WITNESS_KEY: &str = "metroblk-demo-witness-key-change-me-0123";
const DEMO_WITNESS_PORT: u16 = 7809;
/// A short lease, so the showcase's failover takes seconds.
const DEMO_LEASE_MS: u64 = 3000;

pub struct DemoOptions {
    pub dir: PathBuf,
    /// Run the showcase and exit instead of waiting for Ctrl-C.
    pub scripted: bool,
    /// Run inside the VM even if this kernel has ublk.
    pub force_vm: bool,
    /// Export the volume over iSCSI and show a host writing through it across a switchover.
    pub export: bool,
}

pub fn run(opts: DemoOptions) -> Result<(), String> {
    if opts.export {
        export::check_tools()?;
    }
    if opts.force_vm {
        return run_in_vm(&opts);
    }
    if let Err(why) = metroblk_ublk::check_driver() {
        println!("metroblk demo: {why}");
        return run_in_vm(&opts);
    }
    run_native(&opts)
}

struct Configs {
    primary: PathBuf,
    secondary: PathBuf,
    witness: PathBuf,
}

fn write_key(path: &Path, key: &str) -> Result<(), String> {
    std::fs::write(path, key).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(|e| e.to_string())
}

fn write_configs(dir: &Path, export: bool) -> Result<Configs, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    write_key(&dir.join("demo.key"), DEMO_KEY)?;
    write_key(&dir.join("witness.key"), DEMO_WITNESS_KEY)?;
    // A fresh demo: a fresh witness state.
    let _ = std::fs::remove_file(dir.join("witness.state"));
    let witness = dir.join("witness.toml");
    std::fs::write(
        &witness,
        format!(
            "listen = \"127.0.0.1\"\nport = {DEMO_WITNESS_PORT}\nauthkey_file = \"{}\"\nstate_file = \"{}\"\n",
            dir.join("witness.key").display(),
            dir.join("witness.state").display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let cfg = |name: &str,
               peer: &str,
               role: &str,
               listen: u16,
               peer_port: u16,
               extra: &str|
     -> Result<PathBuf, String> {
        let text = format!(
            "[node]\nname = \"{name}\"\ncontrol_socket = \"{name}.sock\"\n\n[[volume]]\nname = \"demo\"\nsize = \"{DEMO_SIZE}\"\n\
             backing_file = \"{name}.img\"\nmetadata_file = \"{name}.meta\"\nlisten = \"127.0.0.1:{listen}\"\nrole = \"{role}\"\n{extra}\
             [volume.peer]\nname = \"{peer}\"\naddress = \"127.0.0.1:{peer_port}\"\nauthkey_file = \"demo.key\"\n\
             [volume.witness]\naddress = \"127.0.0.1:{DEMO_WITNESS_PORT}\"\nauthkey_file = \"witness.key\"\n\
             lease_ms = {DEMO_LEASE_MS}\n"
        );
        let p = dir.join(format!("{name}.toml"));
        std::fs::write(&p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        // A fresh demo: a fresh metadata file (as `metroblk create-md --force`).
        crate::metadata::create_md_command(&p, "demo", true)?;
        Ok(p)
    };
    let section = if export { export::config_section() } else { String::new() };
    let primary = cfg("site-a", "site-b", "primary", 7801, 7802, &format!("ublk_id = 0\nqueues = 2\n{section}"))?;
    let secondary = cfg("site-b", "site-a", "secondary", 7802, 7801, &format!("ublk_id = 1\nqueues = 2\n{section}"))?;
    Ok(Configs { primary, secondary, witness })
}

struct Node {
    name: &'static str,
    child: Child,
}

impl Node {
    fn start(name: &'static str, config: &Path, log: &Path) -> Result<Node, String> {
        Self::start_as(name, &["node", "run", "--config"], config, log)
    }

    fn start_as(name: &'static str, args: &[&str], config: &Path, log: &Path) -> Result<Node, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        let child = Command::new(exe)
            .args(args)
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start node {name}: {e}"))?;
        Ok(Node { name, child })
    }

    fn stop(&mut self) {
        // SIGTERM: a clean shutdown removes the ublk device.
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("node {} did not stop in 10 s; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// SIGKILL: no clean shutdown of any kind (the demo's site loss).
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Returns on Ctrl-C (or SIGTERM).
fn wait_for_interrupt() {
    // SAFETY: installs an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    while !INTERRUPTED.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn sh(cmd: &str) -> Result<String, String> {
    let out = Command::new("sh").arg("-c").arg(cmd).output().map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!("`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_native(opts: &DemoOptions) -> Result<(), String> {
    let dir = &opts.dir;
    let cfgs = write_configs(dir, opts.export)?;
    let (pcfg, scfg) = (cfgs.primary.clone(), cfgs.secondary.clone());
    println!("metroblk demo: state in {}", dir.display());
    let mut witness =
        Node::start_as("witness", &["witness", "run", "--config"], &cfgs.witness, &dir.join("witness.log"))?;
    let mut secondary = Node::start("site-b", &scfg, &dir.join("site-b.log"))?;
    let mut primary = Node::start("site-a", &pcfg, &dir.join("site-a.log"))?;
    let result = (|| {
        let dev = "/dev/ublkb0";
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Path::new(dev).exists() {
            if let Ok(Some(st)) = primary.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("site-a.log")).unwrap_or_default();
                return Err(format!("the primary exited ({st}) before {dev} appeared:\n{log}"));
            }
            if Instant::now() > deadline {
                return Err(format!("{dev} did not appear in 30 s; see {}", dir.join("site-a.log").display()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "mirrored device {dev} is up: primary site-a -> secondary site-b over 127.0.0.1, witness on 127.0.0.1:{DEMO_WITNESS_PORT}"
        );
        if opts.export {
            export::host_leg(dir, &cfgs, opts.scripted)
        } else if opts.scripted {
            let sum = showcase(dev, dir, &pcfg)?;
            failover(dir, &cfgs, &mut primary, &sum)
        } else {
            println!("\nTry it (in another shell):");
            println!("  mkfs.ext4 {dev} && mount {dev} /mnt && cp -r /etc /mnt/ && sync");
            println!("  {} status --config {}", std::env::current_exe().unwrap_or_default().display(), pcfg.display());
            println!("  {} status --config {}", std::env::current_exe().unwrap_or_default().display(), scfg.display());
            println!("Both backing files ({0}/site-a.img, {0}/site-b.img) hold the same bytes.", dir.display());
            println!("\nCtrl-C stops both nodes (unmount first).");
            wait_for_interrupt();
            println!("\nstopping");
            Ok(())
        }
    })();
    primary.stop();
    secondary.stop();
    witness.stop();
    result
}

/// The field `name` of the demo volume in a node's `status --json`.
fn status_field(cfg: &Path, name: &str) -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let out = Command::new(exe).args(["status", "--json", "--config"]).arg(cfg).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let f = &v["volumes"][0][name];
    Some(f.as_str().map_or_else(|| f.to_string(), str::to_string))
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {} s", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The end of the showcase: site A is lost (its daemon killed); the witness promotes site B,
/// whose own device shows the same files; site A returns as secondary and is resynced.
fn failover(dir: &Path, cfgs: &Configs, primary: &mut Node, sum: &str) -> Result<(), String> {
    let m = dir.join("mnt");
    let m = m.display();
    println!("\n--- failover: site A is lost (kill -9 of its daemon)");
    let t0 = Instant::now();
    primary.kill9();
    wait_for("site-b promoted by the witness", Duration::from_secs(60), || {
        status_field(&cfgs.secondary, "role").as_deref() == Some("primary")
            && status_field(&cfgs.secondary, "ublk_device").is_some_and(|d| Path::new(&d).exists())
    })?;
    let dev = status_field(&cfgs.secondary, "ublk_device").unwrap_or_default();
    println!(
        "site-b promoted by the witness (epoch {}) and serving {dev} {:.1} s after the loss (lease {} s)",
        status_field(&cfgs.secondary, "epoch").unwrap_or_default(),
        t0.elapsed().as_secs_f64(),
        DEMO_LEASE_MS as f64 / 1000.0
    );
    println!("$ mount {dev} {m}; sha256sum the files");
    sh(&format!("mount {dev} {m}"))?;
    let r = sh(&format!("cd {m} && sha256sum file* | sha256sum"));
    let _ = sh(&format!("umount {m}"));
    let after = r?.split_whitespace().next().unwrap_or("").to_string();
    println!("  files checksum {after}");
    if after != sum {
        return Err(format!("the promoted node's files differ: checksum {after}, was {sum}"));
    }
    println!("the promoted node's device shows the same files");
    println!("\n--- site A returns: it becomes secondary and is resynced from site B");
    let mut back = Node::start("site-a", &cfgs.primary, &dir.join("site-a.log"))?;
    let result = wait_for("site-a back as an up-to-date secondary", Duration::from_secs(90), || {
        status_field(&cfgs.primary, "role").as_deref() == Some("secondary")
            && status_field(&cfgs.primary, "disk_state").as_deref() == Some("up-to-date")
            && status_field(&cfgs.secondary, "sync_state").as_deref() == Some("in-sync")
    });
    if result.is_ok() {
        println!("site-a is secondary in epoch {}, in sync", status_field(&cfgs.primary, "epoch").unwrap_or_default());
    }
    back.stop();
    result
}

/// The scripted part: a filesystem on the mirror, and proof that both copies are the same.
fn showcase(dev: &str, dir: &Path, pcfg: &Path) -> Result<String, String> {
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
    let m = mnt.display();
    println!("$ mkfs.ext4 -q {dev}");
    sh(&format!("mkfs.ext4 -q -F {dev}"))?;
    println!("$ mount {dev} {m}; write 50 files; sync");
    sh(&format!("mount {dev} {m}"))?;
    let r = sh(&format!(
        "for i in $(seq 1 50); do head -c $((4096 * (i % 16 + 1))) /dev/urandom > {m}/file$i; done; sync; \
         (cd {m} && sha256sum file* | sha256sum)"
    ));
    let _ = sh(&format!("umount {m}"));
    let sum = r?;
    println!("  files checksum {}", sum.split_whitespace().next().unwrap_or(""));
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let st = sh(&format!("{} status --config {}", exe.display(), pcfg.display()))?;
    print!("{st}");
    let a = dir.join("site-a.img");
    let b = dir.join("site-b.img");
    sh(&format!("cmp {} {}", a.display(), b.display())).map_err(|e| format!("the two copies differ: {e}"))?;
    println!("both copies identical: {} == {}", a.display(), b.display());
    Ok(sum.split_whitespace().next().unwrap_or("").to_string())
}

fn run_in_vm(opts: &DemoOptions) -> Result<(), String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let run_sh = root.join("tests/vm/run.sh");
    if !run_sh.exists() {
        return Err(format!(
            "this kernel cannot serve ublk devices and the VM harness {} is not here: run the demo from the source checkout, or load ublk_drv (Linux 6.12+)",
            run_sh.display()
        ));
    }
    println!("metroblk demo: running inside a QEMU VM whose kernel has ublk_drv");
    println!("(Debian 6.12 kernel with ublk_drv, this machine's files shared read-only; the first run downloads the kernel).");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let script = root.join("target/demo-vm.sh");
    let export = if opts.export { " --export" } else { "" };
    let text = format!("#!/bin/bash\nset -e\n{} demo --scripted{export} --dir {}\n", exe.display(), opts.dir.display());
    // target/ is missing when the binary was built with CARGO_TARGET_DIR elsewhere.
    if let Some(parent) = script.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    std::fs::write(&script, text).map_err(|e| format!("cannot write {}: {e}", script.display()))?;
    let st = Command::new("bash")
        .arg(&run_sh)
        .arg(&script)
        .args(["--timeout", "300"])
        .status()
        .map_err(|e| format!("cannot run {}: {e}", run_sh.display()))?;
    if !st.success() {
        return Err(format!("the demo in the VM failed ({st})"));
    }
    if opts.export {
        println!(
            "demo done (in the VM). On a host with ublk_drv, `metroblk demo --export` keeps the host logged in to the export until Ctrl-C."
        );
    } else {
        println!("demo done (in the VM). On a host with ublk_drv, `metroblk demo` keeps /dev/ublkb0 up until Ctrl-C.");
    }
    Ok(())
}
