from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from ebca_common.errors import ObjectNotFound, ValidationFailed
from ebca_common.images import check_mask, decode_image, encode_image
from ebca_common.storage import LocalStorage, check_key


def png(size: tuple[int, int], mode: str = "RGB", color: int | tuple[int, ...] = 0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_checks() -> None:
    image, fmt = decode_image(png((16, 24)), "image", 1000)
    assert image.size == (16, 24) and fmt == "png"
    for data, reason in [
        (b"", "empty"),
        (b"GIF89a garbage", "not a decodable"),
        (png((40, 40)), "over the limit"),
    ]:
        with pytest.raises(ValidationFailed, match=reason) as info:
            decode_image(data, "mask", 1000)
        assert info.value.field == "mask"
    with pytest.raises(ValidationFailed, match="too small"):
        decode_image(png((4, 4)), "image", 1000)
    # Truncated data: the header is fine, the pixels are not.
    with pytest.raises(ValidationFailed, match="not a decodable"):
        decode_image(png((64, 64), color=(1, 2, 3))[:60], "image", 10_000)


@pytest.mark.parametrize(
    ("side", "reason"), [(3000, "over the limit"), (20000, "too large to decode safely")]
)
def test_decompression_bomb_is_refused_from_the_header(side: int, reason: str) -> None:
    # One-colour PNGs compress to almost nothing; they are refused from the header, before decoding:
    # by our pixel limit, or (far beyond it) by PIL's own bomb check, reported the same way.
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 2_000_000
    with pytest.raises(ValidationFailed, match=reason) as info:
        decode_image(buf.getvalue(), "image", 2048 * 2048)
    assert info.value.field == "image"


def test_mask_checks() -> None:
    image = Image.new("RGB", (16, 16))
    mask = Image.new("L", (16, 16), 0)
    with pytest.raises(ValidationFailed, match="no pixel is white"):
        check_mask(image, mask)
    with pytest.raises(ValidationFailed, match="every pixel"):
        check_mask(image, Image.new("L", (16, 16), 200))
    with pytest.raises(ValidationFailed, match="differs"):
        check_mask(image, Image.new("L", (8, 16), 255))
    mask.paste(255, (0, 0, 4, 4))
    check_mask(image, mask)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_encode_is_deterministic(fmt: str) -> None:
    image = Image.effect_noise((24, 16), 40).convert("RGB")
    data, content_type = encode_image(image, fmt)
    assert encode_image(image, fmt)[0] == data
    assert content_type == f"image/{fmt}"
    assert Image.open(io.BytesIO(data)).format == fmt.upper()


def test_local_storage_overwrites_and_rejects_escapes(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put("jobs/a/0.png", b"one", "image/png")
    store.put("jobs/a/0.png", b"two", "image/png")
    assert store.get("jobs/a/0.png") == b"two"
    assert store.exists("jobs/a/0.png") and not store.exists("jobs/a/1.png")
    assert sorted(p.name for p in (tmp_path / "jobs" / "a").iterdir()) == ["0.png"]  # no temp files left
    assert store.presigned_url("jobs/a/0.png") is None
    with pytest.raises(ObjectNotFound):
        store.get("jobs/a/1.png")
    store.delete("jobs/a/0.png")
    store.delete("jobs/a/0.png")  # absent is fine
    assert not store.exists("jobs/a/0.png")
    for key in ("../x", "/etc/passwd", "jobs//x", "jobs/./x", ""):
        with pytest.raises(ValueError):
            check_key(key)


def test_presigned_urls_are_signed_for_the_public_endpoint() -> None:
    from ebca_common.settings import Settings
    from ebca_common.storage import S3Storage

    settings = Settings(
        storage_url="s3://bucket/prefix",
        s3_endpoint_url="http://minio:9000",
        s3_public_url="http://localhost:9000",
        aws_access_key_id="key",
        aws_secret_access_key="secret",
    )
    url = S3Storage.from_settings(settings).presigned_url("jobs/a/0.png")
    assert url is not None and url.startswith("http://localhost:9000/bucket/prefix/jobs/a/0.png?")
    same = S3Storage.from_settings(settings.model_copy(update={"s3_public_url": None}))
    assert (same.presigned_url("jobs/a/0.png") or "").startswith("http://minio:9000/bucket/")
