"""Synchronous SDK: ``Client`` submits jobs and returns ``Job`` handles that wait, download and save.

Every method's logic is in ``_base.py``; this module performs its steps with blocking calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx

from ebca_client import _flow
from ebca_client._base import BaseClient
from ebca_client._flow import Flow, Runner
from ebca_client._job import STREAM_IDLE_TIMEOUT, BaseJob, _deadline
from ebca_client.models import CallerInfo, JobEvent, JobInfo, JobPage, KeyInfo, ModelInfo, NewKey

T = TypeVar("T")


class Job(BaseJob["Job"]):
    """A handle on one job; ``Client`` methods return it. See ``BaseJob`` for ``wait`` and ``cancel``."""

    _client: Client

    def _resolve(self, flow: Flow[Any]) -> Job:
        self._client._run(flow)
        return self

    def refresh(self) -> JobInfo:
        """Fetch the job record again (``GET /jobs/{id}``)."""
        return self._client._run(self._refresh_flow())

    def events(
        self, *, timeout: float | None = None, idle_timeout: float = STREAM_IDLE_TIMEOUT
    ) -> Iterator[JobEvent]:
        """The job's live events, from its state now (the first event) to its terminal one, after
        which the iteration ends; ``info`` follows each one. Raises
        ``JobTimeout`` once ``timeout`` seconds have passed, ``EventsUnavailable`` when the server
        does not offer live events (``wait()`` then polls) and ``TransportError`` when the stream
        keeps failing. Reconnects resume with ``Last-Event-ID``."""
        return self._client._iterate(self._events_flow(_deadline(timeout), timeout, idle_timeout, probe=True))

    def image_bytes(self, index: int = 0) -> bytes:
        """Download image ``index`` and check it against the record's sha256."""
        return self._client._run(self._image_bytes_flow(index))

    def images(self) -> list[Any]:
        """The job's images as PIL images (the job must have succeeded; call ``wait`` first)."""
        return self._client._run(self._images_flow())

    def save(self, directory: str | Path = ".") -> list[Path]:
        """Write every image to ``directory`` as ``<job id>-<index>.<ext>``; returns the paths."""
        return self._client._run(self._save_flow(directory))


class Client(BaseClient[Job]):
    """Synchronous client of the EBCA Serve REST API (docs/API.md); see ``BaseClient``."""

    _http: httpx.Client

    def _http_client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(**kwargs)

    def _job(self, flow: Flow[JobInfo]) -> Job:
        return Job(self, self._run(flow))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def models(self) -> list[ModelInfo]:
        return self._run(self._models_flow())

    def jobs(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None) -> JobPage:
        """The caller's jobs, newest first (an admin key: every job), one page of ``GET /jobs``."""
        return self._run(self._jobs_flow(status, limit, cursor))

    def whoami(self) -> CallerInfo:
        """The API key this client sends: its id, name, role and limits (``GET /keys/me``)."""
        return self._run(self._whoami_flow())

    def keys(self) -> list[KeyInfo]:
        """Every API key (admin key)."""
        return self._run(self._keys_flow())

    def create_key(self, name: str, *, admin: bool = False, **limits: float | int | None) -> NewKey:
        """Make an API key (admin key); ``limits``: rate_per_minute, burst, max_active_jobs,
        max_images_per_day (None: unlimited; left out: the server's defaults). The key is in the
        answer's ``key`` and nowhere else."""
        return self._run(self._create_key_flow(name, "admin" if admin else "user", limits))

    def revoke_key(self, key_id: str) -> KeyInfo:
        """Revoke an API key by its id (admin key); its jobs stay."""
        return self._run(self._revoke_key_flow(key_id))

    def health(self) -> dict[str, Any]:
        return self._run(self._health_flow())

    def ready(self) -> bool:
        """True when ``/readyz`` answers 200 (Redis up and a worker alive); never retries."""
        return self._run(self._ready_flow())

    # -- performing the steps --------------------------------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        runner = Runner(flow)
        for _ in self._drive(runner):
            pass
        return cast(T, runner.result)

    def _iterate(self, flow: Flow[None]) -> Iterator[JobEvent]:
        return self._drive(Runner(flow))

    def _drive(self, runner: Runner[Any]) -> Iterator[JobEvent]:
        try:
            for step in runner:
                if isinstance(step, _flow.Emit):
                    yield step.event
                    continue
                try:
                    runner.reply(self._perform(step, runner))
                except httpx.HTTPError as exc:
                    runner.fail(exc)
        finally:
            for response in runner.streams:
                response.close()

    def _perform(self, step: _flow.Step, runner: Runner[Any]) -> Any:
        match step:
            case _flow.Send(spec):
                return self._http.send(spec.build(self._http), follow_redirects=spec.method == "GET")
            case _flow.Sleep(seconds):
                time.sleep(seconds)
            case _flow.Open(spec, read_timeout):
                response = self._http.send(
                    spec.build(self._http, read_timeout), stream=True, follow_redirects=True
                )
                if response.is_success:
                    runner.streams[response] = response.iter_lines()
                else:
                    try:
                        response.read()
                    finally:
                        response.close()
                return response
            case _flow.ReadLine(response):
                return next(runner.streams[response], None)
            case _flow.Close(response):
                runner.streams.pop(response, None)
                response.close()
        return None
