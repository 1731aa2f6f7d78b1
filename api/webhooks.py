"""Webhook deliveries (docs/API.md, "Webhooks"): secrets, signatures and the dispatcher.

The job store queues a delivery inside the transaction that changes the job (``{p}:webhooks:msgs``
holds each delivery's fixed body by its webhook-id, ``{p}:webhooks:due`` when it is next due), so a
delivery is never lost and the job never waits for it. Every api process runs a :class:`Dispatcher`
thread: it claims due deliveries atomically (their due time moves a lease ahead, so another replica
does not take them meanwhile; a replica that dies mid-delivery leaves them to be claimed again when
the lease runs out), POSTs them signed per the Standard Webhooks scheme, and on failure schedules the
next try with exponential backoff until EBCA_WEBHOOK_RETRY_SECONDS have passed. At least once: a
receiver drops repeats by ``webhook-id``, the same on every retry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis

from ebca_common.jobs import WebhookSpec
from ebca_common.keys import ANONYMOUS
from ebca_common.settings import Settings
from ebca_common.specs import private_host
from ebca_common.store import JobStore, redis_errors

log = logging.getLogger("ebca.webhooks")

SECRET_PREFIX = "whsec_"
#: Longest wait between two tries of one delivery.
MAX_BACKOFF_SECONDS = 600.0
#: Deliveries in flight per api process (each waits on a receiver at most EBCA_WEBHOOK_TIMEOUT_SECONDS).
CONCURRENCY = 16
#: How often the dispatcher looks for due deliveries.
POLL_SECONDS = 0.2
#: Longest error text kept on the job record.
MAX_ERROR_CHARS = 300

#: Take up to ARGV[3] deliveries due by ARGV[1] and move them to ARGV[2] (the claim's lease).
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""

#: Record a try. KEYS: due set, delivery hash, job hash. ARGV: id, outcome (delivered | failed | retry),
#: next due time, the delivery (retry), the error as JSON (failed, retry). A delivery settled already
#: (two replicas raced past a lease) counts once.
_SETTLE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) return 0 end
local job = redis.call('EXISTS', KEYS[3]) == 1
if ARGV[2] == 'retry' then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
  if job then redis.call('HSET', KEYS[3], 'webhook_last_error', ARGV[5]) end
  return 1
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if job then
  redis.call('HINCRBY', KEYS[3], 'webhook_pending', -1)
  redis.call('HINCRBY', KEYS[3], 'webhook_' .. ARGV[2], 1)
  if ARGV[2] == 'failed' then redis.call('HSET', KEYS[3], 'webhook_last_error', ARGV[5]) end
end
return 1
"""


