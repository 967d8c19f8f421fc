"""Waiting that keeps cancellation intact."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until `event` is set or `seconds` pass; True when it is set.

    asyncio.timeout rather than wait_for: on Python 3.11, wait_for can swallow a
    cancellation that arrives just as the event is set, and a shutdown that cancels the
    waiting task then waits for it forever.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()
