#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, multi-process tests on loopback and the
# ublk tests (natively where the kernel has ublk_drv, in a QEMU VM otherwise).
# Run as root on Debian: it installs what the tests need when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Debian packages (one list for the build, the demo and the tests: scripts/deps.sh).
# shellcheck source=scripts/deps.sh
source scripts/deps.sh
metroblk_install_deps

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Builds the metroblk binary the multi-process and VM tests run, then every test.
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast -- --test-threads=2
# The newest kernel too (7.x from Debian's trixie-backports: ublk zero copy, auto buffer
# registration), on a part of the VM tests to stay within CI's hour: the VM smoke, the
# data-centre partition failover and the zero-copy write path (payload_checksum = "none": fio
# verify and ext4 on both nodes, kill -9 recovery, a scribbled buffer). `--workspace`, as
# above: `-p metroblk-tests` alone unifies features differently and rebuilds every dependency.
METROBLK_VM_KERNEL=7 cargo test --workspace --no-fail-fast --test vm_smoke --test ublk_failover \
    --test ublk_workloads -- --test-threads=2 vm_has_ublk data_centre_partition zero_copy
