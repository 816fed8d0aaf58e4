"""The reference backend with its local store, over real loopback sockets.

The local store must reject uploads the way S3 does (moto checks none of this), so
these tests pin each rejection both on the wire and as the client sees it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from ctrlupload import (
    BackendError,
    BackendPresignedStorageProvider,
    Settings,
    StorageError,
    StorageTransferError,
)
from ctrlupload.server import (
    AssetDB,
    LocalObjectStore,
    PresignedPut,
    ReferenceBackend,
    ReferenceServer,
    ServerConfig,
    WSGIServer,
)

TOKEN = "reference-token-1234"
KEY = "videos/V-001/S-001/JOB-123/video.mp4"


@dataclass
class Reference:
    """A running reference backend, its parts and a client for it."""

    base_url: str
    store: LocalObjectStore
    db: AssetDB
    client: BackendPresignedStorageProvider

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def presign(self, key: str, content_type: str, length: int) -> dict[str, Any]:
        answer = requests.post(
            f"{self.base_url}/internal/storage/presign-put",
            json={"object_key": key, "content_type": content_type, "content_length": length},
            headers=self.auth(),
            timeout=5,
        )
        assert answer.status_code == 200, answer.text
        payload: dict[str, Any] = answer.json()
        return payload

    def staging_is_empty(self) -> bool:
        return not any(self.store.staging_dir.iterdir())


class SequenceClock:
    """Seconds since the epoch, taken from a list (the last value repeats)."""

    def __init__(self, *values: float) -> None:
        self._values = list(values)

    def __call__(self) -> float:
        return self._values.pop(0) if len(self._values) > 1 else self._values[0]


MakeReference = Callable[..., Reference]


@pytest.fixture
def make_reference(tmp_path: Path) -> Iterator[MakeReference]:
    running: list[tuple[WSGIServer, AssetDB, BackendPresignedStorageProvider]] = []

    def make(
        *,
        clock: Callable[[], float] | None = None,
        store_class: type[LocalObjectStore] = LocalObjectStore,
        **backend_options: Any,
    ) -> Reference:
        server = WSGIServer(None, "127.0.0.1", 0).start()
        base_url = f"http://127.0.0.1:{server.port}"
        store = store_class(
            tmp_path / f"data{len(running)}", base_url, **({"clock": clock} if clock else {})
        )
        db = AssetDB(tmp_path / f"assets{len(running)}.sqlite3")
        server.set_app(ReferenceBackend(token=TOKEN, store=store, db=db, **backend_options))
        client = BackendPresignedStorageProvider(
            Settings(
                BACKEND_BASE_URL=base_url,
                BACKEND_SERVICE_TOKEN=TOKEN,
                STORAGE_RETRY_ATTEMPTS=2,
                STORAGE_RETRY_BACKOFF_S=0.01,
            )
        )
        running.append((server, db, client))
        return Reference(base_url, store, db, client)

    yield make
    for server, db, client in running:
        client.close()
        server.stop()
        db.close()


@pytest.fixture
def reference(make_reference: MakeReference) -> Reference:
    return make_reference()


# -- the whole flow -------------------------------------------------------------------


def test_upload_is_stored_recorded_and_downloadable(reference: Reference, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    source = tmp_path / "video.mp4"
    source.write_bytes(data)

    result = reference.client.put_file(source, KEY)

    etag = f'"{hashlib.md5(data).hexdigest()}"'
    assert result.etag == etag
    assert result.url == f"{reference.base_url}/files/{KEY}"
    download = requests.get(result.url, timeout=5)
    assert download.status_code == 200
    assert download.content == data
    assert download.headers["Content-Type"] == "video/mp4"
    row = reference.db.get(KEY)
    assert row is not None
    assert (row.etag, row.size_bytes, row.content_type, row.public_url) == (
        etag,
        len(data),
        "video/mp4",
        result.url,
    )
    assert reference.staging_is_empty()


def test_zero_byte_upload_round_trips(reference: Reference) -> None:
    result = reference.client.put_object(b"", "videos/V/S/J/subtitles.srt")
    assert requests.get(result.url, timeout=5).content == b""
    assert reference.db.get("videos/V/S/J/subtitles.srt") is not None


def test_complete_is_an_upsert_that_keeps_created_at(reference: Reference) -> None:
    reference.client.put_object(b"first", "a/b.srt")
    first = reference.db.get("a/b.srt")
    reference.client.put_object(b"second version", "a/b.srt")
    second = reference.db.get("a/b.srt")
    assert first is not None and second is not None
    assert second.size_bytes == len(b"second version")
    assert second.created_at == first.created_at
    assert len(reference.db.all()) == 1


def test_delete_removes_object_and_row_and_is_idempotent(reference: Reference) -> None:
    result = reference.client.put_object(b"bytes", KEY)
    reference.client.delete(KEY)
    reference.client.delete(KEY)
    assert requests.get(result.url, timeout=5).status_code == 404
    assert reference.db.get(KEY) is None


def test_public_url_of_a_key_with_spaces_and_unicode(reference: Reference) -> None:
    key = "videos/영상 1/thumb #1.jpg"
    result = reference.client.put_object(b"jpeg", key)
    assert requests.get(result.url, timeout=5).content == b"jpeg"


# -- S3-like rejections on the wire -------------------------------------------------------


def put(url: str, body: Any, headers: dict[str, str]) -> requests.Response:
    return requests.put(url, data=body, headers=headers, timeout=5)


def s3_code(response: requests.Response) -> str:
    text = response.text
    return text.split("<Code>")[1].split("</Code>")[0]


def test_expired_url_is_refused_with_request_has_expired(make_reference: MakeReference) -> None:
    reference = make_reference(clock=SequenceClock(1_000, 1_000 + 601))
    signed = reference.presign(KEY, "video/mp4", 4)
    answer = put(signed["upload_url"], b"data", signed["headers"])
    assert answer.status_code == 403
    assert s3_code(answer) == "AccessDenied"
    assert "Request has expired" in answer.text
    assert reference.store.head(KEY) is None


def test_url_for_one_key_used_for_another_is_refused(reference: Reference) -> None:
    signed = reference.presign("a/one.mp4", "video/mp4", 4)
    parts = urlsplit(signed["upload_url"])
    other = f"{reference.base_url}/upload/a/two.mp4?{parts.query}"
    answer = put(other, b"data", signed["headers"])
    assert answer.status_code == 403
    assert s3_code(answer) == "SignatureDoesNotMatch"
    assert reference.store.head("a/two.mp4") is None


def test_tampered_signature_is_refused(reference: Reference) -> None:
    signed = reference.presign(KEY, "video/mp4", 4)
    url = signed["upload_url"][:-4] + "0000"
    answer = put(url, b"data", signed["headers"])
    assert answer.status_code == 403
    assert s3_code(answer) == "SignatureDoesNotMatch"


def test_unsigned_url_is_refused(reference: Reference) -> None:
    answer = put(f"{reference.base_url}/upload/{KEY}", b"data", {"Content-Type": "video/mp4"})
    assert answer.status_code == 403
    assert s3_code(answer) == "AccessDenied"


def test_other_content_type_than_signed_is_refused(reference: Reference) -> None:
    signed = reference.presign(KEY, "video/mp4", 4)
    answer = put(signed["upload_url"], b"data", {"Content-Type": "image/jpeg"})
    assert answer.status_code == 403
    assert s3_code(answer) == "SignatureDoesNotMatch"
    assert reference.store.head(KEY) is None


def test_other_content_length_than_signed_is_refused(reference: Reference) -> None:
    signed = reference.presign(KEY, "video/mp4", 4)
    answer = put(signed["upload_url"], b"longer data", signed["headers"])
    assert answer.status_code == 403
    assert s3_code(answer) == "SignatureDoesNotMatch"
    assert reference.store.head(KEY) is None


def test_chunked_body_is_refused_with_501(reference: Reference) -> None:
    signed = reference.presign(KEY, "video/mp4", 4)
    answer = put(signed["upload_url"], iter([b"da", b"ta"]), signed["headers"])
    assert answer.status_code == 501
    assert s3_code(answer) == "NotImplemented"
    assert reference.store.head(KEY) is None


def test_missing_content_length_is_refused_with_411(reference: Reference) -> None:
    signed = reference.presign(KEY, "video/mp4", 0)
    parts = urlsplit(signed["upload_url"])
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as conn:
        conn.sendall(
            f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: video/mp4\r\nConnection: close\r\n\r\n".encode()
        )
        reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.1 411")


def test_client_that_disconnects_mid_put_leaves_nothing(reference: Reference) -> None:
    size = 4 * 1024 * 1024
    signed = reference.presign(KEY, "video/mp4", size)
    parts = urlsplit(signed["upload_url"])
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as conn:
        conn.sendall(
            f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: video/mp4\r\nContent-Length: {size}\r\n\r\n".encode()
        )
        conn.sendall(os.urandom(300_000))
    # A later request on a fresh connection is served after the abandoned one ended.
    for _ in range(50):
        if reference.staging_is_empty():
            break
        requests.get(f"{reference.base_url}/healthz", timeout=5)
    assert reference.staging_is_empty()
    assert reference.store.head(KEY) is None
    answer = requests.post(
        f"{reference.base_url}/internal/storage/complete",
        json={
            "object_key": KEY,
            "etag": '"x"',
            "size_bytes": size,
            "content_type": "video/mp4",
            "public_url": "http://x",
        },
        headers=reference.auth(),
        timeout=5,
    )
    assert answer.status_code == 409
    assert reference.db.get(KEY) is None


# -- the same rejections as the client sees them ----------------------------------------------


def test_client_presigns_again_after_an_expired_url(make_reference: MakeReference) -> None:
    # presign at t=0, the PUT is checked at t=700 (expired), presign again, PUT at t=701.
    reference = make_reference(clock=SequenceClock(0, 700, 700, 701))
    result = reference.client.put_object(b"render bytes", KEY)
    assert requests.get(result.url, timeout=5).content == b"render bytes"


class _ExpiredSigningStore(LocalObjectStore):
    """Signs URLs that have already expired, while saying they last: a skewed clock."""

    def presign_put(
        self, key: str, content_type: str, content_length: int, expires_sec: int, **options: Any
    ) -> PresignedPut:
        signed = super().presign_put(key, content_type, content_length, -1, **options)
        return PresignedPut(signed.upload_url, signed.headers, expires_sec)


def test_client_reports_an_expired_url_it_cannot_renew(make_reference: MakeReference) -> None:
    reference = make_reference(store_class=_ExpiredSigningStore)
    with pytest.raises(StorageTransferError) as caught:
        reference.client.put_object(b"render bytes", KEY)
    assert "HTTP 403 (AccessDenied: Request has expired)" in str(caught.value)
    assert reference.store.head(KEY) is None
    assert reference.db.get(KEY) is None


class _MisSigningStore(LocalObjectStore):
    """Signs for one byte more than asked: a tampered or buggy presign."""

    def presign_put(
        self, key: str, content_type: str, content_length: int, expires_sec: int, **options: Any
    ) -> PresignedPut:
        return super().presign_put(key, content_type, content_length + 1, expires_sec, **options)


def test_tampered_presign_gives_a_clear_client_error_and_stores_nothing(
    make_reference: MakeReference,
) -> None:
    reference = make_reference(store_class=_MisSigningStore)
    with pytest.raises(StorageTransferError) as caught:
        reference.client.put_object(b"render bytes", KEY)
    assert "Upload to presigned URL failed: HTTP 403 (SignatureDoesNotMatch" in str(caught.value)
    assert caught.value.status_code == 403
    assert "signature=" not in str(caught.value)
    assert reference.store.head(KEY) is None
    assert reference.db.get(KEY) is None
    assert reference.staging_is_empty()


def test_presign_over_the_backend_maximum_is_a_client_backend_error(
    make_reference: MakeReference,
) -> None:
    reference = make_reference(max_content_length=10)
    with pytest.raises(BackendError) as caught:
        reference.client.put_object(b"eleven bytes", KEY)
    assert "Presign request failed: HTTP 400 (content_length 12 exceeds" in str(caught.value)


# -- the internal API's own checks ---------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong-token"}, 401),
        ({"Authorization": f"bearer {TOKEN}"}, 401),
        ({"Authorization": f"Bearer {TOKEN}"}, 200),
    ],
)
def test_bearer_token_is_required(
    reference: Reference, headers: dict[str, str], status: int
) -> None:
    answer = requests.post(
        f"{reference.base_url}/internal/storage/presign-put",
        json={"object_key": KEY, "content_type": "video/mp4", "content_length": 1},
        headers=headers,
        timeout=5,
    )
    assert answer.status_code == status
    if status == 401:
        assert answer.json()["error"] == "unauthorized"
        assert TOKEN not in answer.text


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "not valid JSON"),
        (json.dumps({"object_key": KEY}).encode(), "content_type: Field required"),
        (
            json.dumps(
                {"object_key": KEY, "content_type": "video/mp4", "content_length": "5"}
            ).encode(),
            "content_length",
        ),
        (
            json.dumps(
                {"object_key": KEY, "content_type": "video/mp4", "content_length": True}
            ).encode(),
            "content_length",
        ),
        (
            json.dumps(
                {"object_key": KEY, "content_type": "video/mp4", "content_length": -1}
            ).encode(),
            "content_length",
        ),
        (
            json.dumps(
                {"object_key": "../x", "content_type": "video/mp4", "content_length": 1}
            ).encode(),
            "object_key: key must not contain a '..' segment",
        ),
        (
            json.dumps(
                {"object_key": KEY, "content_type": "v", "content_length": 1, "x": 1}
            ).encode(),
            "x: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_presign_requests_get_400_with_a_clear_message(
    reference: Reference, body: bytes, fragment: str
) -> None:
    answer = requests.post(
        f"{reference.base_url}/internal/storage/presign-put",
        data=body,
        headers={**reference.auth(), "Content-Type": "application/json"},
        timeout=5,
    )
    assert answer.status_code == 400
    assert answer.json()["error"] == "bad_request"
    assert fragment in answer.json()["message"]


def test_complete_for_a_missing_or_different_object_is_409(reference: Reference) -> None:
    def complete(size: int, etag: str) -> requests.Response:
        return requests.post(
            f"{reference.base_url}/internal/storage/complete",
            json={
                "object_key": KEY,
                "etag": etag,
                "size_bytes": size,
                "content_type": "video/mp4",
                "public_url": "http://cdn/x",
            },
            headers=reference.auth(),
            timeout=5,
        )

    assert complete(4, '"whatever"').status_code == 409
    reference.client.put_object(b"data", KEY)
    good = f'"{hashlib.md5(b"data").hexdigest()}"'
    assert complete(5, good).json()["error"] == "object_mismatch"
    assert complete(4, '"' + "0" * 32 + '"').status_code == 409
    assert complete(4, good).status_code == 200


def test_unknown_paths_and_methods(reference: Reference) -> None:
    assert requests.get(f"{reference.base_url}/nope", timeout=5).status_code == 404
    answer = requests.get(f"{reference.base_url}/internal/storage/presign-put", timeout=5)
    assert answer.status_code == 405
    assert answer.json()["error"] == "method_not_allowed"


def test_openapi_document_is_served(reference: Reference) -> None:
    answer = requests.get(f"{reference.base_url}/openapi.yaml", timeout=5)
    assert answer.status_code == 200
    assert answer.text.startswith("openapi: 3.1")


def test_connections_are_kept_alive(reference: Reference) -> None:
    parts = urlsplit(reference.base_url)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as conn:
        replies = b""
        for _ in range(2):  # two requests, one connection
            conn.sendall(request)
            while replies.count(b'{"status": "ok"}') < _ + 1:
                chunk = conn.recv(4096)
                assert chunk, "the server closed a keep-alive connection"
                replies += chunk
    assert replies.count(b"HTTP/1.1 200") == 2


def test_reference_server_assembles_and_stops(tmp_path: Path) -> None:
    with ReferenceServer(ServerConfig(port=0, data_dir=tmp_path, token="given-token")) as server:
        assert server.token == "given-token"
        assert requests.get(f"{server.base_url}/healthz", timeout=5).json() == {"status": "ok"}
    assert (tmp_path / "assets.sqlite3").exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.base_url}/healthz", timeout=2)


def test_keys_the_filesystem_cannot_hold_are_refused_cleanly(reference: Reference) -> None:
    long_segment = "x" * 300  # a valid key, but longer than a file name may be
    with pytest.raises(StorageTransferError) as caught:
        reference.client.put_object(b"data", f"videos/{long_segment}.mp4")
    assert caught.value.status_code == 400
    assert "InvalidArgument" in str(caught.value)
    reference.client.delete(f"videos/{long_segment}.mp4")  # absent, not a 500
    reference.client.put_object(b"file", "a/b")
    with pytest.raises(StorageTransferError, match="HTTP 400"):
        reference.client.put_object(b"under a file", "a/b/c")
    assert reference.staging_is_empty()


def test_server_reprs_hold_no_token_and_no_signature(reference: Reference, tmp_path: Path) -> None:
    config = ServerConfig(port=0, data_dir=tmp_path, token="server-token-xyz")
    assert "server-token-xyz" not in repr(config)
    signed = reference.store.presign_put(KEY, "video/mp4", 4, 600)
    signature = signed.upload_url.split("signature=")[1]
    assert signature not in repr(signed)
    assert signature not in repr(reference.store)


def test_the_local_store_check_passes_on_a_writable_folder(tmp_path: Path) -> None:
    LocalObjectStore(tmp_path / "data", "http://127.0.0.1:1").check()


def test_the_local_store_check_names_a_folder_it_cannot_write(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "data", "http://127.0.0.1:1")
    shutil.rmtree(store.staging_dir)
    store.staging_dir.write_text("not a folder")  # even root cannot create files in it
    with pytest.raises(StorageError, match="cannot write under"):
        store.check()
