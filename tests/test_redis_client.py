"""The Redis client: commands packed by hiredis are byte for byte what redis-py packs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from release_service.core.settings import Settings
from release_service.scripts.client import redis_from_url

ARGUMENT = st.one_of(st.text(), st.binary(), st.integers(), st.floats(allow_nan=False),
                     st.text(alphabet="ab\x1f{}: ", min_size=1), st.binary().map(bytearray),
                     st.binary().map(memoryview))
COMMAND = st.sampled_from(["SET", "EVALSHA", "HSET", "CONFIG SET", b"XADD", b"CLIENT SETNAME"])


def packed(connection: Connection, *args: object) -> bytes:
    return b"".join(connection.pack_command(*args))  # type: ignore[arg-type]


@given(COMMAND, st.lists(ARGUMENT, max_size=70))
def test_hiredis_packing_matches_redis_py(command: str | bytes, args: list[object]) -> None:
    ours = redis_from_url("redis://127.0.0.1:1").connection_pool.connection_class()
    assert packed(ours, command, *args) == packed(Connection(), command, *args)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [None, True, [1]])
def test_unpackable_arguments_are_refused_as_by_redis_py(bad: object) -> None:
    ours = redis_from_url("unix:///tmp/none.sock").connection_pool.connection_class()
    for connection in (ours, Connection()):
        with pytest.raises(DataError):
            packed(connection, "SET", "k", bad)  # type: ignore[arg-type]


async def test_scripts_and_pipelines_round_trip(stack_settings: Settings) -> None:
    redis = redis_from_url(stack_settings.redis_url)
    try:
        value = "résident\x1f{slot}:1"
        assert await redis.eval("return ARGV[1] .. ARGV[2]", 1, "k", value, b"\x00\xff") \
            == value.encode() + b"\x00\xff"
        pipe = redis.pipeline(transaction=True)
        pipe.set("n", 41).incr("n").incrbyfloat("n", 0.5)
        assert await pipe.execute() == [True, 42, 42.5]
    finally:
        await redis.aclose()
        await redis.connection_pool.disconnect()  # a pool passed in is not the client's own
