"""What ``Client`` and ``AsyncClient`` share: every method's logic, once (the job handles: ``_job.py``).

A method's logic is a *flow* (``_flow.py``): a generator that yields the I/O it needs as steps and is
sent each step's result. ``client.py`` performs the steps with blocking calls and ``aio.py`` with
awaits; neither holds any other logic, so the two clients cannot drift apart.

The public methods that return a job handle are defined here once, typed by the subclass: the sync
client binds the handle type to ``Job``, the async one to a coroutine of ``AsyncJob``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

import httpx

from ebca_client import _core
from ebca_client._core import EditArg, EnergyArg, ImageArg, InversionArg, RequestSpec, RetryPolicy
from ebca_client._flow import Flow, Send, Sleep
from ebca_client._job import BaseJob
from ebca_client._version import __version__
from ebca_client.errors import (
    APIError,
    TransportError,
)
from ebca_client.models import (
    CallerInfo,
    GenerateRequest,
    InpaintRequest,
    JobInfo,
    JobPage,
    JobStatus,
    KeyInfo,
    ModelInfo,
    ModelList,
    NewKey,
    RealEditRequest,
    SyntheticEditRequest,
    _Request,
)
from ebca_client.settings import ClientSettings

logger = logging.getLogger("ebca_client")

USER_AGENT = f"ebca-client/{__version__}"

_JobR = TypeVar("_JobR")


# ---------------------------------------------------------------------------------------------------
# The client


class BaseClient(Generic[_JobR]):
    """Client of the EBCA Serve REST API (docs/API.md); ``Client`` and ``AsyncClient`` are the two
    ways to run it.

    ``base_url`` defaults to ``EBCA_API_URL`` (else http://127.0.0.1:8000), ``api_key`` to
    ``EBCA_API_KEY`` (sent as ``Authorization: Bearer <key>``). GET and DELETE are retried on
    transport errors and on 429/502/503/504; submits send an ``Idempotency-Key`` (one per call,
    reused across its retries) so they are retried the same way without ever creating two jobs.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        settings = ClientSettings.from_env().with_overrides(base_url=base_url, api_key=api_key)
        self.base_url = settings.api_url
        self.retry = retry or RetryPolicy(
            max_retries=settings.max_retries if max_retries is None else max_retries
        )
        auth = {"Authorization": f"Bearer {settings.api_key.get_secret_value()}"} if settings.api_key else {}
        self._http = self._http_client(
            base_url=self.base_url,
            timeout=settings.timeout if timeout is None else timeout,
            headers={"User-Agent": USER_AGENT, **auth, **(headers or {})},
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    # -- what the sync and async clients implement -------------------------------------------------------

    def _http_client(self, **kwargs: Any) -> Any:
        raise NotImplementedError

    def _job(self, flow: Flow[JobInfo]) -> _JobR:
        """A handle on the job record that ``flow`` fetches."""
        raise NotImplementedError

    # -- submits, job lookup and cancel ----------------------------------------------------------------

    def generate(
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
        edits: Sequence[EditArg] | EditArg | None = None,
        webhook: str | None = None,
        webhook_events: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> _JobR:
        """Submit ``POST /generate``; ``None`` arguments take the server's defaults. ``extra`` adds
        fields to the body as given (one newer than this client)."""
        request = _core.request_model(
            GenerateRequest,
            webhook=webhook,
            webhook_events=None if webhook_events is None else list(webhook_events),
            prompt=prompt,
            negative_prompt=negative_prompt,
            model=model,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            num_images=num_images,
            seed=seed,
            output_format=output_format,
            energy=energy,
            edits=edits,
        )
        return self._submit("/generate", request, {}, extra, idempotency_key)

    def edit_inpaint(
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
        webhook: str | None = None,
        webhook_events: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> _JobR:
        """Repaint the white part of ``mask`` in ``image`` (paths, bytes, PIL images or ``ImageRef``)."""
        image_ref, image_upload = _core.image_input("image", image)
        mask_ref, mask_upload = _core.image_input("mask", mask)
        request = _core.request_model(
            InpaintRequest,
            webhook=webhook,
            webhook_events=None if webhook_events is None else list(webhook_events),
            prompt=prompt,
            negative_prompt=negative_prompt,
            image_ref=image_ref,
            mask_ref=mask_ref,
            model=model,
            steps=steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            num_images=num_images,
            seed=seed,
            output_format=output_format,
            energy=energy,
        )
        uploads = {"image": image_upload, "mask": mask_upload}
        return self._submit("/edit", request, uploads, extra, idempotency_key)

    def edit_real(
        self,
        image: ImageArg,
        source_prompt: str,
        edits: Sequence[EditArg] | EditArg,
        *,
        model: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        num_images: int | None = None,
        seed: int | None = None,
        output_format: str | None = None,
        energy: EnergyArg = None,
        inversion: InversionArg = None,
        webhook: str | None = None,
        webhook_events: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> _JobR:
        """Invert a real ``image`` described by ``source_prompt`` and apply the editorial prompts."""
        image_ref, image_upload = _core.image_input("image", image)
        request = _core.request_model(
            RealEditRequest,
            webhook=webhook,
            webhook_events=None if webhook_events is None else list(webhook_events),
            source_prompt=source_prompt,
            edits=edits,
            image_ref=image_ref,
            model=model,
            steps=steps,
            guidance_scale=guidance_scale,
            num_images=num_images,
            seed=seed,
            output_format=output_format,
            energy=energy,
            inversion=inversion,
        )
        return self._submit("/edit", request, {"image": image_upload}, extra, idempotency_key)

    def edit_synthetic(
        self,
        source_job: BaseJob[Any] | JobInfo | str,
        edits: Sequence[EditArg] | EditArg,
        *,
        output_format: str | None = None,
        webhook: str | None = None,
        webhook_events: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> _JobR:
        """Re-run a succeeded generate job (prompt, seed, settings) with editorial prompts."""
        request = _core.request_model(
            SyntheticEditRequest,
            webhook=webhook,
            webhook_events=None if webhook_events is None else list(webhook_events),
            source_job_id=_core.job_id_of(source_job),
            edits=edits,
            output_format=output_format,
        )
        return self._submit("/edit", request, {}, extra, idempotency_key)

    def get_job(self, job_id: str) -> _JobR:
        return self._job(self._get_info_flow(_core.job_id_of(job_id)))

    def cancel(self, job: BaseJob[Any] | JobInfo | str) -> _JobR:
        """Cancel a job: queued jobs never start, running ones stop at the next denoising step."""
        return self._job(self._cancel_flow(_core.job_id_of(job)))

    def _submit(
        self,
        path: str,
        request: _Request,
        uploads: Mapping[str, ImageArg | None],
        extra: Mapping[str, Any] | None,
        idempotency_key: str | None,
    ) -> _JobR:
        spec = _core.submit_spec(path, request, uploads, extra, idempotency_key)
        return self._job(self._info_flow(spec))

    # -- flows -----------------------------------------------------------------------------------------

    def _send_flow(self, spec: RequestSpec) -> Flow[httpx.Response]:
        """One API call with the retry policy; an error status raises ``APIError``."""
        retries = 0
        while True:
            try:
                response: httpx.Response = yield Send(spec)
            except httpx.UnsupportedProtocol as exc:
                raise TransportError(f"{spec.method} {self._url(spec)}: {exc}", url=self._url(spec)) from exc
            except httpx.TransportError as exc:
                if spec.retryable_on_transport_error and retries < self.retry.max_retries:
                    retries += 1
                    delay = self.retry.delay(retries)
                    logger.info(
                        "%s %s failed (%s); retry %d in %.2fs", spec.method, spec.path, exc, retries, delay
                    )
                    yield Sleep(delay)
                    continue
                raise TransportError(
                    f"{spec.method} {self._url(spec)}: {type(exc).__name__}: {exc or 'connection failed'}",
                    url=self._url(spec),
                ) from exc
            if response.status_code < 400:
                return response
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
                yield Sleep(delay)
                continue
            raise _core.api_error_from_response(response)

    def _url(self, spec: RequestSpec) -> str:
        return spec.path if "://" in spec.path else f"{self.base_url}{spec.path}"

    def _info_flow(self, spec: RequestSpec) -> Flow[JobInfo]:
        response = yield from self._send_flow(spec)
        return JobInfo.model_validate(response.json())

    def _get_info_flow(self, job_id: str) -> Flow[JobInfo]:
        return (yield from self._info_flow(RequestSpec("GET", f"/jobs/{job_id}")))

    def _cancel_flow(self, job_id: str) -> Flow[JobInfo]:
        try:
            return (yield from self._info_flow(RequestSpec("DELETE", f"/jobs/{job_id}")))
        except APIError as exc:
            # Cancel is idempotent for the caller: a job that is already canceled (for instance by the
            # first attempt of a retried DELETE whose answer was lost) is reported, not an error.
            if exc.status == 409:
                info = yield from self._get_info_flow(job_id)
                if info.status == JobStatus.CANCELED:
                    return info
            raise

    def _download_flow(self, url: str) -> Flow[bytes]:
        return (yield from self._send_flow(RequestSpec("GET", url))).content

    def _models_flow(self) -> Flow[list[ModelInfo]]:
        response = yield from self._send_flow(RequestSpec("GET", "/models"))
        return ModelList.model_validate(response.json()).models

    def _jobs_flow(self, status: str | None, limit: int, cursor: str | None) -> Flow[JobPage]:
        params = {
            "limit": str(limit),
            **({"status": status} if status else {}),
            **({"cursor": cursor} if cursor else {}),
        }
        response = yield from self._send_flow(RequestSpec("GET", "/jobs", params=params))
        return JobPage.model_validate(response.json())

    def _whoami_flow(self) -> Flow[CallerInfo]:
        return CallerInfo.model_validate((yield from self._send_flow(RequestSpec("GET", "/keys/me"))).json())

    def _keys_flow(self) -> Flow[list[KeyInfo]]:
        response = yield from self._send_flow(RequestSpec("GET", "/keys"))
        return [KeyInfo.model_validate(item) for item in response.json()]

    def _create_key_flow(self, name: str, role: str, limits: Mapping[str, Any]) -> Flow[NewKey]:
        # Not retried on a transport error: a lost answer to a POST that did make a key would make a
        # second one (the first is then listed by keys() and can be revoked).
        body = {"name": name, "role": role, **({"limits": dict(limits)} if limits else {})}
        response = yield from self._send_flow(RequestSpec("POST", "/keys", json_body=body))
        return NewKey.model_validate(response.json())

    def _revoke_key_flow(self, key_id: str) -> Flow[KeyInfo]:
        response = yield from self._send_flow(RequestSpec("DELETE", f"/keys/{key_id}"))
        return KeyInfo.model_validate(response.json())

    def _health_flow(self) -> Flow[dict[str, Any]]:
        return (yield from self._send_flow(RequestSpec("GET", "/healthz"))).json()

    def _ready_flow(self) -> Flow[bool]:
        """True when ``/readyz`` answers 200 (Redis up and a worker alive); never retries."""
        try:
            response = yield Send(RequestSpec("GET", "/readyz"))
        except httpx.TransportError:
            return False
        return response.status_code == 200
