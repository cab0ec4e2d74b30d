#!/usr/bin/env bash
# Store requests an idle export costs: what an open export the clients have stopped using
# asks of the object store per day (on S3 each PUT and LIST is billed, busy or idle).
#
# Usage: tools/bench/idle.sh [NBDS3D_BINARY...]   (default: target/release/nbds3d)
#   IDLE_WARMUP   seconds between the last write and the start of counting (default 330:
#                 past GC's default 5 min retention window, as an export idle for good is)
#   IDLE_SECONDS  seconds counted (default 300)
#   IDLE_ARGS     extra nbds3d flags, the same for every binary
#
# Each binary serves a fresh file store (same object layout as S3: one file per object)
# on its own port, all at once; a client writes 8 MiB and disconnects. Then `strace`
# counts the daemon's store operations: a PUT is a rename (Overwrite) or link (IfAbsent)
# into place, a LIST a directory read, a GET an open of an object, a DELETE an unlink.
# Prints one table row per binary: counts in the window and per day.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BINS=("$@")
if [[ ${#BINS[@]} -eq 0 ]]; then
    BINS=("${CARGO_TARGET_DIR:-target}/release/nbds3d")
fi
WARMUP=${IDLE_WARMUP:-330}
SECONDS_COUNTED=${IDLE_SECONDS:-300}
read -r -a EXTRA <<<"${IDLE_ARGS:-}"
for t in strace qemu-io; do
    command -v "$t" >/dev/null || { echo "idle.sh: needs $t" >&2; exit 1; }
done
OUT=$(mktemp -d /tmp/nbds3-idle.XXXXXX)
cleanup() {
    for f in "$OUT"/*/pid; do
        [[ -f "$f" ]] && kill -INT "$(cat "$f")" 2>/dev/null || true
    done
}
trap cleanup EXIT

run_one() {
    local i=$1 bin=$2 port=$((10950 + $1)) dir="$OUT/$1"
    mkdir -p "$dir"
    "$bin" --store "file://$dir/data" --listen "127.0.0.1:$port" "${EXTRA[@]}" \
        >"$dir/daemon.log" 2>&1 &
    local pid=$!
    echo "$pid" >"$dir/pid"
    for _ in $(seq 100); do
        grep -q "listening" "$dir/daemon.log" 2>/dev/null && break
        sleep 0.1
    done
    qemu-io -f raw -t writeback -c "write -P 7 0 4M" -c "write -P 8 4M 4M" -c flush \
        "nbd://127.0.0.1:$port/vm1" >/dev/null
    sleep "$WARMUP"
    timeout "$SECONDS_COUNTED" strace -f -qq -p "$pid" \
        -e trace=openat,rename,renameat,renameat2,link,linkat,unlink,unlinkat \
        -o "$dir/strace" 2>/dev/null || true
}

# All binaries idle side by side; each subshell ends when its counting window does.
RUNNERS=()
for i in "${!BINS[@]}"; do
    run_one "$i" "${BINS[$i]}" &
    RUNNERS+=($!)
done
wait "${RUNNERS[@]}"

echo
echo "Idle export, ${SECONDS_COUNTED} s counted after ${WARMUP} s idle; flags: ${IDLE_ARGS:-(defaults)}"
echo
echo "| binary | PUT (lease) | PUT (other) | LIST | GET | DELETE | PUT+LIST per day |"
echo "|---|---|---|---|---|---|---|"
for i in "${!BINS[@]}"; do
    f="$OUT/$i/strace"
    [[ -f "$f" ]] || { echo "| ${BINS[$i]} | no trace |"; continue; }
    data="$OUT/$i/data"
    awk -v data="$data" -v secs="$SECONDS_COUNTED" -v bin="${BINS[$i]}" '
        index($0, data) == 0 { next }
        # A LIST of a prefix with nothing under it (ENOENT here) is still a request.
        /openat\(/ && /O_DIRECTORY/ { list++; next }
        / = -1 / { next }
        /rename|link\(|linkat\(/ && !/unlink/ {
            if ($0 ~ /\/lease"/) lease++; else put++; next }
        /unlink/ { if ($0 !~ /nbds3-tmp/) del++; next }
        /openat\(/ && /O_RDONLY/ && !/nbds3-tmp/ {
            if ($0 ~ /\/(manifest|segment|checkpoint)\/[0-9]+"/ || $0 ~ /\/lease"/) get++
        }
        END {
            day = (lease + put + list) * 86400 / secs
            printf "| %s | %d | %d | %d | %d | %d | %.0f |\n", bin, lease, put, list, get, del, day
        }' "$f"
done
echo
echo "raw traces and daemon logs: $OUT"
