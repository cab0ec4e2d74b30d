#!/usr/bin/env bash
# What segment compression costs and saves on sequential writes: fio's seqwrite job (1 MiB,
# qd8, tools/bench/nbd.fio, fio's default buffers) against nbds3d on a fresh file store, once
# per compression setting per round, and prints one Markdown row per run.
#
#   tools/bench/compression.sh                 # build this checkout; 2 rounds of 15 s each
#   tools/bench/compression.sh /path/to/nbds3d # a prebuilt daemon
#   NBDS3_BENCH_ROUNDS=3 NBDS3_BENCH_RUNTIME=30 tools/bench/compression.sh
#
# Columns: write rate; the daemon's CPU time (user + system) over the fio job, in seconds;
# and, after a SIGTERM (which flushes), the bytes the device's live data takes in the store
# (`nbds3-inspect segments`, "live (est.)"): below the device size is what compression
# saved (the job writes the whole device, so every block is live). fio's default buffers are random bytes with scattered zeros, which
# zstd -1 shrinks by ~13% per 128 KiB frame, just past the writer's 1/8 bar.
#
# Knobs: NBDS3_BENCH_ROUNDS (2), NBDS3_BENCH_RUNTIME (15), NBDS3_BENCH_SIZE (1G),
# NBDS3_BENCH_CONFIGS ('|'-separated daemon argument lists; default: the default, zstd
# level -5, compression off).
set -euo pipefail
source "$(dirname "$0")/common.sh"

bench_require compression.sh "apt install fio libnbd-bin" fio nbdinfo
ROUNDS=${NBDS3_BENCH_ROUNDS:-2}
RUNTIME=${NBDS3_BENCH_RUNTIME:-15}
SIZE=${NBDS3_BENCH_SIZE:-1G}
CONFIGS=${NBDS3_BENCH_CONFIGS:-"|--zstd-level -5|--compression off"}
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3
BIN=$(bench_binary "$@")
INSPECT=$(dirname "$BIN")/nbds3-inspect
if [[ ! -x $INSPECT ]]; then
    cargo build --release --quiet --bin nbds3-inspect >&2
    INSPECT=${CARGO_TARGET_DIR:-$PWD/target}/release/nbds3-inspect
fi
bench_workdir compression

echo "Machine: $(uname -srm); $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "Command: tools/bench/compression.sh $* (seqwrite 1M qd8, ${RUNTIME}s, device $SIZE, $ROUNDS rounds)"
echo
echo "| round | daemon arguments | seqwrite (MiB/s) | daemon CPU (s) | live data stored (device $SIZE) |"
echo "|---|---|---|---|---|"
IFS='|' read -r -a configs <<<"$CONFIGS"
for round in $(seq "$ROUNDS"); do
    for cfg in "${configs[@]}"; do
        store=file://$WORK/store-$round
        rm -rf "$WORK/store-$round"
        PORT=$(bench_free_port)
        URI=nbd://127.0.0.1:$PORT/seq
        # shellcheck disable=SC2086 # $cfg is a list of arguments
        NO_COLOR=1 "$BIN" --listen "127.0.0.1:$PORT" --store "$store" --default-size "$SIZE" \
            --cache-size 1280M $cfg >"$WORK/daemon.log" 2>&1 &
        PID=$!
        bench_wait_up compression.sh "$URI"
        t0=$(bench_ticks "$PID")
        # (--output: fio prints "connected to NBD server" on stdout before the JSON.)
        URI=$URI SIZE=$SIZE RUNTIME=$RUNTIME fio --section=seqwrite tools/bench/nbd.fio \
            --output-format=json --output="$WORK/fio.json" >/dev/null
        mibs=$("$PY" -c 'import json, sys; print("%.0f" % (json.load(open(sys.argv[1]))["jobs"][0]["write"]["bw"] / 1024))' "$WORK/fio.json")
        t1=$(bench_ticks "$PID")
        kill -TERM "$PID"
        wait "$PID" || true
        PID=""
        space=$("$INSPECT" --store "$store" segments seq | head -1 |
            sed -E 's/.* stored, (.*) live \(est\.\).*/\1/')
        cpu=$(awk -v t="$((t1 - t0))" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", t / hz}')
        echo "| $round | ${cfg:-(defaults: zstd, level -1)} | $mibs | $cpu | $space |"
        rm -rf "$WORK/store-$round"
    done
done
