"""Waiting and stopping that keep cancellation intact."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import io
import logging
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# Past this, a process asked to stop cancels what it is still waiting for; past three
# times this it exits whatever it is doing (within the usual 30 s before a SIGKILL).
STOP_GRACE_SECONDS = 5.0


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


def run_until_signalled(serve: Callable[[asyncio.Event], Awaitable[None]],
                        grace_seconds: float = STOP_GRACE_SECONDS) -> None:
    """Run `serve(stopping)` until SIGTERM or SIGINT sets `stopping`, then let it finish.

    A stop request always ends the process: if `serve` is still running `grace_seconds`
    after it (waiting on a broker or database that does not answer), the tasks are logged
    with their stacks and `serve` is cancelled; if even that does not end it (a blocked
    loop, a task that swallows the cancellation), faulthandler prints every thread's stack
    and exits with status 1.
    """
    async def main() -> None:
        stopping = asyncio.Event()

        def request_stop() -> None:
            if not stopping.is_set():
                stopping.set()
                faulthandler.dump_traceback_later(3 * grace_seconds, exit=True)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request_stop)
        task = asyncio.ensure_future(serve(stopping))
        waiter = asyncio.create_task(stopping.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not (await asyncio.wait([task], timeout=grace_seconds))[0]:
            log.error("still running %g s after the stop request; cancelling:\n%s",
                      grace_seconds, _task_stacks())
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
    finally:
        faulthandler.cancel_dump_traceback_later()


def _task_stacks() -> str:
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=out)
    return out.getvalue()
