#!/usr/bin/env bash
# Set up (or reuse) the project's virtualenv in .venv: torch first, then the project with its dev tools.
#
# torch is installed on its own first because an unpinned torch from the index is a multi-GB CUDA
# build; EBCA_TORCH_SPEC picks another build (on a GPU machine: "torch", whose PyPI build for Linux x86_64 is CUDA).
# A second run is a no-op while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN="${PYTHON:-}"
if [ -z "$PYTHON_BIN" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON_BIN="$candidate"; break; fi
  done
fi
if [ -z "$PYTHON_BIN" ]; then
  echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if ! "$PYTHON_BIN" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "setup: $PYTHON_BIN is $("$PYTHON_BIN" --version 2>&1); Python >= 3.11 is required" >&2
  exit 1
fi

TORCH_SPEC="${EBCA_TORCH_SPEC:-torch==2.13.0}"
stamp=".venv/.ebca-setup"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON_BIN" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
echo "setup: installing $TORCH_SPEC"
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
echo "setup: installing the project (editable) with its dev tools"
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done (.venv)"
