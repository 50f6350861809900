//! Failover through the devices, with a witness: three sites in network namespaces (alpha,
//! beta, the witness) joined by veth links that the scripts cut, nodes and witness as real
//! processes, a writer (`blk_writer`) that logs every write `/dev/ublkbN` acknowledged, and a
//! checker that reads them back from whichever node is primary at the end.
//!
//! Needs ublk: natively where the kernel has ublk_drv, else in the QEMU VM of tests/vm; never
//! skipped. Build the binary first (`cargo build -p metroblk`).

use metroblk_tests::ublk_script::{self, Opts};

/// Shell helpers of these scenarios (after the prelude).
const HELPERS: &str = r#"
acked() { grep -cv '^error' "$1" || true; }
not_running() { ! kill -0 "$1" 2>/dev/null; }
last_ack_ms() { grep -v '^error' "$1" | tail -n 1 | cut -d' ' -f3; }
# fio_verify NAME MIB: random writes of 4k-64k at iodepth 16 over the first MIB MiB of
# $DEV_A, then a crc32c verify pass; the JSON report goes to $W/NAME.json. Run it with `&`
# to inject a fault under it.
fio_verify() {
    (cd "$W" && fio --name="$1" --filename="$DEV_A" --ioengine=libaio --direct=1 --iodepth=16 \
        --rw=randwrite --bsrange=4k-64k --randrepeat=1 --size="$2M" --verify=crc32c --verify_fatal=1 \
        --do_verify=1 --eta=never --output-format=json --output="$W/$1.json")
}
# fio_clean NAME MIB: fio reported no error, and wrote and verified all MIB MiB.
fio_clean() {
    sed -i -n '/^{/,$p' "$W/$1.json"
    [ "$(jq '.jobs[0].error' "$W/$1.json")" = 0 ]
    [ "$(jq '.jobs[0].write.io_bytes' "$W/$1.json")" = $(( $2 << 20 )) ]
    [ "$(jq '.jobs[0].read.io_bytes' "$W/$1.json")" = $(( $2 << 20 )) ]
}
# start_writer DEV LOG: the writer in the background ($WPID); waits for its first writes.
start_writer() {
    "$WRITER" write "$1" "$2" 4096 &
    WPID=$!
    wait_for 30 "the writer's first writes" [ -s "$2" ]
}
"#;

fn run(body: &str, alpha_extra: &str, steps: &[&str]) {
    let body = format!("{}\n{HELPERS}\n{body}", ublk_script::SITE_HELPERS);
    ublk_script::run(&body, &Opts { sites: true, alpha_extra, lease_ms: 2000, ..Opts::default() }, steps);
}

/// Site A (the primary) is cut from B and from the witness: A stops serving within one lease,
/// B is promoted within two, with every write A acknowledged. Then A returns: it learns it
/// was replaced, deletes its device (its suspended writer gets EIO, having never succeeded
/// after the fence), becomes secondary in its running node, and is resynced from B:
/// identical copies.
const DATA_CENTRE_PARTITION: &str = r#"
start_all
start_writer "$DEV_A" "$W/w.log"
sleep 1
step "writer on alpha: $(acked "$W/w.log") writes acknowledged"
T_CUT=$(now_ms)
cut_link sa ab; cut_link sa aw
step "site A cut from beta and from the witness"
wait_for 60 "beta to be promoted" promoted beta
T_UP=$(now_ms)
DEV_B=$(status_field beta ublk_device)
step "beta promoted and serving $DEV_B $(( T_UP - T_CUT )) ms after the cut (lease $LEASE_MS ms)"
LAST=$(last_ack_ms "$W/w.log")
step "alpha's last acknowledged write came $(( LAST - T_CUT )) ms after the cut"
[ $(( LAST - T_CUT )) -le "$LEASE_MS" ]
[ $(( T_UP - T_CUT )) -le $(( 2 * LEASE_MS + 4000 )) ]
"$WRITER" check "$DEV_B" "$W/w.log"
step "beta holds every write alpha acknowledged"
field_is beta epoch 2
heal_link sa ab; heal_link sa aw
wait_for 60 "alpha's writer to fail (its device deleted)" grep -q '^error' "$W/w.log"
wait "$WPID" || true
[ "$(last_ack_ms "$W/w.log")" = "$LAST" ]
step "alpha's writer failed and never succeeded after the fence"
wait_for 90 "alpha to be resynced as secondary" in_sync_as beta alpha
field_is alpha role secondary
field_is alpha epoch 2
[ "$(status_field alpha ublk_device)" = null ] && [ ! -e "$DEV_A" ]
cmp "$W/alpha.img" "$W/beta.img"
step "alpha is secondary in epoch 2, resynced: identical copies"
stop alpha
stop beta
step "all good"
"#;

