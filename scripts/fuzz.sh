#!/usr/bin/env bash
# Runs every cargo-fuzz target for N seconds each (default 60).
# cargo-fuzz needs unstable compiler flags; RUSTC_BOOTSTRAP lets the stable
# toolchain accept them, so no nightly toolchain is required.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install --locked -q cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
for target in $(cargo fuzz list); do
  echo "==> fuzz $target for ${secs}s"
  mkdir -p "corpus/$target"
  seeds=(); [ -d "seeds/$target" ] && seeds=("seeds/$target")
  cargo fuzz run "$target" "corpus/$target" "${seeds[@]}" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -n 3
done
