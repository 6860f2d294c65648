#!/usr/bin/env bash
# Concurrent starts (examples/concurrent.rs): PODS pods at once through
# containerd + runc (the baseline), containerd + runv and `runv cri`, on a
# CNI bridge network, each with a container and an ExecSync, then all
# removed at once. Prints starts/s, p50 and p99 start time, failures, hangs
# and leaks for each, and `ratio: X` (runv handler p50 / runc p50) last.
#
# Usage: tests/bench/concurrent.sh [PODS]   (default 20; CI runs 4)
# Needs scripts/install.sh and root.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/runv/target}
cargo build --quiet --release -p containerd-shim-runv-v2 -p runv
cargo run --quiet --release -p runv --example concurrent -- "${1:-20}"
