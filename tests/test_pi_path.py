"""The README's Raspberry Pi section, run as written: host block in this checkout, device block in a clean venv.

The two shell blocks marked `<!-- pi-host -->` and `<!-- pi-device -->` are read from README.md and run with bash,
so the documented path cannot rot. Only paths change: the host block runs from a scratch folder, so `make`,
`.venv/` and `dist/` point back at this checkout, and the device block's `~` is a scratch home whose venv is made
from the system Python with nothing of the host installed. pip fetches the device dependencies from the package
index this machine is configured for, as a Pi would.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_predict import PICKED, write_class_folders

REPO = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    """The ```sh block right after `<!-- MARKER ... -->` in README.md."""
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker}\b[^>]*-->\s*```sh\n(.*?)```", text, re.S)
    assert match, f"README.md has no shell block marked {marker}"
    return match.group(1)


def clean_env(home: Path) -> dict:
    """This process's environment without any virtualenv on PATH (a Pi user's shell)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if p and not (Path(p) / "activate").exists() and not p.startswith(str(REPO)))
    env["HOME"] = str(home)
    return env


def run_block(script: str, cwd: Path, env: dict) -> str:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("python3") is None or sys.platform != "linux", reason="needs a Linux python3")
def test_readme_pi_section_runs_from_wheel_to_named_predictions(tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir(), home.mkdir()
    write_class_folders(work / "my-photos")
    write_class_folders(work / "new-photos", per_class=2, skip=12)  # unseen; in class folders, so they are scored

    host = readme_block("pi-host")
    host = host.replace("make dist", f"make -C {REPO} dist").replace(".venv/bin/", f"{REPO}/.venv/bin/")
    host = host.replace("dist/edge_ft", f"{REPO}/dist/edge_ft")
    run_block(host, work, dict(os.environ))
    assert sorted(p.name for p in (work / "kit").iterdir()) == ["base.json", "base.safetensors", "bundle", "data",
                                                                 next((work / "kit").glob("*.whl")).name]

    device = readme_block("pi-device")
    out = run_block(device, work, clean_env(home))
    venv_python = home / "edge-ft" / "bin" / "python"
    probe = subprocess.run([str(venv_python), "-c", "import importlib.util as u; "
                            "print([m for m in ('torch', 'onnx') if u.find_spec(m)])"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"  # the device venv holds no torch and no onnx

    lines = out.strip().splitlines()
    predictions = [line for line in lines if line.startswith("new-photos/")]
    assert len(predictions) == 6
    for line in predictions:
        first, second = line.split()[1], line.split()[3]  # "path  NAME p  NAME p  ok|(is X)"
        assert first in PICKED.values() and second in PICKED.values()
    assert lines[-1].startswith("accuracy ") and lines[-1].endswith("on 6 labelled inputs")
