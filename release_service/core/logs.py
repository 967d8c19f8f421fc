"""Logging: JSON lines on stderr, with ID numbers and phone numbers masked in every line."""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime

import orjson

# An 18-character resident ID and an 11-digit mobile number, wherever they appear.
_RESIDENT_ID = re.compile(r"(?<![0-9])([0-9]{3})[0-9]{13}([0-9][0-9Xx])(?![0-9])")
_PHONE = re.compile(r"(?<![0-9])(1[0-9]{2})[0-9]{4}([0-9]{4})(?![0-9])")


def mask_personal_data(text: str) -> str:
    text = _RESIDENT_ID.sub(r"\1*************\2", text)
    return _PHONE.sub(r"\1****\2", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": mask_personal_data(record.getMessage()),
        }
        for name in ("request_id", "release_id"):
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["error"] = mask_personal_data(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
