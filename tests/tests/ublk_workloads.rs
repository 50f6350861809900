//! Real workloads on the mirrored block device: a primary and a secondary `metroblk node run`
//! on loopback, the primary's `/dev/ublkbN` under XFS, fio with data verification (also across
//! a kill -9 of the primary), and a flush that must reach the peer.
//!
//! Like ublk_device.rs these need ublk: natively where the kernel has ublk_drv, else in the
//! QEMU VM of tests/vm; never skipped. The bash prelude (configs, `start`/`stop`/`kill9`,
//! `wait_device`, ...) is metroblk_tests::ublk_script. Build the binary first
//! (`cargo build -p metroblk`).
//!
//! Run: `cargo test -p metroblk-tests --test ublk_workloads -- --nocapture --test-threads=1`

use metroblk_tests::ublk_script::{self, Opts};

/// Shell helpers of these tests, on top of the prelude.
const HELPERS: &str = r#"
# The same job, written once: fio_job NAME REPORT SIZE [extra fio options...]. Two jobs over
# disjoint halves of the first SIZE bytes (both ublk queues get work), random writes of mixed
# sizes, 32 in flight each, O_DIRECT through libaio, every block stamped with a crc32c header.
fio_job() {
    local name=$1 out=$W/$2.json size=$3 rc=0; shift 3
    # In $W: fio saves its verify state files in the current directory.
    (cd "$W" && fio --name="$name" --filename="$DEV" --ioengine=libaio --direct=1 --iodepth=32 \
        --rw=randwrite --bsrange=4k-128k --randrepeat=1 --numjobs=2 \
        --size=$(( size / 2 )) --offset_increment=$(( size / 2 )) \
        --verify=crc32c --verify_fatal=1 --group_reporting \
        --eta=never --output-format=json --output="$out" "$@") || rc=$?
    # fio puts its notes (e.g. that two writers share a file, which our disjoint halves make
    # harmless) ahead of the JSON: show them, keep the JSON.
    sed -n '/^{/q;p' "$out"
    sed -i -n '/^{/,$p' "$out"
    return $rc
}
# fio_total JSONFILE read|write FIELD: a field summed over the jobs of a fio JSON report.
fio_total() { jq "[.jobs[].$2.$3] | add" "$1"; }
# Fails unless no job of a fio JSON report had an error.
fio_no_errors() {
    [ "$(jq '[.jobs[].error] | add' "$1")" = 0 ]
    [ "$(jq '[.jobs[] | .total_err // 0] | add' "$1")" = 0 ]
}
# must_differ A B [BYTES]: the two files (their first BYTES) differ. Not `! cmp`, which
# would not stop a `set -e` script, and a cmp that fails (status 2) is no difference. (No
# process substitution in these scripts: the VM has no /dev/fd.)
must_differ() {
    local rc=0
    cmp -s ${3:+-n "$3"} "$1" "$2" || rc=$?
    case $rc in
    1) ;;
    0) echo "$1 and $2 are identical${3:+ in their first $3 bytes}"; return 1 ;;
    *) echo "cmp $1 $2 failed"; return 1 ;;
    esac
}
# The kernel logged no I/O error for any ublk device.
no_kernel_io_errors() {
    if dmesg | grep -E 'I/O error.*ublkb|ublkb.*I/O error|Buffer I/O error'; then
        echo "the kernel logged I/O errors"; return 1
    fi
}
"#;

