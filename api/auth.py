"""Who is calling: API keys (``Authorization: Bearer <key>``), their roles, and the jobs they may see.

The key ring answers "which key is this?" from the configured keys (EBCA_API_KEYS, EBCA_API_KEYS_FILE)
and the keys admins made at run time (Redis ``{p}:keys``: digest -> entry, so every api replica knows
them); revocations are a Redis set of key ids that applies to keys of every source
(``{p}:keys:revoked``). The FastAPI dependencies below are the only place the api decides who a
request is and whether it may see a job (docs/API.md, "API keys and ownership").
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
import time
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ebca_common.errors import Forbidden, NotFound, Unauthorized, Unavailable
from ebca_common.jobs import JobRecord, iso_utc
from ebca_common.keys import (
    ANONYMOUS,
    UNLIMITED,
    ApiKeyEntry,
    Caller,
    KeyCreate,
    KeyInfo,
    KeySource,
    Limits,
    NewKey,
    hash_key,
    key_id,
    new_key,
    parse_entries,
)
from ebca_common.settings import Settings, resolve_path
from ebca_common.store import JobStore, redis_errors

log = logging.getLogger("ebca.api")

#: How often the keys file is checked for changes (a revoked or added key takes effect this fast).
FILE_CHECK_SECONDS = 1.0

#: The one caller of an api running with EBCA_AUTH=off: a trusted single user who sees every job.
OPEN_CALLER = Caller(id=None, name=ANONYMOUS, role="admin", limits=UNLIMITED)


class KeyRing:
    """The keys the api accepts. Thread-safe (FastAPI runs the auth dependency in its threadpool)."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.r = store.r
        self.k = store.k
        #: Raises KeyConfigError on a malformed EBCA_API_KEYS: the api must not start with it.
        self._env = {e.hash: e for e in parse_entries(settings.api_keys, "EBCA_API_KEYS")}
        self._file_path = resolve_path(settings.api_keys_file) if settings.api_keys_file else None
        self._file: dict[str, ApiKeyEntry] = {}
        self._file_stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if self._file_path is not None:
            self._load_file(strict=True)

    # -- sources -----------------------------------------------------------------------------------------
    def _load_file(self, strict: bool = False) -> None:
        """(Re-)read the keys file when it changed. At start-up a bad file stops the api (``strict``);
        later, a bad edit keeps the keys last read and says why in the log."""
        assert self._file_path is not None
        try:
            stat = os.stat(self._file_path)
            stamp = (stat.st_mtime, stat.st_size)
            if stamp == self._file_stamp:
                return
            with open(self._file_path, encoding="utf-8") as fh:
                entries = parse_entries(fh.read(), f"EBCA_API_KEYS_FILE {self._file_path}")
        except (OSError, ValueError) as exc:
            if strict:
                raise
            log.error("keys file not reloaded, keeping the keys read before: %s", exc)
            return
        self._file = {e.hash: e for e in entries}
        self._file_stamp = stamp

    def _static(self, digest: str) -> tuple[ApiKeyEntry, KeySource] | None:
        if self._file_path is not None and time.monotonic() - self._checked >= FILE_CHECK_SECONDS:
            with self._lock:
                if time.monotonic() - self._checked >= FILE_CHECK_SECONDS:
                    self._load_file()
                    self._checked = time.monotonic()
        if digest in self._env:
            return self._env[digest], "env"
        if digest in self._file:
            return self._file[digest], "file"
        return None

    def configured(self) -> int:
        """How many keys exist (configured and made at run time)."""
        with redis_errors():
            return len(self._env) + len(self._file) + int(self.r.hlen(self.k("keys")))

    # -- requests -------------------------------------------------------------------------------------------
    def authenticate(self, key: str) -> Caller | None:
        """The caller a key stands for; None for an unknown or revoked key."""
        digest = hash_key(key)
        found = self._static(digest)
        try:
            with redis_errors(), self.r.pipeline(transaction=False) as pipe:
                pipe.hget(self.k("keys"), digest)
                pipe.sismember(self.k("keys", "revoked"), key_id(digest))
                runtime, revoked = pipe.execute()
        except Unavailable:
            if found is None:
                raise
            # Redis is away: a configured key still opens what works without it (/metrics reports the
            # outage); its revocation cannot be read now, and every job route needs Redis anyway.
            return self.caller(found[0])
        if found is None and runtime is not None:
            found = ApiKeyEntry.model_validate_json(runtime), "api"
        if found is None or revoked:
            return None
        return self.caller(found[0])

    def caller(self, entry: ApiKeyEntry) -> Caller:
        defaults = self.settings.default_limits if entry.role == "user" else UNLIMITED
        limits = Limits.resolve(entry.limits, defaults)
        return Caller(id=entry.id, name=entry.name, role=entry.role, limits=limits)

    # -- management (admin) -------------------------------------------------------------------------------
    def create(self, spec: KeyCreate) -> NewKey:
        key = new_key()
        entry = ApiKeyEntry(name=spec.name, role=spec.role, hash=hash_key(key), limits=spec.limits,
                            created_at=iso_utc(time.time()))  # fmt: skip
        with redis_errors():
            self.r.hset(self.k("keys"), entry.hash, entry.model_dump_json(exclude_unset=True))
        return NewKey(**self._info(entry, "api", revoked=False).model_dump(), key=key)

    def entries(self) -> list[KeyInfo]:
        """Every key, configured ones first, then the ones made at run time (oldest first)."""
        with redis_errors():
            runtime = self.r.hgetall(self.k("keys"))
            revoked = self.r.smembers(self.k("keys", "revoked"))
        self._static("")  # refresh the file
        found: list[tuple[ApiKeyEntry, KeySource]] = [(e, "env") for e in self._env.values()]
        found += [(e, "file") for e in self._file.values()]
        made = sorted((ApiKeyEntry.model_validate_json(v) for v in runtime.values()),
                      key=lambda e: e.created_at or "")  # fmt: skip
        found += [(e, "api") for e in made]
        return [self._info(entry, source, entry.id in revoked) for entry, source in found]

    def revoke(self, key_id: str) -> KeyInfo:
        """Revoke a key of any source (its jobs stay; the key no longer authenticates)."""
        for info in self.entries():
            if info.id == key_id:
                with redis_errors():
                    self.r.sadd(self.k("keys", "revoked"), key_id)
                return info.model_copy(update={"revoked": True})
        raise NotFound(f"key {key_id!r} not found")

    def _info(self, entry: ApiKeyEntry, source: KeySource, revoked: bool) -> KeyInfo:
        limits = self.caller(entry).limits
        return KeyInfo(id=entry.id, name=entry.name, role=entry.role, source=source, limits=limits,
                       created_at=entry.created_at, revoked=revoked)  # fmt: skip


