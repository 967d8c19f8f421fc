"""Reads the Lua scripts: packaged in the wheel as release_service/lua, or lua/ in a checkout."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

# Joins one request's fields into one script argument (the scripts split on it); never in
# a validated field, which is printable.
SEPARATOR = "\x1f"


@functools.cache
def lua_source(name: str) -> str:
    packaged = resources.files("release_service").joinpath("lua", name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # Editable install or a plain checkout: the repository's top-level lua/ folder.
    return (Path(__file__).resolve().parents[2] / "lua" / name).read_text(encoding="utf-8")
