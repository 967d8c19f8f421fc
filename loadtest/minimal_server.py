"""The ceiling: the smallest aiohttp handler on uvloop, a pre-encoded JSON body.

    python loadtest/minimal_server.py PORT [PROCESSES]
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
from collections.abc import Callable

import orjson
import uvloop
from aiohttp import web

BODY = orjson.dumps({"claim_id": "0" * 24, "code": "12345678", "status": "confirmed"})


async def handler(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=201, body=BODY, content_type="application/json")


def minimal_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def serve(make_app: Callable[[], web.Application], port: int, reuse_port: bool) -> None:
    web.run_app(make_app(), host="127.0.0.1", port=port, access_log=None, print=None,
                reuse_port=reuse_port, loop=uvloop.new_event_loop())


def serve_processes(make_app: Callable[[], web.Application], port: int,
                    processes: int) -> None:
    """One process, or `processes` sharing the port (SO_REUSEPORT) until SIGTERM."""
    if processes == 1:
        serve(make_app, port, False)
        return
    children = [multiprocessing.Process(target=serve, args=(make_app, port, True))
                for _ in range(processes)]
    for child in children:
        child.start()

    def stop(_signum: int, _frame: object) -> None:
        for child in children:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        child.join()


if __name__ == "__main__":
    serve_processes(minimal_app, int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1)
