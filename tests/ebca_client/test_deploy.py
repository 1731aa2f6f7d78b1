"""The deployment files (docker-compose.yml, Dockerfiles, .env.example) against the code they deploy.

No Docker engine runs here: scripts/lint_deploy.sh validates the compose file and lints the
Dockerfiles; these tests check what a linter cannot: that the compose file and .env.example cover
every service setting with the service's own defaults, and that the API image's dependency list
(the `api` extra) is enough to import the API and holds no torch.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from stack_helpers import REPO_ROOT

from ebca_common.settings import Settings

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
ENV_EXAMPLE = (REPO_ROOT / ".env.example").read_text()
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def env_names(field: str) -> list[str]:
    info = Settings.model_fields[field]
    alias = info.validation_alias
    if alias is not None:
        return [c for c in alias.choices if c.isupper()]  # type: ignore[union-attr]
    return [f"EBCA_{field.upper()}"]


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_env_example_documents_every_setting(field: str) -> None:
    assert any(re.search(rf"^#? ?{name}=", ENV_EXAMPLE, re.M) for name in env_names(field)), field


def test_env_example_defaults_are_the_service_defaults() -> None:
    for match in re.finditer(r"^# (EBCA_[A-Z_]+)=(.*)$", ENV_EXAMPLE, re.M):
        name, value = match.groups()
        field = name.removeprefix("EBCA_").lower()
        if field not in Settings.model_fields:
            continue  # client, compose or serve.sh variables
        parsed = Settings.model_validate({field: value}).model_dump()[field]
        assert parsed == Settings().model_dump()[field] or name in {"EBCA_REDIS_URL"}, name


def test_compose_passes_every_service_setting_with_matching_defaults() -> None:
    env = COMPOSE["x-ebca-settings"]
    worker_env = COMPOSE["services"]["worker"]["environment"]
    # Values the compose topology decides on purpose (addresses, paths inside the containers, the
    # MinIO credentials).
    topology = {
        "redis_url",
        "storage_url",
        "s3_endpoint_url",
        "default_model",
        "device",
        "aws_access_key_id",
        "aws_secret_access_key",
    }
    for field in Settings.model_fields:
        names = env_names(field)
        present = [n for n in names if n in env or n in worker_env]
        if field == "aws_session_token":
            continue  # MinIO root credentials need no session token
        assert present, f"{field} is not passed to the containers"
        value = str(env.get(present[0], worker_env.get(present[0])))
        default = re.fullmatch(r"\$\{[A-Z_]+:-(.*)\}", value)
        if field in topology or default is None:
            continue
        compose_default = Settings.model_validate({field: default.group(1)}).model_dump()[field]
        assert compose_default == Settings().model_dump()[field], field


def test_compose_services_healthchecks_and_dependencies() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"api", "worker", "redis", "minio", "minio-init"}
    for name in ("api", "worker", "redis", "minio"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["minio-init"]["condition"] == "service_completed_successfully"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing" in " ".join(services["minio-init"]["command"])


def test_compose_worker_is_scalable_gpu_service() -> None:
    worker = COMPOSE["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert worker["build"]["dockerfile"] == "Dockerfile.gpu"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # Each replica sees every GPU and claims its own one through the shared lock volume.
    assert device["count"] == "all" and "gpu-locks:/run/ebca-gpus" in worker["volumes"]
    assert any(v.endswith(":/models:ro") for v in worker["volumes"])


def test_compose_redis_persists_jobs() -> None:
    redis = COMPOSE["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert any(v.startswith("redis-data:/data") for v in redis["volumes"])


def test_dockerfiles_run_as_non_root_with_the_right_command() -> None:
    api = (REPO_ROOT / "Dockerfile").read_text()
    gpu = (REPO_ROOT / "Dockerfile.gpu").read_text()
    for text in (api, gpu):
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^CMD \["uvicorn", "api.main:app"', api, re.M)
    assert re.search(r'^CMD \["celery", "-A", "worker.celery_app", "worker"', gpu, re.M)
    assert 'ENTRYPOINT ["/usr/local/bin/ebca-worker-entrypoint"]' in gpu
    assert "torch" not in re.sub(r"#.*", "", api).replace("find_spec('torch')", "")
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", gpu, re.M) and "nvidia/cuda:" in gpu
    assert 'pip install "torch==${TORCH_VERSION}" --index-url' in gpu


def test_api_extra_has_no_torch() -> None:
    names = {
        re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower()
        for r in PYPROJECT["project"]["optional-dependencies"]["api"]
    }
    assert not names & {"torch", "diffusers", "transformers", "safetensors", "numpy"}


BLOCKER = r"""
import importlib.abc, json, re, sys
from importlib import metadata
from packaging.requirements import Requirement

def closure(requirements):
    allowed, todo = set(), [(Requirement(r), ()) for r in requirements]
    while todo:
        req, _ = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in allowed:
            continue
        allowed.add(name)
        for raw in metadata.requires(req.name) or []:
            sub = Requirement(raw)
            extras = [""] + sorted(req.extras)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append((sub, ()))
    return allowed

allowed = closure(json.loads(sys.argv[1]))
owners = metadata.packages_distributions()
blocked = []

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        dists = {d.lower().replace("_", "-") for d in owners.get(top, [])}
        if dists and not dists & allowed and top not in ("api", "ebca_common"):
            blocked.append(top)
            # What Python raises for a package that is not installed (anyio, for one, catches exactly
            # ModuleNotFoundError around its optional sniffio import).
            raise ModuleNotFoundError(f"{top} is not installed in the API image", name=top)
        return None

