"""Keys: who may call what, and that no plain key is stored or logged."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import httpx
import pytest

from lowvram.gateway.keystore import KeyStore, hash_key
from tests.conftest import ADMIN_KEY, CLIENT_KEY, GatewayFactory
from tests.helpers import assert_openai_error, lowvram_keys

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/tokenize"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/fake-model"),
        ("GET", "/metrics"),
    ],
)
def test_every_route_but_health_and_ready_needs_a_key(gateway: str, method: str, path: str) -> None:
    missing = httpx.request(method, gateway + path, json=CHAT)
    assert_openai_error(missing, 401, "invalid_api_key")
    wrong = httpx.request(
        method, gateway + path, json=CHAT, headers={"Authorization": "Bearer wrong-key-123"}
    )
    assert_openai_error(wrong, 401, "invalid_api_key")


def test_health_and_ready_are_public_and_say_nothing_more(gateway: str) -> None:
    assert httpx.get(gateway + "/health").json() == {"status": "ok"}
    assert httpx.get(gateway + "/ready").json() == {"status": "ready"}


def test_bearer_and_azure_style_api_key_header_are_accepted(gateway: str) -> None:
    bearer = httpx.post(
        gateway + "/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
    )
    azure = httpx.post(gateway + "/v1/chat/completions", json=CHAT, headers={"api-key": CLIENT_KEY})
    assert bearer.status_code == azure.status_code == 200


def test_metrics_need_an_admin_key_not_a_client_key(gateway: str) -> None:
    client = httpx.get(gateway + "/metrics", headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert_openai_error(client, 401)
    httpx.post(gateway + "/v1/chat/completions", json=CHAT, headers={"api-key": CLIENT_KEY})
    admin = httpx.get(gateway + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert admin.status_code == 200
    assert 'lowvram_requests_total{endpoint="chat",status="200"} 1.0' in admin.text
    assert "lowvram_engine_ready 1.0" in admin.text


def test_sqlite_keys_work_and_revocation_is_immediate(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gateway = make_gateway()
    store = KeyStore(tmp_path / "gateway.sqlite3")
    key = store.create("app-one")
    headers = {"Authorization": f"Bearer {key}"}
    assert (
        httpx.post(gateway + "/v1/chat/completions", json=CHAT, headers=headers).status_code == 200
    )
    assert store.revoke("app-one")
    revoked = httpx.post(gateway + "/v1/chat/completions", json=CHAT, headers=headers)
    assert_openai_error(revoked, 401)
    store.close()


def test_keys_are_stored_as_hashes_and_never_logged(
    make_gateway: GatewayFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = make_gateway()
    store = KeyStore(tmp_path / "gateway.sqlite3")
    key = store.create("app-two")
    with caplog.at_level(logging.DEBUG):
        httpx.post(gateway + "/v1/chat/completions", json=CHAT, headers={"api-key": key})
        httpx.post(gateway + "/v1/chat/completions", json=CHAT, headers={"api-key": key + "x"})
        httpx.post(gateway + "/v1/chat/completions", json=CHAT, headers={"api-key": CLIENT_KEY})
    logged = "\n".join(str(r.__dict__) for r in caplog.records)
    assert "app-two" in logged  # the key's name is what identifies it in logs
    assert key not in logged and CLIENT_KEY not in logged
    dump = "\n".join(sqlite3.connect(tmp_path / "gateway.sqlite3").iterdump())
    assert key not in dump and key[12:] not in dump
    store.close()


def test_cli_creates_lists_and_revokes_keys_showing_a_key_once(tmp_path: Path) -> None:
    db = tmp_path / "keys.sqlite3"
    created = lowvram_keys(db, "create", "team-a", "--rpm", "60", "--models", "default")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("lvk-") and "shown once" in created.stderr
    listed = lowvram_keys(db, "list")
    assert "team-a" in listed.stdout and key not in listed.stdout and key[:8] in listed.stdout
    again = lowvram_keys(db, "create", "team-a")
    assert again.returncode == 2 and "exists already" in again.stderr
    assert KeyStore(db).lookup(hash_key(key)) is not None
    assert lowvram_keys(db, "revoke", "team-a").returncode == 0
    assert KeyStore(db).lookup(hash_key(key)) is None
    assert "(revoked)" in lowvram_keys(db, "list").stdout
    assert lowvram_keys(db, "revoke", "team-a").returncode == 2
