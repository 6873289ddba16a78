#!/usr/bin/env bash
# `make test-arm`: prove the Raspberry Pi path on a real ARM instruction set, emulated.
#
# Restores (or builds once and caches) a Debian bookworm arm64 root filesystem holding a venv with
# requirements/device.txt, copies only edge_ft/ into it (the device side must not need torch), then under
# qemu-aarch64 with QEMU_CPU=cortex-a53 (the Pi Zero 2 W / Pi 3 core):
#   1. smoke: a tiny ONNX model through a plain InferenceSession, outputs compared with x86;
#   2. each method (full, probe, lora): a short `edge-ft train` of an ort-step bundle exported on the host,
#      per-step losses compared with the same run on x86 (.venv-device).
# Emulation is 50-140x slower than native, so runs are short and no timing from them is reported.
# Needs root (chroot, mounts, binfmt_misc). Everything mounted is unmounted on exit, success or not.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
HOST_PY=$REPO/.venv/bin/python
DEVICE_PY=$REPO/.venv-device/bin/python
ARM_STEPS=${ARM_STEPS:-8}   # optimizer steps per method
ARM_BATCH=${ARM_BATCH:-16}  # examples per step
ARM_SEED=0
METHODS=(full probe lora)

# shellcheck source=tools/arm/rootfs.sh
source "$REPO/tools/arm/rootfs.sh"

[ "$(id -u)" = 0 ] || die "run as root: the harness chroots, mounts /proc,/sys,/dev and registers binfmt_misc"
[ -x "$HOST_PY" ] || die "no host venv at $HOST_PY: run \`make venv\`"
[ -x "$DEVICE_PY" ] || die "no device venv at $DEVICE_PY: run \`make device-venv\`"

WORK=$(mktemp -d /var/tmp/edge-ft-arm.XXXXXX)
ROOT=$WORK/root  # the restored rootfs
STAGE=$ROOT/work # shared with the chroot, seen there as /work
ARM_BUILD_DIR=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    unmount_all "$ROOT"
    [ -z "$ARM_BUILD_DIR" ] || unmount_all "$ARM_BUILD_DIR/root"
    binfmt_restore
    local dir
    for dir in "$WORK" $ARM_BUILD_DIR; do
        # Never delete through a mount: a /dev bind left behind would take the host's /dev with it.
        if nothing_mounted_under "$dir"; then
            rm -rf --one-file-system "$dir"
        else
            log "left $dir in place: something is still mounted below it"
        fi
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# in_arm CMD...: run inside the arm64 rootfs under qemu, with a clean environment and the device venv first.
in_arm() {
    chroot "$ROOT" /usr/bin/env -i PATH="$ARM_VENV/bin:/usr/bin:/bin" HOME=/root LANG=C.UTF-8 \
        QEMU_CPU="$ARM_QEMU_CPU" PYTHONPATH=/work/src PYTHONDONTWRITEBYTECODE=1 "$@"
}

# on_x86 CMD...: the same code on the host, from the same copy of edge_ft/.
on_x86() {
    env PYTHONPATH="$STAGE/src" PYTHONDONTWRITEBYTECODE=1 "$@"
}

ensure_host_tools
binfmt_enable
ensure_cached_rootfs "$REPO" "$HOST_PY"
restore_rootfs "$ARM_TARBALL" "$ROOT"
mount_system "$ROOT"

mkdir -p "$STAGE/src" "$STAGE/x86" "$STAGE/arm"
tar -C "$REPO" --exclude=__pycache__ -cf - edge_ft | tar -C "$STAGE/src" -xf -
cp "$REPO/tools/arm/smoke_run.py" "$STAGE/"

MACHINE=$(in_arm uname -m)
log "uname -m inside: $MACHINE (QEMU_CPU=$ARM_QEMU_CPU)"

