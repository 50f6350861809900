#!/bin/sh
# /init of the metroblk test VM's initramfs (busybox-static; see tests/vm/prepare.sh).
#
# 1. mounts proc/sys/devtmpfs and loads the modules listed in /etc/metroblk-modules
#    (ublk_drv, 9p, ext4, xfs, loop, veth, sch_netem, tls and their dependencies);
# 2. mounts the host's root read-only over virtio-9p on /host, with fresh proc, sysfs,
#    devtmpfs, devpts and tmpfs scratch space (/tmp, /run, /var/tmp, /dev/shm) on top;
# 3. chroots into /host and runs the script named by metroblk.script= on the kernel command
#    line, in the directory metroblk.cwd=, after sourcing metroblk.env= (if given);
# 4. prints "METROBLK_VM_SCRIPT_START" just before the script runs, then
#    "METROBLK_VM_EXIT=<status>" after it, and powers off.
#
# On a setup failure it prints "METROBLK_VM_ERROR: ...", and powers off without either marker;
# tests/vm/run.sh tells such a boot failure (no start marker) from a failed script and boots
# again (up to 3 attempts). metroblk.fail_boot=1 on the command line (run.sh --fail-boots, for
# the harness's own test) panics the kernel here, as a boot that dies would.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin

fatal() {
	echo "METROBLK_VM_ERROR: $*"
	sync
	poweroff -f
	reboot -f
	sleep 1000000
}

mount -t proc -o nosuid,nodev,noexec proc /proc || fatal "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fatal "cannot mount /sys"
mount -t devtmpfs -o nosuid devtmpfs /dev || fatal "cannot mount /dev"

script=
cwd=/
envfile=
debug=
interactive=
# shellcheck disable=SC2013 # words, not lines
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	metroblk.script=*) script=${arg#metroblk.script=} ;;
	metroblk.cwd=*) cwd=${arg#metroblk.cwd=} ;;
	metroblk.env=*) envfile=${arg#metroblk.env=} ;;
	metroblk.debug=1) debug=1 ;;
	metroblk.interactive=1) interactive=1 ;;
	metroblk.keep=*) keeps=${arg#metroblk.keep=} ;;
	metroblk.fail_boot=1) fail_boot=1 ;;
	esac
done
[ -n "$debug" ] && echo "metroblk-vm: init started ($(uname -r))"

# Load every module of the closure prepare.sh computed, in dependency order. A module that
# fails to load is reported, not fatal: the test that needs it fails with a clear symptom.
# One for an instruction the guest CPU lacks (crc32c-intel: run.sh leaves SSE 4.2 out)
# refuses with ENODEV and its generic fallback serves instead: said only with debug.
# shellcheck disable=SC2013 # one name a line
for m in $(cat /etc/metroblk-modules); do
	if ! out=$(modprobe "$m" 2>&1); then
		case "$out" in
		*"No such device"*) [ -n "$debug" ] && echo "metroblk-vm: $m is not for this CPU: $out" ;;
		*) echo "$out"; echo "metroblk-vm: warning: modprobe $m failed" ;;
		esac
	elif [ -n "$debug" ]; then
		echo "metroblk-vm: loaded $m (uptime $(cut -d' ' -f1 /proc/uptime))"
	fi
done

hostname metroblk-vm
ip link set lo up || echo "metroblk-vm: warning: cannot bring lo up"

# The host's root, read-only. msize 512 KiB makes large reads (binaries) take few round trips.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=524288,cache=loose host /host ||
	fatal "cannot mount the host root over 9p (is QEMU started with -virtfs ...,mount_tag=host?)"

mount -t proc -o nosuid,nodev,noexec proc /host/proc || fatal "cannot mount /host/proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /host/sys || fatal "cannot mount /host/sys"
mount -t devtmpfs -o nosuid devtmpfs /host/dev || fatal "cannot mount /host/dev"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /host/dev/pts ||
	echo "metroblk-vm: warning: cannot mount /dev/pts"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /host/dev/shm
# devtmpfs has no /dev/fd; bash process substitution <(...) needs it.
ln -sfn /proc/self/fd /host/dev/fd
ln -sfn /proc/self/fd/0 /host/dev/stdin
ln -sfn /proc/self/fd/1 /host/dev/stdout
ln -sfn /proc/self/fd/2 /host/dev/stderr
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /host/sys/fs/cgroup 2>/dev/null
mount -t debugfs debugfs /host/sys/kernel/debug 2>/dev/null

