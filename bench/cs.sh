#!/usr/bin/env bash
# Customer-service routing under load (issue 5): conversation open → Offered latency at a paced
# rate of new conversations while the ordinary pub/sub load flows, against the real engine.
#   bench/cs.sh            cs-only, pubsub-only, combined: 2000 conversations/s, 50k pub/s (~40 s)
#   bench/cs.sh --quick    smoke check (~15 s)
# Other flags go to the `csload` binary (see `--help`). Results land in bench/out/cs-*/.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p switchboard-bench --bins
cargo build --release -p switchboard --bin switchboard
exec "$target/release/csload" "$@"