def startup_warnings(settings: Settings, keyring: KeyRing) -> None:
    """Say at start-up what an operator must know about access: auth off, or no key to get in with."""
    if settings.auth == "off":
        log.warning(
            "EBCA_AUTH=off: every client is trusted and sees every job, with no quota; use it only for "
            "a single user on a private network (docs/DEPLOY.md, API keys)"
        )
        return
    try:
        count = keyring.configured()
    except Exception:  # Redis away at start-up: /readyz says so; the keys are read per request anyway
        return
    if count == 0:
        log.warning(
            "no API key is configured, so every request will be refused with 401; make one with "
            "`python -m api.keys create admin --admin --file var/api_keys.json` and start the api with "
            "EBCA_API_KEYS_FILE=var/api_keys.json (docs/DEPLOY.md, API keys)"
        )


# -- FastAPI dependencies ---------------------------------------------------------------------------------
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key as a Bearer token: `Authorization: Bearer ebca_...` (docs/API.md).",
)


def presented_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The API key a request carries: the Bearer token, or the password of HTTP Basic (what AUTOMATIC1111
    clients send for ``--api-auth``; the user name is ignored). The one place a key is read from a
    request (docs/API.md, "API keys and ownership")."""
    if credentials is not None:
        return credentials.credentials
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _user, sep, password = decoded.partition(":")
    return password if sep and password else None


def current_caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> Caller:
    """The calling key; 401 without a valid one. With EBCA_AUTH=off, the one trusted caller."""
    services = request.app.state.services
    if services.settings.auth == "off":
        return OPEN_CALLER
    key = presented_key(request, credentials)
    if key is None:
        raise Unauthorized(
            "missing API key: send the header Authorization: Bearer <key> "
            "(or HTTP Basic with the key as password)"
        )
    caller = services.keyring.authenticate(key)
    if caller is None:
        raise Unauthorized("invalid or revoked API key")
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]


def admin_caller(caller: CallerDep) -> Caller:
    if not caller.is_admin:
        raise Forbidden("this needs an admin API key")
    return caller


AdminDep = Annotated[Caller, Depends(admin_caller)]


def owned_record(job_id: str, caller: CallerDep, request: Request) -> JobRecord:
    """The job ``job_id`` as its owner (or an admin) sees it; 404 for every other caller, the same
    answer as for a job that does not exist, so that ids of other keys' jobs reveal nothing."""
    record = request.app.state.services.store.record(job_id)
    if record is None or not caller.may_see(record.owner):
        raise NotFound(f"job {job_id!r} not found")
    return record


OwnedJob = Annotated[JobRecord, Depends(owned_record)]
