"""Crash recovery, graceful stop, lost messages and deadlines, on a deployment with the service's
DEFAULT recovery settings (visibility timeout 3600 s, heartbeat every 2 s, TTL 10 s, 3 attempts,
re-publish grace 30 s, timeouts 900/3600 s). The other integration stacks tune those down; this module
is the proof of what the defaults promise (docs/DEPLOY.md, "Crash recovery").

Workers run the deployment's default prefork pool, each in its own process group so that a test can
SIGKILL a whole worker (main process and child) at once, like the OOM killer or a lost node. The
stack's redis-server keeps an append-only file, like the compose one, so that it can be restarted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import BASE_ENV, HOST, Proc, Stack, free_port, running_at_step, spawn, wait_for

from ebca_common.jobs import unix_time
from ebca_common.queueing import broker_lists, queued_job_ids
from ebca_common.settings import Settings
from ebca_common.store import BROKER_SCAN_SECONDS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DEFAULTS = Settings.model_construct()  # the field defaults, whatever the environment says
TTL = DEFAULTS.heartbeat_ttl
BEAT = DEFAULTS.heartbeat_seconds
#: The settings BASE_ENV tunes down for the other stacks; this one keeps the service's defaults.
TUNED = ("EBCA_VISIBILITY_TIMEOUT", "EBCA_RESTORE_INTERVAL", "EBCA_HEARTBEAT_SECONDS", "EBCA_HEARTBEAT_TTL",
         "EBCA_MAX_ATTEMPTS")  # fmt: skip

#: Long enough that a test acts while it runs: 200 steps of a 4-image batch (the job's images are
#: denoised together) at 0.03-0.2 s a step on one CPU thread.
LONG = {"prompt": "a red circle", "steps": 200, "num_images": 4, "seed": 1}
MEDIUM = {"prompt": "a blue square", "steps": 60, "seed": 2}
QUICK = {"prompt": "a cat", "steps": 2, "seed": 3}


class RedisServer:
    """A redis-server with an append-only file (fsync every second, as in docker-compose.yml)."""

    def __init__(self, logdir: Path, datadir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.argv = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(datadir),
                     "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]  # fmt: skip
        self.logdir = logdir
        self.start()

    def start(self) -> None:
        self.proc = spawn("recovery-redis", self.argv, dict(os.environ), self.logdir)
        wait_for(redis.Redis(port=self.port).ping, 20, "redis-server")

    def restart(self) -> None:
        """Stop (SIGTERM: Redis flushes the append-only file, as on `docker compose restart`), start."""
        self.proc.stop()
        self.start()


@dataclass
class Recovery:
    stack: Stack
    server: RedisServer

    # -- workers -------------------------------------------------------------------------------------------
    def start_worker(self, wait: bool = True) -> Proc:
        return self.stack.start_worker(wait=wait, pool="prefork", new_session=True)

    def ensure_workers(self, count: int = 2) -> None:
        while len(self.stack.live_workers()) < count:
            self.start_worker(wait=False)
        for worker in self.stack.live_workers():
            self.stack.wait_worker(worker)

    def lease(self, job_id: str) -> str | None:
        return json.loads(self.stack.redis.hget(f"ebca:job:{job_id}", "lease") or "null")

    def holder(self, job_id: str) -> Proc:
        """The worker (main process) whose prefork child holds ``job_id``'s lease."""
        lease = self.lease(job_id)
        assert lease, f"job {job_id} has no lease"
        session = os.getsid(int(lease.rsplit(":", 1)[1]))  # each worker leads its own session
        return next(w for w in self.stack.workers if w.pid == session)

    def kill_group(self, worker: Proc) -> float:
        """SIGKILL the worker's whole process group; returns the (wall) time of the kill."""
        killed_at = time.time()
        os.killpg(worker.pid, signal.SIGKILL)
        worker.popen.wait(10)
        return killed_at

    # -- jobs ----------------------------------------------------------------------------------------------
    def submit(self, body: dict[str, Any]) -> str:
        response = self.stack.post("/generate", json=body, timeout=10)
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def cancel(self, job_id: str) -> None:
        assert self.stack.delete(f"/jobs/{job_id}", timeout=10).status_code in (202, 409)

    def running(self, job_id: str, step: int = 1, attempts: int | None = None) -> dict[str, Any]:
        return self.stack.wait_job(job_id, running_at_step(step, attempts), timeout=120)


