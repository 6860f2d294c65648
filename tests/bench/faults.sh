#!/usr/bin/env bash
# The fault matrix (examples/faults.rs): through containerd's CRI plugin
# (runv handler) and through `runv cri`, each part of a pod (the VM,
# virtiofsd, vhost-device-vsock, the shim, the guest, the CRI server, and
# the VM while the server is down) SIGKILLed in each phase (booting,
# creating, running, exec, stopping).
# After each: the request in flight returns, the server answers, the pod
# reports NotReady with a reason (Ready again after a server restart), its
# removal succeeds, and a census of the host (processes, mounts, links,
# netns, cgroups, files, CNI leases, shim sockets, loop devices) matches
# the one before. Prints each case and `cycles: N, leaked: M, failed: F`.
#
# Usage: tests/bench/faults.sh [ROUNDS|short]
#   ROUNDS (default 2): the whole matrix ROUNDS times (68 cases a round
#   on QEMU); short: one case per part and way (what CI runs).
# Needs scripts/install.sh and root.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/runv/target}
cargo build --quiet --release -p containerd-shim-runv-v2 -p runv
cargo run --quiet --release -p runv --example faults -- "${1:-2}"
