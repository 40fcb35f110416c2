#!/usr/bin/env bash
# Runs Verge's whole test suite on a fresh machine: installs what the tests
# need (system packages, the Python venv with the official Azure IoT SDK),
# then runs every crate's unit, integration and interoperability tests.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }

# System packages the tests use: busybox-static for locally built Docker test
# images (nothing can be pulled), python3-venv for the SDK interop tests.
need=()
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# debootstrap: a Debian root the package test installs the .deb into.
if [ "${VERGE_SKIP_PACKAGE_TESTS:-0}" != 1 ]; then
  command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
fi
# prometheus: a real server scrapes the hub's and the agent's :9600/metrics
# (VERGE_SKIP_PROMETHEUS_TESTS=1 skips those tests).
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
# The upstream proxy tests (crates/hub/tests/upstream_proxy.rs) start a real HTTP proxy.
command -v tinyproxy >/dev/null 2>&1 || need+=(tinyproxy)
# Apache Qpid Proton (for /usr/bin/python3): an AMQP 1.0 client for the hub's AMQP endpoint.
/usr/bin/python3 -c 'import proton' >/dev/null 2>&1 || need+=(python3-qpid-proton)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing packages: ${need[*]} (run: sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
fi

# The official Azure IoT device SDK, a client nobody here wrote.
# The official service SDK drives verge-cloud's service API; azure-iot-hub
# 2.7.0 imports `six` without declaring it.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import azure.iot.device, azure.iot.hub' >/dev/null 2>&1; then
  log "creating .venv with azure-iot-device and azure-iot-hub"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check azure-iot-device==2.14.0 azure-iot-hub==2.7.0 six
fi
# Microsoft's uamqp (CBS over SASL MSSBCBS) for the hub's AMQP endpoint tests.
.venv/bin/python -c 'import uamqp' >/dev/null 2>&1 \
  || .venv/bin/pip install -q --disable-pip-version-check uamqp==1.6.11
export VERGE_PYTHON="$PWD/.venv/bin/python"

# Test images: nothing can be pulled, so Docker tests run images built here.
if [ "${VERGE_SKIP_DOCKER_TESTS:-0}" != 1 ]; then
  ./scripts/test-images.sh
fi

# The Debian root for the package test (crates/cli/tests/package.rs), kept
# in target/ between runs.
if [ "${VERGE_SKIP_PACKAGE_TESTS:-0}" != 1 ]; then
  log "preparing a Debian root for the package test (debootstrap)"
  ./scripts/deb-root.sh
fi

# Crate edges (ARCHITECTURE: only verge-runtime talks to Docker, and only the
# daemon, the agent and the CLI use it): the SDK, the hub and the workload
# API crate must not pull in bollard. Dev-dependencies are left out: the
# hub's edge-environment tests run verged in-process.
log "checking crate edges"
for pkg in verge-workload verge-sdk verge-hub; do
  if cargo tree -q -p "$pkg" -e no-dev --prefix none | grep -q '^bollard '; then
    echo "$pkg depends on bollard (Docker); only verge-runtime may" >&2
    cargo tree -q -p "$pkg" -e no-dev -i bollard >&2 || true
    exit 1
  fi
done
# The CLI reaches Docker only through verge-runtime (no direct bollard edge).
if cargo tree -q -p verge-cli -e normal --depth 1 --prefix none | grep -q '^bollard '; then
  echo "verge-cli depends on bollard directly; go through verge-runtime" >&2
  exit 1
fi

log "cargo test --workspace"
cargo test --workspace --all-targets --no-fail-fast "$@"
cargo test --workspace --doc
