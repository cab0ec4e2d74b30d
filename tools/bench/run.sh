#!/usr/bin/env bash
# NBD throughput of nbds3d against reference servers, all in one run, printed as a table.
#
#   tools/bench/run.sh                      # everything, ~6 minutes on 2 cores
#   NBDS3_BENCH_SERVERS="nbdkit-memory nbds3d-file" NBDS3_BENCH_RUNTIME=5 tools/bench/run.sh
#
# Servers (each serves one export of $SIZE on 127.0.0.1):
#   nbdkit-memory  nbdkit memory plugin (the baseline: RAM, no persistence)
#   qemu-nbd       qemu-nbd over a local sparse raw file (--cache=writeback)
#   nbds3d-file    nbds3d, release build, file:// store in a temp dir
#   nbds3d-s3      nbds3d, release build, SeaweedFS S3 from tools/test-env.sh (started here
#                  unless NBDS3_TEST_S3_ENDPOINT/NBDS3_TEST_S3_BUCKET are already set)
#
# Per server, in this order (the first step fills the device, so reads read real data):
#   nbdcopy-in   nbdcopy --flush of a $SIZE file of random bytes into the export
#   seqwrite     fio nbd engine, 1 MiB sequential writes, iodepth 8
#   randwrite    fio nbd engine, 4 KiB random writes, iodepth 32
#   nbdcopy-out  nbdcopy of the export to null: the first read after the writes (cold for
#                nbds3d unless written data is still cached), and it warms the cache
#   seqread      fio nbd engine, 1 MiB sequential reads, iodepth 8
#   randread     fio nbd engine, 4 KiB random reads, iodepth 32
# fio jobs are time-based ($RUNTIME s after a 1 s ramp) over the whole $SIZE, one connection
# each (tools/bench/nbd.fio). Peak RSS is VmHWM of the server process at the end; CPU is the
# server's user+system time over the whole sequence.
#
# Knobs: NBDS3_BENCH_RUNTIME (default 12), NBDS3_BENCH_SIZE (default 1G),
# NBDS3_BENCH_SERVERS (default all four), NBDS3_BENCH_NBDS3D_ARGS (extra daemon flags;
# default "--cache-size 1280M": the 1 GiB working set fits the page cache, so the read jobs
# measure cached reads — nbdkit memory holds the whole device in RAM too),
# NBDS3_BENCH_OUT (directory for raw JSON and logs; default a new temp dir, kept),
# NBDS3_BENCH_NBDS3D (use this nbds3d binary instead of building one, for A/B runs).
set -euo pipefail

cd "$(dirname "$0")/../.."
REPO=$PWD
# shellcheck source=common.sh
source "$REPO/tools/bench/common.sh" # bench_free_port, bench_ticks, bench_size_bytes
RUNTIME=${NBDS3_BENCH_RUNTIME:-12}
SIZE=${NBDS3_BENCH_SIZE:-1G}
SERVERS=${NBDS3_BENCH_SERVERS:-"nbdkit-memory qemu-nbd nbds3d-file nbds3d-s3"}
NBDS3D_ARGS=${NBDS3_BENCH_NBDS3D_ARGS:---cache-size 1280M}
JOBS="seqwrite randwrite seqread randread"
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3

log() { echo "bench: $*" >&2; }
die() {
    log "$*"
    exit 1
}

for bin in fio nbdcopy nbdinfo nbdkit qemu-nbd qemu-img; do
    command -v "$bin" >/dev/null || die "missing $bin (apt install fio libnbd-bin nbdkit qemu-utils)"
done
fio --enghelp=nbd 2>/dev/null | grep -q uri || die "this fio has no nbd engine"

SIZE_BYTES=$(bench_size_bytes "$SIZE")

