#!/usr/bin/env bash
# Every nbds3 test, against real local S3 servers (SeaweedFS and moto, see test-env.sh).
# S3 tests are required here (NBDS3_REQUIRE_S3=1): a missing server fails the run instead of
# skipping. Extra arguments go to `cargo test` (e.g. `tools/test-all.sh store_conformance`
# after `--`). Exit status: that of the first failing step, 0 when everything passed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=tools/test-env.sh
source tools/test-env.sh
export NBDS3_REQUIRE_S3=1

# --no-fail-fast: one run reports every failing test binary, not just the first.
cargo test --all-targets --no-fail-fast "$@"
