"""Signed adapters and bundles, the device's trust policy, freshness (rollback, freeze, rotation), and A/B deploy
with rollback: each refusal one line and exit 2, on real adapters trained on digits."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from ort_training_support import METHODS, bundle, fresh_bundle, npz_pair
from test_adapter import trained_adapter

from edge_ft.cli import main
from edge_ft.trust.rollout import ACTIVE, read_log
from edge_ft.trust.signature import SIGNATURE, now_utc, sign_folder


@pytest.fixture(autouse=True)
def device_home(tmp_path, monkeypatch) -> Path:
    """Each test's own $EDGE_FT_HOME: trusted keys, accepted versions, deploy slots."""
    home = tmp_path / "home"
    monkeypatch.setenv("EDGE_FT_HOME", str(home))
    return home


def keypair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    assert main(["keys", "new", "--out", str(tmp_path / name)]) == 0
    return tmp_path / f"{name}.key", tmp_path / f"{name}.pub"


def signed_copy(src: Path, dest: Path, key: Path, version: int, name: str = "digits", *extra: str) -> Path:
    shutil.copytree(src, dest)
    assert main(["adapter", "sign", str(dest), "--key", str(key), "--version", str(version), "--name", name,
                 *extra]) == 0
    return dest


def one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


def key_id(pub: Path) -> str:
    from edge_ft.trust.keys import load_public_key

    return load_public_key(pub).keyid[:16]


@pytest.fixture
def signed(tmp_path):
    """(key, pub, signed lora adapter version 2, signed bundle it fits)."""
    key, pub = keypair(tmp_path, "release")
    _, adapter = trained_adapter("lora")
    b = fresh_bundle(METHODS["lora"])
    assert main(["adapter", "sign", str(b), "--key", str(key), "--version", "1", "--name", "lenet-lora"]) == 0
    return key, pub, signed_copy(adapter, tmp_path / "v2", key, 2), b


def test_signed_adapter_verifies_and_the_signature_is_small(signed, capsys):
    key, pub, adapter, _ = signed
    capsys.readouterr()
    assert main(["adapter", "verify", str(adapter), "--trust", str(pub)]) == 0
    out = capsys.readouterr().out
    assert f"digits version 2, signed by key {key_id(pub)}" in out and "every file verified" in out
    doc = json.loads((adapter / SIGNATURE).read_text())
    assert sorted(f["path"] for f in doc["signed"]["files"]) == ["adapter_config.json", "adapter_model.safetensors",
                                                                 "edge_ft_adapter.json"]
    assert (adapter / SIGNATURE).stat().st_size < 1500


def test_unsigned_adapter_is_refused_under_a_policy(signed, capsys):
    _, pub, _, b = signed
    _, adapter = trained_adapter("lora")
    one_line_error(capsys, ["adapter", "merge", str(b), str(adapter), "--out", str(b.parent / "m.onnx"),
                            "--trust", str(pub)], str(adapter), "unsigned")
    assert not (b.parent / "m.onnx").exists()


@pytest.mark.parametrize("victim", ["adapter_model.safetensors", "adapter_config.json", "edge_ft_adapter.json",
                                    SIGNATURE])
def test_a_flipped_byte_in_any_file_is_refused(signed, victim, capsys):
    _, pub, adapter, _ = signed
    path = adapter / victim
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if victim != SIGNATURE else data.index(b'"version": 2') + len('"version": ')
    data[at] ^= 0x01  # the signature file: version 2 -> 3, still valid JSON
    path.write_bytes(bytes(data))
    line = one_line_error(capsys, ["adapter", "verify", str(adapter), "--trust", str(pub)])
    assert ("does not verify" in line) if victim == SIGNATURE else (f"{victim}: changed since key" in line)


def test_a_file_added_after_signing_is_refused(signed, capsys):
    _, pub, adapter, _ = signed
    (adapter / "extra.py").write_text("print('hi')\n")
    one_line_error(capsys, ["adapter", "verify", str(adapter), "--trust", str(pub)], "extra.py: not covered")


