//! The mirrored block device end to end: a primary and a secondary `metroblk node run` on
//! loopback, the primary's `/dev/ublkbN` under a real ext4.
//!
//! These need ublk: they run natively where the kernel has ublk_drv, else in the QEMU VM of
//! tests/vm (see metroblk_tests::ublk_env); they are never skipped. Backing files live in the
//! VM's tmpfs /tmp; the binaries are the ones cargo built (`cargo build -p metroblk` first;
//! `cargo test --workspace` does that). The bash prelude (configs, starting and stopping the
//! nodes, waiting for the device) is metroblk_tests::ublk_script, shared with ublk_workloads.rs.
//!
//! Run: `cargo test -p metroblk-tests --test ublk_device -- --nocapture`

use std::path::{Path, PathBuf};
use std::process::Command;

use metroblk_tests::cluster::TEST_KEY;
use metroblk_tests::ublk_env::{self, UBLK_CONTROL};
use metroblk_tests::ublk_script::{self, Opts};
use metroblk_tests::vm;

/// mkfs.ext4, mount, files, sync, umount, fsck, clean shutdown, both copies identical.
const FILESYSTEM: &str = r#"
step "start the secondary and the primary"
start beta ""
start alpha ""
wait_device
step "device $DEV is up; mkfs.ext4"
[ "$(cat /sys/block/${DEV#/dev/}/queue/logical_block_size)" = 512 ]
[ "$(cat /sys/block/${DEV#/dev/}/queue/physical_block_size)" = 4096 ]
[ "$(cat /sys/block/${DEV#/dev/}/queue/write_cache)" = "write back" ]
[ "$(cat /sys/block/${DEV#/dev/}/queue/fua)" = 1 ]
[ "$(cat /sys/block/${DEV#/dev/}/queue/rotational)" = 0 ]
[ "$(cat /sys/block/${DEV#/dev/}/queue/discard_max_bytes)" -gt 0 ]
[ "$(cat /sys/block/${DEV#/dev/}/queue/io_timeout)" = 2000 ]
# io_scheduler = "none" (the default), not the kernel's mq-deadline.
grep -q '\[none\]' /sys/block/${DEV#/dev/}/queue/scheduler
# queue_affinity = "single-cpu" (the default): the queue's thread may run on one CPU only.
QCPUS=none
for t in /proc/$PID_alpha/task/*; do
    if grep -q '^Name:.*-q0$' "$t/status"; then
        QCPUS=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' "$t/status")
    fi
done
step "queue 0's thread runs on CPU $QCPUS"
case "$QCPUS" in none|*[,-]*) grep -h 'Name\|Cpus_allowed_list' /proc/$PID_alpha/task/*/status; echo "the queue thread is not pinned to one CPU"; false ;; esac
mkfs.ext4 -q -F "$DEV"
mount -t ext4 "$DEV" /tmp/mnt
step "write 300 files"
mkdir /tmp/mnt/d1 /tmp/mnt/d2
write_files /tmp/mnt/d1 f 150 7000
write_files /tmp/mnt/d2 g 150 61000
sync
step "delete a few files and trim (DISCARD)"
rm /tmp/mnt/d2/gaaa /tmp/mnt/d2/gaab
fstrim -v /tmp/mnt
(cd /tmp/mnt && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$W/sums"
[ "$(wc -l < "$W/sums")" = 298 ]
sync
umount /tmp/mnt
step "e2fsck"
e2fsck -fn "$DEV"
"$BIN" status --config "$W/alpha.toml"
step "clean shutdown (SIGTERM): the device is stopped and deleted"
stop alpha
for _ in $(seq 50); do [ -e "$DEV" ] || break; sleep 0.1; done
[ ! -e "$DEV" ]
[ ! -e "/sys/class/ublk-char/ublkc${DEV#/dev/ublkb}" ]
stop beta
step "primary and secondary backing files are identical"
cmp "$W/alpha.img" "$W/beta.img"
step "the secondary's copy mounts and holds the same files"
check_secondary_copy
step "all good"
"#;

/// kill -9 of the primary under a mounted, busy filesystem; restart; the device stays and the
/// filesystem keeps working.
const KILL_AND_RECOVER: &str = r#"
step "start the secondary and the primary (the driver picks the ublk id)"
start beta ""
start alpha ""
wait_device
FIRST_DEV=$DEV
grep -qx "${DEV#/dev/ublkb}" "$W/alpha.meta.ublk-id"
# The configured scheduler (this test's alpha config: io_scheduler = "mq-deadline").
grep -q '\[mq-deadline\]' /sys/block/${DEV#/dev/}/queue/scheduler
mkfs.ext4 -q -F "$DEV"
mount -t ext4 "$DEV" /tmp/mnt
mkdir /tmp/mnt/before /tmp/mnt/during
write_files /tmp/mnt/before f 100 20000
sync
step "a writer runs while the primary is killed"
( write_synced /tmp/mnt/during w 60; touch "$W/writer.done" ) &
WRITER=$!
sleep 1
step "kill -9 the primary"
kill9 alpha
sleep 1
[ -b "$DEV" ]
[ ! -e "$W/writer.done" ] || echo "note: the writer finished before the kill"
step "restart the primary: it recovers $DEV"
start alpha "-restarted"
wait_device
[ "$DEV" = "$FIRST_DEV" ]
grep -q "recovering it" "$W/alpha-restarted.log"
grep -q "ublk device is live.*recovered=true" "$W/alpha-restarted.log"
grep -q '\[mq-deadline\]' /sys/block/${DEV#/dev/}/queue/scheduler
step "the writer finishes on the recovered device"
for _ in $(seq 600); do [ -e "$W/writer.done" ] && break; sleep 0.1; done
[ -e "$W/writer.done" ]
wait "$WRITER"
write_files /tmp/mnt/during x 20 30000
(cd /tmp/mnt && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$W/sums"
[ "$(wc -l < "$W/sums")" = 180 ]
umount /tmp/mnt
step "e2fsck"
e2fsck -fn "$DEV"
"$BIN" status --config "$W/alpha.toml"
stop_both_and_compare
check_secondary_copy
step "all good"
"#;

/// SIGTERM does not pull a device from under its users: a mounted device, or one with
/// writes waiting for a lost peer, is left for recovery, as after kill -9.
const TERM_WHILE_BUSY: &str = r#"
start beta ""
start alpha ""
wait_device
mkfs.ext4 -q -F "$DEV"
mount -t ext4 "$DEV" /tmp/mnt
mkdir /tmp/mnt/a /tmp/mnt/b
write_files /tmp/mnt/a f 50 20000
sync
step "SIGTERM while mounted: the primary exits and leaves the device"
stop alpha
grep -q "in use" "$W/alpha.log"
[ -b "$DEV" ]
start alpha "-2"
wait_device
grep -q "ublk device is live.*recovered=true" "$W/alpha-2.log"
write_files /tmp/mnt/a g 50 20000
sync
step "SIGTERM while writes wait for the lost peer: the device is left, the writes wait"
stop beta
( write_synced /tmp/mnt/b w 20; touch "$W/writer.done" ) &
WRITER=$!
for _ in $(seq 100); do [ "$(status_field alpha requests_held)" -gt 0 ] 2>/dev/null && break; sleep 0.1; done
[ "$(status_field alpha requests_held)" -gt 0 ]
stop alpha
grep -q "requests wait for peer beta" "$W/alpha-2.log"
[ -b "$DEV" ]
[ ! -e "$W/writer.done" ]
step "restart both: the held writes are reissued and complete"
start beta "-2"
start alpha "-3"
wait_device
for _ in $(seq 600); do [ -e "$W/writer.done" ] && break; sleep 0.1; done
wait "$WRITER"
(cd /tmp/mnt && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$W/sums"
[ "$(wc -l < "$W/sums")" = 120 ]
umount /tmp/mnt
e2fsck -fn "$DEV"
step "unmounted, SIGTERM deletes the device"
stop alpha
[ ! -e "$DEV" ]
stop beta
cmp "$W/alpha.img" "$W/beta.img"
check_secondary_copy
step "all good"
"#;

fn run(body: &str, alpha_extra: &str, steps: &[&str]) {
    ublk_script::run(body, &Opts { alpha_extra, ..Opts::default() }, steps);
}

#[test]
fn ext4_on_the_mirrored_device_is_identical_on_both_nodes() {
    run(FILESYSTEM, "ublk_id = 7", &["mkfs.ext4", "write 300 files", "clean shutdown", "are identical", "all good"]);
}

#[test]
fn kill_9_of_the_primary_keeps_the_device_and_the_filesystem() {
    run(
        KILL_AND_RECOVER,
        "io_scheduler = \"mq-deadline\"",
        &["kill -9 the primary", "recovers", "writer finishes", "are identical", "all good"],
    );
}

#[test]
fn sigterm_leaves_a_device_in_use_or_with_held_writes_for_recovery() {
    run(TERM_WHILE_BUSY, "", &["SIGTERM while mounted", "writes wait for the lost peer", "reissued", "all good"]);
}

/// On a machine whose kernel has no ublk (like the development machines) a primary node
/// fails to start with one clear line, not a panic or an io_uring errno.
#[test]
fn primary_without_ublk_fails_with_one_clear_line() {
    if Path::new(UBLK_CONTROL).exists() || ublk_env::native_ublk_available() {
        eprintln!("this machine has ublk; the missing-driver message cannot be observed here");
        return;
    }
    ublk_script::check_binary();
    let dir = tempfile::tempdir().unwrap();
    let cfg = metroblk_tests::cluster::write_config(
        dir.path(),
        &metroblk_tests::cluster::NodeSpec {
            name: "alpha",
            peer: "beta",
            role: "primary",
            size: 64 << 20,
            listen_port: metroblk_tests::cluster::free_port(),
            peer_port: metroblk_tests::cluster::free_port(),
            key: TEST_KEY,
            extra: "",
        },
    );
    let bin: PathBuf = vm::bin_dir().unwrap().join("metroblk");
    let out = Command::new(bin).args(["node", "run", "--config"]).arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "metroblk: error: volume vol0: ublk: /dev/ublk-control is missing: load the ublk_drv module \
         (modprobe ublk_drv; Linux 6.12 or newer with CONFIG_BLK_DEV_UBLK)"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Nothing was created: the device check comes before the backing file.
    assert!(!dir.path().join("alpha-vol0.img").exists());
}
