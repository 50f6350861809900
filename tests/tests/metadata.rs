//! `metroblk create-md`, as an operator runs it: creates the metadata file (mode 0600),
//! refuses to overwrite it without --force, names a wrong volume in one line.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use metroblk_tests::cluster::{free_port, metroblk_bin, write_config, NodeSpec, TEST_KEY};

fn create_md(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(metroblk_bin()).arg("create-md").arg("--config").arg(config).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn create_md_creates_refuses_to_overwrite_and_forces() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &NodeSpec {
            name: "beta",
            peer: "alpha",
            role: "secondary",
            size: 64 << 20,
            listen_port: free_port(),
            peer_port: free_port(),
            key: TEST_KEY,
            extra: "",
        },
    );
    let meta = dir.path().join("beta-vol0.meta");
    let (ok, text) = create_md(&config, &["vol0"]);
    assert!(ok, "{text}");
    assert!(text.contains("1024 regions of 65536 bytes"), "{text}");
    assert_eq!(std::fs::metadata(&meta).unwrap().permissions().mode() & 0o777, 0o600);
    let before = std::fs::read(&meta).unwrap();

    let (ok, text) = create_md(&config, &["vol0"]);
    assert!(!ok && text.contains("already exists") && text.trim().lines().count() == 1, "{text}");
    assert_eq!(std::fs::read(&meta).unwrap(), before, "refused, yet the file changed");

    let (ok, text) = create_md(&config, &["vol0", "--force"]);
    assert!(ok, "{text}");
    assert_ne!(std::fs::read(&meta).unwrap(), before, "--force writes a new generation");

    let (ok, text) = create_md(&config, &["vol9"]);
    assert!(!ok && text.contains("no volume 'vol9' (it configures: vol0)"), "{text}");
}
