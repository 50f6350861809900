//! Roles by hand, without a witness (issue 23 part 6): the disaster-recovery runbook and a
//! planned move, as an operator runs them with `metroblk promote`, `demote` and
//! `resync --discard-local`.
//!
//! As in `ublk_failover.rs`: two sites in network namespaces (alpha, beta; the prelude's
//! witness site is not used: every volume has `fencing = "none"`, so a primary that loses
//! its peer goes on alone at once), nodes as real processes, `blk_writer` logging every write
//! a device acknowledged, checked at the end; the copies compared after a clean shutdown.
//!
//! Needs ublk: natively where the kernel has ublk_drv, else in the QEMU VM of tests/vm; never
//! skipped. Build the binaries first (`cargo build -p metroblk -p metroblk-tests`).

use std::time::Duration;

use metroblk_tests::ublk_script::{self, Opts};

/// Shell helpers of these scenarios (after the prelude).
const HELPERS: &str = r#"
vq() {
    "$BIN" status --json --config "$W/$1.toml" 2>/dev/null \
        | jq -r --arg v "$2" ".volumes[] | select(.name == \$v) | $3" 2>/dev/null || true
}
vol_field() { vq "$1" vol0 ".$2"; }
vol_is() { [ "$(vol_field "$1" "$2")" = "$3" ]; }
dev_of() { vol_field "$1" ublk_device; }
serves() {
    local d
    d=$(vq "$1" vol0 'select(.role == "primary") | .ublk_device')
    [ -n "$d" ] && [ "$d" != null ] && [ -b "$d" ]
}
# in_sync PRIMARY SECONDARY
in_sync() {
    [ "$(vq "$1" vol0 '"\(.role) \(.sync_state) \(.alone)"')" = "primary in-sync false" ] \
        && [ "$(vq "$2" vol0 '"\(.role) \(.disk_state)"')" = "secondary up-to-date" ]
}
acked() { grep -cv '^error' "$1" || true; }
start_writer() { # DEV LOG THREADS
    "$WRITER" write "$1" "$2" 4096 --threads "$3" --dsync &
    WPID=$!
    wait_for 30 "the writer's first writes on $1" [ -s "$2" ]
}
writer_ok() { # NAME PID LOG
    if ! kill -0 "$2" 2>/dev/null || grep -q '^error' "$3"; then
        echo "$1's writer failed: $(grep -m 3 '^error' "$3" | tr '\n' ';') ($(acked "$3") writes acknowledged)"
        return 1
    fi
}
# refused WHAT TEXT COMMAND...: COMMAND fails and says TEXT.
refused() {
    local what=$1 text=$2 out; shift 2
    if out=$("$@" 2>&1); then echo "$what succeeded: $out"; return 1; fi
    if ! grep -q -- "$text" <<< "$out"; then echo "$what refused, but not for '$text': $out"; return 1; fi
    step "$what refused: $out"
}
# No witness at all: the prelude's [volume.witness] sections go.
for n in alpha beta; do sed -i '/^\[volume.witness\]/,/^lease_ms/d' "$W/$n.toml"; done
! grep -q witness "$W/alpha.toml"
"#;

fn run(body: &str, timeout: Duration, steps: &[&str]) {
    let body = format!("{HELPERS}\n{body}");
    let opts = Opts { sites: true, size: "64MiB", node_extra: "fencing = \"none\"", timeout, ..Opts::default() };
    ublk_script::run(&body, &opts, steps);
}

