"""API keys on the real service (uvicorn, Celery workers, Redis), with the default settings: auth
required, the default per-key limits. Two user keys (alice, bob) and an admin key (root).

- The isolation matrix: every endpoint and method, probed by bob on alice's jobs (records, images,
  cancel, events, synthetic-edit source, image_ref to outputs and uploads, idempotency replay, the
  list): never a byte of alice's; the admin sees and cancels all.
- Refused keys: no key, a wrong key, a revoked key -> 401 with the error body, nothing created.
- The submit rate: a burst over the default bucket, spread over two api processes sharing Redis.
"""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import httpx
import pytest
from conftest import Stack
from PIL import Image
from testkeys import TestKeys

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ALICE, BOB, ROOT = TestKeys.alice, TestKeys.bob, TestKeys.root


def png(mode: str = "RGB", color: Any = (200, 30, 30)) -> bytes:
    """A 32x32 image; as a mask ("L"), its right half white (the part to repaint)."""
    image = Image.new(mode, (32, 32), color)
    if mode == "L":
        image.paste(0, (0, 0, 16, 32))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def alices(stack: Stack) -> dict[str, Any]:
    """Alice's jobs: a finished generate job (with an image), an inpaint job with uploaded inputs,
    and the Idempotency-Key she used."""
    body = {"prompt": "a red circle", "steps": 2, "seed": 5}
    made = stack.post("/generate", ALICE, json=body, headers={"Idempotency-Key": "alice-1"})
    assert made.status_code == 202, made.text
    generated = stack.wait_job(made.json()["id"], key=ALICE)
    assert generated["status"] == "succeeded", generated
    request = {"mode": "inpaint", "prompt": "a blue square", "steps": 2, "seed": 1}
    files = {"image": ("i.png", png(), "image/png"), "mask": ("m.png", png("L", 255), "image/png")}
    inpaint = stack.post("/edit", ALICE, data={"request": json.dumps(request)}, files=files)
    assert inpaint.status_code == 202, inpaint.text
    return {"generate": generated, "inpaint": inpaint.json()["id"], "body": body, "idem": "alice-1"}


def probes(stack: Stack, jobs: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every way to reach one of alice's jobs, as (method, path, request kwargs)."""
    gen, inp = jobs["generate"]["id"], jobs["inpaint"]
    paths = stack.get("/openapi.json").json()["paths"]
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", f"/jobs/{gen}", {}),
        ("GET", f"/jobs/{inp}", {}),
        ("GET", f"/jobs/{gen}/images/0", {}),
        ("GET", f"/jobs/{gen}/images/7", {}),
        ("DELETE", f"/jobs/{gen}", {}),
        ("DELETE", f"/jobs/{inp}", {}),
        ("POST", "/edit", {"json": {"mode": "synthetic", "source_job_id": gen,
                                     "edits": [{"prompt": "blue"}]}}),
        ("POST", "/edit", {"json": {"mode": "real", "source_prompt": "a red circle", "steps": 2,
                                     "edits": [{"prompt": "blue"}], "image_ref": {"job_id": gen}}}),
        ("POST", "/edit", {"json": {"mode": "inpaint", "prompt": "x", "steps": 2,
                                     "image_ref": {"job_id": inp, "input": "image"},
                                     "mask_ref": {"job_id": inp, "input": "mask"}}}),
        ("POST", "/edit", {"json": {"mode": "inpaint", "prompt": "x", "steps": 2,
                                     "image_ref": {"job_id": gen},
                                     "mask_ref": {"job_id": inp, "input": "mask"}}}),
    ]  # fmt: skip
    if "/jobs/{job_id}/events" in paths:  # the live event stream (docs/API.md)
        calls += [("GET", f"/jobs/{gen}/events", {}), ("GET", f"/jobs/{inp}/events", {})]
    return calls


