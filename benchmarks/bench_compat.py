"""Time of one image through the OpenAI adapter vs submit-and-poll on our own API.

    .venv/bin/python benchmarks/bench_compat.py [--repeats 10] [--steps 20] [--poll 0.05]

Starts a private redis-server, one uvicorn api and one Celery worker (pool solo) on the built-in
model (models/shapes, CPU). Then, interleaved (A, B, A, B, ...; ``--repeats`` of each, after one
warm-up of each that loads the model):

- **openai**: ``POST /v1/images/generations`` (b64_json), one synchronous request that answers with
  the image;
- **ours**: ``POST /generate``, ``GET /jobs/{id}`` every ``--poll`` seconds until it succeeded, then
  ``GET /jobs/{id}/images/0`` (what a client of our API does to hold the same bytes).

Both ask for the same ``--steps``-step 32x32 image with the same seed. The machine may be shared, so
besides the wall times it reports each request's **overhead**: its wall time minus its job's own
time in the service (``finished_at - created_at`` of the job record: queue, run, upload), i.e. what
the path adds around the job (HTTP, submission, waiting for the result to be noticed, the image's
transfer). Prints medians and ratios and writes results/bench_compat.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ebca_common.jobs import unix_time  # noqa: E402
from ebca_common.keys import hash_key  # noqa: E402

KEY = "ebca_bench-" + "c" * 37
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout: float = 120) -> None:
    """Until /readyz is 200: Redis answers and the worker's heartbeat is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def job_seconds(job: dict) -> float:
    """The job's time in the service: from its creation to its final status."""
    return unix_time(job["finished_at"]) - unix_time(job["created_at"])


def via_openai(client: httpx.Client, body: dict) -> tuple[float, float]:
    """(wall time, overhead) of one synchronous request."""
    started = time.perf_counter()
    response = client.post("/v1/images/generations", json={**body, "response_format": "b64_json"})
    elapsed = time.perf_counter() - started
    if response.status_code != 200 or not response.json()["data"][0]["b64_json"]:
        raise RuntimeError(f"openai adapter: {response.status_code} {response.text[:300]}")
    job = client.get("/jobs?limit=1").json()["jobs"][0]  # the bench key's newest job: this one
    return elapsed, elapsed - job_seconds(job)


def via_ours(client: httpx.Client, body: dict, poll: float) -> tuple[float, float]:
    ours = {"prompt": body["prompt"], "steps": body["steps"], "seed": body["seed"]}
    started = time.perf_counter()
    response = client.post("/generate", json=ours)
    if response.status_code != 202:
        raise RuntimeError(f"POST /generate: {response.status_code} {response.text[:300]}")
    url = response.json()["url"]
    while True:
        job = client.get(url).json()
        if job["status"] == "succeeded":
            break
        if job["status"] in ("failed", "canceled"):
            raise RuntimeError(f"job {job['id']} {job['status']}: {job['error']}")
        time.sleep(poll)
    image = client.get(job["result"]["images"][0]["url"])
    elapsed = time.perf_counter() - started
    if image.status_code != 200:
        raise RuntimeError(f"image: {image.status_code}")
    return elapsed, elapsed - job_seconds(job)


def start(tmp: Path) -> tuple[list[subprocess.Popen[bytes]], str]:
    redis_port, api_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBCA_")}
    env.update(
        EBCA_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        EBCA_STORAGE_URL=str(tmp / "storage"),
        EBCA_DEFAULT_MODEL=str(REPO / "models" / "shapes"),
        EBCA_DEVICE="cpu",
        EBCA_API_KEYS=json.dumps([{"name": "bench", "role": "admin", "hash": hash_key(KEY)}]),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    log = (tmp / "services.log").open("ab")
    redis = [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"]  # fmt: skip
    api = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(api_port),
           "--log-level", "warning"]  # fmt: skip
    worker = [str(BIN / "celery"), "-A", "worker.celery_app", "worker", "--pool=solo", "-n", "bench@%h",
              "--loglevel=WARNING", "--without-gossip", "--without-mingle"]  # fmt: skip
    procs = [subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
             for argv in (redis, api, worker)]  # fmt: skip
    url = f"http://127.0.0.1:{api_port}"
    wait_ready(url)
    return procs, url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="measured images per path")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--poll", type=float, default=0.05, help="poll interval of submit-and-poll (s)")
    parser.add_argument("--out", default=str(REPO / "results" / "bench_compat"))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-compat-"))
    procs, url = start(tmp)
    times: dict[str, list[float]] = {"openai": [], "ours": []}
    overheads: dict[str, list[float]] = {"openai": [], "ours": []}
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as client:
            body = {"prompt": "a red circle and a blue square", "steps": args.steps, "seed": 0}
            via_openai(client, body)  # warm-up: the worker loads the model
            via_ours(client, body, args.poll)
            for i in range(args.repeats):
                body["seed"] = i + 1
                for path, run in (("openai", lambda: via_openai(client, body)),
                                  ("ours", lambda: via_ours(client, body, args.poll))):  # fmt: skip
                    wall, overhead = run()
                    times[path].append(wall)
                    overheads[path].append(overhead)
                row = [f"{p} {times[p][-1]:.3f} s (overhead {overheads[p][-1]:.3f} s)" for p in times]
                print(f"{i}: " + "  ".join(row), flush=True)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)

    medians = {path: statistics.median(t) for path, t in times.items()}
    ratio = medians["openai"] / medians["ours"]
    pair_ratio = statistics.median(a / b for a, b in zip(times["openai"], times["ours"], strict=True))
    over = {path: statistics.median(t) for path, t in overheads.items()}
    print(f"median openai {medians['openai']:.3f} s, ours {medians['ours']:.3f} s, ratio {ratio:.3f} "
          f"(median of pair ratios {pair_ratio:.3f})")  # fmt: skip
    ms = {path: f"{1000 * value:.0f} ms" for path, value in over.items()}
    print(f"median overhead beyond the job: openai {ms['openai']}, ours {ms['ours']}")
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "steps": args.steps,
        "repeats": args.repeats,
        "poll_seconds": args.poll,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "median_seconds": medians,
        "ratio_openai_over_ours": ratio,
        "median_pair_ratio": pair_ratio,
        "median_overhead_seconds": over,
        "seconds": times,
        "overhead_seconds": overheads,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# One image through the OpenAI adapter vs submit-and-poll on our API",
        "",
        f"`{result['command']}`: a {args.steps}-step 32x32 image of the built-in model, {args.repeats} "
        f"interleaved requests per path after one warm-up each; one api, one worker (CPU), "
        f"{result['machine']}. Submit-and-poll polls every {args.poll:g} s and downloads the image.",
        "",
        "| path | median s | min s | max s | median overhead ms |",
        "|---|---|---|---|---|",
        *[
            f"| {p} | {medians[p]:.3f} | {min(t):.3f} | {max(t):.3f} | {1000 * over[p]:.0f} |"
            for p, t in times.items()
        ],  # fmt: skip
        "",
        f"openai / ours (medians): **{ratio:.3f}x**; median of the per-pair ratios {pair_ratio:.3f}x.",
        "Overhead = a request's wall time minus its job's `finished_at - created_at` (what the path adds",
        "around the job; robust to the load of a shared machine, which moves the job times).",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
