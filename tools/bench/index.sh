#!/usr/bin/env bash
# The page index of a device too large for its bound, and what larger frames cost: the
# daemon (file store) with a small --cache-size serves a device whose mapped data needs more
# index runs at 128 KiB frames than the bound allows, once with `--defrag-frame-max 128K`
# (frames never grow: the index stops at one run per 128 KiB) and once with the default 1M
# (compaction cuts frames up to 1 MiB). Each run: fio writes the device sequentially
# (1 MiB), then randomly (4 KiB, qd 32, NBDS3_BENCH_RUNTIME s), the daemon settles and
# stops, `nbds3-inspect verify` checks the store end to end and counts the index runs;
# then a restarted daemon (cold cache) serves fio's random 4 KiB reads and 1 MiB
# sequential reads. Prints one row per setting.
#
#   tools/bench/index.sh                  # release build of this checkout
#   tools/bench/index.sh /path/to/nbds3d  # another build (nbds3-inspect from the same dir)
#
# Knobs: NBDS3_BENCH_SIZE (device, default 3G), NBDS3_BENCH_CACHE (default 2M: a 512 KiB
# index bound, ~5,400 runs), NBDS3_BENCH_RUNTIME (random writes, s, default 20),
# NBDS3_BENCH_SETTLE (s the daemon gets to compact after the writes, default 30).
# Needs fio and libnbd-bin (nbdinfo).
set -euo pipefail

source "$(dirname "$0")/common.sh"
bench_require index "apt install fio libnbd-bin" fio nbdinfo
BIN=$(bench_binary "$@")
if [[ $# -eq 0 ]]; then
    cargo build --release --quiet --bin nbds3-inspect >&2
fi
INSPECT="$(dirname "$BIN")/nbds3-inspect"
SIZE=${NBDS3_BENCH_SIZE:-3G}
CACHE=${NBDS3_BENCH_CACHE:-2M}
RUNTIME=${NBDS3_BENCH_RUNTIME:-20}
SETTLE=${NBDS3_BENCH_SETTLE:-30}
PORT=10961
URI="nbd://127.0.0.1:$PORT/x"
bench_workdir index

start() { # start STORE LOG ARGS...: the daemon, waited for
    local store=$1 log=$2
    shift 2
    "$BIN" --listen "127.0.0.1:$PORT" --store "file://$store" --default-size "$SIZE" \
        --cache-size "$CACHE" "$@" >>"$log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do
        nbdinfo "$URI" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "index: the daemon did not start; see $log" >&2
    tail "$log" >&2
    exit 1
}
stop() { # SIGINT: flush and exit
    kill -INT "$PID"
    wait "$PID" || true
    PID=""
}
# mib SIZE DIV: SIZE (K/M/G suffix) in MiB, divided by DIV
mib() {
    awk -v s="$1" -v d="$2" 'BEGIN {
        n = s + 0; u = substr(s, length(s));
        f = (u == "K") ? 1 / 1024 : (u == "M") ? 1 : (u == "G") ? 1024 : 1 / 1048576;
        printf "%.2f", n * f / d }'
}
# fio JOB-ARGS...: one nbd job against $URI, JSON on stdout
fio_job() {
    fio --name=j --ioengine=nbd --uri="$URI" --output-format=json "$@" | sed -n '/^{/,$p'
}

echo "Machine: $(uname -srm); $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "Command: tools/bench/index.sh $BIN (device $SIZE, --cache-size $CACHE," \
    "random writes ${RUNTIME}s, settle ${SETTLE}s)"
echo
echo "| --defrag-frame-max | index runs (verify) | index MiB (96 B/run) | bound MiB | last pass runs | fill MiB/s | randwrite IOPS | peak RSS MiB | cold randread 4k IOPS | cold seqread 1M MiB/s | stored GiB |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for frame in 128K 1M; do
    store="$WORK/store-$frame"
    log="$WORK/daemon-$frame.log"
    mkdir -p "$store"
    start "$store" "$log" --defrag-frame-max "$frame" --compact-interval 2s
    fill=$(fio_job --rw=write --bs=1M --iodepth=8 --size="$SIZE" |
        /usr/bin/python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["jobs"][0]["write"]["bw"] / 1024))')
    rw=$(fio_job --rw=randwrite --bs=4k --iodepth=32 --size="$SIZE" --time_based \
        --runtime="$RUNTIME" |
        /usr/bin/python3 -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["jobs"][0]["write"]["iops"])')
    sleep "$SETTLE"
    rss=$(awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$PID/status")
    stop
    last=$(grep -o 'index_runs_after=[0-9]*' "$log" | tail -1 | cut -d= -f2 || true)
    "$INSPECT" --store "file://$store" verify x --no-progress >"$WORK/verify.txt" 2>&1 || {
        echo "index: verify failed for --defrag-frame-max $frame" >&2
        cat "$WORK/verify.txt" >&2
        exit 1
    }
    runs=$(grep -o '[0-9]* index run(s)' "$WORK/verify.txt" | cut -d' ' -f1)
    start "$store" "$log" --defrag-frame-max "$frame" --no-compactor
    rr=$(fio_job --rw=randread --bs=4k --iodepth=32 --size="$SIZE" --time_based --runtime=10 |
        /usr/bin/python3 -c 'import json,sys; print("%.0f" % json.load(sys.stdin)["jobs"][0]["read"]["iops"])')
    stop
    start "$store" "$log" --defrag-frame-max "$frame" --no-compactor
    sr=$(fio_job --rw=read --bs=1M --iodepth=8 --size="$SIZE" --time_based --runtime=10 |
        /usr/bin/python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["jobs"][0]["read"]["bw"] / 1024))')
    stop
    stored=$(du -sb "$store" | awk '{printf "%.2f", $1 / 2^30}')
    echo "| $frame | $runs | $(awk -v r="$runs" 'BEGIN {printf "%.2f", r * 96 / 2^20}') |" \
        "$(mib "$CACHE" 4) | ${last:--} | $fill | $rw | $rss | $rr | $sr | $stored |"
    rm -rf "$store"
done
