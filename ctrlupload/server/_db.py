"""Asset records of completed uploads (seed §11.2), in SQLite with WAL."""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS assets (
    object_key   TEXT PRIMARY KEY,
    etag         TEXT    NOT NULL,
    size_bytes   INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    public_url   TEXT    NOT NULL,
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL
)
"""


@dataclass(frozen=True)
class AssetRow:
    """One completed upload, as the seed's VideoAsset records it."""

    object_key: str
    etag: str
    size_bytes: int
    content_type: str
    public_url: str
    created_at: str
    updated_at: str


class AssetDB:
    """Upserts and deletes asset rows; safe to share between threads.

    One connection in WAL mode, serialised by a lock: writes are tiny, and SQLite
    allows one writer at a time anyway.

    Args:
        path: The database file (``":memory:"`` for a throwaway one).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.execute(_SCHEMA)

    def upsert(
        self, object_key: str, etag: str, size_bytes: int, content_type: str, public_url: str
    ) -> AssetRow:
        """Insert or replace the row for ``object_key``; created_at survives updates."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        with self._lock:
            self._conn.execute(
                """
                INSERT INTO assets (object_key, etag, size_bytes, content_type, public_url,
                                    created_at, updated_at)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT(object_key) DO UPDATE SET
                    etag = excluded.etag,
                    size_bytes = excluded.size_bytes,
                    content_type = excluded.content_type,
                    public_url = excluded.public_url,
                    updated_at = excluded.updated_at
                """,
                (object_key, etag, size_bytes, content_type, public_url, now, now),
            )
            row = self._get_locked(object_key)
        assert row is not None
        return row

    def get(self, object_key: str) -> AssetRow | None:
        """The row for ``object_key``, or None."""
        with self._lock:
            return self._get_locked(object_key)

    def _get_locked(self, object_key: str) -> AssetRow | None:
        found = self._conn.execute(
            "SELECT object_key, etag, size_bytes, content_type, public_url, created_at,"
            " updated_at FROM assets WHERE object_key = ?",
            (object_key,),
        ).fetchone()
        return None if found is None else AssetRow(*found)

    def delete(self, object_key: str) -> bool:
        """Remove the row; True when there was one."""
        with self._lock:
            cursor = self._conn.execute("DELETE FROM assets WHERE object_key = ?", (object_key,))
            return cursor.rowcount > 0

    def all(self) -> list[AssetRow]:
        """Every row, ordered by key."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT object_key, etag, size_bytes, content_type, public_url, created_at,"
                " updated_at FROM assets ORDER BY object_key"
            ).fetchall()
        return [AssetRow(*row) for row in rows]

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()
