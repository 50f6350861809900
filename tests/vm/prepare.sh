#!/usr/bin/env bash
# Prepares what tests/vm/run.sh boots: a stock Debian 6.12 kernel (which has ublk_drv) and a
# small busybox initramfs holding only the modules the tests need. Idempotent; when nothing
# changed it takes well under a second.
#
# Steps:
#   1. apt-get install the Debian packages the harness needs, if missing (needs root then);
#   2. resolve the newest linux-image-6.12.<N>+deb12-amd64-unsigned (exact name, never a
#      pattern: `apt-get download PATTERN` fetches every match), download it and unpack it
#      into the cache with dpkg-deb -x, then run depmod over the unpacked tree;
#   3. build initrd.gz: busybox-static, tests/vm/init.sh as /init, and the decompressed
#      modules below plus their dependencies and soft dependencies (resolved by kmod from the
#      package's own modules.dep/modules.softdep), with a modules.dep made by depmod.
#
# The initramfs is keyed by kernel version + a hash of init.sh, this script and the module
# list, so editing any of them rebuilds it (a few seconds) and nothing else.
#
# stdout: only KEY=VALUE lines (kver, kernel, initrd, cache, pkg) for run.sh; logs go to stderr.
#
# Environment:
#   METROBLK_VM_CACHE          cache directory (default: <repo>/.vm-cache). It must be visible
#                              inside the VM, so not under /tmp, /run, /var/tmp or /dev/shm.
#   METROBLK_VM_KERNEL         which kernel: 6.12 (default: Debian 12's stock kernel, the floor)
#                              or 7 (the newest 7.x of Debian's trixie-backports: ublk zero
#                              copy, auto buffer registration; its linux-binary and
#                              linux-modules packages, fetched through a private apt list in
#                              the cache, so the machine's sources stay as they are)
#   METROBLK_VM_KERNEL_PKG     use this exact kernel package instead of the newest one
#   METROBLK_VM_EXTRA_MODULES  more modules to put into the initramfs (space separated)
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export LC_ALL=C

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${METROBLK_VM_CACHE:-$REPO/.vm-cache}
INIT=$HERE/init.sh

# Modules the init loads (modprobe adds their dependencies). loop is skipped when built in.
# tls and its ciphers (AES-GCM, ChaCha20-Poly1305): kernel TLS, for transport = "tls"
# (tests/tests/tls.rs); the VM cannot load a cipher on demand (its root is the host's).
MODULES=(ublk_drv 9p 9pnet 9pnet_virtio netfs ext4 xfs loop veth sch_netem tls gcm ghash_generic aesni_intel chacha20poly1305)
# Modules a newer kernel no longer has as such (7.x folded ghash_generic into its crypto
# library): skipped, with a line, where the kernel's package lacks them.
MODULES_OPTIONAL=(ghash_generic)
# Exports (tests/tests/ublk_export.rs): LIO's iSCSI target on block devices, the kernel's
# iSCSI initiator and SCSI disks, nvmet's and the host's NVMe/TCP, a bridge for the host's link.
MODULES+=(target_core_iblock iscsi_target_mod iscsi_tcp sd_mod sg nvmet_tcp nvme_tcp bridge)
# shellcheck disable=SC2206
MODULES+=(${METROBLK_VM_EXTRA_MODULES:-})

PACKAGES=(qemu-system-x86 busybox-static cpio kmod xz-utils fio e2fsprogs xfsprogs iproute2 util-linux)
SERIES=${METROBLK_VM_KERNEL:-6.12}
case "$SERIES" in
6.12) KERNEL_RE='^linux-image-6\.12\.[0-9.]+\+deb12-amd64-unsigned$' ;;
7) KERNEL_RE='^linux-binary-7\.[0-9.]+\+deb13-amd64$' ;;
*)
	echo "prepare.sh: error: METROBLK_VM_KERNEL=$SERIES: use 6.12 or 7" >&2
	exit 1
	;;
esac

log() { echo "prepare.sh: $*" >&2; }
die() {
	echo "prepare.sh: error: $*" >&2
	exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# apt options: none for the machine's own sources; a private list for trixie-backports (set
# once the cache directory is known).
APT_OPTS=()
apt_updated=
apt_update() {
	[ -n "$apt_updated" ] && return 0
	is_root || return 1
	log "apt-get update ${APT_OPTS[*]:+(trixie-backports)}"
	apt-get "${APT_OPTS[@]}" update -qq >&2 || return 1
	apt_updated=1
}

# 1. Packages ---------------------------------------------------------------------------------
command -v dpkg-query >/dev/null || die "this harness needs a Debian system (no dpkg-query)"
missing=()
for p in "${PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	is_root || die "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"
	log "installing ${missing[*]}"
	apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; }
	apt_install || { apt_update && apt_install; } || die "apt-get install ${missing[*]} failed"
fi
BUSYBOX=$(dpkg-query -L busybox-static | grep -E '/bin/busybox$' | head -n 1)
[ -x "$BUSYBOX" ] || die "busybox-static is installed but its /bin/busybox is missing"

