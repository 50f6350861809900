//! `transport = "tls"` through the device, all cases in one VM boot (the host kernel of the
//! developers' machines has no kTLS; the VM's Debian 6.12 kernel loads `tls`): three sites in
//! network namespaces (alpha, beta, the witness) joined by veth links, real node and witness
//! processes, TLS on the peer data links, the sync link and the witness link. Alpha reaches
//! beta through a man in the middle (`mitm_relay`, in alpha's namespace) that records every
//! byte alpha sends and can flip one bit of it.
//!
//! 1. A known pattern written through alpha's `/dev/ublkbN` is in beta's backing file and
//!    nowhere in what crossed the wire (which holds the megabyte and TLS application records).
//! 2. One bit flipped in a data record ends the link (the kernel's TLS refuses the record);
//!    the write completes after the reconnect and beta's file holds exactly what was written.
//! 3. Beta restarted with `transport = "tcp"`: both ends refuse in one line naming both
//!    transports. Beta with another authkey: both refuse in one line naming the authkeys.
//! 4. Beta back with the right settings: what alpha wrote alone meanwhile is resynced over
//!    TLS. Then site A is lost: the witness (over TLS) promotes beta, whose device holds every
//!    pattern.
//!
//! Needs ublk and kTLS: in the QEMU VM of tests/vm (or natively where both work). Build first
//! (`cargo build --workspace --all-targets`).

use std::time::Duration;

use metroblk_tests::ublk_script::{self, Opts};
use metroblk_tests::vm;

const BODY: &str = r##"
promoted() { field_is "$1" role primary && [ -b "$(status_field "$1" ublk_device)" ]; }
leased() { [ "$(status_field "$1" lease_left_ms)" -gt 0 ] 2>/dev/null; }
in_sync_as() { # PRIMARY SECONDARY
    field_is "$1" sync_state in-sync && field_is "$2" disk_state up-to-date && field_is "$1" alone false
}
# pattern FILE WORD: 1 MiB of a recognisable text.
pattern() { { yes "$2-metroblk-tls-pattern" || true; } | head -c 1M > "$1"; }
# write_at MIB FILE: 1 MiB at MIB MiB of alpha's device, direct and durable.
write_at() { timeout 120 dd if="$2" of="$DEV_A" bs=1M seek="$1" count=1 oflag=direct conv=fsync status=none; }
# holds IMAGE MIB FILE: IMAGE holds FILE at MIB MiB.
holds() { cmp <(dd if="$1" bs=1M skip="$2" count=1 status=none) "$3"; }
restart_beta() { stop beta; start beta "$1"; }
count() { grep -c -- "$2" "$1" || true; }

modprobe tls 2>/dev/null || true
# TLS on every link: each `authkey_file` line of the node configs (peer and witness sections)
# and the witness's config gets `transport = "tls"` after it.
for f in alpha beta; do sed -i '/^authkey_file = .*key"$/a transport = "tls"' "$W/$f.toml"; done
echo 'transport = "tls"' >> "$W/witness.toml"
# Alpha dials beta through the relay in its own site.
sed -i 's/^address = "10.88.1.2:7802"/address = "10.88.1.1:7900"/' "$W/alpha.toml"
(exec ip netns exec sa "$RELAY" 10.88.1.1:7900 10.88.1.2:7802 "$W/capture" "$W/flip" > "$W/relay.log" 2>&1) &
RELAY_PID=$!
start_witness
start beta ""
start alpha ""
# Bounded by the wall clock (the device comes only once the witness, over TLS, granted a lease).
wait_for 90 "alpha's device (after a lease from the witness, over TLS)" promoted alpha
wait_for 30 "alpha's lease" leased alpha
DEV_A=$(status_field alpha ublk_device)
wait_for 30 "the first sync" in_sync_as alpha beta
step "TLS links up: data, sync and witness"

pattern "$W/pa" first
write_at 8 "$W/pa"
holds "$W/beta.img" 8 "$W/pa"
wire=$(stat -c %s "$W/capture")
[ "$wire" -gt $(( 1 << 20 )) ]
if grep -q -a "metroblk-tls-pattern" "$W/capture"; then echo "the pattern crossed the wire in clear"; exit 1; fi
# TLS 1.3 application data records (type 23, version 3.3) are what crossed.
[ "$(od -An -tx1 -v "$W/capture" | tr -d ' \n' | grep -o '170303' | wc -l)" -gt 10 ]
step "pattern in beta's file, not on the wire ($wire bytes captured)"

