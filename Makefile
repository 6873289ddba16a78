# Two commands matter on a fresh machine: `make demo` and `make test` (then `make test-slow` and `make lint`).
# Each builds its virtualenv from the pinned lock files when it is missing or older than them.
PYTHON ?= python3
VENV := .venv
DEVICE_VENV := .venv-device
HOST_PY := $(VENV)/bin/python
DEVICE_PY := $(DEVICE_VENV)/bin/python
PEERS_VENV := .venv-peers
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo fleet-demo fleet-sim fleet-scale test test-slow test-arm test-cgroup-v2 lint quality style dist docs docs-check \
	venv device-venv peers-venv data clean

demo: $(VENV)/.installed $(DEVICE_VENV)/.installed data
	$(VENV)/bin/edge-ft demo

# Federated fine-tuning on 6 emulated devices (4x Pi Zero 2 W, 2x Pi 4), 10 rounds, mnist-digits split by writer:
# LoRA, probing and full fine-tuning, one `flwr run` each on one SuperLink and one set of SuperNodes started once.
# Memory caps and cores are the boards'; the CPU quota is lifted (--no-cpu-cap): the three runs take about 10 minutes
# here, where at a Zero 2 W's speed every ClientApp process (one per device and round) would take far longer to start.
FLEET_NODES := 4xrpi-zero-2w,2xrpi-4b-2gb
fleet-demo: $(VENV)/.installed $(DEVICE_VENV)/.installed
	@[ -f runs/fleet-demo/base.safetensors ] || $(VENV)/bin/edge-ft pretrain --out runs/fleet-demo/base.safetensors
	$(VENV)/bin/edge-ft fleet run --nodes $(FLEET_NODES) --rounds 10 --method lora,probe,full --no-cpu-cap \
	  --base runs/fleet-demo/base.safetensors --out runs/fleet-demo
	$(VENV)/bin/edge-ft report runs/fleet-demo/lora/results runs/fleet-demo/probe/results \
	  runs/fleet-demo/full/results --out runs/fleet-demo

# A thousand simulated devices (60% Pi Zero 2 W, 30% Pi 4, 10% Pi 5) through Flower's Simulation Engine: the same
# ServerApp and ClientApp as fleet-demo, Fashion-MNIST with Dirichlet(1) label skew, a diurnal availability trace and
# a 0.2 s round deadline; LoRA then probing, 20% of the online devices a round, 10 rounds, then the report.
# docs/fleet-simulation.md has the figures (a few minutes here).
fleet-sim: $(VENV)/.installed data
	@[ -f runs/fleet-sim/base.safetensors ] || $(VENV)/bin/edge-ft pretrain --out runs/fleet-sim/base.safetensors
	FLWR_TELEMETRY_ENABLED=0 $(VENV)/bin/edge-ft fleet simulate --devices 1000 --rounds 10 --method lora,probe \
	  --task mnist-fashion --shots 1000 --partitioning dirichlet:1 --local-steps 5 --batch 16 --fraction 0.2 \
	  --availability diurnal:0.3-0.9 --deadline 0.2 --base runs/fleet-sim/base.safetensors --out runs/fleet-sim
	$(VENV)/bin/edge-ft report runs/fleet-sim/lora/results runs/fleet-sim/probe/results --out runs/fleet-sim

# The scale table: 10, 100 and 1,000 simulated devices × LoRA FedAvg, FFA-LoRA, probe, full × writers,
# Dirichlet(0.1), Dirichlet(1) (`edge-ft fleet scale`, its defaults; about half an hour here), copied to where the
# docs page is generated from (docs/hooks/results.py). Stopped, it resumes where it was on the next run.
fleet-scale: $(VENV)/.installed
	FLWR_TELEMETRY_ENABLED=0 $(VENV)/bin/edge-ft fleet scale --out runs/fleet-scale
	cp runs/fleet-scale/fleet-scale.json docs/fleet-scale/fleet-scale.json

# Lint and types, as CI runs them (.ci/run, .pre-commit-config.yaml): ruff's rules and mypy's settings are in
# pyproject.toml. `make quality` is the same check; `make style` applies ruff's safe fixes (imports, pyupgrade).
# The formatter is not applied: the code keeps its hand-wrapped layout; `ruff format FILE` on new files is welcome.
LINT_PATHS := edge_ft tests tools examples
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy

