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

from ebca_client.cli_args import (
    EXIT_CODES_HELP,
    UsageError,
    edits_from_args,
    energy_from_args,
    parse_edit,
    parse_image,
    parse_schedule,
    parse_weight,
)
from ebca_client.cli_args import (
    build_parser as build_arguments,
)
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
from ebca_client.models import InversionSpec, JobEvent, JobInfo

__all__ = [
    "EXIT_CODES_HELP",
    "PASS_THROUGH",
    "App",
    "ProgressDisplay",
    "UsageError",
    "build_parser",
    "main",
    "parse_edit",
    "parse_schedule",
    "parse_weight",
    "split_pass_through",
]

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_UNAVAILABLE = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130

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

    def sampling(self, *, scheduler: bool = True) -> dict[str, Any]:
        """The options of _add_sampling_options and _add_energy_options as SDK keyword arguments."""
        a = self.args
        options = {"model": a.model, "steps": a.steps, "guidance_scale": a.guidance_scale,
                   "num_images": a.num_images, "seed": a.seed, "output_format": a.format,
                   "energy": energy_from_args(a)}  # fmt: skip
        if scheduler:
            options["scheduler"] = a.scheduler
        return options

    def cmd_generate(self) -> int:
        a = self.args
        job = self.client.generate(
            a.prompt,
            negative_prompt=a.negative_prompt,
            width=a.width,
            height=a.height,
            edits=edits_from_args(a) or None,
            **self.sampling(),
        )
        return self.finish_job(job)

    def cmd_edit_inpaint(self) -> int:
        a = self.args
        image, mask = parse_image(a.image), parse_image(a.mask)
        job = self.client.edit_inpaint(
            image, mask, a.prompt, negative_prompt=a.negative_prompt, **self.sampling()
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
            inversion=InversionSpec(regularize=True) if a.regularize else None,
            **self.sampling(scheduler=False),
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


def build_parser() -> argparse.ArgumentParser:
    """The ``ebca`` parser, with this module's pass-through commands."""
    return build_arguments((command.name, command.help) for command in PASS_THROUGH.values())


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
        return int(getattr(app, args.handler)())
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