OUT=${NBDS3_BENCH_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/nbds3-bench.XXXXXX")}
mkdir -p "$OUT"
WORK=$(bench_scratch bench-work)

SRV_PID=""
cleanup() {
    if [[ -n $SRV_PID ]] && kill -0 "$SRV_PID" 2>/dev/null; then
        kill -KILL "$SRV_PID" 2>/dev/null || true
        wait "$SRV_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    if declare -F nbds3_test_env_cleanup >/dev/null; then
        nbds3_test_env_cleanup
    fi
}

if [[ " $SERVERS " == *" nbds3d-s3 "* && -z ${NBDS3_TEST_S3_ENDPOINT:-} ]]; then
    log "starting SeaweedFS (tools/test-env.sh)"
    # shellcheck source=../test-env.sh
    source "$REPO/tools/test-env.sh"
fi
trap cleanup EXIT

if [[ -n ${NBDS3_BENCH_NBDS3D:-} ]]; then
    NBDS3D=$NBDS3_BENCH_NBDS3D
    log "using nbds3d binary $NBDS3D (NBDS3_BENCH_NBDS3D)"
elif [[ " $SERVERS " == *" nbds3d"* ]]; then
    log "building nbds3d (release)"
    cargo build --release --quiet --bin nbds3d
    NBDS3D="${CARGO_TARGET_DIR:-$REPO/target}/release/nbds3d"
fi
if [[ " $SERVERS " == *" nbds3d"* ]]; then
    [[ -x $NBDS3D ]] || die "no binary at $NBDS3D"
fi

# Start server $1; sets SRV_PID and URI, waits until the export answers.
start_server() {
    local name=$1 port
    port=$(bench_free_port)
    case $name in
    nbdkit-memory)
        nbdkit -f -i 127.0.0.1 -p "$port" memory "$SIZE" 2>"$OUT/$name.log" &
        URI="nbd://127.0.0.1:$port/"
        ;;
    qemu-nbd)
        qemu-img create -q -f raw "$WORK/qemu.img" "$SIZE"
        qemu-nbd -f raw -b 127.0.0.1 -p "$port" -x disk -t -e 32 --cache=writeback \
            "$WORK/qemu.img" 2>"$OUT/$name.log" &
        URI="nbd://127.0.0.1:$port/disk"
        ;;
    nbds3d-file)
        # shellcheck disable=SC2086
        NO_COLOR=1 "$NBDS3D" --listen "127.0.0.1:$port" --store "file://$WORK/store" \
            --default-size "$SIZE" $NBDS3D_ARGS 2>"$OUT/$name.log" &
        URI="nbd://127.0.0.1:$port/disk"
        ;;
    nbds3d-s3)
        # shellcheck disable=SC2086
        NO_COLOR=1 "$NBDS3D" --listen "127.0.0.1:$port" \
            --store "s3://$NBDS3_TEST_S3_BUCKET/bench-$(date +%s)-$$" \
            --s3-endpoint "$NBDS3_TEST_S3_ENDPOINT" --s3-path-style \
            --s3-region "${AWS_REGION:-us-east-1}" \
            --default-size "$SIZE" $NBDS3D_ARGS 2>"$OUT/$name.log" &
        URI="nbd://127.0.0.1:$port/disk"
        ;;
    *) die "unknown server $name" ;;
    esac
    SRV_PID=$!
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$SRV_PID" 2>/dev/null || die "$name exited at startup; see $OUT/$name.log"
        if nbdinfo --size "$URI" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.1
    done
    die "$name did not come up; see $OUT/$name.log"
}

# Record peak RSS and CPU time of the server, then stop it (SIGTERM, like an operator).
stop_server() {
    local name=$1 hwm ticks clk
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$SRV_PID/status")
    ticks=$(bench_ticks "$SRV_PID")
    clk=$(getconf CLK_TCK)
    echo "{\"peak_rss_kib\": $hwm, \"cpu_s\": $($PY -c "print($ticks / $clk)")}" >"$OUT/$name-proc.json"
    kill -TERM "$SRV_PID"
    local rc=0
    wait "$SRV_PID" || rc=$?
    SRV_PID=""
    # nbdkit and qemu-nbd exit 0 on SIGTERM too; anything else is worth knowing.
    [[ $rc == 0 ]] || log "$name exited with status $rc after SIGTERM"
}

# Time a command, write {"seconds": …} to $1.
timed() {
    local out=$1 t0 t1
    shift
    t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N)
    $PY -c "import json, sys; json.dump({'seconds': $t1 - $t0}, open(sys.argv[1], 'w'))" "$out"
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "writing $SIZE of random bytes for nbdcopy"
head -c "$SIZE_BYTES" /dev/urandom >"$WORK/src.img"

for srv in $SERVERS; do
    log "== $srv"
    start_server "$srv"
    log "$srv: nbdcopy in"
    timed "$OUT/$srv-nbdcopy-in.json" nbdcopy --flush "$WORK/src.img" "$URI"
    for job in $JOBS; do
        if [[ $job == seqread ]]; then
            # One full sequential read first (also measured): it is the cold read after the
            # writes, and it leaves the device in nbds3d's page cache when that is big
            # enough, so the read jobs after it measure cached reads.
            log "$srv: nbdcopy out"
            timed "$OUT/$srv-nbdcopy-out.json" nbdcopy "$URI" null:
        fi
        log "$srv: fio $job (${RUNTIME}s)"
        t0=$(awk '{print $14 + $15}' "/proc/$SRV_PID/stat")
        URI=$URI RUNTIME=$RUNTIME SIZE=$SIZE_BYTES fio --section="$job" --output-format=json \
            --output="$OUT/$srv-$job.json" "$REPO/tools/bench/nbd.fio" >/dev/null
        t1=$(awk '{print $14 + $15}' "/proc/$SRV_PID/stat")
        echo "{\"cpu_s\": $($PY -c "print(($t1 - $t0) / $(getconf CLK_TCK))")}" >"$OUT/$srv-$job-cpu.json"
    done
    stop_server "$srv"
