#!/usr/bin/env bash
# scripts/l1.sh [OPTIONS] [--] COMMAND...
#
# Runs COMMAND inside an L1 KVM host: Debian 12's stock kernel booted by
# QEMU under TCG with `-cpu max`, whose emulated AMD SVM with nested paging
# gives L1 a /dev/kvm that boots Linux guests. L1's root is this machine's
# / (read-only 9p) under a tmpfs overlay, so the installed runv, its guest
# artifacts, containerd and the test binaries are all there, and whatever
# COMMAND writes stays in L1. COMMAND runs as root in the current directory
# with this environment's PATH and RUNV_*, RUST_*, CARGO_*, CI variables;
# its output comes back on stdout and its exit status is this script's.
# See scripts/l1/README.md.
#
# Options:
#   --memory MIB    L1 memory (default 4096)
#   --cpus N        L1 vCPUs (default 2)
#   --timeout S     give up after S seconds of wall time (default 3600)
#   --out DIR       share this host directory writable with L1, at the same
#                   path (where COMMAND leaves files for the host)
#   --prepare       only fetch and cache the L1 kernel and initramfs
#
# Exit status: COMMAND's, or 125 when L1 itself failed (the reason is the
# last line on stderr).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${RUNV_CACHE_DIR:-/var/cache/runv}/l1
memory=4096 cpus=2 timeout=3600 prepare=0 out=
die() { echo "l1: error: $*" >&2; exit 125; }
while [ $# -gt 0 ]; do
    case "$1" in
        --memory) memory=$2; shift 2 ;;
        --cpus) cpus=$2; shift 2 ;;
        --timeout) timeout=$2; shift 2 ;;
        --out) out=$(realpath "$2"); shift 2 ;;
        --prepare) prepare=1; shift ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see the head of $0)" ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || [ "$prepare" = 1 ] || die "no command given (usage: scripts/l1.sh [--] COMMAND...)"
[ "$(id -u)" = 0 ] || die "needs root (the host share is exported with passthrough ownership)"

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
/bin/busybox --list 2>/dev/null | grep -x insmod >/dev/null || need+=(busybox-static)
command -v depmod >/dev/null || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
    echo "l1: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || die "apt-get install ${need[*]} failed"
fi

# --- the L1 kernel and initramfs, cached by kernel package version ---------------
# The modules L1 loads, each with what it depends on (modprobe --show-depends
# puts them in load order): KVM, the shares, and what pods on L1 use.
modules="kvm-amd 9p 9pnet_virtio overlay virtio_pci tun veth bridge br_netfilter vhost_vsock sch_ingress cls_u32 act_mirred"
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }') || true
if [ -z "$pkg" ]; then
    pkg=$(ls -1 "$cache" 2>/dev/null | grep '^linux-image-' | sort -V | tail -n 1) || true
    [ -n "$pkg" ] || die "apt-cache does not name the kernel package of linux-image-amd64 and nothing is cached"
