"""Submit latency with API keys on and off: POST /generate at a fixed rate against one api process.

    .venv/bin/python benchmarks/bench_submit_latency.py [--rate 100] [--seconds 10] [--rounds 3]

Starts a private redis-server and, per phase, one uvicorn api process (the real Celery publisher to
that Redis; no worker, so jobs only queue). An open-loop load generator sends ``--rate`` submissions
per second for ``--seconds`` (a request is sent on schedule whether or not the earlier ones have
answered, so a slow server shows as latency, not as a lower rate). Phases alternate auth off / auth
on, ``--rounds`` times each, so that both see the same machine load, each from an empty store. With
auth on, each request carries a user key whose limits are set far above the load: the key lookup, the
revocation check and the quota script all run, nothing is refused. Prints p50/p99/max per mode and the
ratio of the p99s, and writes results/bench_submit_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
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
from redis import Redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ebca_common.keys import hash_key  # noqa: E402

KEY = "ebca_bench-" + "k" * 37
#: Limits far above the load: every check runs, none refuses.
LIMITS = {
    "rate_per_minute": 1e6,
    "burst": 100_000,
    "max_active_jobs": 1_000_000,
    "max_images_per_day": 100_000_000,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]  # fmt: skip
    with log.open("ab") as fh:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{port}/healthz")
    return proc


async def load(url: str, headers: dict[str, str], rate: float, seconds: float) -> list[float]:
    """Latencies (s) of ``rate * seconds`` submissions sent on a fixed schedule; raises on any non-202."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as client:
        # Warm the connection pool and the api's first-request paths outside the measurement.
        for _ in range(20):
            await client.post("/generate", json={"prompt": "warm up", "steps": 1})

        async def one() -> None:
            started = time.perf_counter()
            response = await client.post("/generate", json={"prompt": "a red circle", "steps": 1})
            latencies.append(time.perf_counter() - started)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    if set(statuses) != {202}:
        raise RuntimeError(f"unexpected statuses {statuses}")
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_ms": 1000 * ordered[-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="submissions per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one phase")
    parser.add_argument("--rounds", type=int, default=3, help="phases per mode (interleaved)")
    parser.add_argument("--out", default=str(REPO / "results" / "bench_submit_latency"))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    redis_port = free_port()
    redis = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = {k: v for k, v in os.environ.items() if not k.startswith("EBCA_")}
    base.update(
        EBCA_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        EBCA_STORAGE_URL=str(tmp / "storage"),
        EBCA_MAX_QUEUE="1000000",
        PYTHONUNBUFFERED="1",
    )
    entry = {"name": "bench", "role": "user", "hash": hash_key(KEY), "limits": LIMITS}
    modes = {
        "auth off": ({**base, "EBCA_AUTH": "off"}, {}),
        "auth on": ({**base, "EBCA_API_KEYS": json.dumps([entry])}, {"Authorization": f"Bearer {KEY}"}),
    }
    measured: dict[str, list[float]] = {mode: [] for mode in modes}
    per_round: list[dict[str, object]] = []
    redis_client = Redis(port=redis_port)
    try:
        time.sleep(0.5)
        for round_no in range(args.rounds):
            for mode, (env, headers) in modes.items():
                # Every phase starts from an empty store: the jobs of earlier phases (no worker takes
                # them) would otherwise grow the queue that the API's lost-message scan reads, which
                # slows later phases, always the same mode's.
                redis_client.flushdb()
                port = free_port()
                api = start_api(env, port, tmp / "api.log")
                try:
                    lat = asyncio.run(load(f"http://127.0.0.1:{port}", headers, args.rate, args.seconds))
                finally:
                    api.send_signal(signal.SIGTERM)
                    api.wait(15)
                measured[mode] += lat
                row = {"round": round_no, "mode": mode, **summary(lat)}
                per_round.append(row)
                print(f"round {round_no} {mode:8}  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
                      f"max {row['max_ms']:6.1f} ms  ({row['requests']} requests)", flush=True)  # fmt: skip
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    totals = {mode: summary(lat) for mode, lat in measured.items()}
    ratio = totals["auth on"]["p99_ms"] / totals["auth off"]["p99_ms"]
    p50_ratio = totals["auth on"]["p50_ms"] / totals["auth off"]["p50_ms"]
    print()
    for mode, row in totals.items():
        print(
            f"{mode:8}  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  max {row['max_ms']:6.1f} ms"
        )
    print(f"auth on / auth off: p99 {ratio:.2f}x, p50 {p50_ratio:.2f}x")
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "rate_per_second": args.rate,
        "seconds_per_phase": args.seconds,
        "rounds": args.rounds,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "totals": totals,
        "p99_ratio_on_off": ratio,
        "p50_ratio_on_off": p50_ratio,
        "per_round": per_round,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Submit latency, API keys on vs off",
        "",
        f"`{result['command']}`: {args.rate:g} POST /generate per second for {args.seconds:g} s per phase, "
        f"{args.rounds} interleaved phases per mode, one api process, {result['machine']}.",
        "",
        "| mode | requests | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
        *[
            f"| {m} | {r['requests']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} |"
            for m, r in totals.items()
        ],  # fmt: skip
        "",
        f"p99 auth on / off: **{ratio:.2f}x**; p50: {p50_ratio:.2f}x.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
