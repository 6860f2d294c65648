#!/usr/bin/env bash
# Benchmark: the built-in VMM against QEMU `-M microvm,accel=kvm` on the
# same KVM, the same guest kernel and agent image, inside one run of the L1
# rig (scripts/l1.sh: a real, nested KVM under QEMU TCG), alternating:
#   - VMM start to agent ready: the agent as init in probe mode prints its
#     marker and resets the machine, which ends either VMM;
#   - `runv cri`: RunPodSandbox -> container running (examples/cri_bench vmm);
#   - `runv overhead` on each backend: the VMM process's own memory and the
#     whole PodFixed.
# Prints every figure, `podFixed-builtin: X MiB`, and last `ratio: X`
# (boot to agent ready, built-in / QEMU). Absolute times under nested TCG
# mean little; ratios from one run do. A nested guest dies or stalls now
# and then on either backend: a failed boot, pod start or overhead
# measurement is printed (FAILED BOOT/START/OVERHEAD), counted and taken
# again, at most 3 times per backend.
#
# Usage: tests/bench/l1.sh [RUNS]   (default 5; needs scripts/install.sh, root)
set -euo pipefail
runs=${1:-5}
repo=$(cd "$(dirname "$0")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/runv/target}

if [ -z "${RUNV_BENCH_IN_L1:-}" ]; then
    (cd "$repo" && cargo build --quiet --release -p runv -p containerd-shim-runv-v2 --bins --example cri_bench)
    exec "$repo/scripts/l1.sh" --timeout 3000 -- env RUNV_BENCH_IN_L1=1 "$0" "$runs"
fi

# --- inside L1 -------------------------------------------------------------------
[ -c /dev/kvm ] || { echo "FAILED: no /dev/kvm in L1" >&2; exit 1; }
release=$CARGO_TARGET_DIR/release
share=${RUNV_SHARE:-/usr/local/share/runv}
work=$(mktemp -d)
mount -t tmpfs -o size=1536m bench "$work"   # overlayfs and containerd want a real upper
trap 'cd /; umount -l "$work"; rm -rf "$work"' EXIT
export TMPDIR=$work
cmdline="console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda ro rootfstype=ext4 init=/init runv.probe=1"
now_ms() { echo $(($(date +%s%N) / 1000000)); }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

builtin_boot() {
    "$release/runv-vmm" --kernel "$share/vmlinux" --initramfs none --disk "$share/agent.img,ro" \
        --cmdline "$cmdline" --memory 256 --console "$work/builtin.console"
}
qemu_boot() {
    qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -m 256M \
        -kernel "$share/vmlinux" -drive "file=$share/agent.img,if=none,id=agent,format=raw,readonly=on" \
        -device virtio-blk-device,drive=agent -append "$cmdline" \
        -nodefaults -no-user-config -display none -no-reboot -serial "file:$work/qemu.console"
}
timed() { # command -> ms, or fails if the agent never said it was ready
    local console=$work/$1.console t0 t1 status=0
    : >"$console"
    t0=$(now_ms)
    # A boot that hangs (seen under nested TCG) is a failure, not a wait.
    timeout 180 bash -c "$(declare -f "$1_boot"); cmdline='$cmdline' share='$share' release='$release' work='$work' $1_boot" \
        >/dev/null 2>&1 || status=$?
    [ "$status" != 124 ] || { echo "FAILED BOOT: $1 did not finish booting within 180 s" >&2; return 1; }
    t1=$(now_ms)
    grep -q "runv-agent: probe ok" "$console" || { echo "FAILED BOOT: $1 did not reach the agent: $(tail -n 3 "$console" | tr '\n' ' ')" >&2; return 1; }
    echo $((t1 - t0))
}
# Under nested virtualization a guest now and then dies or stalls on either
# backend (scripts/l1/README.md): a failed boot is printed and counted, and
# the sample is taken again, at most 3 times per backend.
declare -A failed=([builtin]=0 [qemu]=0)
sample() { # backend -> sets ms, or exits after a fourth failed boot
    until ms=$(timed "$1"); do
        failed[$1]=$((failed[$1] + 1))
        [ "${failed[$1]}" -le 3 ] || { echo "FAILED: $1 failed to boot more than 3 times" >&2; exit 1; }
    done
}
builtin_boot >/dev/null 2>&1 || true; qemu_boot >/dev/null 2>&1 || true   # warm the page cache
b_times=() q_times=()
for i in $(seq "$runs"); do
    sample builtin; b_times+=("$ms")
    sample qemu; q_times+=("$ms")
    echo "run $i: built-in ${b_times[-1]} ms, qemu/kvm ${q_times[-1]} ms" >&2
done
b=$(printf '%s\n' "${b_times[@]}" | median)
q=$(printf '%s\n' "${q_times[@]}" | median)

# PodFixed and the VMM's own memory, per backend (private PSS: guest RAM
# is shared memory and not counted).
overhead() { # hypervisor extra-config -> json
    local cfg=$work/overhead-$1.toml
    printf 'runtime_dir = "%s/run-%s"\nhypervisor = "%s"\nvmm = "%s"\n%s\n' "$work" "$1" "$1" "$release/runv-vmm" "$2" >"$cfg"
    "$release/runv" --config "$cfg" overhead --format json
}
part_mib() { # json part-name-prefix
    python3 -c 'import json,sys
o = json.load(open(sys.argv[1]))
print(round(sum(p["memory_kib"] for p in o["parts"] if p["name"].startswith(sys.argv[2])) / 1024, 1))' "$1" "$2"
}
measure_overhead() { # backend extra-config: a failed measurement (a nested guest that died) is taken again, twice at most
    local attempt
    for attempt in 1 2 3; do
        overhead "$1" "$2" >"$work/$1.json" && return 0
        echo "FAILED OVERHEAD: runv overhead on $1 (attempt $attempt of 3)" >&2
    done
    exit 1
}
measure_overhead builtin ""
measure_overhead qemu 'accel = "kvm"'
idle_m() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["idle_cpu_millicores"])' "$1"; }
total_mib() { python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["total_memory_kib"] / 1024, 1))' "$1"; }

echo "== runv cri, each backend" >&2
"$release/examples/cri_bench" "$runs" vmm | tee "$work/cri.txt" | grep -v '^ratio:'
cri_ratio=$(awk '/^ratio:/ { print $2 }' "$work/cri.txt")

echo "failed boots (retried): built-in VMM ${failed[builtin]}, QEMU/KVM ${failed[qemu]}"
echo "boot to agent ready, built-in VMM (median of $runs): $b ms"
echo "boot to agent ready, QEMU microvm accel=kvm (median of $runs): $q ms"
echo "VMM process memory, runv-vmm: $(part_mib "$work/builtin.json" runv-vmm) MiB"
echo "VMM process memory, qemu: $(part_mib "$work/qemu.json" qemu) MiB"
echo "PodFixed with QEMU/KVM: $(total_mib "$work/qemu.json") MiB"
echo "idle CPU of an idle pod's host processes, built-in VMM: $(idle_m "$work/builtin.json") m; QEMU/KVM: $(idle_m "$work/qemu.json") m"
echo "runv cri pod start ratio (built-in / QEMU): $cri_ratio"
echo "podFixed-builtin: $(total_mib "$work/builtin.json") MiB"
awk -v b="$b" -v q="$q" 'BEGIN { printf "ratio: %.2f\n", b / q }'
