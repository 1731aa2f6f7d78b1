"""Session-wide fixtures: the project's tiny Stable Diffusion models, built once per test session.

Other packages' tests use these fixture names: ``tiny_model_dir`` (SD 1.x layout), ``tiny_sd2_model_dir``
(SD 2.x layout), ``tiny_inpaint_model_dir`` (9-channel SD-inpainting layout) and ``tiny_pipeline`` (a
fresh :class:`ebca_core.EBCAPipeline` on ``tiny_model_dir`` per test, so that a test changing its
scheduler or caches cannot affect another test).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from testkeys import TestKeys

# Tests never touch the network: the hub client must fail fast instead of trying to download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if TYPE_CHECKING:
    from ebca_core.pipeline import EBCAPipeline


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ebca_core.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-sd1") / "model", variant="sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ebca_core.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-sd2") / "model", variant="sd2", seed=0)


@pytest.fixture(scope="session")
def tiny_inpaint_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ebca_core.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-inpaint") / "model", variant="inpaint", seed=0)


@pytest.fixture
def tiny_pipeline(tiny_model_dir: Path) -> EBCAPipeline:
    from ebca_core import load_pipeline

    return load_pipeline(tiny_model_dir, device="cpu")


SHAPES_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes"


@pytest.fixture
def shapes_pipeline() -> EBCAPipeline:
    """The shipped, trained shapes model: for tests whose claim needs a model that learned something."""
    from ebca_core import load_pipeline

    return load_pipeline(SHAPES_MODEL_DIR, device="cpu")


@pytest.fixture(scope="session")
def keys() -> type[TestKeys]:
    return TestKeys


@pytest.fixture
def store_settings(tmp_path: Path):
    """Service settings on the shared Redis (127.0.0.1:6379 db 0) under a key prefix of this test
    alone, whose keys are deleted afterwards; local storage in tmp_path; the :class:`TestKeys`
    configured (auth is required, as by default). Skips without Redis."""
    import uuid

    import redis

    from ebca_common.settings import Settings

    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    prefix = f"ebca-test-{uuid.uuid4().hex[:12]}"
    yield Settings(
        redis_url="redis://127.0.0.1:6379/0",
        key_prefix=prefix,
        storage_url=str(tmp_path / "storage"),
        default_model="models/shapes",
        models={},
        heartbeat_ttl=2.0,
        api_keys=TestKeys.entries_json(),
    )
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
