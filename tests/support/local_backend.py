"""The reference backend on a local store, in-process, with its API called by hand.

:func:`local_backend` starts the app on a loopback :class:`WSGIServer` over a
:class:`LocalObjectStore` (optionally wrapped, to interleave calls deterministically)
and an :class:`AssetDB`, both under one data directory, and stops all three on exit so
that another backend can open the same directory afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from ctrlupload.server import AssetDB, LocalObjectStore, ReferenceBackend, WSGIServer
from ctrlupload.server._store import ObjectStore

TOKEN = "local-backend-token-0123456789"
TIMEOUT_S = 10
MULTIPART = "/internal/storage/multipart"
#: A small part size, so that multipart tests need not move megabytes.
SMALL_PART = 64 * 1024


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class StoreWrapper:
    """Passes every call to the real store; subclasses step in front of some of them."""

    def __init__(self, real: LocalObjectStore) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@dataclass
class LocalBackend:
    """A running reference backend on a local store."""

    base_url: str
    store: LocalObjectStore
    db: AssetDB
    app: ReferenceBackend
    data_dir: Path

    def post(self, path: str, **payload: Any) -> requests.Response:
        return requests.post(
            f"{self.base_url}{path}",
            json=payload,
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=TIMEOUT_S,
        )

    def put(self, key: str, body: bytes, content_type: str = "video/mp4") -> requests.Response:
        """Presign and PUT one object; the PUT's answer."""
        answer = self.post(
            "/internal/storage/presign-put",
            object_key=key,
            content_type=content_type,
            content_length=len(body),
        )
        assert answer.status_code == 200, answer.text
        signed = answer.json()
        return requests.put(
            signed["upload_url"], data=body, headers=signed["headers"], timeout=TIMEOUT_S
        )

    def complete(self, key: str, body: bytes, content_type: str = "video/mp4") -> requests.Response:
        return self.post(
            "/internal/storage/complete",
            object_key=key,
            etag=f'"{md5_hex(body)}"',
            size_bytes=len(body),
            content_type=content_type,
            public_url=f"{self.base_url}/files/{key}",
        )

    def upload_parts(self, key: str, data: bytes) -> tuple[str, list[tuple[int, str]]]:
        """Initiate a multipart upload in SMALL_PART parts and PUT all of them."""
        answer = self.post(
            f"{MULTIPART}/initiate",
            object_key=key,
            content_type="video/mp4",
            content_length=len(data),
            part_size=SMALL_PART,
        )
        assert answer.status_code == 200, answer.text
        upload_id = answer.json()["upload_id"]
        assert answer.json()["part_size"] == SMALL_PART
        count = max(1, -(-len(data) // SMALL_PART))
        answer = self.post(
            f"{MULTIPART}/presign-parts",
            object_key=key,
            upload_id=upload_id,
            part_numbers=list(range(1, count + 1)),
        )
        assert answer.status_code == 200, answer.text
        etags = []
        for signed in answer.json()["parts"]:
            number = signed["part_number"]
            body = data[(number - 1) * SMALL_PART : number * SMALL_PART]
            put = requests.put(signed["upload_url"], data=body, timeout=TIMEOUT_S)
            assert put.status_code == 200, put.text
            etags.append((number, put.headers["ETag"]))
        return upload_id, etags

    def complete_parts(
        self, key: str, upload_id: str, etags: list[tuple[int, str]], size: int
    ) -> requests.Response:
        return self.post(
            f"{MULTIPART}/complete",
            object_key=key,
            upload_id=upload_id,
            parts=[{"part_number": number, "etag": etag} for number, etag in etags],
            size_bytes=size,
            content_type="video/mp4",
        )

    def get(self, key: str) -> requests.Response:
        return requests.get(f"{self.base_url}/files/{key}", timeout=TIMEOUT_S)


@contextlib.contextmanager
def local_backend(
    data_dir: Path,
    *,
    wrap: Callable[[LocalObjectStore], ObjectStore] | None = None,
    db_class: type[AssetDB] = AssetDB,
    **options: Any,
) -> Iterator[LocalBackend]:
    """A reference backend on ``data_dir``.

    ``wrap`` puts a store in front of the real one, and ``db_class`` may be a subclass
    of :class:`AssetDB` that steps in front of some calls.
    """
    server = WSGIServer(None, "127.0.0.1", 0).start()
    base_url = f"http://127.0.0.1:{server.port}"
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        store = LocalObjectStore(data_dir, base_url)
        stack.callback(store.close)
        db = db_class(data_dir / "assets.sqlite3")
        stack.callback(db.close)
        app = ReferenceBackend(
            token=TOKEN,
            store=wrap(store) if wrap else store,
            db=db,
            min_part_bytes=SMALL_PART,
            **options,
        )
        server.set_app(app)
        yield LocalBackend(base_url, store, db, app, data_dir)
