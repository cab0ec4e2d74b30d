#!/usr/bin/env bash
# Instructions the daemon executes per 4 KiB random write, counted by callgrind: an A/B
# measure that repeats within ~2%, where wall-clock runs of tools/bench/run.sh on a shared
# 2-core machine vary by ±10% with the same binary. Instructions are not time (the write
# path's flush is bound by cache misses, which this does not count): use it to see whether
# a change removes work, and run.sh to see what that is worth.
#
#   tools/bench/instr.sh                               # the release build of this checkout
#   tools/bench/instr.sh /path/to/nbds3d-a /path/to/nbds3d-b   # one row per binary
#
# Per binary: nbds3d runs under `valgrind --tool=callgrind` on a fresh file:// store with a
# 256 MiB export; fio's nbd engine writes random 4 KiB blocks at iodepth 32 (fixed seed),
# once 20 MiB and once 60 MiB, each in its own daemon run, which then gets SIGINT (one
# flush of everything written, exit). No timed flush and no compactor run, so the work
# does not depend on timing; zstd's attempts are subtracted (see below). Instructions per
# write = (Ir(60 MiB) - Ir(20 MiB)) / 10240 writes: startup, the handshake and shutdown
# cancel out; the flush of the 40 MiB difference is included. Needs valgrind (apt install
# valgrind), fio, nbdinfo.
# Knobs: NBDS3_BENCH_OUT (callgrind outputs and logs; default a new temp dir, kept; feed
# them to callgrind_annotate for the functions).
set -euo pipefail

source "$(dirname "$0")/common.sh"
bench_require instr "apt install valgrind fio libnbd-bin" valgrind fio nbdinfo
if [[ $# -eq 0 ]]; then
    bin=$(bench_build) # an assignment, so a failed build stops the script (set -e)
    set -- "$bin"
fi
OUT=${NBDS3_BENCH_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/nbds3-instr.XXXXXX")}
mkdir -p "$OUT"
PORT=10931
STORE=""
cleanup() { [[ -n $STORE ]] && rm -rf "$STORE"; }
trap cleanup EXIT

# Instructions of one daemon run that takes $2 MiB of random writes.
run() {
    local bin=$1 mib=$2 tag=$3 pid ir
    STORE=$(bench_scratch instr-store)
    valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.$tag.$mib.out" \
        "$bin" --listen "127.0.0.1:$PORT" --store "file://$STORE" --default-size 256M \
        --cache-size 320M --dirty-max 256M --flush-interval 3600s --no-compactor \
        >"$OUT/daemon.$tag.$mib.log" 2>&1 &
    pid=$!
    for _ in $(seq 120); do
        nbdinfo "nbd://127.0.0.1:$PORT/x" >/dev/null 2>&1 && break
        sleep 0.5
    done
    kill -0 "$pid" 2>/dev/null || {
        echo "instr: nbds3d did not start, see $OUT/daemon.$tag.$mib.log" >&2
        exit 1
    }
    fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/x" --rw=randwrite --bs=4k \
        --iodepth=32 --size=256M --io_size="${mib}M" --randrepeat=1 --randseed=7 \
        --output-format=terse >/dev/null 2>&1
    kill -INT "$pid"
    wait "$pid" || true
    rm -rf "$STORE"
    STORE=""
    ir=$(sed -n 's/.*I *refs: *//p' "$OUT/daemon.$tag.$mib.log" | tr -d ,)
    [[ -n $ir ]] || {
        echo "instr: no instruction count in $OUT/daemon.$tag.$mib.log" >&2
        exit 1
    }
    # Compression attempts are left out: how many frames are tried depends on which of
    # the parallel segment builders gets which blocks (each skips adaptively), so their
    # count varies from run to run (±20M instructions here) while nothing else does.
    zstd=$(callgrind_annotate --inclusive=yes "$OUT/callgrind.$tag.$mib.out" 2>/dev/null |
        awk '/SegmentBuilder::try_compress/ { gsub(",", "", $1); print $1; exit }')
    echo "$((ir - ${zstd:-0}))"
}

echo "Machine: $(uname -srm); $(valgrind --version); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "Command: tools/bench/instr.sh $*"
echo
echo "| binary | instructions, 20 MiB run | 60 MiB run | per 4 KiB write |"
echo "|---|---|---|---|"
n=0
for bin in "$@"; do
    n=$((n + 1))
    a=$(run "$bin" 20 "$n")
    b=$(run "$bin" 60 "$n")
    echo "| $bin | $a | $b | $(((b - a) / 10240)) |"
done
echo
echo "(callgrind outputs in $OUT)"
