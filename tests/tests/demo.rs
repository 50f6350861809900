//! `metroblk demo --scripted`: the README's main job, run where ublk is (natively or in the VM);
//! and its export leg (`--export`: a host, this machine's open-iscsi, across a switchover).

use std::time::Duration;

use metroblk_tests::cluster::metroblk_bin;
use metroblk_tests::ublk_env::run_with_ublk;

#[test]
fn the_scripted_demo_mirrors_a_filesystem() {
    let bin = metroblk_bin();
    let script = format!("set -e\n{} demo --scripted --dir /tmp/metroblk-demo-test\n", bin.display());
    let run = run_with_ublk(&script, Duration::from_secs(240)).expect("VM harness");
    assert_eq!(run.status, 0, "demo failed:\n{}", run.output);
    assert!(run.output.contains("mirrored device /dev/ublkb0 is up"), "{}", run.output);
    assert!(run.output.contains("link connected"), "{}", run.output);
    assert!(run.output.contains("both copies identical"), "{}", run.output);
    assert!(run.output.contains("site-b promoted by the witness"), "{}", run.output);
    assert!(run.output.contains("the promoted node's device shows the same files"), "{}", run.output);
    assert!(run.output.contains("site-a is secondary in epoch 2, in sync"), "{}", run.output);
}

/// `metroblk demo --scripted --export`: this machine's open-iscsi writes through the export
/// across a switchover, with no failed write and the same serial and NAA.
#[test]
fn the_export_demo_keeps_the_host_writing_across_a_switchover() {
    let bin = metroblk_bin();
    let script = format!("set -e\n{} demo --scripted --export --dir /tmp/metroblk-demo-export\n", bin.display());
    let run = run_with_ublk(&script, Duration::from_secs(240)).expect("VM harness");
    assert_eq!(run.status, 0, "demo failed:\n{}", run.output);
    assert!(run.output.contains("the host logged in: /dev/sd"), "{}", run.output);
    assert!(run.output.contains("handed over to site-b"), "{}", run.output);
    assert!(run.output.contains(" 0 failed"), "{}", run.output);
    assert!(run.output.contains("no write failed at the host"), "{}", run.output);
    assert!(run.output.contains("the same serial and NAA before and after"), "{}", run.output);
    assert!(run.output.contains("reads back through /dev/sd"), "{}", run.output);
}
