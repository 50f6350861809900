//! The mirrored block device end to end: a primary and a secondary `metroblk node run` on
//! loopback, the primary's `/dev/ublkbN` under a real ext4.
//!
//! These need ublk: they run natively where the kernel has ublk_drv, else in the QEMU VM of
//! tests/vm (see metroblk_tests::ublk_env); they are never skipped. Backing files live in the
//! VM's tmpfs /tmp; the binaries are the ones cargo built (`cargo build -p metroblk` first;
//! `cargo test --workspace` does that).
//!
//! Run: `cargo test -p metroblk-tests --test ublk_device -- --nocapture`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use metroblk_tests::cluster::TEST_KEY;
use metroblk_tests::ublk_env::{self, UBLK_CONTROL};
use metroblk_tests::vm;

/// Each test boots its own VM under TCG; the work itself takes well under a minute.
const TIMEOUT: Duration = Duration::from_secs(150);

/// Shell helpers shared by the scripts: two node configs in $W (a tmpfs), starting and
/// stopping nodes, waiting for the device, and dumping the logs when anything fails.
const COMMON: &str = r#"
set -euo pipefail
BIN="${METROBLK_BIN_DIR:?}/metroblk"
W=/tmp/metroblk-ublk-test
rm -rf "$W"; mkdir -p "$W" /tmp/mnt
T0=$(date +%s%N)
step() { echo "--- [$(( ($(date +%s%N) - T0) / 1000000 )) ms] $*"; }
dump_logs() {
    set +e
    for f in "$W"/*.log; do echo "===== $f"; tail -n 40 "$f"; done
    dmesg | tail -n 30
}
set -E
trap 'echo "FAILED at line $LINENO: $BASH_COMMAND"' ERR
trap 'rc=$?; [ $rc = 0 ] || dump_logs' EXIT

printf '%s\n' "$KEY" > "$W/key"
# config NAME PEER ROLE LISTEN_PORT PEER_PORT [EXTRA_VOLUME_LINES]
config() {
    cat > "$W/$1.toml" <<EOF
[node]
name = "$1"
control_socket = "$W/$1.sock"

[[volume]]
name = "vol0"
size = "$SIZE"
backing_file = "$W/$1.img"
metadata_file = "$W/$1.meta"
listen = "127.0.0.1:$4"
role = "$3"
queues = 2
depth = 64
${6:-}
[volume.peer]
name = "$2"
address = "127.0.0.1:$5"
authkey_file = "$W/key"
EOF
}
config alpha beta primary 7801 7802 "${ALPHA_EXTRA:-}"
config beta alpha secondary 7802 7801

# start NAME LOGSUFFIX: runs the node in the background; its pid is in PID_<NAME>.
start() {
    "$BIN" node run --config "$W/$1.toml" 2> "$W/$1$2.log" &
    eval "PID_$1=$!"
}
status_field() { # NODE FIELD
    "$BIN" status --json --config "$W/$1.toml" 2>/dev/null | sed -n "s/^ *\"$2\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" | head -n 1 || true
}
# Waits until the primary reports its device, the block device exists and the link is up.
wait_device() {
    for _ in $(seq 600); do
        DEV=$(status_field alpha ublk_device)
        if [ -n "$DEV" ] && [ -b "$DEV" ] && [ "$(status_field alpha link_state)" = connected ]; then
            return 0
        fi
        sleep 0.1
    done
    echo "the primary's device did not come up"; return 1
}
# stop NAME: SIGTERM, and the node must exit 0.
stop() {
    local pid; eval "pid=\$PID_$1"
    kill -TERM "$pid"
    wait "$pid"
}
# COUNT files of SIZE random bytes (one process, quick under TCG): write_files DIR PREFIX COUNT SIZE
write_files() {
    head -c $(( $3 * $4 )) /dev/urandom | split -b "$4" -a 3 - "$1/$2"
}
# Files written one by one, each made durable (fsync: FLUSH/FUA), slow enough to be busy
# for a few seconds: write_synced DIR PREFIX COUNT
write_synced() {
    for i in $(seq "$3"); do
        dd if=/dev/urandom of="$1/$2$i" bs=48k count=1 conv=fsync status=none
    done
}
# The secondary's copy, attached read-only to a loop device, holds the same files.
check_secondary_copy() {
    local loop
    loop=$(losetup --read-only --find --show "$W/beta.img")
    mkdir -p /tmp/mnt2
    mount -t ext4 -o ro,noload "$loop" /tmp/mnt2
    (cd /tmp/mnt2 && sha256sum --quiet -c "$W/sums")
    [ "$(find /tmp/mnt2 -type f | wc -l)" = "$(wc -l < "$W/sums")" ]
    umount /tmp/mnt2
    losetup -d "$loop"
}
"#;

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
kill -KILL "$PID_alpha"
wait "$PID_alpha" || true
sleep 1
[ -b "$DEV" ]
[ ! -e "$W/writer.done" ] || echo "note: the writer finished before the kill"
step "restart the primary: it recovers $DEV"
start alpha "-restarted"
wait_device
[ "$DEV" = "$FIRST_DEV" ]
grep -q "recovering it" "$W/alpha-restarted.log"
grep -q "ublk device is live.*recovered=true" "$W/alpha-restarted.log"
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
step "clean shutdown"
stop alpha
[ ! -e "$DEV" ]
stop beta
step "primary and secondary backing files are identical"
cmp "$W/alpha.img" "$W/beta.img"
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

fn script(body: &str, alpha_extra: &str) -> String {
    format!("KEY='{TEST_KEY}'\nSIZE=256MiB\nALPHA_EXTRA='{alpha_extra}'\n{COMMON}\n{body}")
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn check_binary() {
    let bin = vm::bin_dir().map(|d| d.join("metroblk"));
    assert!(
        bin.as_deref().is_some_and(Path::is_file),
        "{:?} is missing: build it first with `cargo build -p metroblk`",
        bin
    );
}

fn run(body: &str, alpha_extra: &str, steps: &[&str]) {
    check_binary();
    let run = ublk_env::run_with_ublk(&script(body, alpha_extra), TIMEOUT).expect("a place to run ublk tests");
    assert!(run.success(), "the script failed (status {}):\n{}", run.status, tail(&run.output, 120));
    for s in steps {
        assert!(run.output.contains(s), "step {s:?} missing from the output:\n{}", run.output);
    }
}

#[test]
fn ext4_on_the_mirrored_device_is_identical_on_both_nodes() {
    run(FILESYSTEM, "ublk_id = 7", &["mkfs.ext4", "write 300 files", "clean shutdown", "are identical", "all good"]);
}

#[test]
fn kill_9_of_the_primary_keeps_the_device_and_the_filesystem() {
    run(KILL_AND_RECOVER, "", &["kill -9 the primary", "recovers", "writer finishes", "are identical", "all good"]);
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
    check_binary();
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
