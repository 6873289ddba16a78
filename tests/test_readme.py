"""The README is a short user's guide whose every command exists, and the documentation site builds strictly.

tests/test_pi_path.py runs the README's quickstart blocks; this file checks the rest of what the README promises: its
length, that it holds no dated measurements, that each command of its table is a real `edge-ft` command, that its
links reach the docs pages, and that `make docs-check` (what CI runs) builds the site with the quickstart, the API
reference and the generated results page in it.
"""

import html
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from edge_ft.cli import main
from tests.test_pi_path import readme_block

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_is_short_and_holds_no_dated_measurements():
    assert len(README.splitlines()) <= 200
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", README)  # dated figures live on generated results pages
    assert "ms/step |" not in README and "load average" not in README


def test_every_command_in_the_table_exists(capsys):
    cells = [line.split(" | ")[0] for line in README.splitlines() if line.startswith("| `edge-ft ")]
    commands = [(name, re.findall(r"[a-z]+", rest)) for cell in cells
                for name, rest in re.findall(r"`edge-ft ([a-z]+)([^`]*)`", cell)]
    assert len(commands) >= 19 and ("rollback", []) in commands
    for name, actions in commands:
        for argv in [[name]] + [[name, action] for action in actions]:
            with pytest.raises(SystemExit) as done:
                main([*argv, "--help"])
            assert done.value.code == 0, argv
    capsys.readouterr()


def test_readme_links_reach_pages_of_the_site():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]
    in_nav = set(pages(config["nav"]))
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert links
    for link in links:
        assert (REPO / link).is_file(), link
        assert Path(link).suffix != ".md" or link.removeprefix("docs/") in in_nav, link
    on_disk = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").glob("*.md")}
    assert on_disk <= in_nav  # no page is left out of the site's navigation


def text_of(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_the_site_builds_strictly_with_the_quickstart_api_and_results(tmp_path):
    done = subprocess.run(["make", "-s", "docs-check"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    site = tmp_path / "site"
    done = subprocess.run([str(REPO / ".venv" / "bin" / "mkdocs"), "build", "--strict", "--quiet", "--site-dir",
                           str(site)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    pi = text_of(site / "pi" / "index.html")
    for marker in ("pi-host", "pi-device"):  # the quickstart the README runs is the one the site shows
        for line in readme_block(marker).strip().splitlines():
            assert re.sub(r"\s+", " ", line.split("#")[0]).strip() in re.sub(r"\s+", " ", pi), line
    api = text_of(site / "api" / "index.html")
    for name in ("Trainer", "fit", "evaluate", "save_checkpoint", "export_adapter", "Predictor", "train_run"):
        assert name in api
    assert "callback" in api and "FitProgress" in api  # docstrings rendered, not just names
    results = text_of(site / "results" / "steady" / "index.html")
    assert "machine" in results and "onnxruntime 1.32.0" in results and "2026-12-06" in results
    assert results.count("rpi-zero-2w") >= 10  # one table per set of runs
    scale = text_of(site / "results" / "fleet-scale" / "index.html")  # from docs/fleet-scale/fleet-scale.json
    assert "ray 2.55.1" in scale and "rounds to 0.9" in scale and scale.count("FFA-LoRA") >= 9
    assert (site / "results" / "fleet_scale.png").stat().st_size > 10_000
