"""Who may use the API: the API-key check and the per-client rate limit."""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Sequence

from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.http import Scope, bearer_token

__all__ = ["RateLimiter", "check_api_key"]

# A rate limiter forgets clients idle this long once it tracks this many (a client probing
# from many addresses must not grow the table without bound).
_FORGET_AFTER_CLIENTS = 10000
_FORGET_IDLE_SECONDS = 60.0


def check_api_key(scope: Scope, keys: Sequence[str]) -> None:
    """ApiError 401 unless the request carries one of `keys` (compared in constant time)."""
    given = bearer_token(scope)
    if given is None or not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        raise ApiError.invalid_api_key()


class RateLimiter:
    """A token bucket per client address: `rate` requests per second, a burst of `rate`."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, last seen)

    def check(self, scope: Scope, rate: float) -> None:
        """Take one request from the client's bucket; ApiError 429 with Retry-After when empty.
        `rate` comes with each call because a reload may change it."""
        client = scope.get("client")
        addr = client[0] if client else "unix"
        now = time.monotonic()
        burst = max(1.0, rate)
        tokens, last = self._buckets.get(addr, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens < 1.0:
            self._buckets[addr] = (tokens, now)
            wait = max(1, math.ceil((1.0 - tokens) / rate))
            raise ApiError(
                429,
                f"rate limit of {rate:g} requests per second exceeded",
                headers={"retry-after": str(wait)},
            )
        self._buckets[addr] = (tokens - 1.0, now)
        if len(self._buckets) > _FORGET_AFTER_CLIENTS:
            self._buckets = {
                a: b for a, b in self._buckets.items() if now - b[1] < _FORGET_IDLE_SECONDS
            }
