#!/usr/bin/env bash
# The attack suite: real attacks on the real stack (root in the guest
# through the opt-in debug console against containerd's CRI, the shim,
# QEMU, virtiofsd and the agent) and hostile bytes against the host code
# that guest and image bytes reach (the layer unpacker, fd-based path
# handling, the vsock muxer, OOM events, ExecSync output, the console).
#
# Every attack test is named `attack_*` (or is the end-to-end
# `root_in_the_guest_gets_nothing_on_the_host`) and prints
# `ATTACK <name>: tried`, then `ATTACK <name>: held` once the host held, or
# `ATTACK <name>: ESCAPED <what>`. An attack that was tried and neither held
# nor escaped (its test panicked) counts as escaped. The last line is
# `attacks: N tried, H held, E escaped`; exit status 1 unless E is 0 and N > 0.
#
# Usage: tests/security.sh               build and run the attack tests
#        tests/security.sh --from-log F  count a test run's log (scripts/test.sh)
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export RUNV_CACHE_DIR=${RUNV_CACHE_DIR:-/var/cache/runv}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$RUNV_CACHE_DIR/target}

if [ "${1:-}" = "--from-log" ]; then
    log=$2
else
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    cd "$repo"
    for target in "-p runv --lib" "-p containerd-shim-runv-v2 --bins" "-p containerd-shim-runv-v2 --test security"; do
        # shellcheck disable=SC2086
        cargo test --release $target -- --show-output --test-threads=1 attack_ root_in_the_guest 2>&1 | tee -a "$log"
    done
fi

grep -E '^ATTACK ' "$log" | sort -u
awk '/^ATTACK .*: tried$/ { name = $0; sub(/^ATTACK /, "", name); sub(/: tried$/, "", name); tried[name] = 1 }
     /^ATTACK .*: held$/ { name = $0; sub(/^ATTACK /, "", name); sub(/: held$/, "", name); held[name] = 1 }
     /^ATTACK .*: ESCAPED/ { name = $0; sub(/^ATTACK /, "", name); sub(/: ESCAPED.*$/, "", name); escaped[name] = 1 }
     END {
         n = 0; h = 0; e = 0
         for (a in tried) { n++; if ((a in held) && !(a in escaped)) h++; else e++ }
         printf "attacks: %d tried, %d held, %d escaped\n", n, h, e
         exit (e == 0 && n > 0) ? 0 : 1
     }' "$log"
