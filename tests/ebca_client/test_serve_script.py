"""scripts/serve.sh as a user runs it: it brings the stack up, ``ebca generate`` writes a PNG against it,
and Ctrl-C (SIGINT to its process group, as a terminal sends it) stops every process it started."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from stack_helpers import REPO_ROOT, free_port, session_members, stop_session

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EBCA = str(Path(sys.executable).with_name("ebca"))


def setup_is_current() -> bool:
    """True when scripts/setup.sh already ran for this pyproject.toml and torch spec (as in CI), so
    serve.sh may run its setup step for real and must find nothing to do. The stamp format is
    scripts/setup.sh's: "<sha256 of pyproject.toml and client/pyproject.toml> <torch spec>"."""
    stamp = REPO_ROOT / ".venv" / ".ebca-setup"
    if not stamp.is_file():
        return False
    manifests = (REPO_ROOT / "pyproject.toml", REPO_ROOT / "client" / "pyproject.toml")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in manifests)).hexdigest()
    spec = os.environ.get("EBCA_TORCH_SPEC", "torch==2.13.0")
    return stamp.read_text().strip() == f"{digest} {spec}"


def stack_env() -> dict[str, str]:
    """The caller's environment without service settings (the stack must not pick up a developer's
    EBCA_REDIS_URL...), but with setup.sh's own EBCA_TORCH_SPEC."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBCA_") or k == "EBCA_TORCH_SPEC"}
    env.update(OMP_NUM_THREADS="1", EBCA_STACK_STOP_TIMEOUT="10")
    return env


class OutputReader:
    """Collects a child's stdout on a thread, so the test can wait for a line without blocking."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.text:
                return self.text
            if self.proc.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"serve.sh never printed {marker!r} (exit {self.proc.poll()}):\n{self.text}")

    def finish(self) -> str:
        self._thread.join(timeout=10)
        return self.text


