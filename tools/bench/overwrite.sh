#!/usr/bin/env bash
# Stored bytes under sustained random overwrites: does compaction keep up with an export
# that is never idle? Prints one row per sample as Markdown.
#
#   tools/bench/overwrite.sh                 # build this checkout; 1 GiB, 180 s of writes
#   tools/bench/overwrite.sh /path/to/nbds3d # a prebuilt daemon (A/B runs)
#   NBDS3_BENCH_SIZE=512M NBDS3_BENCH_RUNTIME=60 tools/bench/overwrite.sh
#
# On a fresh store (file://, or SeaweedFS with NBDS3_BENCH_S3=1): fill the whole device with random bytes (nbdkit's random
# plugin, through nbdcopy), then fio's randoverwrite job (4 KiB, qd32, tools/bench/nbd.fio)
# over the whole device for $RUNTIME s, then $IDLE s without requests. Every $STEP s the
# store's size on disk (`du`) is sampled; live data is the device size (random bytes do not
# compress and every block is written), so stored / live is the space amplification that
# S3 would bill. GC keeps old manifests' objects for --gc-retain (5 min by default): the
# daemon runs with --gc-retain 10s --gc-interval 10s here so that what is measured is
# compaction's backlog, not the retention window.
#
# Knobs: NBDS3_BENCH_SIZE (1G), NBDS3_BENCH_RUNTIME (180), NBDS3_BENCH_IDLE (60),
# NBDS3_BENCH_STEP (10), NBDS3_BENCH_ARGS (extra daemon arguments), NBDS3_BENCH_JOB
# (randoverwrite: 4 KiB uniform random writes with repeats; randwrite's lfsr writes each
# block once per pass, so every segment dies whole after one; seqwrite overwrites whole
# segments at a time, so they die whole and only GC has work to do), NBDS3_BENCH_RATE (a fio --rate limit such as 40m: a busy export that
# is not saturated, where GC's lag is small beside compaction's backlog), NBDS3_BENCH_S3=1
# (SeaweedFS from tools/test-env.sh instead of the file store; stored bytes are then the
# sizes of the objects a LIST returns, since SeaweedFS's own files free space only when it
# vacuums).
set -euo pipefail
source "$(dirname "$0")/common.sh"

bench_require overwrite.sh "apt install fio libnbd-bin nbdkit" fio nbdcopy nbdkit nbdinfo
SIZE=${NBDS3_BENCH_SIZE:-1G}
RUNTIME=${NBDS3_BENCH_RUNTIME:-180}
IDLE=${NBDS3_BENCH_IDLE:-60}
STEP=${NBDS3_BENCH_STEP:-10}
JOB=${NBDS3_BENCH_JOB:-randoverwrite}
RATE=${NBDS3_BENCH_RATE:-}
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3
BIN=$(bench_binary "$@")
bench_workdir overwrite
STORE=file://$WORK/store
STORE_ARGS=()
if [[ -n ${NBDS3_BENCH_S3:-} ]]; then
    # shellcheck source=../test-env.sh
    source tools/test-env.sh
    # test-env.sh's EXIT trap replaced bench_workdir's: run both.
    trap 'bench_cleanup || true; nbds3_test_env_cleanup' EXIT
    STORE=s3://$NBDS3_TEST_S3_BUCKET/overwrite-$$
    STORE_ARGS=(--s3-endpoint "$NBDS3_TEST_S3_ENDPOINT" --s3-path-style)
fi
PORT=$(bench_free_port)
URI=nbd://127.0.0.1:$PORT/x
SIZE_BYTES=$(bench_size_bytes "$SIZE")

# shellcheck disable=SC2086 # NBDS3_BENCH_ARGS is a list of arguments
NO_COLOR=1 RUST_LOG=info "$BIN" --listen "127.0.0.1:$PORT" --store "$STORE" "${STORE_ARGS[@]}" \
    --default-size "$SIZE" --gc-retain 10s --gc-interval 10s ${NBDS3_BENCH_ARGS:-} \
    >"$WORK/daemon.log" 2>&1 &
PID=$!
bench_wait_up overwrite.sh "$URI"

echo "Machine: $(uname -srm); $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "Command: tools/bench/overwrite.sh $* (store ${STORE%%://*}, size $SIZE, $JOB ${RUNTIME}s${RATE:+ at $RATE/s}, idle ${IDLE}s," \
    "daemon args: --gc-retain 10s --gc-interval 10s ${NBDS3_BENCH_ARGS:-})"
nbdcopy --flush -- [ nbdkit --exit-with-parent random size="$SIZE_BYTES" ] "$URI"
echo
echo "| t (s) | phase | stored (MiB) | stored / live | index's stored / live at the last pass | compaction passes so far |"
echo "|---|---|---|---|---|---|"

# Total size of the objects under the export's prefix (boto3 from test-env.sh's venv).
s3_bytes() {
    "$NBDS3_VENV/bin/python" - "$NBDS3_TEST_S3_ENDPOINT" "$NBDS3_TEST_S3_BUCKET" "overwrite-$$/" <<'PY'
import sys
import boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
total = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[2], Prefix=sys.argv[3]):
    total += sum(o["Size"] for o in page.get("Contents", []))
print(total)
PY
}

sample() {
    local bytes passes last idx
    if [[ -n ${NBDS3_BENCH_S3:-} ]]; then
        bytes=$(s3_bytes)
    else
        # Temporary files come and go while du walks the store: ignore those it misses.
        bytes=$(du -sb "$WORK/store" 2>/dev/null | cut -f1 || true)
    fi
    passes=$(grep -c 'compaction pass committed' "$WORK/daemon.log" || true)
    # What the daemon bounds: stored over live bytes of the segments its index names, as
    # the last pass saw them (older daemons do not log it).
    last=$(grep 'compaction pass committed' "$WORK/daemon.log" | tail -1 || true)
    idx=$(awk '{ s = ""; l = ""
        for (i = 1; i <= NF; i++) {
            if ($i ~ /^stored_mib=/) s = substr($i, 12)
            if ($i ~ /^live_mib=/) l = substr($i, 10)
        }
        if (s != "" && l > 0) printf "%.2f", s / l; else printf "-" }' <<<"$last")
    awk -v t="$1" -v ph="$2" -v b="$bytes" -v l="$SIZE_BYTES" -v p="$passes" -v x="$idx" \
        'BEGIN { printf "| %d | %s | %.0f | %.2f | %s | %d |\n", t, ph, b / 1048576, b / l, x, p }'
}

start=$(date +%s)
URI=$URI RUNTIME=$RUNTIME SIZE=$SIZE_BYTES fio --section="$JOB" ${RATE:+--rate=$RATE} --output-format=json \
    --output="$WORK/fio.json" tools/bench/nbd.fio >/dev/null &
fio_pid=$!
sample 0 fill
while kill -0 $fio_pid 2>/dev/null; do
    sleep "$STEP"
    sample $(($(date +%s) - start)) writes
done
wait $fio_pid
end=$(($(date +%s) + IDLE))
while (($(date +%s) < end)); do
    sleep "$STEP"
    sample $(($(date +%s) - start)) idle
done
mibs=$($PY -c "import json,sys; print(round(json.load(open(sys.argv[1]))['jobs'][0]['write']['bw'] / 1024))" "$WORK/fio.json")
echo
echo "$JOB: $mibs MiB/s of overwrites"
