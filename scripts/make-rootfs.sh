#!/usr/bin/env bash
# Builds the embedded default rootfs of `runv run`: Debian's busybox-static
# with its applets linked in /bin, and the few files a shell expects.
#
# Usage: scripts/make-rootfs.sh OUTPUT_DIR
set -euo pipefail
out=${1:?usage: make-rootfs.sh OUTPUT_DIR}
busybox=${BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "make-rootfs: $busybox not found (install busybox-static)" >&2; exit 1; }

stage=$(mktemp -d "${out%/}.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,etc,tmp,root,run,var,home}
chmod 1777 "$stage/tmp"
chmod 0700 "$stage/root"
install -m 0755 "$busybox" "$stage/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$stage/bin/$applet"
done
cat > "$stage/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat > "$stage/etc/group" <<'G'
root:x:0:
nogroup:x:65534:
G
echo runv > "$stage/etc/hostname"
chmod 0755 "$stage"
rm -rf "$out"
mv "$stage" "$out"
trap - EXIT
echo "rootfs: $out ($(ls "$out/bin" | wc -l) entries in /bin)" >&2