def terminal_signals() -> None:
    """In the child, before exec: SIGINT and SIGHUP as a terminal session has them. A runner started
    in the background (CI) may ignore SIGINT, which a shell inherits and then cannot trap."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start_serve(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=terminal_signals,
    )  # fmt: skip


def test_serve_script_runs_the_stack_and_ctrl_c_leaves_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    port, redis_port = free_port(), free_port()
    var = tmp_path / "var"
    argv = ["bash", "scripts/serve.sh", "--port", str(port), "--redis-port", str(redis_port),
            "--var", str(var), "--model", str(tiny_model_dir)]  # fmt: skip
    reuse_setup = setup_is_current()
    if not reuse_setup:
        argv.append("--no-setup")  # a developer venv not made by setup.sh: do not reinstall into it
    env = stack_env()
    proc = start_serve(argv, env)
    sessions: set[int] = set()
    try:
        output = OutputReader(proc)
        banner = output.wait_for("press Ctrl-C to stop", timeout=180)
        url = f"http://127.0.0.1:{port}"
        assert f"EBCA Serve is ready at {url}" in banner
        assert "ebca --url" in banner and " generate " in banner
        if reuse_setup:
            assert "setup: .venv is up to date" in banner

        # The banner comes only once this run's worker is up, not on a stale heartbeat.
        assert re.search(r"stack-worker@\S+ ready\.", (var / "logs" / "worker.log").read_text())
        pids = dict(line.split() for line in (var / "stack.pids").read_text().splitlines())
        assert set(pids) == {"redis", "api", "worker"}
        sessions = {int(pid) for pid in pids.values()} | {proc.pid}
        members = session_members(sessions)
        assert len(members) >= 4  # serve.sh, redis, api, worker (+ the worker's pool process)

        # The first run made an admin key for this machine, kept in var/ and printed.
        key = (var / "api_key").read_text().strip()
        assert key.startswith("ebca_") and f"serve: API key: {key}" in banner
        # The web page first, with the key in the address's fragment (the page keeps it).
        assert f"serve: open the web page: {url}/#key={key}" in banner
        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and "<title>EBCA Serve</title>" in page.text
        assert (var / "api_key").stat().st_mode & 0o077 == 0  # readable by its owner only
        denied = httpx.get(f"{url}/models", timeout=10)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"

        # The sample command works as printed (run from the checkout, writing into a temporary out/).
        (sample,) = [
            line.strip() for line in banner.splitlines() if line.strip().startswith(".venv/bin/ebca")
        ]
        argv = shlex.split(sample)
        assert argv[:5] == [".venv/bin/ebca", "--url", url, "--api-key", key]
        out = tmp_path / "out"
        argv[0], argv[-1] = EBCA, str(out)
        gen = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=stack_env())
        assert gen.returncode == 0, gen.stderr
        (png,) = gen.stdout.split()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == (32, 32)

        # Ctrl-C: the terminal sends SIGINT to the foreground process group, i.e. serve.sh.
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        tail = output.finish()
        assert proc.returncode == 130, tail
        assert "serve: stopped" in tail
        assert session_members(sessions) == set(), "processes left behind after Ctrl-C"
        assert not (var / "stack.pids").exists()
    finally:
        if proc.poll() is None:
            stop_session(proc)
        for sid in sessions:  # never leave a stack running if an assertion failed midway
            try:
                os.killpg(sid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_serve_script_rejects_a_busy_port_clearly(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            ["bash", "scripts/serve.sh", "--no-setup", "--port", str(port), "--var", str(tmp_path / "var")],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert result.stderr.count("\n") == 1


def test_serve_script_usage_errors(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", "scripts/serve.sh", "--no-setup", "--bogus"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1 and "unknown option: --bogus" in result.stderr
    helped = subprocess.run(
        ["bash", "scripts/serve.sh", "--help"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "--redis-port" in helped.stdout


def test_ebca_serve_runs_serve_sh() -> None:
    ebca = str(Path(sys.executable).with_name("ebca"))
    helped = subprocess.run([ebca, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "scripts/serve.sh [--host" in helped.stdout
    bad = subprocess.run([ebca, "serve", "--no-setup", "--bogus"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "serve: unknown option: --bogus" in bad.stderr


def test_closed_terminal_still_stops_everything(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The terminal goes away: SIGHUP, and the pipe serve.sh writes its goodbye to has no reader. The
    cleanup must neither die of SIGPIPE halfway nor leave a service behind."""
    var = tmp_path / "var"
    argv = ["bash", "scripts/serve.sh", "--no-setup", "--port", str(free_port()), "--var", str(var),
            "--model", str(tiny_model_dir)]  # fmt: skip
    env = stack_env()
    proc = start_serve(argv, env)
    sessions: set[int] = set()
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        while "press Ctrl-C to stop" not in proc.stdout.readline():
            assert proc.poll() is None and time.monotonic() < deadline, "serve.sh did not come up"
        pids = dict(line.split() for line in (var / "stack.pids").read_text().splitlines())
        sessions = {int(pid) for pid in pids.values()} | {proc.pid}
        assert len(session_members(sessions)) >= 4
        proc.stdout.close()  # nobody reads serve.sh's output any more
        os.killpg(proc.pid, signal.SIGHUP)
        proc.wait(timeout=60)
        assert session_members(sessions) == set(), "processes left behind after the terminal closed"
    finally:
        if proc.poll() is None:
            stop_session(proc)
        for sid in sessions:
            try:
                os.killpg(sid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_a_service_that_dies_takes_the_stack_down_with_its_log(tmp_path: Path, tiny_model_dir: Path) -> None:
    var = tmp_path / "var"
    argv = ["bash", "scripts/serve.sh", "--no-setup", "--port", str(free_port()), "--var", str(var),
            "--model", str(tiny_model_dir)]  # fmt: skip
    proc = start_serve(argv, stack_env())
    sessions: set[int] = set()
    try:
        output = OutputReader(proc)
        output.wait_for("press Ctrl-C to stop", timeout=180)
        pids = dict(line.split() for line in (var / "stack.pids").read_text().splitlines())
        sessions = {int(pid) for pid in pids.values()} | {proc.pid}
        os.kill(int(pids["api"]), signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        text = output.finish()
        assert "serve: api exited unexpectedly; last lines of" in text
        assert "Uvicorn running on" in text  # the tail of api.log comes with it
        assert "serve: stopped" in text
        assert session_members(sessions) == set()
    finally:
        if proc.poll() is None:
            stop_session(proc)
        for sid in sessions:
            try:
                os.killpg(sid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
