//! Every volume its own role (issue 23): a role change of one volume (switchover, promotion
//! after a site loss, resignation after a disk failure) touches that volume alone; the other
//! volumes of the same nodes keep their device, links, lease and I/O, without an error, a
//! stall, a reconnect or a restart of the node. And a node stopped while writes are parked
//! exits in bounded time, leaving them to the next start.
//!
//! As in `ublk_failover.rs`: three sites in network namespaces (alpha, beta, the witness),
//! nodes and witness as real processes, `blk_writer` logging every write a device
//! acknowledged, checked at the end on the node that serves; the copies compared after a
//! clean shutdown. The prelude's volume `vol0` is primary on alpha; [`HELPERS`]'s
//! `add_volume` adds more to both configs (each with its own ports and ublk ids: both nodes
//! share the VM's kernel).
//!
//! Needs ublk: natively where the kernel has ublk_drv, else in the QEMU VM of tests/vm; never
//! skipped. Build the binaries first (`cargo build -p metroblk -p metroblk-tests`).

use std::time::Duration;

use metroblk_tests::ublk_script::{self, Opts};

/// Shell helpers of these scenarios (after the prelude).
const HELPERS: &str = r#"
# vq NODE VOLUME JQ: JQ applied to VOLUME's entry in NODE's `status --json` ("" when the
# node does not answer). One status call: under TCG each costs a good part of a second.
vq() {
    "$BIN" status --json --config "$W/$1.toml" 2>/dev/null \
        | jq -r --arg v "$2" ".volumes[] | select(.name == \$v) | $3" 2>/dev/null || true
}
vol_field() { vq "$1" "$2" ".$3"; }
vol_is() { [ "$(vol_field "$1" "$2" "$3")" = "$4" ]; }
dev_of() { vol_field "$1" "$2" ublk_device; }
# serves NODE VOLUME: NODE is VOLUME's primary and its block device exists.
serves() {
    local d
    d=$(vq "$1" "$2" 'select(.role == "primary") | .ublk_device')
    [ -n "$d" ] && [ "$d" != null ] && [ -b "$d" ]
}
leased_vol() { [ "$(vol_field "$1" "$2" lease_left_ms)" -gt 0 ] 2>/dev/null; }
# in_sync_vol VOLUME PRIMARY SECONDARY
in_sync_vol() {
    [ "$(vq "$2" "$1" '"\(.sync_state) \(.alone)"')" = "in-sync false" ] \
        && [ "$(vq "$3" "$1" '"\(.role) \(.disk_state)"')" = "secondary up-to-date" ]
}
# add_volume NODE PEER VOLUME ROLE UBLK_ID PORT PEER_PORT: one more volume in NODE's config,
# backing file $W/NODE-VOLUME.img, with the witness of the prelude's volume.
add_volume() {
    local ip peer_ip wit
    case $1 in
        alpha) ip=10.88.1.1 peer_ip=10.88.1.2 wit=10.88.2.2 ;;
        beta) ip=10.88.1.2 peer_ip=10.88.1.1 wit=10.88.3.2 ;;
    esac
    cat >> "$W/$1.toml" <<EOF

[[volume]]
name = "$3"
size = "$SIZE"
backing_file = "$W/$1-$3.img"
metadata_file = "$W/$1-$3.meta"
listen = "$ip:$6"
role = "$4"
ublk_id = $5
queues = 2
depth = 64
[volume.peer]
name = "$2"
address = "$peer_ip:$7"
authkey_file = "$W/key"
$(wsec "$wit:9095")
EOF
    "$BIN" create-md --force --config "$W/$1.toml" "$3" >/dev/null
}
img_of() { if [ "$2" = vol0 ]; then echo "$W/$1.img"; else echo "$W/$1-$2.img"; fi; }
acked() { grep -cv '^error' "$1" || true; }
not_running() { ! kill -0 "$1" 2>/dev/null; }
# start_writer DEV LOG THREADS: an O_DIRECT|O_DSYNC writer of THREADS threads in the
# background (pid in $WPID); waits for its first writes.
start_writer() {
    "$WRITER" write "$1" "$2" 4096 --threads "$3" --dsync &
    WPID=$!
    wait_for 30 "the writer's first writes on $1" [ -s "$2" ]
}
# wstats LOG: `blk_writer stats` into WS_acknowledged, WS_errors, WS_max_latency_ms,
# WS_max_latency_at_ms, WS_threads, WS_stalest_last_ack_ms.
wstats() { eval "$("$WRITER" stats "$1" | awk '{ print "WS_" $1 "=" $2 }')"; }
wstat() { wstats "$1"; eval "echo \$WS_$2"; }
# writer_ok NAME PID LOG: the writer runs and has logged no error.
writer_ok() {
    if ! kill -0 "$2" 2>/dev/null || grep -q '^error' "$3"; then
        echo "$1's writer failed: $(grep -m 3 '^error' "$3" | tr '\n' ';') ($(acked "$3") writes acknowledged)"
        return 1
    fi
}
# writer_smooth NAME LOG: no acknowledged write took more than 1 s, and every thread had a
# write acknowledged within the last second (none is stuck in one).
writer_smooth() {
    local t stale
    t=$(now_ms)
    wstats "$2"
    stale=$(( t - WS_stalest_last_ack_ms ))
    if [ "$WS_max_latency_ms" -gt 1000 ] || [ "$stale" -gt 1000 ]; then
        echo "$1's writer stalled: slowest write $WS_max_latency_ms ms (completed at $WS_max_latency_at_ms), a thread's last write $stale ms ago"
        return 1
    fi
}
# expect WHAT GOT WANT: GOT = WANT, or say which differs.
expect() {
    if [ "$2" != "$3" ]; then echo "$1: $2, expected $3"; return 1; fi
}
# link_marks VOLUME: how often the volume's primary (PRIMARY) connected its queue links and
# how often the links ended on its secondary (SECONDARY), and how often each node started;
# one line that must not change while the volume is left alone.
link_marks() { # VOLUME PRIMARY SECONDARY
    echo "connected=$(grep 'connected to peer' "$W/$2.log" | grep -c "volume=$1\b" || true)" \
        "ended=$(grep 'link from primary ended' "$W/$3.log" | grep -c "volume=$1\b" || true)" \
        "starts=$(cat "$W/$2.log" "$W/$3.log" | grep -c 'node running' || true)"
}
# untouched VOLUME PRIMARY SECONDARY: VOLUME still has PRIMARY as primary in epoch $EPOCH0,
# its link is connected, has not reconnected ($RECONNECTS0, $MARKS0 recorded before) and no
# node restarted.
untouched() {
    expect "$1 on $2 (role epoch link reconnects)" "$(vq "$2" "$1" '"\(.role) \(.epoch) \(.link_state) \(.reconnects)"')" \
        "primary $EPOCH0 connected $RECONNECTS0" &&
        expect "$1's role on $3" "$(vol_field "$3" "$1" role)" secondary &&
        expect "$1's link events in the logs" "$(link_marks "$1" "$2" "$3")" "$MARKS0"
}
stop_and_compare() { # VOLUME...: clean shutdown of both nodes, then each VOLUME's copies are identical
    step "clean shutdown"
    stop alpha
    stop beta
    for v in "$@"; do cmp "$(img_of alpha "$v")" "$(img_of beta "$v")"; done
    step "identical copies of $*"
}
"#;