# 1. Smoke: onnxruntime imports and runs a tiny model on the emulated core; versions on both sides.
"$HOST_PY" "$REPO/tools/arm/smoke_model.py" "$STAGE/smoke"
on_x86 "$DEVICE_PY" "$STAGE/smoke_run.py" "$STAGE/smoke" "$STAGE/x86/smoke.json"
in_arm python /work/smoke_run.py /work/smoke /work/arm/smoke.json
"$HOST_PY" - "$STAGE/arm/smoke.json" "$STAGE/x86/smoke.json" >"$WORK/versions.txt" <<'EOF'
import json, sys
arm, x86 = (json.load(open(p)) for p in sys.argv[1:])
for side, r in (("aarch64", arm), ("x86", x86)):
    print(f"{side:>8}: machine {r['machine']}, python {r['python']}, numpy {r['numpy']}, "
          f"onnxruntime {r['onnxruntime']} ({', '.join(r['providers'])})")
EOF
SMOKE_OK=1
"$HOST_PY" "$REPO/tools/arm/compare.py" --machine "$MACHINE" --kind outputs --field values \
    --case smoke "$STAGE/x86/smoke.json" "$STAGE/arm/smoke.json" >"$WORK/smoke-table.txt" || SMOKE_OK=0

# 2. Every method: export an ort-step bundle on the host, train it on x86 and on the emulated core, same seed.
# One intra-op thread on both sides: ORT's spinning worker threads only burn emulated cycles under qemu.
log "host: base weights (1 pretraining epoch), mnist-digits data, ort-step bundles"
"$HOST_PY" -m edge_ft.cli pretrain --epochs 1 --quiet --out "$WORK/base/base.safetensors" >/dev/null
"$HOST_PY" -m edge_ft.cli data export mnist-digits --out "$STAGE/data" >/dev/null
CASES=()
for method in "${METHODS[@]}"; do
    "$HOST_PY" -m edge_ft.cli export --engine ort-step --method "$method" --base "$WORK/base/base.safetensors" \
        --out "$STAGE/bundles/$method" >/dev/null
    train_args=(train "bundles/$method" --data data/train.npz --steps "$ARM_STEPS" --batch "$ARM_BATCH"
        --seed "$ARM_SEED" --threads 1 --quiet)
    log "$method: $ARM_STEPS steps at batch $ARM_BATCH on x86, then on aarch64 ($ARM_QEMU_CPU)"
    (cd "$STAGE" && on_x86 "$DEVICE_PY" -m edge_ft.cli "${train_args[@]}" --out "x86/$method") ||
        log "$method: x86 training failed"
    in_arm sh -c 'cd /work && exec python -m edge_ft.cli "$@"' sh "${train_args[@]}" --out "arm/$method" ||
        log "$method: aarch64 training failed"
    CASES+=(--case "$method" "$STAGE/x86/$method/results.json" "$STAGE/arm/$method/results.json")
done

echo
echo "make test-arm: device fine-tuning on emulated aarch64 ($ARM_QEMU_CPU) vs x86 (.venv-device), seed $ARM_SEED"
cat "$WORK/versions.txt"
echo
cat "$WORK/smoke-table.txt"
echo
TRAIN_OK=1
"$HOST_PY" "$REPO/tools/arm/compare.py" --machine "$MACHINE" "${CASES[@]}" | tee "$WORK/train-table.txt" || TRAIN_OK=0
# A closing line in the shape test runners print, counted from the rows of both tables.
PASSED=$(cat "$WORK/smoke-table.txt" "$WORK/train-table.txt" | grep -cE '^[a-z]+ +[0-9]+ .* pass +' || true)
FAILED=$(cat "$WORK/smoke-table.txt" "$WORK/train-table.txt" | grep -cE ' FAIL ' || true)
if [ "$SMOKE_OK" = 1 ] && [ "$TRAIN_OK" = 1 ] && [ "$FAILED" = 0 ]; then
    echo "test-arm: $PASSED passed, 0 failed"
else
    [ "$FAILED" = 0 ] && FAILED=1
    echo "test-arm: $PASSED passed, $FAILED failed"
    exit 1
fi
