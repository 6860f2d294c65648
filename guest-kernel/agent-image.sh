#!/usr/bin/env bash
# Builds the agent's image: the guest's read-only root, a small ext4
# filesystem (no journal) holding the static runv-agent as /init and the
# empty mount points it needs. Every VM attaches it read-only as its first
# virtio-blk disk and boots with root=/dev/vda; the guest keeps in its page
# cache only the pages of the agent it touches (about 3 MiB of 7.5),
# where an initramfs would hold all of it in RAM twice (the archive, then
# the unpacked file on a tmpfs root).
#
# Usage: guest-kernel/agent-image.sh AGENT_BINARY OUTPUT.img
set -euo pipefail
agent=${1:?usage: agent-image.sh AGENT_BINARY OUTPUT.img}
out=${2:?usage: agent-image.sh AGENT_BINARY OUTPUT.img}

if command -v file >/dev/null && ! file -b "$agent" | grep -q "statically linked\|static-pie linked"; then
    echo "agent-image: $agent is not statically linked" >&2
    exit 1
fi
command -v mke2fs >/dev/null || { echo "agent-image: mke2fs not found (apt-get install e2fsprogs)" >&2; exit 1; }

stage=$(mktemp -d)
trap 'rm -rf "$stage" "$out.tmp"' EXIT
mkdir -p "$stage"/{dev,proc,sys,run,tmp}
install -m 0755 "$agent" "$stage/init"
# The agent plus a tenth and 1 MiB for the filesystem's own blocks.
size_kib=$(( $(du -sk --apparent-size "$stage" | cut -f1) * 11 / 10 + 1024 ))
rm -f "$out.tmp"
truncate -s "${size_kib}k" "$out.tmp"
mke2fs -q -F -t ext4 -O ^has_journal -b 4096 -m 0 -N 64 -L runv-agent \
    -E root_owner=0:0 -d "$stage" "$out.tmp"
chmod 0644 "$out.tmp"
mv "$out.tmp" "$out"
echo "agent-image: $out ($(($(stat -c %s "$out") / 1024)) KiB)" >&2
