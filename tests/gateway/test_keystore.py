"""The key database shared by a serving gateway and `lowvram keys`, as SQLite requires.

A serving gateway keeps the database open in WAL mode; `lowvram keys` opens and closes it
in other processes. SQLite's locks are POSIX locks, which a process loses on *every*
descriptor of the file as soon as it closes *any* one: code that opens the file outside
SQLite (to create it 0600, say) silently drops the gateway's locks, and the next CLI close
believes it is the last user and deletes the -wal and -shm files the gateway still uses.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
from pathlib import Path

import httpx

from lowvram.gateway.keystore import KeyStore, UsageLog, UsageRecord
from tests.conftest import CLIENT_KEY, UPSTREAM_KEY, GatewayFactory
from tests.doubles.fake_upstream import FakeUpstream
from tests.helpers import lowvram_keys, lowvram_serve, wait_for

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def test_keys_made_by_the_cli_while_serving_under_load_work_at_once(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    db = tmp_path / "gateway.sqlite3"
    gateway = make_gateway()
    stop = threading.Event()
    answered: list[int] = []

    def load() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as client:
            while not stop.is_set():
                status = client.post(gateway + "/v1/chat/completions", json=CHAT).status_code
                answered.append(status)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        for i in range(8):
            created = lowvram_keys(db, "create", f"app-{i}", "--quiet")
            assert created.returncode == 0, created.stderr
            key = created.stdout.strip()
            response = httpx.post(
                gateway + "/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {key}"},
            )
            assert response.status_code == 200, f"key {i} made while serving: {response.text}"
            assert lowvram_keys(db, "list").returncode == 0
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert answered and set(answered) == {200}
    listed = lowvram_keys(db, "list")
    assert listed.returncode == 0, listed.stderr
    for i in range(8):  # each new key's one request is in the usage log, visible to the CLI
        line = next(line for line in listed.stdout.splitlines() if line.startswith(f"app-{i} "))
        assert line.split()[6] == "1", line
    check = sqlite3.connect(db)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    env_rows = check.execute("SELECT COUNT(*) FROM usage WHERE key_name = 'env-0'").fetchone()
    check.close()
    assert env_rows[0] == len(answered)  # every answered request has its row


def test_creating_the_database_leaves_the_process_umask_as_it_was(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    store = KeyStore(tmp_path / "data" / "gateway.sqlite3")
    log = UsageLog(tmp_path / "data" / "gateway.sqlite3")
    log.record(UsageRecord("r1", "someone", "m", "chat", 1, 1, 200, 1.0))
    log.close()
    store.close()
    assert os.umask(umask) == umask  # 0600 came from a umask around SQLite's own open


def test_kill_9_loses_no_usage_row_of_an_answered_request(
    fake: tuple[FakeUpstream, str], tmp_path: Path
) -> None:
    """A row is committed before its answer's last byte: answered means billed."""
    _, upstream = fake
    env = {
        "GATEWAY_UPSTREAM_URL": upstream,
        "GATEWAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEYS": CLIENT_KEY,
    }
    answered: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def load(worker: int, url: str) -> None:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        with httpx.Client(headers=headers, timeout=30) as client:
            for i in itertools.count():
                if killed.is_set():
                    return
                request_id = f"w{worker}-{i}"
                body = {**CHAT, "stream": i % 2 == 1, "fake": {"tokens": 5}}
                try:
                    if body["stream"]:
                        with client.stream(
                            "POST",
                            url + "/v1/chat/completions",
                            json=body,
                            headers={"x-request-id": request_id},
                        ) as response:
                            lines = list(response.iter_lines())
                        done = response.status_code == 200 and "data: [DONE]" in lines
                    else:
                        response = client.post(
                            url + "/v1/chat/completions",
                            json=body,
                            headers={"x-request-id": request_id},
                        )
                        done = response.status_code == 200 and "choices" in response.json()
                except (httpx.HTTPError, ValueError):
                    return  # the gateway was killed
                if done:
                    with lock:
                        answered.append(request_id)

    with lowvram_serve(tmp_path, env, ready_timeout=60) as served:
        workers = [threading.Thread(target=load, args=(w, served.url)) for w in range(8)]
        for worker in workers:
            worker.start()
        wait_for(lambda: len(answered) >= 300, 60, "300 answered requests")
        served.process.kill()
        served.process.wait(10)
        killed.set()
        for worker in workers:
            worker.join(30)
    db = sqlite3.connect(tmp_path / "gateway.sqlite3")
    rows = {row[0] for row in db.execute("SELECT request_id FROM usage")}
    db.close()
    missing = set(answered) - rows
    assert len(missing) <= len(answered) // 100, f"{len(missing)} of {len(answered)} unbilled"
