"""Live job events in the SDK and the CLI: the SSE parser, ``job.events()`` and ``wait()`` on the
stream, against the in-process event server of sse_fakes.py (real sockets on loopback)."""

from __future__ import annotations

import io
import json
import time
import types
from collections.abc import Iterator

import pytest
from sse_fakes import JOB_ID, RESULT, Connection, EventServer, event, record

from ebca_client import (
    APIError,
    AsyncClient,
    AuthenticationError,
    Client,
    EventStreamError,
    EventsUnavailable,
    Job,
    JobCanceled,
    JobInfo,
    JobTimeout,
    RetryPolicy,
    TransportError,
    cli,
)
from ebca_client import client as sync_client_module
from ebca_client._sse import ServerSentEvent, SSEParser

FAST = RetryPolicy(max_retries=2, backoff_initial=0.01, backoff_max=0.05, jitter=0.0)


@pytest.fixture
def server() -> Iterator[EventServer]:
    fake = EventServer()
    yield fake
    fake.close()


@pytest.fixture
def client(server: EventServer) -> Iterator[Client]:
    with Client(server.url, retry=FAST) as c:
        yield c


def whole_job(first_id: int = 1) -> list[str | float]:
    """A job from submit to success as the contract streams it: queued behind another job, then
    next in line, a keep-alive while it waits, three steps, the result."""
    ids = [f"{1700000000000 + i}-0" for i in range(first_id, first_id + 6)]
    return [
        event("queued", ids[0], queue_position=1),
        event("queued", ids[1], queue_position=0),
        ": keep-alive\n\n",
        event("running", ids[2], step=1),
        event("running", ids[3], step=2),
        event("running", ids[4], step=3),
        event("succeeded", ids[5], step=3, result=RESULT),
    ]


# ---------------------------------------------------------------------------------------------------
# The parser


def feed_all(parser: SSEParser, text: str) -> list[ServerSentEvent]:
    return [e for line in text.split("\n") if (e := parser.feed(line)) is not None]


def test_parser_builds_events_from_fields_and_commits_ids() -> None:
    parser = SSEParser()
    stream = (
        '\ufeffid: 1-0\nevent: queued\ndata: {"a":\ndata:1}\n\n'  # BOM, two data lines, no space after ':'
        ": keep-alive\n\n"  # a comment, then a blank line with no data: no event
        "retry: 2500\nretry: soon\n\n"  # a non-number retry is ignored
        "data: plain\n\n"  # no event name: "message"; no id line: the last id still holds
        "id\n\n"  # an id field without a value resets the id
        "event: running\nid: bad\0id\ndata:\n\n"  # an id holding NUL is ignored; an empty data line
    )
    events = feed_all(parser, stream)
    assert events == [
        ServerSentEvent(event="queued", data='{"a":\n1}', id="1-0"),
        ServerSentEvent(event="message", data="plain", id="1-0"),
        ServerSentEvent(event="running", data="", id=None),
    ]
    assert parser.retry_ms == 2500
    assert parser.last_event_id == ""


def test_parser_drops_an_event_cut_off_by_a_reconnect_but_keeps_the_id() -> None:
    parser = SSEParser()
    assert feed_all(parser, "id: 7-0\nevent: running\ndata: {}\n\n")[0].id == "7-0"
    # The connection breaks after the id and data of the next event, before its blank line.
    assert feed_all(parser, "id: 8-0\nevent: running\ndata: {}") == []
    parser.reconnected()
    assert parser.last_event_id == "7-0"  # what the reconnect asks to resume after
    assert feed_all(parser, "\n") == []  # the blank line of the cut event comes too late
    (resumed,) = feed_all(parser, "event: succeeded\ndata: {}\n\n")
    assert resumed.id == "7-0" and resumed.event == "succeeded"


# ---------------------------------------------------------------------------------------------------
# job.events()


def test_events_follow_a_job_to_its_terminal_event(server: EventServer) -> None:
    server.script(Connection(whole_job(), hold=True))  # the server keeps the connection open after
    with Client(server.url, retry=FAST, api_key="k-123") as c:
        job = c.get_job(JOB_ID)
        started = time.monotonic()
        events = list(job.events())
    # The iteration ends at the terminal event, not when the server closes (it would hold 5 min+).
    assert time.monotonic() - started < 10
    assert [(e.status, e.queue_position, e.progress.step) for e in events] == [
        ("queued", 1, 0),
        ("queued", 0, 0),
        ("running", None, 1),
        ("running", None, 2),
        ("running", None, 3),
        ("succeeded", None, 3),
    ]
    assert [e.id for e in events] == [f"{1700000000000 + i}-0" for i in range(1, 7)]
    assert events[-1].is_terminal and events[-1].result.images[0].seed == 7
    assert job.status == "succeeded" and job.info.images[0].url.endswith("/images/0")
    (request,) = server.stream_requests
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["authorization"] == "Bearer k-123"
    assert "last-event-id" not in request.headers