#[test]
fn data_centre_partition_fences_the_primary_and_promotes_the_secondary_with_every_write() {
    run(
        DATA_CENTRE_PARTITION,
        "",
        &[
            "site A cut",
            "beta promoted",
            "holds every write",
            "never succeeded after the fence",
            "identical copies",
            "all good",
        ],
    );
}

/// The inter-site link is cut while both sites see the witness: the primary goes on alone once
/// the witness outdated the secondary (its writer keeps going), and the secondary is not
/// promoted. Heal: resync, identical copies.
const STORAGE_PARTITION: &str = r#"
start_all
start_writer "$DEV_A" "$W/w.log"
sleep 1
cut_link sa ab
step "inter-site link cut"
wait_for 60 "alpha to go on alone" field_is alpha alone true
N=$(acked "$W/w.log"); sleep 2
[ "$(acked "$W/w.log")" -gt "$N" ]
step "alpha goes on alone: its writer keeps going"
sleep $(( 2 * LEASE_MS / 1000 + 1 ))
field_is beta role secondary
field_is alpha role primary
field_is beta epoch 1
step "beta was not promoted"
heal_link sa ab
wait_for 90 "the resync" in_sync_as alpha beta
kill "$WPID"; wait "$WPID" || true
"$WRITER" check "$DEV_A" "$W/w.log"
wait_for 30 "the last writes to settle" in_sync_as alpha beta
sync
cmp "$W/alpha.img" "$W/beta.img"
step "healed and resynced: identical copies"
stop alpha
stop beta
step "all good"
"#;

#[test]
fn storage_partition_outdates_the_secondary_and_never_promotes_it() {
    run(STORAGE_PARTITION, "", &["link cut", "goes on alone", "was not promoted", "identical copies", "all good"]);
}

/// The witness is lost while the nodes are connected: nothing changes. Then the inter-site
/// link is cut too: the primary fences (its writer stops) and nobody is promoted. The witness
/// returns: service resumes (alone, the peer outdated).
const WITNESS_LOST: &str = r#"
start_all
start_writer "$DEV_A" "$W/w.log"
cut_link sa aw; cut_link sb bw
step "witness cut off from both sites"
sleep $(( 2 * LEASE_MS / 1000 + 1 ))
N=$(acked "$W/w.log"); sleep 1
[ "$(acked "$W/w.log")" -gt "$N" ]
field_is alpha role primary
step "nothing changed: the writer keeps going"
cut_link sa ab
T_CUT=$(now_ms)
sleep $(( 2 * LEASE_MS / 1000 + 6 ))
LAST=$(last_ack_ms "$W/w.log")
[ $(( LAST - T_CUT )) -le 500 ]
field_is alpha fenced true
field_is beta role secondary
step "inter-site link cut too: alpha fenced, nobody promoted"
N=$(acked "$W/w.log")
# The witness returns to alpha first: beta, still cut from alpha, must then not be promoted
# (the witness holds alpha's renewed lease).
heal_link sa aw
wait_for 60 "alpha to go on alone" field_is alpha alone true
sleep 1
[ "$(acked "$W/w.log")" -gt "$N" ]
heal_link sb bw
sleep $(( 2 * LEASE_MS / 1000 + 1 ))
field_is beta role secondary
step "witness back: alpha serves again"
heal_link sa ab
wait_for 90 "the resync" in_sync_as alpha beta
kill "$WPID"; wait "$WPID" || true
"$WRITER" check "$DEV_A" "$W/w.log"
step "no acknowledged write lost"
stop alpha
stop beta
step "all good"
"#;

#[test]
fn witness_lost_changes_nothing_until_the_link_goes_too_then_the_primary_fences() {
    run(
        WITNESS_LOST,
        "",
        &["nothing changed", "alpha fenced, nobody promoted", "serves again", "no acknowledged write lost", "all good"],
    );
}

