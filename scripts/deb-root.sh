#!/usr/bin/env bash
# Makes a minimal Debian root for the package test (crates/cli/tests/package.rs):
#   scripts/deb-root.sh [DIR]   (default target/deb-root; kept for later runs)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-target/deb-root}
if [ -x "$dir/usr/bin/dpkg" ] && [ -x "$dir/usr/bin/systemd-analyze" ]; then
  exit 0
fi
# debootstrap changes directory, so it needs an absolute path whose parent
# exists (on a fresh clone target/ does not yet).
mkdir -p "$(dirname "$dir")"
dir=$(realpath -m "$dir")
rm -rf "$dir.partial"
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
debootstrap --variant=minbase --include=systemd "$suite" "$dir.partial" http://deb.debian.org/debian >/dev/null
mv "$dir.partial" "$dir"
