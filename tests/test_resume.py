"""`edge-ft train --resume` after kill -9: the resumed run ends bit-identical to an uninterrupted one, and no file
in the run folder is ever half-written.

Kills land at exact points of the trainer's atomic writes (a sitecustomize wraps edge_ft.atomic's os/tempfile in
the child only): right after a checkpoint is committed, halfway through writing a state file (a truncated temp
file stays behind), after a state file but before resume.json names it, inside the final outputs, plus seeded
random points (any write, a random fraction of its bytes). After every kill each file in the run folder loads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import numpy as np
import ort_step_support as support
import pytest

from edge_ft.checkpoint import load_safetensors
from edge_ft.cli import main
from edge_ft.config import MethodConfig, OptimizerConfig
from edge_ft.data.npz import save_npz
from edge_ft.data.readers import read_mnist_5k
from edge_ft.device.bundle import load_bundle
from edge_ft.device.engines import open_engine
from edge_ft.device.ort_api import inference_session

REPO = Path(__file__).resolve().parents[1]
LORA, ADAMW = MethodConfig("lora"), OptimizerConfig("adamw", lr=2e-3)  # shared with test_ort_step's exports
EPOCHS, BATCH, N_TRAIN, EVERY = 3, 16, 200, 5  # 13 steps per epoch, 39 in all, a checkpoint every 5

KILLER = textwrap.dedent("""
    # Loaded at start-up through PYTHONPATH: SIGKILLs this process at one point of edge_ft.atomic's writes.
    import fnmatch, json, os, signal, tempfile

    plan = json.loads(os.environ["EDGE_FT_KILL_PLAN"])  # {"when": before|after|mid, "name": glob, "nth": n, "frac": f}
    import edge_ft.atomic as atomic

    seen, paths = [0], {}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def hit(path):
        name = os.path.basename(path)
        if fnmatch.fnmatch(name, plan["name"]):
            seen[0] += 1
            return seen[0] == plan["nth"]
        return False

    class HalfFile:
        def __init__(self, f): self.f = f
        def __getattr__(self, attr): return getattr(self.f, attr)
        def __enter__(self): return self
        def __exit__(self, *exc): return self.f.__exit__(*exc)
        def write(self, data):
            self.f.write(data[: int(len(data) * plan["frac"])])
            self.f.flush()
            os.fsync(self.f.fileno())
            die()

    class TempfileShim:
        def __getattr__(self, attr): return getattr(tempfile, attr)
        def mkstemp(self, prefix="", suffix="", dir=None):
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=dir)
            paths[fd] = os.path.join(dir, prefix[1:-1])  # ".NAME." -> NAME: the target the temp file becomes
            return fd, tmp

    class OsShim:
        def __getattr__(self, attr): return getattr(os, attr)
        def fdopen(self, fd, mode="r"):
            f = os.fdopen(fd, mode)
            return HalfFile(f) if plan["when"] == "mid" and hit(paths.pop(fd, "")) else f
        def replace(self, src, dst):
            if plan["when"] != "mid" and hit(str(dst)):
                if plan["when"] == "after":
                    os.replace(src, dst)
                die()
            os.replace(src, dst)

    atomic.os, atomic.tempfile = OsShim(), TempfileShim()
""")

# (when, file name glob, n-th matching write in that process, fraction of its bytes written before the kill)
EARLY_KILLS = [
    ("after", "resume.json", 2, 1.0),  # right after the step-10 checkpoint was committed
    ("mid", "step-*.state", 2, 0.5),  # half of a state file written: a truncated temp file remains
    ("before", "resume.json", 2, 1.0),  # a complete state file that resume.json does not name yet
    ("mid", "resume.json", 1, 0.3),  # a truncated resume.json temp file beside the committed one
]
LATE_KILLS = [
    ("mid", "model.onnx", 1, 0.7),  # inside the final outputs: final.state and trained.safetensors are new
    ("before", "results.json", 1, 1.0),  # everything written but the record that says the run is finished
]


def random_kills(n: int, seed: int = 0) -> list[tuple]:
    """Any write (the n-th, at most 4: even a run resumed at step 35 makes 4 more), any point in it."""
    rng = random.Random(seed)
    return [(rng.choice(["before", "after", "mid"]), "*", rng.randint(1, 4), round(rng.random(), 3))
            for _ in range(n)]


@cache
def inputs(engine: str = "ort-step") -> tuple[Path, Path, Path]:
    """(bundle, train.npz, eval.npz): a LoRA/AdamW bundle shared with the engine's own tests, real MNIST digits."""
    x, y = read_mnist_5k()
    order = np.random.default_rng(0).permutation(len(x))
    folder = Path(support._ROOT) / "resume-data"
    folder.mkdir(exist_ok=True)
    save_npz(folder / "train.npz", x[order[:N_TRAIN]], y[order[:N_TRAIN]])
    save_npz(folder / "eval.npz", x[order[-100:]], y[order[-100:]])
    if engine == "ort-training":
        import ort_training_support

        bundle = ort_training_support.bundle(ort_training_support.METHODS["lora"], ort_training_support.ADAMW)
    else:
        bundle = support.bundle_path(LORA, ADAMW)
    return bundle, folder / "train.npz", folder / "eval.npz"


