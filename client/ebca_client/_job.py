"""The job handle's shared logic (``Job`` and ``AsyncJob``): refresh, cancel, wait on the event stream
with a polling fallback, read the events, download and save the images. Like the client's methods in
``_base.py``, each is a flow (``_flow.py``) that ``client.py`` and ``aio.py`` perform."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx

from ebca_client import _core
from ebca_client._core import RequestSpec
from ebca_client._flow import Close, Emit, Flow, Open, ReadLine, Sleep, absorb
from ebca_client._sse import ServerSentEvent, SSEParser
from ebca_client.errors import EventStreamError, EventsUnavailable, JobTimeout, TransportError
from ebca_client.models import JobEvent, JobInfo, JobStatus

if TYPE_CHECKING:
    from ebca_client._base import BaseClient

logger = logging.getLogger("ebca_client")

#: The API sends a keep-alive comment every 15 s while a job is idle (docs/API.md, live events): a
#: stream silent for three of those is taken for dead and reconnected.
STREAM_IDLE_TIMEOUT = 45.0

_HandleR = TypeVar("_HandleR")

_STATUSES = frozenset(status.value for status in JobStatus)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _ignore(info: JobInfo) -> None:
    return None


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
