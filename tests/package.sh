#!/usr/bin/env bash
# The Debian package, installed for real with dpkg: build two versions
# (scripts/package.sh), install the first, `runv check` and `runv run` from
# the package's own paths, change the conffile, upgrade to the second (the
# change survives, the version moves), purge, and check that nothing the
# package or runv wrote is left. Needs root, dpkg and what install.sh
# builds; skips with a printed reason where the host already has a runv
# package (it is not this test's to remove).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/runv/target}

fail() { echo "package test FAILED: $*" >&2; exit 1; }
if [ "$(id -u)" != 0 ]; then echo "SKIP package test: needs root"; exit 0; fi
if [[ "$(dpkg-query -W -f='${Status}' runv 2>/dev/null)" == *installed* ]]; then
    echo "SKIP package test: a runv package is already installed on this host"
    exit 0
fi

work=$(mktemp -d)
cleanup() {
    dpkg -P runv >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

v1=$(RUNV_DEB_VERSION=0.1.0~pkgtest1 "$repo/scripts/package.sh" "$work/v1" | tail -n 1)
v2=$(RUNV_PACKAGE_SKIP_INSTALL=1 RUNV_DEB_VERSION=0.1.0~pkgtest2 "$repo/scripts/package.sh" "$work/v2" | tail -n 1)
echo "package: built $(basename "$v1") ($(du -k "$v1" | cut -f1) KiB) and $(basename "$v2")"
case "$(dpkg-deb --field "$v1" Depends)" in *qemu-system-x86*) ;; *) fail "the control file lacks its Depends" ;; esac

dpkg -i "$v1" >/dev/null || fail "dpkg -i $v1"
[ "$(dpkg-query -W -f='${Version}' runv)" = 0.1.0~pkgtest1 ] || fail "version after install"
dpkg -L runv > "$work/files"
for f in /usr/bin/runv /usr/bin/runv-vmm /usr/bin/containerd-shim-runv-v2 /usr/libexec/runv/virtiofsd \
    /usr/libexec/runv/vhost-device-vsock /usr/share/runv/vmlinux /usr/share/runv/agent.img \
    /usr/share/runv/rootfs/bin/busybox /etc/runv/config.toml /lib/systemd/system/runv-cri.service \
    /lib/systemd/system/runv-monitor.service /usr/share/doc/runv/containerd-config.toml; do
    [ -e "$f" ] || fail "$f is not installed"
done
if command -v systemd-analyze >/dev/null; then
    for unit in runv-cri runv-monitor; do
        systemd-analyze verify "/lib/systemd/system/$unit.service" 2>&1 | grep -v "^$" | grep -iv "network-online\|containerd.service" \
            && fail "systemd-analyze verify complains about $unit.service" || true
    done
fi

# The package's runv, with the package's config (the default path), uses
# the package's files: its check names them and a VM runs.
check=$(/usr/bin/runv check 2>&1) || fail "runv check: $check"
grep -q "ok   virtiofsd           /usr/libexec/runv/virtiofsd" <<< "$check" || fail "check did not use the package's virtiofsd: $check"
grep -q "ok   kernel              /usr/share/runv/vmlinux" <<< "$check" || fail "check did not use the package's kernel: $check"
out=$(timeout 300 /usr/bin/runv run -- sh -c 'echo hello from the package; uname -r' 2>&1) || fail "runv run: $out"
grep -q "hello from the package" <<< "$out" || fail "runv run printed: $out"
echo "package: runv run in a VM from the package printed '$(echo "$out" | tr '\n' ' ')'"

# The package's runv monitor (what runv-monitor.service runs) answers.
/usr/bin/runv monitor --metrics-address 127.0.0.1:0 2>"$work/monitor.log" &
monitor=$!
for _ in $(seq 50); do grep -q "metrics on http://" "$work/monitor.log" && break; sleep 0.1; done
addr=$(sed -n 's|.*metrics on http://\([^/]*\)/metrics.*|\1|p' "$work/monitor.log")
scrape=$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen("http://" + sys.argv[1] + "/metrics", timeout=10).read().decode())' "$addr" 2>&1) \
    || { kill "$monitor"; fail "runv monitor on '$addr': $scrape $(cat "$work/monitor.log")"; }
kill "$monitor"; wait "$monitor" 2>/dev/null || true
grep -q "^runv_monitor_up 1" <<< "$scrape" || fail "runv monitor served: $scrape"
echo "package: runv monitor served its metrics on $addr"

# An operator's change to the conffile survives an upgrade.
echo "# changed by the operator" >> /etc/runv/config.toml
dpkg -i --force-confold "$v2" >/dev/null || fail "dpkg -i $v2 (upgrade)"
[ "$(dpkg-query -W -f='${Version}' runv)" = 0.1.0~pkgtest2 ] || fail "version after upgrade"
grep -q "changed by the operator" /etc/runv/config.toml || fail "the upgrade lost the operator's config change"
/usr/bin/runv check >/dev/null 2>&1 || fail "runv check after the upgrade"

dpkg -P runv >/dev/null || fail "dpkg -P runv"
left=()
while read -r f; do
    # Directories other packages share stay; everything of ours goes.
    case "$f" in /. | /usr | /usr/bin | /usr/libexec | /usr/share | /usr/share/doc | /etc | /lib | /lib/systemd | /lib/systemd/system) continue ;; esac
    [ -e "$f" ] && left+=("$f")
done < "$work/files"
for d in /etc/runv /usr/share/runv /usr/libexec/runv /var/lib/runv /run/runv /var/cache/runv/probes; do
    [ -e "$d" ] && left+=("$d")
done
ours='^/usr/(bin/runv|bin/containerd-shim-runv-v2|libexec/runv/)'
if pgrep -f "$ours" >/dev/null; then left+=("processes: $(pgrep -af "$ours" | tr '\n' ';')"); fi
[ ${#left[@]} -eq 0 ] || fail "left after purge: ${left[*]}"
echo "package: installed, ran a VM, upgraded keeping the conffile change, purged leaving nothing ($(wc -l < "$work/files") paths checked)"
