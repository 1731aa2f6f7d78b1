#!/usr/bin/env bash
# Run the project's checks: ruff, the deployment lint, then the whole test suite (unit + integration).
# Everything runs offline on CPU; the integration tests start their own Redis, Celery workers, uvicorn
# and S3 server on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ -x scripts/lint_deploy.sh ]; then scripts/lint_deploy.sh; fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
