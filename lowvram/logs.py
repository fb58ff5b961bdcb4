"""Logs: one JSON object per line for machines, or text for a person at a terminal; each
line carries the request id in scope.

    configure_logging("info", "auto")     # text when stderr is a terminal, else JSON
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
"""The id of the request in scope, written on every log line (set by the middleware)."""

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# uvicorn's lines carry the message again with ANSI colours: noise in a log.
_RESERVED |= {"color_message"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": request_id_var.get(),
            "msg": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """`12:00:01 info lowvram.access: request status=200 ...`; a field of several lines (a
    plan's explanation) follows on its own lines, as it reads."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        request = request_id_var.get()
        head = f"{stamp} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        if request != "-":
            head += f" [{request}]"
        blocks = []
        fields = []
        for key, value in _extras(record).items():
            if isinstance(value, str) and "\n" in value:
                blocks.append(value)
            elif value is not None:
                fields.append(f"{key}={value}")
        text = " ".join([head, *fields])
        if record.exc_info:
            blocks.append(self.formatException(record.exc_info))
        return "\n".join([text, *blocks])


def configure_logging(level: str = "info", style: str = "auto") -> None:
    handler = logging.StreamHandler(sys.stderr)
    text = style == "text" or (style == "auto" and sys.stderr.isatty())
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # A line per engine probe and per relayed request would drown the access log.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # We write one line per request ourselves; uvicorn's access log would be a second.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