# 2. Cache directory ---------------------------------------------------------------------------
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd -P)
case "$CACHE/" in
/dev/shm/*)
	# /tmp, /var/tmp and /run are fine: run.sh binds the cache back into the VM (metroblk.keep=).
	die "METROBLK_VM_CACHE=$CACHE is not visible inside the VM (tmpfs there); use a directory elsewhere"
	;;
esac

# Concurrent runs (parallel tests) share one cache: one builder at a time.
exec 9>"$CACHE/.lock"
flock 9

# 3. Kernel package -----------------------------------------------------------------------------
if [ "$SERIES" = 7 ]; then
	apt_dir=$CACHE/apt-trixie-backports
	mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
	echo "deb http://deb.debian.org/debian trixie-backports main" >"$apt_dir/sources.list"
	APT_OPTS=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=-"
		-o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
	# The private list is fetched once; later runs use it (and refetch if nothing matches).
	compgen -G "$apt_dir/lists/*Packages*" >/dev/null || apt_update || true
fi
resolve_kernel_pkg() {
	apt-cache "${APT_OPTS[@]}" search --names-only "$KERNEL_RE" 2>/dev/null | awk '{print $1}' | sort -V | tail -n 1
}
newest_cached_kver() {
	local d
	for d in "$CACHE"/kernel-"$SERIES".*/.complete; do
		[ -e "$d" ] && basename "$(dirname "$d")"
	done | sed 's/^kernel-//' | sort -V | tail -n 1
}

pkg=${METROBLK_VM_KERNEL_PKG:-}
if [ -z "$pkg" ]; then
	pkg=$(resolve_kernel_pkg)
	if [ -z "$pkg" ] && apt_update; then
		pkg=$(resolve_kernel_pkg)
	fi
fi
if [ -n "$pkg" ]; then
	[[ "$pkg" =~ $KERNEL_RE ]] || [ -n "${METROBLK_VM_KERNEL_PKG:-}" ] || die "unexpected package name $pkg"
	kver=${pkg#linux-image-}
	kver=${kver#linux-binary-}
	kver=${kver%-unsigned}
else
	kver=$(newest_cached_kver)
	[ -n "$kver" ] || die "no package matches $KERNEL_RE (apt-cache search, after apt-get update); is bookworm-security in the apt sources?"
	log "warning: no kernel package found by apt-cache; using the cached $kver"
	case "$SERIES" in
	7) pkg=linux-binary-$kver ;;
	*) pkg=linux-image-$kver-unsigned ;;
	esac
fi
# 7.x comes as two packages: the kernel (linux-binary) and its modules.
pkgs=("$pkg")
if [ "$SERIES" = 7 ]; then pkgs+=("linux-modules-$kver"); fi