def test_reconnect_resumes_after_the_last_event_id(server: EventServer) -> None:
    first = whole_job()
    server.script(
        # CRLF line endings, and the connection drops halfway through the third event.
        Connection([first[0].replace("\n", "\r\n"), first[1].replace("\n", "\r\n"), first[3][:40]]),
        # CR line endings: the stream resumes with the event after the last one delivered.
        Connection([chunk.replace("\n", "\r") for chunk in first[3:]]),
    )
    with Client(server.url, retry=FAST) as c:
        events = list(c.get_job(JOB_ID).events())
    assert [e.id for e in events] == [f"{1700000000000 + i}-0" for i in range(1, 7)]  # none twice
    assert [e.status for e in events] == ["queued", "queued", "running", "running", "running", "succeeded"]
    first_request, second_request = server.stream_requests
    assert "last-event-id" not in first_request.headers
    assert second_request.headers["last-event-id"] == "1700000000002-0"


def test_a_silent_stream_is_reopened_but_keep_alives_hold_it(server: EventServer) -> None:
    events = whole_job()
    server.script(
        # Keep-alives every 0.1 s keep a stream with a 0.5 s idle timeout open through 1.2 s...
        Connection([events[0], *[": keep-alive\n\n", 0.1] * 12, events[1], 5.0, events[3]]),
        # ...but 5 s of silence is a dead connection: reopened after the last id it delivered.
        Connection([events[3], events[6]]),
    )
    with Client(server.url, retry=FAST) as c:
        got = list(c.get_job(JOB_ID).events(idle_timeout=0.5))
    assert [e.status for e in got] == ["queued", "queued", "running", "succeeded"]
    first, second = server.stream_requests
    assert second.headers["last-event-id"] == "1700000000002-0"
    assert 0.5 <= second.at - first.at < 4  # 1.2 s of keep-alives + 0.5 s of silence, not the 5 s


