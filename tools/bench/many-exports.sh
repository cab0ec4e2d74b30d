#!/usr/bin/env bash
# What exports that clients open once and leave keep costing: a client opens N distinct
# export names in a row (one 4 KiB write and a flush each, then it disconnects), and the
# daemon's resident memory, its open exports and its lease PUTs are read once they all
# sat unused for a while.
#
# Usage: tools/bench/many-exports.sh [NBDS3D_BINARY...]   (default: target/release/nbds3d)
#   MANY_N      names opened (default 200)
#   MANY_WAIT   seconds to wait after the last one (default 40)
#   MANY_COUNT  seconds at the end of the wait over which lease PUTs are counted
#               (default 30: one lease interval, so every open export refreshes once)
#   MANY_ARGS   extra nbds3d flags for every binary (e.g. "--export-idle-close 10s")
#
# Each binary gets a fresh file store. Lease PUTs are counted by strace (renames onto a
# `lease` key) over the last MANY_COUNT s of the wait. Prints one table row per binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BINS=("$@")
if [[ ${#BINS[@]} -eq 0 ]]; then
    BINS=("${CARGO_TARGET_DIR:-target}/release/nbds3d")
fi
N=${MANY_N:-200}
WAIT=${MANY_WAIT:-40}
COUNT=${MANY_COUNT:-30}
read -r -a EXTRA <<<"${MANY_ARGS:-}"
for t in strace qemu-io; do
    command -v "$t" >/dev/null || { echo "many-exports.sh: needs $t" >&2; exit 1; }
done
OUT=$(mktemp -d /tmp/nbds3-many.XXXXXX)
PID=""
trap '[[ -n "$PID" ]] && kill -INT "$PID" 2>/dev/null || true' EXIT

echo "| binary | exports opened | RSS after (MiB) | peak RSS (MiB) | lease PUTs/s after | exports closed (log) |"
echo "|---|---|---|---|---|---|"
for i in "${!BINS[@]}"; do
    bin=${BINS[$i]}
    dir="$OUT/$i"
    mkdir -p "$dir"
    port=$((10970 + i))
    "$bin" --store "file://$dir/data" --listen "127.0.0.1:$port" "${EXTRA[@]}" \
        >"$dir/daemon.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do
        grep -q "listening" "$dir/daemon.log" 2>/dev/null && break
        sleep 0.1
    done
    for n in $(seq "$N"); do
        qemu-io -f raw -t writeback -c "write -P 7 0 4k" -c flush \
            "nbd://127.0.0.1:$port/export-$n" >/dev/null
    done
    sleep $((WAIT > COUNT ? WAIT - COUNT : 0))
    timeout "$COUNT" strace -f -qq -p "$PID" -e trace=rename -o "$dir/strace" 2>/dev/null || true
    rss=$(awk '/VmRSS/ {print int($2/1024)}' "/proc/$PID/status")
    hwm=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$PID/status")
    leases=$(grep -c '/lease"' "$dir/strace" || true)
    closed=$(grep -c "closed an export no connection used" "$dir/daemon.log" || true)
    printf "| %s | %d | %d | %d | %.1f | %d |\n" "$bin" "$N" "$rss" "$hwm" \
        "$(echo "$leases / $COUNT" | bc -l)" "$closed"
    kill -INT "$PID"
    wait "$PID" || true
    PID=""
done
echo
echo "flags: ${MANY_ARGS:-(defaults)}; daemon logs: $OUT"
