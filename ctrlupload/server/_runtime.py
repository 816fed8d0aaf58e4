"""Assemble and run the reference backend: config, store, database, app and server."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..protocol._parts import DEFAULT_PART_BYTES
from ._app import (
    DEFAULT_EXPIRES_SEC,
    DEFAULT_MAX_CONTENT_LENGTH,
    DEFAULT_MAX_OBJECT_BYTES,
    DEFAULT_MIN_PART_BYTES,
    ApiPaths,
    ReferenceBackend,
)
from ._db import AssetDB
from ._limits import ServerLimits
from ._local import LocalObjectStore
from ._store import ObjectStore


@dataclass(frozen=True)
class ServerConfig:
    """How to run the reference backend.

    Attributes:
        host: Address to bind.
        port: Port to bind; 0 picks a free one.
        store: ``local`` (files under ``data_dir``) or ``s3`` (boto3, ``ctrlupload[s3]``).
        data_dir: Objects (local store) and the SQLite database live here.
        token: The service token; a random one is generated when None.
        public_url: The URL clients reach this server at; ``http://host:port`` by default.
        max_content_length: Largest upload presign accepts (S3's 5 GiB single-PUT limit).
        expires_sec: Lifetime of presigned URLs.
        signing_secret: HMAC key of the local store's URLs; when None, the key kept in
            ``data_dir/signing.key`` (made on first start, mode 0600).
        db_path: The SQLite file; ``data_dir/assets.sqlite3`` by default.
        s3_bucket: Bucket of the s3 store.
        s3_endpoint_url: S3-compatible endpoint (MinIO, moto...); AWS when None.
        s3_region: Region of the bucket.
        s3_public_base_url: CDN base for public URLs of the s3 store.
        paths: Where the internal endpoints live.
        max_object_bytes: Largest multipart upload initiate accepts (S3's 5 TiB).
        min_part_bytes: Smallest part size (all parts but the last); S3 needs 5 MiB.
        default_part_bytes: Part size initiate answers when the client asks for none.
        sync_parts: fsync every multipart part as it arrives (local store), so that a
            power loss cannot keep a part's record without its bytes.
        limits: The HTTP server's threads, connections, timeouts and sizes.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    store: Literal["local", "s3"] = "local"
    data_dir: Path = Path("ctrlupload-data")
    token: str | None = field(default=None, repr=False)
    public_url: str | None = None
    max_content_length: int = DEFAULT_MAX_CONTENT_LENGTH
    expires_sec: int = DEFAULT_EXPIRES_SEC
    signing_secret: bytes | None = field(default=None, repr=False)
    db_path: Path | None = None
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_public_base_url: str | None = None
    paths: ApiPaths = field(default_factory=ApiPaths)
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    min_part_bytes: int = DEFAULT_MIN_PART_BYTES
    default_part_bytes: int = DEFAULT_PART_BYTES
    sync_parts: bool = False
    limits: ServerLimits = field(default_factory=ServerLimits)


class ReferenceServer:
    """The reference backend bound to a port, ready to serve.

    Use it as a context manager to serve on a background thread, or call
    :meth:`serve_forever` on the current one.

    Attributes:
        base_url: Where clients reach the backend (BACKEND_BASE_URL).
        address: ``(host, port)`` the server is bound to (behind a proxy, base_url is
            the proxy's).
        token: The service token (BACKEND_SERVICE_TOKEN).
        app: The WSGI application.
        db: The asset database.
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        config = config or ServerConfig()
        self.config = config
        self.token = config.token or secrets.token_urlsafe(24)
        from ._http import WSGIServer  # cheroot: ctrlupload[server]

        self._server = WSGIServer(None, config.host, config.port, config.limits)
        store: ObjectStore | None = None
        db: AssetDB | None = None
        try:
            host = self._server.host
            shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
            self.address = (shown_host, self._server.port)
            self.base_url = (
                config.public_url or f"http://{shown_host}:{self._server.port}"
            ).rstrip("/")
            data_dir = Path(config.data_dir)
            # The store first: the local one locks data_dir before anything is opened.
            self.store = store = self._make_store(config, data_dir)
            self.db = db = AssetDB(config.db_path or data_dir / "assets.sqlite3")
            self.app = ReferenceBackend(
                token=self.token,
                store=self.store,
                db=self.db,
                max_content_length=config.max_content_length,
                expires_sec=config.expires_sec,
                paths=config.paths,
                max_object_bytes=config.max_object_bytes,
                min_part_bytes=config.min_part_bytes,
                default_part_bytes=config.default_part_bytes,
            )
        except BaseException:
            self._server.stop()
            if db is not None:
                db.close()
            if store is not None:
                store.close()
            raise
        self._server.set_app(self.app)

    def _make_store(self, config: ServerConfig, data_dir: Path) -> ObjectStore:
        if config.store == "local":
            return LocalObjectStore(
                data_dir,
                self.base_url,
                signing_secret=config.signing_secret,
                sync_parts=config.sync_parts,
            )
        if config.store == "s3":
            from ._s3store import S3ObjectStore

            if not config.s3_bucket:
                raise ValueError("the s3 store needs a bucket (--s3-bucket / STORAGE_S3_BUCKET)")
            return S3ObjectStore(
                config.s3_bucket,
                endpoint_url=config.s3_endpoint_url,
                region=config.s3_region,
                public_base_url=config.s3_public_base_url,
            )
        raise ValueError(f"unknown store {config.store!r}; expected 'local' or 's3'")

    def limits_text(self) -> str:
        """The HTTP server's limits, in one line for the operator."""
        limits = self.config.limits
        return (
            f"{limits.threads} threads, at most {self._server.connection_cap} connections "
            f"(backlog {limits.backlog}), headers within {limits.header_timeout_s:g} s, "
            f"idle {limits.idle_timeout_s:g} s"
        )

    def __repr__(self) -> str:
        return f"ReferenceServer(base_url={self.base_url!r}, store={self.store!r})"

    def serve_forever(self) -> None:
        """Serve on this thread until :meth:`stop` is called from another one."""
        self._server.serve_forever()

    def start(self) -> ReferenceServer:
        """Serve on a daemon thread."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop serving, then close the database and the store (which frees data_dir)."""
        self._server.stop()
        self.db.close()
        self.store.close()

    def __enter__(self) -> ReferenceServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
