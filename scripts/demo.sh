#!/usr/bin/env bash
# The main job on a fresh Debian machine: installs the Debian packages the build and the VM
# need (scripts/deps.sh, the same list the tests use), builds metroblk (release), and runs
# `metroblk demo` with the given arguments: two nodes with a mirrored /dev/ublkb0, inside a
# QEMU VM when this kernel has no ublk_drv. `scripts/demo.sh --export` also exports the
# volume over iSCSI and shows this machine's open-iscsi writing through it across a
# switchover. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/deps.sh
source scripts/deps.sh
metroblk_install_deps
if ! command -v cargo >/dev/null; then
    echo "metroblk: cargo is missing; install Rust (https://rustup.rs) first" >&2
    exit 1
fi
cargo build --release -p metroblk
exec target/release/metroblk demo "$@"