def train_argv(out: Path, *extra: str, engine: str = "ort-step") -> list[str]:
    bundle, train, test = inputs(engine)
    return ["train", str(bundle), "--data", str(train), "--eval", str(test), "--epochs", str(EPOCHS), "--batch",
            str(BATCH), "--lr", "0.01", "--schedule", "cosine", "--threads", "1", "--checkpoint-every", str(EVERY),
            "--quiet", "--out", str(out), *extra]


def assert_every_file_loads(out: Path, engine_name: str = "ort-step") -> None:
    """Committed files are whole: JSON parses, states load into the engine, the model runs. Temp files aside."""
    engine = open_engine(load_bundle(inputs(engine_name)[0]), threads=1)
    for path in sorted(p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".state":
            engine.load_state(str(path))  # checks every tensor's name, shape and dtype
        elif path.suffix == ".safetensors":
            assert load_safetensors(path)
        elif path.suffix == ".onnx":
            x = np.zeros((2, 1, 28, 28), np.float32)
            assert inference_session(path, threads=1).run(None, {"input": x})[0].shape == (2, 10)
        else:
            raise AssertionError(f"unexpected file {path}")
    record = json.loads((out / "resume.json").read_text()) if (out / "resume.json").exists() else None
    if record:  # the commit point never names a state file that is missing or different
        from edge_ft.checkpoint import sha256_file

        assert sha256_file(out / record["state"]) == record["state_sha256"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ort-step", "ort-training"])
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path, engine):
    """Both engines: every loss, the weights, the optimizer state and model.onnx come out bit-identical."""
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert main(train_argv(reference, engine=engine)) == 0
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KILLER)

    plans = EARLY_KILLS + random_kills(3, seed=len(engine)) + LATE_KILLS
    for plan in plans:
        done = _run_cli_killed(train_argv(out, "--resume", engine=engine), plan, site)
        assert done.returncode == -9, (plan, done.returncode, done.stderr[-2000:])
        assert "Traceback" not in done.stderr
        assert_every_file_loads(out, engine)
    assert main(train_argv(out, "--resume", engine=engine)) == 0  # the last run goes uninterrupted
    assert not [p for p in out.rglob("*.tmp")], "temp files of killed writes are cleaned up on resume"
    assert_every_file_loads(out, engine)

    expected, got = (json.loads((d / "results.json").read_text()) for d in (reference, out))
    assert got["losses"] == expected["losses"] and got["steps"] == expected["steps"] == EPOCHS * 13
    assert [e["lr"] for e in got["epochs"]] == [e["lr"] for e in expected["epochs"]]
    assert [e["eval_accuracy"] for e in got["epochs"]] == [e["eval_accuracy"] for e in expected["epochs"]]
    assert got["accuracy"] == expected["accuracy"] and got["step_latency_ms"]["n"] == EPOCHS * 13
    # Resumes that reached a checkpoint or the end are recorded (a run killed before its next write left none).
    assert got["resumed_from"][0] == 10 and got["resumed_from"] == sorted(got["resumed_from"])
    # Bit-identical weights, optimizer moments and step count, and deployed model. safetensors files are compared
    # tensor by tensor: their header lists metadata in hash-map order, which differs between processes.
    states = ["trained.safetensors"] + (["final.state"] if engine == "ort-step" else [])
    for name in states:
        a, b = load_safetensors(reference / name), load_safetensors(out / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    for name in ["model.onnx"] + (["final.state"] if engine == "ort-training" else []):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.slow
def test_resume_refuses_other_settings_and_protects_unfinished_runs(tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(out)
    steps = argv.index("--epochs")
    short = argv[:steps] + ["--steps", "12"] + argv[steps + 2:]  # stops at step 12, after the step-10 checkpoint
    assert main(short) == 0
    (out / "results.json").unlink()  # as if killed before the end
    capsys.readouterr()
    assert main(train_argv(out)) == 2  # a fresh start would overwrite the unfinished training
    assert "unfinished run" in capsys.readouterr().err
    assert main(train_argv(out, "--resume", "--batch", "32")) == 2
    err = capsys.readouterr().err
    assert "started with batch=16, this command gives 32" in err and len(err.strip().splitlines()) == 1
    assert main([*short, "--resume"]) == 0  # same options: continues from step 10
    assert json.loads((out / "results.json").read_text())["resumed_from"] == [10]
    fresh = tmp_path / "fresh"
    assert main(train_argv(fresh, "--resume")) == 0  # nothing to resume: starts at step 0
    assert json.loads((fresh / "results.json").read_text())["resumed_from"] == []


def test_a_finished_run_is_never_trained_over_without_force(tmp_path, capsys):
    """--resume on a finished run without checkpoints used to train from step 0 over it (accuracy 1.00 -> 0.73,
    exit 0). A finished run stays as it is unless --force; the library refuses it as the command does."""
    out = tmp_path / "run"
    argv = [a for a in train_argv(out) if a not in ("--checkpoint-every", str(EVERY))]
    argv[argv.index("--epochs") + 1] = "1"
    assert main(argv) == 0 and not (out / "checkpoints").exists()
    finished = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    for extra in (["--resume"], [], ["--resume", "--epochs", "2"]):
        assert main([*argv, *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "holds a finished run" in err and "--force" in err, err
        assert ("nothing to resume" in err) == ("--resume" in extra), err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == finished

    from edge_ft.data.npz import load_labelled_npz
    from edge_ft.device.trainer import TrainSettings, train
    from edge_ft.errors import UserError

    bundle = load_bundle(inputs("ort-step")[0])
    x, y, _ = load_labelled_npz(inputs("ort-step")[1], bundle.num_classes, bundle.input_shape)
    with pytest.raises(UserError, match="holds a finished run"):
        train(bundle, (x, y), None, TrainSettings(batch=BATCH, quiet=True), out, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == finished

    assert main([*argv, "--resume", "--force", "--epochs", "2"]) == 0  # asked for: trained again, replaced
    assert len(json.loads((out / "results.json").read_text())["epochs"]) == 2


def _cgroups_unavailable() -> str | None:
    from edge_ft.emulation.cgroups import CgroupJob, CgroupUnavailable

    try:
        CgroupJob.create(64 * 2**20, [sorted(os.sched_getaffinity(0))[0]], None, None, 20_000).remove()
    except CgroupUnavailable as e:
        return str(e)
    return None


def tiny_board(tmp_path: Path) -> Path:
    """A 16 MB board profile (skips the test where cgroups cannot be written): nothing edge-ft runs fits in it."""
    reason = _cgroups_unavailable()
    if reason:
        pytest.skip(f"cgroups not writable: {reason}")
    board = tmp_path / "tiny-board.toml"
    board.write_text('description = "16 MB board"\narch = "x86_64"\ncpu = "test"\ncores = 1\nram_mb = 64\n'
                     'budget_mb = 16\nthreads = 1\ncpu_speed = 1.0\ncpu_speed_source = "chosen for a test"\n')
    return board


@pytest.mark.slow
def test_out_of_memory_under_a_profile_is_a_result_and_leaves_no_files(tmp_path, capsys):
    """The OOM killer ends `edge-ft train` under a 16 MB board: a 'does not fit' result, no run folder at all;
    the same run then completes outside the cap."""
    board = tiny_board(tmp_path)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "edge_ft.cli", *train_argv(out)]
    assert main(["profile", "run", str(board), "--timeout", "120", "--json", "--", *argv]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "out_of_memory" and not result["fits"] and result["exit_code"] == -9
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], "no partial files"
    assert main(train_argv(out, "--resume")) == 0
    assert_every_file_loads(out)


def _adapter_after(tmp_path: Path, steps: int) -> Path:
    run, adapter = tmp_path / f"run-{steps}", tmp_path / f"adapter-{steps}"
    bundle, train, _ = inputs()
    assert main(["train", str(bundle), "--data", str(train), "--steps", str(steps), "--threads", "1", "--quiet",
                 "--out", str(run)]) == 0
    assert main(["adapter", "export", str(run), "--out", str(adapter)]) == 0
    return adapter


def _run_cli_killed(argv: list[str], plan: tuple, site: Path) -> subprocess.CompletedProcess:
    when, name, nth, frac = plan
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}",
           "EDGE_FT_KILL_PLAN": json.dumps({"when": when, "name": name, "nth": nth, "frac": frac})}
    return subprocess.run([sys.executable, "-m", "edge_ft.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_killed_adapter_apply_and_export_leave_the_old_or_the_new_never_a_mix(tmp_path):
    from edge_ft.device.adapter import load_adapter

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KILLER)
    old, new = _adapter_after(tmp_path, 2), _adapter_after(tmp_path, 5)
    old_tensors, new_tensors = load_adapter(old).tensors, load_adapter(new).tensors

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    for plan in [("mid", "*.pending", 1, 0.5), ("before", "manifest.json", 1, 1.0), ("after", "manifest.json", 1, 1.0),
                 ("mid", "manifest.json", 1, 0.4)]:
        bundle = tmp_path / "bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(inputs()[0], bundle)
        assert main(["adapter", "apply", str(bundle), str(old)]) == 0
        assert _run_cli_killed(["adapter", "apply", str(bundle), str(new)], plan, site).returncode == -9
        applied = load_bundle(bundle).applied_adapter()  # verifies every hash; finishes a committed apply
        committed = plan[0] == "after"
        assert same(applied, new_tensors if committed else old_tensors), plan
        assert not list(bundle.glob("*.pending"))
        assert main(["adapter", "apply", str(bundle), str(new)]) == 0  # and the bundle takes the next apply
        assert same(load_bundle(bundle).applied_adapter(), new_tensors) and not list(bundle.glob(".*.tmp"))

    run = tmp_path / "run-5"
    # Replacing an adapter (--force) drops its record first and writes the new one last: a kill anywhere in
    # between leaves a folder that is refused in one line, never new weights read under an old record.
    for plan in [("mid", "adapter_model.safetensors", 1, 0.5), ("mid", "adapter_config.json", 1, 0.5),
                 ("mid", "edge_ft_adapter.json", 1, 0.5), ("after", "edge_ft_adapter.json", 1, 1.0)]:
        folder = tmp_path / "shipped"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(old, folder)
        argv = ["adapter", "export", str(run), "--out", str(folder), "--force"]
        assert _run_cli_killed(argv, plan, site).returncode == -9
        committed = plan[0] == "after"
        assert main(["adapter", "merge", str(inputs()[0]), str(folder), "--out", str(tmp_path / "m.onnx")]) == (
            0 if committed else 2), plan
        if committed:
            assert same(load_adapter(folder).tensors, new_tensors)
        assert main(argv) == 0  # exporting again repairs it
        assert same(load_adapter(folder).tensors, new_tensors)


@pytest.mark.slow
def test_out_of_memory_in_a_sweep_is_recorded_and_leaves_no_partial_files(tmp_path, base_checkpoint):
    """The sweep's OOM job: a record saying it does not fit, and its run folder holds no file (not even a temp)."""
    from edge_ft.bench.measure import SweepSettings
    from edge_ft.bench.records import read_records
    from edge_ft.bench.sweep import SweepOptions, plan, run_sweep
    from edge_ft.emulation.profiles import load_profile_file

    board = tiny_board(tmp_path)
    jobs = plan(["mnist→digits"], ["lora"], ["ort-step"], [load_profile_file(board)], SweepSettings(steps=4))
    records = run_sweep(jobs, tmp_path / "results.jsonl", SweepOptions(base=str(base_checkpoint), timeout=120,
                                                                        quiet=True))
    assert [(r["status"], r["fits"]) for r in records] == [("out_of_memory", False)]
    assert read_records(tmp_path / "results.jsonl") == records
    run_dir = jobs[0].run_dir(tmp_path)
    assert not run_dir.exists() or not [p for p in run_dir.rglob("*") if p.is_file()], "no partial files"


RELOAD_CYCLE = textwrap.dedent("""
    import gc, sys
    import numpy as np
    from edge_ft.device.bundle import load_bundle
    from edge_ft.device.engines import open_engine

    bundle = load_bundle(sys.argv[1])
    engine = open_engine(bundle, threads=1)
    x, y = np.zeros((4, 1, 28, 28), np.float32), np.arange(4, dtype=np.int64)
    engine.train_step(x, y, 1e-3)
    engine.save_state(sys.argv[2])
    for _ in range(3):  # resume-style reloads, each followed by writes into the (new) state and a step
        engine.load_state(sys.argv[2])
        gc.collect()  # the replaced Module and state are gone now
        engine.load_trainable({k: v + 1 for k, v in engine.trainable_state().items()})
        engine.train_step(x, y, 1e-3)
    print("ok", float(engine.train_step(x, y, 1e-3)[0]))
""")


@pytest.mark.slow
def test_ort_training_state_is_never_written_after_its_module_is_gone(tmp_path):
    """Writing parameters into a CheckpointState whose Module was destroyed segfaults onnxruntime; reloading
    a state rebuilds state, Module and Optimizer together, so every later write reaches a live trio."""
    done = subprocess.run([sys.executable, "-c", RELOAD_CYCLE, str(inputs("ort-training")[0]),
                           str(tmp_path / "s.state")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0 and done.stdout.startswith("ok "), (done.returncode, done.stderr[-2000:])


class _Stop(BaseException):
    """What a signal handler raises in the main thread: neither an Exception nor KeyboardInterrupt."""


@pytest.mark.parametrize("where, stop", [("step", KeyboardInterrupt), ("eval", _Stop), ("step", SystemExit)])
def test_an_interrupt_saves_a_checkpoint_that_resume_continues_from(tmp_path, capsys, monkeypatch, where, stop):
    """Without --checkpoint-every, Ctrl-C used to lose every step, and --resume started again at step 0 unsaid."""
    import edge_ft.device.trainer as trainer

    def plain(out):
        return [a for a in train_argv(out) if a not in ("--checkpoint-every", str(EVERY))]

    assert main(plain(tmp_path / "reference")) == 0
    real = trainer.engine_class

    def interrupting(name):
        cls = real(name)

        class Interrupted(cls):
            calls = 0

            def train_step(self, x, y, lr):
                Interrupted.calls += 1
                if where == "step" and Interrupted.calls == 20:  # step 20 is in epoch 2 (13 steps each)
                    raise stop()
                return super().train_step(x, y, lr)

            def logits(self, x):
                if where == "eval":  # the first epoch's evaluation: its 13 steps are done, its log is not
                    raise stop()
                return super().logits(x)

        return Interrupted

    monkeypatch.setattr(trainer, "engine_class", interrupting)
    out = tmp_path / "run"
    capsys.readouterr()
    if stop is KeyboardInterrupt:
        assert main(plain(out)) == 130
    else:
        with pytest.raises(stop):
            main(plain(out))
    at = 19 if where == "step" else 13
    err = capsys.readouterr().err.strip().splitlines()
    assert f"interrupted at step {at}: checkpoint saved; add --resume to continue" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{at:06d}.state"]
    assert not (out / "results.json").exists()

    monkeypatch.setattr(trainer, "engine_class", real)
    assert main([*plain(out), "--resume"]) == 0
    assert f"{out}: resuming from step {at} (checkpoints/step-{at:06d}.state)" in capsys.readouterr().err
    expected, got = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "reference", out))
    assert got["losses"] == expected["losses"] and got["resumed_from"] == [at]
    assert [e["eval_accuracy"] for e in got["epochs"]] == [e["eval_accuracy"] for e in expected["epochs"]]
    assert got["accuracy"] == expected["accuracy"]


def test_only_the_newest_checkpoints_are_kept(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*train_argv(out), "--keep", "2"]) == 0  # a checkpoint every 5 of 39 steps: 7 saved
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000030.state", "step-000035.state"]
    assert json.loads((out / "resume.json").read_text())["state"] == "checkpoints/step-000035.state"
    default = tmp_path / "default"
    assert main(train_argv(default)) == 0
    assert len(list((default / "checkpoints").iterdir())) == 3
    with pytest.raises(SystemExit):
        main(train_argv(tmp_path / "none", "--keep", "0"))
    fresh = tmp_path / "fresh"
    capsys.readouterr()
    assert main(train_argv(fresh, "--resume")) == 0
    assert f"{fresh}: no checkpoint to resume from; starting at step 0" in capsys.readouterr().err


def test_quiet_training_still_prints_its_summary_in_good_english(tmp_path, capsys):
    argv = train_argv(tmp_path / "run")
    argv[argv.index("--epochs"):argv.index("--epochs") + 2] = ["--steps", "1"]
    assert main(argv) == 0  # --quiet is in train_argv: no progress, but the result is what the user ran it for
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"{tmp_path / 'run'}: 1 step, final loss")
