"""Job submission behind the HTTP layer: validation that needs the store, uploads, idempotency, enqueue.

Everything here is synchronous (Redis and boto3 clients); the FastAPI handlers run it in a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from api.quotas import Quotas
from ebca_common.errors import ObjectNotFound, Unavailable, ValidationFailed
from ebca_common.images import check_image_size, check_mask, decode_image
from ebca_common.jobs import Job, JobStatus, WebhookSpec
from ebca_common.keys import Caller
from ebca_common.refs import resolve_ref
from ebca_common.settings import Settings
from ebca_common.specs import (
    CONTENT_TYPES,
    GenerateRequest,
    ImageRef,
    InpaintRequest,
    RealEditRequest,
    SyntheticEditRequest,
    check_limits,
    parse_edit,
    parse_generate,
)
from ebca_common.storage import Storage
from ebca_common.store import JobStore


class Publisher(Protocol):
    """Hands a job id to the workers (ebca_common.queueing.CeleryPublisher; tests use fakes)."""

    def publish(self, job_id: str) -> None: ...


@dataclass
class Upload:
    """A file part of a multipart request, already read (size-checked) into memory."""

    data: bytes
    filename: str | None = None


@dataclass
class Submission:
    job: Job
    created: bool
    #: RateLimit-* fields describing the caller's submit bucket (api/quotas.py).
    headers: dict[str, str] = field(default_factory=dict)


def fingerprint(endpoint: str, body: Any, uploads: dict[str, Upload] | None = None) -> str:
    """What "the same request" means for Idempotency-Key: the endpoint, the JSON (key order and
    whitespace ignored) and the digests of any uploaded files."""
    digest = hashlib.sha256()
    digest.update(endpoint.encode())
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(uploads or {}):
        digest.update(name.encode())
        digest.update(hashlib.sha256(uploads[name].data).digest())  # type: ignore[index]
    return digest.hexdigest()


def _known_total(request: GenerateRequest | InpaintRequest | RealEditRequest) -> int:
    """Denoising steps of the whole job, 0 while unknown: null steps take the model's default, which
    the worker resolves when it starts the job (ebca_common.model_defaults)."""
    return 0 if request.steps is None else request.steps


class JobService:
    def __init__(self, settings: Settings, store: JobStore, storage: Storage, publisher: Publisher) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.publisher = publisher
        self.quotas = Quotas(store)

    # -- helpers ---------------------------------------------------------------------------------------
    def _fill_model(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("model") is None:
            data["model"] = self.settings.default_model_id
        return data

    def _submit(
        self,
        *,
        caller: Caller,
        kind: str,
        mode: str | None,
        request: dict[str, Any],
        total_steps: int,
        images: int,
        job_id: str,
        idempotency_key: str | None,
        fp: str,
        plan: dict[str, Any] | None = None,
        inputs: dict[str, str] | None = None,
        before_publish: Callable[[], None] | None = None,
        webhook: WebhookSpec | None = None,
    ) -> Submission:
        """Take the caller's quota, create the job, run ``before_publish`` (store its uploads), then
        queue it. If any step after the quota fails, what was taken is given back and the job removed
        again: a client never sees a job that cannot run, and a refused request changes nothing
        (Redis down: nothing at all)."""
        idempotency = (idempotency_key, fp) if idempotency_key else None
        # The webhook is the job's, not the request's: the stored request (and each image's settings)
        # reproduces images and must not re-notify anyone when replayed.
        request.pop("webhook", None)
        request.pop("webhook_events", None)
        request["timeout_seconds"] = self._timeout(request.get("timeout_seconds"))
        reservation = self.quotas.reserve(caller, job_id, images)
        try:
            job, created = self.store.create(
                kind=kind,
                mode=mode,
                request=request,
                total_steps=total_steps,
                plan=plan,
                inputs=inputs,
                job_id=job_id,
                idempotency=idempotency,
                timeout_seconds=request["timeout_seconds"],
                owner=caller.owner,
                webhook=webhook,
            )
        except Exception:
            self.quotas.release(reservation)
            raise
        if not created:  # an identical request with this Idempotency-Key won the race
            self.quotas.release(reservation)
            return Submission(job, created)
        try:
            if before_publish is not None:
                before_publish()
            self.publisher.publish(job.id)
        except Exception:
            # The job was never queued: remove it so no client ever sees a job that cannot run.
            self.store.discard(job.id, idempotency_key, caller.owner)
            self.quotas.release(reservation)
            for key in (inputs or {}).values():
                try:
                    self.storage.delete(key)
                except Exception:  # best effort: the refusal below is what the client needs
                    pass
            raise
        with contextlib.suppress(Unavailable):  # the grace just runs from the creation instead
            self.store.mark_published(job.id)
        return Submission(job, created, reservation.headers)

    def _timeout(self, value: int | None) -> int:
        """A request's timeout_seconds (validated by specs.check_limits), EBCA_JOB_TIMEOUT_SECONDS if none."""
        return self.settings.job_timeout_seconds if value is None else value

    def _replay(self, caller: Caller, idempotency_key: str | None, fp: str) -> Submission | None:
        """Answer a retried request before doing any work (uploads, quota) for it."""
        if not idempotency_key:
            return None
        job = self.store.lookup_idempotent(idempotency_key, fp, caller.owner)
        return Submission(job, False) if job else None

    # -- POST /generate ----------------------------------------------------------------------------------
    def generate(self, body: Any, idempotency_key: str | None, caller: Caller) -> Submission:
        request = parse_generate(body)
        check_limits(request, self.settings)
        fp = fingerprint("/generate", body)
        replay = self._replay(caller, idempotency_key, fp)
        if replay:
            return replay
        data = self._fill_model(request.model_dump(mode="json"))
        return self._submit(
            caller=caller,
            kind="generate",
            mode=None,
            request=data,
            total_steps=_known_total(request),
            images=request.num_images,
            job_id=uuid.uuid4().hex,
            idempotency_key=idempotency_key,
            fp=fp,
            webhook=request.webhook_spec(),
        )

    # -- POST /edit ------------------------------------------------------------------------------------
    def edit(
        self, body: Any, uploads: dict[str, Upload], idempotency_key: str | None, caller: Caller
    ) -> Submission:
        request = parse_edit(body)
        check_limits(request, self.settings)
        fp = fingerprint("/edit", body, uploads)
        unknown = sorted(set(uploads) - {"image", "mask"})
        if unknown:
            raise ValidationFailed(
                f"{unknown[0]}: unexpected file part (send image and/or mask)", field=unknown[0]
            )
        replay = self._replay(caller, idempotency_key, fp)
        if replay:
            return replay
        job_id = uuid.uuid4().hex
        if isinstance(request, SyntheticEditRequest):
            if uploads:
                name = sorted(uploads)[0]
                raise ValidationFailed(f"{name}: mode synthetic takes no uploaded files", field=name)
            return self._synthetic(request, job_id, idempotency_key, fp, caller)
        if isinstance(request, RealEditRequest) and "mask" in uploads:
            raise ValidationFailed("mask: mode real takes no mask", field="mask")
        data = self._fill_model(request.model_dump(mode="json"))
        inputs: dict[str, str] = {}
        image = self._input_image(caller, request.image_ref, uploads.get("image"), "image", job_id, data,
                                  inputs)  # fmt: skip
        if isinstance(request, InpaintRequest):
            mask = self._input_image(caller, request.mask_ref, uploads.get("mask"), "mask", job_id, data,
                                     inputs)  # fmt: skip
            check_mask(image, mask)
        return self._submit(
            caller=caller,
            kind="edit",
            mode=request.mode,
            request=data,
            total_steps=_known_total(request),
            images=request.num_images,
            job_id=job_id,
            idempotency_key=idempotency_key,
            fp=fp,
            inputs={name: key for name, (key, _fmt) in inputs.items()},
            before_publish=lambda: self._store_inputs(inputs, uploads),
            webhook=request.webhook_spec(),
        )

    def _input_image(
        self,
        caller: Caller,
        ref: ImageRef | None,
        upload: Upload | None,
        name: str,
        job_id: str,
        data: dict[str, Any],
        inputs: dict[str, Any],
    ) -> Image.Image:
        """Check an input given by upload xor by reference; point ``data`` at where it will be stored."""
        ref_field = f"{name}_ref"
        if upload is not None and ref is not None:
            raise ValidationFailed(
                f"{name}: give either an uploaded {name} or {ref_field}, not both", field=name
            )
        if upload is not None:
            image, fmt = decode_image(upload.data, name, self.settings.max_image_pixels)
            if name == "image":
                check_image_size(image, name)
            key = f"jobs/{job_id}/inputs/{name}.{fmt}"
            inputs[name] = (key, fmt)
            # The stored request references the stored upload, so it (and each image's settings) can be
            # replayed without the original file.
            data[ref_field] = {"job_id": job_id, "index": 0, "input": name}
            return image
        if ref is None:
            raise ValidationFailed(
                f"{name}: required (upload a file part {name!r} or give {ref_field})", field=name
            )
        key = resolve_ref(self.store, ref, ref_field, caller.may_see)
        try:
            stored = self.storage.get(key)
        except ObjectNotFound:
            # The record outlived its files (deleted from the bucket, or a storage lifecycle rule).
            raise ValidationFailed(
                f"{ref_field}.job_id: the image of job {ref.job_id!r} is no longer stored",
                field=f"{ref_field}.job_id",
            ) from None
        image, _ = decode_image(stored, name, self.settings.max_image_pixels)
        return image

    def _store_inputs(self, inputs: dict[str, Any], uploads: dict[str, Upload]) -> None:
        for name, (key, fmt) in inputs.items():
            self.storage.put(key, uploads[name].data, CONTENT_TYPES.get(fmt, "application/octet-stream"))

    def _synthetic(
        self, request: SyntheticEditRequest, job_id: str, idempotency_key: str | None, fp: str, caller: Caller
    ) -> Submission:
        source = self.store.record(request.source_job_id)
        if source is None or not caller.may_see(source.owner):
            raise ValidationFailed(
                f"source_job_id: job {request.source_job_id!r} not found", field="source_job_id"
            )
        if source.kind != "generate":
            raise ValidationFailed(
                f"source_job_id: job {request.source_job_id!r} is a {source.kind} job, not generate",
                field="source_job_id",
            )
        if source.status != JobStatus.SUCCEEDED or source.result is None:
            raise ValidationFailed(
                f"source_job_id: job {request.source_job_id!r} is {source.status.value}, not succeeded",
                field="source_job_id",
            )
        plan_data = dict(source.request)
        # Same prompt, seed and settings as the source (its drawn seed if it had none), new edits.
        plan_data["seed"] = source.result.images[0].seed
        plan_data["edits"] = [edit.model_dump(mode="json") for edit in request.edits]
        plan_data["output_format"] = request.output_format or source.request["output_format"]
        plan_data["timeout_seconds"] = self._timeout(request.timeout_seconds)
        plan = parse_generate(plan_data)
        check_limits(plan, self.settings)
        data = request.model_dump(mode="json")
        data["output_format"] = plan.output_format
        return self._submit(
            caller=caller,
            kind="edit",
            mode="synthetic",
            request=data,
            total_steps=_known_total(plan),
            images=plan.num_images,
            job_id=job_id,
            idempotency_key=idempotency_key,
            fp=fp,
            plan=plan.model_dump(mode="json"),
            webhook=request.webhook_spec(),
        )
