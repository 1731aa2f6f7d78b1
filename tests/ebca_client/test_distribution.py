"""ebca-client is its own distribution (client/): installable alone with one pip command, httpx and
pydantic its only dependencies, and the main project depends on it by path, never by name alone (so
no install can fetch a package of that name from an index)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from stack_helpers import REPO_ROOT

CLIENT_DIR = REPO_ROOT / "client"
CLIENT = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())
PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
HEAVY = {"torch", "diffusers", "transformers", "safetensors", "numpy", "scipy", "pillow", "ebca-serve"}


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_client_distribution_metadata() -> None:
    project = CLIENT["project"]
    assert project["name"] == "ebca-client"
    assert {requirement_name(r) for r in project["dependencies"]} == {"httpx", "pydantic"}
    assert project["scripts"] == {"ebca": "ebca_client.cli:main"}
    assert {requirement_name(r) for r in project["optional-dependencies"]["images"]} == {"pillow"}
    assert CLIENT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["ebca_client"]


def test_the_project_depends_on_the_client_by_path_only() -> None:
    references = [r for r in PROJECT["project"]["dependencies"] if requirement_name(r) == "ebca-client"]
    assert references == ["ebca-client @ {root:uri}/client"]
    assert PROJECT["tool"]["hatch"]["metadata"]["allow-direct-references"] is True
    # The installed project (scripts/setup.sh) resolved it to this checkout's client/ ...
    (installed,) = [r for r in metadata.requires("ebca-serve") or [] if requirement_name(r) == "ebca-client"]
    url = installed.split("@", 1)[1].strip()
    assert url.startswith("file://") and Path(url.removeprefix("file://")) == CLIENT_DIR
    # ... and setup.sh put the SDK in editable, so the tests and `ebca` run this tree's code.
    direct = json.loads(metadata.distribution("ebca-client").read_text("direct_url.json") or "{}")
    assert direct.get("dir_info", {}).get("editable") is True
    assert Path(direct["url"].removeprefix("file://")) == CLIENT_DIR


def test_no_install_step_names_the_client_without_its_path() -> None:
    """Every pip install in the setup script, CI and the images either installs a path or a list
    that does not hold ebca-client; the GPU image copies client/ before installing the project."""
    files = [REPO_ROOT / p for p in ("scripts/setup.sh", ".ci/run", "Dockerfile", "Dockerfile.gpu")]
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip().startswith("#"):
                continue
            if "pip install" in line and "ebca-client" in line:
                pytest.fail(f"{path.name}: {line.strip()}")
    gpu = (REPO_ROOT / "Dockerfile.gpu").read_text()
    assert gpu.index("COPY client ./client") < gpu.index("RUN pip install .")
    assert "pip install --quiet --no-deps -e ./client" in (REPO_ROOT / "scripts" / "setup.sh").read_text()


FRESH_VENV_CHECK = r"""
import json, sys
from importlib import metadata
from packaging.requirements import Requirement

def closure(name, seen):
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    seen.add(key)
    for raw in metadata.requires(name) or []:
        req = Requirement(raw)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            closure(req.name, seen)

needed = set()
closure("ebca-client", needed)
installed = sorted(d.metadata["Name"].lower().replace("_", "-") for d in metadata.distributions())
print(json.dumps({"installed": installed, "needed": sorted(needed)}))
"""

ROUND_TRIP = r"""
import sys
from ebca_client import Client, EBCAClientError

with Client(sys.argv[1]) as client:
    job = client.generate("a red circle and a blue square", steps=2, seed=4).wait(timeout=120)
    (path,) = job.save(sys.argv[2])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    try:
        job.images()
    except EBCAClientError as exc:
        print("images:", exc)
print("job", job.id, job.status)
"""


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_client_installs_alone_into_a_fresh_venv_and_round_trips(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, ebca = venv / "bin" / "python", venv / "bin" / "ebca"
    # The documented command, as a user runs it in a checkout (with the venv's own pip).
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet", str(CLIENT_DIR)],
        capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]

    # `packaging` comes with pip's own vendored copy; the check runs it from there.
    check = FRESH_VENV_CHECK.replace("from packaging.", "from pip._vendor.packaging.")
    out = subprocess.run([str(python), "-c", check], capture_output=True, text=True, check=True, timeout=60)
    report = json.loads(out.stdout)
    installed, needed = set(report["installed"]), set(report["needed"])
    assert {"ebca-client", "httpx", "pydantic"} <= needed
    assert not installed & HEAVY, sorted(installed & HEAVY)  # no torch, no pillow, not the service
    # Nothing else came along: what is installed is the client's dependency closure, plus pip.
    assert installed - needed <= {"pip", "setuptools", "wheel"}, sorted(installed - needed)

    help_text = subprocess.run([str(ebca), "--help"], capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "generate" in help_text.stdout and "--api-key" in help_text.stdout

    # The key comes from the environment, as a user sets it (EBCA_API_KEY).
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "EBCA_API_KEY": stack.key}
    out_dir = tmp_path / "out"
    gen = subprocess.run(
        [str(ebca), "--url", stack.url, "generate", "a lion with a crown", "--steps", "2", "--seed", "3",
         "--gamma-attn", "0.01", "--weight", "crown=2", "-o", str(out_dir)],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    (png,) = gen.stdout.split()
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "succeeded: 1 image(s)" in gen.stderr

    sdk = subprocess.run(
        [str(python), "-c", ROUND_TRIP, stack.url, str(tmp_path / "sdk")],
        capture_output=True, text=True, timeout=180, env=env,
    )  # fmt: skip
    assert sdk.returncode == 0, sdk.stderr
    assert "succeeded" in sdk.stdout
    # Without the images extra, decoding says what to install; saving needed nothing more.
    assert "images: decoding images needs pillow" in sdk.stdout and "ebca-client[images]" in sdk.stdout