#: Name resolution of receivers' hosts (a module attribute, so tests can give a name a private address).
resolve = socket.getaddrinfo


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature``: ``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` with the key
    of a ``whsec_<base64>`` secret (Standard Webhooks; ebca_client.verify_webhook checks it)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookSecrets:
    """The signing secret of each API key, derived from one service secret: HMAC(service secret, key
    id). Every replica derives the same without storing per-key secrets; the anonymous owner (auth
    off) gets the service's own. Without EBCA_WEBHOOK_SECRET the service secret is made once at
    random and kept in Redis."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.r = client
        self._service: bytes | None = settings.webhook_secret.encode() if settings.webhook_secret else None

    def _service_secret(self) -> bytes:
        if self._service is None:
            key = f"{self.settings.key_prefix}:webhooks:secret"
            with redis_errors():
                self.r.set(key, secrets.token_urlsafe(32), nx=True)
                self._service = str(self.r.get(key)).encode()
        return self._service

    def for_owner(self, owner: str) -> str:
        digest = hmac.new(self._service_secret(), b"ebca-webhook:" + owner.encode(), hashlib.sha256).digest()
        return SECRET_PREFIX + base64.b64encode(digest).decode()


class DeliveryRefused(Exception):
    """The destination may not be called (it resolves to a private address); not retried."""


class Dispatcher:
    """The thread that delivers due webhooks (one per api process; any number of replicas is safe)."""

    def __init__(self, settings: Settings, store: JobStore, client: httpx.Client | None = None) -> None:
        self.settings = settings
        self.store = store
        self.r = store.r
        self.secrets = WebhookSecrets(settings, store.r)
        self.http = client or httpx.Client(timeout=settings.webhook_timeout_seconds, follow_redirects=False)
        self._claim = store.r.register_script(_CLAIM)
        self._settle = store.r.register_script(_SETTLE)
        self._due = store.k("webhooks", "due")
        self._msgs = store.k("webhooks", "msgs")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="ebca-webhook")
        self._slots = threading.Semaphore(CONCURRENCY)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="ebca-webhooks", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        # Deliveries in flight finish or time out; unsettled ones are claimed again after their lease.
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.dispatch_due()
            except Exception as exc:  # Redis away: the next pass catches up
                log.warning("webhook dispatch failed: %s", exc)
            self._stop.wait(POLL_SECONDS)

    def dispatch_due(self) -> int:
        """Claim the due deliveries there are free slots for and start them; returns how many."""
        free = 0
        while self._slots.acquire(blocking=False):
            free += 1
        if not free:
            return 0
        now = time.time()
        lease = now + self.settings.webhook_timeout_seconds + 30
        ids = self._claim(keys=[self._due], args=[now, lease, free])
        for _ in range(free - len(ids)):
            self._slots.release()
        for msg_id in ids:
            self._pool.submit(self._run, msg_id)
        return len(ids)

    def _run(self, msg_id: str) -> None:
        try:
            self.deliver(msg_id)
        except Exception as exc:  # Redis away mid-delivery: the claim's lease runs out, it is retried
            log.warning("webhook %s: %s", msg_id, exc)
        finally:
            self._slots.release()

    def deliver(self, msg_id: str) -> str:
        """One try of one delivery; returns the outcome (delivered, retry, failed, gone)."""
        raw = self.r.hget(self._msgs, msg_id)
        if raw is None:
            self.r.zrem(self._due, msg_id)
            return "gone"
        msg = json.loads(raw)
        job_key = self.store.job_key(msg["job_id"])
        hook_raw, owner_raw = self.r.hmget(job_key, ["webhook", "owner"])
        if hook_raw is None or hook_raw == "null":  # the job record expired: nobody to tell about it
            self.r.zrem(self._due, msg_id)
            self.r.hdel(self._msgs, msg_id)
            return "gone"
        hook = WebhookSpec.model_validate_json(hook_raw)
        owner = json.loads(owner_raw) if owner_raw else None
        error = self._post(hook.url, msg_id, msg["body"].encode(), self.secrets.for_owner(owner or ANONYMOUS))
        if error is None:
            outcome, due = "delivered", 0.0
        else:
            attempts = msg["attempts"] + 1
            delay = min(self.settings.webhook_backoff_seconds * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)
            due = time.time() + delay
            expired = due - msg["created"] > self.settings.webhook_retry_seconds
            outcome = "failed" if expired or error.startswith("refused") else "retry"
            msg["attempts"] = attempts
            log.info("webhook %s to %s: %s (%s)", msg_id, hook.url, error, outcome)
        self._settle(
            keys=[self._due, self._msgs, job_key],
            args=[msg_id, outcome, due, json.dumps(msg), json.dumps((error or "")[:MAX_ERROR_CHARS])],
        )
        return outcome

    def _post(self, url: str, msg_id: str, body: bytes, secret: str) -> str | None:
        """POST one try; None on a 2xx answer, else why not."""
        stamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "ebca-serve-webhooks",
            "webhook-id": msg_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(secret, msg_id, stamp, body),
        }
        try:
            self._check_destination(url)
            response = self.http.post(url, content=body, headers=headers)
        except DeliveryRefused as exc:
            return f"refused: {exc}"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc or 'no answer'}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    def _check_destination(self, url: str) -> None:
        """A public host name may still resolve to a private address; refuse those unless allowed
        (the api checked the URL's own host when the job was submitted)."""
        if self.settings.webhook_allow_private:
            return
        parts = urlsplit(url)
        host = parts.hostname or ""
        if private_host(host):
            raise DeliveryRefused(f"{host} is a loopback or private address")
        try:
            infos = resolve(host, parts.port or 443, proto=socket.IPPROTO_TCP)
        except OSError:
            return  # httpx reports the lookup failure, and it is retried
        for info in infos:
            address: Any = info[4][0]
            if private_host(str(address)):
                raise DeliveryRefused(f"{host} resolves to the private address {address}")
