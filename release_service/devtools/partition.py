"""A TCP proxy in front of a Redis node that can cut it off from the rest of its
topology, for partition tests on one machine:

    python -m release_service.devtools.partition LISTEN_PORT TARGET_PORT

Everyone reaches the node through the proxy. A connection is a sentinel's once it names
itself (`CLIENT SETNAME sentinel-...`) and a replica's once it speaks replication
(`REPLCONF`, `PSYNC`, `SYNC`); every other one is a client's. SIGUSR1 partitions: the
sentinels' and replicas' connections are closed and any new one is closed as soon as it
shows what it is, so the sentinels see the node as down and promote a replica, while the
clients that reach it keep talking to it (the old primary of a split brain). SIGUSR2
heals. Loopback only; it ends on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys

CHUNK = 65536
# What a connection's first bytes show about who is on the other end.
MARKS = {b"sentinel-": "sentinel", b"REPLCONF": "replica", b"PSYNC": "replica",
         b"SYNC\r\n": "replica"}
INTERNAL = ("sentinel", "replica")
# A replica pings first and speaks replication in its next commands; a client that has
# sent this many chunks without a mark is a client for good (a value it stores later may
# hold any bytes).
CLASSIFY_CHUNKS = 4


class PartitionProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.partitioned = False
        self._internal: set[asyncio.StreamWriter] = set()

    def partition(self) -> None:
        self.partitioned = True
        for writer in list(self._internal):
            writer.close()

    def heal(self) -> None:
        self.partitioned = False

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        kind = "client?"  # until the peer's bytes tell

        async def upstream() -> None:
            nonlocal kind
            chunks = 0
            while data := await reader.read(CHUNK):
                if kind == "client?":
                    chunks += 1
                    kind = next((k for mark, k in MARKS.items() if mark in data),
                                "client" if chunks >= CLASSIFY_CHUNKS else kind)
                    if kind in INTERNAL:
                        self._internal.add(writer)
                if kind in INTERNAL and self.partitioned:
                    break
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(CHUNK):
                if kind in INTERNAL and self.partitioned:
                    break
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._internal.discard(writer)
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await w.wait_closed()


async def main(listen_port: int, target_port: int) -> None:
    proxy = PartitionProxy(target_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, proxy.partition)
    loop.add_signal_handler(signal.SIGUSR2, proxy.heal)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(proxy.serve, "127.0.0.1", listen_port)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
