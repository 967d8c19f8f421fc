"""`release-service gateway`: serve the app on uvloop, in one or several processes.

Several processes share one port through SO_REUSEPORT; the kernel spreads connections
between them. The parent only supervises: on SIGTERM/SIGINT it passes the signal on and
waits for every child to finish its in-flight requests.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import multiprocessing
import signal
import sys
from collections.abc import Callable
from types import FrameType

from aiohttp import web

from ..core.logs import configure_logging
from ..core.settings import Settings, load_settings
from ..scripts.client import check_topology
from .app import create_app

log = logging.getLogger("release_service.gateway")

SHUTDOWN_SECONDS = 10.0
# Requests allocate many short-lived objects and few cycles: collect the young generation
# every 10,000 allocations rather than 700 (a tenth of the collections, each still short).
GC_YOUNG_THRESHOLD = 10_000


def serve(settings: Settings) -> None:
    """One gateway process, until SIGTERM or SIGINT."""
    configure_logging(settings.log_level)
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - platforms without uvloop
        loop_factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_until_signal(settings))


async def _serve_until_signal(settings: Settings) -> None:
    # A signal only sets an event; run_app's way (raising GracefulExit out of the signal
    # handler) can leave uvloop waiting forever once the cleanup has finished.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    # aiohttp's keep-alive timer also runs from the connection's start and while a request
    # head is only partly read, so it is the header timeout too.
    runner = web.AppRunner(create_app(settings), access_log=None,
                           shutdown_timeout=SHUTDOWN_SECONDS,
                           keepalive_timeout=settings.header_timeout_seconds,
                           max_line_size=settings.max_header_bytes,
                           max_field_size=settings.max_header_bytes,
                           max_headers=settings.max_headers)
    await runner.setup()
    # What start-up made (modules, the app, scripts, settings) lives as long as the
    # process: frozen, no collection walks it again.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        await web.TCPSite(runner, settings.http_host, settings.http_port,
                          reuse_port=settings.gateway_processes > 1).start()
        await stopping.wait()
    finally:
        await runner.cleanup()


def cmd_gateway(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    if args.port is not None:
        overrides["http_port"] = args.port
    if args.processes is not None:
        overrides["gateway_processes"] = args.processes
    settings = dataclasses.replace(load_settings(), **overrides)  # type: ignore[arg-type]
    asyncio.run(check_topology(settings))
    configure_logging(settings.log_level)
    log.info("gateway listening on http://%s:%d with %d process(es)",
             settings.http_host, settings.http_port, settings.gateway_processes)
    if settings.gateway_processes == 1:
        serve(settings)
        return 0

    context = multiprocessing.get_context("spawn")
    children = [context.Process(target=serve, args=(settings,), name=f"gateway-{i}")
                for i in range(settings.gateway_processes)]
    for child in children:
        child.start()

    def forward(signum: int, _frame: FrameType | None) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                child.terminate() if signum == signal.SIGTERM else child.kill()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, lambda *_: forward(signal.SIGTERM, None))
    for child in children:
        child.join()
    failed = [c.name for c in children if c.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        print(f"release-service: gateway processes failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
