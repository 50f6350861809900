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
//!   `kill9 NODE` (SIGKILL, no clean shutdown); `stop_both_and_compare` (both stopped, the
//!   primary's device gone, the two backing files identical);
//! - `wait_device`: the primary reports its device, it exists, the link is up; sets `$DEV`;
//! - `status_field NODE FIELD`: one field of `metroblk status --json`; `field_is NODE FIELD
//!   VALUE`; `wait_for SECONDS WHAT COMMAND...` (polls); `now_ms`;
//! - `write_files DIR PREFIX COUNT SIZE`, `write_synced DIR PREFIX COUNT`: files of random bytes;
//! - `check_secondary_copy [FSTYPE] [MOUNT_OPTIONS] [NODE]`: NODE's (beta's) backing file,
//!   attached read-only to a loop device and mounted, holds exactly the files listed in
//!   `$W/sums` (`sha256sum` lines relative to the mount point); default `ext4 ro,noload`.
//! - with `Opts::sites`: three network namespaces (sa: alpha, sb: beta, sw: the witness)
//!   joined pairwise by veth links (`cut_link sa ab`, `heal_link sa ab`; ab, aw, bw), `start_witness`,
//!   `in_site NODE COMMAND...`; `$WRITER` is the `blk_writer` binary.

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
# ns_of NODE: the network namespace a node runs in ("" on loopback).
ns_of() { case "$TOPOLOGY:$1" in sites:alpha) echo sa ;; sites:beta) echo sb ;; sites:witness) echo sw ;; *) echo "" ;; esac; }
# in_site NODE COMMAND...: runs COMMAND in NODE's network namespace.
in_site() {
    local ns; ns=$(ns_of "$1"); shift
    if [ -n "$ns" ]; then ip netns exec "$ns" "$@"; else "$@"; fi
}
# config NAME PEER ROLE LISTEN PEER_ADDRESS [EXTRA_VOLUME_LINES] [EXTRA_SECTIONS]
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
listen = "$4"
role = "$3"
queues = 2
depth = 64
${6:-}
[volume.peer]
name = "$2"
address = "$5"
authkey_file = "$W/key"
${7:-}
EOF
    "$BIN" create-md --force --config "$W/$1.toml" vol0 >/dev/null
}
if [ "$TOPOLOGY" = sites ]; then
    # Three sites in network namespaces: sa (alpha), sb (beta), sw (the witness), a veth
    # link between each pair. `cut_link NS DEV` / `heal_link NS DEV`: ab (alpha-beta), aw (alpha-witness),
    # bw (beta-witness), all from the first site's end.
    for ns in sa sb sw; do ip netns del $ns 2>/dev/null || true; ip netns add $ns; ip -n $ns link set lo up; done
    veth() { # NS1 DEV1 ADDR1 NS2 DEV2 ADDR2
        ip -n "$1" link add "$2" type veth peer name "$5" netns "$4"
        ip -n "$1" addr add "$3/30" dev "$2"; ip -n "$4" addr add "$6/30" dev "$5"
        ip -n "$1" link set "$2" up; ip -n "$4" link set "$5" up
    }
    veth sa ab 10.88.1.1 sb ba 10.88.1.2
    veth sa aw 10.88.2.1 sw wa 10.88.2.2
    veth sb bw 10.88.3.1 sw wb 10.88.3.2
    cut_link() { ip -n "$1" link set "$2" down; }
    heal_link() { ip -n "$1" link set "$2" up; }
    printf '%s\n' "witness-$KEY" > "$W/witness.key"
    chmod 600 "$W/witness.key"
    cat > "$W/witness.toml" <<EOF
listen = "0.0.0.0"
port = 9095
authkey_file = "$W/witness.key"
state_file = "$W/witness.state"
EOF
    wsec() { # WITNESS_ADDRESS
        printf '[volume.witness]\naddress = "%s"\nauthkey_file = "%s"\nlease_ms = %s\n' "$1" "$W/witness.key" "$LEASE_MS"
    }
    config alpha beta primary 10.88.1.1:7801 10.88.1.2:7802 "ublk_id = 0
${ALPHA_EXTRA:-}
${NODE_EXTRA:-}" "$(wsec 10.88.2.2:9095)"
    config beta alpha secondary 10.88.1.2:7802 10.88.1.1:7801 "ublk_id = 1
${ALPHA_EXTRA:-}
${NODE_EXTRA:-}" "$(wsec 10.88.3.2:9095)"
    start_witness() {
        (exec ip netns exec sw "$BIN" witness run --config "$W/witness.toml" 2>> "$W/witness.log") &
        PID_witness=$!
    }
else
    config alpha beta primary 127.0.0.1:7801 127.0.0.1:7802 "${ALPHA_EXTRA:-}
${NODE_EXTRA:-}"
    config beta alpha secondary 127.0.0.1:7802 127.0.0.1:7801 "${NODE_EXTRA:-}"
fi

