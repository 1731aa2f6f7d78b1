"""Resolving an ``image_ref`` (an earlier job's output or uploaded input) to a storage key."""

from __future__ import annotations

from collections.abc import Callable

from ebca_common.errors import ValidationFailed
from ebca_common.jobs import JobStatus
from ebca_common.specs import ImageRef
from ebca_common.store import JobStore


def resolve_ref(
    store: JobStore, ref: ImageRef, field: str, visible: Callable[[str | None], bool] = lambda _: True
) -> str:
    """The storage key ``ref`` points at; 422 naming ``field`` when it points at nothing, or at a job
    whose owner ``visible`` refuses (the api passes the caller's ``may_see``: another key's job is "not
    found", as everywhere; the worker resolves what the api already checked)."""
    record = store.record(ref.job_id)
    if record is None or not visible(record.owner):
        raise ValidationFailed(f"{field}.job_id: job {ref.job_id!r} not found", field=f"{field}.job_id")
    if ref.input is not None:
        key = record.inputs.get(ref.input)
        if key is None:
            raise ValidationFailed(
                f"{field}.input: job {ref.job_id!r} has no uploaded {ref.input!r}", field=f"{field}.input"
            )
        return key
    if record.status != JobStatus.SUCCEEDED or record.result is None:
        raise ValidationFailed(
            f"{field}.job_id: job {ref.job_id!r} is {record.status.value}, not succeeded",
            field=f"{field}.job_id",
        )
    images = record.result.images
    if ref.index >= len(images):
        raise ValidationFailed(
            f"{field}.index: job {ref.job_id!r} has {len(images)} image(s), no index {ref.index}",
            field=f"{field}.index",
        )
    return images[ref.index].key
