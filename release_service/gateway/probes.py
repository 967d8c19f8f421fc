"""Readiness probes of the engines the gateway depends on."""

from __future__ import annotations

import asyncio
import time


class KafkaProbe:
    """Is any bootstrap broker accepting connections? Cached briefly: /readyz is polled
    by load balancers and must not open a connection per poll."""

    def __init__(self, bootstrap: str, ttl_seconds: float = 2.0, timeout: float = 1.0) -> None:
        self._servers = [s.strip().rpartition(":") for s in bootstrap.split(",")]
        self._ttl = ttl_seconds
        self._timeout = timeout
        self._checked_at = -1e9
        self._reachable = False

    async def reachable(self) -> bool:
        if time.monotonic() - self._checked_at < self._ttl:
            return self._reachable
        self._reachable = await self._check()
        self._checked_at = time.monotonic()
        return self._reachable

    async def _check(self) -> bool:
        for host, _, port in self._servers:
            try:
                async with asyncio.timeout(self._timeout):
                    _, writer = await asyncio.open_connection(host, int(port))
            except (OSError, TimeoutError):
                continue
            writer.close()
            await writer.wait_closed()
            return True
        return False