@pytest.fixture(scope="module")
def recovery(
    logdir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Recovery]:
    server = RedisServer(logdir, tmp_path_factory.mktemp("recovery-redis"))
    env = {**os.environ, **{k: v for k, v in BASE_ENV.items() if k not in TUNED}}
    for name in TUNED:
        env.pop(name, None)
    env |= {
        "EBCA_REDIS_URL": f"redis://127.0.0.1:{server.port}/0",
        "EBCA_STORAGE_URL": str(tmp_path_factory.mktemp("recovery-storage")),
        "EBCA_DEFAULT_MODEL": str(tiny_model_dir),
    }
    client = redis.Redis(port=server.port, decode_responses=True)
    stack = Stack(name="recovery", env=env, logdir=logdir, redis=client)
    r = Recovery(stack, server)
    try:
        stack.start_api()
        r.start_worker(wait=False)
        r.start_worker(wait=False)
        r.ensure_workers()
        yield r
    finally:
        for worker in stack.live_workers():
            os.killpg(worker.pid, signal.SIGKILL)
        if stack.api is not None:
            stack.api.stop()
        server.proc.stop()


def test_whole_worker_killed_mid_job_runs_again_within_the_ttl(recovery: Recovery) -> None:
    r = recovery
    r.ensure_workers()
    job_id = r.submit(MEDIUM)
    r.running(job_id, step=3)
    victim = r.holder(job_id)
    killed_at = r.kill_group(victim)
    again = r.running(job_id, attempts=2)
    recovered = unix_time(again["started_at"]) - killed_at
    # The lease lapses TTL after the victim's last beat, which came at most one period (BEAT) before
    # the kill; a sweep (every BEAT, on the live worker) then requeues and publishes the job, and the
    # idle worker starts it within milliseconds. So kill -> running is at most TTL + BEAT plus the
    # time to deliver: TTL + 5 s leaves 3 s for a loaded 2-core machine. It cannot come before the
    # lease lapses (TTL - BEAT after the kill): recovery runs on the lease, not on the broker's timer.
    print(f"\nkill -> running again: {recovered:.2f} s")
    assert TTL - BEAT - 0.5 <= recovered <= TTL + 5, recovered
    assert r.holder(job_id) is not victim
    job = r.stack.wait_job(job_id, timeout=120)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    image = job["result"]["images"][0]
    data = r.stack.get(image["url"], timeout=10).content
    assert hashlib.sha256(data).hexdigest() == image["sha256"]
    r.ensure_workers()


def test_sigterm_hands_the_running_job_back_at_once(recovery: Recovery) -> None:
    r = recovery
    r.ensure_workers()
    job_id = r.submit(LONG)
    r.running(job_id, step=3)
    victim = r.holder(job_id)
    stopped_at = time.time()
    victim.popen.send_signal(signal.SIGTERM)  # what `docker stop` sends the container's main process
    again = r.running(job_id, attempts=2)
    handed = unix_time(again["started_at"]) - stopped_at
    # The parent marks itself draining at once; its prefork child reads the mark at its next beat
    # (within BEAT), hands the job back at its next step and requeues the message at the head of the
    # queue; the other worker takes it at once, long before the 200 steps could have finished.
    print(f"\nSIGTERM -> running on another worker: {handed:.2f} s")
    assert handed <= BEAT + 3, handed
    victim.popen.wait(30)  # the worker exits without waiting for the job
    assert r.holder(job_id) is not victim
    assert again["progress"]["total"] == 200  # started over, from step 0 of attempt 2
    r.cancel(job_id)  # that a re-run succeeds is the kill test's point; spare the 200 steps
    assert r.stack.wait_job(job_id, timeout=60)["status"] == "canceled"
    r.ensure_workers()


