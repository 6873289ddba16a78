"""The package's import directions, read from the source with ast (nothing is imported or run).

The library (everything under edge_ft/ but edge_ft/commands and edge_ft/cli.py) never imports the command layer,
and no module imports another module's private (_underscore) names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edge_ft"
COMMAND_LAYER = ("edge_ft.commands", "edge_ft.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import statement, top-level or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))
LIBRARY = [p for p in SOURCES if not module_name(p).startswith(COMMAND_LAYER)]


def test_the_walk_sees_the_package():
    names = {module_name(p) for p in SOURCES}
    assert {"edge_ft.cli", "edge_ft.commands.bench", "edge_ft.bench.sweep", "edge_ft.reports.format",
            "edge_ft.advice.recommend", "edge_ft.gates.assertions"} <= names
    assert len(LIBRARY) < len(SOURCES)
    # The check below would see an offending import: the command layer imports itself.
    command = PACKAGE / "commands" / "recommend.py"
    assert any(module.startswith("edge_ft.commands") for _, module, _ in imports(command))


@pytest.mark.parametrize("path", LIBRARY, ids=module_name)
def test_library_never_imports_the_command_layer(path):
    bad = [f"{path.name}:{line} imports {module}" for line, module, names in imports(path)
           if module.startswith(COMMAND_LAYER)
           or module == "edge_ft" and any(n in ("commands", "cli") for n in names)]
    assert not bad


@pytest.mark.parametrize("path", SOURCES, ids=module_name)
def test_no_module_imports_private_names_of_another(path):
    bad = [f"{path.name}:{line} takes {name} from {module}" for line, module, names in imports(path)
           if module.startswith("edge_ft") and module != module_name(path)
           for name in names if name.startswith("_") and not name.startswith("__")]
    assert not bad


def test_a_misspelt_record_key_is_a_type_error(tmp_path):
    """The benchmark record's schema (edge_ft.bench.records.BenchRecord) is checked: a wrong key fails mypy."""
    from mypy import api

    source = tmp_path / "reader.py"
    source.write_text("from edge_ft.bench.records import read_records\n\n"
                      "for r in read_records('results.jsonl'):\n"
                      "    print(r['peak_rss_bytes'], r.get('accuracy'))\n"
                      "    print(r['peak_rss_byte'])\n")
    # a cache of its own: the checkout's .mypy_cache would answer for an earlier run's reader.py at another path
    out, _, status = api.run(["--config-file", str(PACKAGE.parent / "pyproject.toml"), "--no-error-summary",
                              "--cache-dir", str(tmp_path / "mypy-cache"), str(source)])
    assert status == 1
    error, note = out.splitlines()  # only line 5; the note's other near misses depend on the schema's other keys
    assert error == f'{source}:5: error: TypedDict "BenchRecord" has no key "peak_rss_byte"  [typeddict-item]'
    assert note.startswith(f'{source}:5: note: Did you mean "peak_rss_bytes"')
