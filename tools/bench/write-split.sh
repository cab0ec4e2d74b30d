#!/usr/bin/env bash
# Where a random 4 KiB write's CPU goes: fio's randwrite job (tools/bench/nbd.fio, 4 KiB at
# iodepth 32 over 1 GiB) against nbdkit memory and against nbds3d once with its defaults
# and once with no flush during the job (the front end alone: the dirty set holds the whole
# run). Prints IOPS, the server's user and system CPU per write (/proc, ramp included) and
# fio's own CPU per write, one row per server run.
#
#   tools/bench/write-split.sh                  # release build of this checkout, 2 rounds
#   tools/bench/write-split.sh /path/to/nbds3d  # another binary
#
# Why: the write target compares nbds3d with a RAM disk on 2 cores shared with fio, so the
# server's CPU per write decides the rate; the "no flush" row separates the cost of
# persisting (segment build, index, cache write-through, checkpoints) from the cost of
# serving. Every server starts with the 1 GiB device filled by nbdcopy (as in run.sh).
# The last column is what the block device under the store wrote during the job (all
# writers, from /sys/class/block; "-" where the store is not on a block device): next to the
# payload rate (IOPS x 4 KiB) it shows when the store's disk, not CPU, sets the pace.
# Knobs: NBDS3_BENCH_RUNTIME (s per job, default 6), NBDS3_BENCH_ROUNDS (default 2),
# NBDS3_BENCH_STORE_DIR (where nbds3d's file store goes, default the temp dir; /dev/shm takes
# the disk out of the comparison).
# Needs fio, nbdkit, nbdcopy (apt install fio nbdkit libnbd-bin).
set -euo pipefail

source "$(dirname "$0")/common.sh"
bench_require write-split "apt install fio nbdkit libnbd-bin" fio nbdkit nbdcopy
BIN=$(bench_binary "$@")
RUNTIME=${NBDS3_BENCH_RUNTIME:-6}
ROUNDS=${NBDS3_BENCH_ROUNDS:-2}
PY=/usr/bin/python3 # Debian's, not a pyenv shim
bench_workdir split
head -c 1G /dev/urandom >"$WORK/src.img"
STORE=$(bench_scratch split-store "${NBDS3_BENCH_STORE_DIR:-$WORK}")
trap 'bench_cleanup; rm -rf "$STORE"' EXIT
# The stat file of the block device holding the store (a disk or a partition), if any.
DISK_STAT="/sys/class/block/$(basename "$(df --output=source "$STORE" | tail -1)")/stat"
[[ -r $DISK_STAT ]] || DISK_STAT=""
# sectors written so far by that device ("" without one)
sectors() {
    if [[ -n $DISK_STAT ]]; then awk '{print $7}' "$DISK_STAT"; fi
}

# ticks (user, system) of a process
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }

# measure NAME URI: fill the device, run the job, print one row
measure() {
    local name=$1 uri=$2 a b
    nbdcopy "$WORK/src.img" "$uri"
    a=$(ticks "$PID")
    d0=$(sectors)
    /usr/bin/time -o "$WORK/fio.time" -f "%U %S" \
        env URI="$uri" RUNTIME="$RUNTIME" SIZE=1073741824 fio --section=randwrite \
        --output-format=json --output="$WORK/fio.json" tools/bench/nbd.fio >/dev/null
    b=$(ticks "$PID")
    d1=$(sectors)
    "$PY" - "$name" "$a" "$b" "$WORK" "$RUNTIME" "$d0" "$d1" <<'EOF'
import json, os, sys
name, a, b, work, runtime = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4], int(sys.argv[5])
d0, d1 = sys.argv[6], sys.argv[7]
w = json.load(open(os.path.join(work, "fio.json")))["jobs"][0]["write"]
n = w["iops"] * (runtime + 1)  # ramp included, as the /proc ticks are
hz = os.sysconf("SC_CLK_TCK")
u = (int(b[0]) - int(a[0])) / hz * 1e6 / n
s = (int(b[1]) - int(a[1])) / hz * 1e6 / n
fu, fs = map(float, open(os.path.join(work, "fio.time")).read().split()[-2:])
disk = f"{(int(d1) - int(d0)) * 512 / (runtime + 1) / 1e6:.0f}" if d0 and d1 else "-"
payload = w["iops"] * 4096 / 1e6
print(f"| {name} | {w['iops'] / 1000:.1f}k | {u:.2f} | {s:.2f} | {u + s:.2f} | {(fu + fs) * 1e6 / n:.2f} | {payload:.0f} | {disk} |")
EOF
}

echo "Machine: $(uname -srm); $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "Command: tools/bench/write-split.sh $BIN (runtime ${RUNTIME}s + 1 s ramp, $ROUNDS rounds; store in ${NBDS3_BENCH_STORE_DIR:-the temp dir})"
echo
echo "| server | IOPS | user µs/write | sys µs/write | total | fio µs/write | payload MB/s | store disk MB/s |"
echo "|---|---|---|---|---|---|---|---|"
for _ in $(seq "$ROUNDS"); do
    nbdkit -f -p 10941 memory 1G &
    PID=$!
    bench_wait_up write-split nbd://127.0.0.1:10941/
    measure "nbdkit memory" nbd://127.0.0.1:10941/
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    for mode in default no-flush; do
        args=()
        [[ $mode == no-flush ]] && args=(--dirty-max 6G --flush-interval 3600s)
        find "$STORE" -mindepth 1 -delete
        "$BIN" --listen 127.0.0.1:10942 --store "file://$STORE" --default-size 1G \
            --cache-size 1280M "${args[@]}" >"$WORK/daemon.log" 2>&1 &
        PID=$!
        bench_wait_up write-split nbd://127.0.0.1:10942/x
        measure "nbds3d ($mode)" nbd://127.0.0.1:10942/x
        kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    done
done
