#!/usr/bin/env bash
# `make test-cgroup-v2`: run the tests that create cgroups on a real cgroup v2 kernel, whatever this host runs.
#
# Boots Debian's kernel (linux-image-amd64, unpacked into a cache, never installed) in qemu-system-x86 with 2 vCPUs,
# a busybox initramfs (tools/cgroup-v2/initramfs.py, /init = tools/cgroup-v2/init.sh) and the host's root filesystem
# shared read-only over virtio-9p, so the VM runs this checkout's .venv as it is. Inside: only the unified cgroup2
# hierarchy (cgroup_no_v1=all), pytest started from a systemd-style service cgroup (/ci.slice/ci.service) on
# CGV2_TESTS (default: default_tests in tools/cgroup-v2/vm.sh). KVM where the CPU offers it (CGV2_ACCEL=tcg forces
# full emulation), else TCG. The exit status is non-zero unless every test ran and passed (tools/cgroup-v2/summary.py).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
HOST_PY=$REPO/.venv/bin/python

# shellcheck source=tools/cgroup-v2/vm.sh
source "$REPO/tools/cgroup-v2/vm.sh"
ACCEL=$(pick_accel)  # a wrong CGV2_ACCEL stops here, before any work
[ "$(id -u)" = 0 ] || die "run as root: the harness installs qemu-system-x86 and fetches a kernel with apt"
[ -x "$HOST_PY" ] || die "no host venv at $HOST_PY: run \`make venv\`"

WORK=$(mktemp -d /var/tmp/edge-ft-cgv2.XXXXXX)
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start=$(date +%s)
ensure_host_tools
ensure_vm_files "$REPO" "$HOST_PY"
log "kernel: $(cat "$CGV2_VM_DIR/complete") ($CGV2_BUILT)"
"$HOST_PY" "$REPO/tools/cgroup-v2/initramfs.py" --modules "$CGV2_VM_DIR/modules" --busybox "$CGV2_VM_DIR/busybox" \
    --init "$REPO/tools/cgroup-v2/init.sh" --out "$WORK/initramfs.cpio.gz"

# boot: write what runs inside (chrooted into the host's root: pytest on this checkout, results into WORK, the
# writable share) and run the VM with ACCEL; sets rc to qemu's exit status.
boot() {
    local tests=${CGV2_TESTS:-$(default_tests "$ACCEL")}
    cat >"$WORK/run.sh" <<EOF
set -u
mkdir -p /tmp/home
cd "$REPO"
echo "[vm] \$(uname -r), /proc/self/cgroup: \$(cat /proc/self/cgroup)"
exec "$HOST_PY" -m pytest -q -p no:cacheprovider --color=no --durations=8 -o junit_family=xunit1 \\
    --junitxml="$WORK/junit.xml" $tests
EOF
    qemu_args "$ACCEL" "$CGV2_VM_DIR" "$WORK/initramfs.cpio.gz" "$WORK"
    log "booting ($ACCEL, $CGV2_CPUS vCPUs, $CGV2_MEMORY_MB MiB): pytest $tests"
    rc=0
    timeout "${CGV2_TIMEOUT:-3600}" qemu-system-x86_64 "${QEMU_ARGS[@]}" </dev/null || rc=$?
}

boot_start=$(date +%s)
boot
if [ "$rc" != 0 ] && [ "$ACCEL" = kvm ] && [ ! -f "$WORK/booted" ]; then  # KVM refused this CPU model (nested)
    log "qemu with KVM exited $rc before the VM booted: again with TCG"
    ACCEL=tcg
    boot
fi
[ "$rc" = 0 ] || die "qemu-system-x86_64 exited $rc$([ "$rc" = 124 ] && echo " (timed out after ${CGV2_TIMEOUT:-3600} s)")"
[ -f "$WORK/exit" ] || die "the VM powered off without running the tests (see its console above)"
log "VM ran $(($(date +%s) - boot_start)) s ($ACCEL); whole run $(($(date +%s) - start)) s"
"$HOST_PY" "$REPO/tools/cgroup-v2/summary.py" "$WORK/junit.xml" "$(cat "$WORK/exit")"
