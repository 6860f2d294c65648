#!/usr/bin/env bash
# Installs and builds everything (scripts/install.sh), then runs every
# check and test: rustfmt, clippy, unit tests, the agent on the host, and
# the end-to-end tests that boot real guests (QEMU; TCG where KVM cannot
# boot Linux). Run as root on Debian 12.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export RUNV_CACHE_DIR=${RUNV_CACHE_DIR:-/var/cache/runv}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$RUNV_CACHE_DIR/target}
cd "$repo"

"$repo/scripts/install.sh"

# Test-only packages: a registry for the image pull tests (they start their
# own on a loopback port). Debian enables its service on install; a test
# host needs no registry on :5000, so it is stopped and disabled again.
if [ "${RUNV_SKIP_APT:-0}" != 1 ] && ! command -v docker-registry >/dev/null; then
    echo "==> installing Debian packages for the tests: docker-registry" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
fi

# Validates Kubernetes manifests offline (the overhead test's RuntimeClass).
command -v kubernetes-validate >/dev/null || python3 -m pip install --quiet kubernetes-validate \
    || python3 -m pip install --quiet --break-system-packages kubernetes-validate

echo "==> runv check" >&2
runv check || true

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --quiet --release --workspace --all-targets -- -D warnings

echo "==> cargo test" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
# --show-output: a test that skips prints `SKIP <test>: <reason>`, which
# must reach the log even though the test passes.
cargo test --release --workspace -- --show-output 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# What was skipped and why, then one closing line for the whole run,
# summed over every test binary (a skipped test is counted as passed by
# cargo; it is counted once more here as skipped, with its reason above).
echo "==> attacks (tests/security.sh)" >&2
tests/security.sh --from-log "$log" || status=1
grep -E '^SKIP ' "$log" | sort -u || true
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     /^SKIP / { if (!seen[$0]++) s++ }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
