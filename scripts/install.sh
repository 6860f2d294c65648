#!/usr/bin/env bash
# Installs everything runv needs on a Debian 12 host, builds runv, the
# static guest agent, the guest kernel (cached), the agent's image and the
# default rootfs, and installs them under $PREFIX (default /usr/local).
# Safe to re-run: every step skips what is already there and current.
#
# Environment:
#   PREFIX            install prefix (default /usr/local)
#   RUNV_CACHE_DIR    kernel and build cache (default /var/cache/runv)
#   CARGO_TARGET_DIR  cargo's target dir (default $RUNV_CACHE_DIR/target)
#   RUNV_SKIP_APT=1   do not install Debian packages
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=${PREFIX:-/usr/local}
export RUNV_CACHE_DIR=${RUNV_CACHE_DIR:-/var/cache/runv}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$RUNV_CACHE_DIR/target}
share=$prefix/share/runv
host_target=x86_64-unknown-linux-gnu

step() { echo "==> $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (it installs packages and writes $prefix)" >&2
    exit 1
fi

# --- Debian packages ---------------------------------------------------------
apt_packages=(
    qemu-system-x86         # the QEMU backend (microvm machine)
    linux-source-6.1        # guest kernel source
    build-essential bc bison flex libelf-dev libssl-dev  # kernel build
    busybox-static          # default rootfs
    e2fsprogs file          # the agent's image (mke2fs -d)
    cpio                    # the L1 rig's initramfs (scripts/l1.sh)
    libcap-ng-dev libseccomp-dev pkg-config  # virtiofsd build
    protobuf-compiler       # CRI protos
    containerd runc         # the containerd runtime path and its tests
    containernetworking-plugins iproute2  # CNI bridge/host-local for pod network tests; ip, tc
    xz-utils
)
if [ "${RUNV_SKIP_APT:-0}" != 1 ]; then
    missing=()
    for p in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        step "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

# --- helpers from crates.io ----------------------------------------------------
cargo_tool() { # name version binary
    if [ -x "$prefix/bin/$3" ] && "$prefix/bin/$3" --version 2>/dev/null | grep -q "$2"; then
        return
    fi
    step "building $1 $2 from crates.io"
    cargo install --quiet --locked --root "$prefix" "$1@$2"
}
cargo_tool virtiofsd 1.14.0 virtiofsd
cargo_tool vhost-device-vsock 0.3.0 vhost-device-vsock

# --- runv itself and the static agent --------------------------------------------
step "building runv, runv-vmm and containerd-shim-runv-v2"
cargo build --quiet --release --manifest-path "$repo/Cargo.toml" -p runv -p containerd-shim-runv-v2
step "building the static guest agent"
# libcontainer links libseccomp: statically, from Debian's libseccomp-dev.
# The agent's pages live in guest memory (the page cache of its image), so
# build it for size.
LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
CARGO_PROFILE_RELEASE_OPT_LEVEL=s CARGO_PROFILE_RELEASE_LTO=fat \
CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 CARGO_PROFILE_RELEASE_STRIP=true \
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --release --manifest-path "$repo/Cargo.toml" -p runv-agent --target "$host_target"

# --- guest kernel, the agent's image, rootfs -----------------------------------------
step "guest kernel"
vmlinux=$("$repo/guest-kernel/build.sh" | tail -n 1)

mkdir -p "$share" "$prefix/bin"
step "the agent's image"
"$repo/guest-kernel/agent-image.sh" "$CARGO_TARGET_DIR/$host_target/release/runv-agent" "$share/agent.img"
# What earlier releases booted from; nothing reads it now.
rm -f "$share/initramfs.cpio"
step "default rootfs"
"$repo/scripts/make-rootfs.sh" "$share/rootfs"

install -m 0644 "$vmlinux" "$share/vmlinux.new" && mv "$share/vmlinux.new" "$share/vmlinux"
for bin in runv runv-vmm containerd-shim-runv-v2; do
    install -m 0755 "$CARGO_TARGET_DIR/release/$bin" "$prefix/bin/$bin.new"
    mv "$prefix/bin/$bin.new" "$prefix/bin/$bin"
done
step "installed: $prefix/bin/runv, $prefix/bin/runv-vmm, $prefix/bin/containerd-shim-runv-v2, $share/{vmlinux,agent.img,rootfs}"
