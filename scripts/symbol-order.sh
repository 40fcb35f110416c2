#!/usr/bin/env bash
# Regenerates crates/edge/symbol-order.txt: the functions verged, verge-agent
# and verge-hub run from start to idle, listed so the linker places them
# together in verge-edge's text (BENCHMARKS.md, "Runtime footprint").
#
#   scripts/symbol-order.sh
#
# Why: the kernel maps code in 64 KiB blocks around each first touch, so a
# start-up that touches a few thousand scattered functions keeps nearly all
# of a 12 MB text segment resident. Packed together, the same functions fill
# a few MB.
#
# How: runs the quickstart (`verge quickstart --until-messages 30`) with the three
# daemons under Valgrind's callgrind, which records every function executed,
# and writes the ones from verge-edge, busiest process set first. Names are
# the mangled symbols of this toolchain and Cargo.lock; after either changes,
# rerun this (stale names are skipped by the linker, which only costs memory).
# Needs valgrind, python3 and 127.0.0.1:8883 free. Takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

# The order file changes where functions are placed, not their names, so
# the current build (ordered or not) is profiled as it is.
cargo build --release --quiet -p verge-cli -p verge-cloud -p verge-edge \
    -p verge-simulated-temperature-sensor -p verge-filter-module

work=target/symbol-order
rm -rf "$work"
mkdir -p "$work/bin" "$work/callgrind"
real="$PWD/target/release"
for b in verge verge-cloud verge-simulated-temperature-sensor verge-filter-module; do
    ln -s "$real/$b" "$work/bin/$b"
done
# The quickstart links verged, verge-agent and verge-hub to this wrapper; it
# starts the real multi-call binary under callgrind with the daemon's name.
cat >"$work/bin/verge-edge" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --demangle=no --compress-strings=no --compress-pos=no \\
    --dump-instr=no --callgrind-out-file="$PWD/$work/callgrind/\$(basename "\$0").%p" \\
    -q "$real/verge-edge" "\$(basename "\$0")" "\$@"
EOF
chmod +x "$work/bin/verge-edge"

echo "running the quickstart under callgrind (slow) …"
"$real/verge" quickstart --until-messages 30 --bin-dir "$PWD/$work/bin" --dir "$PWD/$work/quickstart" \
    --timeout 300s >"$work/quickstart.txt" 2>"$work/quickstart.log" || {
    echo "quickstart failed; see $work/quickstart.log" >&2
    exit 1
}

python3 - "$work/callgrind" crates/edge/symbol-order.txt <<'PY'
import os, sys
src, out = sys.argv[1], sys.argv[2]
# symbol -> set of daemons that ran it
seen = {}
for name in sorted(os.listdir(src)):
    daemon = name.split(".")[0]
    ob = None
    with open(os.path.join(src, name), errors="replace") as f:
        for line in f:
            if line.startswith("ob="):
                ob = line[3:].strip()
            elif line.startswith("fn=") and ob and ob.endswith("/verge-edge"):
                # callgrind marks recursion levels as name'2, name'3, ...
                sym = line[3:].strip().split("'")[0]
                seen.setdefault(sym, set()).add(daemon)
order = {"verged": 0, "verge-agent": 1, "verge-hub": 2}
# Functions every daemon runs first, then shared pairs, then each daemon's own:
# each process's working set stays contiguous.
def key(item):
    sym, who = item
    return (-len(who), sorted(order.get(w, 9) for w in who), sym)
syms = [s for s, _ in sorted(seen.items(), key=key) if s and not s.startswith(("0x", "("))]
with open(out, "w") as f:
    for s in syms:
        f.write(s + "\n")
print(f"{len(syms)} functions from {len(os.listdir(src))} processes -> {out}")
PY