KTREE=$CACHE/kernel-$kver
if [ ! -e "$KTREE/.complete" ]; then
	work=$(mktemp -d "$CACHE/tmp.XXXXXX")
	trap 'rm -rf "$work"' EXIT
	log "downloading ${pkgs[*]}"
	# Exact names only. (The filtered warning says the _apt user cannot write into $work.)
	download() {
		(cd "$work" && apt-get "${APT_OPTS[@]}" download -q "${pkgs[@]}") 2>&1 |
			{ grep -v 'Download is performed unsandboxed' || true; } >&2
	}
	download || { apt_update && download; } || die "apt-get download ${pkgs[*]} failed"
	mkdir "$work/root"
	# apt names the files after the pool (a '+' may be %2b): find each by its Package field.
	deb=
	for p in "${pkgs[@]}"; do
		found=
		for f in "$work"/*.deb; do
			[ -e "$f" ] && [ "$(dpkg-deb -f "$f" Package)" = "$p" ] && found=$f
		done
		[ -n "$found" ] || die "apt-get download $p produced no .deb"
		log "unpacking $(basename "$found")"
		dpkg-deb -x "$found" "$work/root"
		[ "$p" = "$pkg" ] && deb=$found
	done
	# 6.12 ships /boot/vmlinuz-KVER; 7.x usr/lib/modules/KVER/vmlinuz: one place for the rest.
	if [ ! -f "$work/root/boot/vmlinuz-$kver" ] && [ -f "$work/root/usr/lib/modules/$kver/vmlinuz" ]; then
		mkdir -p "$work/root/boot"
		mv "$work/root/usr/lib/modules/$kver/vmlinuz" "$work/root/boot/vmlinuz-$kver"
	fi
	[ -f "$work/root/boot/vmlinuz-$kver" ] || die "$pkg has no /boot/vmlinuz-$kver"
	# The package ships no modules.dep: make one for the whole tree (also modules.softdep).
	moddir=$work/root/lib/modules/$kver
	[ -d "$moddir" ] || moddir=$work/root/usr/lib/modules/$kver
	[ -d "$moddir" ] || die "$pkg has no lib/modules/$kver"
	log "depmod $kver"
	depmod -b "${moddir%/lib/modules/"$kver"}" "$kver"
	dpkg-deb -f "$deb" Version >"$work/root/.pkg-version"
	echo "$pkg" >"$work/root/.pkg-name"
	rm -rf "$KTREE"
	mv "$work/root" "$KTREE"
	touch "$KTREE/.complete"
	rm -rf "$work"
	trap - EXIT
fi
KROOT=$KTREE
[ -d "$KROOT/lib/modules/$kver" ] || KROOT=$KTREE/usr
KMODDIR=$KROOT/lib/modules/$kver

# 4. Initramfs ----------------------------------------------------------------------------------
key=$({
	echo "format 1"
	echo "modules ${MODULES[*]}"
	"$BUSYBOX" 2>/dev/null | head -n 1 || true
	cat "$INIT" "${BASH_SOURCE[0]}"
} | sha256sum | cut -c1-16)
OUT=$CACHE/vm-$kver-$key

if [ ! -e "$OUT/.complete" ]; then
	log "building the initramfs for $kver (key $key)"
	work=$(mktemp -d "$CACHE/tmp.XXXXXX")
	trap 'rm -rf "$work"' EXIT
	st=$work/initramfs
	mkdir -p "$st"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,host,etc,tmp,run,root}
	mkdir -p "$st/lib/modules/$kver"
	cp "$BUSYBOX" "$st/bin/busybox"
	for applet in $("$BUSYBOX" --list-full); do
		if [ "$applet" != bin/busybox ]; then ln -sf /bin/busybox "$st/$applet"; fi
	done
	cp "$INIT" "$st/init"
	chmod 755 "$st/init"

	# Dependency closure, in load order, from the package's modules.dep and modules.softdep.
	declare -A seen=()
	load_order=()
	for m in "${MODULES[@]}"; do
		if ! deps=$(modprobe -d "$KROOT" -S "$kver" --show-depends "$m" 2>&1); then
			[[ " ${MODULES_OPTIONAL[*]} " == *" $m "* ]] || die "module $m: $deps"
			log "module $m: not in $kver (optional, skipped)"
			continue
		fi
		while read -r kind path _; do
			case "$kind" in
			builtin) ;; # built into the kernel: nothing to load
			insmod)
				[ -n "${seen[$path]:-}" ] && continue
				seen[$path]=1
				rel=${path#"$KMODDIR"/}
				[ "$rel" != "$path" ] || die "module $m: $path is outside $KMODDIR"
				dest=$st/lib/modules/$kver/${rel%.*}
				case "$path" in
				*.ko) dest=$st/lib/modules/$kver/$rel ;;
				esac
				mkdir -p "$(dirname "$dest")"
				case "$path" in
				*.ko.xz) xz -dc "$path" >"$dest" ;;
				*.ko.zst) zstd -qdc "$path" >"$dest" ;;
				*.ko.gz) gzip -dc "$path" >"$dest" ;;
				*.ko) cp "$path" "$dest" ;;
				*) die "unexpected module file $path" ;;
				esac
				name=$(basename "$dest" .ko)
				load_order+=("$name")
				;;
			*) die "unexpected modprobe --show-depends output for $m: $kind $path" ;;
			esac
		done <<<"$deps"
	done
	for f in modules.builtin modules.builtin.modinfo modules.order; do
		if [ -f "$KMODDIR/$f" ]; then cp "$KMODDIR/$f" "$st/lib/modules/$kver/"; fi
	done
	depmod -b "$st" "$kver"
	printf '%s\n' "${load_order[@]}" >"$st/etc/metroblk-modules"

	mkdir -p "$work/out"
	(cd "$st" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) |
		gzip -1 >"$work/out/initrd.gz"
	cp "$KROOT/boot/vmlinuz-$kver" "$work/out/vmlinuz" 2>/dev/null ||
		cp "$KTREE/boot/vmlinuz-$kver" "$work/out/vmlinuz"
	printf '%s\n' "${load_order[@]}" >"$work/out/modules"
	rm -rf "$OUT"
	mv "$work/out" "$OUT"
	touch "$OUT/.complete"
	rm -rf "$work"
	trap - EXIT
	log "initramfs: $(du -h "$OUT/initrd.gz" | cut -f1), modules: ${load_order[*]}"

	# Drop what no current build uses (older kernels, initramfs of older init scripts).
	for d in "$CACHE"/kernel-"$SERIES".* "$CACHE"/vm-"$SERIES".*; do
		if [ -e "$d" ] && [ "$d" != "$KTREE" ] && [ "$d" != "$OUT" ]; then rm -rf "$d"; fi
	done
fi

log "kernel $pkg ($(cat "$KTREE/.pkg-version" 2>/dev/null || echo '?'))"
log "cache  $CACHE"
log "vmlinuz $OUT/vmlinuz"
log "initrd  $OUT/initrd.gz"
echo "pkg=$pkg"
echo "kver=$kver"
echo "cache=$CACHE"
echo "kernel=$OUT/vmlinuz"
echo "initrd=$OUT/initrd.gz"
