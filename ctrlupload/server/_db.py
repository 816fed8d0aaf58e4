"""Asset records of completed uploads (seed §11.2), and the multipart registry, in SQLite.

The registry (table ``multipart_uploads``) is what the backend knows of each multipart
upload it started: key, content type, length and part size, so that presign, list,
complete and abort work after a restart. A completed upload keeps its row for a while
(:data:`COMPLETED_UPLOAD_RETENTION_S`) with the ETag it completed with and a digest of
its part list, so that a client that lost the answer and completes again gets the same
answer rather than an error.

An asset row keeps the object's CRC64NVME when storage knows it, and an upload row
whether it was declared with a checksum and with ``If-None-Match`` (issue 11). A
database made before them gets the new columns when it is opened (NULL, or "no", in
the rows it already holds).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

_SCHEMA = """
CREATE TABLE IF NOT EXISTS assets (
    object_key   TEXT PRIMARY KEY,
    etag         TEXT    NOT NULL,
    size_bytes   INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    public_url   TEXT    NOT NULL,
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL,
    checksum     TEXT
)
"""

_UPLOADS_SCHEMA = """
CREATE TABLE IF NOT EXISTS multipart_uploads (
    upload_id        TEXT PRIMARY KEY,
    object_key       TEXT    NOT NULL,
    content_type     TEXT    NOT NULL,
    content_length   INTEGER NOT NULL,
    part_size        INTEGER NOT NULL,
    created_at       TEXT    NOT NULL,
    completed_at     TEXT,
    completed_etag   TEXT,
    completed_digest TEXT,
    checksum         INTEGER NOT NULL DEFAULT 0,
    if_none_match    INTEGER NOT NULL DEFAULT 0
)
"""

# Initiate calls that carried an Idempotency-Key: a retry answers the same upload.
_IDEMPOTENCY_SCHEMA = """
CREATE TABLE IF NOT EXISTS initiate_keys (
    idempotency_key TEXT PRIMARY KEY,
    request_digest  TEXT NOT NULL,
    upload_id       TEXT NOT NULL,
    created_at      TEXT NOT NULL
)
"""

_UPLOAD_COLUMNS = (
    "upload_id, object_key, content_type, content_length, part_size, created_at,"
    " completed_at, completed_etag, completed_digest, checksum, if_none_match"
)
_ASSET_COLUMNS = (
    "object_key, etag, size_bytes, content_type, public_url, created_at, updated_at, checksum"
)
#: Columns added since the first schema, by table: what an older database gets on open.
_ADDED_COLUMNS: Final = {
    "assets": (("checksum", "TEXT"),),
    "multipart_uploads": (
        ("checksum", "INTEGER NOT NULL DEFAULT 0"),
        ("if_none_match", "INTEGER NOT NULL DEFAULT 0"),
    ),
}

#: How long a completed upload's row is kept to answer a repeated complete.
COMPLETED_UPLOAD_RETENTION_S: Final = 7 * 24 * 3600
#: How long an initiate's Idempotency-Key is remembered.
IDEMPOTENCY_KEY_RETENTION_S: Final = 24 * 3600


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
    #: The object's CRC64NVME (S3's base64), when storage knows it.
    checksum: str | None = None


@dataclass(frozen=True)
class UploadRow:
    """A multipart upload the backend started.

    ``completed_etag`` and ``completed_digest`` are set once it completed: the ETag it
    answered and a digest of the part list and size it completed with. ``checksum``
    says it was declared with a full-object CRC64NVME, ``if_none_match`` that complete
    must not replace an object at the key.
    """

    upload_id: str
    object_key: str
    content_type: str
    content_length: int
    part_size: int
    created_at: str
    completed_at: str | None = None
    completed_etag: str | None = None
    completed_digest: str | None = None
    checksum: bool = False
    if_none_match: bool = False

    def __post_init__(self) -> None:
        # SQLite hands the flags back as 0 and 1.
        object.__setattr__(self, "checksum", bool(self.checksum))
        object.__setattr__(self, "if_none_match", bool(self.if_none_match))

    @property
    def completed(self) -> bool:
        """True once the upload completed."""
        return self.completed_etag is not None


@dataclass(frozen=True)
class AssetRecord:
    """A row to record with :meth:`AssetDB.complete_set`.

    ``upload_id`` and ``digest`` are set for a multipart upload assembled for it: the
    upload is marked completed with this ETag and digest in the same transaction.
    """

    object_key: str
    etag: str
    size_bytes: int
    content_type: str
    public_url: str
    upload_id: str | None = None
    digest: str | None = None
    checksum: str | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


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
        self._conn.execute(_UPLOADS_SCHEMA)
        self._conn.execute(_IDEMPOTENCY_SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Bring a database made by an older version up to this schema, in place."""
        for table, columns in _ADDED_COLUMNS.items():
            present = {str(row[1]) for row in self._conn.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns:
                if name not in present:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    def upsert(
        self,
        object_key: str,
        etag: str,
        size_bytes: int,
        content_type: str,
        public_url: str,
        *,
        checksum: str | None = None,
    ) -> AssetRow:
        """Insert or replace the row for ``object_key``; created_at survives updates."""
        with self._lock:
            self._upsert_locked(object_key, etag, size_bytes, content_type, public_url, checksum)
            row = self._get_locked(object_key)
        assert row is not None
        return row

    def _upsert_locked(
        self,
        object_key: str,
        etag: str,
        size_bytes: int,
        content_type: str,
        public_url: str,
        checksum: str | None,
    ) -> None:
        now = _stamp(_now())
        self._conn.execute(
            """
            INSERT INTO assets (object_key, etag, size_bytes, content_type, public_url,
                                created_at, updated_at, checksum)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT(object_key) DO UPDATE SET
                etag = excluded.etag,
                size_bytes = excluded.size_bytes,
                content_type = excluded.content_type,
                public_url = excluded.public_url,
                updated_at = excluded.updated_at,
                checksum = excluded.checksum
            """,
            (object_key, etag, size_bytes, content_type, public_url, now, now, checksum),
        )

    def get(self, object_key: str) -> AssetRow | None:
        """The row for ``object_key``, or None."""
        with self._lock:
            return self._get_locked(object_key)

    def _get_locked(self, object_key: str) -> AssetRow | None:
        found = self._conn.execute(
            f"SELECT {_ASSET_COLUMNS} FROM assets WHERE object_key = ?",  # noqa: S608
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
                f"SELECT {_ASSET_COLUMNS} FROM assets ORDER BY object_key"  # noqa: S608
            ).fetchall()
        return [AssetRow(*row) for row in rows]

    # -- multipart registry ----------------------------------------------------------

    def add_upload(
        self,
        upload_id: str,
        object_key: str,
        content_type: str,
        content_length: int,
        part_size: int,
        *,
        idempotency_key: str | None = None,
        request_digest: str = "",
        checksum: bool = False,
        if_none_match: bool = False,
    ) -> UploadRow:
        """Record a multipart upload just started, and the key of the call that did.

        ``checksum`` and ``if_none_match`` record what the upload was declared with.
        Keys older than :data:`IDEMPOTENCY_KEY_RETENTION_S` are dropped on the way.
        """
        now = _now()
        row = UploadRow(
            upload_id,
            object_key,
            content_type,
            content_length,
            part_size,
            _stamp(now),
            checksum=checksum,
            if_none_match=if_none_match,
        )
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "INSERT INTO multipart_uploads (upload_id, object_key, content_type,"
                    " content_length, part_size, created_at, checksum, if_none_match)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        upload_id,
                        object_key,
                        content_type,
                        content_length,
                        part_size,
                        row.created_at,
                        int(checksum),
                        int(if_none_match),
                    ),
                )
                if idempotency_key is not None:
                    self._conn.execute(
                        "INSERT OR REPLACE INTO initiate_keys (idempotency_key,"
                        " request_digest, upload_id, created_at) VALUES (?, ?, ?, ?)",
                        (idempotency_key, request_digest, upload_id, row.created_at),
                    )
                    cutoff = now - timedelta(seconds=IDEMPOTENCY_KEY_RETENTION_S)
                    self._conn.execute(
                        "DELETE FROM initiate_keys WHERE created_at < ?", (_stamp(cutoff),)
                    )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        return row

    def initiated_with(self, idempotency_key: str) -> tuple[str, str] | None:
        """``(request_digest, upload_id)`` of the initiate that carried this key."""
        with self._lock:
            found = self._conn.execute(
                "SELECT request_digest, upload_id FROM initiate_keys WHERE idempotency_key = ?",
                (idempotency_key,),
            ).fetchone()
        return None if found is None else (str(found[0]), str(found[1]))

    def get_upload(self, upload_id: str) -> UploadRow | None:
        """The registry row of ``upload_id``, or None."""
        with self._lock:
            found = self._conn.execute(
                f"SELECT {_UPLOAD_COLUMNS} FROM multipart_uploads WHERE upload_id = ?",  # noqa: S608
                (upload_id,),
            ).fetchone()
        return None if found is None else UploadRow(*found)

    def delete_upload(self, upload_id: str) -> bool:
        """Forget an upload; True when there was a row."""
        with self._lock:
            cursor = self._conn.execute(
                "DELETE FROM multipart_uploads WHERE upload_id = ?", (upload_id,)
            )
            return cursor.rowcount > 0

    def complete_upload(
        self,
        upload_id: str,
        *,
        etag: str,
        digest: str,
        size_bytes: int,
        content_type: str,
        public_url: str,
        checksum: str | None = None,
    ) -> AssetRow:
        """Record the asset and mark the upload completed, in one transaction.

        Completed rows older than :data:`COMPLETED_UPLOAD_RETENTION_S` are dropped on
        the way, so the registry stays small.

        Raises:
            KeyError: The upload is not in the registry.
        """
        now = _now()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                found = self._conn.execute(
                    "SELECT object_key FROM multipart_uploads WHERE upload_id = ?", (upload_id,)
                ).fetchone()
                if found is None:
                    raise KeyError(upload_id)
                object_key = str(found[0])
                self._upsert_locked(
                    object_key, etag, size_bytes, content_type, public_url, checksum
                )
                self._conn.execute(
                    "UPDATE multipart_uploads SET completed_at = ?, completed_etag = ?,"
                    " completed_digest = ? WHERE upload_id = ?",
                    (_stamp(now), etag, digest, upload_id),
                )
                self._drop_old_completions_locked(now)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            row = self._get_locked(object_key)
        assert row is not None
        return row

    def complete_set(self, records: Sequence[AssetRecord]) -> list[AssetRow]:
        """Upsert every row, and mark their multipart uploads completed, in one transaction.

        All rows are recorded or, when anything fails, none.

        Raises:
            KeyError: A record names an upload that is not in the registry.
        """
        now = _now()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for record in records:
                    self._upsert_locked(
                        record.object_key,
                        record.etag,
                        record.size_bytes,
                        record.content_type,
                        record.public_url,
                        record.checksum,
                    )
                    if record.upload_id is None:
                        continue
                    cursor = self._conn.execute(
                        "UPDATE multipart_uploads SET completed_at = ?, completed_etag = ?,"
                        " completed_digest = ? WHERE upload_id = ? AND object_key = ?",
                        (
                            _stamp(now),
                            record.etag,
                            record.digest,
                            record.upload_id,
                            record.object_key,
                        ),
                    )
                    if cursor.rowcount != 1:
                        raise KeyError(record.upload_id)
                self._drop_old_completions_locked(now)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            rows = [self._get_locked(record.object_key) for record in records]
        return [row for row in rows if row is not None]

    def _drop_old_completions_locked(self, now: datetime) -> None:
        cutoff = now - timedelta(seconds=COMPLETED_UPLOAD_RETENTION_S)
        self._conn.execute(
            "DELETE FROM multipart_uploads WHERE completed_at IS NOT NULL AND completed_at < ?",
            (_stamp(cutoff),),
        )

    def uploads(self) -> list[UploadRow]:
        """Every registry row, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_UPLOAD_COLUMNS} FROM multipart_uploads"  # noqa: S608
                " ORDER BY created_at, upload_id"
            ).fetchall()
        return [UploadRow(*row) for row in rows]

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()