/// Loss of site A: the primary is killed with SIGKILL and its links cut at once. B is
/// promoted within two leases with every write A had acknowledged.
const SITE_LOSS: &str = r#"
start_all
start_writer "$DEV_A" "$W/w.log"
sleep 1
T_CUT=$(now_ms)
kill9 alpha; cut_link sa ab; cut_link sa aw
step "site A lost"
wait_for 60 "beta to be promoted" promoted beta
T_UP=$(now_ms)
step "beta promoted and serving $(( T_UP - T_CUT )) ms after the loss (lease $LEASE_MS ms)"
[ $(( T_UP - T_CUT )) -le $(( 2 * LEASE_MS + 4000 )) ]
"$WRITER" check "$(status_field beta ublk_device)" "$W/w.log"
step "beta holds every write alpha acknowledged"
stop beta
step "all good"
"#;

#[test]
fn site_loss_promotes_the_secondary_with_every_acknowledged_write() {
    run(SITE_LOSS, "", &["site A lost", "beta promoted", "holds every write", "all good"]);
}

/// Under `on_fence = "io-error"` a fenced primary fails its I/O at once, never completes it.
const IO_ERROR: &str = r#"
start_all
start_writer "$DEV_A" "$W/w.log"
T_CUT=$(now_ms)
cut_link sa ab; cut_link sa aw
step "site A cut"
wait_for 60 "alpha's writer to see an error" grep -q '^error' "$W/w.log"
wait "$WPID" || true
T_ERR=$(grep '^error' "$W/w.log" | cut -d' ' -f4)
LAST=$(last_ack_ms "$W/w.log")
step "alpha's writer failed $(( T_ERR - T_CUT )) ms after the cut; last success $(( LAST - T_CUT )) ms after"
[ $(( LAST - T_CUT )) -le "$LEASE_MS" ]
wait_for 60 "beta to be promoted" promoted beta
"$WRITER" check "$(status_field beta ublk_device)" "$W/w.log"
step "beta holds every write alpha acknowledged"
stop beta
step "all good"
"#;

#[test]
fn a_fenced_primary_under_io_error_fails_writes_and_never_completes_them() {
    run(IO_ERROR, "on_fence = \"io-error\"", &["writer failed", "holds every write", "all good"]);
}

/// Full storage failure at site A: its backing file sits on a small tmpfs that fills up, so
/// its writes start failing (ENOSPC latches the disk `failed`). A resigns at the witness and
/// deletes its device; B takes over with every write A acknowledged.
const STORAGE_FAILURE: &str = r#"
mkdir -p "$W/small"
mount -t tmpfs -o size=6m tmpfs "$W/small"
sed -i "s|$W/alpha.img|$W/small/alpha.img|" "$W/alpha.toml"
start_all
"$WRITER" write "$DEV_A" "$W/w.log" 16384 &
WPID=$!
wait_for 60 "alpha's disk to fail" field_is alpha disk_state failed
T_FAIL=$(now_ms)
step "alpha's disk failed (its backing file's tmpfs is full) after $(acked "$W/w.log") writes"
wait_for 60 "beta to be promoted" promoted beta
step "beta promoted $(( $(now_ms) - T_FAIL )) ms after alpha's disk failed"
wait_for 30 "alpha's writer to end" not_running "$WPID"
grep -q '^error' "$W/w.log"
"$WRITER" check "$(status_field beta ublk_device)" "$W/w.log"
step "beta holds every write alpha acknowledged ($(acked "$W/w.log"))"
wait_for 30 "alpha to restart as secondary" field_is alpha role secondary
field_is alpha disk_state failed
stop alpha
stop beta
umount "$W/small"
step "all good"
"#;

#[test]
fn a_failed_disk_at_the_primary_hands_the_volume_to_the_peer() {
    run(STORAGE_FAILURE, "", &["disk failed", "beta promoted", "holds every write", "all good"]);
}

/// Planned switchover under load: the writer is quiesced (it finishes its write in flight and
/// waits), `metroblk switchover` hands the role to beta, the writer goes on on beta's device.
/// No write lost, no error; the time from the command to beta serving is printed.
const SWITCHOVER: &str = r#"
start_all
wait_for 60 "beta in sync" in_sync_as alpha beta
mkdir -p "$W/ctl"
"$WRITER" write "$DEV_A" "$W/w.log" 4096 --control "$W/ctl" &
WPID=$!
wait_for 30 "the writer's first writes" [ -s "$W/w.log" ]
sleep 1
touch "$W/ctl/pause"
wait_for 10 "the writer to pause" [ -e "$W/ctl/paused" ]
N=$(acked "$W/w.log")
S0=$(now_ms)
"$BIN" switchover --config "$W/alpha.toml" vol0
S1=$(now_ms)
wait_for 60 "beta to serve" promoted beta
S2=$(now_ms)
step "switchover: the command took $(( S1 - S0 )) ms, beta served $(( S2 - S0 )) ms after it started"
status_field beta ublk_device > "$W/ctl/device"
rm "$W/ctl/pause"
sleep 2
kill -0 "$WPID"
[ "$(acked "$W/w.log")" -gt "$N" ]
! grep -q '^error' "$W/w.log"
step "the writer goes on on beta: $(( $(acked "$W/w.log") - N )) more writes, no error"
wait_for 30 "alpha to be secondary and in sync" in_sync_as beta alpha
kill "$WPID"; wait "$WPID" || true
"$WRITER" check "$(status_field beta ublk_device)" "$W/w.log"
field_is alpha role secondary
field_is beta epoch 2
step "no write lost"
stop alpha
stop beta
step "all good"
"#;

