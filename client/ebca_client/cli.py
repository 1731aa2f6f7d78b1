"""The ``ebca`` command line, a thin layer over the sync SDK.

Exit codes (also in ``ebca --help``):
  0  success
  1  the job failed or was canceled
  2  bad command line or unusable argument (e.g. an unreadable image file)
  3  the API rejected the request (HTTP 4xx: validation error, not found, conflict, ...)
  4  the API could not be reached or answered with a server error (HTTP 5xx)
  5  --timeout passed before the job finished (the job keeps running)
  130 interrupted (Ctrl-C); a submitted job keeps running
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ebca_client.client import Client, Job
from ebca_client.errors import (
    APIError,
    AuthenticationError,
    EBCAClientError,
    InvalidArgumentError,
    JobFailed,
    JobTimeout,
    TransportError,
)
from ebca_client.models import EditSpec, EnergySpec, ImageRef, InversionSpec, JobEvent, JobInfo, ScheduleSpec

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_UNAVAILABLE = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0    success
  1    the job failed or was canceled
  2    bad command line or unusable argument (e.g. an unreadable image file)
  3    the API rejected the request (HTTP 4xx)
  4    the API could not be reached or answered with a server error (HTTP 5xx)
  5    --timeout passed before the job finished (the job keeps running)
  130  interrupted (Ctrl-C); a submitted job keeps running
"""

_EDIT_KEYS: dict[str, type] = {
    "alpha": float,
    "direction": str,
    "alpha_tau": float,
    "gamma_attn": float,
    "gamma_norm": float,
    "gamma_tau": float,
}


class UsageError(Exception):
    """A command-line value that argparse accepted but that does not make sense."""


# ---------------------------------------------------------------------------------------------------
# Parsing helpers


def parse_weight(text: str) -> tuple[str, float]:
    """``crown=2.5`` -> ("crown", 2.5); the key may also be a token index (``5=1.5``)."""
    key, sep, value = text.rpartition("=")
    if not sep or not key.strip():
        raise UsageError(f"--weight expects WORD=WEIGHT, got {text!r}")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise UsageError(f"--weight {text!r}: {value!r} is not a number") from None


def parse_edit(text: str) -> EditSpec:
    """``"monet painting;alpha=1.3;direction=not;alpha_tau=0.2"`` -> EditSpec (options after ';')."""
    prompt, *options = text.split(";")
    if not prompt.strip():
        raise UsageError(f"--edit needs a prompt before any ';' options, got {text!r}")
    fields: dict[str, Any] = {"prompt": prompt.strip()}
    for option in options:
        if not option.strip():
            continue
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep or key not in _EDIT_KEYS:
            known = ", ".join(sorted(_EDIT_KEYS))
            raise UsageError(f"--edit option {option.strip()!r}: expected KEY=VALUE with KEY one of {known}")
        try:
            fields[key] = _EDIT_KEYS[key](value.strip())
        except ValueError:
            raise UsageError(f"--edit option {key}: {value.strip()!r} is not a number") from None
    if fields.get("direction", "and") not in ("and", "not"):
        raise UsageError(f"--edit direction must be 'and' or 'not', got {fields['direction']!r}")
    return EditSpec(**fields)


def parse_schedule(text: str) -> ScheduleSpec:
    """``reverse_step:0.8`` (tau) or ``linear:2`` (ratio) or just ``constant``."""
    kind, _, value = text.partition(":")
    kinds = ("constant", "step", "reverse_step", "linear", "exp")
    if kind not in kinds:
        raise UsageError(f"--schedule kind must be one of {', '.join(kinds)}, got {kind!r}")
    if not value:
        return ScheduleSpec(kind=kind)
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"--schedule {text!r}: {value!r} is not a number") from None
    if kind in ("linear", "exp"):
        return ScheduleSpec(kind=kind, ratio=number)
    return ScheduleSpec(kind=kind, tau=number)


