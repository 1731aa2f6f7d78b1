#!/bin/sh
# Entry point of the GPU worker image: fetch the default model if it is a hub id, give this container
# one GPU of its own, then run the command.
#
# Hub model: when EBCA_DEFAULT_MODEL is a hub id (owner/name, not an existing path) and
# HF_HUB_OFFLINE is not 1, it is downloaded into $HF_HOME (a volume) before the worker starts, with
# the same file selection as loading it, so the first job does not wait for it. A failed download is
# reported and the worker starts anyway (jobs on that model then fail with model_not_found).
#
# `docker compose up --scale worker=N` starts N identical containers, and Docker hands every one of
# them the same first GPU when each reserves `count: 1`. So each worker container sees all GPUs and
# claims one here: it takes an exclusive flock on /run/ebca-gpus/gpu<i>.lock (a volume shared by the
# replicas on one host) for the first free i, keeps that lock open for its whole life (the descriptor
# is inherited by the exec'ed command; the kernel drops it when the container stops) and sets
# CUDA_VISIBLE_DEVICES=i. More replicas than GPUs: the extra ones exit with a clear message.
#
# Skipped when CUDA_VISIBLE_DEVICES is already set or EBCA_GPU_PICK=0.
set -eu

LOCK_DIR="${EBCA_GPU_LOCK_DIR:-/run/ebca-gpus}"

prefetch_model() {
  model="${EBCA_DEFAULT_MODEL:-}"
  [ "${HF_HUB_OFFLINE:-0}" = "1" ] && return 0
  [ -e "$model" ] && return 0
  # A hub id is exactly owner/name; anything else (absolute or deeper paths) is a directory.
  printf '%s\n' "$model" | grep -Eq '^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$' || return 0
  echo "ebca-worker: fetching $model from the hub into ${HF_HOME:-the Hugging Face cache}" >&2
  if ! python -c 'import sys; from diffusers import DiffusionPipeline; DiffusionPipeline.download(sys.argv[1])' "$model"; then
    echo "ebca-worker: warning: could not fetch $model; jobs on it will fail with model_not_found" >&2
  fi
}
prefetch_model

if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] || [ "${EBCA_GPU_PICK:-1}" = "0" ]; then
  exec "$@"
fi

if command -v nvidia-smi >/dev/null 2>&1; then
  count="$(nvidia-smi -L | grep -c '^GPU ' || true)"
else
  count="$(python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
fi
if [ "${count:-0}" -eq 0 ]; then
  echo "ebca-worker: no GPU visible in this container; starting without pinning" >&2
  exec "$@"
fi

mkdir -p "$LOCK_DIR"
i=0
while [ "$i" -lt "$count" ]; do
  # fd 9 stays open across exec, so the lock lives exactly as long as the worker does.
  exec 9>"$LOCK_DIR/gpu$i.lock"
  if flock -n 9; then
    export CUDA_VISIBLE_DEVICES="$i"
    echo "ebca-worker: using GPU $i of $count" >&2
    exec "$@"
  fi
  i=$((i + 1))
done
echo "ebca-worker: all $count GPUs are taken by other worker containers; scale workers to at most $count" >&2
exit 1