#[test]
fn switchover_under_load_loses_no_write_and_shows_no_error() {
    run(SWITCHOVER, "", &["switchover: the command took", "goes on on beta", "no write lost", "all good"]);
}

/// ext4 on the primary's device, failover (site A lost), the promoted node's device mounted:
/// every file synced before the loss is there and e2fsck is clean.
const EXT4_FAILOVER: &str = r#"
start_all
mkfs.ext4 -q -F "$DEV_A"
mount "$DEV_A" /tmp/mnt
write_files /tmp/mnt synced 30 65536
sync
(cd /tmp/mnt && find . -type f ! -path './lost+found/*' -exec sha256sum {} +) > "$W/sums"
step "ext4 on alpha with 30 synced files"
kill9 alpha; cut_link sa ab; cut_link sa aw
step "site A lost"
wait_for 60 "beta to be promoted" promoted beta
DEV_B=$(status_field beta ublk_device)
step "beta promoted: $DEV_B"
# As after any crash, the mount replays the journal (alpha died mounted: transactions it
# committed after the sync, such as the atime updates of the sha256sum above, may not have
# reached their home blocks; e2fsck -n does not replay them and would see stale metadata).
mkdir -p /tmp/mnt2
mount "$DEV_B" /tmp/mnt2
(cd /tmp/mnt2 && sha256sum --quiet -c "$W/sums")
umount /tmp/mnt2
e2fsck -fn "$DEV_B"
step "beta's device: every file there, e2fsck clean"
stop beta
step "all good"
"#;

#[test]
fn ext4_survives_a_failover_to_the_secondary() {
    run(EXT4_FAILOVER, "", &["30 synced files", "beta promoted", "every file there", "all good"]);
}

/// The secondary's process dies (kill -9) while fio writes through the primary with verify:
/// the witness lets the primary go on alone, fio finishes without an error and its verify
/// pass reads back every block; the restarted secondary is resynced: identical copies.
const SECONDARY_KILLED: &str = r#"
start_all
step "fio writes 96 MiB with verify; the secondary is killed during the writes"
fio_verify sk 96 &
FIO=$!
beta_wrote_8m() { [ "$(status_field beta local_write_bytes)" -gt $(( 8 << 20 )) ] 2>/dev/null; }
wait_for 60 "8 MiB on beta" beta_wrote_8m
kill -0 "$FIO"   # fio is still writing
kill9 beta
step "secondary killed -9 under load"
wait_for 60 "alpha to go on alone" field_is alpha alone true
wait "$FIO"
fio_clean sk 96
step "fio wrote and verified 96 MiB without an error"
start beta "-restarted"
wait_for 120 "beta to be resynced" in_sync_as alpha beta
field_is alpha alone false
# Only what fio's first 96 MiB dirtied, not the 256 MiB volume.
RESYNCED=$(status_field alpha resynced_bytes)
[ "$RESYNCED" -gt 0 ] && [ "$RESYNCED" -le $(( 100 << 20 )) ]
sync
cmp "$W/alpha.img" "$W/beta.img"
step "beta restarted and resynced $(( RESYNCED >> 20 )) MiB: identical copies"
stop alpha
stop beta
step "all good"
"#;

#[test]
fn a_secondary_killed_under_fio_is_resynced_and_fio_sees_no_error() {
    run(SECONDARY_KILLED, "", &["killed -9 under load", "without an error", "identical copies", "all good"]);
}

