#!/usr/bin/env bash
# Flush-cost benchmark: PUTs and bytes each 4 KiB flush writes at 1K / 100K / 1M mapped
# blocks (worst and average over 1,000 flushes), flush latency, and the background
# checkpoints written meanwhile (examples/flush_cost.rs).
#
#   tools/bench/flush-cost.sh            # full run (about a minute on 2 cores)
#   tools/bench/flush-cost.sh --quick    # 1K and 100K only
#
# Prints machine info, the exact command and the result tables as Markdown, ready for the
# "Flush cost" section of tools/bench/RESULTS.md.
set -euo pipefail

cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

cargo build --release --example flush_cost >&2

echo "Machine: $(uname -srm); $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)," \
    "$(nproc) CPUs, $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB RAM"}')"
echo "Toolchain: $(rustc --version); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "Command: cargo run --release --example flush_cost${*:+ -- $*}   (via tools/bench/flush-cost.sh)"
echo
start=$(date +%s)
"$CARGO_TARGET_DIR/release/examples/flush_cost" "$@"
echo
echo "Wall time: $(( $(date +%s) - start )) s"
