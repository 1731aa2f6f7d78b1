"""API keys: their format, how they are stored (hashes only), their roles and limits (docs/DEPLOY.md,
"API keys").

A key is ``ebca_`` + 43 URL-safe characters (256 random bits). The service never stores a key, only
``sha256:<hex>`` of it: a key that random needs no slow hash (nothing can be guessed from its digest),
and a digest lookup is one dictionary or Redis read per request. A key's id (``key_`` + the first 16
hex digits of its digest) names it in job records, logs and the key endpoints; it reveals nothing
that helps to forge the key.

Keys come from three places that work the same way: ``EBCA_API_KEYS`` (JSON), ``EBCA_API_KEYS_FILE``
(the same JSON in a file, re-read when it changes) and keys created at run time by an admin
(``POST /keys``, kept in Redis so every api replica knows them). The JSON is a list of entries::

    [{"name": "alice", "role": "user", "hash": "sha256:9f86d0...", "limits": {"rate_per_minute": 30}}]

``limits`` overrides the service's defaults per field; a field given as ``null`` means "no limit".
``python -m api.keys create NAME`` makes a key, prints it once and prints (or writes) its entry.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

Role = Literal["user", "admin"]
KeySource = Literal["env", "file", "api"]

KEY_PREFIX = "ebca_"
HASH_PREFIX = "sha256:"
#: The owner of jobs made while EBCA_AUTH=off (one trusted user: it owns and sees everything).
ANONYMOUS = "anonymous"


class KeyLimits(BaseModel):
    """Per-key overrides of the service's quotas. A field left out takes the service default (for a
    user key; admin keys have none unless their entry sets one); ``null`` means no limit."""

    model_config = ConfigDict(extra="forbid")

    rate_per_minute: float | None = Field(
        None, gt=0, le=1e6, description="Submits per minute, refilled continuously (token bucket)."
    )
    burst: int | None = Field(None, ge=1, le=100_000, description="Submits allowed at once (bucket size).")
    max_active_jobs: int | None = Field(None, ge=1, le=1_000_000, description="Jobs queued + running.")
    max_images_per_day: int | None = Field(
        None, ge=1, le=100_000_000, description="Images submitted per UTC day."
    )


class Limits(BaseModel):
    """The limits that apply to one key (None: unlimited)."""

    model_config = ConfigDict(frozen=True)

    rate_per_minute: float | None
    burst: int | None
    max_active_jobs: int | None
    max_images_per_day: int | None

    @classmethod
    def resolve(cls, overrides: KeyLimits, defaults: Limits) -> Limits:
        """``defaults`` with the fields ``overrides`` sets (a set ``null`` means unlimited)."""
        values = defaults.model_dump()
        values.update({name: getattr(overrides, name) for name in overrides.model_fields_set})
        return cls(**values)


UNLIMITED = Limits(rate_per_minute=None, burst=None, max_active_jobs=None, max_images_per_day=None)


class ApiKeyEntry(BaseModel):
    """One configured key (never the key itself: its digest)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=100, description="Who or what the key is for.")
    role: Role = Field("user", description="user: own jobs only; admin: every job, keys and metrics.")
    hash: str = Field(..., description="sha256:<64 hex digits> of the key.")
    limits: KeyLimits = Field(default_factory=KeyLimits, description="Overrides of the default limits.")
    created_at: str | None = Field(None, description="When the key was made (ISO 8601 UTC).")

    _name = field_validator("name")(lambda value: _check_name(value))

    @field_validator("hash")
    @classmethod
    def _digest(cls, value: str) -> str:
        digest = value.removeprefix(HASH_PREFIX)
        if not value.startswith(HASH_PREFIX) or len(digest) != 64 or not _is_hex(digest):
            raise ValueError("must be 'sha256:' and 64 lower-case hex digits (python -m api.keys hash)")
        return value

    @property
    def id(self) -> str:
        return key_id(self.hash)


class KeyInfo(BaseModel):
    """A key as the key endpoints show it: no digest, no key."""

    id: str = Field(..., description="The key's id (owner of its jobs).")
    name: str
    role: Role
    source: KeySource = Field(..., description="env (EBCA_API_KEYS), file (EBCA_API_KEYS_FILE) or api.")
    limits: Limits = Field(..., description="The limits in force (null: unlimited).")
    created_at: str | None = None
    revoked: bool = False


class NewKey(KeyInfo):
    """The answer to POST /keys: the only time the key itself is shown."""

    key: str = Field(..., description="The API key; shown once, store it now.")


class KeyCreate(BaseModel):
    """Body of POST /keys."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., min_length=1, max_length=100, description="Who or what the key is for.")
    role: Role = Field("user", description="user or admin.")
    limits: KeyLimits = Field(default_factory=KeyLimits, description="Overrides of the default limits.")

    _name = field_validator("name")(lambda value: _check_name(value))


class Caller(BaseModel):
    """Who sent a request: the key's id (None with EBCA_AUTH=off), name, role and limits."""

    model_config = ConfigDict(frozen=True)

    id: str | None
    name: str
    role: Role
    limits: Limits

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def owner(self) -> str:
        """The owner recorded on the jobs this caller creates."""
        return self.id or ANONYMOUS

    def may_see(self, owner: str | None) -> bool:
        """Whether a job owned by ``owner`` exists for this caller (admins: every job)."""
        return self.is_admin or (owner or ANONYMOUS) == self.owner


def _check_name(value: str) -> str:
    if not value.isprintable() or not value.strip():
        raise ValueError("must be printable and not blank")
    return value


def _is_hex(value: str) -> bool:
    return all(c in "0123456789abcdef" for c in value)


def new_key() -> str:
    """A fresh API key: 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def key_id(digest: str) -> str:
    return "key_" + digest.removeprefix(HASH_PREFIX)[:16]


_ENTRIES: TypeAdapter[list[ApiKeyEntry]] = TypeAdapter(list[ApiKeyEntry])


class KeyConfigError(ValueError):
    """EBCA_API_KEYS or the keys file is not a valid key list (the message names where and why)."""


def parse_entries(text: str, where: str) -> list[ApiKeyEntry]:
    """The key entries of a JSON list (``where`` names the setting or file in errors)."""
    if not text.strip():
        return []
    try:
        entries = _ENTRIES.validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        raise KeyConfigError(f"{where}: {loc + ': ' if loc else ''}{first['msg']}") from None
    seen: set[str] = set()
    for entry in entries:
        if entry.hash in seen:
            raise KeyConfigError(f"{where}: the key of {entry.name!r} is listed twice")
        seen.add(entry.hash)
    return entries


def dump_entries(entries: list[ApiKeyEntry], compact: bool = False) -> str:
    """The JSON list of ``entries`` (for the keys file; ``compact``: one line, for EBCA_API_KEYS)."""
    data: list[dict[str, Any]] = [
        entry.model_dump(mode="json", exclude_none=True, exclude={"limits"})
        | ({"limits": entry.limits.model_dump(exclude_unset=True)} if entry.limits.model_fields_set else {})
        for entry in entries
    ]
    if compact:
        return json.dumps(data, separators=(",", ":"))
    return json.dumps(data, indent=2) + "\n"
