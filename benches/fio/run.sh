#!/usr/bin/env bash
# fio benchmark of the block device, in one run, for three targets on the same kind of backing
# file: the kernel loop device, metroblk standalone (no peer), metroblk mirrored to a peer on
# loopback. Jobs: 4k randwrite QD1, 4k randwrite QD32, 128k sequential write.
# Prints one JSON line per (target, job), then the mirrored/loop ratios.
#
#   benches/fio/run.sh [--runtime SECS]
#
# Runs natively where the kernel has ublk_drv, otherwise inside the QEMU VM of tests/vm (TCG:
# absolute numbers there are slow; compare the ratios). Uses target/release/metroblk
# (cargo build --release -p metroblk) unless METROBLK_BIN is set.
set -euo pipefail
# In the VM this script runs from a copy; METROBLK_FIO_DIR points back at the job files.
HERE=${METROBLK_FIO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
ROOT=$(cd "$HERE/../.." && pwd)
RUNTIME=${RUNTIME:-10}
while [ $# -gt 0 ]; do
	case "$1" in
	--runtime) RUNTIME=$2; shift 2 ;;
	*) echo "usage: $0 [--runtime SECS]" >&2; exit 2 ;;
	esac
done
BIN=${METROBLK_BIN:-$ROOT/target/release/metroblk}
[ -x "$BIN" ] || { echo "$BIN is missing: cargo build --release -p metroblk" >&2; exit 1; }

if [ ! -e /dev/ublk-control ] && ! modprobe ublk_drv 2>/dev/null; then
	if [ "${METROBLK_IN_VM:-0}" = 1 ]; then
		echo "no ublk_drv even in the VM" >&2
		exit 1
	fi
	echo "# this kernel has no ublk_drv: running in the QEMU VM (tests/vm)" >&2
	exec "$ROOT/tests/vm/run.sh" "$HERE/run.sh" --timeout 1200 --mem 3072 \
		--env RUNTIME="$RUNTIME" --env METROBLK_BIN="$BIN" --env METROBLK_FIO_DIR="$HERE"
fi

W=$(mktemp -d /tmp/metroblk-fio.XXXXXX)
SIZE_MB=256
export SIZE=$((SIZE_MB - 16))M RUNTIME
cleanup() {
	[ -n "${LOOP:-}" ] && losetup -d "$LOOP" 2>/dev/null || true
	for p in ${PIDS:-}; do kill -TERM "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT
echo "metroblk-fio-bench-authkey-0123456789" >"$W/key"
chmod 600 "$W/key"

config() { # name peer role listen peerport [peer section yes/no]
	{
		printf '[node]\nname = "%s"\ncontrol_socket = "%s.sock"\n\n[[volume]]\nname = "bench"\n' "$1" "$1"
		printf 'size = "%sMiB"\nbacking_file = "%s.img"\nmetadata_file = "%s.meta"\n' "$SIZE_MB" "$1" "$1"
		printf 'listen = "127.0.0.1:%s"\nrole = "%s"\nublk_id = 0\n' "$4" "$3"
		if [ "$6" = yes ]; then
			printf '[volume.peer]\nname = "%s"\naddress = "127.0.0.1:%s"\nauthkey_file = "key"\n' "$2" "$5"
		fi
	} >"$W/$1.toml"
	(cd "$W" && "$BIN" create-md --force --config "$1.toml" bench >/dev/null)
}

run_jobs() { # target device
	for job in randwrite-4k-qd1 randwrite-4k-qd32 seqwrite-128k; do
		DEV=$2 fio --output-format=json "$HERE/$job.fio" >"$W/out.json"
		python3 - "$1" "$job" "$W/out.json" <<'PY'
import json, sys
target, job, path = sys.argv[1:]
j = json.load(open(path))["jobs"][0]["write"]
pct = j["clat_ns"].get("percentile", {})
print(json.dumps({"target": target, "job": job, "iops": round(j["iops"]),
    "bw_MiBps": round(j["bw_bytes"] / 2**20, 1),
    "lat_p50_us": round(pct.get("50.000000", 0) / 1000, 1),
    "lat_p99_us": round(pct.get("99.000000", 0) / 1000, 1)}))
PY
	done
}

wait_dev() {
	for _ in $(seq 1 300); do
		[ -b /dev/ublkb0 ] && return 0
		sleep 0.1
	done
	echo "/dev/ublkb0 did not appear" >&2
	cat "$W"/*.log >&2
	exit 1
}

stop_all() {
	for p in $PIDS; do kill -TERM "$p" 2>/dev/null || true; done
	for p in $PIDS; do wait "$p" 2>/dev/null || true; done
	PIDS=
	for _ in $(seq 1 100); do [ -e /dev/ublkb0 ] || break; sleep 0.1; done
}

results=$W/results.jsonl

# 1. The kernel loop device on the same kind of backing file.
truncate -s ${SIZE_MB}M "$W/loop.img"
LOOP=$(losetup -f --show "$W/loop.img")
run_jobs loop "$LOOP" | tee -a "$results"
losetup -d "$LOOP"
LOOP=

# 2. metroblk standalone: the ublk path and the engine, no peer.
config solo none primary 7901 0 no
(cd "$W" && "$BIN" node run --config solo.toml 2>solo.log) &
PIDS=$!
wait_dev
run_jobs metroblk-standalone /dev/ublkb0 | tee -a "$results"
stop_all

# 3. metroblk mirrored to a secondary on loopback.
config site-b site-a secondary 7912 7911 yes
config site-a site-b primary 7911 7912 yes
(cd "$W" && "$BIN" node run --config site-b.toml 2>site-b.log) &
PIDS=$!
(cd "$W" && "$BIN" node run --config site-a.toml 2>site-a.log) &
PIDS="$PIDS $!"
wait_dev
run_jobs metroblk-mirrored /dev/ublkb0 | tee -a "$results"
stop_all

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {(r["target"], r["job"]): r for r in rows}
for job in ["randwrite-4k-qd1", "randwrite-4k-qd32", "seqwrite-128k"]:
    loop = by[("loop", job)]
    for t in ["metroblk-standalone", "metroblk-mirrored"]:
        r = by[(t, job)]
        print(json.dumps({"ratio": f"{t}/loop", "job": job,
            "iops": round(r["iops"] / max(loop["iops"], 1), 3),
            "bw": round(r["bw_MiBps"] / max(loop["bw_MiBps"], 0.1), 3),
            "lat_p50": round(r["lat_p50_us"] / max(loop["lat_p50_us"], 0.1), 3)}))
PY
