"""Prometheus metrics. Job counts, queue depth and durations come from the job store at scrape time
(the worker records durations there), so every api replica reports the same numbers."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ebca_common.errors import ServiceError
from ebca_common.store import HISTOGRAM_BUCKETS, JobStore


class StoreCollector(Collector):
    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ebca_store_up", "1 when the job store (Redis) answered this scrape.")
        try:
            counts = self.store.status_counts()
            depth = self.store.queue_depth()
            running = self.store.running_count()
            workers = len(self.store.live_workers())
            histograms = {name: self.store.histogram(name) for name in HISTOGRAM_BUCKETS}
        except ServiceError:
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        jobs = CounterMetricFamily(
            "ebca_jobs", "Jobs that reached each status since the store was created.", labels=["status"]
        )
        for status, count in counts.items():
            jobs.add_metric([status], float(count))
        yield jobs
        yield GaugeMetricFamily("ebca_queue_depth", "Jobs waiting in the queue.", value=float(depth))
        yield GaugeMetricFamily("ebca_jobs_running", "Jobs running now.", value=float(running))
        yield GaugeMetricFamily("ebca_workers_alive", "Workers with a fresh heartbeat.", value=float(workers))
        descriptions = {
            "job_duration_seconds": "Wall time of finished jobs, from start on a worker to the end.",
            "step_duration_seconds": "Wall time of one denoising step.",
            "batch_images": "Images denoised together in one batch (one job's, or coalesced jobs').",
            "batch_images_per_second": "Images per second of each batch, from its start to its end.",
        }
        for name, (buckets, total) in histograms.items():
            yield HistogramMetricFamily(f"ebca_{name}", descriptions[name], buckets=buckets, sum_value=total)


def build_registry(store: JobStore) -> tuple[CollectorRegistry, Counter]:
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    requests = Counter(
        "ebca_http_requests",
        "HTTP requests by route and status.",
        ["method", "route", "status"],
        registry=registry,
    )
    return registry, requests
