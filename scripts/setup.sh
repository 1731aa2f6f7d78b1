#!/usr/bin/env bash
# Set up (or reuse) everything the project needs on this machine: the system packages, then the
# project's virtualenv in .venv (torch first, then the project with its dev tools, then the SDK,
# client/ (the ebca-client distribution), editable over the copy pip made of it).
#
#   scripts/setup.sh [--runtime]
#
# System packages (Debian/Ubuntu names), installed with apt-get when missing and running as root;
# otherwise setup stops and names what to install:
#   always:          python3.X-venv (Python's venv module), redis-server
#   unless --runtime: docker-compose (the deployment lint of scripts/test.sh), chromium (the browser
#                     tests of the web page, driven by Playwright's Python package)
# --runtime is what scripts/serve.sh asks for: running the service needs no test tools.
#
# torch is installed on its own first because an unpinned torch from the index is a multi-GB CUDA
# build; EBCA_TORCH_SPEC picks another build (on a GPU machine: "torch", whose PyPI build for Linux
# x86_64 is CUDA). A second run is a no-op while pyproject.toml and client/pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --runtime) RUNTIME_ONLY=1 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown option: $arg" >&2; exit 2 ;;
  esac
done

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

# -- 1. system packages ---------------------------------------------------------------------------------
have_venv_module() { [ -x .venv/bin/python ] || "$PYTHON_BIN" -c 'import ensurepip, venv' >/dev/null 2>&1; }
have_compose() { command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1; }
have_chromium() { command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; }
py_version="$("$PYTHON_BIN" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
missing=()
have_venv_module || missing+=("python${py_version}-venv")
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ "$RUNTIME_ONLY" = 0 ]; then
  have_compose || missing+=(docker-compose)
  have_chromium || missing+=(chromium)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing system packages: ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]}" >&2
    echo "setup: install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}) and run again" >&2
    exit 1
  fi
fi

# -- 2. the virtualenv ----------------------------------------------------------------------------------
TORCH_SPEC="${EBCA_TORCH_SPEC:-torch==2.13.0}"
stamp=".venv/.ebca-setup"
want="$(cat pyproject.toml client/pyproject.toml | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON_BIN" -m venv .venv
# Left in the checkout by the setuptools builds of earlier versions: on sys.path (the tests run from the
# checkout) it would stand in for the installed project's metadata.
rm -rf ebca_serve.egg-info
.venv/bin/python -m pip install --quiet --upgrade pip
echo "setup: installing $TORCH_SPEC"
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
echo "setup: installing the project (editable) with its dev tools"
.venv/bin/python -m pip install --quiet -e ".[dev]"
# The project depends on ebca-client by path (pyproject.toml), which pip installs as a copy; the
# editable install makes edits under client/ take effect (pip cannot do both in one command).
echo "setup: installing the SDK (client/, editable)"
.venv/bin/python -m pip install --quiet --no-deps -e ./client
echo "$want" > "$stamp"
echo "setup: done (.venv)"