fn run(body: &str, timeout: Duration, steps: &[&str]) {
    let body = format!("{HELPERS}\n{body}");
    ublk_script::run(&body, &Opts { sites: true, size: "64MiB", lease_ms: 2000, timeout, ..Opts::default() }, steps);
}

/// A bidirectional pair: v1 (`vol0`) primary on alpha, v2 (`vol1`) primary on beta. A writer
/// of 4 threads (O_DIRECT|O_DSYNC) runs on v1 the whole time while v2 is switched over
/// beta -> alpha and back, ten times (`metroblk switchover` on its current primary). After
/// each switch: v2's device exists on the new primary and a write through it reads back; v1
/// is untouched (same primary and epoch, link connected, no reconnect, no node restart) and
/// its writer has seen no error and no write slower than 1 s. At the end every write v1's
/// writer and v2's probes had acknowledged is on the node that serves, and both volumes'
/// copies are identical.
///
/// Ten switches as the issue asks; each is a handover, one lease at most, and a resync of
/// the few probe regions, so the VM should spend well under two minutes on them.
const BIDIRECTIONAL_SWITCHOVERS: &str = r#"
add_volume alpha beta vol1 secondary 2 7811 7812
add_volume beta alpha vol1 primary 3 7812 7811
start_witness
start beta ""
start alpha ""
wait_for 60 "alpha to serve vol0" serves alpha vol0
wait_for 60 "beta to serve vol1" serves beta vol1
wait_for 30 "the leases" eval 'leased_vol alpha vol0 && leased_vol beta vol1'
wait_for 60 "both volumes in sync" eval 'in_sync_vol vol0 alpha beta && in_sync_vol vol1 beta alpha'
DEV1=$(dev_of alpha vol0)
step "v1 (vol0) primary on alpha at $DEV1, v2 (vol1) primary on beta at $(dev_of beta vol1)"
start_writer "$DEV1" "$W/w1.log" 4
sleep 2
writer_ok v1 "$WPID" "$W/w1.log"
writer_smooth v1 "$W/w1.log"
EPOCH0=$(vol_field alpha vol0 epoch)
RECONNECTS0=$(vol_field alpha vol0 reconnects)
MARKS0=$(link_marks vol0 alpha beta)
step "v1's writer: $(acked "$W/w1.log") writes, slowest $(wstat "$W/w1.log" max_latency_ms) ms; $MARKS0"
P=beta N=alpha
for i in $(seq 1 10); do
    S0=$(now_ms)
    "$BIN" switchover --config "$W/$P.toml" vol1 > "$W/switchover-$i.txt"
    wait_for 30 "$N to serve vol1 (switch $i)" serves "$N" vol1
    S1=$(now_ms)
    D=$(dev_of "$N" vol1)
    head -c 4096 /dev/urandom > "$W/probe-$i"
    dd if="$W/probe-$i" of="$D" bs=4096 seek="$i" count=1 oflag=direct,dsync status=none
    dd if="$D" bs=4096 skip="$i" count=1 iflag=direct status=none | cmp - "$W/probe-$i"
    writer_ok v1 "$WPID" "$W/w1.log"
    writer_smooth v1 "$W/w1.log"
    untouched vol0 alpha beta
    step "switch $i: vol1 $P -> $N, served $(( S1 - S0 )) ms after the command; a write through $D read back; v1 untouched"
    wait_for 60 "vol1 in sync again ($N primary, $P secondary)" in_sync_vol vol1 "$N" "$P"
    [ "$(dev_of "$P" vol1)" = null ]
    PREV=$P; P=$N; N=$PREV
