//! Through the device: ext4 on the primary's `/dev/ublkbN` while the link between the nodes is
//! cut (netem 100 % loss on loopback, where both nodes talk), then healed: the resync copies
//! only what changed, and the secondary's copy, mounted read-only, holds every file.
//!
//! Needs ublk: natively where the kernel has ublk_drv, else in the QEMU VM of tests/vm; never
//! skipped. Build the binary first (`cargo build -p metroblk`).

use metroblk_tests::ublk_script::{self, Opts};

const PARTITION: &str = r#"
in_sync() {
    field_is alpha sync_state in-sync && field_is alpha alone false &&
        field_is beta disk_state up-to-date && field_is alpha link_state connected
}

start beta ""
start alpha ""
wait_device
step "mkfs.ext4 and 20 files while connected"
mkfs.ext4 -q -F "$DEV"
mount "$DEV" /tmp/mnt
write_files /tmp/mnt before 20 65536
sync
wait_for 30 "the first sync" in_sync
# mkfs discarded the whole device: every bit is set until the cleaner clears the cold regions
# (5 to 10 s after mkfs, longer under emulation); a cut before that would rightly resync them all.
dirty_below() { [ "$(status_field alpha dirty_regions)" -lt "$1" ]; }
wait_for 60 "the cleaner to clear the bits of mkfs" dirty_below 256

step "cut the link (netem loss 100% on lo)"
tc qdisc add dev lo root netem loss 100%
write_files /tmp/mnt apart 40 65536
sync
field_is alpha alone true
step "wrote 40 files alone: $(status_field alpha out_of_sync_bytes) bytes out of sync"
tc qdisc del dev lo root
step "healed"
wait_for 60 "the resync" in_sync
resynced=$(status_field alpha resynced_bytes)
step "resynced $resynced bytes"
# Only what changed while apart (40 files of 64 KiB and the ext4 metadata they touched), not
# the 256 MiB volume.
[ "$resynced" -gt 0 ] && [ "$resynced" -lt $(( 64 << 20 )) ]
(cd /tmp/mnt && find . -type f ! -path './lost+found/*' -exec sha256sum {} +) > "$W/sums"
umount /tmp/mnt
step "the secondary's copy holds every file"
check_secondary_copy
stop alpha
stop beta
step "all good"
"#;

#[test]
fn ext4_written_while_the_link_is_cut_is_resynced_and_the_secondary_holds_every_file() {
    ublk_script::run(
        PARTITION,
        &Opts { alpha_extra: "fencing = \"none\"", ..Opts::default() },
        &["cut the link", "wrote 40 files alone", "healed", "resynced", "holds every file", "all good"],
    );
}
