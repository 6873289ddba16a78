#!/usr/bin/env bash
# Build the edge-ft wheel (and, with --sdist, the sdist) into DEST without writing into the checkout.
#
#   bash tools/build-wheel.sh [--sdist] DEST     prints the wheel's path (then the sdist's) on stdout
#
# setuptools writes build/ and *.egg-info next to pyproject.toml, so the build runs in a temporary copy of the
# build's inputs (pyproject.toml, README.md, edge_ft/) as they are in the working tree: tracked files with their
# uncommitted edits plus new files git does not ignore. The boards (edge_ft/emulation/device_profiles/) are package
# data in pyproject.toml, so a plain `pip wheel .` carries them too; this script only keeps the checkout clean.
# Offline: the PEP 517 hooks of the setuptools already in PYTHON (default: the host .venv), no build isolation.
# Used by `make dist`, `make device-venv` and `make test-arm` (tools/test-arm.sh).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
SDIST=0
[ "${1:-}" = --sdist ] && { SDIST=1; shift; }
[ $# = 1 ] || { echo "usage: $0 [--sdist] DEST" >&2; exit 2; }
mkdir -p "$1"
DEST=$(cd "$1" && pwd)

fail() { echo "build-wheel: $*" >&2; exit 1; }
[ -x "$PYTHON" ] || fail "no python at $PYTHON: run \`make venv\` (or set PYTHON to one with setuptools>=77)"
# pyproject's SPDX `license = "MIT"` needs setuptools 77; older ones stop with a schema error deep in the build.
"$PYTHON" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null ||
    fail "$PYTHON has no setuptools>=77 (requirements/host.txt pins it): run \`make venv\`"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/edge-ft-build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
INPUTS=(pyproject.toml README.md edge_ft)
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # --cached still lists files deleted in the working tree: copy only those that exist.
    git -C "$REPO" ls-files -z --cached --others --exclude-standard -- "${INPUTS[@]}" |
        (cd "$REPO" && while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done) |
        tar -C "$REPO" --null -T - -cf - | tar -C "$TMP" -xf -
else
    tar -C "$REPO" --exclude=__pycache__ -cf - "${INPUTS[@]}" | tar -C "$TMP" -xf -
fi

# The hooks return the file name they wrote; their own chatter goes to stderr, only paths to stdout.
(cd "$TMP" && "$PYTHON" - "$DEST" "$SDIST" <<'EOF'
import contextlib, os, sys
from setuptools import build_meta

dest, sdist = sys.argv[1], sys.argv[2] == "1"
with contextlib.redirect_stdout(sys.stderr):
    names = [build_meta.build_wheel(dest)] + ([build_meta.build_sdist(dest)] if sdist else [])
print("\n".join(os.path.join(dest, n) for n in names))
EOF
) 2>"$TMP.log" || { cat "$TMP.log" >&2; rm -f "$TMP.log"; fail "setuptools could not build the wheel (log above)"; }
rm -f "$TMP.log"
