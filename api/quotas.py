"""Per-key quotas on submissions (docs/API.md, "Quotas"): a submit rate (a token bucket), a cap on the
key's jobs queued + running, and a cap on the images it submits per UTC day.

All three live in Redis and are checked and taken in one Lua script, so every api replica enforces
the same numbers and a refused request takes nothing: a submission either passes every limit and
takes one token, its images and an active-job slot, or it passes none. A submission that fails after
that (a refused upload, the broker away, an idempotent replay found at creation) gives them back.

Layout (``{p}`` = EBCA_KEY_PREFIX): ``{p}:quota:bucket:{key id}`` hash {tokens, ts};
``{p}:quota:images:{key id}:{YYYYMMDD}`` counter; ``{p}:active:{key id}`` the job store's set of the
key's unfinished jobs (ebca_common/store.py keeps it as jobs finish).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ebca_common.errors import RateLimited
from ebca_common.keys import Caller
from ebca_common.store import JobStore, redis_errors

#: KEYS: bucket, images of today, active set. ARGV: rate per second (0: none), burst, images, images
#: cap (-1: none), active cap (-1: none), job id, seconds the images counter lives.
#: Returns {verdict, tokens left (string), images used today, active jobs}.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens = burst
if rate > 0 then
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  if b[1] then tokens = math.min(burst, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * rate) end
end
local active = redis.call('SCARD', KEYS[3])
local acap = tonumber(ARGV[5])
if acap >= 0 and active >= acap then return {'active', tostring(tokens), 0, active} end
local n, icap = tonumber(ARGV[3]), tonumber(ARGV[4])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if icap >= 0 and used + n > icap then return {'images', tostring(tokens), used, active} end
if rate > 0 then
  if tokens < 1 then return {'rate', tostring(tokens), used, active} end
  tokens = tokens - 1
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
  redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
end
redis.call('INCRBY', KEYS[2], n)
redis.call('EXPIRE', KEYS[2], ARGV[7])
redis.call('SADD', KEYS[3], ARGV[6])
return {'ok', tostring(tokens), used + n, active + 1}
"""

#: Give back what _RESERVE took. KEYS as above; ARGV: rate (0: none), burst, images, job id.
_RELEASE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
if rate > 0 then
  local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '-1')
  if tokens >= 0 then redis.call('HSET', KEYS[1], 'tokens', tostring(math.min(burst, tokens + 1))) end
end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('DECRBY', KEYS[2], ARGV[3]) end
redis.call('SREM', KEYS[3], ARGV[4])
return 1
"""


@dataclass
class Reservation:
    """What one accepted submission took, and the RateLimit-* headers that describe the key's bucket."""

    keys: list[str]
    args: list[str]
    headers: dict[str, str] = field(default_factory=dict)


def _day_left(now: datetime) -> int:
    """Seconds until the next UTC midnight (when the images-per-day count starts again)."""
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((midnight - now).total_seconds()))


class Quotas:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._reserve = store.r.register_script(_RESERVE)
        self._release = store.r.register_script(_RELEASE)

    def reserve(self, caller: Caller, job_id: str, images: int) -> Reservation:
        """Take one submission of ``images`` images for ``job_id`` from the caller's quotas, or raise
        :class:`RateLimited` (429 with Retry-After and RateLimit-* headers) taking nothing."""
        limits = caller.limits
        now = datetime.now(UTC)
        owner = caller.owner
        keys = [
            self.store.k("quota", "bucket", owner),
            self.store.k("quota", "images", owner, now.strftime("%Y%m%d")),
            self.store.k("active", owner),
        ]
        rate = (limits.rate_per_minute or 0.0) / 60.0 if limits.burst is not None else 0.0
        burst = limits.burst or 0
        args = [repr(rate), str(burst), str(images), _cap(limits.max_images_per_day),
                _cap(limits.max_active_jobs), job_id, str(_day_left(now) + 3600)]  # fmt: skip
        for attempt in range(2):
            with redis_errors():
                verdict, tokens, used, active = self._reserve(keys=keys, args=args)
            if verdict == "active" and attempt == 0 and self.store.active_jobs(owner) < int(args[4]):
                continue  # the set held ids of submissions that never became jobs; counted again
            break
        headers = _rate_headers(rate, burst, float(tokens))
        if verdict == "ok":
            return Reservation(keys, [repr(rate), str(burst), str(images), job_id], headers)
        if verdict == "rate":
            retry = math.ceil((1.0 - float(tokens)) / rate)
            raise RateLimited(
                f"too many submissions: this key may submit {limits.rate_per_minute:g} jobs per minute "
                f"(bursts of {burst}); retry in {retry} s",
                retry_after=max(1, retry),
                headers=headers,
            )
        if verdict == "images":
            raise RateLimited(
                f"images per day: this key submitted {used} of its {limits.max_images_per_day} images "
                f"today (UTC) and this job asks for {images}",
                retry_after=_day_left(now),
                headers=headers,
            )
        raise RateLimited(
            f"active jobs: this key has {active} jobs queued or running, its limit is "
            f"{limits.max_active_jobs}; retry when one has finished",
            retry_after=self.store.settings.retry_after_seconds,
            headers=headers,
        )

    def release(self, reservation: Reservation) -> None:
        with redis_errors():
            self._release(keys=reservation.keys, args=reservation.args)


def _cap(value: int | None) -> str:
    return "-1" if value is None else str(value)


def _rate_headers(rate: float, burst: int, tokens: float) -> dict[str, str]:
    """The bucket as draft-ietf-httpapi-ratelimit-headers-06 fields: Limit = the bucket size,
    Remaining = whole tokens left, Reset = seconds until the bucket is full again, Policy = the bucket
    as "<size>;w=<seconds to refill it from empty>". None for a key without a rate limit."""
    if rate <= 0:
        return {}
    reset = math.ceil(max(0.0, burst - tokens) / rate)
    return {
        "RateLimit-Limit": str(burst),
        "RateLimit-Remaining": str(max(0, math.floor(tokens))),
        "RateLimit-Reset": str(reset),
        "RateLimit-Policy": f"{burst};w={math.ceil(burst / rate)}",
    }
