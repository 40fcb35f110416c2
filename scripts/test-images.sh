#!/usr/bin/env bash
# Builds the Docker images the tests run. No registry can be reached, so
# images are made locally: `verge-test/busybox:1` is FROM scratch plus the
# statically linked busybox from Debian's busybox-static package.
set -euo pipefail
image=verge-test/busybox:1
if ! docker info >/dev/null 2>&1; then
  echo "Docker is not reachable; set VERGE_SKIP_DOCKER_TESTS=1 to run without Docker tests" >&2
  exit 1
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
