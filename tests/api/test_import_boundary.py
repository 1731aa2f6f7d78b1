from __future__ import annotations

import subprocess
import sys


def test_api_imports_no_torch_core_or_worker() -> None:
    code = (
        "import sys, api.main\n"
        "names = ('torch', 'diffusers', 'transformers', 'ebca_core', 'worker')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"api.main imported {out.stdout.strip()}"
