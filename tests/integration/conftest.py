"""The real service on loopback: a private redis-server, Celery worker processes, uvicorn, moto_server.

Everything is started once per test session and torn down at the end. Workers run the tiny models
built by the session fixtures of tests/conftest.py; the broker's visibility timeout, the heartbeat TTL
and the attempt limit are set short so crash recovery shows within seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from testkeys import TestKeys

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOST = socket.gethostname()

#: Settings every process of the suite gets (on top of the per-stack ones).
BASE_ENV = {
    "EBCA_VISIBILITY_TIMEOUT": "4",
    "EBCA_RESTORE_INTERVAL": "1",
    "EBCA_HEARTBEAT_SECONDS": "0.5",
    "EBCA_HEARTBEAT_TTL": "4",
    "EBCA_MAX_ATTEMPTS": "2",
    # One job per worker at a time: the suites count jobs per worker (two busy workers, a queued third
    # job). Coalescing has its own stack with the default in tests/integration/test_batching.py.
    "EBCA_MAX_BATCH": "1",
    "EBCA_MAX_UPLOAD_BYTES": "300000",
    "EBCA_MAX_JSON_BYTES": "20000",
    "EBCA_MAX_IMAGE_PIXELS": str(256 * 256),
    "EBCA_DEVICE": "cpu",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    # Auth stays required (the default); the stacks know the test keys.
    "EBCA_API_KEYS": TestKeys.entries_json(),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, argv: list[str], env: dict[str, str], logdir: Path, new_session: bool = False) -> Proc:
    """Start a service process; ``new_session`` makes it the leader of its own process group (so that
    the group, e.g. a prefork worker and its children, can be killed as a whole)."""
    log = logdir / f"{name}.log"
    fh = log.open("ab")
    popen = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=new_session
    )
    fh.close()
    return Proc(name, popen, log)


@dataclass
class Stack:
    """One deployment: an api, its workers, a Redis database and a storage backend."""

    name: str
    env: dict[str, str]
    logdir: Path
    redis: redis.Redis
    api_url: str = ""
    api: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    #: The API key the http helpers send unless told another (a user key: TestKeys.alice).
    key: str = TestKeys.alice
    _count: int = 0

    # -- processes ---------------------------------------------------------------------------------------
    def start_api(self, port: int | None = None) -> None:
        """Start uvicorn on ``port`` (default: a free one; a restart passes the old one)."""
        self.api, self.api_url = self.launch_api(port)

    def launch_api(self, port: int | None = None, name: str = "api") -> tuple[Proc, str]:
        """An api process of this deployment (``start_api`` makes it the stack's; a test may run a
        second replica on the same Redis); returns it and its URL once it answers."""
        port = port or free_port()
        argv = [
            str(BIN / "python"),
            "-m",
            "uvicorn",
            "api.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        proc = spawn(f"{self.name}-{name}", argv, self.env, self.logdir)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, 60, "the api")
        return proc, url

    def start_worker(self, wait: bool = True, pool: str = "solo", new_session: bool = False) -> Proc:
        """Start ``celery -A worker.celery_app worker`` (no -Q: the app's default queue is the GPU queue).

        ``pool="prefork"`` is the deployment default (one child process, EBCA_WORKER_CONCURRENCY=1).
        ``new_session``: the worker leads its own process group (see :func:`spawn`).
        """
        self._count += 1
        name = f"{self.name}-w{self._count}"
        argv = [
            str(BIN / "celery"), "-A", "worker.celery_app", "worker", f"--pool={pool}",
            "-n", f"{name}@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        proc = spawn(name, argv, self.env, self.logdir, new_session=new_session)
        self.workers.append(proc)
        if wait:
            self.wait_worker(proc)
        return proc

    def wait_worker(self, proc: Proc) -> None:
        member = f"{HOST}:{proc.pid}"

        def beating() -> bool:
            if not proc.alive():
                raise AssertionError(f"worker {proc.name} exited:\n{proc.tail()}")
            return self.redis.zscore("ebca:workers", member) is not None

        deadline = time.monotonic() + 90
        while not beating():
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {proc.name} did not come up:\n{proc.tail()}")
            time.sleep(0.2)

    def live_workers(self) -> list[Proc]:
        return [w for w in self.workers if w.alive()]

    def lease_pid(self, job_id: str) -> int:
        """The pid of the process that runs (or last ran) ``job_id``, from the job record's lease."""
        lease = json.loads(self.redis.hget(f"ebca:job:{job_id}", "lease") or "null")
        assert lease, f"job {job_id} has no lease"
        return int(lease.rsplit(":", 1)[1])

    def worker_of(self, job_id: str) -> Proc:
        """The worker (pool=solo: the job runs in the worker process itself) that runs ``job_id``."""
        pid = self.lease_pid(job_id)
        return next(w for w in self.workers if w.pid == pid)

    def shutdown(self) -> None:
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            proc.stop()

    # -- http helpers (every request carries an API key: ``key``, else the stack's) ------------------------
    def auth(self, key: str | None = None) -> dict[str, str]:
        return TestKeys.header(key or self.key)

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, timeout=30, headers=self.auth(key))

    def request(self, method: str, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        """One request to the api (``path`` relative to it) with the key's Authorization header."""
        kwargs.setdefault("timeout", 10)
        headers = {**self.auth(key), **kwargs.pop("headers", {})}
        return httpx.request(method, self.api_url + path, headers=headers, **kwargs)

    def get(self, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, key, **kwargs)

    def post(self, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, key, **kwargs)

    def delete(self, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, key, **kwargs)

    def job(self, job_id: str, key: str | None = None) -> dict[str, Any]:
        response = self.get(f"/jobs/{job_id}", key)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_job(
        self,
        job_id: str,
        until: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 60,
        key: str | None = None,
    ) -> dict[str, Any]:
        until = until or (lambda job: job["status"] in ("succeeded", "failed", "canceled"))
        last: dict[str, Any] = {}

        def check() -> bool:
            nonlocal last
            last = self.job(job_id, key)
            return until(last)

        try:
            wait_for(check, timeout, f"job {job_id}", interval=0.1)
        except TimeoutError as exc:
            logs = "\n".join(f"--- {w.name}\n{w.tail(15)}" for w in self.workers)
            raise AssertionError(f"{exc}; last state {json.dumps(last)[:800]}\n{logs}") from None
        return last

    def job_keys(self) -> int:
        return sum(1 for _ in self.redis.scan_iter(match="ebca:job:*", count=500))


@contextmanager
def serving(s: Stack, pool: str = "solo") -> Iterator[Stack]:
    """The stack's api and one worker (``pool``) for the duration; everything stopped after."""
    try:
        s.start_api()
        s.start_worker(pool=pool)
        yield s
    finally:
        s.shutdown()


@pytest.fixture(scope="session")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture(scope="session")
def redis_port(logdir: Path) -> Iterator[int]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = spawn("redis", argv, dict(os.environ), logdir)
    client = redis.Redis(port=port)
    wait_for(client.ping, 20, "redis-server")
    yield port
    proc.stop()


def _make_stack(name: str, db: int, extra: dict[str, str], redis_port: int, logdir: Path) -> Stack:
    url = f"redis://127.0.0.1:{redis_port}/{db}"
    env = {**os.environ, **BASE_ENV, "EBCA_REDIS_URL": url, **extra}
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    return Stack(name=name, env=env, logdir=logdir, redis=client)


@pytest.fixture(scope="session")
def stack(
    redis_port: int, logdir: Path, tiny_model_dir: Path, tiny_inpaint_model_dir: Path, tmp_path_factory
) -> Iterator[Stack]:
    """The main deployment: local storage, two workers, models tiny (default), tiny-inpaint, broken,
    and the shipped shapes model (which has its own ebca_defaults.json)."""
    storage = tmp_path_factory.mktemp("storage")
    models = {
        "tiny-inpaint": str(tiny_inpaint_model_dir),
        "broken": str(storage / "no-such-model"),
        "shapes": str(REPO / "models" / "shapes"),
    }
    extra = {
        "EBCA_STORAGE_URL": str(storage),
        "EBCA_DEFAULT_MODEL": str(tiny_model_dir),
        "EBCA_MODELS": json.dumps(models),
    }
    s = _make_stack("main", 0, extra, redis_port, logdir)
    try:
        s.start_api()
        first = s.start_worker(wait=False)
        second = s.start_worker(wait=False)
        s.wait_worker(first)
        s.wait_worker(second)
        yield s
    finally:
        s.shutdown()


@pytest.fixture(scope="session")
def moto_url(logdir: Path) -> Iterator[str]:
    port = free_port()
    proc = spawn(
        "moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], dict(os.environ), logdir
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/moto-api/", timeout=1).status_code < 500, 60, "moto_server")
    yield url
    proc.stop()


S3_BUCKET = "ebca-test"
S3_PREFIX = "serve/results"


@pytest.fixture(scope="session")
def s3_stack(redis_port: int, logdir: Path, tiny_model_dir: Path, moto_url: str) -> Iterator[Stack]:
    """A second deployment (own Redis database) storing into a bucket of the loopback S3 server."""
    import boto3

    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")  # fmt: skip
    s3.create_bucket(Bucket=S3_BUCKET)
    extra = {
        "EBCA_STORAGE_URL": f"s3://{S3_BUCKET}/{S3_PREFIX}",
        "EBCA_S3_ENDPOINT_URL": moto_url,
        "EBCA_PRESIGN_SECONDS": "600",
        "EBCA_DEFAULT_MODEL": str(tiny_model_dir),
        **creds,
    }
    s = _make_stack("s3", 1, extra, redis_port, logdir)
    s.s3 = s3  # type: ignore[attr-defined]
    with serving(s):
        yield s


@pytest.fixture(scope="session")
def events_stack(redis_port: int, logdir: Path, tiny_model_dir: Path, tmp_path_factory) -> Iterator[Stack]:
    """A deployment with one worker (so a second job waits in line) for live events and webhooks:
    webhooks to loopback allowed, short keep-alives and retry backoff so the tests are quick."""
    extra = {
        "EBCA_STORAGE_URL": str(tmp_path_factory.mktemp("events-storage")),
        "EBCA_DEFAULT_MODEL": str(tiny_model_dir),
        "EBCA_WEBHOOK_ALLOW_PRIVATE": "true",
        "EBCA_WEBHOOK_BACKOFF_SECONDS": "0.3",
        "EBCA_WEBHOOK_TIMEOUT_SECONDS": "2",
        "EBCA_EVENTS_KEEPALIVE_SECONDS": "1",
    }
    s = _make_stack("events", 3, extra, redis_port, logdir)
    with serving(s):
        yield s


@pytest.fixture(scope="module")
def prefork_stack(redis_port: int, logdir: Path, tiny_model_dir: Path, tmp_path_factory) -> Iterator[Stack]:
    """A deployment whose one worker runs the default prefork pool (jobs run in a child process)."""
    extra = {"EBCA_STORAGE_URL": str(tmp_path_factory.mktemp("prefork-storage")),
             "EBCA_DEFAULT_MODEL": str(tiny_model_dir)}  # fmt: skip
    s = _make_stack("prefork", 2, extra, redis_port, logdir)
    with serving(s, pool="prefork"):
        yield s


@pytest.fixture(scope="module")
def batching_stack(redis_port: int, logdir: Path, tiny_model_dir: Path, tmp_path_factory) -> Iterator[Stack]:
    """A deployment whose one solo worker coalesces (the default EBCA_MAX_BATCH, against BASE_ENV's 1)."""
    extra = {"EBCA_STORAGE_URL": str(tmp_path_factory.mktemp("batching-storage")),
             "EBCA_DEFAULT_MODEL": str(tiny_model_dir), "EBCA_MAX_BATCH": "8"}  # fmt: skip
    s = _make_stack("batching", 5, extra, redis_port, logdir)
    with serving(s):
        yield s


@pytest.fixture(scope="module")
def dead_redis_api(logdir: Path, tiny_model_dir: Path, tmp_path_factory) -> Iterator[str]:
    """An api whose Redis is down (nothing listens on its port): every store call fails."""
    dead = free_port()
    env = {
        **os.environ,
        **BASE_ENV,
        "EBCA_REDIS_URL": f"redis://127.0.0.1:{dead}/0",
        "EBCA_STORAGE_URL": str(tmp_path_factory.mktemp("dead-storage")),
        "EBCA_DEFAULT_MODEL": str(tiny_model_dir),
        "EBCA_REDIS_TIMEOUT_SECONDS": "0.5",
    }
    port = free_port()
    argv = [str(BIN / "python"), "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn("dead-redis-api", argv, env, logdir)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, 60, "the api")
    yield url
    proc.stop()


def running_at_step(n: int, attempts: int | None = None) -> Callable[[dict[str, Any]], bool]:
    """A ``wait_job`` check: the job is denoising at step ``n`` or later (on attempt ``attempts``);
    raises when it ended first."""

    def check(job: dict[str, Any]) -> bool:
        if job["status"] in ("succeeded", "failed", "canceled"):
            raise AssertionError(f"job ended early: {job['status']} {job['error']}")
        return (
            job["status"] == "running"
            and job["progress"]["stage"] == "denoising"
            and job["progress"]["step"] >= n
            and (attempts is None or job["attempts"] == attempts)
        )

    return check


def submit(stack: Stack, body: dict[str, Any]) -> str:
    """POST /generate with the stack's key; the new job's id (a 202 is asserted)."""
    response = stack.post("/generate", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["id"]
