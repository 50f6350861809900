//! `metroblk create-md` as a real process on real files, and the metadata file it makes opened
//! through the library as a node will open it: created private, never overwritten without
//! --force, and a missing, foreign or corrupt file refused with one clear line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use metroblk::config::NodeConfig;
use metroblk::metadata::{open_file, Expected};
use metroblk_tests::cluster::{metroblk_bin, write_config, NodeSpec, TEST_KEY};

fn spec<'a>(name: &'a str, peer: &'a str, role: &'a str) -> NodeSpec<'a> {
    NodeSpec { name, peer, role, size: 64 << 20, listen_port: 1, peer_port: 2, key: TEST_KEY, extra: "" }
}

/// Runs `metroblk create-md`; returns (success, stdout + stderr).
fn create_md(config: &Path, force: bool) -> (bool, String) {
    let mut cmd = Command::new(metroblk_bin());
    cmd.args(["create-md", "--config"]).arg(config).arg("vol0");
    if force {
        cmd.arg("--force");
    }
    let out = cmd.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn open_as(config: &Path, meta: &Path) -> Result<u64, String> {
    let cfg = NodeConfig::load(config).unwrap();
    let v = &cfg.volumes[0];
    let exp = Expected::for_volume(v, &cfg.name, config);
    open_file(meta, &exp).map(|(_, sb, _)| sb.regions()).map_err(|e| e.to_string())
}

#[test]
fn create_md_makes_a_private_file_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let alpha = write_config(dir.path(), &spec("alpha", "beta", "primary"));
    let beta = write_config(dir.path(), &spec("beta", "alpha", "secondary"));
    let meta = dir.path().join("alpha-vol0.meta");

    // Missing: refused, naming the command that creates it.
    std::fs::remove_file(&meta).unwrap(); // write_config made one, as most tests want
    let e = open_as(&alpha, &meta).unwrap_err();
    assert_eq!(
        e,
        format!("{}: missing; create it with metroblk create-md --config {} vol0", meta.display(), alpha.display())
    );

    let (ok, out) = create_md(&alpha, false);
    assert!(ok, "{out}");
    assert!(out.contains("metadata of volume vol0 on node"), "{out}");
    assert_eq!(std::fs::metadata(&meta).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(open_as(&alpha, &meta), Ok(1024), "64 MiB at 64 KiB regions");

    let (ok, out) = create_md(&alpha, false);
    assert!(!ok);
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    assert!(out.contains("exists; refusing to overwrite it") && out.contains("--force"), "{out}");
    let (ok, out) = create_md(&alpha, true);
    assert!(ok, "{out}");

    // Foreign: beta's config opening alpha's file (another node), or a resized volume.
    let e = open_as(&beta, &meta).unwrap_err();
    assert!(e.ends_with("belongs to node alpha (this node is beta); is it the peer's file?"), "{e}");
    let text = std::fs::read_to_string(&alpha).unwrap().replace("size = 67108864", "size = 134217728");
    let bigger = dir.path().join("bigger.toml");
    std::fs::write(&bigger, text).unwrap();
    let e = open_as(&bigger, &meta).unwrap_err();
    assert!(e.contains("is for a volume of 67108864 bytes (this volume is 134217728 bytes)"), "{e}");

    // Corrupt: both superblock copies damaged.
    let mut bytes = std::fs::read(&meta).unwrap();
    bytes[40] ^= 0xFF;
    bytes[4096 + 40] ^= 0xFF;
    std::fs::write(&meta, &bytes).unwrap();
    let e = open_as(&alpha, &meta).unwrap_err();
    assert_eq!(
        e,
        format!(
            "{}: corrupt superblock (checksum mismatch in both copies); restore it or run metroblk create-md --force",
            meta.display()
        )
    );

    // A config without that volume.
    let mut cmd = Command::new(metroblk_bin());
    let out = cmd.args(["create-md", "--config"]).arg(&alpha).arg("vol9").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no volume 'vol9' (it configures: vol0)"));
}

/// `metroblk node run` as an operator starts it: a missing, foreign (the peer's) or corrupt
/// metadata file stops it with one line naming the file, and the backing file is not created.
#[test]
fn a_node_refuses_to_start_on_missing_foreign_or_corrupt_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let spec_beta =
        NodeSpec { listen_port: metroblk_tests::cluster::free_port(), ..spec("beta", "alpha", "secondary") };
    write_config(dir.path(), &spec("alpha", "beta", "primary"));
    let beta = write_config(dir.path(), &spec_beta);
    let meta = dir.path().join("beta-vol0.meta");
    let alpha_meta = dir.path().join("alpha-vol0.meta");
    let run = || {
        let out = Command::new(metroblk_bin()).args(["node", "run", "--config"]).arg(&beta).output().unwrap();
        assert!(!out.status.success(), "the node started");
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(!dir.path().join("beta-vol0.img").exists(), "a refused node created its backing file");
        err
    };
    std::fs::remove_file(&meta).unwrap();
    let e = run();
    assert!(e.contains("beta-vol0.meta: missing; create it with metroblk create-md --config"), "{e}");
    std::fs::copy(&alpha_meta, &meta).unwrap();
    let e = run();
    assert!(e.contains("belongs to node alpha (this node is beta)"), "{e}");
    let mut bytes = std::fs::read(&alpha_meta).unwrap();
    bytes[100] ^= 1;
    bytes[4096 + 100] ^= 1;
    std::fs::write(&meta, bytes).unwrap();
    let e = run();
    assert!(e.contains("corrupt superblock"), "{e}");
}
