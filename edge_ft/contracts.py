"""Names the host and the device agree on, each defined here once: engines, graph inputs/outputs, bundle and run files.

Standard library only (no numpy), so the CLI can build its parsers from these on a device-only install. The results
schema a run writes is edge_ft.run_record's; the benchmark record is edge_ft.bench.records'.
"""

# Training engines: torch trains in PyTorch on the host (`edge-ft finetune`); the two ORT engines train an exported
# bundle with numpy + onnxruntime (`edge-ft train`), named by the bundle manifest's "engine" field.
TORCH, ORT_TRAINING, ORT_STEP = "torch", "ort-training", "ort-step"
BUNDLE_ENGINES = (ORT_TRAINING, ORT_STEP)
ENGINES = (TORCH, *BUNDLE_ENGINES)

# Graph input and output names of every exported graph (training step, inference, features).
INPUT, LABELS, LR, LOSS, LOGITS, FEATURES = "input", "labels", "lr", "loss", "logits", "features"

# Method labels: label -> (fine-tuning method, trained on the cached frozen prefix), most trained first. A cached
# label trains the same bundle as its method on features computed once; full and bias have no frozen prefix.
METHOD_LABELS: dict[str, tuple[str, bool]] = {
    "full": ("full", False), "last-k": ("last-k", False), "last-k-cached": ("last-k", True), "bias": ("bias", False),
    "lora": ("lora", False), "lora-cached": ("lora", True), "probe": ("probe", False), "probe-cached": ("probe", True),
}
# The methods a benchmark sweep measures (bench, demo, recommend, gates), in its order; a model sweep (bench
# --models) measures every label.
SWEEP_LABELS: dict[str, tuple[str, bool]] = {
    k: METHOD_LABELS[k] for k in ("full", "probe", "probe-cached", "lora", "lora-cached", "last-k-cached")}

MANIFEST = "manifest.json"  # a bundle's description: engine, method, files with their hashes
RESULTS = "results.json"  # a finished run's figures, written last: its presence marks the run as done
TRAINED = "trained.safetensors"  # a device run's trained parameters

MB = 1 << 20  # bytes in a MiB: every memory figure is reported in it (budgets, peak RSS, caps)

# Set by `edge-ft profile run` (and every confined run) for its child: the board's memory budget in bytes, which
# `edge-ft train` sizes its feature cache against when no --profile is given.
MEMORY_BUDGET_ENV = "EDGE_FT_MEMORY_BUDGET"
# Set for a child whose time an emulated board scales by a CPU quota: "THREAD,JOB", the shares of one CPU here that each
# thread and the whole job may use. The trainer turns its CPU time into the board's time with them
# (edge_ft.device.board_time).
QUOTA_ENV = "EDGE_FT_CPU_QUOTA"

# How an emulated board's step time is obtained (edge_ft.emulation.emulate): "quota" paces the job with CPU quotas,
# so its wall time approximates the board's; "cpu" runs it at this machine's speed under the board's memory, cores
# and threads, and its board time is its CPU time scaled by the same shares (edge_ft.device.board_time).
TIMINGS = ("cpu", "quota")
# Set to "cpu" for a child timed by its CPU time: nothing throttles it, so it reads its CPU clock every step and its
# board time comes from the typical (median) step, which a stretch of this machine's slower seconds does not move.
TIMING_ENV = "EDGE_FT_TIMING"
# A figure timed by CPU time is the fastest of this many runs, each its own process (bench's repetitions, the train
# check's runs): one run in a few lands on a slower stretch of a shared machine, or in a process whose same step
# costs a third more CPU time here, and 3 epochs of mnist-digits time only ~0.1 s of steps.
CPU_TIMED_REPEATS = 5
