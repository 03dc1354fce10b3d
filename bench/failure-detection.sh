#!/usr/bin/env bash
# Failure detection: time from `kill -9` of one member to a survivor seeing it failed, for our
# gossip membership and for HashiCorp's Serf agent (Debian package `serf`), N = 3 and 10 on
# loopback, same probe settings (1 s / 500 ms), in one invocation; then a no-kill run of
# N = 10 counting false failures. Between them, the figure the farm acts on: kill -9 of a
# worker until a real transcode-scaler publishes ContainerFailureDetected. Not a test.
# Every process it starts is killed on exit.
#   bench/failure-detection.sh [--sizes 3,10] [--trials 3] [--quiet-seconds 300]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v serf >/dev/null || { echo "serf is not installed (apt-get install serf)" >&2; exit 1; }
cargo build --release -q -p transcode-bench --bin bench-failure
cargo build --release -q -p transcode-scaler --bin transcode-scaler
exec ./target/release/bench-failure --serf "$(command -v serf)" --bin-dir target/release "$@"
