#!/usr/bin/env bash
# Fuzzes every parser of guest or client bytes with cargo-fuzz/libFuzzer:
#   agent/fuzz  decode_request  the agent's requests (protobuf + OCI JSON)
#   fuzz/       virtio_mmio     the VMM's virtio-blk, -net and -vsock behind
#                               the MMIO transport: registers, descriptor
#                               tables, rings and buffers a guest fills
#               vsock_muxer     hybrid-vsock packets from the guest
#               layer_unpack    image layers (tar) into the store
#               cri_spec        CRI requests into OCI specs
#               cri_http2       the HTTP/2 frames of CRI clients (header
#                               blocks rewritten for :authority)
#               port_forward_answer  the agent's answer to a port-forward
#                               request, read on the host
#               spdy_frames     the SPDY/3.1 frames of streaming clients
#                               (zlib-compressed header blocks)
# Each target runs SECONDS (default 60) from its committed seeds
# (`<crate>/seeds/<target>`) plus a work corpus kept in
# $RUNV_CACHE_DIR/fuzz-corpus, and prints
# `FUZZ <target>: N runs, 0 crashes` (or `FUZZ <target>: CRASH <file>`, or
# `FUZZ <target>: FAILED to run ...` with the build's first error);
# the last line is `fuzz: N targets, N runs, C crashes, F failed to run`.
# Exit status 1 on any crash or a target that did not run. Installs cargo-fuzz when missing; stable Rust takes the
# sanitizer flags with RUSTC_BOOTSTRAP=1.
#
# Usage: tests/fuzz.sh [SECONDS] [TARGET...]
set -uo pipefail
secs=${1:-60}
shift || true
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${RUNV_CACHE_DIR:-/var/cache/runv}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(decode_request virtio_mmio vsock_muxer layer_unpack cri_spec cri_http2 port_forward_answer spdy_frames)
command -v cargo-fuzz >/dev/null || cargo install --quiet --locked cargo-fuzz || exit 1
export RUSTC_BOOTSTRAP=1
# One target dir per fuzz crate, outside the repo, kept between runs.
export CARGO_TARGET_DIR=$cache/fuzz-target

runs_total=0 crashes=0 failed=0 n=0
for t in "${targets[@]}"; do
    case "$t" in
        decode_request) crate=$repo/agent/fuzz ;;
        *) crate=$repo/fuzz ;;
    esac
    corpus=$cache/fuzz-corpus/$t
    seeds=$crate/seeds/$t
    mkdir -p "$corpus" "$seeds" "$crate/artifacts/$t"
    log=$(mktemp)
    (cd "$crate" && cargo fuzz run --release "$t" "$corpus" "$seeds" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1) >"$log" 2>&1
    rc=$?
    runs=$(awk '/^stat::number_of_executed_units:/ { print $2 }' "$log" | tail -n 1)
    n=$((n + 1))
    runs_total=$((runs_total + ${runs:-0}))
    if [ "$rc" != 0 ]; then
        artifact=$(grep -oE "Test unit written to [^ ]+" "$log" | tail -n 1 | cut -d' ' -f5)
        tail -n 40 "$log" >&2
        if [ -n "$artifact" ]; then
            crashes=$((crashes + 1))
            echo "FUZZ $t: CRASH $artifact"
        else
            # No input was written: the target did not build or start (its
            # first error line says why), or libFuzzer stopped on its own.
            failed=$((failed + 1))
            why=$(grep -m 1 -E "^error(\[E[0-9]+\])?:|ERROR:" "$log" | cut -c 1-300)
            echo "FUZZ $t: FAILED to run (exit status $rc): ${why:-see the last lines of its log above}"
        fi
    else
        echo "FUZZ $t: ${runs:-0} runs, 0 crashes"
    fi
    rm -f "$log"
done
echo "fuzz: $n targets, $runs_total runs, $crashes crashes, $failed failed to run"
[ "$crashes" = 0 ] && [ "$failed" = 0 ]
