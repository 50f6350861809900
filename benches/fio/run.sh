#!/usr/bin/env bash
# fio benchmark of the block device: every target in one run, on the same kind of backing file
# (tmpfs in the VM), interleaved round by round so that drift favours none:
#   loop                 the kernel loop device (no user space at all)
#   rublk                rublk's loop target: ublk with no replication, the ublk baseline
#   metroblk-standalone  metroblk with no peer (the ublk path and the engine)
#   metroblk-mirrored    metroblk mirrored to a secondary on loopback
# Jobs: 4k randwrite QD1, 4k randwrite QD32, 128k sequential write QD8 (direct I/O).
# Prints one JSON line per (round, engine, target, job), then per engine and job the ratios
# against rublk and loop as median (min..max) over the rounds, and the issue-10 goals.
#
#   benches/fio/run.sh [--runtime SECS] [--rounds N] [--engines io_uring,libaio]
#
# Runs natively where the kernel has ublk_drv, otherwise inside the QEMU VM of tests/vm (TCG:
# absolute numbers there are slow; compare the ratios). Uses target/release/metroblk
# (cargo build --release -p metroblk) unless METROBLK_BIN is set, and rublk from RUBLK_BIN or
# target/rublk/bin/rublk (installed there with cargo when missing).
set -euo pipefail
# In the VM this script runs from a copy; METROBLK_FIO_DIR points back at the job files.
HERE=${METROBLK_FIO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
ROOT=$(cd "$HERE/../.." && pwd)
RUNTIME=${RUNTIME:-8}
ROUNDS=${ROUNDS:-3}
ENGINES=${ENGINES:-io_uring}
RUBLK_VERSION=0.2.15
while [ $# -gt 0 ]; do
	case "$1" in
	--runtime) RUNTIME=$2; shift 2 ;;
	--rounds) ROUNDS=$2; shift 2 ;;
	--engines) ENGINES=$2; shift 2 ;;
	*) echo "usage: $0 [--runtime SECS] [--rounds N] [--engines io_uring,libaio]" >&2; exit 2 ;;
	esac
done
BIN=${METROBLK_BIN:-$ROOT/target/release/metroblk}
[ -x "$BIN" ] || { echo "$BIN is missing: cargo build --release -p metroblk" >&2; exit 1; }
RUBLK=${RUBLK_BIN:-$ROOT/target/rublk/bin/rublk}
if [ ! -x "$RUBLK" ]; then
	if [ "${METROBLK_IN_VM:-0}" = 1 ]; then
		echo "$RUBLK is missing (the VM cannot install it)" >&2
		exit 1
	fi
	echo "# installing rublk $RUBLK_VERSION into $ROOT/target/rublk (once)" >&2
	cargo install --quiet rublk --version "$RUBLK_VERSION" --root "$ROOT/target/rublk"
	RUBLK=$ROOT/target/rublk/bin/rublk
fi

if [ ! -e /dev/ublk-control ] && ! modprobe ublk_drv 2>/dev/null; then
	if [ "${METROBLK_IN_VM:-0}" = 1 ]; then
		echo "no ublk_drv even in the VM" >&2
		exit 1
	fi
	echo "# this kernel has no ublk_drv: running in the QEMU VM (tests/vm)" >&2
	exec "$ROOT/tests/vm/run.sh" "$HERE/run.sh" --timeout 3000 --mem 3072 \
		--env RUNTIME="$RUNTIME" --env ROUNDS="$ROUNDS" --env ENGINES="$ENGINES" \
		--env METROBLK_BIN="$BIN" --env RUBLK_BIN="$RUBLK" --env METROBLK_FIO_DIR="$HERE"
fi

W=$(mktemp -d /tmp/metroblk-fio.XXXXXX)
SIZE_MB=256
export SIZE=$((SIZE_MB - 16))M RUNTIME
cleanup() {
	[ -n "${LOOP:-}" ] && losetup -d "$LOOP" 2>/dev/null || true
	[ -n "${RUBLK_ID:-}" ] && "$RUBLK" del -n "$RUBLK_ID" 2>/dev/null || true
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
	rm -f "$W/$1.img"
	(cd "$W" && "$BIN" create-md --force --config "$1.toml" bench >/dev/null)
}

results=$W/results.jsonl

