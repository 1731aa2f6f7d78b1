"""ebca_client must stay light: httpx + pydantic, never torch or the service packages."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = (
    "torch",
    "diffusers",
    "transformers",
    "ebca_core",
    "ebca_common",
    "api",
    "worker",
    "celery",
    "redis",
)


def test_importing_the_sdk_and_cli_loads_no_heavy_or_service_package() -> None:
    code = (
        "import json, sys\n"
        "import ebca_client, ebca_client.cli, ebca_client.aio\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    loaded = set(json.loads(out.stdout))
    assert {"ebca_client", "httpx", "pydantic"} <= loaded
    assert not loaded & set(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
    # PIL is imported only when an image is decoded or a PIL image is passed in.
    assert "PIL" not in loaded
