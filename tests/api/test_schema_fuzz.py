"""Property-based fuzzing of every operation of /openapi.json with schemathesis (QA of issue 4).

The api runs in process on the real Redis (private key prefix) with a recording fake queue. Every
generated request, schema-valid (positive) or not (negative), must get no 5xx, a status, content type
and body that the schema documents, and, when it is refused (4xx), the one error body and no new job.
Bounded and derandomized: the same examples on every run, in well under a minute.

Strategies are drawn from the operations directly (``APIOperation.as_strategy``) because schemathesis'
pytest plugin does not support this pytest version.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from testkeys import TestKeys

from api.main import create_app
from ebca_common.settings import Settings
from ebca_common.store import JobStore

OPERATIONS = [
    "POST /generate",
    "POST /edit",
    "GET /jobs",
    "GET /jobs/{job_id}",
    "DELETE /jobs/{job_id}",
    "GET /jobs/{job_id}/images/{index}",
    "GET /jobs/{job_id}/events",
    "GET /models",
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /keys/me",
    "GET /keys",
    "POST /keys",
    "DELETE /keys/{key_id}",
]
#: Every request carries the admin key (auth is on, as by default): it may call every operation, so
#: the fuzzing reaches the handlers (the refusals of missing and foreign keys have their own tests).
AUTH = TestKeys.header(TestKeys.root)
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


class RecordingQueue:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def publish(self, job_id: str) -> None:
        self.sent.append(job_id)


def test_the_list_covers_every_operation(store_settings: Settings) -> None:
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(store_settings, publisher=RecordingQueue())
    )
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert labels == set(OPERATIONS)


#: Negative (schema-invalid) requests exist only where some parameter or body has a constraint to break.
CASES = [(label, GenerationMode.POSITIVE) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE)
    for label in ("POST /generate", "POST /edit", "GET /jobs/{job_id}/images/{index}", "GET /jobs")
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label} {mode.value}" for label, mode in CASES])
def test_operation(store_settings: Settings, label: str, mode: GenerationMode) -> None:
    # A long heartbeat TTL and one heartbeat: /readyz answers 200, so any 5xx is a real defect.
    cfg = store_settings.model_copy(update={"heartbeat_ttl": 3600.0, "max_queue": 100_000})
    store = JobStore.from_settings(cfg)
    store.heartbeat("fuzz-host:1")
    queue = RecordingQueue()
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(cfg, store=store, publisher=queue))
    operation = schema.find_operation_by_label(label)
    assert operation is not None
    strategy = operation.as_strategy(generation_mode=mode)
    # The request bodies are where the validation is: fuzz them harder than the read-only routes.
    examples = 150 if label.startswith("POST") else 20

    @given(case=strategy)
    @settings(
        max_examples=examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        jobs_before, sent_before = store.job_count(), len(queue.sent)
        response = case.call_and_validate(checks=CHECKS, headers=AUTH)
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"error"}, body
            assert set(body["error"]) <= {"code", "message", "field"} and body["error"]["message"], body
            assert store.job_count() == jobs_before and len(queue.sent) == sent_before, (
                f"{label} was refused with {response.status_code} but created a job"
            )
        elif case.method == "POST" and response.status_code == 202:
            assert store.job_count() == jobs_before + 1 and queue.sent[-1] == response.json()["id"]

    run()
