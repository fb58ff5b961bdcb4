"""Server-sent events as engines write them: bytes in, complete events out, cheaply.

    buffer = EventBuffer()
    chunk, spans = buffer.feed(b'data: {"a": 1}\n\ndata: {"b"')
    [chunk[start:end] for start, end in spans]     # [b'data: {"a": 1}']
    buffer.feed(b': 2}\n\n')                        # the second event, once complete

Engines send one `data:` line per event, usually one event per read: the common case costs
a `find` and no copy. `\r\n` framing and multi-line `data:` fields are handled too.
"""

from __future__ import annotations

DONE = b"data: [DONE]\n\n"
_CR = ord("\r")
DONE_EVENT = b"data: [DONE]"


class EventBuffer:
    """Splits a byte stream into events at blank lines, keeping an incomplete tail."""

    def __init__(self) -> None:
        self._pending = b""

    @property
    def pending(self) -> int:
        """Bytes held that do not end an event yet."""
        return len(self._pending)

    def feed(self, received: bytes) -> tuple[bytes, list[tuple[int, int]]]:
        """Add a read; return the buffer and the `(start, end)` of each complete event in it.

        `end` excludes the blank line; `buffer[end:end + 2]` is `\\n\\n`. What was held
        is not searched again (a stream of bytes with no blank line costs its length once).
        """
        held = len(self._pending)
        chunk = self._pending + received if held else received
        if b"\r" in received or (held and chunk[held - 1] == _CR):
            chunk = chunk.replace(b"\r\n", b"\n")
        spans = []
        start, end = 0, chunk.find(b"\n\n", max(0, held - 2))
        while end >= 0:
            spans.append((start, end))
            start, end = end + 2, chunk.find(b"\n\n", end + 2)
        self._pending = chunk[start:] if start < len(chunk) else b""
        return chunk, spans


def data_of(event: bytes) -> bytes | None:
    """The event's data (its `data:` lines joined by newlines); None for a comment-only event."""
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