done
step "ten switchovers of v2 done"
writer_ok v1 "$WPID" "$W/w1.log"
writer_smooth v1 "$W/w1.log"
untouched vol0 alpha beta
kill "$WPID"; wait "$WPID" || true
step "v1's writer: $(acked "$W/w1.log") writes, $(wstat "$W/w1.log" errors) errors, slowest $(wstat "$W/w1.log" max_latency_ms) ms, v1's link never dropped"
"$WRITER" check "$DEV1" "$W/w1.log"
D=$(dev_of "$P" vol1)
for i in $(seq 1 10); do
    dd if="$D" bs=4096 skip="$i" count=1 iflag=direct status=none | cmp - "$W/probe-$i"
done
step "alpha holds every write v1's writer acknowledged, $P every probe written through v2"
wait_for 60 "both volumes in sync" eval "in_sync_vol vol0 alpha beta && in_sync_vol vol1 $P $N"
stop_and_compare vol0 vol1
[ ! -e "$DEV1" ] && [ ! -e "$D" ]
step "all good"
"#;

#[test]
fn bidirectional_pair_switches_one_volume_ten_times_without_touching_the_other() {
    run(
        BIDIRECTIONAL_SWITCHOVERS,
        Duration::from_secs(240),
        &[
            "v1 (vol0) primary on alpha",
            "switch 1: vol1 beta -> alpha",
            "switch 2: vol1 alpha -> beta",
            "switch 10: vol1 alpha -> beta",
            "ten switchovers of v2 done",
            "v1's link never dropped",
            "every probe written through v2",
            "identical copies of vol0 vol1",
            "all good",
        ],
    );
}

/// Site loss with two volumes each way: vol0 and vol1 primary on alpha, vol2 and vol3 on
/// beta, a writer on each. Beta's node is killed (-9) and its links cut: alpha is promoted
/// for vol2 and vol3 (epoch + 1) with every write beta acknowledged, within the usual
/// failover time; vol0 and vol1 stay alpha's in their epoch, their writers see no error and
/// go on (alone, once the witness outdated beta). Beta returns: resynced as secondary of all
/// four, identical copies.
const SITE_LOSS_TWO_EACH_WAY: &str = r#"
add_volume alpha beta vol1 primary 2 7811 7812
add_volume beta alpha vol1 secondary 3 7812 7811
add_volume alpha beta vol2 secondary 4 7821 7822
add_volume beta alpha vol2 primary 5 7822 7821
add_volume alpha beta vol3 secondary 6 7831 7832
add_volume beta alpha vol3 primary 7 7832 7831
start_witness
start beta ""
start alpha ""
all_served() { serves alpha vol0 && serves alpha vol1 && serves beta vol2 && serves beta vol3; }
all_in_sync() { # PRIMARY OF vol2/vol3, ITS PEER
    in_sync_vol vol0 alpha beta && in_sync_vol vol1 alpha beta && in_sync_vol vol2 "$1" "$2" && in_sync_vol vol3 "$1" "$2"
}
wait_for 60 "the four devices" all_served
wait_for 60 "the four volumes in sync" all_in_sync beta alpha
EPOCH0=$(vol_field alpha vol0 epoch)
declare -A WP DEVS
for v in vol0 vol1; do DEVS[$v]=$(dev_of alpha $v); start_writer "${DEVS[$v]}" "$W/w-$v.log" 2; WP[$v]=$WPID; done
for v in vol2 vol3; do DEVS[$v]=$(dev_of beta $v); start_writer "${DEVS[$v]}" "$W/w-$v.log" 2; WP[$v]=$WPID; done
step "vol0, vol1 primary on alpha, vol2, vol3 on beta: four writers"
sleep 1
T_CUT=$(now_ms)
kill9 beta; cut_link sa ab; cut_link sb bw
step "site B lost: beta killed -9, its links cut"
wait_for 60 "alpha to serve vol2 and vol3" eval 'serves alpha vol2 && serves alpha vol3'
T_UP=$(now_ms)
T_SERVED=$(served_ms alpha.log vol2 vol3)
step "alpha promoted for vol2 and vol3 $(( T_SERVED - T_CUT )) ms after the loss, seen by status at $(( T_UP - T_CUT )) ms (lease $LEASE_MS ms)"
[ $(( T_SERVED - T_CUT )) -le $(( 2 * LEASE_MS + 4000 )) ]
for v in vol2 vol3; do
    expect "$v's epoch on alpha" "$(vol_field alpha $v epoch)" $(( EPOCH0 + 1 ))
    "$WRITER" check "$(dev_of alpha $v)" "$W/w-$v.log"
done
step "alpha holds every write beta acknowledged on vol2 and vol3"
for v in vol0 vol1; do
    wait_for 30 "$v to go on alone" vol_is alpha $v alone true
    N=$(acked "$W/w-$v.log"); sleep 1
    [ "$(acked "$W/w-$v.log")" -gt "$N" ]
    writer_ok "$v" "${WP[$v]}" "$W/w-$v.log"
    expect "$v's role on alpha" "$(vol_field alpha $v role)" primary
    expect "$v's epoch on alpha" "$(vol_field alpha $v epoch)" "$EPOCH0"
    expect "$v's device on alpha" "$(dev_of alpha $v)" "${DEVS[$v]}"
done
expect "alpha's starts" "$(grep -c 'node running' "$W/alpha.log")" 1
step "vol0 and vol1 stay alpha's, in their epoch: their writers saw no error (slowest writes $(wstat "$W/w-vol0.log" max_latency_ms) and $(wstat "$W/w-vol1.log" max_latency_ms) ms)"
# Beta's writers hang on its dead node's devices (or failed with them); beta returns.
kill -9 "${WP[vol2]}" "${WP[vol3]}" 2>/dev/null || true
heal_link sa ab; heal_link sb bw
start beta "-restarted"
wait_for 90 "beta to be resynced as secondary of all four" all_in_sync alpha beta
for v in vol0 vol1; do writer_ok "$v" "${WP[$v]}" "$W/w-$v.log"; kill "${WP[$v]}"; wait "${WP[$v]}" || true; done
for v in vol0 vol1; do "$WRITER" check "${DEVS[$v]}" "$W/w-$v.log"; done
step "beta back as secondary of all four; alpha holds every write its writers acknowledged"
wait_for 60 "the last writes to settle" all_in_sync alpha beta
stop_and_compare vol0 vol1 vol2 vol3
step "all good"
"#;