quality: lint

style: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)

# Two tiers: `make test` leaves out the cases marked slow (end-to-end sweeps, federations, parity over many steps,
# the reference models), `make test-slow` runs only those; CI runs both. `-m "fleet"`, `-m "cgroup"` pick one area
# (markers in pyproject.toml). Both print their slowest tests.
test: $(VENV)/.installed $(DEVICE_VENV)/.installed data
	$(HOST_PY) -m pytest -q -m "not slow" --durations=15

test-slow: $(VENV)/.installed $(DEVICE_VENV)/.installed data
	$(HOST_PY) -m pytest -q -m slow --durations=15

test-arm: $(VENV)/.installed $(DEVICE_VENV)/.installed data
	bash tools/test-arm.sh

# The tests that create cgroups, on a real cgroup v2 kernel booted in qemu (root; KVM when /dev/kvm opens).
test-cgroup-v2: $(VENV)/.installed data
	bash tools/test-cgroup-v2.sh

# The documentation site (MkDocs + Material, API reference by mkdocstrings) into site/; open site/index.html.
# docs/hooks/results.py generates the results pages from the results files under docs/ while it builds.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# What CI runs: the same strict build into a scratch folder (a broken link, anchor or missing page fails it).
docs-check: $(VENV)/.installed
	@tmp=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir "$$tmp"; rc=$$?; rm -rf "$$tmp"; exit $$rc

# dist/edge_ft-<version>-py3-none-any.whl and the sdist, built from a temporary copy: the checkout stays clean.
dist: $(VENV)/.installed
	bash tools/build-wheel.sh --sdist dist

venv: $(VENV)/.installed
device-venv: $(DEVICE_VENV)/.installed
peers-venv: $(PEERS_VENV)/.installed

# Host half: torch (CPU), onnx, onnxruntime-training, plots, test tools.
$(VENV)/.installed: requirements/host.txt pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(HOST_PY) -m pip install -q --upgrade pip
	$(HOST_PY) -m pip install -q -r requirements/host.txt
	$(HOST_PY) -m pip install -q --no-deps -e .
	touch $@

# Device half: standard onnxruntime only, exactly what `pip install 'edge-ft[device,images]'` gives a Pi.
# The package is installed from its wheel (the one `make dist` builds, with the host venv's setuptools), so it is
# refreshed whenever a source file changes.
DEVICE_SOURCES := $(shell find edge_ft -name '*.py' -o -name '*.toml' 2>/dev/null)

$(DEVICE_VENV)/.deps: requirements/device.txt pyproject.toml
	rm -rf $(DEVICE_VENV)
	$(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_PY) -m pip install -q --upgrade pip
	$(DEVICE_PY) -m pip install -q -r requirements/device.txt
	touch $@

$(DEVICE_VENV)/.installed: $(DEVICE_VENV)/.deps $(DEVICE_SOURCES) | $(VENV)/.installed
	@tmp=$$(mktemp -d) && whl=$$(bash tools/build-wheel.sh "$$tmp") && \
	  $(DEVICE_PY) -m pip install -q --no-deps --force-reinstall "$$whl"; rc=$$?; rm -rf "$$tmp"; exit $$rc
	touch $@

# Optional: the on-device training peers `edge-ft speed` compares with (ExecuTorch), not part of `make test`.
# torch is installed alone first, so executorch's resolver finds the CPU build already there and keeps it.
$(PEERS_VENV)/.installed: requirements/peers.txt
	rm -rf $(PEERS_VENV)
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q $$(grep -E '^torch==' requirements/peers.txt)
	$(PEERS_VENV)/bin/python -m pip install -q -r requirements/peers.txt
	touch $@

# Fashion-MNIST ships in a Debian package (MIT); install it where it is missing and we may.
data:
	@if [ ! -f $(FASHION) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) ; \
	  else echo "note: Fashion-MNIST not found at $(FASHION); install the Debian package dataset-fashion-mnist"; fi; \
	fi

clean:
	rm -rf $(VENV) $(DEVICE_VENV) $(PEERS_VENV) .pytest_cache runs site
