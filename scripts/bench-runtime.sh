#!/usr/bin/env bash
# Runtime footprint of Verge (BENCHMARKS.md, "Runtime footprint"): cold start
# (verged start → first message from the sensor in the cloud) and idle RSS of
# verged + verge-agent + verge-hub, measured by `verge quickstart --measure`
# on loopback with release binaries.
#
#   scripts/bench-runtime.sh [runs]      (default 3 quickstart runs)
#
# Needs 127.0.0.1:8883 free (the edge hub listens there). Writes each run's
# numbers to target/bench-runtime/run-N.json and prints them.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
cargo build --release --quiet -p verge-cli -p verge-cloud -p verge-edge \
    -p verge-simulated-temperature-sensor -p verge-filter-module
out=target/bench-runtime
mkdir -p "$out"
# verge-edge is linked with its start-up functions packed together
# (crates/edge/symbol-order.txt); names drift when Cargo.lock or the toolchain
# changes, and then the resident set grows back: say how many still match.
if command -v nm >/dev/null; then
    listed=$(wc -l <crates/edge/symbol-order.txt)
    present=$(nm target/release/verge-edge | awk 'NR==FNR{want[$1]=1; next} ($NF in want){n++} END{print n+0}' \
        crates/edge/symbol-order.txt -)
    echo "symbol order: $present of $listed listed functions are in verge-edge (rerun scripts/symbol-order.sh if far fewer)"
fi
echo "machine: $(nproc) CPUs, $(uname -sr), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
for i in $(seq 1 "$runs"); do
    dir="$out/quickstart"
    target/release/verge quickstart --measure --dir "$dir" --timeout 120s >"$out/run-$i.txt" 2>"$out/run-$i.log"
    cp "$dir/measure.json" "$out/run-$i.json"
    echo "run $i:"
    grep -E '^(cold start|idle RSS|  of the runtime|  the runtime)' "$out/run-$i.txt" | sed 's/^/  /'
done
