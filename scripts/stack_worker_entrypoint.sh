#!/bin/sh
# Entry point of the GPU worker image: give this container one GPU of its own, then run the command.
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
