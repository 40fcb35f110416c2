#!/usr/bin/env bash
# Builds the Debian package verge_<version>_<arch>.deb (packaging/README.md).
#   scripts/package-deb.sh [--bin-dir DIR] [--out DIR] [--fast]
# --fast: no compression (tests package debug builds).
# Without --bin-dir, builds verge-edge and the CLI with the release profile.
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir="" out="target/deb" compress=(-Zxz)
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --fast) compress=(-Znone); shift ;;
    *) echo "usage: $0 [--bin-dir DIR] [--out DIR] [--fast]" >&2; exit 2 ;;
  esac
done
if [ -z "$bin_dir" ]; then
  cargo build --release -p verge-edge -p verge-cli
  bin_dir=target/release
fi
for b in verge-edge verge; do
  [ -x "$bin_dir/$b" ] || { echo "$bin_dir/$b is missing" >&2; exit 1; }
done
version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' Cargo.toml)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
install -d -m 0755 "$stage/DEBIAN" "$stage/usr/libexec/verge" "$stage/usr/bin" \
  "$stage/lib/systemd/system" "$stage/etc/verge" "$stage/usr/share/doc/verge"
install -m 0755 "$bin_dir/verge-edge" "$stage/usr/libexec/verge/verge-edge"
for link in verged verge-agent verge-hub; do
  ln -s verge-edge "$stage/usr/libexec/verge/$link"
done
install -m 0755 "$bin_dir/verge" "$stage/usr/bin/verge"
install -m 0644 packaging/systemd/verged.service "$stage/lib/systemd/system/verged.service"
install -m 0644 packaging/config.toml.template "$stage/etc/verge/config.toml.template"
install -m 0644 packaging/README.md "$stage/usr/share/doc/verge/README.md"
install -m 0644 packaging/deb/conffiles "$stage/DEBIAN/conffiles"
for s in postinst prerm postrm; do
  install -m 0755 "packaging/deb/$s" "$stage/DEBIAN/$s"
done
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
  packaging/deb/control.in > "$stage/DEBIAN/control"
mkdir -p "$out"
deb="$out/verge_${version}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$stage" "$deb" >/dev/null
echo "$deb"