/// mkfs.xfs, mount, a few hundred files, sync, umount, `xfs_repair -n`, clean shutdown, both
/// copies identical, the secondary's copy mounts read-only and holds the same files.
const XFS: &str = r#"
step "start the secondary and the primary"
start beta ""
start alpha ""
wait_device
step "device $DEV is up; mkfs.xfs"
mkfs.xfs -q -f "$DEV"
mount -t xfs "$DEV" /tmp/mnt
step "write 360 files of random content"
mkdir -p /tmp/mnt/small /tmp/mnt/mid /tmp/mnt/big/deeper
write_files /tmp/mnt/small s 150 3001
write_files /tmp/mnt/mid m 150 40000
write_files /tmp/mnt/big/deeper b 60 250000
# Rewrite some in place and delete a few: overwrites and frees, not only appends.
for f in /tmp/mnt/mid/maa{a,b,c,d,e}; do head -c 40000 /dev/urandom | dd of="$f" conv=notrunc status=none; done
rm /tmp/mnt/small/saa{a,b,c}
(cd /tmp/mnt && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$W/sums"
[ "$(wc -l < "$W/sums")" = 357 ]
sync
umount /tmp/mnt
step "xfs_repair -n finds nothing"
xfs_repair -n "$DEV" > "$W/xfs_repair.out" 2>&1 || { cat "$W/xfs_repair.out"; false; }
step "the files read back through the device"
mount -t xfs -o ro "$DEV" /tmp/mnt
(cd /tmp/mnt && sha256sum --quiet -c "$W/sums")
umount /tmp/mnt
"$BIN" status --config "$W/alpha.toml"
[ "$(status_field beta local_write_bytes)" -gt $(( 20 << 20 )) ]
step "clean shutdown (SIGTERM): the device is stopped and deleted"
stop alpha
for _ in $(seq 50); do [ -e "$DEV" ] || break; sleep 0.1; done
[ ! -e "$DEV" ]
stop beta
step "primary and secondary backing files are identical"
cmp "$W/alpha.img" "$W/beta.img"
step "the secondary's copy mounts read-only and holds the same files"
check_secondary_copy xfs ro,norecovery
step "all good"
"#;

/// fio random writes of mixed sizes with crc32c verification, then both copies identical.
const FIO_VERIFY: &str = r#"
step "start the secondary and the primary"
start beta ""
start alpha ""
wait_device
step "fio: 64 MiB of random writes, 4k-128k, iodepth 32, then verify"
fio_job verify verify $(( 64 << 20 )) --do_verify=1
fio_no_errors "$W/verify.json"
# Everything was written, and all of it was read back and checked.
[ "$(fio_total "$W/verify.json" write io_bytes)" = $(( 64 << 20 )) ]
[ "$(fio_total "$W/verify.json" read io_bytes)" = $(( 64 << 20 )) ]
jq -r '.jobs[] | "\(.jobname): wrote \(.write.io_bytes) B in \(.write.total_ios) I/Os, verified \(.read.io_bytes) B"' "$W/verify.json"
no_kernel_io_errors
"$BIN" status --config "$W/alpha.toml"
[ "$(status_field beta local_write_bytes)" -ge $(( 64 << 20 )) ]
stop_both_and_compare
# ... and hold what fio wrote, not just two equal runs of zeroes.
must_differ "$W/beta.img" /dev/zero $(( 64 << 20 ))
step "all good"
"#;

/// kill -9 of the primary while fio writes with iodepth 32; the restarted primary recovers
/// the device and the requests in flight are reissued: fio sees no error, and a verify-only
/// pass finds every block intact.
const FIO_KILL: &str = r#"
step "start the secondary and the primary"
start beta ""
start alpha ""
wait_device
FIRST_DEV=$DEV
# The kernel's request timeout is short (see metroblk_ublk::device::set_io_timeout).
[ "$(cat /sys/block/${DEV#/dev/}/queue/io_timeout)" = 2000 ]
step "fio writes 96 MiB (with verify) while the primary is killed"
# Both jobs on CPU 0, so 2 x 32 requests go to ublk queue 0, whose depth is 64: the queue is
# full at the server when it dies, the case the kernel detects only by the request timeout.
fio_job kill kill $(( 96 << 20 )) --do_verify=1 --cpus_allowed=0 &
FIO=$!
# Kill once a good part has gone through, with fio in the middle of its writes.
for _ in $(seq 300); do
    [ "$(status_field beta local_write_bytes)" -gt $(( 16 << 20 )) ] && break
    sleep 0.1
done
[ "$(status_field beta local_write_bytes)" -gt $(( 16 << 20 )) ]
echo "requests in flight at the kill: $(status_field alpha requests_in_flight)"
step "kill -9 the primary"
KILLED_AT=$(date +%s%N)
kill9 alpha
kill -0 "$FIO"   # fio had not finished
sleep 1
[ -b "$DEV" ]
kill -0 "$FIO"   # and it waits: the device is quiesced, not failed
step "restart the primary: it recovers $DEV"
start alpha "-restarted"
# The device, whatever the link shows (a resync of the regions dirty at the kill may be
# running: the link state then says sync-source).
wait_device alpha any
[ "$DEV" = "$FIRST_DEV" ]
grep -q "ublk device is live.*recovered=true" "$W/alpha-restarted.log"
# Within seconds, not the kernel's default 30 s request timeout.
RECOVERY_MS=$(( ($(date +%s%N) - KILLED_AT) / 1000000 ))
echo "from kill -9 to the recovered device: $RECOVERY_MS ms"
[ "$RECOVERY_MS" -lt 15000 ]
[ "$(cat /sys/block/${DEV#/dev/}/queue/io_timeout)" = 2000 ]
step "fio finishes on the recovered device without an error"
wait "$FIO"
fio_no_errors "$W/kill.json"
[ "$(fio_total "$W/kill.json" write io_bytes)" = $(( 96 << 20 )) ]
[ "$(fio_total "$W/kill.json" read io_bytes)" = $(( 96 << 20 )) ]
step "a verify-only pass of the same job finds every block intact"
fio_job kill verify-only $(( 96 << 20 )) --verify_only --cpus_allowed=0
# A verify-only pass reads and checks every block the job wrote (it also reports the writes
# it skipped, as writes). A bad block would make it exit non-zero with error 84 (EILSEQ).
fio_no_errors "$W/verify-only.json"
[ "$(fio_total "$W/verify-only.json" read io_bytes)" = $(( 96 << 20 )) ]
no_kernel_io_errors
"$BIN" status --config "$W/alpha.toml"
stop_both_and_compare
must_differ "$W/beta.img" /dev/zero $(( 96 << 20 ))
step "all good"
"#;

/// Data written through the page cache of the block device reaches the secondary when it is
/// flushed (fsync of the device: writeback, then FLUSH), before any clean shutdown: it is on
/// the secondary after kill -9 of the primary.
const FLUSH: &str = r#"
step "start the secondary and the primary"
start beta ""
start alpha ""
wait_device
# Another opener keeps the page cache of $DEV when dd closes it (the last close writes it back).
exec 3< "$DEV"
if [ "${METROBLK_IN_VM:-0}" = 1 ]; then
    # No periodic writeback: only our flush moves the dirty pages to the device.
    echo 0 > /proc/sys/vm/dirty_writeback_centisecs
    echo 360000 > /proc/sys/vm/dirty_expire_centisecs
fi
head -c $(( 24 << 20 )) /dev/urandom > "$W/data"
OFF=$(( 40 << 20 ))
# region FILE: the 24 MiB written below, copied to $W/region.
region() {
    dd if="$1" of="$W/region" bs=1M skip=$(( OFF >> 20 )) count=24 "${@:2}" status=none
}
FLUSHES_A=$(status_field alpha flushes)
FLUSHES_B=$(status_field beta flushes)
WRITTEN_B=$(status_field beta local_write_bytes)
step "write 24 MiB through the page cache of $DEV (no O_DIRECT, no fsync)"
dd if="$W/data" of="$DEV" bs=1M seek=$(( OFF >> 20 )) status=none
if [ "${METROBLK_IN_VM:-0}" = 1 ]; then
    # Still only in the page cache: neither copy has it yet, so the flush below is what moves it.
    grep -E '^(Dirty|Writeback):' /proc/meminfo
    [ "$(status_field beta local_write_bytes)" -lt $(( WRITTEN_B + (24 << 20) )) ]
    region "$W/beta.img"; must_differ "$W/region" "$W/data"
    region "$W/alpha.img"; must_differ "$W/region" "$W/data"
fi
step "fsync the device (writeback, then FLUSH)"
sync "$DEV"
# The FLUSH went through the primary to the secondary, which flushed too.
[ "$(status_field alpha flushes)" -gt "$FLUSHES_A" ]
[ "$(status_field beta flushes)" -gt "$FLUSHES_B" ]
[ "$(status_field beta local_write_bytes)" -ge $(( WRITTEN_B + (24 << 20) )) ]
step "kill -9 the primary: no clean shutdown"
kill9 alpha
step "the secondary's backing file holds all the flushed data"
region "$W/beta.img"; cmp "$W/region" "$W/data"
region "$W/alpha.img"; cmp "$W/region" "$W/data"
exec 3<&-
step "restart the primary: the device reads back the same data"
start alpha "-restarted"
wait_device
grep -q "ublk device is live.*recovered=true" "$W/alpha-restarted.log"
region "$DEV" iflag=direct; cmp "$W/region" "$W/data"
stop_both_and_compare
step "all good"
"#;

/// Four O_DIRECT writers at iodepth 32 on one small range, on both ublk queues, so writes to
/// the same blocks are in flight at once (the kernel does not order them). The engine must
/// apply overlapping writes in one order on both nodes: after a clean stop the two backing
/// files are identical.
const OVERLAPPING: &str = r#"
step "start the secondary and the primary"
start beta ""
start alpha ""
wait_device
step "fio: 4 writers x 24 MiB of 4k-64k random writes into the same 2 MiB, iodepth 32"
(cd "$W" && fio --name=overlap --filename="$DEV" --ioengine=libaio --direct=1 --iodepth=32 \
    --rw=randwrite --bsrange=4k-64k --numjobs=4 --size=2M --io_size=24M --randrepeat=0 \
    --group_reporting --eta=never --output-format=json --output="$W/overlap.json") || { cat "$W/overlap.json"; exit 1; }
sed -i -n '/^{/,$p' "$W/overlap.json"
fio_no_errors "$W/overlap.json"
[ "$(fio_total "$W/overlap.json" write io_bytes)" = $(( 96 << 20 )) ]
waits=$(status_field alpha conflict_waits)
echo "writes that waited for an overlapping one: $waits"
[ "$waits" -gt 0 ]
no_kernel_io_errors
stop_both_and_compare
must_differ "$W/beta.img" /dev/zero $(( 2 << 20 ))
step "all good"
"#;

/// A client that changes its O_DIRECT buffer while the write is in flight. metroblk runs ublk
/// in copy mode: the driver copies the request's pages into the server's buffer once, and the
/// local write and the send to the peer both come from that copy, so both nodes get the same
/// bytes whatever mix of versions the copy caught. After a clean stop the two backing files
/// are identical (DRBD documents the opposite for its zero-copy path: a page changed in
/// flight can reach the two disks in two versions).
const SCRIBBLED: &str = r#"
step "start the secondary and the primary"
start beta ""
start alpha ""
wait_device
step "a client rewrites its buffer during 2000 direct writes of 64 KiB into 4 MiB"
"$WRITER" scribble "$DEV" 64 2000
no_kernel_io_errors
stop_both_and_compare
must_differ "$W/beta.img" /dev/zero $(( 4 << 20 ))
step "all good"
"#;

/// The write path the kernel in use offers `payload_checksum = "none"`: zero copy where ublk
/// has automatic buffer registration (Linux 6.16+: the VM's 7.x), copy elsewhere (6.12).
const WANT_WRITE_PATH: &str = r#"
want_write_path() {
    local v major minor
    v=$(uname -r); major=${v%%.*}; v=${v#*.}; minor=${v%%.*}
    if [ "$major" -gt 6 ] || { [ "$major" = 6 ] && [ "$minor" -ge 16 ]; }; then echo zero-copy; else echo copy; fi
}
check_write_path() {
    local path; path=$(status_field alpha write_path)
    echo "kernel $(uname -r): write path $path"
    [ "$path" = "$(want_write_path)" ]
}
"#;

/// `payload_checksum = "none"` on both nodes: on a kernel that offers it the device runs in
/// zero copy (status says so), and fio with crc32c verify, then ext4 with its checker, are
/// mirrored exactly: both copies identical.
const ZERO_COPY: &str = r#"
step "start the secondary and the primary, payload_checksum = none"
start beta ""
start alpha ""
wait_device
step "status shows the write path the kernel offers"
check_write_path
"$BIN" status --config "$W/alpha.toml" | grep "write path"
step "fio: 64 MiB of random writes, 4k-128k, iodepth 32, then verify"
fio_job verify verify $(( 64 << 20 )) --do_verify=1
fio_no_errors "$W/verify.json"
[ "$(fio_total "$W/verify.json" write io_bytes)" = $(( 64 << 20 )) ]
[ "$(fio_total "$W/verify.json" read io_bytes)" = $(( 64 << 20 )) ]
step "mkfs.ext4, 200 files, e2fsck, the files read back"
mkfs.ext4 -q -F "$DEV"
mount -t ext4 "$DEV" /tmp/mnt
mkdir -p /tmp/mnt/d /tmp/mnt/e
write_files /tmp/mnt/d f 150 20000
write_files /tmp/mnt/e g 50 300000
(cd /tmp/mnt && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$W/sums"
umount /tmp/mnt
e2fsck -fn "$DEV"
mount -t ext4 -o ro "$DEV" /tmp/mnt
(cd /tmp/mnt && sha256sum --quiet -c "$W/sums")
umount /tmp/mnt
no_kernel_io_errors
"$BIN" status --config "$W/alpha.toml"
[ "$(status_field beta local_write_bytes)" -ge $(( 64 << 20 )) ]
stop_both_and_compare
step "the secondary's copy holds the same files"
check_secondary_copy ext4 ro,noload
step "all good"
"#;

/// The client of `SCRIBBLED` under `payload_checksum = "none"`. In copy mode (6.12) the
/// kernel copies each write into our buffer once, and both nodes get that one version. In
/// zero copy (7.x) the local write and the send read the client's pages at different times,
/// so a page changed mid-write can reach the two copies in different versions (DRBD documents
/// the same for its zero-copy sends). What we guarantee then: an online `verify` finds those
/// regions and resyncs them, after which the copies are identical.
const SCRIBBLED_ZERO_COPY: &str = r#"
step "start the secondary and the primary, payload_checksum = none"
start beta ""
start alpha ""
wait_device
check_write_path
step "a client rewrites its buffer during 2000 direct writes of 64 KiB into 4 MiB"
"$WRITER" scribble "$DEV" 64 2000
no_kernel_io_errors
step "verify finds what differs and resyncs it"
"$BIN" verify --config "$W/alpha.toml" vol0 | tee "$W/verify.out"
"$BIN" resync --config "$W/alpha.toml" vol0 --wait
if [ "$(want_write_path)" = copy ]; then grep -q "regions checked, 0 differ" "$W/verify.out"; fi
"$BIN" verify --config "$W/alpha.toml" vol0 | tee "$W/verify2.out"
grep -q "regions checked, 0 differ" "$W/verify2.out"
stop_both_and_compare
must_differ "$W/beta.img" /dev/zero $(( 4 << 20 ))
step "all good"
"#;

/// `block_size = 4096` on both nodes: the device shows 4 KiB logical sectors, the kernel
/// refuses a 512-byte direct write before it reaches us, and ext4 and fio on top are mirrored.
const BLOCK_4096: &str = r#"
step "start the secondary and the primary, both with block_size = 4096"
start beta ""
start alpha ""
wait_device
step "the device has 4 KiB logical and physical sectors"
blockdev --getss --getpbsz "$DEV"
[ "$(blockdev --getss "$DEV")" = 4096 ]
[ "$(blockdev --getpbsz "$DEV")" = 4096 ]
step "a 512-byte direct write is refused by the kernel"
if dd if=/dev/zero of="$DEV" bs=512 count=1 seek=1 oflag=direct status=none 2>"$W/dd512.err"; then
    echo "a 512-byte O_DIRECT write to a 4096-byte-sector device succeeded"; exit 1
fi
cat "$W/dd512.err"
step "fio: 32 MiB of random writes, 4k-128k, then verify"
fio_job verify verify $(( 32 << 20 )) --do_verify=1 --offset=$(( 160 << 20 ))
fio_no_errors "$W/verify.json"
[ "$(fio_total "$W/verify.json" read io_bytes)" = $(( 32 << 20 )) ]
step "mkfs.ext4 (4 KiB blocks), 120 files, e2fsck"
mkfs.ext4 -q -F "$DEV"
dumpe2fs -h "$DEV" 2>/dev/null | grep -E '^Block size'
mount -t ext4 "$DEV" /tmp/mnt
mkdir -p /tmp/mnt/d
write_files /tmp/mnt/d f 120 20000
(cd /tmp/mnt && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$W/sums"
umount /tmp/mnt
e2fsck -fn "$DEV"
no_kernel_io_errors
stop_both_and_compare
step "the secondary's copy mounts read-only and holds the same files"
check_secondary_copy ext4 ro,noload
step "all good"
"#;

/// Two volumes on each node, each its own device and links: both mirrored at once, one
/// with DISCARD and WRITE_ZEROES ranges (read back as zeros), both pairs of copies identical.
const TWO_VOLUMES: &str = r#"
# add_volume NAME PEER ROLE PORT PEER_PORT: a second volume, vol1 (96 MiB), in NAME's config
# (the prelude's has vol0).
add_volume() {
    cat >> "$W/$1.toml" <<EOF

[[volume]]
name = "vol1"
size = "96MiB"
backing_file = "$W/$1-1.img"
metadata_file = "$W/$1-1.meta"
listen = "127.0.0.1:$4"
role = "$3"
[volume.peer]
name = "$2"
address = "127.0.0.1:$5"
authkey_file = "$W/key"
EOF
    "$BIN" create-md --force --config "$W/$1.toml" vol1 >/dev/null
}
add_volume alpha beta primary 7811 7812
add_volume beta alpha secondary 7812 7811
step "start both nodes, two volumes each"
start beta ""
start alpha ""
vol_field() { "$BIN" status --json --config "$W/alpha.toml" 2>/dev/null | jq -r ".volumes[$1].$2"; }
both_up() {
    for i in 0 1; do
        local d; d=$(vol_field "$i" ublk_device)
        [ -n "$d" ] && [ "$d" != null ] && [ -b "$d" ] && [ "$(vol_field "$i" link_state)" = connected ] || return 1
    done
}
wait_for 60 "both devices" both_up
DEV0=$(vol_field 0 ublk_device)
DEV1=$(vol_field 1 ublk_device)
[ "$DEV0" != "$DEV1" ]
[ "$(blockdev --getsize64 "$DEV0")" = $(( 64 << 20 )) ]
[ "$(blockdev --getsize64 "$DEV1")" = $(( 96 << 20 )) ]
"$BIN" status --config "$W/alpha.toml" | tee "$W/status.txt"
grep -q vol0 "$W/status.txt" && grep -q vol1 "$W/status.txt"
step "two devices: $DEV0 (64 MiB) and $DEV1 (96 MiB)"
dd if=/dev/urandom of="$DEV0" bs=1M count=64 oflag=direct status=none &
D0=$!
dd if=/dev/urandom of="$DEV1" bs=1M count=96 oflag=direct status=none
wait "$D0"
step "both devices written at once"
blkdiscard -o $(( 8 << 20 )) -l $(( 8 << 20 )) "$DEV1"
blkdiscard -z -o $(( 40 << 20 )) -l $(( 4 << 20 )) "$DEV1"
dd if="$DEV1" bs=1M skip=8 count=8 iflag=direct status=none | cmp -n $(( 8 << 20 )) - /dev/zero
dd if="$DEV1" bs=1M skip=40 count=4 iflag=direct status=none | cmp -n $(( 4 << 20 )) - /dev/zero
# ... and only those ranges.
dd if="$DEV1" bs=1M skip=16 count=24 iflag=direct status=none > "$W/mid"
must_differ "$W/mid" /dev/zero
step "a discarded and a zeroed range of $DEV1 read back as zeros"
no_kernel_io_errors
stop alpha
stop beta
cmp "$W/alpha.img" "$W/beta.img"
cmp "$W/alpha-1.img" "$W/beta-1.img"
must_differ "$W/beta.img" /dev/zero
step "both volumes: identical copies"
step "all good"
"#;

fn run(body: &str, size: &str, steps: &[&str]) {
    run_with(body, &Opts { size, ..Opts::default() }, steps);
}

fn run_with(body: &str, opts: &Opts, steps: &[&str]) {
    let body = format!("{HELPERS}\n{body}");
    ublk_script::run(&body, opts, steps);
}

#[test]
fn xfs_on_the_mirrored_device_is_identical_on_both_nodes() {
    // mkfs.xfs refuses filesystems under 300 MB.
    run(
        XFS,
        "320MiB",
        &[
            "mkfs.xfs",
            "write 360 files",
            "xfs_repair -n finds nothing",
            "are identical",
            "holds the same files",
            "all good",
        ],
    );
}

#[test]
fn fio_random_writes_with_crc32c_verify_are_mirrored() {
    run(FIO_VERIFY, "256MiB", &["fio: 64 MiB", "are identical", "all good"]);
}

#[test]
fn fio_survives_kill_9_of_the_primary_without_an_error() {
    run(FIO_KILL, "256MiB", &["kill -9 the primary", "recovers", "without an error", "verify-only", "all good"]);
}

#[test]
fn a_flush_reaches_the_secondary_before_the_primary_dies() {
    run(FLUSH, "256MiB", &["through the page cache", "fsync the device", "holds all the flushed data", "all good"]);
}

#[test]
fn a_device_with_4096_byte_sectors_carries_ext4_and_fio_on_both_nodes() {
    run_with(
        BLOCK_4096,
        &Opts { node_extra: "block_size = 4096", ..Opts::default() },
        &["4 KiB logical", "refused by the kernel", "then verify", "e2fsck", "are identical", "same files", "all good"],
    );
}

#[test]
fn two_volumes_on_one_node_pair_are_mirrored_with_discard_and_write_zeroes() {
    run(
        TWO_VOLUMES,
        "64MiB",
        &["two devices", "written at once", "read back as zeros", "both volumes: identical copies", "all good"],
    );
}

#[test]
fn a_buffer_changed_during_its_write_leaves_identical_copies() {
    run(SCRIBBLED, "64MiB", &["rewrites its buffer", "are identical", "all good"]);
}

const UNCHECKED: &str = "payload_checksum = \"none\"";

#[test]
fn zero_copy_where_the_kernel_offers_it_mirrors_fio_and_ext4_exactly() {
    let body = format!("{WANT_WRITE_PATH}\n{ZERO_COPY}");
    run_with(
        &body,
        &Opts { node_extra: UNCHECKED, ..Opts::default() },
        &["write path the kernel offers", "then verify", "e2fsck", "are identical", "same files", "all good"],
    );
}

/// `FIO_KILL` under `payload_checksum = "none"`: on 7.x the killed server's device is in
/// zero copy, and the restarted one recovers it in that mode (the reissued requests arrive
/// with their pages registered for the new server's rings).
#[test]
fn with_zero_copy_fio_survives_kill_9_of_the_primary_without_an_error() {
    let body = format!("{WANT_WRITE_PATH}\n{FIO_KILL}");
    let body = body.replace(
        "step \"fio finishes on the recovered device without an error\"",
        "check_write_path\nstep \"fio finishes on the recovered device without an error\"",
    );
    assert!(body.contains("check_write_path\nstep"), "FIO_KILL's step text changed");
    run_with(
        &body,
        &Opts { node_extra: UNCHECKED, ..Opts::default() },
        &["kill -9 the primary", "recovers", "without an error", "verify-only", "all good"],
    );
}

#[test]
fn with_zero_copy_a_buffer_changed_during_its_write_is_found_and_repaired_by_verify() {
    let body = format!("{WANT_WRITE_PATH}\n{SCRIBBLED_ZERO_COPY}");
    run_with(
        &body,
        &Opts { size: "64MiB", node_extra: UNCHECKED, ..Opts::default() },
        &["rewrites its buffer", "verify finds", "are identical", "all good"],
    );
}

#[test]
fn overlapping_direct_writers_leave_identical_copies() {
    run(OVERLAPPING, "64MiB", &["same 2 MiB", "are identical", "all good"]);
}
