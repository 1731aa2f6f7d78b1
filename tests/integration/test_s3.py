"""The S3 backend end to end against a real S3-protocol server (moto_server) on loopback."""

from __future__ import annotations

import hashlib
import io
import json
from typing import TYPE_CHECKING

import httpx
import pytest
from PIL import Image

if TYPE_CHECKING:
    from conftest import Stack

from conftest import S3_BUCKET, S3_PREFIX

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_generate_and_edit_store_in_s3_and_download_presigned(s3_stack: Stack) -> None:
    stack = s3_stack
    with stack.client() as client:
        response = client.post(
            "/generate", json={"prompt": "a red circle", "steps": 3, "seed": 9, "num_images": 2}
        )
        assert response.status_code == 202, response.text
        job = stack.wait_job(response.json()["id"])
        assert job["status"] == "succeeded", job
        for image in job["result"]["images"]:
            # The object sits in the bucket under the prefix and the job's deterministic key.
            key = f"{S3_PREFIX}/jobs/{job['id']}/{image['index']}.png"
            head = stack.s3.head_object(Bucket=S3_BUCKET, Key=key)  # type: ignore[attr-defined]
            assert head["ContentType"] == "image/png"
            # The api redirects to a presigned URL on the S3 server; the URL alone downloads it.
            redirect = client.get(image["url"], follow_redirects=False)
            assert redirect.status_code == 307
            url = redirect.headers["location"]
            assert url.startswith(stack.env["EBCA_S3_ENDPOINT_URL"]) and "X-Amz-Signature=" in url
            data = httpx.get(url, timeout=10).content
            assert hashlib.sha256(data).hexdigest() == image["sha256"]
            assert Image.open(io.BytesIO(data)).size == (32, 32)

        # An upload goes to the bucket too, and an edit by reference reads it back from there.
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (50, 200, 50)).save(buf, format="PNG")
        request = {
            "mode": "real",
            "source_prompt": "a photo",
            "edits": [{"prompt": "monet painting"}],
            "steps": 2,
        }
        edit = client.post(
            "/edit",
            data={"request": json.dumps(request)},
            files={"image": ("x.png", buf.getvalue(), "image/png")},
        )
        assert edit.status_code == 202, edit.text
        edited = stack.wait_job(edit.json()["id"])
        assert edited["status"] == "succeeded", edited
        stored = stack.s3.get_object(  # type: ignore[attr-defined]
            Bucket=S3_BUCKET, Key=f"{S3_PREFIX}/jobs/{edited['id']}/inputs/image.png"
        )["Body"].read()
        assert stored == buf.getvalue()
        # Re-running a job's reproduction settings writes new keys for the new job, not extra ones here.
        listed = stack.s3.list_objects_v2(  # type: ignore[attr-defined]
            Bucket=S3_BUCKET, Prefix=f"{S3_PREFIX}/jobs/{job['id']}/"
        )
        assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]) == ["0.png", "1.png"]
