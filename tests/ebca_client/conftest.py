"""A real local stack for the SDK and CLI tests, started once per session.

Private redis-server on a free loopback port, the API under uvicorn, one Celery worker subprocess, the
local file store in a temporary directory, and the tiny random-weight models from
``ebca_core.testing`` (fixtures in tests/conftest.py). Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from stack_helpers import REPO_ROOT, free_port, log_tail, stop_session
from testkeys import TestKeys


@dataclass
class Stack:
    url: str
    redis_url: str
    env: dict[str, str]
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: The API key the tests use (auth is required, as by default); the CLI runs read it from
    #: EBCA_API_KEY in ``env``.
    key: str = TestKeys.alice

    def start(self, name: str, argv: list[str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as log:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}:\n{log_tail(self.logs / f'{name}.log')}"
                )

    def stop(self) -> None:
        for name in ("worker", "api", "redis"):
            if name in self.procs:
                stop_session(self.procs[name])

    def job_count(self) -> int:
        """Job records in the stack's Redis (read through the service's own store)."""
        from ebca_common.settings import Settings
        from ebca_common.store import JobStore

        store = JobStore.from_settings(Settings(redis_url=self.redis_url))
        return store.job_count()


def stack_env(tmp: Path, redis_url: str, default_model: Path, extra_models: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBCA_")}
    env.update(
        EBCA_REDIS_URL=redis_url,
        EBCA_STORAGE_URL=str(tmp / "storage"),
        EBCA_DEFAULT_MODEL=str(default_model),
        EBCA_MODELS=json.dumps(extra_models),
        EBCA_DEVICE="cpu",
        EBCA_HEARTBEAT_SECONDS="0.5",
        EBCA_HEARTBEAT_TTL="5",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        EBCA_API_KEYS=TestKeys.entries_json(),
        EBCA_API_KEY=TestKeys.alice,
    )
    return env


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_inpaint_model_dir: Path
) -> Iterator[Stack]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    tmp = tmp_path_factory.mktemp("client-stack")
    logs = tmp / "logs"
    logs.mkdir()
    redis_port, api_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = stack_env(tmp, redis_url, tiny_model_dir, {"tiny-inpaint": str(tiny_inpaint_model_dir)})
    stack = Stack(url=f"http://127.0.0.1:{api_port}", redis_url=redis_url, env=env, logs=logs)
    try:
        (tmp / "redis").mkdir()
        stack.start(
            "redis",
            ["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--dir", str(tmp / "redis"),
             "--save", "", "--appendonly", "no"],
        )  # fmt: skip
        stack.start(
            "api",
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(api_port)],
        )
        stack.start(
            "worker",
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--concurrency", "1",
             "--loglevel", "INFO", "--hostname", f"client-tests-{api_port}@%h"],
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            stack.check_alive()
            try:
                if httpx.get(f"{stack.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("stack not ready after 120 s:\n" + log_tail(logs / "worker.log"))
            time.sleep(0.3)
        yield stack
    finally:
        stack.stop()
