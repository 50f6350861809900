#!/usr/bin/env bash
# Builds the metroblk Debian package in one command:
#
#   scripts/deb.sh [--bin PATH] [--out DIR]
#
# Without --bin it builds the release binary (cargo build --release -p metroblk). The package
# holds the binary (stripped), the systemd units (packaging/systemd), the example configs
# (packaging/examples), man pages and shell completions generated from the clap definitions
# (`metroblk generate man|completions`), the copyright and the changelog. Prints the .deb's
# path. Needs dpkg-dev (dpkg-shlibdeps) and binutils (strip); lintian checks the result.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN= OUT="$ROOT/target/deb"
while (($#)); do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "usage: $0 [--bin PATH] [--out DIR]" >&2; exit 2 ;;
    esac
done
if [[ -z "$BIN" ]]; then
    cargo build --release -p metroblk --manifest-path "$ROOT/Cargo.toml"
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/metroblk"
fi
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/Cargo.toml" | head -n 1)
ARCH=$(dpkg --print-architecture)
PKG=metroblk
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
R="$STAGE/root"
DOC="$R/usr/share/doc/$PKG"

install -D -m 0755 "$BIN" "$R/usr/bin/metroblk"
strip --remove-section=.comment --remove-section=.note --strip-unneeded "$R/usr/bin/metroblk"
for unit in "$ROOT"/packaging/systemd/*.service; do
    install -D -m 0644 "$unit" "$R/lib/systemd/system/$(basename "$unit")"
done
for ex in "$ROOT"/packaging/examples/*.toml; do
    install -D -m 0644 "$ex" "$DOC/examples/$(basename "$ex")"
done
"$R/usr/bin/metroblk" generate man "$STAGE/man"
for page in "$STAGE"/man/*.1; do
    install -D -m 0644 "$page" "$R/usr/share/man/man1/$(basename "$page")"
    gzip -9n "$R/usr/share/man/man1/$(basename "$page")"
done
"$R/usr/bin/metroblk" generate completions "$STAGE/completions"
install -D -m 0644 "$STAGE/completions/metroblk.bash" "$R/usr/share/bash-completion/completions/metroblk"
install -D -m 0644 "$STAGE/completions/_metroblk" "$R/usr/share/zsh/vendor-completions/_metroblk"
install -D -m 0644 "$STAGE/completions/metroblk.fish" "$R/usr/share/fish/vendor_completions.d/metroblk.fish"

install -d -m 0755 "$DOC"
cat > "$DOC/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: metroblk

Files: *
Copyright: 2026 the metroblk authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 can be found in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
printf '%s (%s) unstable; urgency=medium\n\n  * Package built from the metroblk source tree.\n\n -- metroblk maintainers <metroblk@example.org>  %s\n' \
    "$PKG" "$VERSION" "$(date -R -u -d @"${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}")" \
    | gzip -9n > "$DOC/changelog.gz"
chmod 0644 "$DOC/copyright" "$DOC/changelog.gz"

# Shared-library dependencies, as dpkg-shlibdeps finds them.
mkdir -p "$STAGE/src/debian"
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$PKG" "$PKG" > "$STAGE/src/debian/control"
DEPENDS=$(cd "$STAGE/src" && dpkg-shlibdeps -O "$R/usr/bin/metroblk" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
mkdir -p "$R/DEBIAN"
cat > "$R/DEBIAN/control" <<CONTROL
Package: $PKG
Version: $VERSION
Architecture: $ARCH
Maintainer: metroblk maintainers <metroblk@example.org>
Installed-Size: $(du -sk --exclude=DEBIAN "$R" | cut -f1)
Depends: $DEPENDS
Section: admin
Priority: optional
Description: synchronous two-site block-device mirror over ublk
 metroblk mirrors a block device between two nodes: every write completes only
 once both sites have it. A witness at a third site fences a lost primary and
 promotes its secondary. The package holds the metroblk binary (node, witness
 and operator commands), systemd units for a node per config and for the
 witness, example configs, man pages and shell completions.
CONTROL
(cd "$R" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) > "$R/DEBIAN/md5sums"
chmod 0644 "$R/DEBIAN/md5sums"
find "$R" -type d -exec chmod 0755 {} +
mkdir -p "$OUT"
DEB="$OUT/${PKG}_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz --build "$R" "$DEB" >/dev/null
echo "$DEB"