def test_the_servers_retry_hint_sets_the_reconnect_delay(
    server: EventServer, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = whole_job()
    server.script(Connection(["retry: 1234\n\n", events[0]]), Connection([events[6]]))
    sleeps: list[float] = []
    monkeypatch.setattr(sync_client_module, "time", types.SimpleNamespace(sleep=sleeps.append))
    assert [e.status for e in client.get_job(JOB_ID).events()] == ["queued", "succeeded"]
    assert sleeps == [1.234]


def test_other_event_types_are_skipped_and_unreadable_data_is_an_error(
    server: EventServer, client: Client
) -> None:
    server.script(
        Connection(["event: webhook\ndata: {}\n\n", "data: no type\n\n", whole_job()[6]]),
        Connection([event("queued", "1-0"), "event: running\nid: 2-0\ndata: {not json\n\n"]),
        Connection([event("queued", "1-0", job_id="f" * 32)]),
    )
    job = client.get_job(JOB_ID)
    assert [e.status for e in job.events()] == ["succeeded"]
    with pytest.raises(EventStreamError, match="unreadable 'running' event 2-0"):
        list(job.events())
    with pytest.raises(EventStreamError, match="an event of job f+"):
        list(job.events())


@pytest.mark.parametrize(
    ("connection", "status"),
    [
        (Connection(status=404, content_type="application/json"), 404),
        (Connection(status=405, content_type="application/json"), 405),
        (Connection([json.dumps(record("queued"))], content_type="application/json"), 200),
    ],
    ids=["404", "405", "not-event-stream"],
)
def test_a_server_without_live_events_is_events_unavailable(
    server: EventServer, client: Client, connection: Connection, status: int
) -> None:
    server.script(connection)
    job = client.get_job(JOB_ID)
    with pytest.raises(EventsUnavailable) as info:
        next(job.events())
    assert info.value.status == status
    assert len(server.stream_requests) == 1  # not retried


def test_events_of_an_unknown_job_is_the_apis_404(server: EventServer, client: Client) -> None:
    # The events request 404s; so does the job itself, which the client checks before it says that
    # the server has no live events.
    job = Job(client, JobInfo(id="e" * 32, status="queued"))
    with pytest.raises(APIError) as info:
        next(job.events())
    assert info.value.status == 404 and not isinstance(info.value, EventsUnavailable)
    assert info.value.message == f"no job at /jobs/{'e' * 32}"


def test_401_is_an_authentication_error(server: EventServer) -> None:
    body = json.dumps({"error": {"code": "unauthorized", "message": "invalid API key"}})
    server.script(Connection([body], status=401, content_type="application/json"))
    with Client(server.url, retry=FAST, api_key="wrong") as c:
        job = c.get_job(JOB_ID)
        with pytest.raises(AuthenticationError) as info:
            next(job.events())
    assert info.value.key_sent and info.value.code == "unauthorized"
    assert "the API key was not accepted" in str(info.value)


def test_503_is_retried_and_endless_failures_give_a_transport_error(
    server: EventServer, client: Client
) -> None:
    server.script(
        Connection(["busy"], status=503, content_type="text/plain", headers={"Retry-After": "0"}),
        Connection(whole_job()),
    )
    job = client.get_job(JOB_ID)
    assert [e.status for e in job.events()][-1] == "succeeded"
    # Connections that never deliver an event: dropped without an answer, or ended at once.
    server.script(Connection(drop=True), Connection([": hello\n\n"]), Connection(drop=True))
    before = len(server.stream_requests)
    with pytest.raises(TransportError, match="failed 3 times in a row"):
        list(job.events())
    assert len(server.stream_requests) - before == FAST.max_retries + 1


def test_events_timeout_raises_job_timeout(server: EventServer, client: Client) -> None:
    server.script(Connection([whole_job()[0]], hold=True))
    job = client.get_job(JOB_ID)
    started = time.monotonic()
    with pytest.raises(JobTimeout) as info:
        for _ in job.events(timeout=0.5):
            pass
    # The stream is read with the time left as its read timeout, so the timeout is not overshot by
    # the 45 s idle timeout; the bound leaves room for a slow loaded machine.
    assert 0.5 <= time.monotonic() - started < 5
    assert info.value.job.status == "queued" and info.value.job.queue_position == 1


def test_breaking_out_of_events_closes_the_stream(server: EventServer, client: Client) -> None:
    server.script(Connection(whole_job()[:2], hold=True), Connection(whole_job()))
    job = client.get_job(JOB_ID)
    for e in job.events():
        assert e.status == "queued"
        break
    deadline = time.monotonic() + 5
    while server.closed_by_client == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.closed_by_client == 1  # the client hung up at once, not when the server gave up
    assert [e.status for e in job.events()][-1] == "succeeded"


# ---------------------------------------------------------------------------------------------------
# wait() on the stream


def test_wait_follows_the_stream_and_fetches_the_record_once(server: EventServer, client: Client) -> None:
    server.script(Connection(whole_job()))
    job = client.get_job(JOB_ID)
    server.records[0] = record(
        "succeeded",
        progress={"stage": "done", "step": 3, "total": 3},
        result=RESULT,
        finished_at="2026-11-29T06:00:09Z",
    )
    updates: list[JobInfo] = []
    assert job.wait(timeout=30, on_update=updates.append) is job
    assert [(u.status, u.queue_position, u.progress.step) for u in updates] == [
        ("queued", 0, 0),  # the record the handle had
        ("queued", 1, 0),
        ("queued", 0, 0),
        ("running", None, 1),
        ("running", None, 2),
        ("running", None, 3),
        ("succeeded", None, 3),  # the full record, fetched once the stream has said it is done
    ]
    assert job.info.finished_at is not None and job.info.images[0].seed == 7
    assert len(server.job_requests) == 2  # get_job, then the one fetch after the stream: no polling


@pytest.mark.parametrize(
    "connections",
    [
        [Connection(status=404, content_type="application/json")],
        [Connection(status=405, content_type="application/json")],
        [Connection(["{}"], content_type="application/json")],
        [Connection(drop=True)] * 3,
    ],
    ids=["older-server-404", "405", "proxy-not-event-stream", "connection-fails"],
)
def test_wait_polls_where_the_stream_fails(
    server: EventServer, client: Client, connections: list[Connection]
) -> None:
    server.script(*connections)
    job = client.get_job(JOB_ID)
    server.records.clear()
    server.records.extend([record("running", progress={"stage": "denoising", "step": 2, "total": 3}),
                           record("succeeded", result=RESULT)])  # fmt: skip
    updates: list[JobInfo] = []
    job.wait(timeout=30, poll_interval=0.01, on_update=updates.append)
    assert [u.status for u in updates] == ["queued", "running", "succeeded"]
    assert len(server.stream_requests) == len(connections)
    assert len(server.job_requests) == 3  # get_job, then two polls


def test_wait_with_stream_off_only_polls(server: EventServer, client: Client) -> None:
    job = client.get_job(JOB_ID)
    server.records[0] = record("canceled", error={"code": "canceled", "message": "canceled by the client"})
    with pytest.raises(JobCanceled):
        job.wait(timeout=30, poll_interval=0.01, stream=False)
    assert server.stream_requests == []


def test_wait_times_out_on_a_stream_that_stalls(server: EventServer, client: Client) -> None:
    server.script(Connection(whole_job()[:4], hold=True))
    job = client.get_job(JOB_ID)
    with pytest.raises(JobTimeout) as info:
        job.wait(timeout=0.6)
    assert info.value.job.status == "running" and info.value.job.progress.step == 1


# ---------------------------------------------------------------------------------------------------
# The async twin


async def test_async_events_and_reconnect(server: EventServer) -> None:
    events = whole_job()
    server.script(Connection([events[0], events[1][:25]]), Connection(events[1:]))
    async with AsyncClient(server.url, retry=FAST, api_key="k-async") as c:
        job = await c.get_job(JOB_ID)
        got = [e async for e in job.events()]
    assert [e.status for e in got] == ["queued", "queued", "running", "running", "running", "succeeded"]
    assert len({e.id for e in got}) == 6
    assert server.stream_requests[1].headers["last-event-id"] == "1700000000001-0"
    assert server.stream_requests[1].headers["authorization"] == "Bearer k-async"
    assert job.status == "succeeded"


async def test_async_wait_uses_the_stream_then_polls_an_older_server(server: EventServer) -> None:
    server.script(Connection(whole_job()), Connection(status=404, content_type="application/json"))
    async with AsyncClient(server.url, retry=FAST) as c:
        job = await c.get_job(JOB_ID)
        server.records[0] = record("succeeded", result=RESULT)
        updates: list[JobInfo] = []
        assert await job.wait(timeout=30, on_update=updates.append) is job
        assert [u.status for u in updates].count("running") == 3
        assert len(server.job_requests) == 2
        # The same client against a server that answers the stream with 404: it polls.
        other = await c.get_job(JOB_ID)
        other.info = other.info.model_copy(update={"status": "running"})
        await other.wait(timeout=30, poll_interval=0.01)
    assert other.status == "succeeded" and len(server.stream_requests) == 2


async def test_async_events_timeout(server: EventServer) -> None:
    server.script(Connection([whole_job()[0]], hold=True))
    async with AsyncClient(server.url, retry=FAST) as c:
        job = await c.get_job(JOB_ID)
        with pytest.raises(JobTimeout):
            async for _ in job.events(timeout=0.4):
                pass


# ---------------------------------------------------------------------------------------------------
# The command line


def run_cli(server: EventServer, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--url", server.url, *argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_progress_line_follows_the_stream(server: EventServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_isatty", lambda stream: True)
    server.script(Connection(whole_job()))
    server.records.append(record("succeeded", result={"images": []}))
    code, out, err = run_cli(server, "jobs", "wait", JOB_ID)
    assert code == 0, err
    lines = [part.split("  ")[0] for part in err.split("\r\x1b[K") if part.startswith("job ")]
    assert (
        lines[:3]
        == [
            f"job {JOB_ID[:8]} queued (next in line)",  # the record from GET /jobs/{id}
            f"job {JOB_ID[:8]} queued (1 ahead)",  # the stream replays the job from its first event
            f"job {JOB_ID[:8]} queued (next in line)",
        ]
    )
    assert any("step 2/3" in line for line in lines) and any("step 3/3" in line for line in lines)
    assert len(server.stream_requests) == 1 and len(server.job_requests) == 2  # no polling


def test_cli_jobs_events_prints_one_line_per_event(server: EventServer) -> None:
    server.script(Connection(whole_job()), Connection(whole_job()))
    code, out, _ = run_cli(server, "jobs", "events", JOB_ID)
    assert code == 0
    assert out.splitlines()[0] == f"1700000000001-0  job {JOB_ID[:8]} queued (1 ahead)"
    assert out.splitlines()[-1] == f"1700000000006-0  job {JOB_ID[:8]} succeeded: 1 image(s)"
    code, out, _ = run_cli(server, "--json", "jobs", "events", JOB_ID)
    parsed = [json.loads(line) for line in out.splitlines()]
    assert [p["progress"]["step"] for p in parsed] == [0, 0, 1, 2, 3, 3]
    assert parsed[-1]["status"] == "succeeded" and parsed[-1]["id"] == "1700000000006-0"
