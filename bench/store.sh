#!/usr/bin/env bash
# Store benchmark: starts a throwaway PostgreSQL (durable settings) through scripts/services.sh,
# builds bench-store in release mode, and runs it on a fresh database, then on SQLite.
# Prints ratios against the single-row baseline of the same run. Not a test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
state=$(mktemp -d /tmp/transcode-bench.XXXXXX)
trap '"$root/scripts/services.sh" stop "$state" >/dev/null 2>&1 || true; rm -rf "$state"' EXIT
"$root/scripts/services.sh" start "$state" >/dev/null
# shellcheck disable=SC1091
source "$state/env"
cargo build --release -q -p transcode-bench --bin bench-store
db="bench_$$"
psql "$TRANSCODE_TEST_PG_URL" -qc "CREATE DATABASE $db"
echo "== PostgreSQL"
./target/release/bench-store --store "${TRANSCODE_TEST_PG_URL%/*}/$db" "$@"
echo "== SQLite (WAL, synchronous=FULL)"
./target/release/bench-store --store "sqlite://$state/bench.db" "$@"
