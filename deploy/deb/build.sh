#!/usr/bin/env bash
# Builds the Debian package of Switchyard with plain dpkg-deb (no debhelper, no cargo-deb), so
# that any binary can be packaged: `make deb` packages the release build, the integration
# test (tests/integration/deploy_assets.rs) the debug one.
#
#   deploy/deb/build.sh BINARY VERSION OUTDIR
#
# Writes OUTDIR/switchyard_VERSION_ARCH.deb and prints its path. DEB_COMPRESSION (xz by
# default; the test uses none) is passed to dpkg-deb -Z.
set -euo pipefail

binary=${1:?usage: build.sh BINARY VERSION OUTDIR}
version=${2:?usage: build.sh BINARY VERSION OUTDIR}
outdir=${3:?usage: build.sh BINARY VERSION OUTDIR}
compression=${DEB_COMPRESSION:-xz}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
arch=$(dpkg --print-architecture)

[ -x "$binary" ] || { echo "build.sh: $binary is not an executable" >&2; exit 1; }
mkdir -p "$outdir"
root=$(mktemp -d "${TMPDIR:-/tmp}/switchyard-deb.XXXXXX")
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"

# Files as the package installs them. Owners are root in the archive (--root-owner-group);
# postinst gives /etc/switchyard and the state and log directories to the switchyard user,
# which does not exist before it runs.
install -D -m 0755 "$binary" "$root/usr/bin/switchyard"
# Without DWARF (most of a debug build's size), with the symbol table: a panic's backtrace
# still names functions.
strip --strip-debug "$root/usr/bin/switchyard"
install -D -m 0755 "$repo/deploy/upgrade.sh" "$root/usr/lib/switchyard/upgrade.sh"
install -D -m 0644 "$repo/deploy/switchyard.service" "$root/lib/systemd/system/switchyard.service"
install -D -m 0644 "$repo/examples/switchyard.yaml" "$root/etc/switchyard/switchyard.yaml"
install -D -m 0644 "$here/logrotate" "$root/etc/logrotate.d/switchyard"
install -D -m 0644 "$repo/deploy/prometheus/prometheus.yml" "$root/usr/share/switchyard/prometheus/prometheus.yml"
install -D -m 0644 "$repo/deploy/prometheus/switchyard.rules.yml" "$root/usr/share/switchyard/prometheus/switchyard.rules.yml"
install -D -m 0644 "$repo/deploy/grafana/switchyard.json" "$root/usr/share/switchyard/grafana/switchyard.json"
install -D -m 0644 "$repo/docs/operations.md" "$root/usr/share/doc/switchyard/operations.md"
install -D -m 0644 "$here/copyright" "$root/usr/share/doc/switchyard/copyright"
# The man page and shell completions, made by the binary itself (`switchyard man`,
# `switchyard completions SHELL`), so they always match its commands.
mkdir -p "$root/usr/share/man/man1"
"$binary" man | gzip -9n >"$root/usr/share/man/man1/switchyard.1.gz"
chmod 0644 "$root/usr/share/man/man1/switchyard.1.gz"
install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
    "$root/usr/share/fish/vendor_completions.d"
"$binary" completions bash >"$root/usr/share/bash-completion/completions/switchyard"
"$binary" completions zsh >"$root/usr/share/zsh/vendor-completions/_switchyard"
"$binary" completions fish >"$root/usr/share/fish/vendor_completions.d/switchyard.fish"
chmod 0644 "$root/usr/share/bash-completion/completions/switchyard" \
    "$root/usr/share/zsh/vendor-completions/_switchyard" \
    "$root/usr/share/fish/vendor_completions.d/switchyard.fish"
printf 'switchyard (%s) unstable; urgency=medium\n\n  * Built from the Switchyard repository (deploy/deb/build.sh).\n\n -- Switchyard maintainers <switchyard@example.com>  %s\n' \
    "$version" "$(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}")" \
    | gzip -9n >"$root/usr/share/doc/switchyard/changelog.gz"
chmod 0644 "$root/usr/share/doc/switchyard/changelog.gz"

# The newest glibc symbol version the binary needs is the libc6 it depends on (what
# dpkg-shlibdeps would find, without a debian/ source tree); libgcc_s for unwinding.
glibc=$(objdump -T "$binary" 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1 || true)
# adduser for postinst (deb-systemd-helper is in the essential init-system-helpers); the
# system roots are loaded at start.
depends="libc6 (>= ${glibc:-2.34}), libgcc-s1, adduser, ca-certificates"
installed_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)

mkdir -p "$root/DEBIAN"
cat >"$root/DEBIAN/control" <<CONTROL
Package: switchyard
Version: $version
Architecture: $arch
Maintainer: Switchyard maintainers <switchyard@example.com>
Installed-Size: $installed_kb
Depends: $depends
Recommends: logrotate
Section: net
Priority: optional
Description: L7 load balancer for zero-downtime deploys
 Switchyard is an HTTP load balancer built on Cloudflare's Pingora for
 blue-green, canary, rolling and A/B traffic shifts without a failed request:
 runtime splits and drains through an admin API, automated rollouts with
 analysis and rollback, health checks, TLS with SNI and HTTP/2, Prometheus
 metrics, and binary upgrades that hand the listening sockets over
 (systemctl reload switchyard).
CONTROL
printf '/etc/switchyard/switchyard.yaml\n/etc/logrotate.d/switchyard\n' >"$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$here/$script" "$root/DEBIAN/$script"
done

deb="$outdir/switchyard_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Z"$compression" --build "$root" "$deb" >/dev/null
echo "$deb"
