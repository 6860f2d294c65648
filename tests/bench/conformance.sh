#!/usr/bin/env bash
# CRI conformance as a table: the same specs (what Kubernetes expects of a
# pod) against containerd's CRI plugin with the runc handler (the
# baseline), containerd with the runv handler, and `runv cri`, each with
# ids as those servers make them. A spec where a VM cannot do what runc
# does checks what runv does instead (the README table "How runv pods
# differ from runc pods") and is marked "differs (by design)".
# Prints the table and, last, `N passed, N failed`; exits non-zero on a
# failure. The specs are listed in examples/conformance.rs.
#
# Usage: tests/bench/conformance.sh [SPEC,SPEC...]   (default: every spec;
# needs scripts/install.sh, root)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/runv/target}
if [ -n "${1:-}" ]; then
    export RUNV_CONFORMANCE_SPECS=$1
fi
cargo build --quiet --release -p containerd-shim-runv-v2 -p runv
cargo run --quiet --release -p runv --example conformance