#[test]
fn site_loss_moves_only_the_lost_sites_volumes_and_leaves_the_others_writing() {
    run(
        SITE_LOSS_TWO_EACH_WAY,
        Duration::from_secs(200),
        &[
            "four writers",
            "site B lost",
            "alpha promoted for vol2 and vol3",
            "every write beta acknowledged",
            "their writers saw no error",
            "beta back as secondary",
            "identical copies of vol0 vol1 vol2 vol3",
            "all good",
        ],
    );
}

/// Two volumes primary on alpha; vol1's backing file sits on a small tmpfs that its writer
/// fills (ENOSPC latches its disk `failed`). vol1 resigns alone: beta serves it with every
/// write alpha acknowledged, alpha keeps it as a failed secondary without a device. vol0, on
/// the same node, keeps serving: its writer sees no error, its link never drops, the node
/// never restarts; its copies end identical.
const ONE_DISK_FAILS: &str = r#"
add_volume alpha beta vol1 primary 2 7811 7812
add_volume beta alpha vol1 secondary 3 7812 7811
mkdir -p "$W/small"
mount -t tmpfs -o size=6m tmpfs "$W/small"
sed -i "s|$W/alpha-vol1.img|$W/small/alpha-vol1.img|" "$W/alpha.toml"
start_witness
start beta ""
start alpha ""
wait_for 60 "alpha to serve both volumes" eval 'serves alpha vol0 && serves alpha vol1'
wait_for 60 "both volumes in sync" eval 'in_sync_vol vol0 alpha beta && in_sync_vol vol1 alpha beta'
EPOCH0=$(vol_field alpha vol0 epoch)
DEV0=$(dev_of alpha vol0)
start_writer "$DEV0" "$W/w0.log" 2
W0=$WPID
sleep 1
RECONNECTS0=$(vol_field alpha vol0 reconnects)
MARKS0=$(link_marks vol0 alpha beta)
"$WRITER" write "$(dev_of alpha vol1)" "$W/w1.log" 16384 &
W1=$!
step "writers on vol0 and vol1; vol1's backing file on alpha has 6 MiB of room"
wait_for 60 "vol1's disk on alpha to fail" vol_is alpha vol1 disk_state failed
T_FAIL=$(now_ms)
step "vol1's disk on alpha failed after $(acked "$W/w1.log") writes: $(vol_field alpha vol1 disk_error)"
wait_for 60 "beta to serve vol1" serves beta vol1
step "beta promoted for vol1 $(( $(now_ms) - T_FAIL )) ms after the disk failed"
wait_for 30 "vol1's writer to end" not_running "$W1"
"$WRITER" check "$(dev_of beta vol1)" "$W/w1.log"
step "beta holds every write alpha acknowledged on vol1"
wait_for 30 "alpha to keep vol1 as a failed secondary" vol_is alpha vol1 role secondary
expect "vol1's disk on alpha" "$(vol_field alpha vol1 disk_state)" failed
expect "vol1's device on alpha" "$(dev_of alpha vol1)" null
N=$(acked "$W/w0.log"); sleep 1
[ "$(acked "$W/w0.log")" -gt "$N" ]
writer_ok vol0 "$W0" "$W/w0.log"
untouched vol0 alpha beta
expect "vol0's device on alpha" "$(dev_of alpha vol0)" "$DEV0"
step "vol0 keeps serving on alpha: its writer saw no error (slowest write $(wstat "$W/w0.log" max_latency_ms) ms), its link never dropped"
kill "$W0"; wait "$W0" || true
"$WRITER" check "$DEV0" "$W/w0.log"
wait_for 60 "vol0 in sync" in_sync_vol vol0 alpha beta
stop_and_compare vol0
umount "$W/small"
step "all good"
"#;

#[test]
fn a_failed_disk_resigns_its_volume_alone_and_the_other_volume_keeps_serving() {
    run(
        ONE_DISK_FAILS,
        Duration::from_secs(180),
        &[
            "vol1's disk on alpha failed",
            "beta promoted for vol1",
            "every write alpha acknowledged on vol1",
            "vol0 keeps serving on alpha",
            "identical copies of vol0",
            "all good",
        ],
    );
}

