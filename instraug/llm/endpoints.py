"""Several endpoints serving one model: requests spread by free slots, failing endpoints set aside.

Each endpoint takes up to `capacity` requests at once. One that fails its health check
(`/v1/models`) or `max_failures` calls in a row is set aside while another stays in use, and comes
back after `cooldown` seconds once it answers its health check again. The last endpoint in use is
never set aside, so with one endpoint nothing changes: its failures are retried, then become rows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

#: The per-endpoint counters (RunStats.endpoints): requests answered, failed calls, times set aside.
COUNTERS = ("requests", "failed_calls", "set_aside")


def endpoint_name(url: str | None) -> str:
    """The endpoint as messages and summaries show it: its URL without any user:password."""
    if url is None:
        return "api.openai.com"
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(eq=False)
class Endpoint:
    """One server URL, its client, and what the pool knows about it."""

    url: str | None
    client: Any
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    in_use: bool = True
    in_flight: int = 0
    picks: int = 0
    failures: int = 0  # consecutive failed calls
    paused_until: float = 0.0  # a Retry-After this endpoint asked for (loop time)
    recovery: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return endpoint_name(self.url)


class EndpointPool:
    """Hands out endpoint slots: the least busy endpoint in use, avoiding the one that just failed."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        capacity: int,
        max_failures: int,
        cooldown: float,
        healthy: Callable[[Endpoint], Awaitable[bool]],
    ) -> None:
        self.endpoints = list(endpoints)
        self.capacity = capacity
        self.max_failures = max_failures
        self.cooldown = cooldown
        self._healthy = healthy
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def slots(self) -> int:
        """Requests that may be in flight at once across every endpoint."""
        return self.capacity * len(self.endpoints)

    async def check_health(self) -> None:
        """Set aside the endpoints that fail their health check, unless every one fails."""
        if len(self.endpoints) < 2:
            return
        results = await asyncio.gather(*(self._healthy(e) for e in self.endpoints))
        if any(results):
            for endpoint, ok in zip(self.endpoints, results, strict=True):
                if not ok:
                    self._set_aside(endpoint)

    async def acquire(self, avoid: Endpoint | None = None) -> Endpoint:
        """A slot on an endpoint in use; waits while every one is busy."""
        while True:
            endpoint = self._pick(avoid)
            if endpoint is not None:
                endpoint.in_flight += 1
                endpoint.picks += 1
                return endpoint
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(1)  # the slot it was woken for goes to the next waiter
                raise

    def release(self, endpoint: Endpoint) -> None:
        """Give the slot back."""
        endpoint.in_flight -= 1
        self._wake(1)

    def pause(self, endpoint: Endpoint, seconds: float) -> None:
        """Send the endpoint nothing for `seconds` (its Retry-After) while another one can take it."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if until > endpoint.paused_until:
            endpoint.paused_until = until
            loop.call_later(seconds, self._wake, self.capacity)

    def succeeded(self, endpoint: Endpoint) -> None:
        """The endpoint answered."""
        endpoint.failures = 0

    def failed(self, endpoint: Endpoint) -> bool:
        """Count a failed call (connection, timeout, 5xx); True when the retry should go elsewhere now."""
        endpoint.failures += 1
        endpoint.counts["failed_calls"] += 1
        if endpoint.in_use and endpoint.failures >= self.max_failures and self._others_in_use(endpoint):
            self._set_aside(endpoint)
        return not endpoint.in_use and self._others_in_use(endpoint)

    async def aclose(self) -> None:
        """Stop the recoveries and close every client."""
        for endpoint in self.endpoints:
            if endpoint.recovery is not None:
                endpoint.recovery.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await endpoint.recovery
            await endpoint.client.close()

    def _pick(self, avoid: Endpoint | None) -> Endpoint | None:
        now = asyncio.get_running_loop().time()
        # A paused endpoint is used only when every endpoint is paused (its requests then wait).
        skip_paused = any(e.in_use and e.paused_until <= now for e in self.endpoints)
        best: Endpoint | None = None
        best_key: tuple[bool, int, int] | None = None
        for endpoint in self.endpoints:
            if not endpoint.in_use or endpoint.in_flight >= self.capacity:
                continue
            if skip_paused and endpoint.paused_until > now:
                continue
            key = (endpoint is avoid, endpoint.in_flight, endpoint.picks)
            if best_key is None or key < best_key:
                best, best_key = endpoint, key
        return best

    def _others_in_use(self, endpoint: Endpoint) -> bool:
        return any(other.in_use for other in self.endpoints if other is not endpoint)

    def _set_aside(self, endpoint: Endpoint) -> None:
        endpoint.in_use = False
        endpoint.counts["set_aside"] += 1
        if endpoint.recovery is None:
            endpoint.recovery = asyncio.get_running_loop().create_task(self._recover(endpoint))

    async def _recover(self, endpoint: Endpoint) -> None:
        """After each cool-down, ask the endpoint's health; back in use once it answers."""
        try:
            while True:
                await asyncio.sleep(self.cooldown)
                if await self._healthy(endpoint):
                    break
            endpoint.failures = 0
            endpoint.in_use = True
            self._wake(self.capacity)
        finally:
            endpoint.recovery = None

    def _wake(self, count: int) -> None:
        while count and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1
