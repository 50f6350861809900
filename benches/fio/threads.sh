#!/usr/bin/env bash
# Where the CPU goes at 128k QD8: DRBD 8.4 protocol C against metroblk mirrored (with and
# without the payload checksum), in one VM boot. For each, fio writes 128 KiB sequentially at
# depth 8 for 7 s; over 3 s of it `top -H` shows the busiest threads and /proc/stat the VM's
# idle share. The figures under "Where the mirror's time goes" in the README come from here.
#
#   benches/fio/threads.sh [--rounds N] [--kernel 6.12|7] [--job 128k-qd8|4k-qd32]
#
# --job 4k-qd32: random 4 KiB writes at depth 32 instead (where 7.3 loses most).
#
# Runs itself in the QEMU VM of tests/vm when this kernel has no ublk_drv (as run.sh does).
# Uses target/release/metroblk (built when missing) unless METROBLK_BIN is set.
set -euo pipefail
HERE=${METROBLK_FIO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
ROOT=$(cd "$HERE/../.." && pwd)
ROUNDS=${ROUNDS:-2}
JOB=${JOB:-128k-qd8}
while [ $# -gt 0 ]; do
	case "$1" in
	--rounds) ROUNDS=$2; shift 2 ;;
	--kernel) export METROBLK_VM_KERNEL=$2; shift 2 ;;
	--job) JOB=$2; shift 2 ;;
	*) echo "threads.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
case "$JOB" in
128k-qd8) RW=write BS=128k DEPTH=8 ;;
4k-qd32) RW=randwrite BS=4k DEPTH=32 ;;
*) echo "threads.sh: --job is 128k-qd8 or 4k-qd32, not $JOB" >&2; exit 2 ;;
esac
BIN=${METROBLK_BIN:-$ROOT/target/release/metroblk}
if [ ! -x "$BIN" ]; then
	(cd "$ROOT" && cargo build --release -p metroblk)
fi
if [ ! -x /usr/lib/drbd/drbdsetup-84 ] && [ "${METROBLK_IN_VM:-0}" != 1 ] && [ "$(id -u)" = 0 ]; then
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq drbd-utils >/dev/null
fi
if [ ! -e /dev/ublk-control ] && ! modprobe ublk_drv 2>/dev/null; then
	[ "${METROBLK_IN_VM:-0}" = 1 ] && { echo "no ublk_drv even in the VM" >&2; exit 1; }
	export METROBLK_VM_EXTRA_MODULES="${METROBLK_VM_EXTRA_MODULES:-} drbd"
	exec "$ROOT/tests/vm/run.sh" "$HERE/threads.sh" --timeout 900 --mem 3072 \
		--env ROUNDS="$ROUNDS" --env JOB="$JOB" --env METROBLK_BIN="$BIN" --env METROBLK_FIO_DIR="$HERE"
fi
modprobe drbd 2>/dev/null || true
grep -q '^version: 8\.4' /proc/drbd || { echo "no DRBD 8.4 module" >&2; exit 1; }
W=$(mktemp -d /tmp/metroblk-threads.XXXXXX)
cd "$W"
SIZE_MB=256
# shellcheck source=benches/fio/drbd.sh
source "$HERE/drbd.sh"
trap 'drbd_down; cd /; rm -rf "$W"' EXIT
echo "metroblk-fio-bench-authkey-0123456789" >key
chmod 600 key
echo "# kernel $(uname -r), $(head -n 1 /proc/drbd)"
cfg() { # name peer role listen peerport payload_checksum
	cat >"$1.toml" <<T
[node]
name = "$1"
control_socket = "$1.sock"
[[volume]]
name = "bench"
size = "256MiB"
backing_file = "$1.img"
metadata_file = "$1.meta"
listen = "127.0.0.1:$4"
role = "$3"
ublk_id = 0
payload_checksum = "$6"
[volume.peer]
name = "$2"
address = "127.0.0.1:$5"
authkey_file = "key"
T
	rm -f "$1.img"
	"$BIN" create-md --force --config "$1.toml" bench >/dev/null
}
job() { # device
	cat >job.fio <<T
[w]
filename=$1
ioengine=io_uring
direct=1
rw=$RW
bs=$BS
iodepth=$DEPTH
size=200M
time_based=1
runtime=7
T
}
measure() { # label dev
	job "$2"
	fio --output-format=terse --terse-version=3 job.fio >out.txt &
	FP=$!
	sleep 2
	head -n 1 /proc/stat >s0
	top -H -b -d 3 -n 2 -w 200 >top.txt
	head -n 1 /proc/stat >s1
	wait "$FP"
	echo "== $1: KiB/s $(cut -d';' -f48 out.txt) iops $(cut -d';' -f49 out.txt)"
	paste s0 s1 | awk '{t=($13+$14+$15+$16+$17+$18+$19)-($2+$3+$4+$5+$6+$7+$8); printf "idle %.0f%% user %.0f%% sys %.0f%% softirq %.0f%%\n", 100*($16-$5)/t, 100*($13-$2)/t, 100*($15-$4)/t, 100*($19-$8)/t}'
	awk '/^top -/{n++} n==2 && $1 ~ /^[0-9]+$/ && $9+0 > 1.5 {print "  ", $9"%", $12}' top.txt | head -14
}
mb() { # label ck
	cfg site-b site-a secondary 7912 7911 "$2"
	cfg site-a site-b primary 7911 7912 "$2"
	"$BIN" node run --config site-b.toml 2>b.log &
	PB=$!
	"$BIN" node run --config site-a.toml 2>a.log &
	PA=$!
	for _ in $(seq 100); do [ -b /dev/ublkb0 ] && break; sleep 0.1; done
	sleep 1
	measure "$1" /dev/ublkb0
	kill -TERM "$PA"; wait "$PA" || true
	kill -TERM "$PB"; wait "$PB" || true
	for _ in $(seq 100); do [ -e /dev/ublkb0 ] || break; sleep 0.1; done
	rm -f site-*.img
}
for r in $(seq 1 "$ROUNDS"); do
	echo "# round $r"
	drbd_up
	measure drbd /dev/drbd0
	drbd_down
	mb metroblk-nocrc none
	mb metroblk-crc crc32c
done
