"""An engine someone else runs (GATEWAY_UPSTREAM_URL): we only watch it."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx

from lowvram.engine.errors import ProbeError
from lowvram.engine.handle import EngineState, ServedModel, StateMixin
from lowvram.engine.probe import normalize_base_url, probe_served_model

logger = logging.getLogger("lowvram.engine.external")


class ExternalEngine(StateMixin):
    """Polls `/v1/models` so that `/ready` and 503s follow the upstream's health.

    STARTING until it first answers, READY while it does, RESTARTING (away, watched, may
    come back) once it stops: it is never given up on.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        context_length: int | None = None,
        poll_interval: float = 2.0,
    ) -> None:
        super().__init__()
        self._reason = "the upstream server is not answering yet"
        self._base_url = normalize_base_url(url)
        self._api_key = api_key
        self._context_length = context_length
        self._poll_interval = poll_interval
        self._model: ServedModel | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def api_key(self) -> str | None:
        return self._api_key

    @property
    def model(self) -> ServedModel | None:
        return self._model

    @property
    def models(self) -> tuple[ServedModel, ...]:
        return (self._model,) if self._model is not None else ()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="external-engine-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._set_state(EngineState.STOPPED, "gateway stopped")

    async def _watch(self) -> None:
        timeout = httpx.Timeout(5.0)
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            while True:
                await self._probe_once(client)
                await asyncio.sleep(self._poll_interval)

    async def _probe_once(self, client: httpx.AsyncClient) -> None:
        """One look at the upstream. Whatever goes wrong is logged and makes it not ready
        until a valid answer comes: this task must outlive any answer it gets."""
        try:
            model = await probe_served_model(
                client,
                self._base_url,
                self._api_key,
                context_length=self._context_length,
                known=self._model,
            )
        except Exception as exc:  # a ProbeError, or an answer no one foresaw
            if not isinstance(exc, ProbeError):
                logger.exception("probing the upstream failed")
                exc = ProbeError(f"{self._base_url} answered unexpectedly ({type(exc).__name__})")
            was_ready = self._model is not None
            if str(exc) != self.detail:  # once per new reason, not every poll
                logger.warning("upstream not ready: %s", exc)
            if was_ready:
                # Not FAILED (given up): it is still watched and may come back, so clients
                # are told to retry (RESTARTING's Retry-After).
                self._set_state(
                    EngineState.RESTARTING, str(exc), "the upstream server stopped answering"
                )
            else:
                self._set_state(
                    EngineState.STARTING, str(exc), "the upstream server is not answering yet"
                )
            return
        if self._model != model:
            logger.info("upstream serves %s (context %s)", model.id, model.context_length)
        self._model = model
        self._set_state(EngineState.READY, f"{self._base_url} serves {model.id}")