fi
key=$pkg-$(cat "$repo/scripts/l1/init" <(echo "$modules") | sha256sum | cut -c1-12)
dir=$cache/$key
if [ ! -f "$dir/l1.cpio" ]; then
    echo "l1: preparing $pkg (once; cached in $dir)" >&2
    mkdir -p "$cache"
    tmp=$(mktemp -d "$cache/.prepare.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || die "apt-get download $pkg failed"
    dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/x" || die "unpacking $pkg failed"
    kver=${pkg#linux-image-}
    depmod -b "$tmp/x" "$kver" || die "depmod for $kver failed"
    mkdir -p "$tmp/root/bin" "$tmp/root/modules" "$tmp/root/proc" "$tmp/root/sys" "$tmp/root/dev"
    for m in $modules; do
        modprobe -d "$tmp/x" -S "$kver" --show-depends "$m" || die "module $m is not in $pkg"
    done | awk '$1 == "insmod" { print $2 }' | awk '!seen[$0]++' >"$tmp/paths"
    while read -r p; do
        cp "$p" "$tmp/root/modules/"
        basename "$p" >>"$tmp/root/modules/order"
    done <"$tmp/paths"
    cp /bin/busybox "$tmp/root/bin/busybox"
    cp "$repo/scripts/l1/init" "$tmp/root/init"
    (cd "$tmp/root" && find . | cpio -o -H newc --quiet) >"$tmp/l1.cpio"
    mkdir -p "$tmp/out"
    mv "$tmp/l1.cpio" "$tmp/out/l1.cpio"
    cp "$tmp"/x/boot/vmlinuz-* "$tmp/out/vmlinuz"
    rm -rf "$dir"
    mv "$tmp/out" "$dir"
    rm -rf "$tmp"
    trap - EXIT
fi

# --- L1's own hypervisor: QEMU from Debian 12's backports, cached by version ----
# Debian 12's QEMU 7.2 emulates SVM with faults of its own: now and then it
# crashed L1's kernel outright (a stack guard page hit in error_entry on a
# VMM's vCPU thread; an IPI that the CPU running a nested guest never
# took, so a soft lockup in kvm_destroy_vm), faults no process in L1 can
# cause, and the nested guests' triple faults and stalls of #15 went with
# it. The QEMU of bookworm-backports (10.0) runs L1; the host's QEMU stays
# the product's backend (and L1's, inside L1). RUNV_L1_QEMU (a
# qemu-system-x86_64) overrides it.
qemu=${RUNV_L1_QEMU:-}
qemu_args=()
if [ -z "$qemu" ]; then
    apt_dir=$cache/apt
    apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$apt_dir/lists"
        -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    echo "deb http://deb.debian.org/debian bookworm-backports main" >"$apt_dir/sources.list"
    qver=
    if apt-get "${apt_opts[@]}" -qq update >/dev/null 2>&1; then
        qver=$(apt-cache "${apt_opts[@]}" show qemu-system-x86 2>/dev/null \
            | awk '/^Version:/ { print $2; exit }') || true
    fi
    if [ -z "$qver" ]; then
        # No index (offline): the newest QEMU already cached, else fail.
        qver=$(ls -1 "$cache" 2>/dev/null | sed -n 's/^qemu-//p' | sort -V | tail -n 1) || true
        [ -n "$qver" ] || die "cannot read bookworm-backports' index to fetch L1's QEMU, and none is cached"
        [ -x "$cache/qemu-$qver/usr/bin/qemu-system-x86_64" ] || die "the cached QEMU in $cache/qemu-$qver is incomplete"
    fi
    qdir=$cache/qemu-$(echo "${qver#*:}" | tr -c 'A-Za-z0-9.+\n' '_')   # no epoch, no '~'
    if [ ! -x "$qdir/usr/bin/qemu-system-x86_64" ]; then
        echo "l1: fetching QEMU $qver from bookworm-backports for L1 (once; cached in $qdir)" >&2
        tmp=$(mktemp -d "$cache/.qemu.XXXXXX")
        trap 'rm -rf "$tmp"' EXIT
        (cd "$tmp" && apt-get "${apt_opts[@]}" download "qemu-system-x86=$qver" "qemu-system-common=$qver" \
            "qemu-system-data=$qver" >/dev/null 2>&1) || die "apt-get download of QEMU $qver (bookworm-backports) failed"
        for deb in "$tmp"/*.deb; do dpkg-deb -x "$deb" "$tmp/x" || die "unpacking $deb failed"; done
        # The libraries it links, from Debian 12 itself (a backport is
        # built against Debian 12's).
        libs=$(dpkg-deb -f "$tmp"/qemu-system-x86_*.deb Depends | tr ',' '\n' | awk '$1 ~ /^lib/ { print $1 }')
        want=$(for l in $libs; do dpkg -s "$l" >/dev/null 2>&1 || echo "$l"; done | tr '\n' ' ')
        if [ -n "$want" ]; then
            echo "l1: installing what L1's QEMU links: $want" >&2
            # shellcheck disable=SC2086
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $want >/dev/null \
                || die "apt-get install $want failed"
        fi
        missing=$(ldd "$tmp/x/usr/bin/qemu-system-x86_64" | awk '/not found/ { print $1 }' | tr '\n' ' ')
        [ -z "$missing" ] || die "QEMU $qver needs libraries this host lacks: $missing"
        rm -rf "$qdir"
        mv "$tmp/x" "$qdir"
        rm -rf "$tmp"
        trap - EXIT
    fi
    qemu=$qdir/usr/bin/qemu-system-x86_64
    # Its own option ROMs, and the host's SeaBIOS (what Debian links in).
    qemu_args=(-L "$qdir/usr/share/qemu" -L /usr/share/seabios)
fi
"$qemu" --version >/dev/null 2>&1 || die "$qemu does not run"

if [ "$prepare" = 1 ]; then
    echo "$dir"
    exit 0
fi

# --- one run -------------------------------------------------------------------
run=$(mktemp -d /tmp/runv-l1.XXXXXX)
qemu_pid=
cleanup() {
    [ -n "$qemu_pid" ] && kill -9 "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null
    rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
{
    echo "set -e"
    for v in $(compgen -e); do
        case "$v" in
            PATH | HOME | TERM | RUNV_* | RUST_* | CARGO_* | CI) printf 'export %s=%q\n' "$v" "${!v}" ;;
        esac
    done
    printf 'cd %q || exit 125\n' "$PWD"
    echo "set +e"
    printf 'exec'
    printf ' %q' "$@"
    echo
} >"$run/cmd"
echo "$((memory * 3 / 4))m" >"$run/tmpfs_size"
share_out=()
if [ -n "$out" ]; then
    [ -d "$out" ] || die "--out $out is not a directory"
    echo "$out" >"$run/out_path"
    share_out=(-virtfs "local,path=$out,mount_tag=l1out,security_model=passthrough")
fi

# The console is L1's ttyS0 on stdout; `quiet` keeps the kernel's lines
# to warnings. The guest's exit status comes back in the run share.
# softlockup_panic=1: an L1 whose vCPUs stop scheduling (#15: seen as
# "watchdog: BUG: soft lockup" on both, then nothing until the timeout)
# panics once its watchdog notices (about 20 s) and, with panic=-1 and
# -no-reboot, QEMU exits: "L1 stopped before COMMAND finished" instead of
# an idle L1 holding the run for the whole timeout.
timeout --foreground -k 10 "$timeout" "$qemu" "${qemu_args[@]}" \
    -M q35,accel=tcg -cpu max -smp "$cpus" -m "$memory" \
    -kernel "$dir/vmlinuz" -initrd "$dir/l1.cpio" \
    -append "console=ttyS0 quiet loglevel=4 panic=-1 softlockup_panic=1 rdinit=/init ${RUNV_L1_APPEND:-}" \
    -display none -serial stdio -monitor none -no-reboot -nodefaults \
    -virtfs local,path=/,mount_tag=host,security_model=passthrough,readonly=on,multidevs=remap \
    -virtfs local,path="$run",mount_tag=l1run,security_model=passthrough \
    "${share_out[@]}" \
    </dev/null &
qemu_pid=$!
set +e
# Once COMMAND's status is back, L1 powers off; a QEMU still running 15 s
# later (seen: TCG spinning both vCPUs after L1's "reboot: Power down",
# until the timeout) is ended: the run is over either way.
# L1's init writes a heartbeat every 10 s while COMMAND runs; one silent
# for $stall_after s means L1 stopped making progress (#15: its vCPUs stop
# scheduling, sometimes without a word on the console), and the run is
# ended then rather than at the timeout.
stall_after=120
stalled=
while kill -0 "$qemu_pid" 2>/dev/null; do
    if [ -s "$run/rc" ]; then
        for _ in $(seq 30); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.5; done
        pkill -9 -P "$qemu_pid" 2>/dev/null
        break
    fi
    if [ -f "$run/heartbeat" ] && [ $(($(date +%s) - $(stat -c %Y "$run/heartbeat"))) -gt "$stall_after" ]; then
        stalled=1
        pkill -9 -P "$qemu_pid" 2>/dev/null
        kill -9 "$qemu_pid" 2>/dev/null
        break
    fi
    sleep 1
done
wait "$qemu_pid" 2>/dev/null  # (no "Killed" job report when a stall ended it)
status=$?
set -e
qemu_pid=
if [ -f "$run/rc" ]; then
    exit "$(cat "$run/rc")"
fi
[ -n "$stalled" ] && die "L1 stopped making progress: no heartbeat for ${stall_after}s (its console is above)"
[ "$status" = 124 ] && die "L1 did not finish within ${timeout}s"
die "L1 stopped before COMMAND finished (qemu exit status $status; its console is above)"
