#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, multi-process tests on loopback and the
# ublk tests (natively where the kernel has ublk_drv, in a QEMU VM otherwise).
# Run as root on Debian: it installs what the tests need when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in libclang-dev qemu-system-x86 busybox-static cpio kmod xz-utils fio e2fsprogs xfsprogs iproute2 util-linux; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "scripts/test.sh: missing Debian packages: ${need[*]} (install them, or run as root)" >&2
        exit 1
    fi
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Builds the metroblk binary the multi-process and VM tests run, then every test.
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
