# What `make test-arm` runs on both sides, defined once for tools/test-arm.sh (x86) and tools/arm/suite.sh (aarch64).
# Emulation is 50-140x slower than native, so runs are short and no timing from them is reported.

ARM_STEPS=${ARM_STEPS:-8}   # optimizer steps per method
ARM_BATCH=${ARM_BATCH:-16}  # examples per step
ARM_SEED=0
METHODS=(full probe lora)

# train_args METHOD: set TRAIN_ARGS to the `edge-ft train` arguments, relative to the stage folder (bundles/, data/).
# One intra-op thread on both sides: ORT's spinning worker threads only burn emulated cycles under qemu.
train_args() {
    TRAIN_ARGS=(train "bundles/$1" --data data/train.npz --steps "$ARM_STEPS" --batch "$ARM_BATCH"
        --seed "$ARM_SEED" --threads 1 --quiet)
}
