#!/usr/bin/env bash
# Benchmark: TCP throughput and round-trip latency from the host to a runv
# pod and to a runc pod on the same CNI bridge (containerd's CRI plugin,
# Debian's bridge + host-local plugins), alternating runs in one invocation.
# Prints the medians and `ratio: X` (runv throughput / runc throughput) last.
#
# Usage: tests/bench/net.sh [RUNS] [MIB]   (default 3 runs of 16 MiB; needs
#        scripts/install.sh, root)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/runv/target}
cargo build --quiet --release -p containerd-shim-runv-v2
cargo run --quiet --release -p containerd-shim-runv-v2 --example net_bench -- "${1:-3}" "${2:-16}"
