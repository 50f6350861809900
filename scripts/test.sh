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