/// SIGTERM of a primary whose writes are parked: alpha is cut from beta and the witness (and
/// beta from the witness, so nobody is promoted), its lease runs out and it is fenced with
/// `on_fence = "suspend"` (the default): the writer's writes wait. (The prelude's `step` keeps
/// its clock in `T0`: this body's times are `K0`/`K1`.) SIGTERM: the node exits 0
/// within 10 s, leaving its device in place with the writes still parked (as after kill -9:
/// neither completed nor failed). The links return and alpha is started again: it recovers
/// the same device, the parked writes complete, the writer goes on without an error, and
/// every write it acknowledged is there; the copies end identical.
const SIGTERM_WITH_PARKED_WRITES: &str = r#"
start_witness
start beta ""
start alpha ""
wait_for 60 "alpha to serve vol0" serves alpha vol0
wait_for 30 "alpha's lease" leased_vol alpha vol0
wait_for 60 "vol0 in sync" in_sync_vol vol0 alpha beta
DEV0=$(dev_of alpha vol0)
start_writer "$DEV0" "$W/w.log" 2
sleep 1
cut_link sa ab; cut_link sa aw; cut_link sb bw
step "alpha cut from beta and the witness, beta cut from the witness"
wait_for 30 "alpha to be fenced" vol_is alpha vol0 fenced true
N=$(acked "$W/w.log"); sleep 1
expect "writes acknowledged while fenced" "$(acked "$W/w.log")" "$N"
writer_ok vol0 "$WPID" "$W/w.log"
step "alpha fenced: $N writes acknowledged, the writer's next ones parked ($(vol_field alpha vol0 requests_in_flight) in flight)"
K0=$(now_ms)
kill -TERM "$PID_alpha"
# On failure, each thread of the stuck node and where it waits.
wait_for 10 "alpha to exit after SIGTERM" not_running "$PID_alpha" || {
    for t in /proc/"$PID_alpha"/task/*; do echo "thread $(cat "$t/comm"): $(cat "$t/wchan")"; done
    false
}
K1=$(now_ms)
RC=0; wait "$PID_alpha" || RC=$?
step "alpha exited with status $RC $(( K1 - K0 )) ms after SIGTERM"
[ $(( K1 - K0 )) -lt 10000 ]
expect "alpha's exit status" "$RC" 0
[ -b "$DEV0" ]
sleep 1
expect "writes acknowledged after the exit" "$(acked "$W/w.log")" "$N"
writer_ok vol0 "$WPID" "$W/w.log"
step "the device is left in place with the writes parked: none completed, none failed"
# alpha first, so that beta, which lost alpha, cannot be promoted once it sees the witness.
heal_link sa ab; heal_link sa aw
start alpha "-restarted"
wait_for 60 "alpha to serve vol0 again" serves alpha vol0
expect "alpha's device" "$(dev_of alpha vol0)" "$DEV0"
heal_link sb bw
wait_for 30 "the parked writes to complete" eval '[ "$(acked "$W/w.log")" -gt "$N" ]'
sleep 1
writer_ok vol0 "$WPID" "$W/w.log"
expect "vol0's role on beta" "$(vol_field beta vol0 role)" secondary
step "alpha restarted, recovered $DEV0: the parked writes completed, $(( $(acked "$W/w.log") - N )) more writes, no error"
kill "$WPID"; wait "$WPID" || true
"$WRITER" check "$DEV0" "$W/w.log"
step "alpha holds every one of the $(acked "$W/w.log") acknowledged writes"
wait_for 60 "vol0 in sync" in_sync_vol vol0 alpha beta
stop_and_compare vol0
step "all good"
"#;

#[test]
fn sigterm_with_parked_writes_exits_in_bounded_time_and_the_restart_serves_them() {
    run(
        SIGTERM_WITH_PARKED_WRITES,
        Duration::from_secs(180),
        &[
            "alpha fenced",
            "alpha exited with status 0",
            "left in place with the writes parked",
            "the parked writes completed",
            "every one of the",
            "identical copies of vol0",
            "all good",
        ],
    );
}

/// A consistency group of two volumes (`db` = vol0 + vol1, both primary on alpha) under a
/// dependent-write workload: `blk_writer dependent` writes X to a block of vol0 and, only
/// after that write completed, Y (naming X) to the same block of vol1, like a database's log
/// and data. Then:
/// 1. a storage partition (alpha and beta cut from each other, both still reach the witness):
///    the group goes on alone as one (both volumes alone, one epoch), the writer sees no
///    error; the link heals and both resync;
/// 2. a data-centre partition (alpha cut from beta and the witness): beta is promoted for
///    the whole group, both volumes in one epoch, and on beta every Y has its X and every
///    acknowledged write is there;
/// 3. the links heal: alpha comes back as secondary of both (in the running node), is
///    resynced, and both pairs of copies are identical.
///
/// Both volumes cross the same veth link, so the partitions stop them together; a member
/// whose replication alone stops is the fencing model's case (`tests/fencing_model.rs`).
const GROUP_DEPENDENT_WRITES: &str = r#"
add_volume alpha beta vol1 primary 2 7811 7812
add_volume beta alpha vol1 secondary 3 7812 7811
for n in alpha beta; do printf '\n[[group]]\nname = "db"\nvolumes = ["vol0", "vol1"]\n' >> "$W/$n.toml"; done
start_witness
start beta ""
start alpha ""
wait_for 60 "alpha to serve both" eval 'serves alpha vol0 && serves alpha vol1'
wait_for 60 "both in sync" eval 'in_sync_vol vol0 alpha beta && in_sync_vol vol1 alpha beta'
expect "vol1's group" "$(vol_field alpha vol1 group)" db
X=$(dev_of alpha vol0) Y=$(dev_of alpha vol1)
"$WRITER" dependent "$X" "$Y" "$W/dep.log" 2048 &
WPID=$!
wait_for 30 "the first dependent writes" [ -s "$W/dep.log" ]
sleep 1
step "group db on alpha: dependent writes X on $X then Y on $Y ($(acked "$W/dep.log") pairs)"
cut_link sa ab
step "storage partition: alpha and beta cut from each other"
wait_for 30 "the group to go on alone" eval 'vol_is alpha vol0 alone true && vol_is alpha vol1 alone true'
N=$(acked "$W/dep.log"); sleep 1
[ "$(acked "$W/dep.log")" -gt "$N" ]
writer_ok dependent "$WPID" "$W/dep.log"
expect "the group's epochs" "$(vol_field alpha vol0 epoch) $(vol_field alpha vol1 epoch)" "1 1"
step "the group went on alone as one; the writer goes on without an error"
heal_link sa ab
wait_for 90 "both resynced" eval 'in_sync_vol vol0 alpha beta && in_sync_vol vol1 alpha beta'
step "healed and resynced"
T_CUT=$(now_ms)
cut_link sa ab; cut_link sa aw
step "data-centre partition: alpha cut from beta and the witness"
wait_for 60 "beta to serve the group" eval 'serves beta vol0 && serves beta vol1'
T_UP=$(now_ms)
step "beta promoted for the group $(( T_UP - T_CUT )) ms after the cut (lease $LEASE_MS ms)"
expect "the group's epochs on beta" "$(vol_field beta vol0 epoch) $(vol_field beta vol1 epoch)" "2 2"
"$WRITER" check-dependent "$(dev_of beta vol0)" "$(dev_of beta vol1)" "$W/dep.log" 2048
step "on beta every Y has its X, and every acknowledged pair is there"
heal_link sa ab; heal_link sa aw
wait_for 60 "alpha's writer to fail (its devices deleted)" not_running "$WPID"
wait "$WPID" || true
wait_for 90 "alpha to be resynced as secondary of both" eval 'in_sync_vol vol0 beta alpha && in_sync_vol vol1 beta alpha'
expect "alpha's starts" "$(grep -c 'node running' "$W/alpha.log")" 1
step "alpha is secondary of the group, resynced, in the same process"
stop_and_compare vol0 vol1
step "all good"
"#;

#[test]
fn a_two_volume_group_keeps_dependent_writes_in_order_through_partitions_and_a_failover() {
    run(
        GROUP_DEPENDENT_WRITES,
        Duration::from_secs(240),
        &[
            "dependent writes",
            "the group went on alone as one",
            "healed and resynced",
            "beta promoted for the group",
            "every Y has its X",
            "alpha is secondary of the group",
            "identical copies of vol0 vol1",
            "all good",
        ],
    );
}

/// Scale (issue 23): 16 volumes per node pair (Tintri's service-group limit), vol0..vol7
/// primary on alpha and vol8..vol15 on beta, a writer on every primary. Beta's site is lost
/// (kill -9 of its node, its links cut): alpha is promoted for exactly beta's eight (epoch +
/// 1, every write beta acknowledged there) within the usual failover time; alpha's own eight
/// keep their epoch and devices and their writers see no error. Beta returns as secondary of
/// all sixteen, is resynced, and every pair of copies ends identical.
///
/// On the way it measures each node process (threads, resident memory, open file
/// descriptors, from /proc/PID) with the pair running and in sync at 1 volume (alpha one
/// primary, beta one secondary), at 8 (alpha 8 primaries, beta 8 secondaries: the increment
/// per primary and per secondary) and at 16 (8 of each on each node), idle and then with the
/// writers; each figure is a step line (the README's "Scale" quotes them). Between those
/// stages both nodes stop (SIGTERM, at once) and start again with the longer config, alpha
/// first (see `start_pair`).
///
/// Light enough for two TCG vCPUs (the choices, and why):
/// - volumes of 16 MiB: what is written, resynced and compared stays small, and the 32
///   backing files share the VM's 2 GiB of memory;
/// - one queue per volume (`queues = 1`, the default; depth 64 as `add_volume` writes): half
///   the threads, rings and links of the other tests' two queues, and the figures measured
///   are those of the default;
/// - one writer thread per primary, O_DIRECT|O_DSYNC, pausing 500 ms after each acknowledged
///   write: about 2 writes/s each, 32/s for the sixteen. With a 50 ms pause the VM served
///   only about 76 mirrored writes/s in all (debug build, two nodes, 32 volumes on two
///   emulated CPUs) and was saturated: every shell command of the test took seconds;
/// - a lease of 5 s (the design's default) instead of the 2 s of the tests above: with 2 s
///   (a renewal deadline of 666 ms), starting 16 volumes on each node under TCG missed
///   three renewals in a row for some volumes and their secondaries were promoted during
///   the start. The failover bound is the same formula as above, 2 x lease + 4 s = 14 s.
const SCALE_SIXTEEN: &str = r#"
# vols FROM TO: "volFROM ... volTO".
vols() { local i out=""; for i in $(seq "$1" "$2"); do out="$out vol$i"; done; echo "${out# }"; }
P_ALPHA=$(vols 0 7) P_BETA=$(vols 8 15) ALL=$(vols 0 15)
# st NODE: NODE's `status --json`, one call ("" when it does not answer).
st() { "$BIN" status --json --config "$W/$1.toml" 2>/dev/null || true; }
# names_where NODE JQ_CONDITION: NODE's volumes that meet it, in number order, on one line.
names_where() {
    st "$1" | jq -r "[.volumes[] | select($2) | .name] | sort_by(.[3:] | tonumber) | join(\" \")" 2>/dev/null || true
}
# serving NODE NAMES: NODE is primary of exactly NAMES, each with its block device.
serving() {
    local d
    [ "$(names_where "$1" '.role == "primary" and .ublk_device != null')" = "$2" ] || return 1
    for d in $(st "$1" | jq -r '.volumes[] | select(.role == "primary") | .ublk_device'); do [ -b "$d" ] || return 1; done
}
SYNCED='(.role == "primary" and .sync_state == "in-sync" and .alone == false) or (.role == "secondary" and .disk_state == "up-to-date")'
# synced NAMES: each of NAMES is in sync between its primary and its up-to-date secondary.
synced() { [ "$(names_where alpha "$SYNCED")" = "$1" ] && [ "$(names_where beta "$SYNCED")" = "$1" ]; }
# field_of NODE VOLUME FIELD (from the status in $ST_<NODE>, read once by `snap NODE`).
snap() { eval "ST_$1=\$(st $1)"; }
field_of() { local s; eval "s=\$ST_$1"; jq -r --arg v "$2" ".volumes[] | select(.name == \$v) | .$3" <<< "$s"; }
# res NODE: the node process's threads, resident memory (all, then its anonymous part: the
# file-backed part is mostly the mapped binary's text, large in a debug build) and open file
# descriptors.
res() {
    local pid; eval "pid=\$PID_$1"
    awk '/^Threads:/ { t = $2 } /^VmRSS:/ { r = $2 } /^RssAnon:/ { a = $2 }
        END { printf "threads=%s rss_kib=%s anon_kib=%s ", t, r, a }' "/proc/$pid/status"
    echo "fds=$(ls "/proc/$pid/fd" | wc -l)"
}
# thread_kinds NODE: its threads by name, the volume and queue left out.
thread_kinds() {
    local pid; eval "pid=\$PID_$1"
    cat /proc/"$pid"/task/*/comm | sed -E -e 's/^ublk[0-9]+-q[0-9]+$/ublk-queue/' -e 's/-.*//' \
        | sort | uniq -c | awk '{ printf "%s%s=%s", (NR > 1 ? " " : ""), $2, $1 }'
}
# fd_kinds NODE: its open file descriptors by kind.
fd_kinds() {
    local pid; eval "pid=\$PID_$1"
    ls -l "/proc/$pid/fd" | awk 'NF > 2 { print $NF }' | sed -E -e 's/^socket:.*/socket/' \
        -e 's/^anon_inode:\[?([a-z_]*).*/\1/' -e 's|.*/ublkc[0-9]+$|ublkc|' -e 's|.*/ublk-control$|ublk-control|' \
        -e 's|.*\.meta$|metadata|' -e 's|.*\.img$|backing|' -e 's|^/.*|other|' \
        | sort | uniq -c | awk '{ printf "%s%s=%s", (NR > 1 ? " " : ""), $2, $1 }'
}
# both_stopped: SIGTERM to both nodes at once (neither outlives the other long enough to
# fail over), both exit 0.
both_stopped() { kill -TERM "$PID_alpha" "$PID_beta"; wait "$PID_alpha"; wait "$PID_beta"; }
# start_pair LOGSUFFIX ALPHAS_PRIMARIES: alpha first, until it serves its primaries again, then
# beta. (Beta first would be a cold start's race: a secondary whose primary has not renewed
# its expired lease yet is promoted; alpha's secondaries of beta's new volumes are refused,
# the witness has no record of them until beta registers them.)
start_pair() {
    sed -i 's/^queues = 2$/queues = 1/' "$W/alpha.toml" "$W/beta.toml"
    start alpha "$1"
    poll_for 90 "alpha to serve $2" serving alpha "$2"
    start beta "$1"
}
# poll_for SECONDS WHAT COMMAND...: wait_for polling once a second (each poll costs two
# status calls, a good part of a second each for 16 volumes under TCG).
poll_for() {
    local secs=$1 what=$2; shift 2
    local end=$(( $(date +%s) + secs ))
    while [ "$(date +%s)" -lt "$end" ]; do
        if "$@"; then return 0; fi
        sleep 1
    done
    echo "timed out after $secs s waiting for $what"; return 1
}
start_witness

