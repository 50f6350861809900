#!/usr/bin/env bash
# Runs a script as root inside a throw-away QEMU (TCG) VM with a Debian 6.12 kernel that has
# ublk_drv, over a read-only view of this machine's root filesystem. See tests/vm/README.md.
#
#   tests/vm/run.sh SCRIPT [--timeout SECS] [--mem MB] [--cpus N] [--workdir DIR] [--env K=V]...
#                   [--fail-boots N]
#   tests/vm/run.sh --interactive [SCRIPT] [options]      (default SCRIPT: a login shell)
#
# The console (the script's stdout and stderr) streams to stdout. Exit status: the script's,
# 124 when the VM ran past --timeout (default 600 s; QEMU is killed), 125 when the VM stopped
# without reporting the script's status (boot or setup failure, kernel panic).
#
# A VM that dies before the script starts (a kernel panic or oops while booting: multi-threaded
# TCG occasionally trips over the kernel patching its own text; an init that fails) is booted
# again, up to 3 attempts in all, and each retry is announced on stdout ("vm: boot attempt 1
# of 3 died before the test script started (...); retrying"). Once the script has started
# (the init prints METROBLK_VM_SCRIPT_START), nothing is retried. --fail-boots N makes the
# first N boots crash on purpose (the harness's own test).
#
# Environment: METROBLK_VM_CACHE (see prepare.sh), METROBLK_VM_TIMEOUT, METROBLK_VM_MEM,
# METROBLK_VM_CPUS (defaults of the options), METROBLK_VM_ACCEL (default tcg,thread=multi),
# METROBLK_VM_CPU (QEMU's -cpu, default max,-erms,-fsrm,-sse4.2: see below),
# METROBLK_VM_LOGLEVEL (kernel console loglevel, default 3), METROBLK_VM_DEBUG=1 (kernel
# messages and the init's steps), METROBLK_VM_QUIET=1 (no final status line).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
	sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
	exit 2
}
die() {
	echo "run.sh: error: $*" >&2
	exit 125
}

script=
timeout_s=${METROBLK_VM_TIMEOUT:-600}
mem=${METROBLK_VM_MEM:-2048}
cpus=${METROBLK_VM_CPUS:-2}
workdir=$PWD
interactive=
fail_boots=0
envs=()
while [ $# -gt 0 ]; do
	case "$1" in
	--timeout) timeout_s=${2:?--timeout needs a value}; shift 2 ;;
	--timeout=*) timeout_s=${1#*=}; shift ;;
	--mem) mem=${2:?--mem needs a value}; shift 2 ;;
	--mem=*) mem=${1#*=}; shift ;;
	--cpus) cpus=${2:?--cpus needs a value}; shift 2 ;;
	--cpus=*) cpus=${1#*=}; shift ;;
	--workdir) workdir=${2:?--workdir needs a value}; shift 2 ;;
	--workdir=*) workdir=${1#*=}; shift ;;
	--env) envs+=("${2:?--env needs NAME=VALUE}"); shift 2 ;;
	--env=*) envs+=("${1#*=}"); shift ;;
	--fail-boots) fail_boots=${2:?--fail-boots needs a value}; shift 2 ;;
	--interactive | -i) interactive=1; shift ;;
	-h | --help) usage ;;
	-*) echo "run.sh: unknown option $1" >&2; usage ;;
	*)
		[ -z "$script" ] || { echo "run.sh: more than one SCRIPT given" >&2; usage; }
		script=$1
		shift
		;;
	esac
done
[ -n "$script" ] || [ -n "$interactive" ] || usage
[ -z "$script" ] || [ -f "$script" ] || die "script $script does not exist"
[ -z "$interactive" ] || [ -t 0 ] || die "--interactive needs a terminal on stdin"
if ! [[ "$timeout_s" =~ ^[0-9]+$ ]] || [ "$timeout_s" -eq 0 ]; then
	die "--timeout must be a positive number of seconds"