def test_no_key_reaches_another_keys_jobs_and_admins_reach_all(stack: Stack, alices: dict[str, Any]) -> None:
    before = stack.job_keys()
    gen = alices["generate"]
    refused = 0
    for method, path, kwargs in probes(stack, alices):
        response = stack.request(method, path, BOB, **kwargs)
        body = response.json()
        if method == "POST":  # a reference to another key's job is a job that does not exist
            assert response.status_code == 422, (path, response.text)
            assert "not found" in body["error"]["message"], body
        else:
            assert response.status_code == 404, (method, path, response.text)
            assert body == {"error": {"code": "not_found", "message": body["error"]["message"]}}
        refused += 1
    # The list holds none of alice's jobs, and bob may not ask for hers.
    listed = stack.get("/jobs", BOB, params={"limit": 100}).json()["jobs"]
    assert {gen["id"], alices["inpaint"]} & {job["id"] for job in listed} == set()
    assert stack.get("/jobs", BOB, params={"owner": TestKeys.id_of(ALICE)}).status_code == 403
    refused += 2
    # Her Idempotency-Key is hers: bob's request with it and her body is a new job of his.
    replay = stack.post("/generate", BOB, json=alices["body"], headers={"Idempotency-Key": alices["idem"]})
    assert replay.status_code == 202 and replay.json()["id"] != gen["id"]
    assert replay.json()["owner"] == TestKeys.id_of(BOB)
    refused += 1
    assert refused >= 13
    # Nothing changed for alice; the only job bob made is his own.
    assert stack.job_keys() == before + 1
    assert stack.job(gen["id"], ALICE)["status"] == "succeeded"
    assert stack.wait_job(alices["inpaint"], key=ALICE)["status"] == "succeeded"
    # The admin sees and downloads everything, and lists both keys' jobs.
    assert stack.get(f"/jobs/{gen['id']}", ROOT).json()["owner"] == TestKeys.id_of(ALICE)
    image = stack.get(f"/jobs/{gen['id']}/images/0", ROOT)
    assert image.status_code == 200 and image.headers["x-content-type-options"] == "nosniff"
    everyone = {job["id"] for job in stack.get("/jobs", ROOT, params={"limit": 100}).json()["jobs"]}
    assert {gen["id"], alices["inpaint"], replay.json()["id"]} <= everyone
    # Alice's own references work (the same probes, as her).
    edit = stack.post("/edit", ALICE, json=probes(stack, alices)[6][2]["json"])
    assert edit.status_code == 202, edit.text
    assert stack.wait_job(edit.json()["id"], key=ALICE)["status"] == "succeeded"
    # And the admin cancels anyone's job.
    queued = stack.post("/generate", BOB, json={"prompt": "a cat", "steps": 200}).json()["id"]
    assert stack.delete(f"/jobs/{queued}", ROOT).status_code == 202
    assert stack.wait_job(queued, key=BOB)["status"] == "canceled"


def test_no_key_a_wrong_key_and_a_revoked_key_are_401(stack: Stack, alices: dict[str, Any]) -> None:
    made = stack.post("/keys", ROOT, json={"name": "temp"}).json()
    assert stack.get("/keys/me", made["key"]).json()["name"] == "temp"
    assert stack.delete(f"/keys/{made['id']}", ROOT).json()["revoked"] is True
    before = stack.job_keys()
    gen = alices["generate"]["id"]
    calls = [*probes(stack, alices), ("POST", "/generate", {"json": {"prompt": "a cat", "steps": 2}}),
             ("GET", "/jobs", {}), ("GET", "/models", {}), ("GET", "/metrics", {}),
             ("GET", "/keys/me", {})]  # fmt: skip
    count = 0
    for headers in ({}, TestKeys.header("ebca_wrong"), TestKeys.header(made["key"])):
        for method, path, kwargs in calls:
            response = httpx.request(method, stack.api_url + path, headers=headers, timeout=10, **kwargs)
            assert response.status_code == 401, (headers, method, path, response.text)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")
            count += 1
    assert count == 3 * len(calls) and stack.job_keys() == before
    assert stack.job(gen, ALICE)["status"] == "succeeded"  # and nothing was canceled
    assert httpx.get(stack.api_url + "/healthz", timeout=10).status_code == 200  # health needs no key


def test_the_submit_rate_is_shared_by_every_api_process(stack: Stack) -> None:
    """A key with the default limits (a bucket of 30, 60 per minute) fires 40 submissions at once at
    two api processes on the same Redis: exactly the bucket's worth get in (give or take the one or
    two tokens that refill while the burst runs), the rest are 429 with Retry-After, and another
    key is not affected."""
    carol = stack.post("/keys", ROOT, json={"name": "carol"}).json()
    limits = carol["limits"]
    second, second_url = stack.launch_api(name="api-2")
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def fire(i: int) -> None:
        url = stack.api_url if i % 2 else second_url
        response = httpx.post(f"{url}/generate", json={"prompt": "a cat", "steps": 2},
                              headers=TestKeys.header(carol["key"]), timeout=30)  # fmt: skip
        with lock:
            results.append(response)

    try:
        threads = [threading.Thread(target=fire, args=(i,)) for i in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        bob = stack.post("/generate", BOB, json={"prompt": "a dog", "steps": 2})
        assert bob.status_code == 202  # another key's bucket is its own
    finally:
        second.stop()
    accepted = [r for r in results if r.status_code == 202]
    refused = [r for r in results if r.status_code == 429]
    assert len(accepted) + len(refused) == 40, [r.status_code for r in results]
    # One token refills per second (60 per minute); the burst takes well under 3 s on this machine.
    assert limits["burst"] <= len(accepted) <= limits["burst"] + 3, len(accepted)
    for response in refused:
        assert response.json()["error"]["code"] == "rate_limited"
        assert response.headers["ratelimit-remaining"] == "0" and response.headers["ratelimit-limit"] == "30"
        assert 1 <= int(response.headers["retry-after"]) <= 60 / limits["rate_per_minute"] + 1
    remaining = sorted(int(r.headers["ratelimit-remaining"]) for r in accepted)
    assert remaining[0] == 0 and remaining[-1] == limits["burst"] - 1
    # Exactly the accepted submissions became jobs of carol's (cancelled now: nothing needs to run).
    listed = stack.get("/jobs", ROOT, params={"owner": carol["id"], "limit": 100}).json()["jobs"]
    assert sorted(job["id"] for job in listed) == sorted(r.json()["id"] for r in accepted)
    for job in listed:
        stack.delete(f"/jobs/{job['id']}", ROOT)
