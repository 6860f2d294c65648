#!/usr/bin/env bash
# Benchmark: CRI RunPodSandbox -> first container running through
# containerd's CRI plugin, handler `runv` against `runc`, alternating runs
# in one invocation (containerd of its own, images made at run time).
# Prints both medians and `ratio: X` (runv / runc) last.
#
# Usage: tests/bench/pod.sh [RUNS]   (default 5; needs scripts/install.sh, root)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/runv/target}
cargo build --quiet --release -p containerd-shim-runv-v2
cargo run --quiet --release -p containerd-shim-runv-v2 --example pod_bench -- "${1:-5}"
