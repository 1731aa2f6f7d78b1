"""The ``ebca`` command line's arguments: the argparse parser and the helpers that turn option strings
(``--weight``, ``--edit``, ``--schedule``, image references) into the SDK's request models. Each
subcommand names the :class:`ebca_client.cli.App` method that runs it (``handler``)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from ebca_client.models import EditSpec, EnergySpec, ImageRef, ScheduleSpec

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


#: What ``add_subparsers`` returns: subcommands are added to it.
#: (argparse gives it no public name.)
Subcommands = argparse._SubParsersAction


class UsageError(Exception):
    """A command-line value that argparse accepted but that does not make sense."""


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
        "gamma_norm, gamma_tau (alpha, alpha_tau, gamma_attn left out: the model's edit defaults), e.g. "
        "'a blue circle' or 'monet painting;alpha=1.3;alpha_tau=0.2'"
        + (" (at least one)" if required_hint else ""),
    )


def build_parser(pass_through: Iterable[tuple[str, str]] = ()) -> argparse.ArgumentParser:
    """The whole command line. ``pass_through`` names (name, help) the subcommands whose arguments
    go unparsed to their implementation (``ebca serve``)."""
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
    _add_generate(sub)
    _add_edit(sub)
    _add_jobs(sub)
    _add_keys(sub)
    models = sub.add_parser("models", help="list the models the server offers")
    models.set_defaults(handler="cmd_models")
    for name, help_text in pass_through:
        # Everything after the command's name goes to its implementation unparsed (main() splits it
        # off first), so its own options (--port, --help, ...) are not argparse's business.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _add_generate(sub: Subcommands) -> None:
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
    gen.set_defaults(handler="cmd_generate")


def _add_edit(sub: Subcommands) -> None:
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
    inp.set_defaults(handler="cmd_edit_inpaint")

    real = edit_sub.add_parser("real", help="invert a real image and apply editorial prompts")
    real.add_argument("image", help=image_help)
    real.add_argument("source_prompt", help="a prompt describing the image as it is")
    _add_edit_option(real, required_hint=True)
    real.add_argument("--regularize", action="store_true", help="regularised inversion")
    _add_sampling_options(real, scheduler=False)
    _add_energy_options(real)
    _add_common_job_options(real)
    real.set_defaults(handler="cmd_edit_real")

    syn = edit_sub.add_parser("synthetic", help="re-run a generate job with editorial prompts")
    syn.add_argument("source_job", help="id of a succeeded generate job")
    _add_edit_option(syn, required_hint=True)
    syn.add_argument("--format", choices=["png", "jpeg", "webp"])
    _add_common_job_options(syn)
    syn.set_defaults(handler="cmd_edit_synthetic")


def _add_jobs(sub: Subcommands) -> None:
    jobs = sub.add_parser("jobs", help="list your jobs; inspect, wait for or cancel one")
    jobs_sub = jobs.add_subparsers(dest="action", metavar="ACTION", required=True)
    get = jobs_sub.add_parser("get", help="show a job")
    get.add_argument("job_id")
    get.set_defaults(handler="cmd_jobs_get")
    cancel = jobs_sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(handler="cmd_jobs_cancel")
    wait = jobs_sub.add_parser("wait", help="wait for a job and save its images")
    wait.add_argument("job_id")
    wait.add_argument("-o", "--output", default=".", metavar="DIR")
    wait.set_defaults(handler="cmd_jobs_wait")
    events = jobs_sub.add_parser("events", help="print the job's live events until it ends")
    events.add_argument("job_id")
    events.set_defaults(handler="cmd_jobs_events")

    listing = jobs_sub.add_parser("list", help="list your jobs, newest first")
    listing.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "canceled"])
    listing.add_argument("--limit", type=int, default=20, help="jobs per page (1-100)")
    listing.add_argument("--cursor", help="the next page (printed at the end of a full page)")
    listing.set_defaults(handler="cmd_jobs_list")


def _add_keys(sub: Subcommands) -> None:
    keys = sub.add_parser("keys", help="API keys: yours, and (admin key) make, list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    keys_sub.add_parser("me", help="show the key this client sends").set_defaults(handler="cmd_keys_me")
    create = keys_sub.add_parser("create", help="make a key and print it (once)")
    create.add_argument("name", help="who or what the key is for")
    create.add_argument("--admin", action="store_true", help="an admin key (every job, keys, metrics)")
    create.add_argument("--rate", type=float, help="submits per minute (default: the server's)")
    create.add_argument("--burst", type=int, help="submits at once (default: the server's)")
    create.add_argument("--max-active", type=int, help="jobs queued + running (default: the server's)")
    create.add_argument("--images-per-day", type=int, help="images per UTC day (default: the server's)")
    create.set_defaults(handler="cmd_keys_create")
    keys_sub.add_parser("list", help="list every key").set_defaults(handler="cmd_keys_list")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler="cmd_keys_revoke")
