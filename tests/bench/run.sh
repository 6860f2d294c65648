#!/usr/bin/env bash
# Benchmark: wall time of `runv run -- true` against a bare QEMU boot of the
# same kernel and agent image to init (the agent's probe mode: init prints a
# marker and reboots, which ends QEMU), alternating runs in one invocation.
# Prints the medians and, last, `ratio: X` (runv / bare QEMU).
#
# Usage: tests/bench/run.sh [RUNS]   (default 7; needs scripts/install.sh)
set -euo pipefail
runs=${1:-7}
runv=${RUNV:-runv}
share=${RUNV_SHARE:-/usr/local/share/runv}
kernel=$share/vmlinux
agent_image=$share/agent.img

if "$runv" check --require-kvm >/dev/null 2>&1; then accel=kvm; cpu=host; else accel=tcg; cpu=max; fi
cfg=$(mktemp)
trap 'rm -f "$cfg"' EXIT
echo "accel = \"$accel\"" > "$cfg"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

bare_qemu() {
    qemu-system-x86_64 -M microvm,acpi=off -accel "$accel" -cpu "$cpu" -m 256M \
        -kernel "$kernel" -drive "file=$agent_image,if=none,id=agent,format=raw,readonly=on" \
        -device virtio-blk-device,drive=agent \
        -append "console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda ro rootfstype=ext4 init=/init runv.probe=1" \
        -nodefaults -no-user-config -display none -no-reboot -serial null
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : int((a[NR/2]+a[NR/2+1])/2)}'; }

runv_times=()
qemu_times=()
"$runv" --config "$cfg" run -- true >/dev/null   # warm the page cache
for i in $(seq "$runs"); do
    t0=$(now_ms); "$runv" --config "$cfg" run -- true >/dev/null; t1=$(now_ms)
    runv_times+=($((t1 - t0)))
    t0=$(now_ms); bare_qemu; t1=$(now_ms)
    qemu_times+=($((t1 - t0)))
    echo "run $i: runv ${runv_times[-1]} ms, bare qemu ${qemu_times[-1]} ms" >&2
done
r=$(printf '%s\n' "${runv_times[@]}" | median)
q=$(printf '%s\n' "${qemu_times[@]}" | median)
echo "accel: $accel"
echo "runv run -- true (median of $runs): $r ms"
echo "bare qemu boot to init (median of $runs): $q ms"
awk -v r="$r" -v q="$q" 'BEGIN { printf "ratio: %.2f\n", r / q }'
