"""SDK and CLI against the real stack on loopback: uvicorn API, private Redis, a Celery worker
subprocess and the tiny models (fixture ``stack`` in conftest.py)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from sdk_proxy import DroppingProxy
from testkeys import TestKeys

from ebca_client import (
    APIError,
    AsyncClient,
    AsyncJob,
    Client,
    EditSpec,
    EnergySpec,
    ImageRef,
    Job,
    JobCanceled,
    JobTimeout,
    RetryPolicy,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

STEPS = 3
WAIT = 120.0
FAST_RETRY = RetryPolicy(max_retries=3, backoff_initial=0.05, backoff_max=0.2)
EBCA = str(Path(sys.executable).with_name("ebca"))


def scene() -> Image.Image:
    image = Image.new("RGB", (32, 32), (20, 60, 160))
    ImageDraw.Draw(image).ellipse((6, 6, 22, 22), fill=(220, 40, 40))
    return image


def mask_png() -> bytes:
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 23, 23), fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_downloads(job: Job, images: list[Image.Image], paths: list[Path], count: int) -> None:
    assert job.status == "succeeded"
    records = job.info.images
    assert len(records) == len(images) == len(paths) == count
    for record, image, path in zip(records, images, paths, strict=True):
        assert image.size == (record.width, record.height) == (32, 32)
        assert path.name == f"{job.id}-{record.index}.png"
        with Image.open(path) as saved:
            assert saved.format == "PNG" and saved.size == (32, 32)


def test_sync_client_generate_and_every_edit_mode(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with Client(stack.url, api_key=stack.key) as client:
        energy = EnergySpec(gamma_attn=0.01, gamma_norm=0.02, token_weights={"circle": 2.5})
        gen = client.generate(
            "a red circle and a blue square", steps=STEPS, seed=11, num_images=2, energy=energy
        )
        assert gen.status == "queued" and gen.info.kind == "generate"
        gen.wait(timeout=WAIT, poll_interval=0.1)
        assert [img.seed for img in gen.info.images] == [11, 12]
        assert gen.info.request["energy"]["token_weights"] == {"circle": 2.5}
        assert_downloads(gen, gen.images(), gen.save(tmp_path / "gen"), 2)

        image_file = tmp_path / "scene.png"
        scene().save(image_file)
        inpaint = client.edit_inpaint(scene(), mask_png(), "a teddy bear", steps=STEPS, seed=1)
        real = client.edit_real(
            image_file, "a photo of a cat", [EditSpec(prompt="monet painting", alpha=0.8)], steps=STEPS
        )
        from_ref = client.edit_inpaint(ImageRef(job_id=gen.id, index=1), mask_png(), "a star", steps=STEPS)
        synthetic = client.edit_synthetic(gen, ["monet painting"])
        # Synthetic edits re-run the source's prompt, seed and settings, num_images included (docs/API.md).
        jobs = (
            (inpaint, "inpaint", 1),
            (real, "real", 1),
            (from_ref, "inpaint", 1),
            (synthetic, "synthetic", 2),
        )
        for job, mode, count in jobs:
            job.wait(timeout=WAIT, poll_interval=0.1)
            assert job.info.mode == mode
            assert_downloads(job, job.images(), job.save(tmp_path / job.id), count)
        assert [img.seed for img in synthetic.info.images] == [11, 12]
        ref = from_ref.info.request["image_ref"]
        assert (ref["job_id"], ref["index"]) == (gen.id, 1)
        assert client.get_job(real.id).info.status == "succeeded"


async def test_async_client_generate_and_every_edit_mode(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async with AsyncClient(stack.url, api_key=stack.key) as client:
        models = {m.id: m.default for m in await client.models()}
        assert models["tiny-inpaint"] is False and sum(models.values()) == 1
        gen = await client.generate("a cat wearing a crown", steps=STEPS, seed=5, edits=["van gogh painting"])
        assert isinstance(gen, AsyncJob)
        await gen.wait(timeout=WAIT, poll_interval=0.1)
        inpaint = await client.edit_inpaint(
            scene(),
            mask_png(),
            "a teddy bear",
            model="tiny-inpaint",
            steps=STEPS,
            energy={"gamma_attn": 0.025},
        )
        real = await client.edit_real(
            scene(), "a photo of a cat", ["snow"], steps=STEPS, inversion={"regularize": True}
        )
        synthetic = await client.edit_synthetic(
            gen.id, [EditSpec(prompt="crown", direction="not", alpha=0.5)]
        )
        for job in (gen, inpaint, real, synthetic):
            await job.wait(timeout=WAIT, poll_interval=0.1)
            paths = await job.save(tmp_path / job.id)
            images = await job.images()
            assert [im.size for im in images] == [(32, 32)]
            assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert inpaint.info.request["model"] == "tiny-inpaint"
        assert synthetic.info.images[0].seed == 5


def test_cancel_and_wait_timeout(stack) -> None:  # type: ignore[no-untyped-def]
    with Client(stack.url, api_key=stack.key) as client:
        slow = client.generate("a dog", steps=200, num_images=4, seed=1)
        with pytest.raises(JobTimeout) as timeout:
            slow.wait(timeout=0.5, poll_interval=0.1)
        assert timeout.value.job.status in ("queued", "running")
        assert not timeout.value.job.is_terminal

        queued = client.generate("a cat", steps=200, num_images=4, seed=2)
        # `queued` waits behind `slow` (one worker): canceling it now means it never starts.
        assert client.cancel(queued).status == "canceled"
        canceled = client.cancel(slow)
        assert canceled.status == "canceled" or canceled.info.cancel_requested
        with pytest.raises(JobCanceled):
            slow.wait(timeout=WAIT, poll_interval=0.1)
        assert slow.status == "canceled" and slow.info.result is None
        final = client.get_job(queued.id).info
        assert final.status == "canceled" and final.started_at is None
        # Canceling a job that finished some other way is the server's 409, surfaced as APIError.
        done = client.generate("a star", steps=1).wait(timeout=WAIT)
        with pytest.raises(APIError) as conflict:
            client.cancel(done)
        assert conflict.value.status == 409 and conflict.value.code == "conflict"


async def test_async_wait_timeout_and_cancel(stack) -> None:  # type: ignore[no-untyped-def]
    async with AsyncClient(stack.url, api_key=stack.key) as client:
        slow = await client.generate("a boat on a lake", steps=200, num_images=4)
        with pytest.raises(JobTimeout):
            await slow.wait(timeout=0.3, poll_interval=0.05)
        await client.cancel(slow)
        with pytest.raises(JobCanceled):
            await slow.wait(timeout=WAIT, poll_interval=0.1)


def test_api_errors_surface_with_the_servers_message(stack) -> None:  # type: ignore[no-untyped-def]
    before = stack.job_count()
    with Client(stack.url, api_key=stack.key) as client:
        with pytest.raises(APIError) as bad_steps:
            client.generate("a cat", steps=0)
        err = bad_steps.value
        assert (err.status, err.code, err.field) == (422, "validation_error", "steps")
        assert "greater than or equal to 1" in err.message
        assert err.body["error"]["message"] == err.message

        with pytest.raises(APIError) as bad_edit:
            client.edit_real(scene(), "a photo", [EditSpec(prompt="x", alpha=2.0, direction="not")])
        assert bad_edit.value.status == 422 and bad_edit.value.field == "edits"

        with pytest.raises(APIError) as missing:
            client.get_job("f" * 32)
        assert missing.value.status == 404 and missing.value.code == "not_found"
    assert stack.job_count() == before


def test_submit_retried_after_dropped_connection_creates_one_job(stack) -> None:  # type: ignore[no-untyped-def]
    proxy = DroppingProxy(int(stack.url.rsplit(":", 1)[1]), drop=1)
    before = stack.job_count()
    try:
        with Client(proxy.url, retry=FAST_RETRY, api_key=stack.key) as client:
            job = client.generate("a red square", steps=STEPS, seed=3)
            job.wait(timeout=WAIT, poll_interval=0.1)
    finally:
        proxy.close()
    # The first attempt reached the API and created the job; its answer was lost on the way back.
    (dropped,) = proxy.dropped_requests
    (lost,) = proxy.swallowed_responses
    assert dropped.startswith(b"POST /generate ")
    assert lost.startswith(b"HTTP/1.1 202")
    lost_job = json.loads(lost.partition(b"\r\n\r\n")[2])
    # The retry carried the same Idempotency-Key and got that same job back, not a second one.
    assert lost_job["id"] == job.id
    assert stack.job_count() == before + 1
    assert job.status == "succeeded"


async def test_async_submit_retried_after_dropped_connection(stack) -> None:  # type: ignore[no-untyped-def]
    proxy = DroppingProxy(int(stack.url.rsplit(":", 1)[1]), drop=1)
    before = stack.job_count()
    try:
        async with AsyncClient(proxy.url, retry=FAST_RETRY, api_key=stack.key) as client:
            job = await client.edit_real(scene(), "a photo of a cat", ["snow"], steps=STEPS)
    finally:
        proxy.close()
    lost_job = json.loads(proxy.swallowed_responses[0].partition(b"\r\n\r\n")[2])
    assert lost_job["id"] == job.id
    assert stack.job_count() == before + 1
    with Client(stack.url, api_key=stack.key) as client:
        client.get_job(job.id).wait(timeout=WAIT, poll_interval=0.1)


def run_cli(stack, *argv: str) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [EBCA, "--url", stack.url, *argv], capture_output=True, text=True, timeout=180, env=stack.env
    )


def test_cli_against_the_stack(stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    gen = run_cli(
        stack, "generate", "a lion with a crown", "--gamma-attn", "0.01", "--gamma-norm", "0.02",
        "--weight", "crown=2.5", "--steps", str(STEPS), "--seed", "9", "-o", str(out),
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    (png,) = gen.stdout.split()
    job_id = Path(png).stem.rsplit("-", 1)[0]
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (32, 32)
    assert "succeeded: 1 image(s)" in gen.stderr

    got = run_cli(stack, "--json", "jobs", "get", job_id)
    assert got.returncode == 0
    record = json.loads(got.stdout)
    assert record["status"] == "succeeded" and record["request"]["energy"]["token_weights"] == {"crown": 2.5}

    synthetic = run_cli(
        stack, "--json", "edit", "synthetic", job_id, "--edit", "van gogh;alpha=0.7", "-o", str(out)
    )
    assert synthetic.returncode == 0, synthetic.stderr
    assert len(json.loads(synthetic.stdout)["files"]) == 1

    inpaint = run_cli(
        stack, "edit", "inpaint", f"job:{job_id}", str(_write(tmp_path / "m.png", mask_png())), "a crown",
        "--steps", str(STEPS), "-o", str(out),
    )  # fmt: skip
    assert inpaint.returncode == 0, inpaint.stderr

    rejected = run_cli(stack, "generate", "a cat", "--steps", "500")
    assert rejected.returncode == 3
    assert rejected.stderr.startswith("ebca: API error 422 validation_error: steps:")
    assert rejected.stderr.count("\n") == 1

    conflict = run_cli(stack, "jobs", "cancel", job_id)
    assert conflict.returncode == 3 and "409 conflict" in conflict.stderr

    models = run_cli(stack, "models")
    assert models.returncode == 0 and "tiny-inpaint" in models.stdout and "(default)" in models.stdout


def test_cli_keys_and_job_list_against_the_stack(stack) -> None:  # type: ignore[no-untyped-def]
    root = ("--api-key", TestKeys.root)
    me = run_cli(stack, "keys", "me")  # the key from EBCA_API_KEY (alice)
    assert me.returncode == 0 and " user  alice  [" in me.stdout, me.stderr
    denied = run_cli(stack, "keys", "list")
    assert denied.returncode == 3 and "API error 403 forbidden" in denied.stderr

    made = run_cli(stack, *root, "--json", "keys", "create", "dave", "--rate", "5", "--max-active", "2")
    assert made.returncode == 0, made.stderr
    dave = json.loads(made.stdout)
    assert dave["key"].startswith("ebca_") and dave["limits"]["rate_per_minute"] == 5.0
    listed = run_cli(stack, *root, "keys", "list")
    assert f"{dave['id']}  user" in listed.stdout and "dave" in listed.stdout
    as_dave = ("--api-key", dave["key"])
    job_id = run_cli(stack, *as_dave, "generate", "a cat", "--steps", "2", "--no-wait").stdout.strip()
    assert job_id in run_cli(stack, *as_dave, "jobs", "list").stdout
    assert job_id not in run_cli(stack, "jobs", "list").stdout  # alice does not see dave's job
    assert job_id in run_cli(stack, *root, "jobs", "list").stdout  # the admin sees every job
    alone = run_cli(stack, "jobs", "get", job_id)
    assert alone.returncode == 3 and "404 not_found" in alone.stderr

    revoked = run_cli(stack, *root, "keys", "revoke", dave["id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    locked = run_cli(stack, *as_dave, "keys", "me")
    assert locked.returncode == 3 and "the API key was not accepted" in locked.stderr


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
