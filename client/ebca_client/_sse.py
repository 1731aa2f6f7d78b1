"""Server-sent events: the ``text/event-stream`` format, parsed line by line (no I/O).

Follows the event-stream interpretation of the HTML standard ("Server-sent events", section 9.2.6):
``field: value`` lines build an event and a blank line dispatches it; a line starting with ``:`` is a
comment (the API's keep-alive); ``data`` lines join with newlines; ``id`` sets the last event id,
which persists from event to event and across reconnections (it is what ``Last-Event-ID`` resumes
after); ``retry`` sets the reconnection delay in milliseconds; a block without data dispatches
nothing but still commits its id; an event cut off by the end of the stream is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None


class SSEParser:
    """Feed it the stream's lines (without their line endings); ``feed`` returns an event when a
    line completes one. One parser follows one logical stream across reconnections: call
    ``reconnected()`` when a new connection starts."""

    def __init__(self) -> None:
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None
        self._id: str | None = None
        self._event = ""
        self._data: list[str] = []
        self._first_line = True

    def reconnected(self) -> None:
        """A new connection: whatever the last one left unfinished is dropped, the id is kept."""
        self._id = self.last_event_id
        self._event = ""
        self._data = []
        self._first_line = True

    def feed(self, line: str) -> ServerSentEvent | None:
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        self.last_event_id = self._id
        data, event = self._data, self._event or "message"
        self._data, self._event = [], ""
        if not data:
            return None
        return ServerSentEvent(event=event, data="\n".join(data), id=self.last_event_id or None)
