//! Hosts follow the failover (issue 24): the volume exported over iSCSI (the kernel's LIO,
//! written through configfs by the nodes) at a service address that moves with the primary
//! role; a host (the kernel's iSCSI initiator, open-iscsi) writes through its `/dev/sdX`
//! across a planned switchover and across a partition that isolates the primary, without
//! an I/O error, and sees the same serial and NAA throughout. libiscsi's user-space tools
//! (Debian libiscsi-bin) check the LUN from a session of their own: `iscsi-inq` reads the
//! same serial and NAA from both nodes, and `iscsi-test-cu` runs the SBC tests VMFS leans on
//! (COMPARE AND WRITE, XCOPY, UNMAP, WRITE SAME) that LIO passes.
//!
//! The sites are the network namespaces of `ublk_failover.rs` (alpha, beta, the witness) in
//! one VM; the host is the initial namespace (the kernel initiator logs in only from there:
//! iscsid talks to iscsi_tcp over a netlink socket of the initial namespace), reaching the
//! service address over a bridge with one veth to each site (named `svc` in both).
//!
//! One kernel for both sites means one configfs: LIO's target `iqn...:vol0` is one directory
//! for both nodes, so they hand it over in strict order: the new primary's bring-up waits
//! (`Busy`) until the old one removed it. In two kernels nothing waits. A fenced primary
//! under `on_fence = "suspend"` keeps its target until it learns it was deposed (ending its
//! sessions waits for the I/O it parked), which in one kernel would hold the new primary
//! back until the partition heals; so these nodes run `on_fence = "io-error"`: the fenced
//! primary fails what it held, after its export withdrew the service address ahead of the
//! fence, so the failures reach no host, and its target is gone in time. The test asserts
//! exactly that (no error at the host).
//!
//! Needs ublk and the kernel targets: the QEMU VM of tests/vm (its initramfs carries LIO,
//! the iSCSI initiator and a bridge), open-iscsi, sg3-utils, libiscsi-bin and arping on the host (the VM
//! runs the host's binaries; `scripts/deps.sh` installs them). Build the binaries first
//! (`cargo build -p metroblk -p metroblk-tests`).

use std::time::Duration;

use metroblk_tests::ublk_script::{self, Opts};

/// Both nodes' volume: the export, and `io-error` (see the module doc).
const NODE_EXTRA: &str = r#"on_fence = "io-error"
[volume.export]
kind = "iscsi"
address = "10.88.9.100/24"
interface = "svc""#;

const NODE_EXTRA_NVME: &str = r#"on_fence = "io-error"
[volume.export]
kind = "nvme-tcp"
address = "10.88.9.100/24"
interface = "svc""#;

/// The sites, the host's link and the helpers both tests share (after the prelude; the
/// test sets `TOOLS` and `PORT` first).
const COMMON: &str = r#"
for tool in $TOOLS; do
    command -v "$tool" >/dev/null || { echo "missing $tool: install open-iscsi sg3-utils libiscsi-bin nvme-cli arping iproute2 jq (scripts/deps.sh)"; exit 1; }
