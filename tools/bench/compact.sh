#!/usr/bin/env bash
# Compaction space benchmark (examples/compact_bench.rs): fill a 1 GiB export, overwrite it
# randomly three times over with a flush every 64 MiB, compact + collect, and print stored
# bytes before/after, live compressed bytes, their ratio, compaction write amplification,
# requests and time, one row per dead-fraction threshold.
#
#   tools/bench/compact.sh                         # file store in a temp dir, 1 GiB
#   tools/bench/compact.sh --size 256M --thresholds 0.5
#   NBDS3_BENCH_STORE=s3://bucket/prefix NBDS3_S3_ENDPOINT=http://127.0.0.1:8333 \
#       NBDS3_S3_PATH_STYLE=1 tools/bench/compact.sh --size 256M
#
# Prints machine info, the exact command and the table as Markdown, ready for the
# "Compaction" section of tools/bench/RESULTS.md.
set -euo pipefail

cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

cargo build --release --example compact_bench >&2

args=("$@")
if [[ -n "${NBDS3_BENCH_STORE:-}" ]]; then
    args+=(--store "$NBDS3_BENCH_STORE")
fi

echo "Machine: $(uname -srm); $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)," \
    "$(nproc) CPUs, $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB RAM"}')"
echo "Toolchain: $(rustc --version); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "Command: cargo run --release --example compact_bench${args[*]:+ -- ${args[*]}}   (via tools/bench/compact.sh)"
echo
start=$(date +%s)
"$CARGO_TARGET_DIR/release/examples/compact_bench" "${args[@]}"
echo
echo "Wall time: $(( $(date +%s) - start )) s"
