"""vLLM's sleep mode, driven over its own HTTP endpoints (the Sleeper of engine/swap.py).

An engine started with `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1` serves:

    POST /sleep?level=1|2&mode=abort|wait   level 1: weights copied to host memory, KV
                                            cache dropped; level 2: both dropped
    POST /wake_up[?tags=weights|kv_cache]   the GPU memory back
    POST /collective_rpc {"method": "reload_weights"}   after a level-2 sleep: the
                                            weights read again (from the page cache)
    GET  /is_sleeping

(vllm/entrypoints/serve/sleep/api_router.py and .../rpc/api_router.py in vLLM 0.26.) A
level-2 wake is three steps, the weights first so that the KV cache's memory is only taken
once they are in. These endpoints sit outside vLLM's key check (it guards /v1 only): the
engine listens on 127.0.0.1 and the gateway never forwards them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import httpx

from lowvram.engine.handle import EngineHandle
from lowvram.engine.probe import auth_headers

SLEEP_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
"""What a sleep-mode engine needs in its environment (with `--enable-sleep-mode`)."""


@dataclass(frozen=True)
class SharedGpu:
    """An engine that is one of several on one GPU (ENGINE_MODELS), with sleep mode on."""

    served_name: str
    """The name clients use for its model."""
    others_bytes: int
    """What the other engines keep on the GPU meanwhile (asleep): nvidia-smi counts it with
    this engine's own."""


def sleep_args(served_name: str) -> list[str]:
    """The arguments an engine of several gets beside its plan's: the name clients use."""
    return ["--served-model-name", served_name, "--enable-sleep-mode"]


SleepLevel = Literal[1, 2]

TIMEOUT = 300.0
"""Seconds one call may take: a level-1 sleep copies the weights out (15 s for 15 GiB on an
H200), a reload reads them back."""


class SleepError(RuntimeError):
    pass


@dataclass(frozen=True)
class VllmSleeper:
    client: httpx.AsyncClient
    engines: Mapping[str, EngineHandle]
    """Each model's engine."""
    level: SleepLevel

    async def sleep(self, model: str, *, abort: bool) -> None:
        # "wait" lets vLLM finish what it runs; the gate has drained it already, so only
        # requests that outlasted the drain are ended ("abort").
        mode = "abort" if abort else "wait"
        await self._post(model, "/sleep", params={"level": str(self.level), "mode": mode})

    async def wake(self, model: str) -> None:
        if self.level == 1:
            await self._post(model, "/wake_up")
            return
        await self._post(model, "/wake_up", params={"tags": "weights"})
        await self._post(model, "/collective_rpc", json={"method": "reload_weights"})
        await self._post(model, "/wake_up", params={"tags": "kv_cache"})

    async def is_sleeping(self, model: str) -> bool:
        engine = self.engines[model]
        response = await self.client.get(
            f"{engine.base_url}/is_sleeping", headers=auth_headers(engine.api_key), timeout=10
        )
        return bool(response.json().get("is_sleeping"))

    async def _post(
        self,
        model: str,
        path: str,
        params: dict[str, str] | None = None,
        json: dict[str, str] | None = None,
    ) -> None:
        engine = self.engines[model]
        try:
            response = await self.client.post(
                engine.base_url + path,
                params=params,
                json=json,
                headers=auth_headers(engine.api_key),
                timeout=TIMEOUT,
            )
        except httpx.HTTPError as exc:
            raise SleepError(f"{model}: {path} failed: {exc!r}") from exc
        if response.status_code != 200:
            raise SleepError(f"{model}: {path} answered {response.status_code}")
