#!/usr/bin/env bash
# Benchmark: process start -> first serial byte of a tiny PVH guest, for the
# built-in VMM (`runv-vmm`) and `qemu-system-x86_64 -M microvm` under the
# same KVM, alternating runs in one invocation; plus the built-in VMM's RSS
# with a 128 MiB guest. Prints the medians and `ratio: X` (ours / QEMU) last.
#
# Usage: tests/bench/vmm.sh [RUNS]   (default 10; needs /dev/kvm and QEMU)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/runv/target}
cargo build --quiet --release -p runv --bin runv-vmm --example vmm_bench
RUNV_VMM_BIN="$CARGO_TARGET_DIR/release/runv-vmm" "$CARGO_TARGET_DIR/release/examples/vmm_bench" "${1:-10}"
