#!/usr/bin/env bash
# Benchmark: CRI RunPodSandbox -> first container running through `runv cri`
# and through containerd's CRI plugin with the `runv` handler (the same shim
# and guest), alternating runs in one invocation (images made at run time:
# pushed to a loopback registry for runv cri, imported into containerd).
# Prints both medians and `ratio: X` (runv cri / containerd) last.
#
# Usage: tests/bench/cri.sh [RUNS]   (default 5; needs scripts/install.sh, root)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/runv/target}
cargo build --quiet --release -p containerd-shim-runv-v2 -p runv
cargo run --quiet --release -p runv --example cri_bench -- "${1:-5}"
