#!/usr/bin/env bash
# Upstream drain benchmark: a 1,000,000-message `$upstream` backlog in
# verge-hub's store drains into verge-cloud (both in-process, TLS on
# loopback); reports drain rate and link-up → first delivered message.
#
#   ./scripts/bench-upstream.sh                          # defaults (1 M msgs, 4 senders, batch_size 100)
#   ./scripts/bench-upstream.sh --batch-size 1000        # extra arguments go to upstream-bench (--help)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p verge-bench-upstream
exec target/release/upstream-bench "$@"