sys.meta_path.insert(0, Blocker())
import api.main
heavy = {"torch", "diffusers", "transformers", "ebca_core", "worker"}
hard = sorted({m.split(".")[0] for m in sys.modules} & heavy)
print(json.dumps({"blocked": sorted(set(blocked)), "heavy": hard}))
"""


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_api_imports_with_only_the_api_extra(tmp_path: Path, storage: str) -> None:
    """What the API image installs (the `api` extra and its dependencies) is enough for api.main, with
    either storage backend (the S3 one imports boto3 only when selected, as in the compose stack)."""
    requirements = PYPROJECT["project"]["optional-dependencies"]["api"]
    assert run_blocked_import(requirements, storage, tmp_path) == (0, [])
    # The check has teeth: without boto3 the S3 configuration cannot start.
    if storage == "s3":
        without_boto3 = [r for r in requirements if not r.startswith("boto3")]
        assert run_blocked_import(without_boto3, storage, tmp_path)[0] != 0


def run_blocked_import(requirements: list[str], storage: str, tmp_path: Path) -> tuple[int, list[str]]:
    env = {"PATH": "/usr/bin:/bin", "EBCA_REDIS_URL": "redis://127.0.0.1:1/0"}
    if storage == "s3":
        env.update(
            EBCA_STORAGE_URL="s3://bucket/jobs",
            EBCA_S3_ENDPOINT_URL="http://127.0.0.1:1",
            AWS_ACCESS_KEY_ID="test",
            AWS_SECRET_ACCESS_KEY="test",
        )
    else:
        env["EBCA_STORAGE_URL"] = str(tmp_path / "storage")
    out = subprocess.run(
        [sys.executable, "-c", BLOCKER, json.dumps(requirements)],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env,
    )  # fmt: skip
    if out.returncode != 0:
        return out.returncode, []
    return 0, json.loads(out.stdout.strip().splitlines()[-1])["heavy"]


def test_worker_entrypoint_gives_each_replica_its_own_gpu(tmp_path: Path) -> None:
    """Three replicas on a host with two GPUs (a stand-in nvidia-smi): GPUs 0 and 1 are claimed once
    each while their holders run, the third replica exits with a clear message, and a GPU is free
    again as soon as its holder ends."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_smi = bin_dir / "nvidia-smi"
    fake_smi.write_text('#!/bin/sh\necho "GPU 0: Fake (UUID: GPU-a)"\necho "GPU 1: Fake (UUID: GPU-b)"\n')
    fake_smi.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "EBCA_GPU_LOCK_DIR": str(tmp_path / "locks")}
    entry = str(REPO_ROOT / "scripts" / "stack_worker_entrypoint.sh")
    release = tmp_path / "release"
    # Each replica reports its GPU, then holds it until the test creates the release file.
    hold = f'echo "gpu=$CUDA_VISIBLE_DEVICES"; while [ ! -e {release} ]; do sleep 0.05; done'

    def replica() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [entry, "sh", "-c", hold], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    first = replica()
    assert first.stdout is not None and first.stdout.readline().strip() == "gpu=0"
    second = replica()
    assert second.stdout is not None and second.stdout.readline().strip() == "gpu=1"
    third = subprocess.run([entry, "true"], env=env, capture_output=True, text=True, timeout=30)
    assert third.returncode == 1 and "all 2 GPUs are taken" in third.stderr
    release.touch()
    assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0
    again = subprocess.run(
        [entry, "sh", "-c", "echo $CUDA_VISIBLE_DEVICES"], env=env, capture_output=True, text=True
    )
    assert again.stdout.strip() == "0"
    pinned = subprocess.run(
        [entry, "sh", "-c", "echo $CUDA_VISIBLE_DEVICES"],
        env={**env, "CUDA_VISIBLE_DEVICES": "3"}, capture_output=True, text=True,
    )  # fmt: skip
    assert pinned.stdout.strip() == "3"
    for proc in (first, second):
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_worker_entrypoint_prefetches_a_hub_model_only(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "python-calls"
    # A stand-in python that records what it was asked to run and fails when told to.
    fake_python = bin_dir / "python"
    fake_python.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ -z "$FAIL_FETCH" ]\n')
    fake_python.chmod(0o755)
    entry = str(REPO_ROOT / "scripts" / "stack_worker_entrypoint.sh")
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "0"}

    def start(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [entry, "echo", "worker started"], env={**base, **env}, capture_output=True, text=True, timeout=30
        )

    hub = start(EBCA_DEFAULT_MODEL="stabilityai/stable-diffusion-2-1")
    assert hub.stdout == "worker started\n"
    assert "fetching stabilityai/stable-diffusion-2-1 from the hub" in hub.stderr
    assert (
        calls.read_text()
        .splitlines()[-1]
        .endswith("DiffusionPipeline.download(sys.argv[1]) stabilityai/stable-diffusion-2-1")
    )
    count = len(calls.read_text().splitlines())
    for env in (
        {"EBCA_DEFAULT_MODEL": "/models/shapes"},
        {"EBCA_DEFAULT_MODEL": "org/model", "HF_HUB_OFFLINE": "1"},
        {},
    ):
        assert start(**env).stdout == "worker started\n"
    assert len(calls.read_text().splitlines()) == count  # no fetch for a path, offline, or no model
    failed = start(EBCA_DEFAULT_MODEL="org/missing", FAIL_FETCH="1")
    assert failed.stdout == "worker started\n"
    assert "could not fetch org/missing" in failed.stderr
