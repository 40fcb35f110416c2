#!/usr/bin/env bash
# Builds the Docker images the tests run. No registry can be reached, so
# images are made locally: `verge-test/busybox:1` is FROM scratch plus the
# statically linked busybox from Debian's busybox-static package.
#
# It also installs what the registry tests need (crates/agent/tests/
# docker_registry.rs): Debian's `docker-registry` (the CNCF distribution
# registry, run by the tests on 127.0.0.1 with htpasswd auth) and
# `apache2-utils` (`htpasswd -B` writes the bcrypt entries it requires).
set -euo pipefail
image=verge-test/busybox:1
if ! docker info >/dev/null 2>&1; then
  echo "Docker is not reachable; set VERGE_SKIP_DOCKER_TESTS=1 to run without Docker tests" >&2
  exit 1
fi
need=()
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || need+=(apache2-utils)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "==> installing ${need[*]}"
    apt-get update -qq
    # policy-rc.d 101: the package must not start its own registry service on
    # :5000; the tests start their own on free loopback ports.
    prc=/usr/sbin/policy-rc.d
    if [ -e "$prc" ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
      (
        trap 'rm -f "$prc"' EXIT
        printf '#!/bin/sh\nexit 101\n' > "$prc"
        chmod +x "$prc"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
      )
    fi
  else
    echo "missing packages: ${need[*]} (run: sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
fi
if docker image inspect "$image" >/dev/null 2>&1; then
  exit 0
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cp /bin/busybox "$dir/busybox"
cat > "$dir/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/bin
CMD ["sh"]
DOCKERFILE
docker build -q -t "$image" "$dir" >/dev/null
echo "==> built $image"