def test_a_valid_signature_by_an_untrusted_key_is_refused(signed, tmp_path, capsys):
    _, pub, _, _ = signed
    other_key, other_pub = keypair(tmp_path, "stranger")
    _, adapter = trained_adapter("lora")
    forged = signed_copy(adapter, tmp_path / "forged", other_key, 9)
    one_line_error(capsys, ["adapter", "verify", str(forged), "--trust", str(pub)],
                   f"signed by key {key_id(other_pub)}, which this device does not trust (trusted: {key_id(pub)})")


def test_a_replayed_older_version_is_refused(signed, tmp_path, capsys):
    key, pub, v2, b = signed
    _, adapter = trained_adapter("lora")
    v1 = signed_copy(adapter, tmp_path / "v1", key, 1)
    merge = ["adapter", "merge", str(b), "--out", str(tmp_path / "m.onnx"), "--trust", str(pub)]
    assert main([*merge[:3], str(v1), *merge[3:]]) == 0  # version 1 first: accepted
    assert main([*merge[:3], str(v2), *merge[3:]]) == 0  # then 2
    one_line_error(capsys, [*merge[:3], str(v1), *merge[3:]], "digits version 1", "older than version 2",
                   "refusing a rollback")
    assert main([*merge[:3], str(v2), *merge[3:]]) == 0  # the accepted version itself still loads


def test_an_expired_adapter_is_refused(signed, tmp_path, capsys):
    key, pub, _, _ = signed
    stale = tmp_path / "stale"
    shutil.copytree(trained_adapter("lora")[1], stale)
    sign_folder(stale, key, 3, "digits", expires=now_utc() - timedelta(days=1))
    one_line_error(capsys, ["adapter", "verify", str(stale), "--trust", str(pub)], "digits version 3", "expired",
                   "refusing a stale artifact")


def test_a_rotated_key_is_accepted_and_retires_the_old_one(signed, tmp_path, capsys):
    old_key, old_pub, _, b = signed
    new_key, new_pub = keypair(tmp_path, "next")
    rotation = tmp_path / "rotation.json"
    assert main(["keys", "rotate", "--old", str(old_key), "--new", str(new_pub), "--out", str(rotation)]) == 0
    _, adapter = trained_adapter("lora")
    v3 = signed_copy(adapter, tmp_path / "v3", new_key, 3, "digits", "--rotation", str(rotation))
    assert main(["keys", "trust", str(old_pub)]) == 0  # the device's installed policy: the old key only
    capsys.readouterr()
    assert main(["adapter", "verify", str(v3)]) == 0
    assert f"signed by key {key_id(new_pub)} (via rotation from key {key_id(old_pub)})" in capsys.readouterr().out
    assert main(["adapter", "merge", str(b), str(v3), "--out", str(tmp_path / "m.onnx")]) == 0
    v4 = signed_copy(adapter, tmp_path / "v4", old_key, 4)  # the old key alone, after the device saw the rotation
    one_line_error(capsys, ["adapter", "verify", str(v4)], f"signed by key {key_id(old_pub)}, retired",
                   f"in favour of key {key_id(new_pub)}")
    stranger_key, _ = keypair(tmp_path, "stranger")  # a rotation the trusted key did not sign leads nowhere
    fake = tmp_path / "fake-rotation.json"
    assert main(["keys", "rotate", "--old", str(stranger_key), "--new", str(new_pub), "--out", str(fake)]) == 0
    v5 = signed_copy(adapter, tmp_path / "v5", new_key, 5, "digits", "--rotation", str(fake))
    one_line_error(capsys, ["adapter", "verify", str(v5)], f"signed by key {key_id(new_pub)}, which this device "
                   "does not trust")


