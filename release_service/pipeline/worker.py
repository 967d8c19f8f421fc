"""`release-service relay`: the relay process, with reconcile and the no-show pass on
their timers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from aiokafka.errors import KafkaError

from ..bookings.attendance import no_shows_forever
from ..core.aio import run_until_signalled, wait_event
from ..core.db import connect_pool
from ..core.kafka import ensure_topics, kafka_producer
from ..core.logs import configure_logging
from ..core.metrics import watch_event_loop
from ..core.metrics_server import start_metrics_server
from ..core.settings import Settings, load_settings
from ..scripts.client import check_topology, redis_client
from .reconcile import reconcile_forever
from .relay import Relay

log = logging.getLogger(__name__)


async def run_relay(settings: Settings, stopping: asyncio.Event | None = None) -> None:
    """A relay with its own Redis client and producer (plus reconcile on a timer)."""
    stop = stopping or asyncio.Event()
    redis = redis_client(settings)
    producer = kafka_producer(settings)
    while True:
        try:
            await ensure_topics(settings)
            await producer.start()
            break
        except (KafkaError, OSError) as exc:
            log.warning("Kafka unreachable at start (%s); retrying", exc)
            # A stop request while Kafka is down must end the process, not the retry.
            await wait_event(stop, 1.0)
            if stop.is_set():
                with contextlib.suppress(KafkaError):
                    await producer.stop()
                await redis.aclose()
                return
    relay = Relay(settings, redis, producer)
    waiter = asyncio.create_task(stop.wait())
    pool = await connect_pool(settings, max_size=2)
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(watch_event_loop()),
             asyncio.create_task(reconcile_forever(settings, redis, producer, stop)),
             asyncio.create_task(no_shows_forever(pool, redis, settings.zone,
                                                  settings.no_show_interval_seconds, stop))]
    try:
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Every loop also ends on the event: a cancellation alone can be absorbed.
        stop.set()
        relay.stop()
        for task in [waiter, *tasks]:
            task.cancel()
        await asyncio.gather(waiter, *tasks, return_exceptions=True)
        with contextlib.suppress(KafkaError):
            await producer.stop()
        await pool.close()
        await redis.aclose()


def cmd_relay(args: argparse.Namespace) -> int:
    settings = load_settings()
    asyncio.run(check_topology(settings))
    configure_logging(settings.log_level)
    start_metrics_server(settings, "relay")

    run_until_signalled(lambda stopping: run_relay(settings, stopping))
    return 0
