"""API keys and the usage log, in one SQLite file.

Only SHA-256 hashes of keys are stored; a new key is shown once, by `lowvram keys create`.
Usage rows are written by one background thread so that a request never waits on disk,
and `close()` drains the queue so that no row is lost on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

KEY_PREFIX = "lvk-"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    key_hash        TEXT NOT NULL UNIQUE,
    key_prefix      TEXT NOT NULL,
    models          TEXT,            -- JSON list; NULL: every model
    rpm             INTEGER,         -- requests per minute; NULL: unlimited
    tpm             INTEGER,         -- tokens per minute
    max_concurrency INTEGER,
    created_at      REAL NOT NULL,
    revoked_at      REAL
);
CREATE TABLE IF NOT EXISTS usage (
    id                INTEGER PRIMARY KEY,
    ts                REAL NOT NULL,
    request_id        TEXT NOT NULL,
    key_name          TEXT NOT NULL,
    model             TEXT,
    endpoint          TEXT NOT NULL,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    status            INTEGER NOT NULL,
    latency_ms        REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_key_ts ON usage (key_name, ts);
"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """The identity and limits a request runs under."""

    name: str
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None


@dataclass(frozen=True)
class KeyListing:
    record: KeyRecord
    prefix: str
    created_at: float
    revoked_at: float | None
    requests: int
    tokens: int


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    key_name: str
    model: str | None
    endpoint: str
    prompt_tokens: int | None
    completion_tokens: int | None
    status: int
    latency_ms: float
    ts: float = 0.0


_Pending = tuple[UsageRecord, "asyncio.Future[None] | None"]


_UMASK_LOCK = threading.Lock()


def _connect(path: Path) -> sqlite3.Connection:
    """Open the database, created readable by its owner only: it holds key hashes and who
    asked what. SQLite gives the -wal and -shm files the database file's permissions.

    SQLite itself creates the file, under a umask that leaves only the owner's bits: its
    locks are POSIX locks, which a process loses on every descriptor of the file when it
    closes any one of them, so nothing here may open the file outside SQLite (a serving
    gateway would lose its locks and the next `lowvram keys` delete its WAL).
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _UMASK_LOCK:  # the umask is the process's: one connect at a time changes it
        umask = os.umask(0o077)
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            os.umask(umask)
    stat = path.stat()
    if stat.st_mode & 0o077 and stat.st_uid == os.getuid():
        path.chmod(0o600)  # made readable by others by an older version
    # WAL with NORMAL sync survives a crash of the process, not of the machine; a fsync per
    # request would cost more than the request.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class KeyStore:
    """Managed keys. Lookups read SQLite each time, so a revoke from the CLI is immediate."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = _connect(path)
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def create(
        self,
        name: str,
        *,
        models: list[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrency: int | None = None,
    ) -> str:
        """Store a new key and return it; this is the only time it exists in plain text.

        A limit is a positive number or none at all: 0 would block the key forever.
        """
        for limit, value in (("rpm", rpm), ("tpm", tpm), ("concurrency", max_concurrency)):
            if value is not None and value < 1:
                raise ValueError(f"--{limit} must be at least 1 (leave it out for no limit)")
        if not name.strip():
            raise ValueError("a key needs a name")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            self._conn.execute(
                "INSERT INTO api_keys (name, key_hash, key_prefix, models, rpm, tpm,"
                " max_concurrency, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    hash_key(key),
                    key[: len(KEY_PREFIX) + 4],
                    json.dumps(models) if models else None,
                    rpm,
                    tpm,
                    max_concurrency,
                    time.time(),
                ),
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"a key named {name!r} exists already") from None
        return key

    def revoke(self, name: str) -> bool:
        cursor = self._conn.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
            (time.time(), name),
        )
        return cursor.rowcount == 1

    def lookup(self, key_hash: str) -> KeyRecord | None:
        row = self._conn.execute(
            "SELECT key_hash, name, models, rpm, tpm, max_concurrency FROM api_keys"
            " WHERE key_hash = ? AND revoked_at IS NULL",
            (key_hash,),
        ).fetchone()
        if row is None or not secrets.compare_digest(row[0], key_hash):
            return None
        return _record(row[1:])

    def listing(self) -> list[KeyListing]:
        rows = self._conn.execute(
            "SELECT k.name, k.models, k.rpm, k.tpm, k.max_concurrency, k.key_prefix,"
            " k.created_at, k.revoked_at, COUNT(u.id),"
            " COALESCE(SUM(COALESCE(u.prompt_tokens, 0) + COALESCE(u.completion_tokens, 0)), 0)"
            " FROM api_keys k LEFT JOIN usage u ON u.key_name = k.name"
            " GROUP BY k.id ORDER BY k.created_at"
        ).fetchall()
        return [
            KeyListing(_record(row[:5]), row[5], row[6], row[7], row[8], row[9]) for row in rows
        ]


def _record(row: tuple[object, ...]) -> KeyRecord:
    name, models, rpm, tpm, concurrency = row
    return KeyRecord(
        name=str(name),
        models=tuple(json.loads(str(models))) if models else None,
        rpm=rpm if isinstance(rpm, int) else None,
        tpm=tpm if isinstance(tpm, int) else None,
        max_concurrency=concurrency if isinstance(concurrency, int) else None,
    )


class UsageLog:
    """Appends usage rows from one writer thread; a row is committed before its answer ends.

    A usage row is what someone bills from, so it must survive a kill -9 of the gateway
    once the client has its answer. `record()` queues the row and returns a future that
    resolves when the row's transaction has committed; the request awaits it before its
    last byte goes out (see exchange.py). The writer takes everything queued into one
    transaction (group commit): under load, rows that arrive while one commit runs share
    the next, so a commit per request is paid only when requests are rare. `close()`
    writes what is queued.
    """

    MAX_BATCH = 1000

    def __init__(self, path: Path) -> None:
        self._conn = _connect(path)
        self._conn.executescript(_SCHEMA)
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()

    def record(self, row: UsageRecord) -> asyncio.Future[None] | None:
        """Queue `row`; from the event loop, a future done once it is committed."""
        try:
            future: asyncio.Future[None] | None = asyncio.get_running_loop().create_future()
        except RuntimeError:
            future = None  # not called from an event loop: nobody waits
        self._queue.put((row, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._conn.close()

    def _run(self) -> None:
        closing = False
        while not (closing and self._queue.empty()):
            pending = [self._queue.get()]  # sleeps until there is work
            while len(pending) < self.MAX_BATCH and not self._queue.empty():
                pending.append(self._queue.get())
            closing = closing or None in pending
            batch = [item for item in pending if item is not None]
            try:
                self._write([row for row, _ in batch])
            except sqlite3.Error:
                # The answers still go out: a full disk must not take the API down.
                logger.exception("could not write %d usage rows", len(batch))
            _wake([future for _, future in batch if future is not None])

    def _write(self, rows: list[UsageRecord]) -> None:
        if not rows:
            return
        self._conn.execute("BEGIN")
        try:
            self._conn.executemany(
                "INSERT INTO usage (ts, request_id, key_name, model, endpoint, prompt_tokens,"
                " completion_tokens, status, latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        row.ts or time.time(),
                        row.request_id,
                        row.key_name,
                        row.model,
                        row.endpoint,
                        row.prompt_tokens,
                        row.completion_tokens,
                        row.status,
                        row.latency_ms,
                    )
                    for row in rows
                ],
            )
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")


def _wake(futures: list[asyncio.Future[None]]) -> None:
    """Wake the requests waiting for their rows, from the writer thread: one call into each
    event loop per batch, not per row."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for future in futures:
        by_loop.setdefault(future.get_loop(), []).append(future)
    for loop, waiting in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(_resolve, waiting)


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():  # a request cancelled meanwhile cancelled its future
            future.set_result(None)
