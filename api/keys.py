"""Make API keys without a running service: ``python -m api.keys create NAME [--admin] [--file F]``.

This is how the first (admin) key of a deployment comes to be: it prints the new key once and, with
``--file``, adds its entry (the key's digest, never the key) to the keys file that EBCA_API_KEYS_FILE
names; without ``--file`` it prints the entry for EBCA_API_KEYS. Once the api runs, admins make more
keys with ``ebca keys create`` (POST /keys). Reads no settings and talks to no Redis.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from ebca_common.jobs import iso_utc
from ebca_common.keys import (
    ApiKeyEntry,
    KeyConfigError,
    KeyLimits,
    dump_entries,
    hash_key,
    new_key,
    parse_entries,
)


def _limits(args: argparse.Namespace) -> KeyLimits:
    given = {
        "rate_per_minute": args.rate,
        "burst": args.burst,
        "max_active_jobs": args.max_active,
        "max_images_per_day": args.images_per_day,
    }
    return KeyLimits(**{name: value for name, value in given.items() if value is not None})


def _write(path: Path, entries: list[ApiKeyEntry]) -> None:
    """Replace the file at once (a reader never sees half of it), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(dump_entries(entries))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create(args: argparse.Namespace) -> int:
    key = new_key()
    entry = ApiKeyEntry(name=args.name, role="admin" if args.admin else "user", hash=hash_key(key),
                        limits=_limits(args), created_at=iso_utc(time.time()))  # fmt: skip
    if args.file:
        path = Path(args.file)
        existing = parse_entries(path.read_text(encoding="utf-8"), str(path)) if path.exists() else []
        _write(path, [*existing, entry])
    if args.quiet:
        print(key)
        return 0
    print(f"API key for {entry.name!r} ({entry.role}, id {entry.id}); it is shown only now:\n  {key}")
    if args.file:
        print(f"its entry was added to {args.file} (point EBCA_API_KEYS_FILE at it)")
    else:
        print("its entry, for EBCA_API_KEYS (a JSON list: join the entries of several keys in one):")
        print(f"  EBCA_API_KEYS='{dump_entries([entry], compact=True)}'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m api.keys", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("create", help="make a key; print it once and its entry")
    make.add_argument("name", help="who or what the key is for")
    make.add_argument("--admin", action="store_true", help="an admin key (every job, keys, metrics)")
    make.add_argument("--file", help="add the entry to this keys file (EBCA_API_KEYS_FILE)")
    make.add_argument("--rate", type=float, help="submits per minute (default: EBCA_KEY_RATE_PER_MINUTE)")
    make.add_argument("--burst", type=int, help="submits at once (default: EBCA_KEY_BURST)")
    make.add_argument("--max-active", type=int, help="jobs queued + running (EBCA_KEY_MAX_ACTIVE_JOBS)")
    make.add_argument("--images-per-day", type=int, help="images per UTC day (EBCA_KEY_MAX_IMAGES_PER_DAY)")
    make.add_argument("--quiet", action="store_true", help="print only the key")
    make.set_defaults(run=create)
    digest = commands.add_parser(
        "hash", help="print the digest of an existing key (for a hand-written entry)"
    )
    digest.add_argument("key")
    digest.set_defaults(run=lambda a: print(hash_key(a.key)) or 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (KeyConfigError, ValueError, OSError) as exc:
        print(f"api.keys: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
