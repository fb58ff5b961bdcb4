"""Logs for machines (JSON lines) and for a person at a terminal (text)."""

from __future__ import annotations

import json
import logging

from lowvram.logs import JsonFormatter, TextFormatter


def record(message: str, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("lowvram.test", logging.INFO, __file__, 1, message, None, None)
    made.__dict__.update(extra)
    return made


def test_json_lines_drop_uvicorns_ansi_copy_and_keep_one_line() -> None:
    line = JsonFormatter().format(
        record("Started server", color_message="Started \x1b[36mserver\x1b[0m", status=200)
    )
    data = json.loads(line)
    assert "color_message" not in data and data["status"] == 200 and "\n" not in line


def test_text_puts_fields_on_the_line_and_a_plan_below_it() -> None:
    text = TextFormatter().format(
        record("starting vllm", explain="plan for m\n  weights 1 GiB", path="/v1/x", gone=None)
    )
    first, *rest = text.splitlines()
    assert first.endswith("info lowvram.test: starting vllm path=/v1/x")
    assert rest == ["plan for m", "  weights 1 GiB"] and "\x1b" not in text
