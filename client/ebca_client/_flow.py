"""Flows: a method's logic as a generator of I/O steps, and the runner a client drives it with.

A flow yields the I/O it needs as steps (send this request, sleep, open an event stream, read its next
line, hand an event to the caller) and is sent each step's result, or has the step's httpx error
thrown in, the way httpx's own ``Auth.auth_flow`` works. ``client.py`` performs the steps with
blocking calls and ``aio.py`` with awaits; the flows themselves are in ``_base.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from ebca_client._core import RequestSpec
from ebca_client.models import JobEvent

T = TypeVar("T")


@dataclass(frozen=True)
class Send:
    """Send a request and read the whole response. Result: the ``httpx.Response``."""

    spec: RequestSpec


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Open:
    """Send a request and return as soon as the response's headers are in. Result: the response; a
    2xx body is left for ``ReadLine``, any other is read whole (for its error body) and closed."""

    spec: RequestSpec
    read_timeout: float


@dataclass(frozen=True)
class ReadLine:
    """Result: the next line of an opened response without its line ending, or None at its end."""

    response: httpx.Response


@dataclass(frozen=True)
class Close:
    response: httpx.Response


@dataclass(frozen=True)
class Emit:
    """Hand an event to whoever iterates the flow (``job.events()``)."""

    event: JobEvent


Step = Send | Sleep | Open | ReadLine | Close | Emit
Flow = Generator[Step, Any, T]


class Runner(Generic[T]):
    """Steps one flow for a client: ``for step in runner`` gives the flow's steps, and ``reply`` (the
    step's result) or ``fail`` (its httpx error, for the flow to judge) answers each one. ``result``
    is the flow's return value once the loop has ended. ``streams`` holds the responses the flow
    opened and has not closed (each with its line iterator): the client closes them however the
    flow ends, so a flow never needs I/O to clean up after an exception."""

    def __init__(self, flow: Flow[T]) -> None:
        self._flow = flow
        self._reply: Any = None
        self._error: BaseException | None = None
        self.result: T | None = None
        self.streams: dict[httpx.Response, Any] = {}

    def __iter__(self) -> Iterator[Step]:
        while True:
            try:
                if self._error is not None:
                    error, self._error = self._error, None
                    step = self._flow.throw(error)
                else:
                    step = self._flow.send(self._reply)
            except StopIteration as stop:
                self.result = stop.value
                return
            self._reply = None
            yield step

    def reply(self, value: Any) -> None:
        self._reply = value

    def fail(self, error: BaseException) -> None:
        self._error = error


def absorb(flow: Flow[T], on_event: Callable[[JobEvent], None]) -> Flow[T]:
    """Run ``flow`` inside another flow: its I/O steps pass through, its events go to ``on_event``."""
    runner = Runner(flow)
    for step in runner:
        if isinstance(step, Emit):
            on_event(step.event)
            continue
        try:
            runner.reply((yield step))
        except httpx.HTTPError as exc:
            runner.fail(exc)
    return runner.result  # type: ignore[return-value]
