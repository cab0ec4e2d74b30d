# Shared prologue of the benchmark scripts (sourced, not run): the repository root as the
# working directory, a check for the tools a script needs, and the default binary.

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# bench_require NAME HINT BIN...: exit with "NAME: missing BIN (HINT)" unless every BIN
# is on PATH.
bench_require() {
    local name=$1 hint=$2 bin
    shift 2
    for bin in "$@"; do
        command -v "$bin" >/dev/null || {
            echo "$name: missing $bin ($hint)" >&2
            exit 1
        }
    done
}

# bench_build: build the daemon of this checkout (release) and print its path.
bench_build() {
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
    cargo build --release --quiet --bin nbds3d >&2
    echo "$CARGO_TARGET_DIR/release/nbds3d"
}

# bench_binary [BIN]: print BIN if one is given, else build the daemon of this checkout and
# print its path. Use it in an assignment, BIN=$(bench_binary "$@"), so that a failed build
# stops the script (set -e).
bench_binary() {
    if [[ $# -gt 0 ]]; then
        echo "$1"
    else
        bench_build
    fi
}

# bench_scratch NAME [PARENT]: make a scratch dir PARENT/nbds3-NAME.PID.XXXXXX (PARENT: $TMPDIR
# or /tmp) and print its path, for a script that removes it at exit. The script's PID in the
# name lets a later run remove it if this one was killed before its exit trap ran (SIGKILL,
# the end of a login session): a killed four-connection ab.sh once left 17 GiB behind, and
# with other such leftovers filled the disk so that the next CI build failed.
bench_scratch() { mktemp -d "${2:-${TMPDIR:-/tmp}}/nbds3-$1.$$.XXXXXX"; }

# bench_sweep [PARENT]: remove the scratch dirs under PARENT of runs whose process is gone.
bench_sweep() {
    local d rest pid
    for d in "${1:-${TMPDIR:-/tmp}}"/nbds3-*.*.*; do
        [[ -d $d ]] || continue
        rest=${d%.*}
        pid=${rest##*.}
        [[ $pid =~ ^[0-9]+$ ]] || continue
        [[ -d /proc/$pid ]] && continue
        echo "bench: removing $d ($(du -sh "$d" 2>/dev/null | cut -f1)), left by a run that was killed" >&2
        rm -rf "$d"
    done
}
bench_sweep
if [[ -n ${NBDS3_BENCH_STORE_DIR:-} ]]; then
    bench_sweep "$NBDS3_BENCH_STORE_DIR"
fi

# bench_workdir NAME: make a scratch dir, $WORK, and at exit stop the daemon whose pid is in
# $PID (if any) and remove $WORK. Call it as a statement, not in $(...): it sets globals.
bench_workdir() {
    WORK=$(bench_scratch "$1")
    PID=""
    trap bench_cleanup EXIT
}
bench_cleanup() {
    [[ -n ${PID:-} ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
    rm -rf "$WORK"
}

# bench_wait_up NAME URI [TRIES]: wait (0.1 s per try, default 100) until an NBD server
# answers at URI; exit with "NAME: server at URI did not start" otherwise.
bench_wait_up() {
    local name=$1 uri=$2 tries=${3:-100}
    for _ in $(seq "$tries"); do
        nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "$name: server at $uri did not start" >&2
    exit 1
}

# bench_free_port: print a TCP port on 127.0.0.1 that is free now.
bench_free_port() {
    "${PY:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# bench_size_bytes SIZE: print SIZE (a number with an optional K/M/G/T suffix, powers of
# 1024, as the daemon's flags take) in bytes.
bench_size_bytes() {
    local s=${1^^} m=1
    case $s in
    *K) m=$((1 << 10)) ;;
    *M) m=$((1 << 20)) ;;
    *G) m=$((1 << 30)) ;;
    *T) m=$((1 << 40)) ;;
    esac
    ((m == 1)) || s=${s%?}
    echo $((s * m))
}

# bench_ticks PID: CPU time (user + system, fields 14 and 15 of /proc/PID/stat) of a process
# so far, in clock ticks.
bench_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