def test_without_a_policy_commands_work_with_one_notice(tmp_path, capsys):
    _, adapter = trained_adapter("lora")
    capsys.readouterr()
    assert main(["adapter", "merge", str(bundle(METHODS["lora"])), str(adapter), "--out",
                 str(tmp_path / "m.onnx")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notice: no trust policy" in err[0] and "not verified" in err[0]


def test_train_and_predict_refuse_unsigned_and_accept_signed_under_a_policy(signed, tmp_path, capsys):
    key, pub, _, b = signed
    train, test = npz_pair()
    unsigned = fresh_bundle(METHODS["lora"])
    run = tmp_path / "run"
    args = ["--data", str(train), "--steps", "2", "--quiet", "--out", str(run), "--trust", str(pub)]
    one_line_error(capsys, ["train", str(unsigned), *args], str(unsigned), "unsigned")
    assert not run.exists()
    assert main(["train", str(b), *args]) == 0
    one_line_error(capsys, ["predict", str(run), str(test), "--trust", str(pub)], "unsigned")
    assert main(["adapter", "sign", str(run), "--key", str(key), "--version", "1", "--name", "run"]) == 0
    assert main(["predict", str(run), str(test), "--trust", str(pub)]) == 0


def test_an_applied_adapter_keeps_the_bundle_signature_valid(signed, capsys):
    _, pub, adapter, b = signed
    assert main(["adapter", "apply", str(b), str(adapter), "--trust", str(pub)]) == 0
    assert (b / "applied_adapter.safetensors").is_file()
    assert main(["adapter", "verify", str(b), "--trust", str(pub)]) == 0
    graph = next(p for p in sorted(b.iterdir()) if p.suffix == ".onnx")
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    one_line_error(capsys, ["adapter", "verify", str(b), "--trust", str(pub)], f"{graph.name}: changed since key")



DEVICE_PYTHON = Path(__file__).resolve().parents[1] / ".venv-device" / "bin" / "python"


@pytest.mark.skipif(not DEVICE_PYTHON.exists(), reason="device venv not built (make device-venv)")
def test_the_device_venv_verifies_and_refuses_without_torch(signed, tmp_path, device_home):
    """keys trust, adapter verify and adapter merge under a policy on the device install (no torch, no onnx)."""
    import os
    import subprocess

    _, pub, adapter, b = signed
    repo = Path(__file__).resolve().parents[1]
    code = ("import sys; from edge_ft.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules and 'onnx' not in sys.modules; sys.exit(rc)")

    def device(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(DEVICE_PYTHON), "-c", code, *argv], cwd=repo, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300)

    assert device("keys", "trust", str(pub)).returncode == 0
    done = device("adapter", "verify", str(adapter))
    assert done.returncode == 0 and "every file verified" in done.stdout, done.stderr
    assert device("adapter", "merge", str(b), str(adapter), "--out", str(tmp_path / "m.onnx")).returncode == 0
    refused = device("adapter", "merge", str(b), str(trained_adapter("lora")[1]), "--out", str(tmp_path / "x.onnx"))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1 and "unsigned" in refused.stderr


def weak_adapter(tmp_path: Path) -> Path:
    """A LoRA adapter of one tiny step: about the base model's accuracy, far below the 60-step one."""
    train, _ = npz_pair()
    run, out = tmp_path / "weak-run", tmp_path / "weak"
    assert main(["train", str(bundle(METHODS["lora"])), "--data", str(train), "--steps", "1", "--lr", "1e-6",
                 "--out", str(run), "--quiet"]) == 0
    assert main(["adapter", "export", str(run), "--out", str(out)]) == 0
    return out


def active_slot(root: Path) -> str:
    return json.loads((root / ACTIVE).read_text())["active"]


def test_deploy_keeps_the_better_model_and_rollback_restores_the_previous(tmp_path, capsys):
    _, good = trained_adapter("lora")
    weak = weak_adapter(tmp_path)
    _, test = npz_pair()
    root, b = tmp_path / "deploy", str(bundle(METHODS["lora"]))
    deploy = ["deploy", "--bundle", b, "--holdout", str(test), "--root", str(root)]
    assert main([*deploy, str(weak)]) == 0 and active_slot(root) == "a"
    assert main([*deploy, str(good)]) == 0 and active_slot(root) == "b"  # accuracy rose: switched
    line = one_line_error(capsys, [*deploy, str(weak)], "not activated: holdout accuracy", "slot b stays active")
    assert active_slot(root) == "b", line
    decisions = [e["decision"] for e in read_log(root)]
    assert decisions == ["activated", "activated", "rejected"]
    rejected = read_log(root)[-1]
    assert rejected["accuracy"] < rejected["active_accuracy"] - 0.01
    capsys.readouterr()
    assert main(["predict", str(root), str(test), "--json"]) == 0  # reads the active slot, b
    good_accuracy = json.loads(capsys.readouterr().out)["accuracy"]
    assert good_accuracy == pytest.approx(read_log(root)[1]["accuracy"])
    assert main(["rollback", "--root", str(root)]) == 0 and active_slot(root) == "a"  # the weak model again
    capsys.readouterr()
    assert main(["predict", str(root), str(test), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(read_log(root)[0]["accuracy"])
    assert main(["rollback", "--root", str(root)]) == 0 and active_slot(root) == "b"
    capsys.readouterr()
    assert main(["predict", str(root), str(test), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == good_accuracy
    assert [e["decision"] for e in read_log(root)][-2:] == ["rolled back", "rolled back"]


def test_rollback_needs_a_previous_model(tmp_path, capsys):
    _, good = trained_adapter("lora")
    _, test = npz_pair()
    root = tmp_path / "deploy"
    one_line_error(capsys, ["rollback", "--root", str(root)], "nothing deployed")
    assert main(["deploy", str(good), "--bundle", str(bundle(METHODS["lora"])), "--holdout", str(test),
                 "--root", str(root)]) == 0
    one_line_error(capsys, ["rollback", "--root", str(root)], "no previous model to roll back to")


def test_deploy_under_a_policy_refuses_and_logs_an_unsigned_adapter(signed, tmp_path, capsys):
    _, pub, adapter, b = signed
    _, test = npz_pair()
    root = tmp_path / "deploy"
    deploy = ["deploy", "--bundle", str(b), "--holdout", str(test), "--root", str(root), "--trust", str(pub)]
    assert main([*deploy, str(adapter)]) == 0
    slot = json.loads((root / "a" / "slot.json").read_text())
    assert slot["signed"]["adapter"] == {"name": "digits", "version": 2, "keyid": json.loads(
        (adapter / SIGNATURE).read_text())["signed"]["keyid"]}
    one_line_error(capsys, [*deploy, str(trained_adapter("lora")[1])], "unsigned")
    assert [e["decision"] for e in read_log(root)] == ["activated", "refused"] and active_slot(root) == "a"
    assert main(["predict", str(root), str(test), "--trust", str(pub)]) == 0  # the active slot, verified
    unverified = tmp_path / "unverified"
    assert main(["deploy", str(adapter), "--bundle", str(b), "--holdout", str(test), "--root", str(unverified)]) == 0
    one_line_error(capsys, ["predict", str(unverified), str(test), "--trust", str(pub)],
                   "deployed without verification")


KILLER = """
# Loaded at start-up through PYTHONPATH: SIGKILLs this process when deploy calls one step for the n-th time.
import os, signal
import edge_ft.trust.rollout as rollout

name, nth, after = os.environ["EDGE_FT_KILL_AT"].split(":")
calls, real = [0], getattr(rollout, name)

def step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(nth) and after == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(*args, **kwargs)
    if calls[0] == int(nth) and after == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(rollout, name, step)
"""
# Every step deploy takes after verification, killed before and after it: building the slot, swapping it in, the
# two holdout scores (new, active), slot.json then active.json (the switch), the log line.
KILL_POINTS = [(name, nth, when) for name, nth in [("_stage", 1), ("replace_folder", 1), ("holdout_accuracy", 1),
                                                   ("holdout_accuracy", 2), ("atomic_write_json", 1),
                                                   ("atomic_write_json", 2), ("log", 1)]
               for when in ("before", "after")]


def assert_one_valid_active_model(root: Path, models: set[str]) -> str:
    """active.json names a slot whose model.onnx has the recorded hash, one of the models deployed."""
    from edge_ft.checkpoint import sha256_file
    from edge_ft.trust.rollout import active_model, read_active

    active = read_active(root)
    digest = sha256_file(active_model(root))
    assert active is not None and digest == active["active_sha256"] and digest in models
    return digest


@pytest.mark.slow
@pytest.mark.skipif(not DEVICE_PYTHON.exists(), reason="device venv not built (make device-venv)")
def test_sigkill_during_deploy_leaves_one_valid_active_model(tmp_path):
    import os
    import random
    import subprocess
    import time

    from edge_ft.checkpoint import sha256_file

    _, good = trained_adapter("lora")
    weak = weak_adapter(tmp_path)
    _, test = npz_pair()
    root, b = tmp_path / "deploy", str(bundle(METHODS["lora"]))
    assert main(["deploy", str(weak), "--bundle", b, "--holdout", str(test), "--root", str(root)]) == 0
    models = {sha256_file(root / "a" / "model.onnx")}
    repo = Path(__file__).resolve().parents[1]
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILLER)
    argv = [str(DEVICE_PYTHON), "-m", "edge_ft.cli", "deploy", str(good), "--bundle", b, "--holdout", str(test),
            "--root", str(root)]
    env = {**os.environ, "PYTHONPATH": f"{repo}"}
    started = time.monotonic()
    assert subprocess.run(argv, env=env, capture_output=True, timeout=300).returncode == 0  # the new model
    duration = time.monotonic() - started
    models.add(sha256_file(root / "b" / "model.onnx"))
    assert main(["rollback", "--root", str(root)]) == 0  # weak active again: every deploy below builds slot b
    rng = random.Random(0)
    plans = [(p, None) for p in KILL_POINTS] + [(None, rng.uniform(0.2, duration)) for _ in range(4)]
    for point, delay in plans:
        killer = {"PYTHONPATH": f"{hooks}{os.pathsep}{repo}", "EDGE_FT_KILL_AT": ":".join(map(str, point))} \
            if point else {}
        proc = subprocess.Popen(argv, env={**env, **killer}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if delay is not None:
            time.sleep(delay)
            proc.kill()
        proc.wait(timeout=300)
        assert proc.returncode == -9 if point else proc.returncode in (0, -9), (point, proc.stderr.read())
        assert_one_valid_active_model(root, models)
        if proc.returncode == 0 or json.loads((root / ACTIVE).read_text())["active"] == "b":
            assert main(["rollback", "--root", str(root)]) == 0  # back to weak for the next kill
    assert not list(root.glob(".staging-*")) or main(["deploy", str(good), "--bundle", b, "--holdout", str(test),
                                                      "--root", str(root)]) == 0
    assert not list(root.glob(".staging-*"))
    assert_one_valid_active_model(root, models)


@pytest.mark.slow  # end to end: export, sign, a device venv trains it (a minute on a busy 2-core machine)
def test_export_signs_the_bundle_and_a_policy_device_trains_it(base_checkpoint, tmp_path, capsys):
    key, pub = keypair(tmp_path, "release")
    out = tmp_path / "bundle"
    one_line_error(capsys, ["export", "--method", "lora", "--base", str(base_checkpoint), "--out", str(out),
                            "--sign-key", str(tmp_path / "nope.key")], "no such private key file")
    assert not out.exists()
    assert main(["export", "--method", "lora", "--base", str(base_checkpoint), "--out", str(out),
                 "--sign-key", str(key), "--sign-version", "4"]) == 0
    signed = json.loads((out / SIGNATURE).read_text())["signed"]
    assert signed["kind"] == "bundle" and signed["version"] == 4 and signed["name"] == "bundle"
    assert {f["path"] for f in signed["files"]} == {p.relative_to(out).as_posix() for p in out.rglob("*")
                                                    if p.is_file() and p.name != SIGNATURE}  # head/ too
    train, _ = npz_pair()
    assert main(["train", str(out), "--data", str(train), "--steps", "2", "--quiet", "--out", str(tmp_path / "run"),
                 "--trust", str(pub)]) == 0