def parse_image(text: str) -> str | ImageRef:
    """A file path, or ``job:ID[:INDEX]`` for an earlier job's output image."""
    if text.startswith("job:"):
        _, job_id, *rest = text.split(":")
        if not job_id:
            raise UsageError(f"image reference {text!r}: expected job:ID or job:ID:INDEX")
        try:
            index = int(rest[0]) if rest else 0
        except ValueError:
            raise UsageError(f"image reference {text!r}: index must be an integer") from None
        return ImageRef(job_id=job_id, index=index)
    return text


def energy_from_args(args: argparse.Namespace) -> EnergySpec | None:
    weights = dict(parse_weight(w) for w in args.weight or [])
    schedule = parse_schedule(args.schedule) if args.schedule else None
    if args.gamma_attn is None and args.gamma_norm is None and not weights and schedule is None:
        return None
    return EnergySpec(
        gamma_attn=args.gamma_attn or 0.0,
        gamma_norm=args.gamma_norm or 0.0,
        schedule=schedule,
        token_weights=weights,
    )


def edits_from_args(args: argparse.Namespace) -> list[EditSpec]:
    return [parse_edit(e) for e in args.edit or []]


# ---------------------------------------------------------------------------------------------------
# Progress display


class ProgressDisplay:
    """One self-overwriting status line on a terminal: queue position, then stage and step i/N."""

    BAR = 24

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled
        self._last = ""
        self._started = time.monotonic()

    @staticmethod
    def describe(info: JobInfo, bar_width: int = BAR) -> str:
        short = info.id[:8]
        if info.status == "queued":
            # queue_position is the 0-based rank among queued jobs, i.e. how many are ahead of this one.
            if info.queue_position is None:
                return f"job {short} queued"
            ahead = "next in line" if info.queue_position == 0 else f"{info.queue_position} ahead"
            return f"job {short} queued ({ahead})"
        if info.status == "running":
            p = info.progress
            if p.stage in ("denoising", "inverting") and p.total > 0:
                done = max(0, min(p.step, p.total))
                filled = round(bar_width * done / p.total)
                bar = "#" * filled + "-" * (bar_width - filled)
                return f"job {short} {p.stage} [{bar}] step {done}/{p.total}"
            return f"job {short} {p.stage}"
        return f"job {short} {info.status}"

    def update(self, info: JobInfo) -> None:
        if not self.enabled:
            return
        text = f"{self.describe(info)}  {time.monotonic() - self._started:5.1f}s"
        if text != self._last:
            # \r + "erase to end of line" keeps one line that is rewritten in place.
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
            self._last = text

    def close(self) -> None:
        if self.enabled and self._last:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._last = ""


# ---------------------------------------------------------------------------------------------------
# Commands


