"""Structured logs: one JSON object per line, one line per event (never per request on
the hot path unless FLASHSALE_ACCESS_LOG=1), with every URL's password blanked out."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from flashsale.console import redact

__all__ = ["configure", "JsonFormatter"]

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": os.getpid(),
            "event": record.getMessage(),
        }
        event.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            event["error"] = self.formatException(record.exc_info)
        # A driver's error or a traceback may quote a URL: its password never reaches a log.
        return redact(json.dumps(event, default=str))


def configure(level: str = "INFO", *, access_log: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.INFO if access_log else logging.WARNING)
    logging.Formatter.converter = time.gmtime