# 1 volume: vol0 (the prelude's), primary on alpha.
start_pair -one vol0
poll_for 60 "vol0 in sync" synced vol0
sleep 1
expect "the measured processes" "$(cat "/proc/$PID_alpha/comm") $(cat "/proc/$PID_beta/comm")" "metroblk metroblk"
step "resources at 1 volume: alpha (1 primary) $(res alpha); beta (1 secondary) $(res beta)"
both_stopped

# 8 volumes, all primary on alpha.
for i in $(seq 1 7); do
    add_volume alpha beta "vol$i" primary $(( 2 * i )) $(( 7801 + 2 * i )) $(( 7802 + 2 * i ))
    add_volume beta alpha "vol$i" secondary $(( 2 * i + 1 )) $(( 7802 + 2 * i )) $(( 7801 + 2 * i ))
done
start_pair -eight "$P_ALPHA"
poll_for 60 "the eight in sync" synced "$P_ALPHA"
sleep 1
step "resources at 8 volumes: alpha (8 primaries) $(res alpha); beta (8 secondaries) $(res beta)"
both_stopped

# 16 volumes: vol8..vol15 primary on beta.
for i in $(seq 8 15); do
    add_volume alpha beta "vol$i" secondary $(( 2 * i )) $(( 7801 + 2 * i )) $(( 7802 + 2 * i ))
    add_volume beta alpha "vol$i" primary $(( 2 * i + 1 )) $(( 7802 + 2 * i )) $(( 7801 + 2 * i ))