class App:
    def __init__(self, args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> None:
        self.args = args
        self.stdout = stdout
        self.stderr = stderr
        self.client = Client(args.url, api_key=args.api_key)

    def close(self) -> None:
        self.client.close()

    def emit_json(self, value: Any) -> None:
        self.stdout.write(json.dumps(value, indent=2, default=str) + "\n")

    def info_line(self, text: str) -> None:
        if not self.args.quiet:
            self.stderr.write(text + "\n")

    def finish_job(self, job: Job) -> int:
        """Wait (unless --no-wait), save the images, print paths or JSON."""
        if self.args.no_wait:
            if self.args.json:
                self.emit_json({"job": job.info.model_dump(mode="json"), "files": []})
            else:
                self.stdout.write(job.id + "\n")
            return EXIT_OK
        self.info_line(f"job {job.id} submitted")
        return self.wait_and_save(job)

    def wait_and_save(self, job: Job) -> int:
        display = ProgressDisplay(self.stderr, enabled=not self.args.quiet and _isatty(self.stderr))
        started = time.monotonic()
        try:
            job.wait(
                timeout=self.args.timeout, poll_interval=0.25, max_poll_interval=2.0, on_update=display.update
            )
        except KeyboardInterrupt:
            display.close()
            self.stderr.write(
                f"interrupted: job {job.id} continues on the server (stop it: ebca jobs cancel {job.id})\n"
            )
            return EXIT_INTERRUPTED
        finally:
            display.close()
        out_dir = getattr(self.args, "output", None)
        paths = job.save(out_dir) if out_dir is not None else []
        if self.args.json:
            self.emit_json({"job": job.info.model_dump(mode="json"), "files": [str(p) for p in paths]})
        else:
            for path in paths:
                self.stdout.write(f"{path}\n")
        elapsed = time.monotonic() - started
        self.info_line(f"job {job.id} succeeded: {len(job.info.images)} image(s) in {elapsed:.1f}s")
        return EXIT_OK

    def cmd_generate(self) -> int:
        a = self.args
        job = self.client.generate(
            a.prompt,
            negative_prompt=a.negative_prompt,
            model=a.model,
            width=a.width,
            height=a.height,
            steps=a.steps,
            guidance_scale=a.guidance_scale,
            scheduler=a.scheduler,
            num_images=a.num_images,
            seed=a.seed,
            output_format=a.format,
            energy=energy_from_args(a),
            edits=edits_from_args(a) or None,
        )
        return self.finish_job(job)

    def cmd_edit_inpaint(self) -> int:
        a = self.args
        job = self.client.edit_inpaint(
            parse_image(a.image),
            parse_image(a.mask),
            a.prompt,
            negative_prompt=a.negative_prompt,
            model=a.model,
            steps=a.steps,
            guidance_scale=a.guidance_scale,
            scheduler=a.scheduler,
            num_images=a.num_images,
            seed=a.seed,
            output_format=a.format,
            energy=energy_from_args(a),
        )
        return self.finish_job(job)

    def cmd_edit_real(self) -> int:
        a = self.args
        edits = edits_from_args(a)
        if not edits:
            raise UsageError("edit real needs at least one --edit")
        job = self.client.edit_real(
            parse_image(a.image),
            a.source_prompt,
            edits,
            model=a.model,
            steps=a.steps,
            guidance_scale=a.guidance_scale,
            num_images=a.num_images,
            seed=a.seed,
            output_format=a.format,
            energy=energy_from_args(a),
            inversion=InversionSpec(regularize=True) if a.regularize else None,
        )
        return self.finish_job(job)

    def cmd_edit_synthetic(self) -> int:
        a = self.args
        edits = edits_from_args(a)
        if not edits:
            raise UsageError("edit synthetic needs at least one --edit")
        job = self.client.edit_synthetic(a.source_job, edits, output_format=a.format)
        return self.finish_job(job)

    def cmd_jobs_get(self) -> int:
        job = self.client.get_job(self.args.job_id)
        if self.args.json:
            self.emit_json(job.info.model_dump(mode="json"))
        else:
            self.stdout.write(format_job(job.info))
        return EXIT_OK

    def cmd_jobs_cancel(self) -> int:
        job = self.client.cancel(self.args.job_id)
        if self.args.json:
            self.emit_json(job.info.model_dump(mode="json"))
        elif job.status == "canceled":
            self.stdout.write(f"job {job.id} canceled\n")
        else:
            self.stdout.write(f"job {job.id} {job.status}: cancel requested, it stops at the next step\n")
        return EXIT_OK

    def cmd_jobs_wait(self) -> int:
        return self.wait_and_save(self.client.get_job(self.args.job_id))

    def cmd_jobs_events(self) -> int:
        """One line per live event on stdout (JSON lines with --json) until the job is terminal."""
        job = self.client.get_job(self.args.job_id)
        for event in job.events(timeout=self.args.timeout):
            if self.args.json:
                self.stdout.write(event.model_dump_json() + "\n")
            else:
                self.stdout.write(f"{event.id or '-'}  {describe_event(event)}\n")
            self.stdout.flush()
        return EXIT_OK

    def cmd_jobs_list(self) -> int:
        page = self.client.jobs(status=self.args.status, limit=self.args.limit, cursor=self.args.cursor)
        if self.args.json:
            self.emit_json(page.model_dump(mode="json"))
            return EXIT_OK
        for info in page.jobs:
            prompt = (info.request or {}).get("prompt") or (info.request or {}).get("source_prompt") or ""
            self.stdout.write(f"{info.id}  {info.status:<9}  {info.created_at or '':<32}  {prompt[:50]}\n")
        if page.next_cursor:
            self.info_line(f"more: ebca jobs list --cursor {page.next_cursor}")
        return EXIT_OK

    def cmd_keys_create(self) -> int:
        a = self.args
        limits = {"rate_per_minute": a.rate, "burst": a.burst, "max_active_jobs": a.max_active,
                  "max_images_per_day": a.images_per_day}  # fmt: skip
        made = self.client.create_key(
            a.name, admin=a.admin, **{k: v for k, v in limits.items() if v is not None}
        )
        if self.args.json:
            self.emit_json(made.model_dump(mode="json"))
        else:
            self.stdout.write(made.key + "\n")
            self.info_line(f"key {made.id} for {made.name!r} ({made.role}); it is shown only now, store it")
        return EXIT_OK

    def cmd_keys_list(self) -> int:
        keys = self.client.keys()
        if self.args.json:
            self.emit_json([k.model_dump(mode="json") for k in keys])
            return EXIT_OK
        for k in keys:
            state = "revoked" if k.revoked else k.role
            self.stdout.write(f"{k.id}  {state:<7}  {k.source or '':<4}  {k.name}\n")
        return EXIT_OK

    def cmd_keys_revoke(self) -> int:
        info = self.client.revoke_key(self.args.key_id)
        if self.args.json:
            self.emit_json(info.model_dump(mode="json"))
        else:
            self.stdout.write(f"key {info.id} ({info.name}) revoked\n")
        return EXIT_OK

    def cmd_keys_me(self) -> int:
        me = self.client.whoami()
        if self.args.json:
            self.emit_json(me.model_dump(mode="json"))
        else:
            limits = ", ".join(
                f"{k} {'unlimited' if v is None else v}" for k, v in me.limits.model_dump().items()
            )
            self.stdout.write(f"{me.id or '-'}  {me.role}  {me.name}  [{limits}]  auth {me.auth}\n")
        return EXIT_OK

    def cmd_models(self) -> int:
        models = self.client.models()
        if self.args.json:
            self.emit_json({"models": [m.model_dump(mode="json") for m in models]})
        else:
            for m in models:
                shown = ", ".join(f"{k} {v}" for k, v in m.defaults.items() if v is not None)
                self.stdout.write(
                    f"{m.id}{'  (default)' if m.default else ''}{f'  [{shown}]' if shown else ''}\n"
                )
        return EXIT_OK


def describe_event(event: JobEvent) -> str:
    line = ProgressDisplay.describe(JobInfo(id=event.job_id, status=event.status).with_event(event))
    if event.error is not None:
        line += f": {event.error.code}: {event.error.message}"
    elif event.result is not None:
        line += f": {len(event.result.images)} image(s)"
    return line


def format_job(info: JobInfo) -> str:
    lines = [f"id:       {info.id}", f"kind:     {info.kind}{'/' + info.mode if info.mode else ''}"]
    lines.append(f"status:   {info.status}{' (cancel requested)' if info.cancel_requested else ''}")
    if info.status == "queued" and info.queue_position is not None:
        lines.append(f"queue:    position {info.queue_position}")
    p = info.progress
    lines.append(f"progress: {p.stage} {p.step}/{p.total}")
    if info.attempts:
        lines.append(f"attempts: {info.attempts}")
    for label, when in (
        ("created", info.created_at),
        ("started", info.started_at),
        ("finished", info.finished_at),
    ):
        if when is not None:
            lines.append(f"{label + ':':<9} {when.isoformat()}")
    if info.error is not None:
        lines.append(f"error:    {info.error.code}: {info.error.message}")
    for img in info.images:
        lines.append(
            f"image {img.index}:  {img.url}  seed={img.seed} {img.width}x{img.height} {img.content_type}"
        )
    return "\n".join(lines) + "\n"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------
# Argument parser


def _add_common_job_options(p: argparse.ArgumentParser, *, output: bool = True) -> None:
    if output:
        p.add_argument(
            "-o", "--output", default=".", metavar="DIR", help="directory for the images (default .)"
        )
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without waiting")


def _add_sampling_options(p: argparse.ArgumentParser, *, scheduler: bool = True) -> None:
    p.add_argument("--model", help="model id (see `ebca models`); default: the server's default model")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's, see `ebca models`)")
    p.add_argument("-g", "--guidance-scale", type=float, help="classifier-free guidance scale")
    if scheduler:
        p.add_argument(
            "--scheduler", choices=["ddim", "pndm", "euler", "euler_ancestral", "dpm_solver", "lms"]
        )
    p.add_argument("-n", "--num-images", type=int, help="images to make (image i uses seed+i)")
    p.add_argument("--seed", type=int, help="seed of the first image (default: drawn by the worker)")
    p.add_argument("--format", choices=["png", "jpeg", "webp"], help="output image format")


def _add_energy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("energy-based cross-attention")
    g.add_argument("--gamma-attn", type=float, help="attention energy step size (gamma_attn)")
    g.add_argument("--gamma-norm", type=float, help="context norm regularisation (gamma_norm)")
    g.add_argument(
        "--schedule",
        metavar="KIND[:VALUE]",
        help="constant | step:TAU | reverse_step:TAU | linear:RATIO | exp:RATIO",
    )
    g.add_argument(
        "--weight", action="append", metavar="WORD=W", help="token weight, repeatable (word or token index)"
    )


def _add_edit_option(p: argparse.ArgumentParser, *, required_hint: bool) -> None:
    p.add_argument(
        "--edit",
        action="append",
        metavar="PROMPT[;KEY=VALUE...]",
        help="editorial prompt, repeatable; options alpha, direction (and|not), alpha_tau, gamma_attn, "
        "gamma_norm, gamma_tau, e.g. 'monet painting;alpha=1.3;alpha_tau=0.2'"
        + (" (at least one)" if required_hint else ""),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebca",
        description="Client of EBCA Serve: text-to-image generation and editing with energy-based "
        "cross-attention.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", help="API base URL (default: $EBCA_API_URL or http://127.0.0.1:8000)")
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="API key (default: $EBCA_API_KEY; prefer the variable, other users can see a flag in ps)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    parser.add_argument("--timeout", type=float, help="give up waiting for a job after this many seconds")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display or status lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser(
        "generate",
        help="text to image",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("prompt")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    _add_sampling_options(gen)
    _add_energy_options(gen)
    _add_edit_option(gen, required_hint=False)
    _add_common_job_options(gen)
    gen.set_defaults(handler=App.cmd_generate)

    edit = sub.add_parser("edit", help="edit an image: inpaint | real | synthetic")
    edit_sub = edit.add_subparsers(dest="mode", metavar="MODE", required=True)
    image_help = "image file, or job:ID[:INDEX] for an earlier job's output"

    inp = edit_sub.add_parser("inpaint", help="repaint the white part of a mask")
    inp.add_argument("image", help=image_help)
    inp.add_argument("mask", help="mask file (white = repaint), or job:ID[:INDEX]")
    inp.add_argument("prompt")
    inp.add_argument("--negative-prompt")
    _add_sampling_options(inp)
    _add_energy_options(inp)
    _add_common_job_options(inp)
    inp.set_defaults(handler=App.cmd_edit_inpaint)

    real = edit_sub.add_parser("real", help="invert a real image and apply editorial prompts")
    real.add_argument("image", help=image_help)
    real.add_argument("source_prompt", help="a prompt describing the image as it is")
    _add_edit_option(real, required_hint=True)
    real.add_argument("--regularize", action="store_true", help="regularised inversion")
    _add_sampling_options(real, scheduler=False)
    _add_energy_options(real)
    _add_common_job_options(real)
    real.set_defaults(handler=App.cmd_edit_real)

    syn = edit_sub.add_parser("synthetic", help="re-run a generate job with editorial prompts")
    syn.add_argument("source_job", help="id of a succeeded generate job")
    _add_edit_option(syn, required_hint=True)
    syn.add_argument("--format", choices=["png", "jpeg", "webp"])
    _add_common_job_options(syn)
    syn.set_defaults(handler=App.cmd_edit_synthetic)

    jobs = sub.add_parser("jobs", help="list your jobs; inspect, wait for or cancel one")
    jobs_sub = jobs.add_subparsers(dest="action", metavar="ACTION", required=True)
    get = jobs_sub.add_parser("get", help="show a job")
    get.add_argument("job_id")
    get.set_defaults(handler=App.cmd_jobs_get)
    cancel = jobs_sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=App.cmd_jobs_cancel)
    wait = jobs_sub.add_parser("wait", help="wait for a job and save its images")
    wait.add_argument("job_id")
    wait.add_argument("-o", "--output", default=".", metavar="DIR")
    wait.set_defaults(handler=App.cmd_jobs_wait)
    events = jobs_sub.add_parser("events", help="print the job's live events until it ends")
    events.add_argument("job_id")
    events.set_defaults(handler=App.cmd_jobs_events)

    listing = jobs_sub.add_parser("list", help="list your jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "canceled"])
    listing.add_argument("--limit", type=int, default=20, help="jobs per page (1-100)")
    listing.add_argument("--cursor", help="the next page (printed at the end of a full page)")
    listing.set_defaults(handler=App.cmd_jobs_list)

    keys = sub.add_parser("keys", help="API keys: yours, and (admin key) make, list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    keys_sub.add_parser("me", help="show the key this client sends").set_defaults(handler=App.cmd_keys_me)
    create = keys_sub.add_parser("create", help="make a key and print it (once)")
    create.add_argument("name", help="who or what the key is for")
    create.add_argument("--admin", action="store_true", help="an admin key (every job, keys, metrics)")
    create.add_argument("--rate", type=float, help="submits per minute (default: the server's)")
    create.add_argument("--burst", type=int, help="submits at once (default: the server's)")
    create.add_argument("--max-active", type=int, help="jobs queued + running (default: the server's)")
    create.add_argument("--images-per-day", type=int, help="images per UTC day (default: the server's)")
    create.set_defaults(handler=App.cmd_keys_create)
    keys_sub.add_parser("list", help="list every key").set_defaults(handler=App.cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=App.cmd_keys_revoke)

    models = sub.add_parser("models", help="list the models the server offers")
    models.set_defaults(handler=App.cmd_models)

    for command in PASS_THROUGH.values():
        # Everything after the command's name goes to its implementation unparsed (main() splits it
        # off first), so its own options (--port, --help, ...) are not argparse's business.
        sub.add_parser(command.name, help=command.help, add_help=False)
    return parser


@dataclass(frozen=True)
class PassThrough:
    """A subcommand whose arguments go unparsed to an implementation outside this package: a script
    of the source checkout, or a module of the server distribution (ebca-serve) that the torch-free
    client may not have. ``run(args, stderr)`` returns the exit code."""

    name: str
    help: str
    run: Callable[[list[str], TextIO], int]


def server_command(name: str, help: str, module: str) -> PassThrough:
    """A subcommand implemented by ``module.main(argv) -> int`` of the server distribution; where
    only ebca-client is installed it says what to install instead."""

    def run(args: list[str], stderr: TextIO) -> int:
        try:
            implementation = importlib.import_module(module)
        except ImportError:
            stderr.write(
                f"ebca: `ebca {name}` needs the EBCA Serve server package ({module}); install the project "
                "from its checkout (scripts/setup.sh, or pip install -e .), not just ebca-client\n"
            )
            return EXIT_USAGE
        return int(implementation.main(args))

    return PassThrough(name, help, run)


def split_pass_through(
    parser: argparse.ArgumentParser, argv: list[str]
) -> tuple[PassThrough, list[str]] | None:
    """``(command, its arguments)`` when ``argv`` is ``[global options] NAME [arguments]`` for a
    pass-through command NAME."""
    for i, word in enumerate(argv):
        command = PASS_THROUGH.get(word)
        if command is None:
            continue
        try:
            head, _ = parser.parse_known_args(argv[: i + 1])
        except SystemExit:
            return None
        # "serve" as a prompt (ebca generate serve) is not the serve command.
        return (command, argv[i + 1 :]) if head.command == word else None
    return None


def serve_script() -> Path:
    # client/ebca_client/cli.py in a source checkout (an editable install): scripts/ is two levels up.
    return Path(__file__).resolve().parents[2] / "scripts" / "serve.sh"


def run_serve(args: Sequence[str], stderr: TextIO) -> int:
    script = serve_script()
    if not script.is_file():
        stderr.write(
            "ebca: serve runs scripts/serve.sh of a source checkout of EBCA Serve (ebca-client installed "
            f"on its own has none: {script} not found); run it from the checkout\n"
        )
        return EXIT_USAGE
    # exec, not a child process: Ctrl-C and SIGTERM reach serve.sh directly, which stops the stack.
    os.execvp("bash", ["bash", str(script), *args])
    return EXIT_OK  # pragma: no cover - execvp does not return


# The pass-through subcommands by name. A command of the server package joins with
# ``server_command(name, help, "<module with main(argv)>")``.
PASS_THROUGH: dict[str, PassThrough] = {
    command.name: command
    for command in (
        PassThrough(
            "serve",
            "run the local stack (Redis, API, one worker) in the foreground; same as scripts/serve.sh "
            "(options: ebca serve --help)",
            run_serve,
        ),
    )
}


def main(
    argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pass_through = split_pass_through(parser, argv)
    if pass_through is not None:
        command, command_args = pass_through
        return command.run(command_args, stderr)
    args = parser.parse_args(argv)
    try:
        app = App(args, stdout, stderr)
    except (ValueError, EBCAClientError) as exc:
        stderr.write(f"ebca: {_one_line(exc)}\n")
        return EXIT_USAGE
    try:
        return args.handler(app)
    except UsageError as exc:
        stderr.write(f"ebca: {exc}\n")
        return EXIT_USAGE
    except InvalidArgumentError as exc:
        stderr.write(f"ebca: {exc}\n")
        return EXIT_USAGE
    except JobTimeout as exc:
        stderr.write(f"ebca: {exc}; it keeps running (ebca jobs wait {exc.job.id})\n")
        return EXIT_TIMEOUT
    except JobFailed as exc:
        if args.json:
            app.emit_json({"job": exc.job.model_dump(mode="json"), "files": []})
        stderr.write(f"ebca: {exc}\n")
        return EXIT_JOB_FAILED
    except AuthenticationError as exc:
        hint = "the API key was not accepted" if exc.key_sent else "the API requires an API key"
        stderr.write(
            f"ebca: API error 401 {exc.code}: {_one_line(exc.message)}: {hint} "
            "(set EBCA_API_KEY or pass --api-key)\n"
        )
        return EXIT_REJECTED
    except APIError as exc:
        where = f" [field {exc.field}]" if exc.field else ""
        stderr.write(f"ebca: API error {exc.status} {exc.code}: {_one_line(exc.message)}{where}\n")
        return EXIT_UNAVAILABLE if exc.status >= 500 else EXIT_REJECTED
    except TransportError as exc:
        stderr.write(f"ebca: cannot reach the API at {app.client.base_url}: {_one_line(exc)}\n")
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        stderr.write("ebca: interrupted\n")
        return EXIT_INTERRUPTED
    except EBCAClientError as exc:
        stderr.write(f"ebca: {_one_line(exc)}\n")
        return EXIT_JOB_FAILED
    finally:
        app.close()


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
