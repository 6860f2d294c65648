#!/usr/bin/env bash
# Builds runv's Debian package from what scripts/install.sh installs (it
# runs it first; that step is quick when nothing changed):
#
#   /usr/bin/runv, /usr/bin/runv-vmm, /usr/bin/containerd-shim-runv-v2
#   /usr/libexec/runv/virtiofsd, /usr/libexec/runv/vhost-device-vsock
#   /usr/share/runv/{vmlinux,agent.img,rootfs/}
#   /etc/runv/config.toml (a conffile: deploy/config.toml with the
#       package's paths; local changes survive upgrades)
#   /lib/systemd/system/runv-cri.service (not enabled: for nodes without
#       containerd)
#   /lib/systemd/system/runv-monitor.service (not enabled: the node's
#       metrics endpoint for runv shims under containerd, on 127.0.0.1:9465)
#   /usr/share/doc/runv/ (README, the containerd entry, the RuntimeClass)
#
# Usage: scripts/package.sh [OUT_DIR]   (default: target dir's debian/)
# Environment: RUNV_DEB_VERSION overrides the version (default: runv's
# Cargo.toml version); RUNV_PACKAGE_SKIP_INSTALL=1 packs what is installed
# without running install.sh; the rest as scripts/install.sh.
# Prints the .deb's path last.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
export RUNV_CACHE_DIR=${RUNV_CACHE_DIR:-/var/cache/runv}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$RUNV_CACHE_DIR/target}
out=${1:-$CARGO_TARGET_DIR/debian}
step() { echo "==> $*" >&2; }

# Everything is built by the one install path: the package holds exactly
# what install.sh installs under $PREFIX (default /usr/local).
prefix=${PREFIX:-/usr/local}
[ "${RUNV_PACKAGE_SKIP_INSTALL:-0}" = 1 ] || "$repo/scripts/install.sh" >&2

version=${RUNV_DEB_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -n 1)}
[ -n "$version" ] || { echo "package.sh: no version in Cargo.toml" >&2; exit 1; }
arch=$(dpkg --print-architecture)
step "packaging runv $version ($arch)"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -d "$root/DEBIAN" "$root/usr/bin" "$root/usr/libexec/runv" "$root/usr/share/runv" \
    "$root/etc/runv" "$root/lib/systemd/system" "$root/usr/share/doc/runv"
for bin in runv runv-vmm containerd-shim-runv-v2; do
    install -m 0755 "$prefix/bin/$bin" "$root/usr/bin/$bin"
done
for helper in virtiofsd vhost-device-vsock; do
    install -m 0755 "$prefix/bin/$helper" "$root/usr/libexec/runv/$helper"
done
install -m 0644 "$prefix/share/runv/vmlinux" "$prefix/share/runv/agent.img" "$root/usr/share/runv/"
cp -a "$prefix/share/runv/rootfs" "$root/usr/share/runv/rootfs"

# The default config with the package's paths: absolute, so that nothing
# else on PATH (a /usr/local install) stands in for the package's own.
sed -e 's|^kernel = .*|kernel = "/usr/share/runv/vmlinux"|' \
    -e 's|^agent_image = .*|agent_image = "/usr/share/runv/agent.img"|' \
    -e 's|^rootfs = .*|rootfs = "/usr/share/runv/rootfs"|' \
    -e 's|^vmm = .*|vmm = "/usr/bin/runv-vmm"|' \
    -e 's|^virtiofsd = .*|virtiofsd = "/usr/libexec/runv/virtiofsd"|' \
    -e 's|^vhost_vsock = .*|vhost_vsock = "/usr/libexec/runv/vhost-device-vsock"|' \
    -e 's|^cri_shim = .*|cri_shim = "/usr/bin/containerd-shim-runv-v2"|' \
    "$repo/deploy/config.toml" > "$root/etc/runv/config.toml"
for key in kernel agent_image rootfs vmm virtiofsd vhost_vsock cri_shim; do
    grep -q "^$key = \"/usr/" "$root/etc/runv/config.toml" \
        || { echo "package.sh: deploy/config.toml has no '$key = ...' line to point at the package" >&2; exit 1; }
done
chmod 0644 "$root/etc/runv/config.toml"

cat > "$root/lib/systemd/system/runv-cri.service" <<'EOF'
[Unit]
Description=runv CRI server: every pod in its own microVM (for nodes without containerd)
Documentation=file:/usr/share/doc/runv/README.md
After=network-online.target local-fs.target
Wants=network-online.target

[Service]
ExecStart=/usr/bin/runv cri --listen /run/runv/cri.sock
Restart=always
RestartSec=2
# Pods outlive a restart of the server: their shims are not the server's
# to stop (runv cri reconnects to them), as with containerd's unit.
KillMode=process
Delegate=yes
LimitNOFILE=1048576
TasksMax=infinity
OOMScoreAdjust=-999

[Install]
WantedBy=multi-user.target
EOF

cat > "$root/lib/systemd/system/runv-monitor.service" <<'EOF'
[Unit]
Description=runv monitor: Prometheus metrics of every runv sandbox containerd runs
Documentation=file:/usr/share/doc/runv/README.md
After=containerd.service

[Service]
ExecStart=/usr/bin/runv monitor --metrics-address 127.0.0.1:9465
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
EOF

install -m 0644 "$repo/README.md" "$repo/deploy/containerd-config.toml" "$repo/deploy/runtimeclass.yaml" \
    "$root/usr/share/doc/runv/"
cat > "$root/usr/share/doc/runv/copyright" <<'EOF'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: runv
Files: *
License: Apache-2.0
EOF

echo /etc/runv/config.toml > "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: runv
Version: $version
Architecture: $arch
Maintainer: runv developers <runv@localhost>
Installed-Size: $size
Depends: qemu-system-x86, libseccomp2, libcap-ng0, iproute2
Recommends: containerd, containernetworking-plugins
Section: admin
Priority: optional
Homepage: https://github.com/runv
Description: VM-isolated Kubernetes pods (containerd shim v2 and CRI server)
 runv runs each Kubernetes pod in its own KVM microVM: a containerd shim v2
 (runtime handler runv), a built-in VMM and a QEMU backend, the guest
 kernel and agent, and a bundled CRI server for nodes without containerd.
EOF

cat > "$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
EOF
cat > "$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop runv-cri.service runv-monitor.service >/dev/null 2>&1 || true
fi
exit 0
EOF
# Purge removes what runv wrote at run time: image store and CRI state,
# per-sandbox runtime state, boot probe results.
cat > "$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
case "$1" in
    purge)
        rm -rf /var/lib/runv /run/runv /var/cache/runv/probes
        rmdir /var/cache/runv 2>/dev/null || true
        rmdir /etc/runv 2>/dev/null || true
        ;;
esac
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/runv_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
step "built $deb"
echo "$deb"
