"""The floor for the benchmark: uvicorn + aiohttp passing bytes through, and nothing else.

    python -m bench.bare_relay PORT UPSTREAM_URL

No auth, no parsing, no accounting, no timeouts: what any Python relay on uvicorn pays per
chunk on this machine, so that the gateway's own cost can be read off beside it.
"""

from __future__ import annotations

import sys
from typing import Any

import aiohttp
import uvicorn

UPSTREAM = sys.argv[2]
session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global session
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            await send({"type": "lifespan.startup.complete"})
        assert session is not None
        await session.close()
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] == "/ready":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = {
        k.decode(): v.decode()
        for k, v in scope["headers"]
        if k in (b"authorization", b"content-type")
    }
    assert session is not None
    async with session.post(UPSTREAM + scope["path"], data=body, headers=headers) as upstream:
        await send(
            {
                "type": "http.response.start",
                "status": upstream.status,
                "headers": [(b"content-type", upstream.headers["content-type"].encode())],
            }
        )
        async for chunk in upstream.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
