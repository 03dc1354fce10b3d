#!/usr/bin/env bash
# Control-path throughput: the real scaler and workers (no-op transcoder, durable PostgreSQL)
# against a one-process claim/complete loop on the same server, in one invocation. Not a test.
#   bench/dispatch.sh [--tasks N] [--workers N] [--slots N]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
state=$(mktemp -d /tmp/transcode-bench.XXXXXX)
trap '"$root/scripts/services.sh" stop "$state" >/dev/null 2>&1 || true; rm -rf "$state"' EXIT
"$root/scripts/services.sh" start "$state" >/dev/null
# shellcheck disable=SC1091
source "$state/env"
cargo build --release -q --bins -p transcode-scaler -p transcode-worker -p transcode-bench
base="${TRANSCODE_TEST_PG_URL%/*}"
psql "$TRANSCODE_TEST_PG_URL" -qc "CREATE DATABASE bench_base" -c "CREATE DATABASE bench_sys"
./target/release/bench-dispatch --bin-dir target/release \
  --baseline-store "$base/bench_base" --system-store "$base/bench_sys" "$@"
