# DRBD 8.4 for the fio benchmarks (sourced by run.sh and threads.sh): two minors of one
# kernel mirrored to each other over 127.0.0.1, protocol C (a write completes once both disks
# have it), each on a loop device over a tmpfs file in $W of ${SIZE_MB} MiB. The initial sync
# is skipped (new-current-uuid --clear-bitmap): both start empty. /dev/drbd0 is the primary.
# drbd_up's arguments are extra net options for both minors (e.g. --data-integrity-alg=crc32c).
DRBDSETUP=/usr/lib/drbd/drbdsetup-84
DRBD_LOOPS=
drbd_up() {
	local la lb
	truncate -s ${SIZE_MB}M "$W/drbd-a.img" "$W/drbd-b.img"
	la=$(losetup -f --show "$W/drbd-a.img")
	lb=$(losetup -f --show "$W/drbd-b.img")
	DRBD_LOOPS="$la $lb"
	drbdmeta --force 0 v08 "$la" internal create-md >/dev/null
	drbdmeta --force 1 v08 "$lb" internal create-md >/dev/null
	$DRBDSETUP new-resource bench-a && $DRBDSETUP new-minor bench-a 0 0 && $DRBDSETUP attach 0 "$la" "$la" internal
	$DRBDSETUP new-resource bench-b && $DRBDSETUP new-minor bench-b 1 0 && $DRBDSETUP attach 1 "$lb" "$lb" internal
	$DRBDSETUP connect bench-a ipv4:127.0.0.1:7789 ipv4:127.0.0.1:7790 --protocol=C "$@"
	$DRBDSETUP connect bench-b ipv4:127.0.0.1:7790 ipv4:127.0.0.1:7789 --protocol=C "$@"
	for _ in $(seq 1 100); do
		[ "$(grep -c 'cs:Connected' /proc/drbd)" = 2 ] && break
		sleep 0.1
	done
	[ "$(grep -c 'cs:Connected' /proc/drbd)" = 2 ] || { cat /proc/drbd >&2; echo "DRBD did not connect" >&2; exit 1; }
	$DRBDSETUP new-current-uuid 0 --clear-bitmap
	$DRBDSETUP primary 0
	grep -q 'ds:UpToDate/UpToDate' /proc/drbd || { cat /proc/drbd >&2; echo "DRBD is not up to date on both" >&2; exit 1; }
}
drbd_down() {
	$DRBDSETUP down bench-a 2>/dev/null || true
	$DRBDSETUP down bench-b 2>/dev/null || true
	for l in $DRBD_LOOPS; do losetup -d "$l" 2>/dev/null || true; done
	DRBD_LOOPS=
	rm -f "$W/drbd-a.img" "$W/drbd-b.img"
}

