"""Asynchronous SDK: ``AsyncClient`` mirrors ``Client`` call for call, with ``AsyncJob`` handles.

The request building, retry decisions and error parsing are shared with the sync client (``_core``);
only the sending and the sleeping differ."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from ebca_client import _core
from ebca_client._core import EditArg, EnergyArg, ImageArg, RequestSpec, RetryPolicy
from ebca_client.errors import APIError, JobTimeout, TransportError
from ebca_client.models import InversionSpec, JobInfo, JobStatus, ModelInfo, ModelList
from ebca_client.settings import ClientSettings

logger = logging.getLogger("ebca_client")

USER_AGENT = "ebca-client/0.1"


class AsyncJob:
    """A handle on one job. ``info`` is the last record fetched (its fields also read directly off the
    handle: ``job.result``, ``job.error``); ``refresh()`` fetches a new one."""

    def __init__(self, client: AsyncClient, info: JobInfo) -> None:
        self._client = client
        self.info = info

    def __repr__(self) -> str:
        return f"AsyncJob(id={self.id!r}, status={self.status!r})"

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def status(self) -> str:
        return self.info.status

    @property
    def done(self) -> bool:
        return self.info.is_terminal

    def __getattr__(self, name: str) -> Any:
        # The record's fields read straight off the handle: job.result, job.error, job.progress, ...
        # (only reached for names the handle itself does not define).
        if name == "info" or name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(self.info, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}") from None

    async def refresh(self) -> JobInfo:
        self.info = await self._client._get_job_info(self.id)
        return self.info

    async def cancel(self) -> AsyncJob:
        self.info = await self._client._cancel_info(self.id)
        return self

    async def wait(
        self,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        *,
        max_poll_interval: float = 5.0,
        on_update: Callable[[JobInfo], None] | None = None,
        raise_on_failure: bool = True,
    ) -> AsyncJob:
        """Poll until the job is terminal; returns ``self``.

        The interval starts at ``poll_interval`` and grows by half each poll that brings no news, up
        to ``max_poll_interval``; any change of status or progress resets it, so a running job is
        followed closely and a long queue is not hammered. Raises ``JobTimeout`` after ``timeout``
        seconds (the job keeps running), ``JobFailed``/``JobCanceled`` when it did not succeed and
        ``raise_on_failure`` is true.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = poll_interval
        last_seen: tuple[Any, ...] | None = None
        info = self.info
        while True:
            if on_update is not None:
                on_update(info)
            if info.is_terminal:
                break
            seen = _core.progress_key(info)
            interval = (
                poll_interval if seen != last_seen else _core.next_poll_interval(interval, max_poll_interval)
            )
            last_seen = seen
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise JobTimeout(info, timeout or 0.0)
                await asyncio.sleep(min(interval, remaining))
            else:
                await asyncio.sleep(interval)
            info = await self.refresh()
        if raise_on_failure:
            _core.raise_for_outcome(info)
        return self

    async def image_bytes(self, index: int = 0) -> bytes:
        image = _core.image_result(self.info, index)
        data = await self._client._download(image.url)
        _core.check_digest(data, image.sha256, f"job {self.id} image {index}")
        return data

    async def images(self) -> list[Any]:
        """The job's images as PIL images (the job must have succeeded; call ``wait`` first)."""
        return [
            _core.decode_image(await self.image_bytes(img.index)) for img in _core.require_images(self.info)
        ]

    async def save(self, directory: str | Path = ".") -> list[Path]:
        """Write every image to ``directory`` as ``<job id>-<index>.<ext>``; returns the paths."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for img in _core.require_images(self.info):
            path = target / _core.image_filename(self.id, img.index, img.extension)
            path.write_bytes(await self.image_bytes(img.index))
            paths.append(path)
        return paths


class AsyncClient:
    """Asynchronous client of the EBCA Serve REST API (docs/API.md); same surface as ``Client``.

    ``base_url`` defaults to ``EBCA_API_URL`` (else http://127.0.0.1:8000). GET and DELETE are retried
    on transport errors and on 429/502/503/504; submits send an ``Idempotency-Key`` (one per call,
    reused across its retries) so they are retried the same way without ever creating two jobs.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        settings = ClientSettings.from_env()
        if base_url is not None:
            settings = settings.model_copy(update={"api_url": ClientSettings._check_url(base_url)})
        self.base_url = settings.api_url
        self.retry = retry or RetryPolicy(
            max_retries=settings.max_retries if max_retries is None else max_retries
        )
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=settings.timeout if timeout is None else timeout,
            headers={"User-Agent": USER_AGENT, **(headers or {})},
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # -- transport -----------------------------------------------------------------------------------

    async def _send(self, spec: RequestSpec) -> httpx.Response:
        retries = 0
        while True:
            request = spec.build(self._http)
            try:
                response = await self._http.send(request, follow_redirects=spec.method == "GET")
            except httpx.UnsupportedProtocol as exc:
                raise TransportError(f"{spec.method} {request.url}: {exc}", url=str(request.url)) from exc
            except httpx.TransportError as exc:
                if spec.retryable_on_transport_error and retries < self.retry.max_retries:
                    retries += 1
                    delay = self.retry.delay(retries)
                    logger.info(
                        "%s %s failed (%s); retry %d in %.2fs", spec.method, spec.path, exc, retries, delay
                    )
                    await asyncio.sleep(delay)
                    continue
                raise TransportError(
                    f"{spec.method} {request.url}: {type(exc).__name__}: {exc or 'connection failed'}",
                    url=str(request.url),
                ) from exc
            if response.status_code < 400:
                await response.aread()
                return response
            await response.aread()
            if _core.should_retry_status(spec, response.status_code) and retries < self.retry.max_retries:
                retries += 1
                retry_after = _core.parse_retry_after(response.headers.get("retry-after"))
                delay = self.retry.delay(retries, retry_after)
                logger.info(
                    "%s %s -> %d; retry %d in %.2fs",
                    spec.method,
                    spec.path,
                    response.status_code,
                    retries,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            raise _core.api_error_from_response(response)

    def _job_from(self, response: httpx.Response) -> AsyncJob:
        return AsyncJob(self, JobInfo.model_validate(response.json()))

    async def _get_job_info(self, job_id: str) -> JobInfo:
        response = await self._send(RequestSpec("GET", f"/jobs/{job_id}"))
        return JobInfo.model_validate(response.json())

    async def _cancel_info(self, job_id: str) -> JobInfo:
        try:
            response = await self._send(RequestSpec("DELETE", f"/jobs/{job_id}"))
        except APIError as exc:
            # Cancel is idempotent for the caller: a job that is already canceled (for instance by the
            # first attempt of a retried DELETE whose answer was lost) is reported, not an error.
            if exc.status == 409:
                info = await self._get_job_info(job_id)
                if info.status == JobStatus.CANCELED:
                    return info
            raise
        return JobInfo.model_validate(response.json())

    async def _download(self, url: str) -> bytes:
        return (await self._send(RequestSpec("GET", url))).content

    # -- public API ----------------------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        model: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        num_images: int | None = None,
        seed: int | None = None,
        output_format: str | None = None,
        energy: EnergyArg = None,
        edits: Sequence[EditArg] | None = None,
        extra: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        """Submit ``POST /generate``; ``None`` arguments take the server's defaults."""
        body = _core.generate_body(locals())
        return self._job_from(await self._send(_core.submit_spec("/generate", body, None, idempotency_key)))

    async def edit_inpaint(
        self,
        image: ImageArg,
        mask: ImageArg,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        model: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        num_images: int | None = None,
        seed: int | None = None,
        output_format: str | None = None,
        energy: EnergyArg = None,
        extra: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        """Repaint the white part of ``mask`` in ``image`` (paths, bytes, PIL images or ``ImageRef``)."""
        body = _core.inpaint_body(locals())
        spec = _core.submit_spec("/edit", body, {"image": image, "mask": mask}, idempotency_key)
        return self._job_from(await self._send(spec))

    async def edit_real(
        self,
        image: ImageArg,
        source_prompt: str,
        edits: Sequence[EditArg],
        *,
        model: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        num_images: int | None = None,
        seed: int | None = None,
        output_format: str | None = None,
        energy: EnergyArg = None,
        inversion: InversionSpec | Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        """Invert a real ``image`` described by ``source_prompt`` and apply the editorial prompts."""
        body = _core.real_body(locals())
        spec = _core.submit_spec("/edit", body, {"image": image}, idempotency_key)
        return self._job_from(await self._send(spec))

    async def edit_synthetic(
        self,
        source_job: AsyncJob | JobInfo | str,
        edits: Sequence[EditArg],
        *,
        output_format: str | None = None,
        extra: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        """Re-run a succeeded generate job (prompt, seed, settings) with editorial prompts."""
        body = _core.synthetic_body(locals())
        return self._job_from(await self._send(_core.submit_spec("/edit", body, None, idempotency_key)))

    async def get_job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self._get_job_info(_core.job_id_of(job_id)))

    async def cancel(self, job: AsyncJob | JobInfo | str) -> AsyncJob:
        """Cancel a job: queued jobs never start, running ones stop at the next denoising step."""
        return AsyncJob(self, await self._cancel_info(_core.job_id_of(job)))

    async def models(self) -> list[ModelInfo]:
        return ModelList.model_validate((await self._send(RequestSpec("GET", "/models"))).json()).models

    async def health(self) -> dict[str, Any]:
        return (await self._send(RequestSpec("GET", "/healthz"))).json()

    async def ready(self) -> bool:
        """True when ``/readyz`` answers 200 (Redis up and a worker alive); never retries."""
        try:
            response = await self._http.get("/readyz")
        except httpx.TransportError:
            return False
        return response.status_code == 200