# Host directories under /tmp, /var/tmp or /run that this run needs (metroblk.keep=, a
# checkout cloned under /tmp, say): hold a bind mount of each before the scratch tmpfs hides
# it, and put it back at the same path afterwards.
i=0
for p in $(echo "${keeps:-}" | tr ',' ' '); do
	mkdir -p "/keep/$i"
	mount --bind "/host$p" "/keep/$i" || fatal "cannot keep $p visible in the VM"
	i=$((i + 1))
done

# Writable scratch space: everything else of the host is read-only inside the VM.
for d in /tmp /var/tmp; do
	[ -d "/host$d" ] || continue
	mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "/host$d" || fatal "cannot mount tmpfs on $d"
done
mount -t tmpfs -o mode=755,nosuid,nodev run /host/run || fatal "cannot mount tmpfs on /run"
mkdir -p /host/run/lock /host/tmp/scratch
chmod 1777 /host/run/lock
i=0
for p in $(echo "${keeps:-}" | tr ',' ' '); do
	mkdir -p "/host$p"
	mount --bind "/keep/$i" "/host$p" || fatal "cannot bind $p back into the VM"
	i=$((i + 1))
done

# Let modprobe inside the chroot find the guest kernel's modules: over the host's /lib/modules
# when it has one (a Debian host does), else through kmod's MODPROBE_OPTIONS=-d.
modprobe_options=
if [ -d /host/lib/modules ]; then
	mount --bind /lib/modules /host/lib/modules ||
		echo "metroblk-vm: warning: cannot bind /lib/modules into the chroot"
else
	mkdir -p /host/run/metroblk-vm/lib/modules
	mount --bind /lib/modules /host/run/metroblk-vm/lib/modules &&
		modprobe_options="-d /run/metroblk-vm"
fi
chmod 1777 /host/tmp/scratch

[ -n "$script" ] || fatal "no metroblk.script= on the kernel command line"
[ -f "/host$script" ] || fatal "script $script is not visible in the VM (it must live on the host's root filesystem, not under /tmp, /run or /var/tmp)"

if [ -n "${fail_boot:-}" ]; then
	echo "metroblk-vm: metroblk.fail_boot=1: crashing the kernel before the script starts"
	echo 1 >/proc/sys/kernel/sysrq
	echo c >/proc/sysrq-trigger
	fatal "sysrq crash did not happen"
fi

[ -n "$debug" ] && echo "metroblk-vm: running $script in $cwd"
# Inside the chroot: read the environment file, cd, run the script (bash unless executable).
# shellcheck disable=SC2016 # expanded by the bash in the chroot
wrapper='
if [ -n "$3" ]; then
	set -a
	. "$3" || { echo "metroblk-vm: cannot read environment file $3"; exit 126; }
	set +a
fi
cd "$1" || { echo "metroblk-vm: cannot cd to $1"; exit 126; }
if [ -x "$2" ]; then exec "$2"; else exec /bin/bash "$2"; fi'
set -- chroot /host /usr/bin/env -i \
	HOME=/root \
	PATH=/usr/local/cargo/bin:/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	TERM=dumb \
	LANG=C.UTF-8 \
	METROBLK_IN_VM=1 \
	METROBLK_SCRATCH=/tmp/scratch \
	${modprobe_options:+MODPROBE_OPTIONS="$modprobe_options"} \
	/bin/bash -c "$wrapper" metroblk-vm "$cwd" "$script" "$envfile"
# From here on a failure is the script's: run.sh never retries a VM that printed this.
echo "METROBLK_VM_SCRIPT_START"
if [ -n "$interactive" ]; then
	# The serial line becomes the script's controlling terminal (job control, ^C).
	setsid -c "$@" </dev/ttyS0 >/dev/ttyS0 2>&1
else
	# stdin is /dev/null; stdout and stderr go to the serial console.
	"$@" </dev/null 2>&1
fi
status=$?

# The marker goes on its own line even when the script's output did not end with a newline.
printf '\nMETROBLK_VM_EXIT=%d\n' "$status"
sync
poweroff -f
reboot -f
sleep 1000000
