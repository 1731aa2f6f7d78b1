"""Job handles: polling with backoff, outcomes, downloads, uploads (httpx.MockTransport)."""

from __future__ import annotations

import hashlib
import io
import json
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sdk_fakes import FakeAPI, Fault, png_bytes

from ebca_client import (
    AsyncClient,
    Client,
    EditSpec,
    EnergySpec,
    ImageRef,
    IntegrityError,
    InvalidArgumentError,
    JobCanceled,
    JobFailed,
    JobInfo,
    JobNotFinished,
    JobTimeout,
    RetryPolicy,
    ScheduleSpec,
)

FAST = RetryPolicy(max_retries=3, backoff_initial=0.001, backoff_max=0.01)


def running(step: int, total: int = 4) -> dict[str, object]:
    return {
        "status": "running",
        "queue_position": None,
        "progress": {"stage": "denoising", "step": step, "total": total},
    }


def multipart_parts(request: httpx.Request) -> dict[str, tuple[dict[str, str], bytes]]:
    """Parse a multipart body into name -> (headers, payload) with the stdlib MIME parser."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + request.content)
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        parts[name] = (dict(part.items()), part.get_payload(decode=True))
    return parts


@pytest.fixture
def api() -> FakeAPI:
    return FakeAPI()


@pytest.fixture
def client(api: FakeAPI) -> Client:
    with Client("http://api.test", retry=FAST, transport=api.transport()) as c:
        yield c


def test_generate_body_sends_only_given_fields(api: FakeAPI, client: Client) -> None:
    energy = EnergySpec(
        gamma_attn=0.01,
        gamma_norm=0.02,
        token_weights={"crown": 2.5},
        schedule=ScheduleSpec(kind="step", tau=0.5),
    )
    client.generate(
        "a lion",
        steps=5,
        seed=0,
        energy=energy,
        edits=["monet painting", EditSpec(prompt="crown", alpha=1.3, direction="not")],
    )
    body = json.loads(api.seen[0].content)
    assert body == {
        "prompt": "a lion",
        "steps": 5,
        "seed": 0,
        "energy": {
            "gamma_attn": 0.01,
            "gamma_norm": 0.02,
            "schedule": {"kind": "step", "tau": 0.5},
            "token_weights": {"crown": 2.5},
        },
        "edits": [
            {"prompt": "monet painting"},  # a bare string leaves the edit options to the server
            {"prompt": "crown", "alpha": 1.3, "direction": "not", "gamma_norm": 0.0},  # None: not sent
        ],
    }


def test_wait_polls_until_succeeded_and_reports_each_update(api: FakeAPI, client: Client) -> None:
    job = client.generate("a cat")
    api.script(job.id, running(1), running(1), running(3), api.succeeded(job.id))
    updates: list[JobInfo] = []
    assert job.wait(timeout=10, poll_interval=0.001, on_update=updates.append) is job
    assert job.status == "succeeded"
    assert [u.status for u in updates] == ["queued", "running", "running", "running", "succeeded"]
    assert [u.progress.step for u in updates] == [0, 1, 1, 3, 4]


def test_wait_backs_off_while_nothing_changes(
    api: FakeAPI, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = client.generate("a cat")
    api.script(job.id, *([running(1)] * 6), running(2), api.succeeded(job.id))
    sleeps: list[float] = []
    monkeypatch.setattr("ebca_client.client.time.sleep", sleeps.append)
    job.wait(poll_interval=0.1, max_poll_interval=0.3)
    # queued (new) 0.1, running(1) new 0.1, unchanged: 0.15, 0.225, 0.3 (cap), 0.3, 0.3; running(2) new 0.1
    assert sleeps == pytest.approx([0.1, 0.1, 0.15, 0.225, 0.3, 0.3, 0.3, 0.1])


def test_wait_timeout_raises_job_timeout_with_last_record(api: FakeAPI, client: Client) -> None:
    job = client.generate("a cat")
    api.script(job.id, running(2))
    with pytest.raises(JobTimeout) as info:
        job.wait(timeout=0.2, poll_interval=0.01)
    assert info.value.job.status == "running" and info.value.job.progress.step == 2
    assert info.value.timeout == 0.2
    assert "still running after 0.2s" in str(info.value)


def test_wait_raises_job_failed_with_error(api: FakeAPI, client: Client) -> None:
    job = client.generate("a cat")
    failure = {"status": "failed", "error": {"code": "invalid_input", "message": "unknown word 'crwn'"}}
    api.script(job.id, failure)
    with pytest.raises(JobFailed) as info:
        job.wait(timeout=5, poll_interval=0.001)
    assert info.value.code == "invalid_input"
    assert "unknown word 'crwn'" in str(info.value)
    assert job.wait(timeout=5, raise_on_failure=False).status == "failed"


def test_cancel_then_wait_raises_job_canceled(api: FakeAPI, client: Client) -> None:
    job = client.generate("a cat")
    job.cancel()
    assert job.status == "canceled"
    with pytest.raises(JobCanceled):
        job.wait(timeout=1)
    with pytest.raises(JobCanceled):
        job.images()


def test_images_before_finish_is_a_clear_error(client: Client) -> None:
    job = client.generate("a cat")
    with pytest.raises(JobNotFinished, match="call wait"):
        job.save(".")


def test_save_and_images_download_and_verify(api: FakeAPI, client: Client, tmp_path: Path) -> None:
    job = client.generate("a cat", num_images=2)
    api.script(job.id, api.succeeded(job.id, images=2))
    job.wait(timeout=5, poll_interval=0.001)
    paths = job.save(tmp_path / "out")
    assert [p.name for p in paths] == [f"{job.id}-0.png", f"{job.id}-1.png"]
    assert all(p.read_bytes() == api.image for p in paths)
    images = job.images()
    assert [im.size for im in images] == [(8, 8), (8, 8)]
    assert images[0].getpixel((0, 0)) == (200, 30, 30)
    with pytest.raises(IndexError):
        job.image_bytes(5)


def test_digest_mismatch_is_detected(api: FakeAPI, client: Client, tmp_path: Path) -> None:
    api.corrupt_digest = True
    job = client.generate("a cat")
    api.script(job.id, api.succeeded(job.id))
    job.wait(timeout=5, poll_interval=0.001)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        job.save(tmp_path)


def test_inpaint_uploads_path_bytes_and_pil_as_multipart(
    api: FakeAPI, client: Client, tmp_path: Path
) -> None:
    image_path = tmp_path / "cat.png"
    image_path.write_bytes(png_bytes((1, 2, 3)))
    mask = Image.new("L", (8, 8), 0)
    client.edit_inpaint(image_path, mask, "teddy bear", steps=3, energy={"gamma_attn": 0.025})
    parts = multipart_parts(api.seen[0])
    request = json.loads(parts["request"][1])
    assert request == {"mode": "inpaint", "prompt": "teddy bear", "steps": 3, "energy": {"gamma_attn": 0.025}}
    assert parts["image"][1] == image_path.read_bytes()
    assert 'filename="cat.png"' in parts["image"][0]["Content-Disposition"]
    assert Image.open(io.BytesIO(parts["mask"][1])).getpixel((0, 0)) == 0
    assert parts["mask"][0]["Content-Type"] == "image/png"

    client.edit_real(png_bytes(), "a photo of a cat", ["monet painting"], inversion={"regularize": True})
    parts = multipart_parts(api.seen[1])
    assert json.loads(parts["request"][1])["inversion"] == {"regularize": True}
    assert parts["image"][1] == png_bytes()


def test_multipart_retry_is_byte_identical(api: FakeAPI, client: Client) -> None:
    api.faults.append(Fault("drop_after"))
    client.edit_real(png_bytes(), "a photo", ["snow"])
    first, second = api.requests_to("POST", "/edit")
    assert first.content == second.content
    assert first.headers["content-type"] == second.headers["content-type"]
    assert len(api.jobs) == 1


def test_image_refs_are_sent_as_json_references(api: FakeAPI, client: Client) -> None:
    client.edit_inpaint(ImageRef(job_id="j1"), ImageRef(job_id="j2", index=1), "a hat")
    request = api.seen[0]
    assert request.headers["content-type"] == "application/json"
    body = json.loads(request.content)
    assert body["image_ref"] == {"job_id": "j1", "index": 0}
    assert body["mask_ref"] == {"job_id": "j2", "index": 1}


def test_synthetic_takes_a_job_or_an_id(api: FakeAPI, client: Client) -> None:
    source = client.generate("a cat")
    client.edit_synthetic(source, [EditSpec(prompt="snow", alpha=0.5)], output_format="jpeg")
    client.edit_synthetic(source.id, ["snow"])
    bodies = [json.loads(r.content) for r in api.requests_to("POST", "/edit")]
    assert bodies[0]["source_job_id"] == bodies[1]["source_job_id"] == source.id
    assert bodies[0]["output_format"] == "jpeg" and bodies[0]["edits"][0]["alpha"] == 0.5


def test_unreadable_upload_is_an_argument_error_and_sends_nothing(
    api: FakeAPI, client: Client, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        client.edit_inpaint(tmp_path / "missing.png", png_bytes(), "x")
    assert info.value.field == "image"
    with pytest.raises(InvalidArgumentError) as info:
        client.edit_inpaint(png_bytes(), 12345, "x")
    assert info.value.field == "mask"
    assert api.seen == []


async def test_async_job_wait_and_save(api: FakeAPI, tmp_path: Path) -> None:
    async with AsyncClient("http://api.test", retry=FAST, transport=api.async_transport()) as client:
        job = await client.generate("a cat")
        api.script(job.id, running(2), api.succeeded(job.id))
        await job.wait(timeout=5, poll_interval=0.001)
        paths = await job.save(tmp_path)
        images = await job.images()
        again = await client.get_job(job.id)
    assert paths[0].read_bytes() == api.image
    assert hashlib.sha256(paths[0].read_bytes()).hexdigest() == again.info.images[0].sha256
    assert images[0].size == (8, 8)


async def test_async_timeout_and_cancel(api: FakeAPI) -> None:
    async with AsyncClient("http://api.test", retry=FAST, transport=api.async_transport()) as client:
        job = await client.generate("a cat")
        api.script(job.id, running(1))
        with pytest.raises(JobTimeout):
            await job.wait(timeout=0.1, poll_interval=0.01)
        canceled = await client.cancel(job)
    assert canceled.status == "canceled"


def test_download_follows_redirect_to_presigned_url(tmp_path: Path) -> None:
    """S3 storage: the API answers 307 to a presigned URL on another host; the client follows it
    (without sending its own headers there) and still checks the digest."""
    api = FakeAPI()
    seen_on_s3: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "s3.test":
            seen_on_s3.append(request)
            return httpx.Response(200, content=api.image, headers={"content-type": "image/png"})
        if "/images/" in request.url.path:
            return httpx.Response(
                307, headers={"location": "http://s3.test/bucket/key.png?X-Amz-Signature=abc"}
            )
        return api.handle(request)

    with Client(
        "http://api.test",
        retry=FAST,
        transport=httpx.MockTransport(handler),
        headers={"Authorization": "Bearer t"},
    ) as client:
        job = client.generate("a cat")
        api.script(job.id, api.succeeded(job.id))
        job.wait(timeout=5, poll_interval=0.001)
        (path,) = job.save(tmp_path)
    assert path.read_bytes() == api.image
    (s3_request,) = seen_on_s3
    assert s3_request.url.params["X-Amz-Signature"] == "abc"
    assert "authorization" not in s3_request.headers


def test_record_fields_read_off_the_handle(api: FakeAPI, client: Client) -> None:
    job = client.generate("a cat")
    failure = {"status": "failed", "error": {"code": "out_of_memory", "message": "CUDA OOM"}}
    api.script(job.id, failure)
    assert job.wait(timeout=5, poll_interval=0.001, raise_on_failure=False) is job
    assert (job.kind, job.status, job.error.code, job.result) == ("generate", "failed", "out_of_memory", None)
    assert job.progress.total == 4 and job.request == {"prompt": "a cat"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = job.nope


def test_webhook_fields_go_into_every_submit_body(api: FakeAPI, client: Client) -> None:
    hook = {"webhook": "https://hooks.example/ebca", "webhook_events": ("completed",)}
    source = client.generate("a cat", **hook)
    client.edit_synthetic(source, ["snow"], **hook)
    client.generate("a dog")  # left out: no webhook
    bodies = [json.loads(r.content) for r in api.seen if r.method == "POST"]
    assert [b.get("webhook") for b in bodies] == ["https://hooks.example/ebca"] * 2 + [None]
    assert [b.get("webhook_events") for b in bodies] == [["completed"]] * 2 + [None]
