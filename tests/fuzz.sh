#!/usr/bin/env bash
# Fuzzes the agent's request decoding (agent/fuzz, cargo-fuzz + libFuzzer)
# for SECONDS (default 60). Installs cargo-fuzz when missing. Stable Rust
# takes the sanitizer flags with RUSTC_BOOTSTRAP=1.
#
# Usage: tests/fuzz.sh [SECONDS]
set -euo pipefail
secs=${1:-60}
cd "$(dirname "$0")/../agent/fuzz"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
mkdir -p corpus/decode_request
RUSTC_BOOTSTRAP=1 cargo fuzz run decode_request corpus/decode_request -- -max_total_time="$secs" -rss_limit_mb=2048
