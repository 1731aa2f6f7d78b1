"""What ``Client`` and ``AsyncClient``, and their job handles, share: every method's logic, once.

A method's logic is a *flow* (``_flow.py``): a generator that yields the I/O it needs as steps and is
sent each step's result. ``client.py`` performs the steps with blocking calls and ``aio.py`` with
awaits; neither holds any other logic, so the two clients cannot drift apart.

The public methods that return a job handle are defined here once, typed by the subclass: the sync
client binds the handle type to ``Job``, the async one to a coroutine of ``AsyncJob``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx

from ebca_client import _core
from ebca_client._core import EditArg, EnergyArg, ImageArg, InversionArg, RequestSpec, RetryPolicy
from ebca_client._flow import Close, Emit, Flow, Open, ReadLine, Send, Sleep, absorb
from ebca_client._sse import ServerSentEvent, SSEParser
from ebca_client._version import __version__
from ebca_client.errors import (
    APIError,
    EventStreamError,
    EventsUnavailable,
    JobTimeout,
    TransportError,
)
from ebca_client.models import (
    CallerInfo,
    GenerateRequest,
    InpaintRequest,
    JobEvent,
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
# The API sends a keep-alive comment every 15 s while a job is idle (docs/API.md, live events): a
# stream silent for three of those is taken for dead and reconnected.
STREAM_IDLE_TIMEOUT = 45.0

_JobR = TypeVar("_JobR")
_HandleR = TypeVar("_HandleR")


_STATUSES = frozenset(status.value for status in JobStatus)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _ignore(info: JobInfo) -> None:
    return None


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
        extra: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> _JobR:
        """Submit ``POST /generate``; ``None`` arguments take the server's defaults. ``extra`` adds
        fields to the body as given (one newer than this client)."""
        request = _core.request_model(
            GenerateRequest,
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
        extra: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> _JobR:
        """Repaint the white part of ``mask`` in ``image`` (paths, bytes, PIL images or ``ImageRef``)."""
        image_ref, image_upload = _core.image_input("image", image)
        mask_ref, mask_upload = _core.image_input("mask", mask)
        request = _core.request_model(
            InpaintRequest,
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
        extra: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> _JobR:
        """Invert a real ``image`` described by ``source_prompt`` and apply the editorial prompts."""
        image_ref, image_upload = _core.image_input("image", image)
        request = _core.request_model(
            RealEditRequest,
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
        extra: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> _JobR:
        """Re-run a succeeded generate job (prompt, seed, settings) with editorial prompts."""
        request = _core.request_model(
            SyntheticEditRequest,
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


# ---------------------------------------------------------------------------------------------------
# Job handles


class BaseJob(Generic[_HandleR]):
    """A handle on one job. ``info`` is the last record seen (its fields also read directly off the
    handle: ``job.result``, ``job.error``); ``refresh()`` fetches a new one, and ``wait()`` and
    ``events()`` keep it current as the job moves."""

    def __init__(self, client: BaseClient[Any], info: JobInfo) -> None:
        self._client = client
        self.info = info

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, status={self.status!r})"

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

    def _resolve(self, flow: Flow[Any]) -> _HandleR:
        """Run ``flow`` (which updates ``info``) and give back this handle."""
        raise NotImplementedError

    def cancel(self) -> _HandleR:
        """Cancel the job (see ``Client.cancel``); the handle's record is the answer."""
        return self._resolve(self._cancel_flow())

    def wait(
        self,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        *,
        max_poll_interval: float = 5.0,
        on_update: Callable[[JobInfo], None] | None = None,
        raise_on_failure: bool = True,
        stream: bool = True,
    ) -> _HandleR:
        """Follow the job until it is terminal; gives back the handle, its ``info`` the final record.

        It follows the job's live events (``events()``), calling ``on_update`` with the record as
        each event leaves it. Where the stream cannot be had (a server without it, a proxy that
        refuses it, a stream that keeps failing) or with ``stream=False``, it polls instead: the
        interval starts at ``poll_interval`` and grows by half each poll that brings no news, up to
        ``max_poll_interval``, and any change of status or progress resets it. Raises
        ``JobTimeout`` after ``timeout`` seconds (the job keeps running), ``JobFailed``/
        ``JobCanceled`` when it did not succeed and ``raise_on_failure`` is true.
        """
        flow = self._wait_flow(
            _deadline(timeout), timeout, poll_interval, max_poll_interval, on_update or _ignore, stream
        )
        return self._resolve(self._outcome_flow(flow, raise_on_failure))

    # -- flows -----------------------------------------------------------------------------------------

    def _refresh_flow(self) -> Flow[JobInfo]:
        self.info = yield from self._client._get_info_flow(self.id)
        return self.info

    def _cancel_flow(self) -> Flow[JobInfo]:
        self.info = yield from self._client._cancel_flow(self.id)
        return self.info

    def _outcome_flow(self, flow: Flow[JobInfo], raise_on_failure: bool) -> Flow[JobInfo]:
        info = yield from flow
        if raise_on_failure:
            _core.raise_for_outcome(info)
        return info

    def _wait_flow(
        self,
        deadline: float | None,
        timeout: float | None,
        poll_interval: float,
        max_poll_interval: float,
        report: Callable[[JobInfo], None],
        stream: bool,
    ) -> Flow[JobInfo]:
        report(self.info)
        if stream and not self.done:

            def moved(event: JobEvent) -> None:
                if not event.is_terminal:  # the terminal state is reported with the full record below
                    report(self.info)

            try:
                yield from absorb(
                    self._events_flow(deadline, timeout, STREAM_IDLE_TIMEOUT, probe=False), moved
                )
                # The events carry status, progress and result; the record has the rest (finished_at...).
                yield from self._refresh_flow()
                report(self.info)
            except (EventStreamError, TransportError) as exc:
                logger.info("job %s: no live events (%s); polling", self.id, exc)
        interval = poll_interval
        last_seen: tuple[Any, ...] | None = None
        while not self.done:
            seen = _core.progress_key(self.info)
            interval = (
                poll_interval if seen != last_seen else _core.next_poll_interval(interval, max_poll_interval)
            )
            last_seen = seen
            pause = interval
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise JobTimeout(self.info, timeout or 0.0)
                pause = min(interval, remaining)
            yield Sleep(pause)
            yield from self._refresh_flow()
            report(self.info)
        return self.info

    def _events_flow(
        self, deadline: float | None, timeout: float | None, idle_timeout: float, *, probe: bool
    ) -> Flow[None]:
        """The job's live events (docs/API.md, ``GET /jobs/{id}/events``) until its terminal one.

        A stream that drops, or stays silent for ``idle_timeout`` (no event and no keep-alive), is
        reopened with ``Last-Event-ID`` so that nothing is missed or repeated. Reconnecting backs
        off per the client's retry policy, at least by the server's ``retry:`` hint; after
        ``max_retries`` tries in a row that bring no event it raises ``TransportError``. 404 or 405
        raise ``EventsUnavailable`` (with ``probe``, a 404 first checks that the job exists, so an
        unknown job is the API's own 404 error); other error statuses raise ``APIError``.
        """
        client = self._client
        parser = SSEParser()
        failures = 0
        while True:
            self._check_deadline(deadline, timeout)
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if parser.last_event_id:
                headers["Last-Event-ID"] = parser.last_event_id
            spec = RequestSpec("GET", f"/jobs/{self.id}/events", headers=headers)
            read_timeout = (
                idle_timeout if deadline is None else min(idle_timeout, deadline - time.monotonic())
            )
            retry_after: float | None = None
            try:
                response: httpx.Response = yield Open(spec, max(read_timeout, 0.001))
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc or 'connection failed'}"
            else:
                if response.status_code == 200 and _core.is_event_stream(response):
                    parser.reconnected()
                    delivered, finished = [], []
                    try:
                        yield from self._read_events(response, parser, deadline, timeout, delivered, finished)
                    except httpx.TransportError as exc:  # dropped, or silent for read_timeout
                        problem = f"{type(exc).__name__}: {exc or 'stream broke'}"
                    else:
                        problem = "the stream ended before the job did"
                    yield Close(response)
                    if finished:
                        return
                    if delivered:
                        failures = 0
                        problem = ""
                else:
                    yield from self._refuse_stream(response, spec, probe)
                    retry_after = _core.parse_retry_after(response.headers.get("retry-after"))
                    problem = f"HTTP {response.status_code}"
            self._check_deadline(deadline, timeout)
            if problem:
                failures += 1
                if failures > client.retry.max_retries:
                    raise TransportError(
                        f"GET {client._url(spec)}: the event stream failed {failures} times in a row "
                        f"(last: {problem})",
                        url=client._url(spec),
                    )
            hint = parser.retry_ms / 1000 if parser.retry_ms is not None else None
            delay = client.retry.delay(max(failures, 1), max(hint or 0.0, retry_after or 0.0) or None)
            logger.info("job %s: event stream reconnect in %.2fs (%s)", self.id, delay, problem or "dropped")
            yield Sleep(delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic())))

    def _read_events(
        self,
        response: httpx.Response,
        parser: SSEParser,
        deadline: float | None,
        timeout: float | None,
        delivered: list[JobEvent],
        finished: list[JobEvent],
    ) -> Flow[None]:
        """Emit the events of one open stream until it ends or the job's terminal event came. What
        it delivered, and the terminal event, are appended to the two lists (which survive the
        stream breaking off with an exception)."""
        while True:
            line = yield ReadLine(response)
            if line is None:
                return
            self._check_deadline(deadline, timeout)
            sse = parser.feed(line)
            event = None if sse is None else self._job_event(sse)
            if event is None:
                continue
            delivered.append(event)
            self.info = self.info.with_event(event)
            yield Emit(event)
            if event.is_terminal:
                finished.append(event)
                return

    def _refuse_stream(self, response: httpx.Response, spec: RequestSpec, probe: bool) -> Flow[None]:
        """Raise for an answer that is no event stream, unless it is one to retry (429, 502-504)."""
        status = response.status_code
        what = f"GET {self._client._url(spec)} answered {status}"
        if status == 200:
            yield Close(response)
            media = response.headers.get("content-type", "no content type")
            raise EventsUnavailable(f"{what} with {media}, not an event stream", status)
        if status in (404, 405):
            if probe and status == 404:
                yield from self._refresh_flow()  # raises the API's 404 for an unknown job
            raise EventsUnavailable(f"{what}: the server does not offer live events", status)
        if not _core.should_retry_status(spec, status):
            raise _core.api_error_from_response(response)

    def _job_event(self, sse: ServerSentEvent) -> JobEvent | None:
        """The job event an SSE event carries; None for event types other than the job statuses (a
        newer server's, skipped)."""
        if sse.event not in _STATUSES:
            return None
        try:
            payload = json.loads(sse.data)
            if not isinstance(payload, dict):
                raise ValueError(f"expected a JSON object, got {type(payload).__name__}")
            event = JobEvent.model_validate({"status": sse.event, **payload, "id": sse.id})
        except ValueError as exc:  # json's and pydantic's errors both
            raise EventStreamError(f"job {self.id}: unreadable {sse.event!r} event {sse.id}: {exc}") from None
        if event.job_id != self.id:
            raise EventStreamError(f"job {self.id}: the event stream sent an event of job {event.job_id}")
        return event

    def _check_deadline(self, deadline: float | None, timeout: float | None) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            raise JobTimeout(self.info, timeout or 0.0)

    def _image_bytes_flow(self, index: int) -> Flow[bytes]:
        image = _core.image_result(self.info, index)
        data = yield from self._client._download_flow(image.url)
        _core.check_digest(data, image.sha256, f"job {self.id} image {index}")
        return data

    def _images_flow(self) -> Flow[list[Any]]:
        images = []
        for img in _core.require_images(self.info):
            images.append(_core.decode_image((yield from self._image_bytes_flow(img.index))))
        return images

    def _save_flow(self, directory: str | Path) -> Flow[list[Path]]:
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for img in _core.require_images(self.info):
            path = target / _core.image_filename(self.id, img.index, img.extension)
            path.write_bytes((yield from self._image_bytes_flow(img.index)))
            paths.append(path)
        return paths