/// The sites are far apart: 15 ms ± 5 ms each way between alpha and beta (so packets are
/// reordered) and 1 % of them lost. fio with verify runs through it: no error, the link is
/// never dropped, the primary never goes on alone, and the copies are identical.
const WAN_LINK: &str = r#"
start_all
step "a WAN between the sites: 15 ms +- 5 ms each way, 1 % loss"
ip netns exec sa tc qdisc add dev ab root netem delay 15ms 5ms loss 1%
ip netns exec sb tc qdisc add dev ba root netem delay 15ms 5ms loss 1%
RECONNECTS=$(status_field alpha reconnects)
step "fio writes 24 MiB with verify over it"
fio_verify wan 24
fio_clean wan 24
RTT_US=$(status_field alpha link_rtt_us)
echo "write latency p50 $(jq '.jobs[0].write.clat_ns.percentile."50.000000"' "$W/wan.json") ns; link rtt $RTT_US us"
# The delay is real: the round trip is at least the two 10 ms minimum delays.
[ "${RTT_US%.*}" -ge 20000 ]
[ "$(status_field alpha reconnects)" = "$RECONNECTS" ]
field_is alpha alone false
step "fio wrote and verified 24 MiB; the link was never dropped"
stop alpha
stop beta
cmp "$W/alpha.img" "$W/beta.img"
step "identical copies"
step "all good"
"#;

#[test]
fn a_slow_lossy_reordering_link_between_the_sites_loses_nothing() {
    run(WAN_LINK, "", &["a WAN between the sites", "never dropped", "identical copies", "all good"]);
}

/// Both nodes' daemons die at once (kill -9 of both under writes; the witness stays) and both
/// are restarted. Whichever the witness lets serve (alpha recovering its device, or beta
/// promoted once alpha's lease ran out), it holds every acknowledged write, the other is
/// resynced from it, and the copies end identical.
const BOTH_KILLED: &str = r#"
start_all
start_writer "$DEV_A" "$W/w.log"
sleep 1
kill9 alpha; kill9 beta
sleep 0.5
ACKED=$(acked "$W/w.log")
step "both nodes killed -9 under writes; $ACKED writes acknowledged"
sleep 1
# Nothing completes while both are dead.
[ "$(acked "$W/w.log")" = "$ACKED" ]
start beta "-restarted"
start alpha "-restarted"
primary_in_sync() { { promoted alpha && in_sync_as alpha beta; } || { promoted beta && in_sync_as beta alpha; }; }
wait_for 120 "a primary in sync with its peer" primary_in_sync
if promoted alpha; then P=alpha S=beta; else P=beta S=alpha; fi
step "both restarted: $P serves the volume, $S is in sync"
# The writer goes on through a recovered device, or failed with the deposed one.
sleep 1
kill "$WPID" 2>/dev/null || true
wait "$WPID" || true
"$WRITER" check "$(status_field "$P" ublk_device)" "$W/w.log"
step "$P holds every one of the $(acked "$W/w.log") acknowledged writes"
wait_for 60 "$S to be in sync again" in_sync_as "$P" "$S"
stop "$P"
stop "$S"
cmp "$W/alpha.img" "$W/beta.img"
step "identical copies"
step "all good"
"#;

#[test]
fn both_nodes_killed_at_once_come_back_with_every_acknowledged_write() {
    run(
        BOTH_KILLED,
        "",
        &["both nodes killed -9", "both restarted", "acknowledged writes", "identical copies", "all good"],
    );
}

/// The secondary's storage fails under load (its backing file's tmpfs fills up: ENOSPC
/// latches its disk `failed`). The primary treats it as a lost peer: the witness records the
/// secondary outdated, the primary goes on alone, and fio finishes with its verify pass clean.
const SECONDARY_DISK_FAILED: &str = r#"
mkdir -p "$W/small"
mount -t tmpfs -o size=12m tmpfs "$W/small"
sed -i "s|$W/beta.img|$W/small/beta.img|" "$W/beta.toml"
start_all
step "fio writes 48 MiB with verify; beta's storage holds 12 MiB"
fio_verify sd 48 &
FIO=$!
wait_for 120 "beta's disk to fail" field_is beta disk_state failed
step "beta's disk failed: $(status_field beta disk_error)"
wait_for 60 "alpha to go on alone" field_is alpha alone true
step "alpha goes on alone"
wait "$FIO"
fio_clean sd 48
step "fio wrote and verified 48 MiB without an error"
stop alpha
stop beta
umount "$W/small"
step "all good"
"#;

#[test]
fn a_failed_disk_at_the_secondary_lets_the_primary_go_on_alone() {
    run(SECONDARY_DISK_FAILED, "", &["beta's disk failed", "goes on alone", "without an error", "all good"]);
}
