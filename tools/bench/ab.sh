#!/usr/bin/env bash
# A/B of two nbds3d binaries on one fio job, side by side: both daemons run at once (file
# stores, --cache-size 1280M, --no-compactor, as in targets.sh), each gets the same 1 GiB fill
# and warm-up, then the job alternates between them for several rounds (the order flips every
# round), so whatever else the machine does hits both alike. Prints every round's pair with
# the server's CPU per I/O (user + system, ramp included) and fio's (ramp excluded: what the
# server's way of replying costs the client), the median of the per-round ratios B/A and
# the median CPU per I/O of each.
#
#   tools/bench/ab.sh BIN_A BIN_B [JOB] [ROUNDS]   # JOB from nbd.fio (default seqread), 8 rounds
#
# Why: single runs vary by ±10% on a shared 2-core machine, more than most changes are
# worth; in alternation, a change of a few percent shows (see RESULTS.md, session 17).
# After a write job each daemon gets a FLUSH, so its persisting does not land in the other's
# turn. Knobs: NBDS3_BENCH_RUNTIME (s per job after a 1 s ramp, default 4).
# Needs fio, nbdcopy, nbdinfo, python3-libnbd (apt install fio libnbd-bin python3-libnbd).
set -euo pipefail

source "$(dirname "$0")/common.sh"
bench_require ab "apt install fio libnbd-bin python3-libnbd" fio nbdcopy nbdinfo
[[ $# -ge 2 ]] || { echo "usage: tools/bench/ab.sh BIN_A BIN_B [JOB] [ROUNDS]" >&2; exit 2; }
BIN_A=$1 BIN_B=$2 JOB=${3:-seqread} ROUNDS=${4:-8}
RUNTIME=${NBDS3_BENCH_RUNTIME:-4}
PY=/usr/bin/python3 # Debian's, with the libnbd binding; not a pyenv shim
bench_workdir ab
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; rm -rf "$WORK"' EXIT

URIS=()
for bin in "$BIN_A" "$BIN_B"; do
    port=$(bench_free_port)
    mkdir -p "$WORK/store-$port"
    NO_COLOR=1 "$bin" --listen "127.0.0.1:$port" --store "file://$WORK/store-$port" \
        --default-size 1G --cache-size 1280M --no-compactor 2>"$WORK/daemon-$port.log" &
    PIDS+=($!)
    URIS+=("nbd://127.0.0.1:$port/disk")
    bench_wait_up ab "nbd://127.0.0.1:$port/disk" 300
done
head -c 1G /dev/urandom >"$WORK/src.img"
for uri in "${URIS[@]}"; do
    nbdcopy --flush "$WORK/src.img" "$uri"
    nbdcopy "$uri" null:
    URI=$uri RUNTIME=2 SIZE=1073741824 fio --section="$JOB" --output-format=json \
        --output="$WORK/fio.json" tools/bench/nbd.fio >/dev/null
done
rm "$WORK/src.img"

# run I: the job against daemon I (0 = A, 1 = B); prints "value cpu_us_per_io fio_us_per_io"
run() {
    local uri=${URIS[$1]} pid=${PIDS[$1]} t0 t1
    t0=$(bench_ticks "$pid")
    URI=$uri RUNTIME=$RUNTIME SIZE=1073741824 fio --section="$JOB" --output-format=json \
        --output="$WORK/fio.json" tools/bench/nbd.fio >/dev/null
    if [[ $JOB == *write* ]]; then
        $PY -c 'import nbd, sys; h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.flush(); h.shutdown()' "$uri"
    fi
    t1=$(bench_ticks "$pid")
    $PY - "$WORK/fio.json" "$JOB" "$t0" "$t1" <<'PYEOF'
import json, os, sys
d = json.load(open(sys.argv[1]))
j = d["jobs"][0]
side = j["write"] if "write" in sys.argv[2] else j["read"]
value = side["iops"] if sys.argv[2].startswith("rand") else side["bw_bytes"] / (1 << 20)
# total_ios sums every fio job of the section (numjobs); the ramp is not in it.
ios = side["total_ios"] + side["iops"] * float(d.get("global options", {}).get("ramp_time", "1"))
# fio's own CPU (usr_cpu/sys_cpu: percent of the job's runtime, ramp excluded) per I/O: what
# the server's way of replying costs the client (its wakeups, its reads).
client = (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000 * 1e6 / side["total_ios"]
print(value, (float(sys.argv[4]) - float(sys.argv[3])) / os.sysconf("SC_CLK_TCK") * 1e6 / ios, client)
PYEOF
}

for round in $(seq "$ROUNDS"); do
    echo "ab: round $round/$ROUNDS $JOB" >&2
    if ((round % 2)); then a=$(run 0); b=$(run 1); else b=$(run 1); a=$(run 0); fi
    echo "$a $b" >>"$WORK/rounds"
done

echo "Machine: $(uname -srm); $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "Command: tools/bench/ab.sh $BIN_A $BIN_B $JOB $ROUNDS (${RUNTIME}s + 1 s ramp per job)"
$PY - "$WORK/rounds" "$JOB" <<'PYEOF'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1])]
unit = "IOPS" if sys.argv[2].startswith("rand") else "MiB/s"
print(f"\n| round | A ({unit}) | B ({unit}) | B/A | server CPU µs/IO A, B | fio CPU µs/IO A, B |")
print("|---|---|---|---|---|---|")
for i, (a, ca, fa, b, cb, fb) in enumerate(rows, 1):
    print(f"| {i} | {a:.0f} | {b:.0f} | {b / a:.2f}× | {ca:.1f}, {cb:.1f} | {fa:.1f}, {fb:.1f} |")
ratio = statistics.median(r[3] / r[0] for r in rows)
med = lambda k: statistics.median(r[k] for r in rows)
print(f"| **median** | {med(0):.0f} | {med(3):.0f} | **{ratio:.2f}×** | {med(1):.1f}, {med(4):.1f} "
      f"| {med(2):.1f}, {med(5):.1f} |")
PYEOF
