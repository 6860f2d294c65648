#!/usr/bin/env bash
# Builds the runv initramfs: the static runv-agent as /init and the empty
# mount points it needs. Uncompressed newc cpio (the guest kernel has no
# decompressors built in).
#
# Usage: guest-kernel/initramfs.sh AGENT_BINARY OUTPUT.cpio
set -euo pipefail
agent=${1:?usage: initramfs.sh AGENT_BINARY OUTPUT.cpio}
out=${2:?usage: initramfs.sh AGENT_BINARY OUTPUT.cpio}

if ! file -b "$agent" 2>/dev/null | grep -q "statically linked\|static-pie linked"; then
    if command -v file >/dev/null; then
        echo "initramfs: $agent is not statically linked" >&2
        exit 1
    fi
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{dev,proc,sys,run,tmp}
install -m 0755 "$agent" "$stage/init"
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) > "$out.tmp"
mv "$out.tmp" "$out"
echo "initramfs: $out ($(($(stat -c %s "$out") / 1024)) KiB)" >&2