fi
[[ "$mem" =~ ^[0-9]+$ ]] || die "--mem must be a number of MiB"
[[ "$cpus" =~ ^[0-9]+$ ]] || die "--cpus must be a number"
[[ "$fail_boots" =~ ^[0-9]+$ ]] || die "--fail-boots must be a number"
workdir=$(cd "$workdir" && pwd -P) || die "--workdir $workdir does not exist"
case "$workdir" in
*[[:space:]]*) die "--workdir $workdir contains white space (it goes on the kernel command line)" ;;
esac
# The VM mounts scratch tmpfs over /tmp, /var/tmp and /run. Directories of this run that live
# there on the host (a checkout cloned under /tmp, say) are kept visible: the init binds them
# back over the scratch space at the same paths (metroblk.keep=).
keep=()
repo=$(cd "$HERE/../.." && pwd -P)
for d in "$repo" "$workdir"; do
	case "$d" in
	/tmp/* | /var/tmp/* | /run/*) [[ " ${keep[*]-} " == *" $d "* ]] || keep+=("$d") ;;
	/tmp | /var/tmp | /run | /dev/shm | /dev/shm/*)
		die "--workdir $d is a scratch tmpfs inside the VM; use a directory below it or elsewhere" ;;
	esac
done

# Kernel and initramfs (quick when cached).
kernel='' initrd='' cache=''
while IFS='=' read -r k v; do
	case "$k" in
	kernel) kernel=$v ;;
	initrd) initrd=$v ;;
	cache) cache=$v ;;
	esac
done < <("$HERE/prepare.sh" || echo "prepare_failed=1")
if [ -z "$kernel" ] || [ -z "$initrd" ] || [ -z "$cache" ]; then
	die "tests/vm/prepare.sh failed (see above)"
fi

# The VM sees the host's root read-only, but not its /tmp: the job lives in the cache.
mkdir -p "$cache/jobs"
# Jobs of runs that were killed outright.
find "$cache/jobs" -mindepth 1 -maxdepth 1 -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
job=$(mktemp -d "$cache/jobs/job.XXXXXX")
chmod 755 "$job"
timeout_pid=
# shellcheck disable=SC2317 # called from the traps
cleanup() {
	if [ -n "$timeout_pid" ]; then kill -TERM "$timeout_pid" 2>/dev/null || true; fi
	rm -rf "$job"
}
trap cleanup EXIT
trap 'cleanup; trap - EXIT; exit 130' INT TERM HUP

if [ -n "$script" ]; then
	cp "$script" "$job/script"
	if [ -x "$script" ]; then chmod 755 "$job/script"; else chmod 644 "$job/script"; fi
else
	read -r rows cols < <(stty size 2>/dev/null || echo "24 80")
	printf 'stty rows %s cols %s 2>/dev/null\nexec /bin/bash -il\n' "$rows" "$cols" >"$job/script"
fi
if [ -n "$interactive" ]; then envs=("TERM=${TERM:-vt100}" "${envs[@]+"${envs[@]}"}"); fi
: >"$job/env"
for e in "${envs[@]+"${envs[@]}"}"; do
	[[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env $e is not NAME=VALUE"
	printf 'export %s=%q\n' "${e%%=*}" "${e#*=}" >>"$job/env"
done

append="console=ttyS0 panic=-1 quiet loglevel=${METROBLK_VM_LOGLEVEL:-3}"
if [ "${METROBLK_VM_DEBUG:-}" = 1 ]; then
	append="console=ttyS0 panic=-1 loglevel=${METROBLK_VM_LOGLEVEL:-7} metroblk.debug=1"
fi
# tsc=reliable: skip the TSC watchdog, which misfires under TCG's uneven clock.
append+=" tsc=reliable metroblk.script=$job/script metroblk.cwd=$workdir metroblk.env=$job/env"
if [ -n "$interactive" ]; then append+=" metroblk.interactive=1"; fi
case "$cache/" in
/tmp/* | /var/tmp/* | /run/*)
	inside=
	for k in "${keep[@]+"${keep[@]}"}"; do [[ "$cache/" == "$k/"* ]] && inside=1; done
	[ -n "$inside" ] || keep+=("$cache")
	;;
esac
if ((${#keep[@]})); then append+=" metroblk.keep=$(IFS=,; echo "${keep[*]}")"; fi

# Boot attempts: a VM that dies before the script starts is booted again (see the top).
BOOT_ATTEMPTS_MAX=3

# boot_once ATTEMPT: runs one VM to its end; sets qemu_rc and elapsed, console in $log.
boot_once() {
	local attempt=$1 cmdline=$append
	if [ "$attempt" -le "$fail_boots" ]; then cmdline+=" metroblk.fail_boot=1"; fi
	# shellcheck disable=SC2054 # the commas are QEMU's
	local qemu=(
		qemu-system-x86_64
		-accel "${METROBLK_VM_ACCEL:-tcg,thread=multi}"
		# QEMU's most capable CPU less three features whose instructions its TCG emulates far
		# slower than anything around them, so that the VM's costs keep a real CPU's
		# proportions (benches `secondary_copy --parts`, CPU per MiB in this VM / natively):
		# - ERMS, FSRM: Linux then copies to and from user space by `rep movsb`, which TCG
		#   runs a byte per step: pwrite 4.7 ms/MiB with them, 1.7 without, the kernel's own
		#   page copy 2.2 and 1.7 (natively 0.19 and 0.22). A user-space server's copies
		#   (metroblk, rublk) would cost 2.7x their share against an in-kernel one's (DRBD).
		# - SSE 4.2: its `crc32` instruction is emulated bit by bit: crc32c 8.2 ms/MiB, 9x a
		#   pwrite (natively 0.05 ms/MiB, a quarter of one); without it the table-driven
		#   fallback of the same crates takes 2.2 ms/MiB.
		# DRBD and the loop device are not slower without them (fio under each model, one boot
		# each, back to back: docs/perf-fio-history.md, "the VM's CPU model").
		-cpu "${METROBLK_VM_CPU:-max,-erms,-fsrm,-sse4.2}"
		-m "$mem"
		-smp "$cpus"
		-nographic
		-no-reboot
		-nic none
		# Keep SeaBIOS off the serial console (its banner and terminal resets). QEMU warns
		# about the name; the warning is filtered out below.
		-fw_cfg name=etc/sercon-port,string=0
		-kernel "$kernel"
		-initrd "$initrd"
		-append "$cmdline"
		-virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap
	)
	if [ -n "$interactive" ]; then
		echo "run.sh: interactive VM; the shell's exit powers it off (or press Ctrl-A x)" >&2
	fi
	log=$job/console-$attempt.log
	rm -f "$job/timeout.pid" "$job/qemu.rc"
	local start_ns pipeline
	start_ns=$(date +%s%N)
	# QEMU's console goes through sed (drop the serial line's CRs, unbuffered) and tee (stream
	# and keep a copy to find the markers in). timeout(1) runs QEMU in its own process group,
	# so cleanup() passes signals on to it. Interactive: QEMU keeps the terminal (timeout
	# --foreground), and its output is not filtered (sed would hold back prompts).
	if [ -n "$interactive" ]; then exec 3<&0; fi
	set +e
	{
		if [ -n "$interactive" ]; then
			timeout --foreground -k 10 "$timeout_s" "${qemu[@]}" <&3 \
				2> >(grep --line-buffered -v 'fw_cfg item names should be prefixed' >&2) &
		else
			timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null \
				2> >(grep --line-buffered -v 'fw_cfg item names should be prefixed' >&2) &
		fi
		echo $! >"$job/timeout.pid"
		wait $!
		echo $? >"$job/qemu.rc"
	} | if [ -n "$interactive" ]; then
		tee "$log"
	else
		sed -u -e 's/\r$//' -e '/^\[ *[0-9.]*\] reboot: Power down$/d' | tee "$log"
	fi &
	pipeline=$!
	# Wait for the pid file, then for the pipeline (tee ends after QEMU's output ends).
	for _ in $(seq 100); do
		[ -s "$job/timeout.pid" ] && break
		sleep 0.05
	done
	timeout_pid=$(cat "$job/timeout.pid" 2>/dev/null)
	wait "$pipeline"
	timeout_pid=
	set -e
	if [ -n "$interactive" ]; then exec 3<&-; fi
	local elapsed_ms=$((($(date +%s%N) - start_ns) / 1000000))
	elapsed=$((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))
	qemu_rc=$(cat "$job/qemu.rc" 2>/dev/null || echo '?')
}

# Why a boot died, in one line: the kernel's panic or oops line, or the init's error.
boot_death_reason() {
	local line
	line=$(grep -a -m 1 -E 'Kernel panic|Oops|BUG:|METROBLK_VM_ERROR|general protection fault|int3' "$log" | tr -d '\r' || true)
	if [ -n "$line" ]; then
		echo "$line" | sed 's/^\[ *[0-9.]*\] //' | cut -c1-160
	elif [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
		echo "no sign of life within ${timeout_s}s"
	else
		echo "QEMU exit status $qemu_rc, no kernel message"
	fi
}

attempt=1
while :; do
	boot_once "$attempt"
	if grep -a -q '^METROBLK_VM_SCRIPT_START'$'\r''\{0,1\}$' "$log"; then
		break
	fi
	if [ -n "$interactive" ] || [ "$attempt" -ge "$BOOT_ATTEMPTS_MAX" ]; then
		break
	fi
	echo "vm: boot attempt $attempt of $BOOT_ATTEMPTS_MAX died before the test script started ($(boot_death_reason)); retrying"
	attempt=$((attempt + 1))
done

marker=$(grep -a -o '^METROBLK_VM_EXIT=[0-9]*'$'\r''\{0,1\}$' "$log" | tail -n 1 | tr -d '\r' || true)
if [ -n "$marker" ]; then
	status=${marker#METROBLK_VM_EXIT=}
	if [ "${METROBLK_VM_QUIET:-}" != 1 ]; then
		echo "run.sh: script exited with status $status (VM ran ${elapsed}s)" >&2
	fi
	exit "$status"
fi
if [ "$qemu_rc" = 124 ] || [ "$qemu_rc" = 137 ]; then
	echo "run.sh: error: timeout: the VM ran past ${timeout_s}s and was killed" >&2
	exit 124
fi
error=$(grep -a '^METROBLK_VM_ERROR' "$log" | tail -n 1 | tr -d '\r' || true)
echo "run.sh: error: the VM stopped without reporting the script's exit status (QEMU exit status $qemu_rc after ${elapsed}s)${error:+: $error}" >&2
if [ -z "$error" ]; then
	echo "run.sh: last console lines:" >&2
	tail -n 20 "$log" | sed 's/^/run.sh:   /' >&2
	echo "run.sh: rerun with METROBLK_VM_DEBUG=1 to see the kernel's messages and the init's steps" >&2
fi
# Last, so that whoever keeps only the end of this output keeps the verdict.
if ! grep -a -q '^METROBLK_VM_SCRIPT_START' "$log"; then
	echo "run.sh: error: the VM died before the test script started, $attempt time(s) in a row; last: $(boot_death_reason)" >&2
fi
exit 125