def test_a_job_whose_broker_message_was_deleted_still_runs(recovery: Recovery) -> None:
    r = recovery
    r.ensure_workers()
    busy = [r.submit(LONG) for _ in range(2)]
    for job_id in busy:
        r.running(job_id)
    lost = r.submit(QUICK)  # queued behind them; its message waits in the broker list
    queue = DEFAULTS.queue
    key, message = next(
        (k, m) for k in broker_lists(queue) for m in r.stack.redis.lrange(k, 0, -1) if lost in _job_args(m)
    )
    assert r.stack.redis.lrem(key, 1, message) == 1  # deleted by hand
    assert lost not in queued_job_ids(r.stack.redis, queue)
    for job_id in busy:
        r.cancel(job_id)  # the workers are free, and no message would ever bring them this job
    grace = DEFAULTS.republish_grace_seconds
    job = r.stack.wait_job(lost, timeout=grace + BROKER_SCAN_SECONDS + 60)
    assert job["status"] == "succeeded", job
    # The sweep re-published it once its grace had passed (not earlier: it only looks after the grace).
    waited = unix_time(job["started_at"]) - unix_time(job["created_at"])
    assert grace - 0.5 <= waited <= grace + BROKER_SCAN_SECONDS + BEAT + 5, waited


def test_timeout_of_a_queued_job(recovery: Recovery) -> None:
    r = recovery
    r.ensure_workers()
    busy = [r.submit(LONG) for _ in range(2)]
    for job_id in busy:
        r.running(job_id)
    queued = r.submit({**QUICK, "timeout_seconds": 1})
    shown = r.stack.job(queued)
    assert unix_time(shown["deadline_at"]) - unix_time(shown["created_at"]) == pytest.approx(1, abs=0.002)
    job = r.stack.wait_job(queued, timeout=30)
    assert (job["status"], job["error"]["code"], job["attempts"], job["started_at"]) == ("failed", "timeout",
                                                                                      0, None)  # fmt: skip
    # Ended by the sweep (every BEAT) soon after the deadline, without a free worker.
    assert unix_time(job["finished_at"]) - unix_time(job["deadline_at"]) <= BEAT + 2
    for job_id in busy:
        r.cancel(job_id)
    # The freed workers drop the dead job's message and run the next one at once.
    assert r.stack.wait_job(r.submit(QUICK), timeout=60)["status"] == "succeeded"


def test_timeout_of_a_running_job_frees_its_worker_at_once(recovery: Recovery) -> None:
    r = recovery
    r.ensure_workers()
    busy = r.submit(LONG)
    r.running(busy)
    timed = r.submit({**LONG, "timeout_seconds": 3})
    r.running(timed)
    following = r.submit(QUICK)  # waits: both workers are busy
    job = r.stack.wait_job(timed, timeout=60)
    assert (job["status"], job["error"]["code"]) == ("failed", "timeout"), job
    assert job["progress"]["step"] < job["progress"]["total"] and job["result"] is None
    # It stopped at the first step after its deadline (a step takes well under a second).
    assert unix_time(job["finished_at"]) - unix_time(job["deadline_at"]) <= 2
    nxt = r.stack.wait_job(following, timeout=60)
    assert nxt["status"] == "succeeded"
    # The same worker process took the next job right after.
    assert r.lease(following) == r.lease(timed)
    assert unix_time(nxt["started_at"]) - unix_time(job["finished_at"]) <= 2
    r.cancel(busy)


# -- chaos -------------------------------------------------------------------------------------------------
CHAOS_JOBS = 20
CHAOS_KILLS = 8
CHAOS_STEPS = 16
#: Unfinished jobs kept in the system while faults remain, so that every kill finds a job to interrupt
#: on a fast machine, and a slow one is not left with a long queue after the last fault.
CHAOS_BACKLOG = 6