# start NAME LOGSUFFIX: runs the node in the background; its pid is in PID_<NAME>.
# (`exec` in the background subshell: $! is the node's own pid, which `stop` signals.)
start() {
    local ns; ns=$(ns_of "$1")
    if [ -n "$ns" ]; then
        (exec ip netns exec "$ns" "$BIN" node run --config "$W/$1.toml" 2>> "$W/$1$2.log") &
    else
        (exec "$BIN" node run --config "$W/$1.toml" 2>> "$W/$1$2.log") &
    fi
    eval "PID_$1=$!"
}
status_field() { # NODE FIELD
    "$BIN" status --json --config "$W/$1.toml" 2>/dev/null | sed -n "s/^ *\"$2\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" | head -n 1 || true
}
# wait_device [NODE [LINK_STATE]]: waits until NODE (alpha) reports its device, the block
# device exists and its link is in LINK_STATE (connected; "any" for any); sets $DEV.
wait_device() {
    local node=${1:-alpha} want=${2:-connected}
    for _ in $(seq 600); do
        DEV=$(status_field "$node" ublk_device)
        if [ -n "$DEV" ] && [ -b "$DEV" ] && { [ "$want" = any ] || [ "$(status_field "$node" link_state)" = "$want" ]; }; then
            return 0
        fi
        sleep 0.1
    done
    echo "the device of $node did not come up"; return 1
}
# stop NAME: SIGTERM, and the node must exit 0.
stop() {
    local pid; eval "pid=\$PID_$1"
    kill -TERM "$pid"
    wait "$pid"
}
# stop_both_and_compare: clean shutdown (the primary's device is gone once it exited), then the
# two backing files must be identical.
stop_both_and_compare() {
    step "clean shutdown"
    stop alpha
    [ ! -e "$DEV" ]
    stop beta
    step "primary and secondary backing files are identical"
    cmp "$W/alpha.img" "$W/beta.img"
}
# kill9 NAME: SIGKILL (no clean shutdown of any kind), and reap it.
kill9() {
    local pid; eval "pid=\$PID_$1"
    kill -KILL "$pid"
    wait "$pid" || true
}
# wait_for SECONDS WHAT COMMAND...: polls COMMAND every 0.2 s.
wait_for() {
    local secs=$1 what=$2; shift 2
    # A wall-clock bound: a slow COMMAND (a status call waiting on a busy node) must not
    # stretch the wait past SECONDS.
    local end=$(( $(date +%s) + secs ))
    while [ "$(date +%s)" -lt "$end" ]; do
        if "$@"; then return 0; fi
        sleep 0.2
    done
    echo "timed out after $secs s waiting for $what"; return 1
}
field_is() { [ "$(status_field "$1" "$2")" = "$3" ]; }
now_ms() { date +%s%3N; }
# served_ms LOG VOLUME...: when LOG (a node's log under $W) last said it serves each VOLUME as
# primary, the latest of them, in ms since the epoch; nothing (and failure) if one never did.
# The daemon's own time: a status poll under TCG can see it seconds later.
served_ms() {
    local log=$1 v t last=0; shift
    for v in "$@"; do
        t=$(grep -F "primary serving its block device volume=$v device=" "$W/$log" | tail -n 1 | cut -d' ' -f1)
        [ -n "$t" ] || return 1
        t=$(date -d "$t" +%s%3N)
        [ "$t" -gt "$last" ] && last=$t
    done
    echo "$last"
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
    loop=$(losetup --read-only --find --show "$W/${3:-beta}.img")
    mkdir -p /tmp/mnt2
    mount -t "${1:-ext4}" -o "${2:-ro,noload}" "$loop" /tmp/mnt2
    (cd /tmp/mnt2 && sha256sum --quiet -c "$W/sums")
    [ "$(find /tmp/mnt2 -type f | wc -l)" = "$(wc -l < "$W/sums")" ]
    umount /tmp/mnt2
    losetup -d "$loop"
}
"#;

/// Shell helpers of the three-site scenarios (after the prelude, with `Opts::sites`):
/// `start_all` (the witness, beta, then alpha with its device and lease; `$DEV_A`),
/// `promoted NODE`, `leased NODE`, `in_sync_as PRIMARY SECONDARY`.
pub const SITE_HELPERS: &str = r#"
promoted() { field_is "$1" role primary && [ -b "$(status_field "$1" ublk_device)" ]; }
leased() { [ "$(status_field "$1" lease_left_ms)" -gt 0 ] 2>/dev/null; }
in_sync_as() { # PRIMARY SECONDARY
    field_is "$1" sync_state in-sync && field_is "$2" disk_state up-to-date && field_is "$1" alone false
}
start_all() {
    start_witness
    start beta ""
    start alpha ""
    wait_device alpha
    wait_for 30 "alpha's lease" leased alpha
    DEV_A=$DEV
}
"#;

/// How a body runs: the volume size (a `size` value of the config), extra config lines for
/// the primary's volume and for both nodes' volumes, and where the nodes run.
#[derive(Debug, Clone, Copy)]
pub struct Opts<'a> {
    pub size: &'a str,
    pub alpha_extra: &'a str,
    /// Config lines for the volume of both nodes (settings the handshake compares).
    pub node_extra: &'a str,
    pub timeout: Duration,
    /// Three sites with a witness (see the prelude) instead of loopback.
    pub sites: bool,
    /// The witness lease of the sites' volumes.
    pub lease_ms: u64,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts { size: "256MiB", alpha_extra: "", node_extra: "", timeout: TIMEOUT, sites: false, lease_ms: 2000 }
    }
}

/// The whole script: the variables the prelude reads, the prelude, then `body`.
pub fn script(body: &str, opts: &Opts) -> String {
    format!(
        "KEY='{TEST_KEY}'\nSIZE='{}'\nALPHA_EXTRA='{}'\nNODE_EXTRA='{}'\nTOPOLOGY='{}'\nLEASE_MS='{}'\nWRITER='{}'\n{PRELUDE}\n{body}",
        opts.size,
        opts.alpha_extra,
        opts.node_extra,
        if opts.sites { "sites" } else { "loopback" },
        opts.lease_ms,
        writer_bin().display(),
    )
}

/// The `blk_writer` binary (tests/src/bin/blk_writer.rs), built beside the metroblk binary.
pub fn writer_bin() -> std::path::PathBuf {
    vm::bin_dir().map(|d| d.join("blk_writer")).unwrap_or_default()
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
