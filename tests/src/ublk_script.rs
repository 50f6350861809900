//! The bash side of the ublk end-to-end tests (tests/tests/ublk_*.rs): a prelude that writes
//! the configs of a primary `alpha` and a secondary `beta` on loopback, starts and stops
//! `metroblk node run`, waits for the primary's `/dev/ublkbN` and dumps the logs when a step
//! fails; and [`run`], which runs a test body after that prelude where ublk works (natively or
//! in the VM, see [`crate::ublk_env`]) and asserts that it succeeded.
//!
//! What the prelude gives a body:
//! - `$BIN` (the metroblk binary), `$W` (scratch directory on a tmpfs: configs, backing files
//!   `$W/alpha.img` and `$W/beta.img`, logs), `/tmp/mnt` (an empty mount point);
//! - `step TEXT`: prints `--- [ms] TEXT` (tests assert on these lines);
//! - `start NODE LOGSUFFIX` (pid in `$PID_<NODE>`), `stop NODE` (SIGTERM, must exit 0),
//!   `kill9 NODE` (SIGKILL, no clean shutdown);
//! - `wait_device`: the primary reports its device, it exists, the link is up; sets `$DEV`;
//! - `status_field NODE FIELD`: one field of `metroblk status --json`;
//! - `write_files DIR PREFIX COUNT SIZE`, `write_synced DIR PREFIX COUNT`: files of random bytes;
//! - `check_secondary_copy [FSTYPE] [MOUNT_OPTIONS]`: the secondary's backing file, attached
//!   read-only to a loop device and mounted, holds exactly the files listed in `$W/sums`
//!   (`sha256sum` lines relative to the mount point); default `ext4 ro,noload`.

use std::path::Path;
use std::time::Duration;

use crate::cluster::TEST_KEY;
use crate::ublk_env;
use crate::vm::{self, VmRun};

/// Each test boots its own VM under TCG; the work itself should take well under a minute.
pub const TIMEOUT: Duration = Duration::from_secs(150);

/// The shell prelude every test body runs after (see the module docs).
pub const PRELUDE: &str = r#"
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
chmod 600 "$W/key"
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
    "$BIN" create-md --force --config "$W/$1.toml" vol0 >/dev/null
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
# kill9 NAME: SIGKILL (no clean shutdown of any kind), and reap it.
kill9() {
    local pid; eval "pid=\$PID_$1"
    kill -KILL "$pid"
    wait "$pid" || true
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
# The secondary's copy, attached read-only to a loop device, holds the same files:
# check_secondary_copy [FSTYPE] [MOUNT_OPTIONS]
check_secondary_copy() {
    local loop
    loop=$(losetup --read-only --find --show "$W/beta.img")
    mkdir -p /tmp/mnt2
    mount -t "${1:-ext4}" -o "${2:-ro,noload}" "$loop" /tmp/mnt2
    (cd /tmp/mnt2 && sha256sum --quiet -c "$W/sums")
    [ "$(find /tmp/mnt2 -type f | wc -l)" = "$(wc -l < "$W/sums")" ]
    umount /tmp/mnt2
    losetup -d "$loop"
}
"#;

/// How a body runs: the volume size (a `size` value of the config) and extra config lines for
/// the primary's volume.
#[derive(Debug, Clone, Copy)]
pub struct Opts<'a> {
    pub size: &'a str,
    pub alpha_extra: &'a str,
    pub timeout: Duration,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts { size: "256MiB", alpha_extra: "", timeout: TIMEOUT }
    }
}

/// The whole script: the variables the prelude reads, the prelude, then `body`.
pub fn script(body: &str, opts: &Opts) -> String {
    format!("KEY='{TEST_KEY}'\nSIZE='{}'\nALPHA_EXTRA='{}'\n{PRELUDE}\n{body}", opts.size, opts.alpha_extra)
}

/// Fails the test at once when the metroblk binary has not been built.
pub fn check_binary() {
    let bin = vm::bin_dir().map(|d| d.join("metroblk"));
    assert!(
        bin.as_deref().is_some_and(Path::is_file),
        "{:?} is missing: build it first with `cargo build -p metroblk`",
        bin
    );
}

/// Runs the prelude and `body` where ublk works and asserts that the script exited 0 and
/// printed each of `steps` (so a body that silently skipped its work fails).
pub fn run(body: &str, opts: &Opts, steps: &[&str]) -> VmRun {
    check_binary();
    let run = ublk_env::run_with_ublk(&script(body, opts), opts.timeout).expect("a place to run ublk tests");
    assert!(run.success(), "the script failed (status {}):\n{}", run.status, vm::tail(&run.output, 120));
    for s in steps {
        assert!(run.output.contains(s), "step {s:?} missing from the output:\n{}", run.output);
    }
    run
}