@dataclass
class Kill:
    job_id: str
    lease: str
    attempts: int
    at: float
    #: Wall time the job left "running under the dead lease" (requeued, ended, or begun elsewhere).
    orphan_end: float | None = None
    #: Wall time its next attempt started.
    rerun_at: float | None = None


@dataclass
class Monitor:
    """Polls the job store every 0.2 s: what became of each killed job, and whether any job is running
    under a lease whose process is dead (checked against the process table, not the heartbeats)."""

    port: int
    kills: list[Kill] = field(default_factory=list)
    #: (job id, lease) -> first and last wall time seen running under a dead process.
    orphans: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        client = redis.Redis(port=self.port, decode_responses=True, socket_timeout=1)
        while not self.stop.wait(0.2):
            try:
                self.poll(client)
            except redis.exceptions.RedisError:
                pass  # the Redis restart

    def poll(self, client: redis.Redis) -> None:
        now = time.time()
        for job_id in client.smembers("ebca:running"):
            status, lease = (
                json.loads(v or "null") for v in client.hmget(f"ebca:job:{job_id}", "status", "lease")
            )
            if status == "running" and lease and not pid_alive(int(lease.rsplit(":", 1)[1])):
                self.orphans.setdefault((job_id, lease), [now, now])[1] = now
        for kill in self.kills:
            if kill.rerun_at is not None:
                continue
            status, lease, attempts, started = (
                json.loads(v or "null")
                for v in client.hmget(f"ebca:job:{kill.job_id}", "status", "lease", "attempts", "started_at")
            )
            if kill.orphan_end is None and (status != "running" or lease != kill.lease):
                kill.orphan_end = now
            if attempts > kill.attempts:
                kill.rerun_at = unix_time(started)


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a SIGKILLed child can linger as one)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _job_args(message: str) -> str:
    import base64

    return base64.b64decode(json.loads(message)["body"]).decode()


@pytest.mark.chaos
def test_chaos(recovery: Recovery) -> None:
    """At least 20 jobs; 8 SIGKILLs of whole workers at random moments, each in the middle of a job
    (each worker replaced at once; see _pick_victim), a Redis restart and an API restart in between:
    every job succeeds, and no job runs under a dead worker for longer than the lease allows."""
    r = recovery
    r.ensure_workers()
    rng = random.Random(10)
    jobs: list[str] = []

    def submit() -> None:
        body = {"prompt": f"shape {len(jobs)}", "steps": CHAOS_STEPS, "seed": 100 + len(jobs)}
        jobs.append(r.submit(body))

    def top_up() -> None:
        try:
            while sum(_status(r, j) in ("queued", "running") for j in jobs) < CHAOS_BACKLOG:
                submit()
        except (httpx.HTTPError, AssertionError, redis.exceptions.RedisError):
            pass  # the api or Redis is restarting: the next call tops up

    def victim() -> tuple[Proc, Kill] | None:
        top_up()
        return _pick_victim(r, rng)

    monitor = Monitor(r.server.port)
    watcher = threading.Thread(target=monitor.run, daemon=True)
    watcher.start()
    faults = ["kill"] * CHAOS_KILLS
    faults.insert(3, "redis")
    faults.insert(7, "api")
    last_fault = time.monotonic()
    try:
        for fault in faults:
            time.sleep(rng.uniform(0.5, 3.0))
            top_up()
            if fault == "kill":
                worker, kill = wait_for(victim, 120, "a worker in the middle of a job")
                kill.at = r.kill_group(worker)
                monitor.kills.append(kill)
                r.start_worker(wait=False)  # replaced at once, like a container restart
            elif fault == "redis":
                r.server.restart()
            else:
                port = int(r.stack.api_url.rsplit(":", 1)[1])
                assert r.stack.api is not None
                r.stack.api.stop()
                r.stack.start_api(port=port)
            last_fault = time.monotonic()
        while len(jobs) < CHAOS_JOBS:
            submit()
        # The queue drains within 90 s of the last fault.
        while not all(_status(r, j) in ("succeeded", "failed", "canceled") for j in jobs):
            if time.monotonic() - last_fault > 90:
                states = {
                    j: r.stack.redis.hmget(f"ebca:job:{j}", "status", "lease", "attempts") for j in jobs
                }
                logs = "\n".join(f"--- {w.name}\n{w.tail(25)}" for w in r.stack.workers[-4:])
                raise AssertionError(f"not drained 90 s after the last fault: {states}\n{logs}")
            time.sleep(0.5)
        drained = time.monotonic() - last_fault
    finally:
        monitor.stop.set()
        watcher.join(5)
    _check_chaos_outcome(r, jobs, monitor, drained)