run_jobs() { # round target device
	for engine in ${ENGINES//,/ }; do
		for job in randwrite-4k-qd1 randwrite-4k-qd32 seqwrite-128k; do
			DEV=$3 ENGINE=$engine fio --output-format=json "$HERE/$job.fio" >"$W/out.json"
			python3 - "$1" "$engine" "$2" "$job" "$W/out.json" <<'PY' | tee -a "$results"
import json, sys
rnd, engine, target, job, path = sys.argv[1:]
j = json.load(open(path))["jobs"][0]["write"]
pct = j["clat_ns"].get("percentile", {})
print(json.dumps({"round": int(rnd), "engine": engine, "target": target, "job": job,
    "iops": round(j["iops"]), "bw_MiBps": round(j["bw_bytes"] / 2**20, 1),
    "lat_p50_us": round(pct.get("50.000000", 0) / 1000, 1),
    "lat_p99_us": round(pct.get("99.000000", 0) / 1000, 1)}))
PY
		done
	done
}

wait_dev() { # device
	for _ in $(seq 1 300); do
		[ -b "$1" ] && return 0
		sleep 0.1
	done
	echo "$1 did not appear" >&2
	cat "$W"/*.log >&2 || true
	exit 1
}

stop_all() {
	for p in $PIDS; do kill -TERM "$p" 2>/dev/null || true; done
	for p in $PIDS; do wait "$p" 2>/dev/null || true; done
	PIDS=
	for _ in $(seq 1 100); do [ -e /dev/ublkb0 ] || break; sleep 0.1; done
}

for round in $(seq 1 "$ROUNDS"); do
	# 1. The kernel loop device.
	rm -f "$W/loop.img"
	truncate -s ${SIZE_MB}M "$W/loop.img"
	LOOP=$(losetup -f --show "$W/loop.img")
	run_jobs "$round" loop "$LOOP"
	losetup -d "$LOOP"
	LOOP=
	rm -f "$W/loop.img"

	# 2. rublk's loop target (its defaults: one queue, depth 128, direct I/O to the file).
	truncate -s ${SIZE_MB}M "$W/rublk.img"
	RUBLK_ID=1
	"$RUBLK" add loop -n "$RUBLK_ID" -f "$W/rublk.img" --quiet
	wait_dev /dev/ublkb$RUBLK_ID
	run_jobs "$round" rublk /dev/ublkb$RUBLK_ID
	"$RUBLK" del -n "$RUBLK_ID"
	RUBLK_ID=
	rm -f "$W/rublk.img"

	# 3. metroblk standalone: the ublk path and the engine, no peer.
	config solo none primary 7901 0 no
	(cd "$W" && exec "$BIN" node run --config solo.toml 2>solo.log) &
	PIDS=$!
	wait_dev /dev/ublkb0
	run_jobs "$round" metroblk-standalone /dev/ublkb0
	stop_all
	rm -f "$W/solo.img"

	# 4. metroblk mirrored to a secondary on loopback.
	config site-b site-a secondary 7912 7911 yes
	config site-a site-b primary 7911 7912 yes
	(cd "$W" && exec "$BIN" node run --config site-b.toml 2>site-b.log) &
	PIDS=$!
	(cd "$W" && exec "$BIN" node run --config site-a.toml 2>site-a.log) &
	PIDS="$PIDS $!"
	wait_dev /dev/ublkb0
	run_jobs "$round" metroblk-mirrored /dev/ublkb0
	stop_all
	rm -f "$W/site-a.img" "$W/site-b.img"
done

python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def metric(job):
    return "bw_MiBps" if job.startswith("seq") else "iops"
def ratios(engine, job, num, den):
    m = metric(job)
    out = []
    for rnd in sorted({r["round"] for r in rows}):
        a = [r for r in rows if (r["round"], r["engine"], r["target"], r["job"]) == (rnd, engine, num, job)]
        b = [r for r in rows if (r["round"], r["engine"], r["target"], r["job"]) == (rnd, engine, den, job)]
        if a and b and b[0][m] > 0:
            out.append(a[0][m] / b[0][m])
    out.sort()
    return out
def show(xs):
    if not xs:
        return None
    return {"median": round(xs[len(xs) // 2], 3), "min": round(xs[0], 3), "max": round(xs[-1], 3), "n": len(xs)}
goals = {("metroblk-standalone", "rublk"): {"randwrite-4k-qd1": 1.0, "randwrite-4k-qd32": 1.0, "seqwrite-128k": 1.0},
         ("metroblk-mirrored", "rublk"): {"randwrite-4k-qd1": 0.55, "randwrite-4k-qd32": 0.40, "seqwrite-128k": 0.75},
         ("metroblk-mirrored", "metroblk-standalone"): {"seqwrite-128k": 0.9}}
for engine in sorted({r["engine"] for r in rows}):
    for job in ["randwrite-4k-qd1", "randwrite-4k-qd32", "seqwrite-128k"]:
        for num, den in [("rublk", "loop"), ("metroblk-standalone", "loop"), ("metroblk-mirrored", "loop"),
                         ("metroblk-standalone", "rublk"), ("metroblk-mirrored", "rublk"),
                         ("metroblk-mirrored", "metroblk-standalone")]:
            xs = ratios(engine, job, num, den)
            line = {"ratio": f"{num}/{den}", "engine": engine, "job": job, "metric": metric(job), **(show(xs) or {})}
            goal = goals.get((num, den), {}).get(job)
            if goal is not None and xs:
                line["goal"] = goal
                line["goal_met_by_median"] = xs[len(xs) // 2] >= goal
            print(json.dumps(line))
PY