done

# Machine and command, for RESULTS.md.
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- src || echo ' (+ uncommitted src changes)')"
    echo "cpu: $(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2; exit}'), $(nproc) cores"
    echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB; kernel $(uname -r)"
    echo "load average (1/5/15 min): at start $LOAD_START, at end $(cut -d' ' -f1-3 /proc/loadavg) — other work on the machine skews every column"
    echo "tools: $(fio --version), nbdkit $(nbdkit --version | awk '{print $2}'), $(qemu-nbd --version | head -1), nbdcopy $(nbdcopy --version | awk 'NR==1 {print $2}')"
    echo "command: NBDS3_BENCH_RUNTIME=$RUNTIME NBDS3_BENCH_SIZE=$SIZE NBDS3_BENCH_NBDS3D_ARGS='$NBDS3D_ARGS' tools/bench/run.sh"
} >"$OUT/machine.txt"

$PY - "$OUT" "$SIZE_BYTES" $SERVERS <<'EOF'
import json, os, sys

out, size, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
base = "nbdkit-memory"


def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None


def fio(srv, job, what):
    d = load(f"{srv}-{job}.json")
    if not d:
        return None
    j = d["jobs"][0]
    side = j["write"] if "write" in job else j["read"]
    return side["iops"] if what == "iops" else side["bw_bytes"] / (1 << 20)


def cpu_per_op(srv, job):
    """Server CPU (user + system) per I/O over the job, ramp included: the server's own
    cost per request, which does not swing with scheduling the way throughput does."""
    d, c = load(f"{srv}-{job}.json"), load(f"{srv}-{job}-cpu.json")
    if not d or not c:
        return None
    j = d["jobs"][0]
    side = j["write"] if "write" in job else j["read"]
    ramp = float(d.get("global options", {}).get("ramp_time", "1"))
    seconds = j["job_runtime"] / 1000 + ramp
    ios = side["iops"] * seconds
    return 1e6 * c["cpu_s"] / ios if ios else None


def copy(srv, way):
    d = load(f"{srv}-nbdcopy-{way}.json")
    return size / (1 << 20) / d["seconds"] if d else None


def proc(srv, key):
    d = load(f"{srv}-proc.json")
    if not d:
        return None
    return d["peak_rss_kib"] / 1024 if key == "rss" else d["cpu_s"]


rows = [
    ("randwrite 4k qd32 (IOPS)", lambda s: fio(s, "randwrite", "iops"), True),
    ("randread 4k qd32 (IOPS)", lambda s: fio(s, "randread", "iops"), True),
    ("seqwrite 1M qd8 (MiB/s)", lambda s: fio(s, "seqwrite", "bw"), True),
    ("seqread 1M qd8 (MiB/s)", lambda s: fio(s, "seqread", "bw"), True),
    ("nbdcopy in --flush (MiB/s)", lambda s: copy(s, "in"), True),
    ("nbdcopy out, 1st read after writes (MiB/s)", lambda s: copy(s, "out"), True),
    ("server CPU per randwrite 4k (µs)", lambda s: cpu_per_op(s, "randwrite"), False),
    ("server CPU per seqread 1M (µs)", lambda s: cpu_per_op(s, "seqread"), False),
    ("peak RSS (MiB)", lambda s: proc(s, "rss"), False),
    ("server CPU (s)", lambda s: proc(s, "cpu"), False),
]


def fmt(v):
    if v is None:
        return "—"
    if v >= 10000:
        return f"{v / 1000:.1f}k"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


lines = ["| | " + " | ".join(servers) + " |", "|---" * (len(servers) + 1) + "|"]
summary = {}
for label, f, ratio in rows:
    cells = []
    b = f(base) if base in servers else None
    for s in servers:
        v = f(s)
        summary.setdefault(s, {})[label] = v
        c = fmt(v)
        if ratio and b and v is not None and s != base:
            c += f" ({v / b:.2f}×)"
        cells.append(c)
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
table = "\n".join(lines)
print()
print(open(os.path.join(out, "machine.txt")).read().rstrip())
print()
print(table)
print()
print("(×: ratio to nbdkit memory; raw fio JSON and server logs in " + out + ")")
open(os.path.join(out, "table.md"), "w").write(table + "\n")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