done
SVC=10.88.9.100
# not COMMAND...: fails when COMMAND succeeds (a plain `! COMMAND` never stops a `set -e` script).
not() { if "$@"; then echo "unexpectedly true: $*"; return 1; fi; }
promoted() { field_is "$1" role primary && [ -b "$(status_field "$1" ublk_device)" ]; }
leased() { [ "$(status_field "$1" lease_left_ms)" -gt 0 ] 2>/dev/null; }
acked() { grep -cv '^error' "$1" || true; }
# acked_over LOG N: LOG holds more than N acknowledged writes (for wait_for: counted at each poll).
acked_over() { [ "$(acked "$1")" -gt "$2" ]; }
in_sync_as() { # PRIMARY SECONDARY
    field_is "$1" sync_state in-sync && field_is "$2" disk_state up-to-date && field_is "$1" alone false
}
ns_of_node() { case "$1" in alpha) echo sa ;; beta) echo sb ;; esac; }
# portal_open NODE: NODE's namespace listens on the service address's iSCSI port.
portal_open() { ip netns exec "$(ns_of_node "$1")" ss -ltnH | grep "$SVC:$PORT" >/dev/null; }
holds_address() { ip -n "$(ns_of_node "$1")" -o addr show dev svc | grep " $SVC/" >/dev/null; }
mac_of() { ip -n "$(ns_of_node "$1")" link show svc | awk '/link\/ether/ {print $2}'; }
# stall LOG: the longest acknowledged write of LOG, ms (the host's wait across a failover).
stall() { "$WRITER" stats "$1" | awk '$1 == "max_latency_ms" {print $2}'; }
# start_serving: witness and nodes started; alpha, the primary, holds the address and
# listens on it, beta holds nothing.
start_serving() {
    start_witness
    start beta ""
    start alpha ""
    wait_device alpha
    wait_for 30 "alpha's lease" leased alpha
    wait_for 60 "alpha's portal" portal_open alpha
    holds_address alpha
    not holds_address beta
    step "alpha serves the export: portal $SVC:$PORT open in its site"
}
# across_switchover: a writer on the host's $DEV across `metroblk switchover` alpha -> beta;
# no error at the host, every acknowledged write on beta, $IDENTITY unchanged.
across_switchover() {
    wait_for 60 "beta in sync" in_sync_as alpha beta
    "$WRITER" write "$DEV" "$W/w1.log" 4096 &
    WPID=$!
    wait_for 30 "the host's first writes" [ -s "$W/w1.log" ]
    sleep 2
    N=$(acked "$W/w1.log")
    S0=$(now_ms)
    "$BIN" switchover --config "$W/alpha.toml" vol0
    wait_for 60 "beta's portal" portal_open beta
    S1=$(now_ms)
    wait_for 60 "the host's writes on beta" acked_over "$W/w1.log" $((N + 50))
    kill -0 "$WPID"
    not grep -q '^error' "$W/w1.log"
    not holds_address alpha
    not portal_open alpha
    step "switchover: beta's portal open $((S1 - S0)) ms after the command; the host's longest write took $(stall "$W/w1.log") ms; no error"
    kill "$WPID"; wait "$WPID" || true
    "$WRITER" check "$DEV" "$W/w1.log"
    "$WRITER" check "$(status_field beta ublk_device)" "$W/w1.log"
    $IDENTITY > "$W/id.1"
    diff "$W/id.0" "$W/id.1"
    step "after the switchover: every acknowledged write there, the same identity"
}
# across_partition: a writer on $DEV while beta, the primary, loses alpha and the witness (its
# link to the host stays up): alpha takes over, beta holds neither the address nor a portal,
# only alpha answers ARP for it; no error at the host, every acknowledged write on alpha.
across_partition() {
    wait_for 60 "alpha in sync" in_sync_as beta alpha
    "$WRITER" write "$DEV" "$W/w2.log" 4096 &
    WPID=$!
    wait_for 30 "the host's writes" [ -s "$W/w2.log" ]
    sleep 2
    N=$(acked "$W/w2.log")
    # Beta, the primary, loses alpha and the witness; its link to the host stays up.
    cut_link sa ab
    cut_link sb bw
    T_CUT=$(now_ms)
    wait_for 60 "alpha to be promoted" promoted alpha
    T_PROMOTED=$(now_ms)
    wait_for 60 "alpha's portal" portal_open alpha
    T_PORTAL=$(now_ms)
    wait_for 90 "the host's writes on alpha" acked_over "$W/w2.log" $((N + 50))
    kill -0 "$WPID"
    not grep -q '^error' "$W/w2.log"
    # The host's first write completed after the failover: the first completed after the cut
    # that waited more than a second (the writes in flight at the cut, answered by alpha).
    RESUMED=$(awk -v t="$T_CUT" '$1 != "error" && $3 > t && $4 > 1000000 {print $3; exit}' "$W/w2.log")
    step "partition: alpha promoted $((T_PROMOTED - T_CUT)) ms after the cut, its portal seen open at $((T_PORTAL - T_CUT)) ms; the host's first write after the cut completed at $((RESUMED - T_CUT)) ms (longest host write $(stall "$W/w2.log") ms); no error"
    not holds_address beta
    not portal_open beta
    ALPHA_MAC=$(mac_of alpha)
    arping -c 3 -w 5 -i br0 "$SVC" > "$W/arping" 2>&1 || true
    cat "$W/arping"
    grep -qi "$ALPHA_MAC" "$W/arping"
    [ "$(grep -ci 'bytes from' "$W/arping")" = "$(grep -ci "bytes from $ALPHA_MAC" "$W/arping")" ]
    step "the isolated old primary holds neither the address nor a portal; only alpha ($ALPHA_MAC) answers for $SVC"
    kill "$WPID"; wait "$WPID" || true
    "$WRITER" check "$DEV" "$W/w2.log"
    "$WRITER" check "$(status_field alpha ublk_device)" "$W/w2.log"
    $IDENTITY > "$W/id.2"
    diff "$W/id.0" "$W/id.2"
    step "after the partition: every acknowledged write there, the same identity"
}
# On failure, also the hosts' and targets' kernel messages and the writes after the cut.
dump_logs() {
    set +e
    for f in "$W"/*.log; do echo "===== $f"; tail -n 40 "$f"; done
    echo "===== kernel"
    dmesg | grep -E "nvme|nvmet|iSCSI|connection|I/O error|Unable" | tail -n 80
    if [ -n "${T_CUT:-}" ]; then
        echo "===== writes completed after the cut at $T_CUT"
        awk -v t="$T_CUT" '$3 > t' "$W/w2.log" | head -n 5
    fi
}
# configfs, to look at what the nodes leave behind (each node mounts it in its own mount
# namespace: `ip netns exec` mounts a fresh /sys).
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config
# The host's link: a bridge in the initial namespace, one veth to each site.
ip link add br0 type bridge
ip addr add 10.88.9.1/24 dev br0
ip link set br0 up
for s in a b; do
    ip link add "h$s" type veth peer name svc netns "s$s"
    ip link set "h$s" master br0 up
    ip -n "s$s" link set svc up
done
"#;

/// iSCSI: the kernel initiator in the initial namespace.
const ISCSI_VARS: &str = r#"
TOOLS="iscsiadm iscsid sg_inq sg_vpd sg_compare_and_write sg_unmap iscsi-inq iscsi-test-cu arping ss jq"
PORT=3260
IQN=iqn.2024-01.io.metroblk:vol0
HOST_IQN=iqn.2024-01.io.metroblk:test-host
"#;

const ISCSI: &str = r#"
# libiscsi's initiator (user space, sessions of its own beside the kernel's) on the LUN.
URL=iscsi://$SVC/$IQN/0
# The SBC tests of libiscsi's iscsi-test-cu that VMFS leans on and LIO's emulation passes
# (COMPARE AND WRITE is ATS; XCOPY, UNMAP and WRITE SAME; the README says which others
# fail against LIO and why).
CU_TESTS="SCSI.CompareAndWrite.DpoFua SCSI.CompareAndWrite.Unwritten SCSI.CompareAndWrite.InvalidDataOutSize
    SCSI.ExtendedCopy SCSI.Unmap SCSI.WriteSame16.Simple SCSI.WriteSame16.Unmap SCSI.WriteSame16.UnmapVPD
    SCSI.ReadCapacity16"
# identity: INQUIRY's vendor, VPD 0x80 (serial) and 0x83 (designators) of the host's disk.
identity() {
    sg_inq "$SD" | grep -E 'Vendor identification|Product identification'
    sg_vpd -p sn "$SD" | grep -i 'serial number'
    sg_vpd -p di "$SD" | grep -vE '^ *$'
}
# scsi_checks WHO: COMPARE AND WRITE succeeds on a match and reports a miscompare, UNMAP
# leaves zeros (LBAs far beyond the writer's 16 MiB).
scsi_checks() {
    local lba=200000
    head -c 512 /dev/urandom > "$W/a"; head -c 512 /dev/urandom > "$W/b"
    dd if="$W/a" of="$SD" bs=512 seek=$lba count=1 oflag=direct conv=notrunc status=none
    cat "$W/a" "$W/b" > "$W/ab"
    sg_compare_and_write --in="$W/ab" --lba=$lba --num=1 "$SD"
    dd if="$SD" bs=512 skip=$lba count=1 iflag=direct status=none | cmp - "$W/b"
    local rc=0
    sg_compare_and_write --in="$W/ab" --lba=$lba --num=1 "$SD" 2>/dev/null || rc=$?
    [ "$rc" = 14 ] || { echo "COMPARE AND WRITE on a mismatch exited $rc, not 14 (miscompare)"; return 1; }
    dd if="$W/b" of="$SD" bs=512 seek=$((lba + 8)) count=1 oflag=direct conv=notrunc status=none
    sg_unmap --force --lba=$((lba + 8)) --num=8 "$SD"
    [ "$(dd if="$SD" bs=512 skip=$((lba + 8)) count=8 iflag=direct status=none | tr -d '\0' | wc -c)" = 0 ]
    step "$1: COMPARE AND WRITE matches and miscompares as it should, UNMAP reads back zeros"
}

# libiscsi_identity WHO: iscsi-inq (libiscsi) reads VPD 0x80 and 0x83 from the node serving
# now: the serial and NAA the kernel initiator saw, and the same page 0x83 on both nodes.
libiscsi_identity() {
    iscsi-inq -e 1 -c 128 "$URL" > "$W/inq80.$1"
    iscsi-inq -e 1 -c 131 "$URL" > "$W/inq83.$1"
    grep -qx "Unit Serial Number:\[$SERIAL\]" "$W/inq80.$1"
    # iscsi-inq prints a binary designator's bytes as they are, so a NUL or newline byte
    # cuts it short: its first bytes (at least 4), as hex, must start the NAA sg_vpd showed,
    # and the whole page must be byte for byte the same on both nodes.
    local naa
    naa=$(awk '/^Designator Type:\(3\) NAA/ {getline; print; exit}' "$W/inq83.$1" \
        | sed 's/^Designator:\[//; s/\]$//' | head -c 16 | od -An -tx1 | tr -d ' \n')
    [ ${#naa} -ge 8 ] && case "6001405${SERIAL:0:25}" in "$naa"*) ;; *) false ;; esac \
        || { cat -v "$W/inq83.$1"; echo "iscsi-inq's NAA $naa is not 6001405${SERIAL:0:25}"; return 1; }
    [ "$1" = alpha ] || cmp "$W/inq83.alpha" "$W/inq83.$1"
    step "$1: libiscsi's iscsi-inq reads serial $SERIAL (VPD 0x80) and NAA 0x6001405${SERIAL:0:25} (0x83: the $((${#naa} / 2)) bytes iscsi-inq printed match)"
}
# libiscsi_conformance: iscsi-test-cu's $CU_TESTS against the LUN, each a pass.
libiscsi_conformance() {
    local t s0=$(now_ms)
    for t in $CU_TESTS; do
        iscsi-test-cu --dataloss --test="$t" "$URL" > "$W/cu.$t" 2>&1 || { cat "$W/cu.$t"; echo "iscsi-test-cu $t failed"; return 1; }
    done
    step "$1: iscsi-test-cu passes $(echo $CU_TESTS | wc -w) tests in $(( $(now_ms) - s0 )) ms: $CU_TESTS"
}

# The host's initiator, with its own writable config (the host root is read-only here).
mkdir -p "$W/iscsi" /run/lock/iscsi
cp -a /etc/iscsi/. "$W/iscsi/"
mount --bind "$W/iscsi" /etc/iscsi
echo "InitiatorName=$HOST_IQN" > /etc/iscsi/initiatorname.iscsi
# In a session of its own: on SIGTERM iscsid signals its whole process group.
setsid iscsid -f > "$W/iscsid.log" 2>&1 &
ISCSID=$!

start_serving

iscsiadm -m discovery -t sendtargets -p "$SVC:3260" > "$W/discovery"
grep -q "$IQN" "$W/discovery"
node_set() { iscsiadm -m node -T "$IQN" -p "$SVC:3260" -o update -n "$1" -v "$2"; }
# Queue I/O across a failover instead of failing it (the initiator settings the README
# documents), and notice a silent portal within a few seconds.
node_set node.session.timeo.replacement_timeout 120
node_set 'node.conn[0].timeo.noop_out_interval' 1
node_set 'node.conn[0].timeo.noop_out_timeout' 2
iscsiadm -m node -T "$IQN" -p "$SVC:3260" --login
disk() { ls /sys/class/iscsi_session/session*/device/target*/*/block/ 2>/dev/null | head -n 1; }
wait_for 30 "the host's disk" [ -n "$(disk)" ]
SD=/dev/$(disk)
wait_for 10 "$SD" [ -b "$SD" ]
echo 120 > "/sys/block/${SD#/dev/}/device/timeout"
step "the host logged in: $SD"
DEV=$SD
IDENTITY=identity

identity > "$W/id.0"
cat "$W/id.0"
grep -q METROBLK "$W/id.0"
SERIAL=$(sed -n 's/.*[Ss]erial number: *\([0-9a-f]*\).*/\1/p' "$W/id.0" | head -n 1)
[ ${#SERIAL} = 32 ]
grep -q "0x6001405${SERIAL:0:25}" "$W/id.0"
step "identity: serial $SERIAL, NAA 0x6001405${SERIAL:0:25}"
scsi_checks alpha
libiscsi_identity alpha
libiscsi_conformance alpha

across_switchover
scsi_checks beta
libiscsi_identity beta
across_partition
scsi_checks alpha

heal_link sa ab
heal_link sb bw
wait_for 90 "beta to be secondary and in sync" in_sync_as alpha beta
iscsiadm -m node -T "$IQN" -p "$SVC:3260" --logout
kill "$ISCSID"; wait "$ISCSID" || true
# Alpha, the primary, killed with its export up, leaves it in configfs (and its address).
# Restarted at once, it removes what it left before anything else, whichever role it comes
# back in (primary again if its lease outlived the restart, else secondary with beta
# promoted: beta's bring-up waits for the target until alpha removed it).
kill9 alpha
[ -e "/sys/kernel/config/target/iscsi/$IQN" ]
holds_address alpha
start alpha "-2"
in_sync_either() { in_sync_as alpha beta || in_sync_as beta alpha; }
portal_either() { portal_open alpha || portal_open beta; }
wait_for 90 "a primary in sync again" in_sync_either
wait_for 60 "a portal again" portal_either
grep -q "removing the export an earlier run of this node left behind" "$W/alpha-2.log"
if field_is alpha role primary; then P=alpha S=beta; else P=beta S=alpha; fi
holds_address "$P"
not holds_address "$S"
not portal_open "$S"
step "alpha, killed with its export up, removed it when it came back; $P serves the export"
stop alpha
stop beta
[ ! -e "/sys/kernel/config/target/iscsi/$IQN" ] || { echo "the target outlived the nodes"; exit 1; }
not grep -q vol0 <(ls /sys/kernel/config/target/core/iblock_0/ 2>/dev/null)
cmp "$W/alpha.img" "$W/beta.img"
step "clean shutdown: no target left in configfs, the copies identical"
umount /etc/iscsi
step "all good"
"#;

/// NVMe/TCP: nvme-cli's host in the initial namespace (it would work from a namespace too).
const NVME_VARS: &str = r#"
TOOLS="nvme arping ss jq"
PORT=4420
NQN=nqn.2024-01.io.metroblk:vol0
HOSTID=5e7b1a3c-0000-4000-8000-000000000001
HOSTNQN=nqn.2014-08.org.nvmexpress:uuid:$HOSTID
"#;

const NVME: &str = r#"
# nvme_identity: what the host keys the namespace on (NGUID, the descriptors: NGUID and
# UUID) and the subsystem's serial, model and NQN (not the controller id: each node has its own).
nvme_identity() {
    nvme id-ns "$NS" -o json | jq -r '.nguid'
    nvme ns-descs "$NS" | grep -iE 'uuid|nguid'
    nvme id-ctrl "$CTRL" -o json | jq -r '.sn, .mn, .subnqn'
}
start_serving

nvme connect -t tcp -a "$SVC" -s "$PORT" -n "$NQN" --hostnqn="$HOSTNQN" --hostid="$HOSTID" \
    --ctrl-loss-tmo=-1 --reconnect-delay=1
nsdev() { ls /sys/block 2>/dev/null | grep -E '^nvme[0-9]+n1$' | head -n 1; }
wait_for 30 "the host's namespace" [ -n "$(nsdev)" ]
NS=/dev/$(nsdev)
wait_for 10 "$NS" [ -b "$NS" ]
CTRL=$(ls -d /sys/class/nvme/nvme* | head -n 1)
CTRL=/dev/${CTRL##*/}
step "the host connected: $NS"
DEV=$NS
IDENTITY=nvme_identity
nvme_identity > "$W/id.0"
cat "$W/id.0"
NGUID=$(head -n 1 "$W/id.0")
[ ${#NGUID} = 32 ]
grep -qx "${NGUID:0:20}" "$W/id.0"
step "identity: NGUID $NGUID, serial ${NGUID:0:20}"

across_switchover
across_partition

heal_link sa ab
heal_link sb bw
wait_for 90 "beta to be secondary and in sync" in_sync_as alpha beta
nvme disconnect -n "$NQN"
stop alpha
stop beta
[ ! -e "/sys/kernel/config/nvmet/subsystems/$NQN" ] || { echo "the subsystem outlived the nodes"; exit 1; }
cmp "$W/alpha.img" "$W/beta.img"
step "clean shutdown: no subsystem left in configfs, the copies identical"
step "all good"
"#;

/// The witness lease: 2 s, as in the other failover tests; `METROBLK_EXPORT_LEASE_MS=5000`
/// measures the README's figure with the default lease.
fn lease_ms() -> u64 {
    std::env::var("METROBLK_EXPORT_LEASE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

#[test]
fn iscsi_host_writes_across_switchover_and_partition_without_error() {
    ublk_script::run(
        &format!("{ISCSI_VARS}\n{COMMON}\n{ISCSI}"),
        &Opts {
            sites: true,
            size: "256MiB",
            node_extra: NODE_EXTRA,
            lease_ms: lease_ms(),
            timeout: Duration::from_secs(540),
            ..Opts::default()
        },
        &[
            "alpha serves the export",
            "the host logged in",
            "identity: serial",
            "alpha: COMPARE AND WRITE",
            "alpha: libiscsi's iscsi-inq reads serial",
            "alpha: iscsi-test-cu passes",
            "switchover: beta's portal open",
            "after the switchover",
            "beta: COMPARE AND WRITE",
            "beta: libiscsi's iscsi-inq reads serial",
            "partition: alpha promoted",
            "only alpha",
            "after the partition",
            "removed it when it came back",
            "clean shutdown",
            "all good",
        ],
    );
}

#[test]
fn nvme_tcp_host_writes_across_switchover_and_partition_without_error() {
    ublk_script::run(
        &format!("{NVME_VARS}\n{COMMON}\n{NVME}"),
        &Opts {
            sites: true,
            size: "256MiB",
            node_extra: NODE_EXTRA_NVME,
            lease_ms: lease_ms(),
            timeout: Duration::from_secs(480),
            ..Opts::default()
        },
        &[
            "alpha serves the export",
            "the host connected",
            "identity: NGUID",
            "switchover: beta's portal open",
            "after the switchover",
            "partition: alpha promoted",
            "after the partition",
            "clean shutdown",
            "all good",
        ],
    );
}
