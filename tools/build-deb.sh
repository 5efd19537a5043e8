#!/usr/bin/env bash
# Builds the Debian package of Pitcher with dpkg-deb:
#
#   tools/build-deb.sh                      # cargo build --release, then target/debian/pitcher_<version>_<arch>.deb
#   tools/build-deb.sh --out DIR            # the .deb in DIR
#   tools/build-deb.sh --version 0.1.0-2    # another package version (default: the top of packaging/debian/changelog)
#   tools/build-deb.sh --bin-dir DIR        # package DIR/pitcher and DIR/pitcher-records as they are (no cargo build)
#   tools/build-deb.sh --no-strip           # keep the debug information of the binaries
#   tools/build-deb.sh --fast               # gzip -1 instead of xz (seconds instead of a minute; tests)
#
# Needs dpkg-dev (dpkg-shlibdeps, dpkg-gencontrol); not root, not fakeroot
# (`dpkg-deb --root-owner-group`), not debhelper. Prints the path of the
# .deb on its last line. The contents are in packaging/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
top=$PWD

out=$top/target/debian
version=
bin_dir=
strip=1
compress=(-Zxz)
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --version) version=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --no-strip) strip=0; shift ;;
        --fast) compress=(-Zgzip -z1); shift ;;
        -h | --help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "build-deb.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
for tool in dpkg-deb dpkg-shlibdeps dpkg-gencontrol; do
    command -v "$tool" >/dev/null || { echo "build-deb.sh: $tool is missing (apt-get install dpkg-dev)" >&2; exit 1; }
done

if [ -z "$bin_dir" ]; then
    cargo build --release --locked --bins
    bin_dir=$top/target/release
fi
version=${version:-$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)}
arch=$(dpkg --print-architecture)

stage=$(mktemp -d "${TMPDIR:-/tmp}/pitcher-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/debian/pitcher
mkdir -p "$root/DEBIAN"
cp packaging/debian/control packaging/debian/changelog "$stage/debian/"

# Files. Everything under etc/ is a conffile (DEBIAN/conffiles below).
install -D -m 0755 "$bin_dir/pitcher" "$root/usr/sbin/pitcher"
install -D -m 0755 "$bin_dir/pitcher-records" "$root/usr/bin/pitcher-records"
if [ "$strip" = 1 ]; then
    strip --strip-debug "$root/usr/sbin/pitcher" "$root/usr/bin/pitcher-records"
fi
# The annotated example, with what a packaged service needs: a detached
# master has no stderr (log to a file, rotated by logrotate), and the
# workers run as the package's unprivileged user.
install -D -m 0644 conf/pitcher.toml "$root/etc/pitcher/pitcher.toml"
sed -i -e 's#^error_log = "stderr"#error_log = "/var/log/pitcher/error.log"#' \
    -e 's/^# user = "www-data"/user = "pitcher"/' -e 's/^# group = "www-data"/group = "pitcher"/' \
    "$root/etc/pitcher/pitcher.toml"
for want in '^error_log = "/var/log/pitcher/error.log"' '^user = "pitcher"' '^group = "pitcher"'; do
    grep -q "$want" "$root/etc/pitcher/pitcher.toml" || { echo "build-deb.sh: conf/pitcher.toml changed: no $want" >&2; exit 1; }
done
install -d -m 0755 "$root/etc/pitcher/conf.d"
install -D -m 0755 packaging/pitcher.init "$root/etc/init.d/pitcher"
install -D -m 0644 packaging/pitcher.logrotate "$root/etc/logrotate.d/pitcher"
install -D -m 0644 packaging/pitcher.service "$root/lib/systemd/system/pitcher.service"
install -d -m 0750 "$root/var/log/pitcher"
install -d -m 0755 "$root/usr/share/man/man8" "$root/usr/share/doc/pitcher"
gzip -9n <packaging/pitcher.8 >"$root/usr/share/man/man8/pitcher.8.gz"
gzip -9n <docs/OPERATIONS.md >"$root/usr/share/doc/pitcher/OPERATIONS.md.gz"
gzip -9n <packaging/debian/changelog >"$root/usr/share/doc/pitcher/changelog.Debian.gz"
install -m 0644 packaging/debian/copyright "$root/usr/share/doc/pitcher/copyright"

# Maintainer scripts and metadata.
for s in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$s" "$root/DEBIAN/$s"
done
(cd "$root" && find etc -type f | sort | sed 's#^#/#') >"$root/DEBIAN/conffiles"
(cd "$stage" && dpkg-shlibdeps -Tdebian/pitcher.substvars debian/pitcher/usr/sbin/pitcher debian/pitcher/usr/bin/pitcher-records)
(cd "$stage" && dpkg-gencontrol -ppitcher -v"$version" -Tdebian/pitcher.substvars -Pdebian/pitcher)
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum >DEBIAN/md5sums)

mkdir -p "$out"
deb=$out/pitcher_${version}_${arch}.deb
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >/dev/null
echo "$deb"
