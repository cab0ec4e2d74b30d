#!/usr/bin/env bash
# What TLS costs: the same client jobs against nbds3d with and without TLS (STARTTLS,
# rustls, no client certificates), file store, cache large enough for the device, no
# compactor. Per round and server: `nbdcopy --flush` of 1 GiB of random bytes in,
# `nbdcopy` out to null: (reads from the cache), then fio's seqread 1M qd8, randread 4k
# qd32 and randwrite 4k qd32 from tools/bench/nbd.fio. Prints one row per job with both
# rates, their ratio and the daemon's CPU per I/O (/proc ticks, ramp included).
#
#   tools/bench/tls.sh                  # release build of this checkout
#   tools/bench/tls.sh /path/to/nbds3d  # another binary
#
# Knobs: NBDS3_BENCH_RUNTIME (s per fio job, default 10), NBDS3_BENCH_ROUNDS (default 2;
# the order of the two servers flips every round).
# Needs fio, nbdcopy, openssl (apt install fio libnbd-bin openssl).
set -euo pipefail

source "$(dirname "$0")/common.sh"
bench_require tls "apt install fio libnbd-bin openssl" fio nbdcopy nbdinfo openssl
BIN=$(bench_binary "$@")
RUNTIME=${NBDS3_BENCH_RUNTIME:-10}
ROUNDS=${NBDS3_BENCH_ROUNDS:-2}
PY=/usr/bin/python3 # Debian's, not a pyenv shim
bench_workdir tls
PORT=10971

# A CA and a server certificate for 127.0.0.1; the client directory holds the CA.
(
    cd "$WORK"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
        -subj /CN=bench-ca -keyout ca-key.pem -out ca-cert.pem 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=bench \
        -keyout server-key.pem -out server.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -set_serial 1 \
        -days 30 -extfile server.ext -out server-cert.pem 2>/dev/null
    mkdir client && cp ca-cert.pem client/
    # fio's nbd engine refuses URIs naming local files (tls-certificates=), so its libnbd
    # finds the CA where it looks by default: $HOME/.pki/libnbd.
    mkdir -p home/.pki/libnbd && cp ca-cert.pem home/.pki/libnbd/
)
head -c 1G /dev/urandom >"$WORK/src.img"

# measure MODE ROUND: start the daemon, run every job, append JSON lines to results
measure() {
    local mode=$1 round=$2 uri store t0 t1 a b
    store=$(mktemp -d "$WORK/store.XXXXXX")
    local args=(--listen "127.0.0.1:$PORT" --store "file://$store" --default-size 1G
        --cache-size 1280M --no-compactor)
    uri="nbd://127.0.0.1:$PORT/x"
    if [[ $mode == tls ]]; then
        args+=(--tls-cert "$WORK/server-cert.pem" --tls-key "$WORK/server-key.pem")
        uri="nbds://127.0.0.1:$PORT/x"
    fi
    "$BIN" "${args[@]}" 2>"$WORK/daemon-$mode-$round.log" &
    PID=$!
    HOME="$WORK/home" bench_wait_up tls "$uri"
    a=$(bench_ticks "$PID"); t0=$(date +%s.%N)
    HOME="$WORK/home" nbdcopy --flush "$WORK/src.img" "$uri"
    t1=$(date +%s.%N); b=$(bench_ticks "$PID")
    echo "{\"mode\":\"$mode\",\"round\":$round,\"job\":\"nbdcopy in\",\"rate\":$("$PY" -c "print(1024 / ($t1 - $t0))"),\"ops\":1024,\"ticks\":$((b - a))}" >>"$WORK/results"
    a=$(bench_ticks "$PID"); t0=$(date +%s.%N)
    HOME="$WORK/home" nbdcopy "$uri" null:
    t1=$(date +%s.%N); b=$(bench_ticks "$PID")
    echo "{\"mode\":\"$mode\",\"round\":$round,\"job\":\"nbdcopy out\",\"rate\":$("$PY" -c "print(1024 / ($t1 - $t0))"),\"ops\":1024,\"ticks\":$((b - a))}" >>"$WORK/results"
    for job in seqread randread randwrite; do
        a=$(bench_ticks "$PID")
        HOME="$WORK/home" URI="$uri" RUNTIME="$RUNTIME" SIZE=1073741824 fio --section="$job" \
            --output-format=json --output="$WORK/fio.json" tools/bench/nbd.fio >/dev/null
        b=$(bench_ticks "$PID")
        "$PY" - "$WORK/fio.json" "$mode" "$round" "$job" "$((b - a))" "$RUNTIME" >>"$WORK/results" <<'PY'
import json, sys
path, mode, rnd, job, ticks, runtime = sys.argv[1:]
j = json.load(open(path))["jobs"][0]
side = j["write"] if "write" in job else j["read"]
rate = side["bw_bytes"] / 2**20 if job.startswith("seq") else side["iops"]
ops = side["iops"] * (int(runtime) + 1)
print(json.dumps({"mode": mode, "round": int(rnd), "job": job, "rate": rate, "ops": ops, "ticks": int(ticks)}))
PY
    done
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    rm -rf "$store"
}

echo "Machine: $(uname -srm); $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "Command: tools/bench/tls.sh $BIN (fio ${RUNTIME}s + 1 s ramp per job, $ROUNDS rounds)"
echo
for round in $(seq "$ROUNDS"); do
    if ((round % 2)); then order="plain tls"; else order="tls plain"; fi
    for mode in $order; do measure "$mode" "$round"; done
done
"$PY" - "$WORK/results" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
hz = os.sysconf("SC_CLK_TCK")
units = {"nbdcopy in": "MiB/s", "nbdcopy out": "MiB/s", "seqread": "MiB/s", "randread": "IOPS", "randwrite": "IOPS"}
print("| job | round | plain | TLS | TLS/plain | daemon CPU per I/O, plain → TLS (µs) |")
print("|---|---|---|---|---|---|")
for job in units:
    for r in sorted({x["round"] for x in rows}):
        p = next(x for x in rows if x["job"] == job and x["round"] == r and x["mode"] == "plain")
        t = next(x for x in rows if x["job"] == job and x["round"] == r and x["mode"] == "tls")
        cpu = lambda x: x["ticks"] / hz * 1e6 / x["ops"]
        fmt = (lambda v: f"{v:.0f}") if units[job] == "MiB/s" else (lambda v: f"{v / 1000:.1f}k")
        unit = "per MiB" if job.startswith("nbdcopy") else ""
        print(f"| {job} ({units[job]}) | {r} | {fmt(p['rate'])} | {fmt(t['rate'])} | {t['rate'] / p['rate']:.2f}× | {cpu(p):.1f} → {cpu(t):.1f} {unit}|")
PY
