#!/usr/bin/env bash
# `make test-arm`: prove the Raspberry Pi path on a real ARM instruction set, emulated, on each Raspberry Pi OS base.
#
# Builds the edge-ft wheel once (tools/build-wheel.sh) and prepares on the host what every suite shares: a tiny ONNX
# smoke model, ort-step bundles of every method (full, probe, lora) and the x86 reference runs (the wheel installed
# with pip --no-deps next to .venv-device's requirements). Then, per Debian suite in ARM_SUITES (default: bookworm
# trixie, i.e. Python 3.11 and 3.13), tools/arm/suite.sh installs the same wheel into that suite's cached arm64 rootfs
# and repeats the runs under qemu-aarch64 (QEMU_CPU=cortex-a53, the Pi Zero 2 W / Pi 3 core). tools/arm/summary.py
# prints each suite's tables and one summary row per suite; the exit status is non-zero if any suite failed.
# Needs root (chroot, mounts, binfmt_misc). Everything mounted is unmounted on exit, success or not.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
HOST_PY=$REPO/.venv/bin/python
DEVICE_PY=$REPO/.venv-device/bin/python

# shellcheck source=tools/arm/rootfs.sh
source "$REPO/tools/arm/rootfs.sh"
# shellcheck source=tools/arm/steps.sh
source "$REPO/tools/arm/steps.sh"
read -r -a SUITES <<<"${ARM_SUITES:-${ARM_KNOWN_SUITES[*]}}"
[ ${#SUITES[@]} -gt 0 ] || die "ARM_SUITES is empty (known suites: ${ARM_KNOWN_SUITES[*]})"
for suite in "${SUITES[@]}"; do (arm_suite_select "$suite"); done  # an unknown name stops here, before any work

[ "$(id -u)" = 0 ] || die "run as root: the harness chroots, mounts /proc,/sys,/dev and registers binfmt_misc"
[ -x "$HOST_PY" ] || die "no host venv at $HOST_PY: run \`make venv\`"
[ -x "$DEVICE_PY" ] || die "no device venv at $DEVICE_PY: run \`make device-venv\`"

WORK=$(mktemp -d /var/tmp/edge-ft-arm.XXXXXX)
SHARE=$WORK/share  # copied into every rootfs as /work
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    unmount_all "$WORK"  # only after a suite process was killed outright; it unmounts its own otherwise
    remove_unmounted "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_host_tools
mkdir -p "$SHARE/dist" "$WORK/x86"
WHEEL=$(bash "$REPO/tools/build-wheel.sh" "$SHARE/dist")
log "built $(basename "$WHEEL")"
cp "$REPO/tools/arm/smoke_run.py" "$SHARE/"

# The x86 reference: .venv-device's requirements, the wheel itself (not the source tree) put beside them.
"$DEVICE_PY" -m pip install -q --no-deps --no-index --no-compile --target "$WORK/x86/site" "$WHEEL"
on_x86() {
    env PYTHONPATH="$WORK/x86/site" PYTHONDONTWRITEBYTECODE=1 "$DEVICE_PY" "$@"
}

"$HOST_PY" "$REPO/tools/arm/smoke_model.py" "$SHARE/smoke"
on_x86 "$SHARE/smoke_run.py" "$SHARE/smoke" "$WORK/x86/smoke.json"

log "host: base weights (1 pretraining epoch), mnist-digits data, ort-step bundles, x86 runs"
"$HOST_PY" -m edge_ft.cli pretrain --epochs 1 --quiet --out "$WORK/base/base.safetensors" >/dev/null
"$HOST_PY" -m edge_ft.cli data export mnist-digits --out "$SHARE/data" >/dev/null
for method in "${METHODS[@]}"; do
    "$HOST_PY" -m edge_ft.cli export --engine ort-step --method "$method" --base "$WORK/base/base.safetensors" \
        --out "$SHARE/bundles/$method" >/dev/null
    train_args "$method"
    log "$method: $ARM_STEPS steps at batch $ARM_BATCH on x86"
    (cd "$SHARE" && on_x86 -m edge_ft.cli "${TRAIN_ARGS[@]}" --out "$WORK/x86/$method") ||
        log "$method: x86 training failed"
done

for suite in "${SUITES[@]}"; do
    log "suite $suite"
    rc=0
    bash "$REPO/tools/arm/suite.sh" "$suite" "$WORK" || rc=$?
    mkdir -p "$WORK/$suite" && printf 'exit=%s\n' "$rc" >>"$WORK/$suite/facts"
    [ "$rc" -lt 128 ] || exit "$rc"  # interrupted: stop, do not start the next suite
done

echo
"$HOST_PY" "$REPO/tools/arm/summary.py" --work "$WORK" --methods "${METHODS[@]}" --qemu-cpu "$ARM_QEMU_CPU" \
    --seed "$ARM_SEED" --wheel "$(basename "$WHEEL")" "${SUITES[@]}"
