#!/usr/bin/env bash
# Builds the runv guest kernel (uncompressed vmlinux with the PVH entry) from
# Debian's linux-source-6.1 and the fragment beside this script.
#
# The result is cached outside the repository, keyed by a hash of the source
# package version, the fragment and this script, so a second run is instant:
#   $RUNV_CACHE_DIR/kernel/<key>/vmlinux      (default /var/cache/runv)
# Prints the path of the vmlinux as its last line.
#
# Usage: guest-kernel/build.sh [--print-key]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${RUNV_CACHE_DIR:-/var/cache/runv}
fragment=$here/runv.config
tarball=/usr/src/linux-source-6.1.tar.xz
jobs=${RUNV_KERNEL_JOBS:-$(nproc)}

if [ ! -f "$tarball" ]; then
    echo "guest-kernel: $tarball not found; install Debian's linux-source-6.1 package" >&2
    exit 1
fi

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$src_version"; cat "$fragment" "$0"; } | sha256sum | cut -c1-16)
if [ "${1:-}" = "--print-key" ]; then
    echo "$key"
    exit 0
fi

out=$cache/kernel/$key
if [ -f "$out/vmlinux" ]; then
    echo "guest-kernel: cached ($key)" >&2
    echo "$out/vmlinux"
    exit 0
fi

work=$cache/kernel/build-$key
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

echo "guest-kernel: unpacking linux-source $src_version" >&2
tar -xf "$tarball" -C "$work"
ksrc=$work/linux-source-6.1

echo "guest-kernel: configuring (tinyconfig + runv.config)" >&2
make -C "$ksrc" -s tinyconfig >/dev/null
"$ksrc/scripts/kconfig/merge_config.sh" -m -O "$ksrc" "$ksrc/.config" "$fragment" >/dev/null
make -C "$ksrc" -s olddefconfig >/dev/null

# A requested option that did not survive olddefconfig means a missing
# dependency in the fragment: fail loudly instead of booting a guest without it.
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=y) opt=${line%%=*}
            grep -qx "$opt=y" "$ksrc/.config" || { echo "guest-kernel: $opt=y did not stick" >&2; missing=1; } ;;
        CONFIG_*=n) opt=${line%%=*}
            if grep -q "^$opt=" "$ksrc/.config"; then echo "guest-kernel: $opt is set but the fragment turns it off" >&2; missing=1; fi ;;
    esac
done < "$fragment"
[ "$missing" = 0 ] || exit 1

# The entry text gets a 2 MiB page of its own (`ALIGN(PMD_SIZE)` on both
# sides: 4 MiB of zero padding inside .text, which the kernel never frees)
# only for page-table isolation to map it into user page tables. This
# kernel has none (tinyconfig leaves CPU_MITIGATIONS off: in runv's threat
# model root in the guest is assumed, so the guest kernel is no boundary),
# so the padding goes and the guest keeps 4 MiB more of its RAM. With
# isolation or SRSO (which places code at fixed offsets there) on, it stays.
lds=$ksrc/arch/x86/kernel/vmlinux.lds.S
if grep -qE '^CONFIG_(PAGE_TABLE_ISOLATION|MITIGATION_PAGE_TABLE_ISOLATION|CPU_SRSO|MITIGATION_SRSO)=y' "$ksrc/.config"; then
    echo "guest-kernel: page-table isolation or SRSO is on; the entry text keeps its 2 MiB alignment" >&2
else
    align=$'^(#define ALIGN_ENTRY_TEXT_(BEGIN|END))\t\. = ALIGN\(PMD_SIZE\);$'
    n=$(grep -cE "$align" "$lds" || true)
    if [ "$n" != 2 ]; then
        echo "guest-kernel: $lds does not align the entry text as this script expects ($n of 2 lines); update this step" >&2
        exit 1
    fi
    sed -i -E "s/$align/\\1/" "$lds"
fi

echo "guest-kernel: building vmlinux with $jobs jobs (several minutes)" >&2
start=$(date +%s)
make -C "$ksrc" -j"$jobs" vmlinux 2>&1 | while IFS= read -r l; do
    case "$l" in
        *" LD "*|*error*|*Error*) echo "guest-kernel: $l" >&2 ;;
        *" CC "*) n=$((${n:-0} + 1)); [ $((n % 250)) = 0 ] && echo "guest-kernel: $n files compiled" >&2 ;;
    esac
done
[ "${PIPESTATUS[0]}" = 0 ] || { echo "guest-kernel: build failed" >&2; exit 1; }

mkdir -p "$out.tmp"
cp "$ksrc/vmlinux" "$out.tmp/vmlinux"
cp "$ksrc/.config" "$out.tmp/config"
cp "$ksrc/System.map" "$out.tmp/System.map"
make -C "$ksrc" -s kernelrelease > "$out.tmp/release"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "guest-kernel: built in $(( $(date +%s) - start ))s ($key)" >&2
echo "$out/vmlinux"
