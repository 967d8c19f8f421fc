"""The typed wrapper of `lua/otp_verify.lua`: a one-time login code checked in Redis."""

from __future__ import annotations

from typing import Literal, cast

from ..core import keys
from .client import AnyRedis, reply_text
from .source import lua_source

# ok: the code matched (and is gone); wrong; burned: too many wrong tries (gone);
# missing: no code for the phone (never sent, expired, used or burned).
CodeCheck = Literal["ok", "wrong", "burned", "missing"]


class OtpVerifyScript:
    def __init__(self, redis: AnyRedis) -> None:
        self._script = redis.register_script(lua_source("otp_verify.lua"))

    async def __call__(self, phone: str, digest: str, tries: int) -> CodeCheck:
        """Compare `digest` (of the code the person typed) with the phone's code; `tries`
        wrong ones in all burn it."""
        reply = await self._script(keys=[keys.otp_code_key(phone)], args=[digest, tries])
        return cast(CodeCheck, reply_text(reply))