done
T_START=$(now_ms)
start_pair "" "$P_ALPHA"
poll_for 90 "beta to serve its eight" serving beta "$P_BETA"
poll_for 90 "the sixteen in sync" synced "$ALL"
step "16 volumes, 8 primary on each node, in sync $(( $(now_ms) - T_START )) ms after the start"
sleep 1
step "resources at 16 volumes, idle: alpha (8 primaries, 8 secondaries) $(res alpha); beta (8 primaries, 8 secondaries) $(res beta)"
step "file descriptors at 16 volumes: alpha $(fd_kinds alpha); beta $(fd_kinds beta)"
step "threads at 16 volumes: alpha $(thread_kinds alpha); beta $(thread_kinds beta)"
declare -A WP DEVS EP
snap alpha; snap beta
for v in $P_ALPHA; do DEVS[$v]=$(field_of alpha "$v" ublk_device); EP[$v]=$(field_of alpha "$v" epoch); done
for v in $P_BETA; do DEVS[$v]=$(field_of beta "$v" ublk_device); EP[$v]=$(field_of beta "$v" epoch); done
for v in $ALL; do
    "$WRITER" write "${DEVS[$v]}" "$W/w-$v.log" 4096 --dsync --interval-ms 500 &
    WP[$v]=$!
done
for v in $ALL; do wait_for 30 "$v's writer's first writes" [ -s "$W/w-$v.log" ]; done
sleep 2
step "resources at 16 volumes with 16 writers: alpha $(res alpha); beta $(res beta)"
for v in $ALL; do writer_ok "$v" "${WP[$v]}" "$W/w-$v.log"; done
step "sixteen writers: $(cat "$W"/w-vol*.log | grep -cv '^error') writes acknowledged"

