#!/usr/bin/env bash
# Resident memory of nbds3d against its budgets, one row per configuration, as Markdown.
#
#   tools/bench/memory.sh                        # three configurations, ~4 minutes
#   NBDS3_BENCH_MEM_CONFIGS="16M:256M" NBDS3_BENCH_RUNTIME=10 tools/bench/memory.sh
#
# Per configuration (cache:dirty), on a fresh file:// store and a $SIZE export:
#   randwrite  fio nbd engine, 4 KiB random writes, iodepth 32, $RUNTIME s (tools/bench/nbd.fio):
#              scattered writes make the most index runs and churn the most buffers
#              (above 2 x --index-max, defragmenting passes run during the writes; above
#              3 x, flushes wait for them: the IOPS column shows that cost)
#   idle       $IDLE s without requests: compaction (and defragmentation of the index when it
#              is over --index-max, a quarter of the cache by default) runs; flushes end
# Columns: the resident target the daemon computes (cache + dirty + uploads + compaction +
# 64 MiB slack; printed at start), peak RSS (VmHWM), RSS at the end, the largest index any
# compaction pass saw and the index after the last pass (from the daemon log), write IOPS.
#
# Knobs: NBDS3_BENCH_MEM_CONFIGS (default "16M:256M 16M:32M 256M:256M"), NBDS3_BENCH_SIZE
# (default 1G), NBDS3_BENCH_RUNTIME (default 20), NBDS3_BENCH_IDLE (default 40),
# NBDS3_BENCH_NBDS3D (a prebuilt binary, for A/B runs), NBDS3_BENCH_OUT (logs; default a
# temp dir, kept; each configuration's store, up to ~20 GiB with the defaults, is deleted
# after its row).
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "$0")/common.sh" # bench_size_bytes; also the repository root as cwd
REPO=$PWD
CONFIGS=${NBDS3_BENCH_MEM_CONFIGS:-"16M:256M 16M:32M 256M:256M"}
SIZE=${NBDS3_BENCH_SIZE:-1G}
RUNTIME=${NBDS3_BENCH_RUNTIME:-20}
IDLE=${NBDS3_BENCH_IDLE:-40}
PORT=10941
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3

for bin in fio nbdsh; do
    command -v "$bin" >/dev/null || { echo "missing $bin (apt install fio libnbd-bin)" >&2; exit 1; }
done
if [[ -n ${NBDS3_BENCH_NBDS3D:-} ]]; then
    BIN=$NBDS3_BENCH_NBDS3D
else
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
    cargo build --release --bin nbds3d >&2
    BIN=$CARGO_TARGET_DIR/release/nbds3d
fi
OUT=${NBDS3_BENCH_OUT:-$(mktemp -d /tmp/nbds3-mem.XXXXXX)}
mkdir -p "$OUT"
SIZE_BYTES=$(bench_size_bytes "$SIZE")

echo "Machine: $(uname -srm); $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)," \
    "$(nproc) CPUs, $(free -g 2>/dev/null | awk '/^Mem:/ {print $2 " GiB RAM"}')"
echo "Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); command: tools/bench/memory.sh" \
    "(configs \"$CONFIGS\", size $SIZE, randwrite ${RUNTIME}s, idle ${IDLE}s); logs in $OUT"
echo
echo "| cache | dirty | resident target | randwrite IOPS | peak RSS | RSS at end | index runs (peak at a pass → last) | defrag passes |"
echo "|---|---|---|---|---|---|---|---|"

kib() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$2/status"; }

for cfg in $CONFIGS; do
    cache=${cfg%%:*}
    dirty=${cfg##*:}
    dir=$OUT/$cache-$dirty
    rm -rf "$dir"
    mkdir -p "$dir/store"
    # NO_COLOR: plain key=value fields in the log, for the greps below.
    NO_COLOR=1 RUST_LOG=info "$BIN" --listen "127.0.0.1:$PORT" --store "file://$dir/store" \
        --default-size "$SIZE" --cache-size "$cache" --dirty-max "$dirty" \
        --compact-interval 5s >"$dir/daemon.log" 2>&1 &
    pid=$!
    for _ in $(seq 50); do
        grep -q "nbds3d listening" "$dir/daemon.log" && break
        sleep 0.1
    done
    URI=nbd://127.0.0.1:$PORT/x RUNTIME=$RUNTIME SIZE=$SIZE_BYTES fio --section=randwrite \
        --output-format=json --output="$dir/fio.json" "$REPO/tools/bench/nbd.fio" >/dev/null
    iops=$($PY -c "import json,sys; print(round(json.load(open(sys.argv[1]))['jobs'][0]['write']['iops']))" "$dir/fio.json")
    sleep "$IDLE"
    hwm=$(kib VmHWM $pid)
    rss=$(kib VmRSS $pid)
    kill -TERM $pid
    wait $pid || true
    target=$(grep -o 'resident_target_mib=[0-9]*' "$dir/daemon.log" | head -1 | cut -d= -f2)
    passes=$(grep 'compaction pass committed' "$dir/daemon.log" || true)
    # The largest index any pass saw (passes run during the writes once the index is far
    # over its bound, so this is close to the peak).
    peak=$(grep -o 'index_runs_[a-z]*=[0-9]*' <<<"$passes" | cut -d= -f2 | sort -n | tail -1)
    last=$(grep -o 'index_runs_after=[0-9]*' <<<"$passes" | tail -1 | cut -d= -f2)
    defrags=$(grep -c 'fragments=[1-9]' <<<"$passes" || true)
    # The store holds every overwrite until GC's retention window passes (GBs): drop it.
    rm -rf "$dir/store"
    echo "| $cache | $dirty | ${target:-?} MiB | $iops | $((hwm / 1024)) MiB | $((rss / 1024)) MiB | ${peak:--} → ${last:--} | $defrags |"
done
