"""Asynchronous SDK: ``AsyncClient`` mirrors ``Client`` call for call, with ``AsyncJob`` handles.

Every method's logic is in ``_base.py``, shared with the sync client; this module performs its steps
with awaits.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx

from ebca_client import _flow
from ebca_client._base import BaseClient
from ebca_client._flow import Flow, Runner
from ebca_client._job import STREAM_IDLE_TIMEOUT, BaseJob, _deadline
from ebca_client.models import CallerInfo, JobEvent, JobInfo, JobPage, KeyInfo, ModelInfo, NewKey

T = TypeVar("T")


class AsyncJob(BaseJob[Coroutine[Any, Any, "AsyncJob"]]):
    """A handle on one job; ``AsyncClient`` methods return it. Same surface as ``Job``, awaited
    (``await job.wait()``), and ``async for event in job.events()``."""

    _client: AsyncClient

    async def _resolve(self, flow: Flow[Any]) -> AsyncJob:
        await self._client._run(flow)
        return self

    async def refresh(self) -> JobInfo:
        return await self._client._run(self._refresh_flow())

    def events(
        self, *, timeout: float | None = None, idle_timeout: float = STREAM_IDLE_TIMEOUT
    ) -> AsyncIterator[JobEvent]:
        """``async for event in job.events()``: see ``Job.events``."""
        return self._client._iterate(self._events_flow(_deadline(timeout), timeout, idle_timeout, probe=True))

    async def image_bytes(self, index: int = 0) -> bytes:
        return await self._client._run(self._image_bytes_flow(index))

    async def images(self) -> list[Any]:
        return await self._client._run(self._images_flow())

    async def save(self, directory: str | Path = ".") -> list[Path]:
        return await self._client._run(self._save_flow(directory))


class AsyncClient(BaseClient[Coroutine[Any, Any, AsyncJob]]):
    """Asynchronous client of the EBCA Serve REST API (docs/API.md); the same methods as ``Client``,
    each a coroutine (``await client.generate(...)``)."""

    _http: httpx.AsyncClient

    def _http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(**kwargs)

    async def _job(self, flow: Flow[JobInfo]) -> AsyncJob:
        return AsyncJob(self, await self._run(flow))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def models(self) -> list[ModelInfo]:
        return await self._run(self._models_flow())

    async def jobs(self, *, status: str | None = None, limit: int = 20, cursor: str | None = None) -> JobPage:
        """The caller's jobs, newest first (an admin key: every job), one page of ``GET /jobs``."""
        return await self._run(self._jobs_flow(status, limit, cursor))

    async def whoami(self) -> CallerInfo:
        """The API key this client sends: its id, name, role and limits (``GET /keys/me``)."""
        return await self._run(self._whoami_flow())

    async def keys(self) -> list[KeyInfo]:
        """Every API key (admin key)."""
        return await self._run(self._keys_flow())

    async def create_key(self, name: str, *, admin: bool = False, **limits: float | int | None) -> NewKey:
        """Make an API key (admin key); ``limits``: rate_per_minute, burst, max_active_jobs,
        max_images_per_day (None: unlimited; left out: the server's defaults). The key is in the
        answer's ``key`` and nowhere else."""
        return await self._run(self._create_key_flow(name, "admin" if admin else "user", limits))

    async def revoke_key(self, key_id: str) -> KeyInfo:
        """Revoke an API key by its id (admin key); its jobs stay."""
        return await self._run(self._revoke_key_flow(key_id))

    async def health(self) -> dict[str, Any]:
        return await self._run(self._health_flow())

    async def ready(self) -> bool:
        return await self._run(self._ready_flow())

    # -- performing the steps --------------------------------------------------------------------------

    async def _run(self, flow: Flow[T]) -> T:
        runner = Runner(flow)
        async for _ in self._drive(runner):
            pass
        return cast(T, runner.result)

    def _iterate(self, flow: Flow[None]) -> AsyncIterator[JobEvent]:
        return self._drive(Runner(flow))

    async def _drive(self, runner: Runner[Any]) -> AsyncIterator[JobEvent]:
        try:
            for step in runner:
                if isinstance(step, _flow.Emit):
                    yield step.event
                    continue
                try:
                    runner.reply(await self._perform(step, runner))
                except httpx.HTTPError as exc:
                    runner.fail(exc)
        finally:
            for response in runner.streams:
                await response.aclose()

    async def _perform(self, step: _flow.Step, runner: Runner[Any]) -> Any:
        match step:
            case _flow.Send(spec):
                return await self._http.send(spec.build(self._http), follow_redirects=spec.method == "GET")
            case _flow.Sleep(seconds):
                await asyncio.sleep(seconds)
            case _flow.Open(spec, read_timeout):
                request = spec.build(self._http, read_timeout)
                response = await self._http.send(request, stream=True, follow_redirects=True)
                if response.is_success:
                    runner.streams[response] = response.aiter_lines()
                else:
                    try:
                        await response.aread()
                    finally:
                        await response.aclose()
                return response
            case _flow.ReadLine(response):
                return await anext(runner.streams[response], None)
            case _flow.Close(response):
                runner.streams.pop(response, None)
                await response.aclose()
        return None
