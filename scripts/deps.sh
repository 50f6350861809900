#!/usr/bin/env bash
# The Debian packages metroblk's build, demo and tests need, in one place: sourced by
# scripts/demo.sh and scripts/test.sh. Installs the missing ones when run as root; otherwise
# says in one line what to install and fails.
#
#   libclang-dev       bindgen in libublk's build script (the ublk crate)
#   qemu-system-x86, busybox-static, cpio, kmod, xz-utils
#                      the QEMU VM that has ublk_drv when this kernel does not (tests/vm)
#   fio, e2fsprogs, xfsprogs, util-linux, iproute2, jq
#                      the workloads, filesystems and network namespaces of the demo and tests
#   prometheus         the Prometheus server and promtool that scrape and check `/metrics` (tests/ops.rs)
#   systemd, man-db    systemd-analyze, which verifies the unit files and the man pages they name
#   dpkg-dev, binutils, lintian
#                      scripts/deb.sh (dpkg-shlibdeps, strip) and the check of its package
#   open-iscsi, sg3-utils, libiscsi-bin, nvme-cli, arping
#                      the hosts of the export tests: iSCSI and NVMe/TCP initiators, SCSI
#                      commands (INQUIRY, VPD, COMPARE AND WRITE, UNMAP), who answers ARP
set -euo pipefail

METROBLK_DEBIAN_PACKAGES=(libclang-dev qemu-system-x86 busybox-static cpio kmod xz-utils fio e2fsprogs
    xfsprogs iproute2 util-linux jq prometheus systemd man-db
    dpkg-dev binutils lintian open-iscsi sg3-utils libiscsi-bin nvme-cli arping)

metroblk_install_deps() {
    local need=() pkg
    for pkg in "${METROBLK_DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
    done
    ((${#need[@]})) || return 0
    if [[ $(id -u) -ne 0 ]]; then
        echo "metroblk: missing Debian packages: ${need[*]} (run as root to install them, or: sudo apt-get install ${need[*]})" >&2
        return 1
    fi
    echo "metroblk: installing Debian packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    metroblk_install_deps
fi
