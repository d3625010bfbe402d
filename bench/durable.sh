#!/usr/bin/env bash
# Durable acknowledgements (issue 6): bare fdatasync vs Switchboard vs NATS JetStream.
#   bench/durable.sh                          sync + interval modes, JetStream (~3 min)
#   bench/durable.sh --quick                  short runs (~1 min)
#   bench/durable.sh --sb-durability default  an engine without --durability (acks from memory)
# Other flags go to the `durable` binary (see `--help`). Results land in bench/out/durable-*/.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
cargo build --release -p switchboard-bench --bins
if ! cargo build --release -p switchboard --bin switchboard; then
    echo "durable.sh: switchboard did not build; it will be skipped" >&2
fi
exec "$target/release/durable" "$@"
