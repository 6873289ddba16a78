"""Flower's per-device commands `flwr-clientapp` and `flower-superexec`, without the imports they never use.

Each command is one function in one file of flwr (flwr/supernode/cli/flwr_clientapp.py,
flwr/supercore/cli/flower_superexec.py), but its console script imports it through the package, and the package's
__init__ also imports the sibling commands: flower-supernode's HTTP server and database layer (fastapi, sqlalchemy,
alembic). Loading the one file by its path runs the same function, arguments and all, without them. That matters
twice on a device: a SuperExec starts a fresh ClientApp process for every message, so the imports are paid every
round, and the memory they hold counts against the board's budget. Measured on this machine (device venv):

    flwr-clientapp    2.9 -> 1.6 CPU-s of imports, 125 -> 92 MB RSS
    flower-superexec  2.4 -> 1.3 CPU-s of imports, 122 -> 88 MB RSS

The fleet puts `write_shims(DIR, python)` first on each SuperNode's PATH, where Flower looks both commands up:

    DIR/flwr-clientapp   = exec PYTHON -m edge_ft.fleet.lean_entry flwr-clientapp "$@"
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

from edge_ft.atomic import atomic_write_text

# command -> (package whose __init__ is light, the command's file inside it, the function the console script calls)
COMMANDS = {
    "flwr-clientapp": ("flwr.supernode", "cli/flwr_clientapp.py", "flwr_clientapp"),
    "flower-superexec": ("flwr.supercore", "cli/flower_superexec.py", "flower_superexec"),
}
MODULE = "edge_ft.fleet.lean_entry"


def load(command: str):
    """The function behind `command`, from its own file: flwr and the package are imported, the CLI package not."""
    package, file, function = COMMANDS[command]
    path = Path(importlib.util.find_spec(package).submodule_search_locations[0]) / file
    name = f"{package}.{file[:-3].replace('/', '.')}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the file imports absolute names only: no parent package is needed
    return getattr(module, function)


def write_shims(folder: Path, python: Path) -> Path:
    """One executable per command in `folder`, each running it through `python` (the device venv's); returns
    folder, to go first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for command in COMMANDS:
        shim = folder / command
        atomic_write_text(shim, f"#!/bin/sh\nexec {shlex.quote(str(python))} -m {MODULE} {command} \"$@\"\n")
        shim.chmod(0o755)
    return folder


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m {MODULE} {{{','.join(COMMANDS)}}} [ARGS...]")
    command = sys.argv.pop(1)
    sys.argv[0] = command  # Flower's argument parser names the program from argv[0]
    sys.exit(load(command)())


if __name__ == "__main__":
    main()
