"""Who is calling: bearer (or Azure-style `api-key`) keys, compared as SHA-256 hashes."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from starlette.datastructures import Headers

from lowvram.gateway.errors import AuthenticationError
from lowvram.gateway.keystore import KeyRecord, KeyStore, hash_key


def presented_key(headers: Headers) -> str | None:
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return headers.get("api-key") or None


ANONYMOUS = KeyRecord(name="anonymous")
"""Who a request without a known key is, where GATEWAY_ALLOW_NO_KEY lets it through."""


class Authenticator:
    """Checks keys from settings (hashed at start-up) and from SQLite (looked up per call)."""

    def __init__(
        self,
        client_keys: list[str],
        admin_keys: list[str],
        store: KeyStore | None,
        *,
        allow_anonymous: bool = False,
    ) -> None:
        self._client = [
            (hash_key(key), KeyRecord(name=f"env-{i}")) for i, key in enumerate(client_keys)
        ]
        self._admin = [hash_key(key) for key in admin_keys]
        self._store = store
        self._anonymous = allow_anonymous

    def client(self, headers: Headers) -> KeyRecord:
        if self._anonymous:
            try:
                return self._known(headers)
            except AuthenticationError:
                return ANONYMOUS  # local tools send none, or a placeholder ("ollama")
        return self._known(headers)

    def _known(self, headers: Headers) -> KeyRecord:
        digest = self._digest(headers)
        for known, record in self._client:
            if secrets.compare_digest(known, digest):
                return record
        stored = self._store.lookup(digest) if self._store is not None else None
        if stored is None:
            raise AuthenticationError("Incorrect API key provided.")
        return stored

    def admin(self, headers: Headers) -> None:
        digest = self._digest(headers)
        if not any(secrets.compare_digest(known, digest) for known in self._admin):
            raise AuthenticationError("This route needs an admin key (GATEWAY_ADMIN_API_KEYS).")

    @staticmethod
    def _digest(headers: Headers) -> str:
        key = presented_key(headers)
        if key is None:
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            )
        return hash_key(key)


# async on purpose: FastAPI runs sync dependencies in a thread pool, a hop per request.
async def _client_key(request: Request) -> KeyRecord:
    authenticator: Authenticator = request.app.state.auth
    return authenticator.client(request.headers)


async def _admin_key(request: Request) -> None:
    authenticator: Authenticator = request.app.state.auth
    authenticator.admin(request.headers)


ClientKey = Annotated[KeyRecord, Depends(_client_key)]
AdminKey = Depends(_admin_key)