ended_before=$(count "$W/beta.log" "link from primary ended")
pattern "$W/pb" second
touch "$W/flip"
write_at 16 "$W/pb"
grep -q flipped "$W/relay.log"
[ ! -e "$W/flip" ]
[ "$(count "$W/beta.log" "link from primary ended")" -gt "$ended_before" ]
# The kernel's TLS refused the tampered record (EBADMSG): the link ended, nothing applied.
grep -m1 "link from primary ended: receive failed: Bad message" "$W/beta.log"
wait_for 30 "the links again" in_sync_as alpha beta
holds "$W/beta.img" 16 "$W/pb"
holds "$W/alpha.img" 16 "$W/pb"
step "flipped bit: link ended, write completed after the reconnect, beta's file exact"

sed -i '0,/^transport = "tls"/s//transport = "tcp"/' "$W/beta.toml"
restart_beta "-tcp"
pattern "$W/pc" third
# Held while beta is away, then completed alone once the witness recorded beta outdated.
write_at 24 "$W/pc"
field_is alpha alone true
wait_for 30 "beta's refusal" grep -q 'transport differs: this end has transport = "tcp", the other end "tls"' "$W/beta-tcp.log"
wait_for 30 "alpha's refusal" grep -q 'does not speak TLS (is its transport "tcp"?)' "$W/alpha.log"
grep -h -m1 'transport differs' "$W/beta-tcp.log"
grep -h -m1 'does not speak TLS' "$W/alpha.log"
step "transport mismatch refused in one line on both nodes"

sed -i '0,/^transport = "tcp"/s//transport = "tls"/' "$W/beta.toml"
printf '%s\n' "another-$KEY" > "$W/key2"; chmod 600 "$W/key2"
sed -i "s#^authkey_file = \"$W/key\"#authkey_file = \"$W/key2\"#" "$W/beta.toml"
grep -q key2 "$W/beta.toml"
restart_beta "-key2"
wait_for 30 "beta's refusal" grep -q 'different authkeys' "$W/beta-key2.log"
wait_for 30 "alpha's refusal" grep -q 'different authkeys' "$W/alpha.log"
grep -h -m1 'different authkeys' "$W/beta-key2.log"
grep -h -m1 'different authkeys' "$W/alpha.log"
step "wrong authkey refused in one line on both nodes"

sed -i "s#key2\"#key\"#" "$W/beta.toml"
restart_beta "-back"
wait_for 60 "the resync over TLS" in_sync_as alpha beta
resynced=$(status_field alpha resynced_bytes)
[ "$resynced" -gt 0 ]
holds "$W/beta.img" 24 "$W/pc"
step "resync over TLS: $resynced bytes"

sleep 2
kill9 alpha; cut_link sa ab; cut_link sa aw
step "site A lost"
wait_for 60 "beta to be promoted" promoted beta
DEV_B=$(status_field beta ublk_device)
for x in "8 pa" "16 pb" "24 pc"; do set -- $x; holds "$DEV_B" "$1" "$W/$2"; done
step "failover over TLS: beta promoted, its device holds every pattern"
stop beta
kill "$RELAY_PID" 2>/dev/null || true
kill "$PID_witness" 2>/dev/null || true
step "all good"
"##;

#[test]
fn tls_links_hide_the_data_end_on_a_flipped_bit_refuse_mismatches_and_resync_and_fail_over() {
    let relay = vm::bin_dir().map(|d| d.join("mitm_relay")).unwrap_or_default();
    assert!(relay.is_file(), "{relay:?} is missing: build first with `cargo build --workspace --all-targets`");
    let body = format!("RELAY='{}'\n{BODY}", relay.display());
    ublk_script::run(
        &body,
        &Opts { sites: true, size: "64MiB", lease_ms: 2000, timeout: Duration::from_secs(420), ..Opts::default() },
        &[
            "TLS links up",
            "not on the wire",
            "flipped bit: link ended",
            "transport mismatch refused",
            "wrong authkey refused",
            "resync over TLS",
            "failover over TLS",
            "all good",
        ],
    );
}