/// The runbook: alpha primary with a writer, the link between the sites cut. Alpha goes on
/// alone and keeps writing (and writes a marker block); beta's `promote` is refused while
/// alpha is connected and succeeds once it is not (its copy is up to date as far as it knows,
/// so no --force); a writer on beta's new device. The link heals: both nodes are primary,
/// meet on the sync link and report `split-brain`, naming `--discard-local`. The operator
/// drops alpha's changes while the link is down again: `resync vol0 --discard-local` on alpha
/// deletes its device and makes it secondary; alpha restarts (its config still says primary)
/// and comes back secondary and outdated, the decision kept in its metadata; the link heals
/// and beta resyncs alpha. At the end beta holds every write its writer
/// acknowledged, the copies are identical, and alpha's marker is gone from both.
const RUNBOOK: &str = r#"
start beta ""
start alpha ""
wait_for 60 "alpha to serve vol0" serves alpha
wait_for 60 "vol0 in sync" in_sync alpha beta
DEVA=$(dev_of alpha)
start_writer "$DEVA" "$W/wa.log" 2
WA=$WPID
refused "promote on beta while alpha is connected" "is connected" "$BIN" promote --config "$W/beta.toml" vol0
T_CUT=$(now_ms)
cut_link sa ab
step "the link between the sites is cut"
wait_for 30 "alpha to go on alone" vol_is alpha alone true
N=$(acked "$W/wa.log"); sleep 1
[ "$(acked "$W/wa.log")" -gt "$N" ]
writer_ok alpha "$WA" "$W/wa.log"
head -c 4096 /dev/urandom > "$W/marker"
dd if="$W/marker" of="$DEVA" bs=4096 seek=16000 count=1 oflag=direct,dsync status=none
step "alpha goes on alone $(( $(now_ms) - T_CUT )) ms after the cut and keeps writing; a marker block written"
wait_for 60 "beta to lose alpha's links" eval '! vol_is beta link_state connected'
"$BIN" promote --config "$W/beta.toml" vol0 > "$W/promote.txt"
wait_for 30 "beta to serve vol0" serves beta
DEVB=$(dev_of beta)
step "beta promoted $(( $(now_ms) - T_CUT )) ms after the cut, epoch $(vol_field beta epoch), device $DEVB: $(tr '\n' ' ' < "$W/promote.txt")"
# The promotion raised the epoch above the old primary's: its writes are refused here.
[ "$(vol_field beta epoch)" -gt "$(vol_field alpha epoch)" ]
start_writer "$DEVB" "$W/wb.log" 2
WB=$WPID
sleep 2
writer_ok alpha "$WA" "$W/wa.log"
writer_ok beta "$WB" "$W/wb.log"
T_HEAL=$(now_ms)
heal_link sa ab
step "the link heals: both nodes are primary"
wait_for 60 "both nodes to report split-brain" eval 'vol_is alpha sync_state split-brain && vol_is beta sync_state split-brain'
vol_field alpha sync_message | grep -q -- '--discard-local'
vol_field beta sync_message | grep -q -- '--discard-local'
step "both report split-brain $(( $(now_ms) - T_HEAL )) ms after the heal: $(vol_field beta sync_message)"
expect_roles="$(vol_field alpha role) $(vol_field beta role)"
[ "$expect_roles" = "primary primary" ]
writer_ok alpha "$WA" "$W/wa.log"
writer_ok beta "$WB" "$W/wb.log"
# The operator stops alpha's application, then drops alpha's changes while the link is
# down again, and alpha restarts before it meets beta: the decision must survive the restart.
kill "$WA"; wait "$WA" || true
cut_link sa ab
T_DISCARD=$(now_ms)
"$BIN" resync --config "$W/alpha.toml" vol0 --discard-local > "$W/discard.txt"
step "resync --discard-local on alpha: $(tr '\n' ' ' < "$W/discard.txt")"
[ ! -e "$DEVA" ]
expect_alpha="$(vol_field alpha role) $(vol_field alpha ublk_device)"
[ "$expect_alpha" = "secondary null" ]
stop alpha
start alpha ""
wait_for 30 "alpha to run again" eval '[ "$(vol_field alpha role)" = secondary ]'
expect_alpha="$(vol_field alpha role) $(vol_field alpha ublk_device) $(vol_field alpha disk_state)"
[ "$expect_alpha" = "secondary null outdated" ]
step "alpha restarted as secondary (config says primary): $expect_alpha"
heal_link sa ab
wait_for 90 "alpha to be resynced from beta" in_sync beta alpha
step "alpha is beta's secondary, resynced $(( $(now_ms) - T_DISCARD )) ms after the command ($(vol_field beta resynced_bytes) bytes copied)"
sleep 1
writer_ok beta "$WB" "$W/wb.log"
kill "$WB"; wait "$WB" || true
"$WRITER" check "$DEVB" "$W/wb.log"
step "beta holds every one of the $(acked "$W/wb.log") writes its writer acknowledged"
wait_for 60 "the last writes to settle" in_sync beta alpha
step "clean shutdown"
stop beta
[ ! -e "$DEVB" ]
stop alpha
cmp "$W/alpha.img" "$W/beta.img"
step "the two copies are identical"
if dd if="$W/alpha.img" bs=4096 skip=16000 count=1 status=none | cmp -s - "$W/marker"; then
    echo "alpha's marker survived"; false
