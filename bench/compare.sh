#!/usr/bin/env bash
# Side-by-side comparison of switchboard, nats-server and redis-server on loopback.
#   bench/compare.sh            full matrix (3 repetitions, ~10 min)
#   bench/compare.sh --quick    smoke check (< 2 min)
# Other flags go to the `compare` binary (see `--help`). Missing nats-server / redis-server are
# installed with apt-get; every server started is stopped by PID; results land in bench/out/.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p switchboard-bench --bins
# The engine is compared when it builds; otherwise compare says it skipped it.
if ! cargo build --release -p switchboard --bin switchboard; then
    echo "compare.sh: switchboard did not build; it will be skipped" >&2
fi
exec "$target/release/compare" "$@"
