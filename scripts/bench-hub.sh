#!/usr/bin/env bash
# Edge hub benchmark: routed module→module QoS 1 throughput and p50/p99 latency
# of verge-hub (TLS, fsync'd store) against Mosquitto (TLS and plain TCP) with
# the same load generator in the same run, idle RSS of verge-hub, and
# cross-checks with mosquitto_pub/mosquitto_sub and mqttwrk.
#
#   ./scripts/bench-hub.sh                 # full run, ≈ 4–5 min after the build
#   ./scripts/bench-hub.sh --rounds 1      # extra arguments go to hub-bench (--help)
#
# Binds and dials 127.0.0.1 only; every run is bounded in count and time.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v /usr/sbin/mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "installing ${need_apt[*]} (apt-get)" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# mqttwrk (crates.io) is only a cross-check against Mosquitto: it has no
# username/password/client-id/topic options, so it cannot drive verge-hub.
MQTTWRK="target/tools/bin/mqttwrk"
if [ ! -x "$MQTTWRK" ] && [ "${BENCH_HUB_NO_MQTTWRK:-0}" != 1 ]; then
    echo "installing mqttwrk into target/tools (≈ 1–2 min, once)" >&2
    cargo install --locked --quiet --root target/tools mqttwrk || echo "mqttwrk install failed; its cross-check is skipped" >&2
fi

cargo build --release -p verge-hub -p verge-bench-hub
exec target/release/hub-bench --hub-bin target/release/verge-hub --mqttwrk "$MQTTWRK" "$@"