fi
step "alpha's dropped changes are gone: beta's data won"
step "all good"
"#;

#[test]
fn runbook_without_a_witness_split_brain_then_discard_local_on_the_old_primary() {
    run(
        RUNBOOK,
        Duration::from_secs(200),
        &[
            "promote on beta while alpha is connected refused",
            "alpha goes on alone",
            "beta promoted",
            "both report split-brain",
            "resync --discard-local on alpha",
            "alpha restarted as secondary",
            "alpha is beta's secondary, resynced",
            "writes its writer acknowledged",
            "the two copies are identical",
            "beta's data won",
            "all good",
        ],
    );
}

/// A planned move by hand: `demote` on alpha is refused while its device is mounted (without
/// --force); unmounted and in sync, alpha is demoted (device gone), `promote` on beta serves
/// the volume there, a write through beta's device reads back, alpha is beta's secondary,
/// and the copies end identical.
const PLANNED_MOVE: &str = r#"
start beta ""
start alpha ""
wait_for 60 "alpha to serve vol0" serves alpha
wait_for 60 "vol0 in sync" in_sync alpha beta
DEVA=$(dev_of alpha)
mkfs.ext4 -q -F "$DEVA"
mount "$DEVA" /tmp/mnt
write_files /tmp/mnt f 8 65536
refused "demote of a mounted device" "in use" "$BIN" demote --config "$W/alpha.toml" vol0
(cd /tmp/mnt && sha256sum f*) > "$W/sums"
umount /tmp/mnt
wait_for 60 "vol0 in sync after the umount" in_sync alpha beta
T0_MOVE=$(now_ms)
"$BIN" demote --config "$W/alpha.toml" vol0 > "$W/demote.txt"
[ ! -e "$DEVA" ]
step "alpha demoted: $(tr '\n' ' ' < "$W/demote.txt")"
wait_for 30 "beta to lose alpha's links" eval '! vol_is beta link_state connected'
"$BIN" promote --config "$W/beta.toml" vol0 > "$W/promote.txt"
wait_for 30 "beta to serve vol0" serves beta
DEVB=$(dev_of beta)
step "beta promoted $(( $(now_ms) - T0_MOVE )) ms after the demote, epoch $(vol_field beta epoch), device $DEVB"
head -c 4096 /dev/urandom > "$W/probe"
dd if="$W/probe" of="$DEVB" bs=4096 seek=15000 count=1 oflag=direct,dsync status=none
dd if="$DEVB" bs=4096 skip=15000 count=1 iflag=direct status=none | cmp - "$W/probe"
mount -o ro,noload "$DEVB" /tmp/mnt
(cd /tmp/mnt && sha256sum --quiet -c "$W/sums")
umount /tmp/mnt
step "a write through beta's device reads back; the files written on alpha are there"
wait_for 60 "alpha to be beta's secondary, in sync" in_sync beta alpha
step "clean shutdown"
stop beta
[ ! -e "$DEVB" ]
stop alpha
cmp "$W/alpha.img" "$W/beta.img"
step "the two copies are identical"
step "all good"
"#;

#[test]
fn planned_move_by_hand_demote_then_promote() {
    run(
        PLANNED_MOVE,
        Duration::from_secs(150),
        &[
            "demote of a mounted device refused",
            "alpha demoted",
            "beta promoted",
            "a write through beta's device reads back",
            "the two copies are identical",
            "all good",
        ],
    );
}