T_CUT=$(now_ms)
kill9 beta; cut_link sa ab; cut_link sb bw
step "site B lost: beta killed -9, its links cut"
T_FIRST=""
while :; do
    N=$(names_where alpha '.role == "primary" and .ublk_device != null' | wc -w)
    [ -z "$T_FIRST" ] && [ "$N" -gt 8 ] && T_FIRST=$(now_ms)
    serving alpha "$ALL" && break
    [ $(( $(now_ms) - T_CUT )) -lt 90000 ] || { echo "alpha serves $N volumes 90 s after the loss"; false; }
    sleep 0.5
done
T_UP=$(now_ms)
T_FIRST=${T_FIRST:-$T_UP}
# $P_BETA unquoted: one argument per volume.
# shellcheck disable=SC2086
T_SERVED=$(served_ms alpha.log $P_BETA)
step "alpha promoted for vol8..vol15: all eight served $(( T_SERVED - T_CUT )) ms after the loss; status saw the first at $(( T_FIRST - T_CUT )) ms, all at $(( T_UP - T_CUT )) ms (lease $LEASE_MS ms)"
[ $(( T_SERVED - T_CUT )) -le $(( 2 * LEASE_MS + 4000 )) ]
snap alpha
for v in $P_BETA; do
    expect "$v's epoch on alpha" "$(field_of alpha "$v" epoch)" $(( EP[$v] + 1 ))
    "$WRITER" check "$(field_of alpha "$v" ublk_device)" "$W/w-$v.log" > "$W/check-$v.txt" || { cat "$W/check-$v.txt"; false; }
done
step "alpha holds every write beta acknowledged on its eight ($(cat "$W"/w-vol{8..15}.log | grep -cv '^error') writes)"
poll_for 30 "all sixteen to go on alone on alpha" eval '[ "$(names_where alpha ".role == \"primary\" and .alone == true")" = "$ALL" ]'
declare -A N0
for v in $P_ALPHA; do N0[$v]=$(acked "$W/w-$v.log"); done
sleep 1
snap alpha
for v in $P_ALPHA; do
    [ "$(acked "$W/w-$v.log")" -gt "${N0[$v]}" ] || { echo "$v's writer made no progress"; false; }
    writer_ok "$v" "${WP[$v]}" "$W/w-$v.log"
    expect "$v's epoch on alpha" "$(field_of alpha "$v" epoch)" "${EP[$v]}"
    expect "$v's device on alpha" "$(field_of alpha "$v" ublk_device)" "${DEVS[$v]}"
done
expect "alpha's starts" "$(grep -c 'node running' "$W/alpha.log")" 1
SLOWEST=0
for v in $P_ALPHA; do L=$(wstat "$W/w-$v.log" max_latency_ms); [ "$L" -le "$SLOWEST" ] || SLOWEST=$L; done
step "alpha's own eight stay alpha's, in their epoch, same devices: their writers saw no error (slowest write $SLOWEST ms)"

for v in $P_BETA; do kill -9 "${WP[$v]}" 2>/dev/null || true; done
heal_link sa ab; heal_link sb bw
T_BACK=$(now_ms)
start beta "-restarted"
poll_for 120 "beta to be resynced as secondary of all sixteen" synced "$ALL"
step "beta back as secondary of all sixteen, resynced $(( $(now_ms) - T_BACK )) ms after its start"
for v in $P_ALPHA; do writer_ok "$v" "${WP[$v]}" "$W/w-$v.log"; kill "${WP[$v]}"; wait "${WP[$v]}" || true; done
for v in $P_ALPHA; do "$WRITER" check "${DEVS[$v]}" "$W/w-$v.log" > "$W/check-$v.txt" || { cat "$W/check-$v.txt"; false; }; done
step "alpha holds every write its eight writers acknowledged ($(cat "$W"/w-vol{0..7}.log | grep -cv '^error') writes)"
poll_for 60 "the last writes to settle" synced "$ALL"
[ "$(names_where beta '.role == "secondary"')" = "$ALL" ]
stop_and_compare $ALL
step "all good"
"#;

#[test]
fn scale_sixteen_volumes_eight_primary_on_each_side_site_loss_moves_exactly_the_lost_eight() {
    ublk_script::run(
        &format!("{HELPERS}\n{SCALE_SIXTEEN}"),
        &Opts { sites: true, size: "16MiB", lease_ms: 5000, timeout: Duration::from_secs(480), ..Opts::default() },
        &[
            "resources at 1 volume",
            "resources at 8 volumes",
            "resources at 16 volumes, idle",
            "resources at 16 volumes with 16 writers",
            "site B lost",
            "alpha promoted for vol8..vol15",
            "every write beta acknowledged on its eight",
            "their writers saw no error",
            "beta back as secondary of all sixteen",
            "every write its eight writers acknowledged",
            "identical copies of vol0 vol1",
            "all good",
        ],
    );
}
