#!/usr/bin/env bash
# One Debian suite of `make test-arm`: bash tools/arm/suite.sh SUITE WORK (run by tools/test-arm.sh, as root).
#
# Restores (or builds once and caches) SUITE's arm64 root filesystem, installs the edge-ft wheel from WORK/share/dist
# into its device venv with `pip install --no-deps`, and runs there, under qemu-aarch64 with QEMU_CPU=cortex-a53:
#   1. smoke: the tiny ONNX model of WORK/share/smoke through a plain InferenceSession;
#   2. each method: `edge-ft train` of the ort-step bundle in WORK/share/bundles/METHOD.
# Each is compared with the x86 run in WORK/x86; results go to WORK/SUITE/ (cases as JSON, facts as key=value lines)
# for tools/arm/summary.py. A process of its own, so one suite's failure and cleanup leave the next suite alone.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
HOST_PY=$REPO/.venv/bin/python
SUITE=$1
WORK=$2
OUT=$WORK/$SUITE   # this suite's results, outside the rootfs
ROOT=$OUT/root     # the restored rootfs, removed on exit
STAGE=$ROOT/work   # shared with the chroot, seen there as /work
ARM_BUILD_DIR=""

# shellcheck source=tools/arm/rootfs.sh
source "$REPO/tools/arm/rootfs.sh"
arm_suite_select "$SUITE"
# shellcheck source=tools/arm/steps.sh
source "$REPO/tools/arm/steps.sh"  # METHODS, ARM_STEPS, ARM_BATCH, train_args

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    unmount_all "$ROOT"
    [ -z "$ARM_BUILD_DIR" ] || unmount_all "$ARM_BUILD_DIR/root"
    binfmt_restore
    remove_unmounted "$ROOT" $ARM_BUILD_DIR
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# fact KEY VALUE: one line of what summary.py reports about this suite.
fact() { printf '%s=%s\n' "$1" "$2" >>"$OUT/facts"; }

# in_arm CMD...: run inside the arm64 rootfs under qemu, with a clean environment and the device venv first on PATH
# (no PYTHONPATH: what runs is the installed wheel).
in_arm() {
    chroot "$ROOT" /usr/bin/env -i PATH="$ARM_VENV/bin:/usr/bin:/bin" HOME=/root LANG=C.UTF-8 \
        QEMU_CPU="$ARM_QEMU_CPU" PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"
}

mkdir -p "$OUT"
binfmt_enable
ensure_cached_rootfs "$REPO" "$HOST_PY"
fact rootfs "$ARM_BUILT"
start=$(date +%s)
restore_rootfs "$ARM_TARBALL" "$ROOT"
fact restore_ms "$ARM_RESTORE_MS"
fact os "$(sed -n 's/^PRETTY_NAME="\(.*\)"$/\1/p' "$ROOT/etc/os-release")"
mount_system "$ROOT"
mkdir -p "$STAGE/arm"
cp -a "$WORK/share/." "$STAGE/"

MACHINE=$(in_arm uname -m)
fact machine "$MACHINE"
WHEEL=$(cd "$STAGE" && ls dist/*.whl)
log "$SUITE: uname -m inside: $MACHINE (QEMU_CPU=$ARM_QEMU_CPU); pip install --no-deps $WHEEL (emulated)"
in_arm python -m pip install -q --no-deps --no-index --no-compile --root-user-action=ignore "/work/$WHEEL"

# 1. Smoke: onnxruntime imports and runs a tiny model on the emulated core; versions and where edge_ft came from.
in_arm python /work/smoke_run.py /work/smoke /work/arm/smoke.json
cp "$STAGE/arm/smoke.json" "$OUT/smoke.json"
"$HOST_PY" "$REPO/tools/arm/compare.py" --machine "$MACHINE" --kind outputs --field values \
    --case smoke "$WORK/x86/smoke.json" "$OUT/smoke.json" --json "$OUT/smoke-cases.json" >/dev/null || true

# 2. Every method, from the same bundle and seed as on x86, through the installed `edge-ft` entry point.
CASES=()
for method in "${METHODS[@]}"; do
    log "$SUITE: $method: $ARM_STEPS steps at batch $ARM_BATCH on aarch64 ($ARM_QEMU_CPU)"
    train_args "$method"
    in_arm sh -c 'cd /work && exec edge-ft "$@"' sh "${TRAIN_ARGS[@]}" --out "arm/$method" ||
        log "$SUITE: $method: aarch64 training failed"
    mkdir -p "$OUT/$method"
    cp "$STAGE/arm/$method/results.json" "$OUT/$method/" 2>/dev/null || true
    CASES+=(--case "$method" "$WORK/x86/$method/results.json" "$OUT/$method/results.json")
done
"$HOST_PY" "$REPO/tools/arm/compare.py" --machine "$MACHINE" "${CASES[@]}" --json "$OUT/train-cases.json" \
    >/dev/null || true
fact run_s "$(($(date +%s) - start))"
