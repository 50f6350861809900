//! Smoke tests of the QEMU VM harness (tests/vm): what the ublk tests rely on works inside.
//!
//! Run: `cargo test -p metroblk-tests --test vm_smoke -- --nocapture`

use std::time::Duration;

use metroblk_tests::vm;

/// Each VM test must finish well under a minute; boot takes 5-15 s under TCG.
const TIMEOUT: Duration = Duration::from_secs(55);

const SMOKE: &str = r#"
set -euo pipefail
trap 'echo "FAILED: line $LINENO: $BASH_COMMAND (status $?)"' ERR
step() { echo "--- $*"; }

step "kernel $(uname -r)"
step "ublk_drv is loaded"
test -c /dev/ublk-control
grep -qw ublk_drv /proc/modules
[ "$METROBLK_IN_VM" = 1 ]

step "the host's files are visible read-only, scratch dirs are writable"
test -f "$PWD/Cargo.toml"
if touch "$PWD/.vm-write-test" 2>/dev/null; then echo "the host root is writable"; exit 1; fi
touch /tmp/w /var/tmp/w /run/w /dev/shm/w

for fs in ext4 xfs; do
    step "$fs on a loop device over a file in /tmp"
    truncate -s 320M /tmp/$fs.img
    dev=$(losetup --find --show /tmp/$fs.img)
    case $fs in
        ext4) mkfs.ext4 -q -F "$dev" ;;
        xfs) mkfs.xfs -q -f "$dev" ;;
    esac
    mkdir -p /tmp/mnt-$fs
    mount -t $fs "$dev" /tmp/mnt-$fs
    echo "hello $fs" > /tmp/mnt-$fs/hello
    dd if=/dev/urandom of=/tmp/mnt-$fs/data bs=1M count=4 conv=fsync status=none
    sum=$(sha256sum < /tmp/mnt-$fs/data)
    umount /tmp/mnt-$fs
    mount -t $fs "$dev" /tmp/mnt-$fs
    grep -qx "hello $fs" /tmp/mnt-$fs/hello
    [ "$(sha256sum < /tmp/mnt-$fs/data)" = "$sum" ]
    umount /tmp/mnt-$fs
    losetup -d "$dev"
    rm /tmp/$fs.img
done

step "veth, network namespaces and tc netem"
ip link add mb-a type veth peer name mb-b
ip netns add mb-peer
ip link set mb-b netns mb-peer
ip addr add 10.99.0.1/24 dev mb-a
ip link set mb-a up
ip -n mb-peer addr add 10.99.0.2/24 dev mb-b
ip -n mb-peer link set mb-b up
tc qdisc add dev mb-a root netem delay 5ms loss 0%
tc qdisc show dev mb-a | grep -q netem
busybox ping -c 2 -i 0.2 -W 5 10.99.0.2

step "fio (io_uring)"
fio --name=smoke --filename=/tmp/fio.dat --size=8M --io_size=2M --rw=randwrite --bs=4k \
    --ioengine=io_uring --iodepth=8 --output-format=terse >/tmp/fio.out
test -s /tmp/fio.out

step "all good"
"#;

#[test]
fn vm_has_ublk_filesystems_network_and_fio() {
    let run = vm::run_script(SMOKE, TIMEOUT).expect("the VM harness works");
    assert_eq!(run.status, 0, "smoke script failed:\n{}", run.output);
    for step in ["ublk_drv is loaded", "ext4 on a loop device", "xfs on a loop device", "tc netem", "all good"] {
        assert!(run.output.contains(step), "step {step:?} missing from the output:\n{}", run.output);
    }
    // The kernel asked for (tests/vm/prepare.sh: METROBLK_VM_KERNEL, 6.12 unless set) is the
    // one that ran.
    let series = std::env::var("METROBLK_VM_KERNEL").unwrap_or_else(|_| "6.12".into());
    let want = format!("--- kernel {series}.");
    assert!(run.output.contains(&want), "expected {want:?} in the output:\n{}", run.output);
}

#[test]
fn vm_reports_the_scripts_exit_status() {
    let run = vm::run_script("echo about to fail\nexit 7\n", TIMEOUT).expect("the VM harness works");
    assert_eq!(run.status, 7, "output:\n{}", run.output);
    assert!(run.output.ends_with("about to fail\n"), "output: {:?}", run.output);
}