def _check_chaos_outcome(r: Recovery, jobs: list[str], monitor: Monitor, drained: float) -> None:
    """Every job succeeded with intact images, every kill orphaned a job that ran again, and no job
    ran under a dead worker for longer than the lease allows."""
    for job_id in jobs:
        job = r.stack.job(job_id)
        assert job["status"] == "succeeded", job
        for image in job["result"]["images"]:
            data = r.stack.get(image["url"], timeout=10).content
            assert hashlib.sha256(data).hexdigest() == image["sha256"]
    assert len(monitor.kills) == CHAOS_KILLS
    orphaned = [k.orphan_end - k.at for k in monitor.kills if k.orphan_end is not None]
    assert len(orphaned) == CHAOS_KILLS
    seen = [last - first for first, last in monitor.orphans.values()]
    recovered = [k.rerun_at - k.at for k in monitor.kills if k.rerun_at is not None]
    median = statistics.median
    print(
        f"\nchaos: {len(jobs)} jobs, {CHAOS_KILLS} kills; running under a dead worker: "
        f"median {median(orphaned):.2f} s, worst {max(orphaned):.2f} s; "
        f"kill -> running again: median {median(recovered):.2f} s, "
        f"worst {max(recovered):.2f} s; drained {drained:.1f} s after the last fault"
    )
    # No job runs under a dead worker for longer than the TTL plus 5 s (see the single-kill test).
    assert max(orphaned) <= TTL + 5 and max(seen, default=0.0) <= TTL + 5, (orphaned, seen)
    assert len(recovered) == CHAOS_KILLS


def _status(r: Recovery, job_id: str) -> str | None:
    return json.loads(r.stack.redis.hget(f"ebca:job:{job_id}", "status") or "null")


def _pick_victim(r: Recovery, rng: random.Random) -> tuple[Proc, Kill] | None:
    """A random live worker whose child is in the middle of a job, while another worker is up (its
    main process beats): the recovery times then measure the leases, not how long a replacement
    takes to import torch on a busy machine. Jobs already killed twice are spared: a third crash
    would rightly end them failed with worker_lost (EBCA_MAX_ATTEMPTS=3), the poison-job rule, which
    is not what this test is about."""
    now = time.time()
    up = {
        w.pid
        for w in r.stack.live_workers()
        if now - float(r.stack.redis.zscore("ebca:workers", f"{HOST}:{w.pid}") or 0) <= TTL
    }
    candidates = []
    for job_id in r.stack.redis.smembers("ebca:running"):
        raw = r.stack.redis.hmget(f"ebca:job:{job_id}", "lease", "attempts", "progress")
        lease, attempts, progress = (json.loads(v or "null") for v in raw)
        if not lease or attempts > 2 or not progress or progress["stage"] != "denoising":
            continue
        try:
            session = os.getsid(int(lease.rsplit(":", 1)[1]))
        except ProcessLookupError:
            continue
        worker = next((w for w in r.stack.live_workers() if w.pid == session), None)
        if worker is not None and up - {worker.pid}:
            candidates.append((worker, Kill(job_id, lease, attempts, 0.0)))
    return rng.choice(candidates) if candidates else None
