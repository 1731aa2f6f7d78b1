"""The worker's per-process pipeline cache: what the first job on a fresh worker process costs
compared with the jobs after it, which reuse the loaded pipeline.

Runs the same generate job several times through ``worker.runner.JobRunner`` (exactly what the
Celery task calls) against the real Redis job store and a local storage directory:
- "cold": a fresh PipelineCache for each job, i.e. the first job of a new worker process (load + run);
- "warm": one PipelineCache for all jobs, the steady state of a worker; its first job is cold too.
Cold and warm jobs are interleaved so that drifting machine load hits both alike. Prints the medians
and the first-vs-second-job overhead and writes ``results/bench_worker_cache.json``.

    .venv/bin/python benchmarks/bench_worker_cache.py                    # tiny model, 4 steps, 32x32
    .venv/bin/python benchmarks/bench_worker_cache.py --model models/shapes --steps 20
    .venv/bin/python benchmarks/bench_worker_cache.py --model /models/sd15 --device cuda --size 512
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import redis

from ebca_common.jobs import JobStatus
from ebca_common.settings import Settings
from ebca_common.specs import parse_generate
from ebca_common.storage import LocalStorage
from ebca_common.store import JobStore
from worker.pipelines import PipelineCache
from worker.runner import JobRunner


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="diffusers directory; default: a tiny generated model")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=None, help="width = height; default: the model's")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/bench_worker_cache.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from ebca_core.testing import build_tiny_model

            model = str(build_tiny_model(Path(tmp) / "tiny", variant="sd1", seed=0))
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        settings = Settings(
            redis_url=args.redis_url,
            key_prefix=prefix,
            storage_url=str(Path(tmp) / "storage"),
            default_model=str(Path(model).resolve()),
            device=args.device,
        )
        store = JobStore.from_settings(settings)
        storage = LocalStorage(settings.storage_root)
        body = {
            "prompt": "a red circle",
            "steps": args.steps,
            "seed": 0,
            "width": args.size,
            "height": args.size,
        }
        request = parse_generate(body).model_dump(mode="json") | {"model": settings.default_model_id}

        acquire: dict[int, float] = {}

        def timed(cache: PipelineCache) -> PipelineCache:
            """Record how long each job waits for its pipeline (load on a miss, a dict look-up on a hit)."""
            get = cache.get

            def timed_get(model_id: str) -> object:
                start = time.perf_counter()
                pipe = get(model_id)
                acquire[id(cache)] = time.perf_counter() - start
                return pipe

            cache.get = timed_get  # type: ignore[method-assign]
            return cache

        def one_job(runner: JobRunner) -> float:
            job, _ = store.create(kind="generate", mode=None, request=request, total_steps=args.steps)
            start = time.perf_counter()
            outcome = runner.run(job.id)
            elapsed = time.perf_counter() - start
            if outcome != "succeeded":
                raise SystemExit(f"job failed: {store.get(job.id).error}")
            assert store.get(job.id).status == JobStatus.SUCCEEDED
            return elapsed

        try:
            warm_cache = timed(PipelineCache(settings))
            warm_runner = JobRunner(store, storage, warm_cache, "bench:warm")
            first = one_job(warm_runner)  # the first job of the long-lived worker (loads the model)
            first_acquire = acquire[id(warm_cache)]
            cold, warm, cold_acquire, warm_acquire = [], [], [], []
            for _ in range(args.repeats):
                cache = timed(PipelineCache(settings))
                cold.append(one_job(JobRunner(store, storage, cache, "bench:cold")))
                cold_acquire.append(acquire[id(cache)])
                warm.append(one_job(warm_runner))
                warm_acquire.append(acquire[id(warm_cache)])
        finally:
            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(match=f"{prefix}:*"))
            if keys:
                client.delete(*keys)

    result = {
        "model": model if args.model else "tiny (ebca_core.testing.build_tiny_model)",
        "device": args.device,
        "steps": args.steps,
        "size": args.size,
        "repeats": args.repeats,
        "first_job_s": first,
        "first_job_pipeline_s": first_acquire,
        "cold_job_median_s": statistics.median(cold),
        "warm_job_median_s": statistics.median(warm),
        "cold_pipeline_median_s": statistics.median(cold_acquire),
        "warm_pipeline_median_s": statistics.median(warm_acquire),
        "cold_over_warm": statistics.median(cold) / statistics.median(warm),
        "cold_s": cold,
        "warm_s": warm,
        "machine": platform.platform(),
        "python": platform.python_version(),
    }
    print(
        f"first job of a worker process: median {result['cold_job_median_s']:.3f}s, of which getting the "
        f"pipeline (load) {result['cold_pipeline_median_s']:.3f}s\n"
        f"later jobs (cached pipeline):  median {result['warm_job_median_s']:.3f}s, of which getting the "
        f"pipeline {result['warm_pipeline_median_s'] * 1e6:.1f}us\n"
        f"first/later job time = {result['cold_over_warm']:.2f}x"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
