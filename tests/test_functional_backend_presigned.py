"""Functional tests of BackendPresignedStorageProvider over real loopback sockets.

The storage host is :class:`StorageSink` (a fake S3 that, like S3, answers chunked
bodies with 501, needs Content-Length and stores nothing from a short body) or a
:class:`RawSocketServer` running a fault handler; the backend is :class:`FakeBackend`.
Every test starts its own servers on free ports, and retries use a 0.01 s backoff.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

import ctrlupload
from ctrlupload import (
    BackendError,
    BackendPresignedStorageProvider,
    IntegrityError,
    SourceFileError,
    StorageError,
    StorageResult,
    StorageTransferError,
    TransportFailure,
    UploadTooLargeError,
    _checksum,
)
from tests.conftest import (
    TOKEN,
    RawStorageSetup,
    RecordingProgress,
    backend_settings,
    wait_until,
)
from tests.support.servers import (
    COMPLETE_PATH,
    DELETE_PATH,
    PRESIGN_PATH,
    FakeBackend,
    NoETag,
    RawBody,
    ResetMidBody,
    Stall,
    Status,
    StorageSink,
    WrongETag,
    close_after_request,
    garbage_response,
    never_answer,
    reset_immediately,
)
from tests.test_contract import crc_of as crc

KEY = "videos/V-001/S-001/JOB-123/video.mp4"
PUBLIC_URL = f"https://cdn.example.test/{KEY}"
MIB = 1024 * 1024

MakeProvider = Callable[..., BackendPresignedStorageProvider]
MakeFile = Callable[..., Path]
MakeRaw = Callable[..., RawStorageSetup]


def _presign_answer(sink: StorageSink, key: str = KEY, **headers: str) -> RawBody:
    """A hand-written presign answer pointing at ``sink`` (no ct/expires checks)."""
    payload = {
        "upload_url": f"{sink.base_url}/{key}?X-Amz-Signature=handwritten-signature",
        "public_url": f"https://cdn.example.test/{key}",
        "headers": headers,
        "expires_sec": 600,
    }
    return RawBody(200, json.dumps(payload).encode())


def _exception_texts(exc: BaseException) -> str:
    """Every text an exception can show: str, repr, its chain and the full traceback."""
    parts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None:
            parts += [str(linked), repr(linked)]
    return "\n".join(parts)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _assert_no_completion(backend: FakeBackend) -> None:
    assert backend.completed == []
    assert backend.requests_to(COMPLETE_PATH) == []


# --------------------------------------------------------------------------- streaming


def test_put_file_streams_12_mib_byte_identical_with_content_length_and_no_chunking(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    make_file: MakeFile,
    progress: RecordingProgress,
) -> None:
    size = 12 * MIB
    path = make_file(size)

    result = provider.put_file(path, KEY, progress=progress)

    data = path.read_bytes()
    assert sink.objects[KEY] == data
    (put,) = sink.put_requests()
    assert put.headers["content-length"] == str(size)
    assert "transfer-encoding" not in put.headers
    assert "authorization" not in put.headers
    assert put.headers["content-type"] == "video/mp4"
    assert put.body_size == size
    etag = f'"{hashlib.md5(data).hexdigest()}"'
    assert sink.stored[KEY].etag == etag
    (presign,) = backend.requests_to(PRESIGN_PATH)
    asked = {"object_key": KEY, "content_type": "video/mp4", "content_length": size}
    if _checksum.available():  # asked for, but this fake backend signs none: MD5 then
        asked |= {"checksum_algorithm": "CRC64NVME", "checksum": crc(data)}
    assert presign.json == asked
    assert backend.completed == [
        {
            "object_key": KEY,
            "etag": etag,
            "size_bytes": size,
            "content_type": "video/mp4",
            "public_url": PUBLIC_URL,
        }
    ]
    assert result == StorageResult(
        key=KEY,
        url=PUBLIC_URL,
        size_bytes=size,
        content_type="video/mp4",
        etag=etag,
        integrity="md5",
    )
    progress.assert_honest(size)
    assert any(0 < done < size for done in progress.done), "progress only at the ends"


def test_put_file_of_zero_bytes_sends_content_length_zero_not_chunked(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    make_file: MakeFile,
    progress: RecordingProgress,
) -> None:
    path = make_file(0, "empty.srt")
    key = "videos/V-001/S-001/JOB-123/subtitles.srt"

    result = provider.put_file(path, key, progress=progress)

    (put,) = sink.put_requests()
    assert put.headers.get("content-length") == "0"
    assert "transfer-encoding" not in put.headers
    assert sink.objects[key] == b""
    empty_etag = f'"{hashlib.md5(b"").hexdigest()}"'
    (completion,) = backend.completed
    assert completion["size_bytes"] == 0
    assert completion["etag"] == empty_etag
    assert completion["content_type"] == "application/x-subrip"
    assert result.size_bytes == 0
    assert result.etag == empty_etag
    progress.assert_honest(0)


def test_put_object_with_bytes_stores_them_with_their_length(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
) -> None:
    data = os.urandom(300_000)
    key = "videos/V-001/S-001/JOB-123/thumb.jpg"

    result = provider.put_object(data, key)

    assert sink.objects[key] == data
    (put,) = sink.put_requests()
    assert put.headers["content-length"] == str(len(data))
    assert put.headers["content-type"] == "image/jpeg"
    assert backend.completed[0]["size_bytes"] == len(data)
    assert result.size_bytes == len(data)


@pytest.mark.parametrize("kind", ["bytesio", "real_file"])
def test_put_object_with_file_object_uploads_only_the_remainder_from_its_position(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    tmp_path: Path,
    kind: str,
) -> None:
    prefix, payload = os.urandom(12_345), os.urandom(200_000)
    if kind == "bytesio":
        handle: io.BufferedIOBase = io.BytesIO(prefix + payload)
    else:
        path = tmp_path / "blob.bin"
        path.write_bytes(prefix + payload)
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    try:
        handle.seek(len(prefix))
        # A 503 makes urllib3 rewind the body: it must go back to the start position,
        # not to byte 0 of the file object.
        sink.inject(Status(503))
        result = provider.put_object(handle, KEY)
    finally:
        handle.close()

    assert sink.objects[KEY] == payload
    assert [p.headers["content-length"] for p in sink.put_requests()] == [str(len(payload))] * 2
    assert backend.completed[0]["size_bytes"] == len(payload)
    assert result.size_bytes == len(payload)


def test_explicit_content_type_is_presigned_and_sent_on_the_put(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    provider.put_object(b"payload", KEY, content_type="application/x-custom")

    assert backend.requests_to(PRESIGN_PATH)[0].json["content_type"] == "application/x-custom"
    assert sink.put_requests()[0].headers["content-type"] == "application/x-custom"
    assert backend.completed[0]["content_type"] == "application/x-custom"


def test_key_with_spaces_reserved_and_non_ascii_characters_round_trips(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    key = "videos/V 1/S?#%25&+/Jöb-ü/video.mp4"

    result = provider.put_object(b"payload", key)

    assert sink.objects == {key: b"payload"}
    assert backend.completed[0]["object_key"] == key
    assert result.key == key


def test_put_sends_the_presigned_headers_but_never_hop_headers_from_the_backend(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    backend.inject(
        PRESIGN_PATH,
        _presign_answer(
            sink,
            **{
                "Content-Type": "video/mp4",
                "x-amz-meta-job": "JOB-123",
                "x-amz-acl": "private",
                "Content-Length": "1",
                "Transfer-Encoding": "chunked",
            },
        ),
    )
    data = os.urandom(50_000)

    provider.put_object(data, KEY)

    (put,) = sink.put_requests()
    assert put.headers["x-amz-meta-job"] == "JOB-123"
    assert put.headers["x-amz-acl"] == "private"
    assert put.headers["content-length"] == str(len(data))
    assert "transfer-encoding" not in put.headers
    assert sink.objects[KEY] == data


# --------------------------------------------------------------------------- retries


def test_put_answered_503_then_200_is_retried_and_progress_is_not_double_counted(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    make_file: MakeFile,
    progress: RecordingProgress,
) -> None:
    size = 2 * MIB + 17
    path = make_file(size)
    sink.inject(Status(503))

    provider.put_file(path, KEY, progress=progress)

    puts = sink.put_requests()
    assert len(puts) == 2
    assert all(p.body_size == size for p in puts)
    assert list(sink.stored) == [KEY]
    assert sink.objects[KEY] == path.read_bytes()
    assert len(backend.requests_to(PRESIGN_PATH)) == 1
    assert len(backend.completed) == 1
    progress.assert_honest(size)


def test_connection_reset_mid_body_is_retried_from_the_start_and_bytes_arrive_intact(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    make_file: MakeFile,
    progress: RecordingProgress,
) -> None:
    size = 3 * MIB
    path = make_file(size)
    sink.inject(ResetMidBody(after_bytes=MIB))

    result = provider.put_file(path, KEY, progress=progress)

    first, second = sink.put_requests()
    assert first.body_size < size
    assert second.body_size == size
    assert second.headers["content-length"] == str(size)
    data = path.read_bytes()
    assert sink.objects[KEY] == data
    assert result.etag == f'"{hashlib.md5(data).hexdigest()}"'
    assert backend.completed[0]["etag"] == result.etag
    assert first.connection_id != second.connection_id
    progress.assert_honest(size)


class _ReadSpy(io.BytesIO):
    """A BytesIO that remembers where its latest read ended."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.read_end = 0

    def read(self, size: int | None = -1, /) -> bytes:
        block = super().read(size)
        self.read_end = self.tell()
        return block


def test_progress_during_a_resend_never_runs_ahead_of_the_bytes_read_again(
    make_provider: MakeProvider, sink: StorageSink
) -> None:
    provider = make_provider(STORAGE_SEND_BLOCK_BYTES=64 * 1024)
    size = 2 * MIB
    source = _ReadSpy(os.urandom(size))
    ahead: list[tuple[int, int]] = []

    def check(done: int, total: int) -> None:
        # Until the upload is confirmed, bytes_done counts distinct bytes read: after a
        # rewind it must wait for the resend to pass the old high-water mark.
        if done < total and done > source.read_end:
            ahead.append((done, source.read_end))

    sink.inject(ResetMidBody(after_bytes=MIB))
    provider.put_object(source, KEY, progress=check)

    assert len(sink.put_requests()) == 2
    assert sink.objects[KEY] == source.getvalue()
    assert ahead == []


def test_retry_after_on_503_is_honoured_over_the_tiny_backoff(
    provider: BackendPresignedStorageProvider, sink: StorageSink
) -> None:
    sink.inject(Status(503, retry_after="1"))

    provider.put_object(b"x" * 1000, KEY)

    first, second = sink.put_requests()
    assert second.received_at - first.received_at >= 0.9


def test_retry_after_longer_than_backoff_max_is_capped(
    make_provider: MakeProvider, sink: StorageSink
) -> None:
    provider = make_provider(STORAGE_RETRY_BACKOFF_MAX_S=1)
    sink.inject(Status(503, retry_after="3600"))

    started = time.monotonic()
    provider.put_object(b"x" * 1000, KEY)

    assert time.monotonic() - started < 5
    assert len(sink.put_requests()) == 2


def test_retry_after_is_capped_by_a_sub_second_backoff_max(
    make_provider: MakeProvider, sink: StorageSink
) -> None:
    # urllib3 takes an int cap; max(1, int(0.2)) would wait the full second.
    provider = make_provider(STORAGE_RETRY_BACKOFF_MAX_S=0.2)
    sink.inject(Status(503, retry_after="1"))

    provider.put_object(b"x" * 1000, KEY)

    first, second = sink.put_requests()
    assert second.received_at - first.received_at < 0.6


def test_unparsable_retry_after_falls_back_to_backoff_and_retries(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    # Plain urllib3 raises InvalidHeader here: one bad header, no retry at all.
    sink.inject(Status(503, retry_after="soon"))

    provider.put_object(b"x" * 1000, KEY)

    assert len(sink.put_requests()) == 2
    assert len(backend.completed) == 1


def test_429_with_retry_after_is_retried(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    sink.inject(Status(429, retry_after="0"))

    provider.put_object(b"x" * 1000, KEY)

    assert len(sink.put_requests()) == 2
    assert len(backend.completed) == 1


def test_persistent_503_exhausts_exactly_the_configured_attempts_then_fails(
    make_provider: MakeProvider,
    sink: StorageSink,
    backend: FakeBackend,
    progress: RecordingProgress,
) -> None:
    provider = make_provider(STORAGE_RETRY_ATTEMPTS=4)
    sink.inject(*[Status(503)] * 10)

    with pytest.raises(StorageTransferError) as caught:
        provider.put_object(b"x" * 1000, KEY, progress=progress)

    error = caught.value
    assert error.status_code == 503
    assert error.phase == "upload"
    assert error.key == KEY
    assert error.code == "STORAGE_UPLOAD_FAILED"
    assert str(error).startswith(
        f"Storage upload failed for '{KEY}': Upload to presigned URL failed: HTTP 503"
    )
    assert len(sink.put_requests()) == 4
    assert sink.pending_faults == 6
    assert len(backend.requests_to(PRESIGN_PATH)) == 1
    _assert_no_completion(backend)
    # Every byte went out four times, but the upload was never confirmed.
    assert max(progress.done) < 1000


@pytest.mark.parametrize("code", [400, 403, 404])
def test_storage_4xx_fails_at_once_without_retry_or_re_presign(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    code: int,
) -> None:
    sink.inject(Status(code), Status(code), Status(code))

    with pytest.raises(StorageTransferError) as caught:
        provider.put_object(b"x" * 1000, KEY)

    assert caught.value.status_code == code
    assert f"Upload to presigned URL failed: HTTP {code}" in str(caught.value)
    assert len(sink.put_requests()) == 1
    assert len(backend.requests_to(PRESIGN_PATH)) == 1
    _assert_no_completion(backend)


def test_403_access_denied_carries_the_s3_error_code_in_the_message(
    provider: BackendPresignedStorageProvider, sink: StorageSink
) -> None:
    sink.inject(Status(403))

    with pytest.raises(StorageTransferError) as caught:
        provider.put_object(b"x", KEY)

    assert "HTTP 403" in str(caught.value)
    assert "AccessDenied" in str(caught.value)


def test_expired_url_gets_one_fresh_presign_and_the_upload_succeeds(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    make_file: MakeFile,
    progress: RecordingProgress,
) -> None:
    size = 512 * 1024
    path = make_file(size)
    backend.expire_next_presigns(1)

    result = provider.put_file(path, KEY, progress=progress)

    assert len(backend.requests_to(PRESIGN_PATH)) == 2
    first, second = sink.put_requests()
    assert first.query["X-Amz-Signature"] != second.query["X-Amz-Signature"]
    assert second.body_size == size
    assert sink.objects[KEY] == path.read_bytes()
    assert len(backend.completed) == 1
    assert result.etag == sink.stored[KEY].etag
    progress.assert_honest(size)


def test_url_expired_twice_fails_with_http_403_request_has_expired(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    backend.expire_next_presigns(2)

    with pytest.raises(StorageTransferError) as caught:
        provider.put_object(b"x" * 1000, KEY)

    assert caught.value.status_code == 403
    assert "Upload to presigned URL failed: HTTP 403" in str(caught.value)
    assert "Request has expired" in str(caught.value)
    assert len(backend.requests_to(PRESIGN_PATH)) == 2
    assert len(sink.put_requests()) == 2
    assert sink.stored == {}
    _assert_no_completion(backend)


def test_complete_answered_503_then_200_is_retried_and_recorded_once(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    backend.inject(COMPLETE_PATH, Status(503))

    provider.put_object(b"x" * 1000, KEY)

    assert len(backend.requests_to(COMPLETE_PATH)) == 2
    assert len(backend.completed) == 1
    assert len(sink.put_requests()) == 1


# --------------------------------------------------------------------------- backend failures


def test_persistent_presign_500_fails_after_retries_without_touching_storage(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    backend.inject(PRESIGN_PATH, *[Status(500)] * 3)

    with pytest.raises(BackendError) as caught:
        provider.put_object(b"x", KEY)

    assert caught.value.phase == "presign"
    assert caught.value.status_code == 500
    assert str(caught.value).startswith(
        f"Storage upload failed for '{KEY}': Presign request failed: HTTP 500"
    )
    assert len(backend.requests_to(PRESIGN_PATH)) == 3
    assert sink.requests == []


def test_presign_500_then_200_is_retried(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    backend.inject(PRESIGN_PATH, Status(500))

    provider.put_object(b"x", KEY)

    assert len(backend.requests_to(PRESIGN_PATH)) == 2
    assert sink.objects[KEY] == b"x"


def test_persistent_complete_500_fails_with_complete_notification_failed(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    backend.inject(COMPLETE_PATH, *[Status(500)] * 3)

    with pytest.raises(BackendError) as caught:
        provider.put_object(b"x", KEY)

    assert caught.value.phase == "complete"
    assert caught.value.status_code == 500
    assert "Complete notification failed: HTTP 500" in str(caught.value)
    assert len(backend.requests_to(COMPLETE_PATH)) == 3
    assert backend.completed == []


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (RawBody(200, b"<html>not json</html>", "text/html"), "response is not JSON"),
        (RawBody(200, b'["a", "list"]'), "response is JSON but not an object"),
        (
            RawBody(200, json.dumps({"public_url": PUBLIC_URL, "headers": {}}).encode()),
            "response is missing 'upload_url'",
        ),
    ],
    ids=["not-json", "json-list", "missing-upload-url"],
)
def test_unusable_presign_answer_fails_before_any_put(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    answer: RawBody,
    reason: str,
) -> None:
    backend.inject(PRESIGN_PATH, answer)

    with pytest.raises(BackendError) as caught:
        provider.put_object(b"x", KEY)

    assert caught.value.phase == "presign"
    assert f"Presign request failed: {reason}" in str(caught.value)
    assert sink.requests == []
    _assert_no_completion(backend)


def test_presign_answer_missing_public_url_fails_before_any_put(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    payload = {"upload_url": f"{sink.base_url}/{KEY}", "headers": {}}
    backend.inject(PRESIGN_PATH, RawBody(200, json.dumps(payload).encode()))

    with pytest.raises(BackendError) as caught:
        provider.put_object(b"x", KEY)

    assert "response is missing 'public_url'" in str(caught.value)
    assert sink.requests == []


@pytest.mark.parametrize(
    "upload_url",
    [
        "file:///etc/passwd?X-Amz-Signature=leaky",
        "ftp://127.0.0.1/bucket/key?X-Amz-Signature=leaky",
        "gopher://127.0.0.1:70/x?X-Amz-Signature=leaky",
    ],
)
def test_non_http_upload_url_is_refused_before_any_put_without_echoing_it(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    upload_url: str,
) -> None:
    payload = {"upload_url": upload_url, "public_url": PUBLIC_URL, "headers": {}}
    backend.inject(PRESIGN_PATH, RawBody(200, json.dumps(payload).encode()))

    with pytest.raises(BackendError) as caught:
        provider.put_object(b"x", KEY)

    assert caught.value.phase == "presign"
    assert "upload_url" in str(caught.value)
    texts = _exception_texts(caught.value)
    assert "leaky" not in texts
    assert "/etc/passwd" not in texts
    assert sink.requests == []
    _assert_no_completion(backend)


def test_presign_headers_carrying_the_service_token_are_refused(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    backend.inject(PRESIGN_PATH, _presign_answer(sink, Authorization=f"Bearer {TOKEN}"))

    with pytest.raises(BackendError) as caught:
        provider.put_object(b"x", KEY)

    assert caught.value.phase == "presign"
    assert TOKEN not in _exception_texts(caught.value)
    assert sink.requests == []


def test_wrong_token_gets_401_once_and_never_reaches_storage(
    make_provider: MakeProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    provider = make_provider(BACKEND_SERVICE_TOKEN="wrong-token-value")

    with pytest.raises(BackendError) as caught:
        provider.put_object(b"x", KEY)

    assert caught.value.phase == "presign"
    assert caught.value.status_code == 401
    assert "Presign request failed: HTTP 401" in str(caught.value)
    assert "wrong-token-value" not in _exception_texts(caught.value)
    assert len(backend.requests_to(PRESIGN_PATH)) == 1
    assert sink.requests == []


def test_complete_answer_that_is_not_json_fails_in_phase_complete(
    provider: BackendPresignedStorageProvider, backend: FakeBackend
) -> None:
    backend.inject(COMPLETE_PATH, RawBody(200, b"OK", "text/plain"))

    with pytest.raises(BackendError) as caught:
        provider.put_object(b"x", KEY)

    assert caught.value.phase == "complete"
    assert "Complete notification failed: response is not JSON" in str(caught.value)


def test_backend_slower_than_the_read_timeout_fails_presign_with_timed_out(
    make_provider: MakeProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    provider = make_provider(STORAGE_READ_TIMEOUT_S=0.3, STORAGE_RETRY_ATTEMPTS=2)
    backend.inject(PRESIGN_PATH, Stall(3), Stall(3))

    started = time.monotonic()
    with pytest.raises(BackendError) as caught:
        provider.put_object(b"x", KEY)

    assert time.monotonic() - started < 2.5
    assert caught.value.phase == "presign"
    assert "Presign request failed: " in str(caught.value)
    assert "timed out" in str(caught.value)
    assert len(backend.requests_to(PRESIGN_PATH)) == 2
    assert sink.requests == []


# --------------------------------------------------------------------------- integrity


def test_etag_not_matching_the_bytes_sent_raises_integrity_error_and_skips_complete(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    progress: RecordingProgress,
) -> None:
    sink.inject(WrongETag())

    with pytest.raises(IntegrityError) as caught:
        provider.put_object(os.urandom(10_000), KEY, progress=progress)

    assert caught.value.phase == "integrity"
    assert len(sink.put_requests()) == 1
    _assert_no_completion(backend)
    assert max(progress.done) < 10_000


def test_etag_mismatch_is_detected_on_a_body_hashed_in_the_background(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    make_file: MakeFile,
) -> None:
    # Large enough for the hashing helper thread.
    path = make_file(9 * MIB)
    sink.inject(WrongETag())

    with pytest.raises(IntegrityError):
        provider.put_file(path, KEY)

    _assert_no_completion(backend)


def test_storage_answer_without_etag_raises_transfer_error_and_skips_complete(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    sink.inject(NoETag())

    with pytest.raises(StorageTransferError) as caught:
        provider.put_object(b"x" * 100, KEY)

    assert "ETag" in str(caught.value)
    assert caught.value.phase == "upload"
    _assert_no_completion(backend)


def test_md5_check_can_be_turned_off(
    make_provider: MakeProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    provider = make_provider(STORAGE_VERIFY_MD5=False)
    sink.inject(WrongETag())

    result = provider.put_object(b"x" * 100, KEY)

    assert backend.completed[0]["etag"] == result.etag
    assert result.etag != sink.stored[KEY].etag


# --------------------------------------------------------------------------- threads, pooling


def test_sixteen_threads_share_one_provider_without_mixups_or_pool_overflow(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="urllib3.connectionpool")
    bodies = {
        f"videos/V-{i:03d}/S-001/JOB-{i:03d}/video.mp4": os.urandom(256 * 1024) for i in range(64)
    }
    paths = {}
    for index, (key, body) in enumerate(bodies.items()):
        paths[key] = tmp_path / f"body-{index}.bin"
        paths[key].write_bytes(body)
    progresses = {key: RecordingProgress() for key in bodies}

    def upload(key: str) -> StorageResult:
        return provider.put_file(paths[key], key, progress=progresses[key])

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(upload, bodies))

    assert [r.key for r in results] == list(bodies)
    for key, body in bodies.items():
        assert sink.objects[key] == body
        progresses[key].assert_honest(len(body))
    by_key = {c["object_key"]: c for c in backend.completed}
    assert len(backend.completed) == 64
    for result in results:
        assert by_key[result.key]["etag"] == result.etag == sink.stored[result.key].etag
    full = [r for r in caplog.records if "pool is full" in r.getMessage()]
    assert full == []
    assert sink.connections_opened <= 16 + 2
    assert backend.connections_opened <= 16 + 2


def test_sequential_uploads_reuse_one_connection_per_host(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    for index in range(20):
        provider.put_object(os.urandom(10 * 1024), f"videos/V/S/J-{index}/video.mp4")

    assert len(sink.stored) == 20
    assert sink.connections_opened == 1
    assert backend.connections_opened == 1


# --------------------------------------------------------------------------- secrets


def test_token_goes_only_to_the_backend_never_to_storage(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
) -> None:
    sink.inject(Status(503))
    provider.put_object(b"x" * 1000, KEY)
    provider.delete(KEY)

    assert len(sink.requests) == 2
    for request in sink.requests:
        assert "authorization" not in request.headers
        assert all(TOKEN not in value for value in request.headers.values())
        assert all(TOKEN not in value for value in request.query.values())
        assert TOKEN not in request.path
    paths = [r.path for r in backend.requests]
    assert paths == [PRESIGN_PATH, COMPLETE_PATH, DELETE_PATH]
    for request in backend.requests:
        assert request.headers["authorization"] == f"Bearer {TOKEN}"


def test_netrc_credentials_are_not_sent_to_storage(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # requests adds Basic auth from ~/.netrc to any request without explicit auth.
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login netrc-user password netrc-password\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))

    provider.put_object(b"x" * 100, KEY)

    (put,) = sink.put_requests()
    assert "authorization" not in put.headers
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in backend.requests)


def test_retried_upload_logs_neither_signature_nor_token(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="urllib3")
    caplog.set_level(logging.DEBUG, logger="ctrlupload")
    sink.inject(Status(503), ResetMidBody(after_bytes=1000))

    provider.put_object(os.urandom(256 * 1024), KEY)

    signatures = {p.query["X-Amz-Signature"] for p in sink.put_requests()}
    assert len(sink.put_requests()) == 3
    messages = [record.getMessage() for record in caplog.records]
    # The test means something only if the request targets were logged at all.
    assert any("/videos/V-001/" in message for message in messages)
    assert any(record.levelno >= logging.WARNING for record in caplog.records)
    for text in [*messages, caplog.text]:
        assert TOKEN not in text
        assert "X-Amz-Signature=" not in text
        for signature in signatures:
            assert signature not in text


@pytest.mark.parametrize(
    "fault", [Status(503), ResetMidBody(after_bytes=1000)], ids=["status-503", "reset"]
)
def test_exhausted_retries_error_and_its_chain_hold_neither_signature_nor_token(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    caplog: pytest.LogCaptureFixture,
    fault: Status | ResetMidBody,
) -> None:
    caplog.set_level(logging.DEBUG, logger="urllib3")
    caplog.set_level(logging.DEBUG, logger="ctrlupload")
    sink.inject(fault, fault, fault)

    with pytest.raises(StorageTransferError) as caught:
        provider.put_object(os.urandom(64 * 1024), KEY)

    error = caught.value
    wait_until(lambda: len(sink.put_requests()) == 3)
    signature = sink.put_requests()[0].query["X-Amz-Signature"]
    texts = _exception_texts(error) + "\n" + caplog.text
    assert signature not in texts
    assert "X-Amz-Signature" not in texts
    assert TOKEN not in texts
    if isinstance(fault, ResetMidBody):
        assert isinstance(error.__cause__, TransportFailure)
        assert error.__context__ is error.__cause__
        assert error.__cause__.__cause__ is None
        assert error.__cause__.__context__ is None


# --------------------------------------------------------------------------- raw sockets


def test_storage_resetting_every_connection_fails_with_a_redacted_transport_cause(
    make_raw_storage_provider: MakeRaw,
) -> None:
    provider, raw, backend = make_raw_storage_provider(reset_immediately)

    with pytest.raises(StorageTransferError) as caught:
        provider.put_object(b"x" * 1000, KEY)

    error = caught.value
    assert isinstance(error.__cause__, TransportFailure)
    assert not isinstance(error.__cause__, requests.RequestException)
    assert error.phase == "upload"
    assert "Upload to presigned URL failed: connection failed" in str(error)
    assert "X-Amz-Signature" not in _exception_texts(error)
    assert raw.connections_opened == 3
    assert backend.completed == []


@pytest.mark.parametrize("handler", [garbage_response, close_after_request])
def test_storage_answering_garbage_or_nothing_fails_with_transport_failure(
    make_raw_storage_provider: MakeRaw, handler: Callable[[socket.socket], None]
) -> None:
    provider, raw, backend = make_raw_storage_provider(handler)

    with pytest.raises(StorageTransferError) as caught:
        provider.put_object(b"x" * 1000, KEY)

    assert isinstance(caught.value.__cause__, TransportFailure)
    assert "X-Amz-Signature" not in _exception_texts(caught.value)
    assert raw.connections_opened == 3
    assert backend.completed == []


def test_storage_that_never_answers_times_out_after_the_configured_attempts(
    make_raw_storage_provider: MakeRaw,
) -> None:
    provider, raw, backend = make_raw_storage_provider(
        never_answer, STORAGE_READ_TIMEOUT_S=0.5, STORAGE_RETRY_ATTEMPTS=2
    )

    started = time.monotonic()
    with pytest.raises(StorageTransferError) as caught:
        provider.put_object(b"x" * 1000, KEY)
    elapsed = time.monotonic() - started

    assert "timed out" in str(caught.value)
    assert isinstance(caught.value.__cause__, TransportFailure)
    assert raw.connections_opened == 2
    assert 0.9 <= elapsed < 5
    assert backend.completed == []


def test_read_timeout_is_labelled_timed_out_not_connection_failed(
    make_raw_storage_provider: MakeRaw,
) -> None:
    # requests reports a read timeout that exhausted the retries as a ConnectionError.
    provider, _, _ = make_raw_storage_provider(
        never_answer, STORAGE_READ_TIMEOUT_S=0.3, STORAGE_RETRY_ATTEMPTS=1
    )

    with pytest.raises(StorageTransferError) as caught:
        provider.put_object(b"x" * 1000, KEY)

    assert "Upload to presigned URL failed: timed out" in str(caught.value)


def test_backend_on_a_closed_port_fails_as_backend_error_in_presign() -> None:
    settings = backend_settings(f"http://127.0.0.1:{_free_port()}")
    with (
        BackendPresignedStorageProvider(settings) as provider,
        pytest.raises(BackendError) as caught,
    ):
        provider.put_object(b"x", KEY)

    assert caught.value.phase == "presign"
    assert "Presign request failed: connection failed" in str(caught.value)
    assert isinstance(caught.value.__cause__, TransportFailure)
    assert TOKEN not in _exception_texts(caught.value)


# --------------------------------------------------------------------------- source files


def test_missing_file_fails_before_any_request(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    tmp_path: Path,
) -> None:
    with pytest.raises(SourceFileError) as caught:
        provider.put_file(tmp_path / "nope.mp4", KEY)

    assert caught.value.phase == "source"
    assert "not found" in str(caught.value)
    assert backend.requests == []
    assert sink.requests == []


def test_directory_fails_before_any_request(
    provider: BackendPresignedStorageProvider,
    sink: StorageSink,
    backend: FakeBackend,
    tmp_path: Path,
) -> None:
    with pytest.raises(SourceFileError) as caught:
        provider.put_file(tmp_path, KEY)

    assert "directory" in str(caught.value)
    assert backend.requests == []
    assert sink.requests == []


def test_device_file_is_refused_as_not_a_regular_file(
    provider: BackendPresignedStorageProvider, backend: FakeBackend
) -> None:
    with pytest.raises(SourceFileError) as caught:
        provider.put_file(os.devnull, KEY)

    assert "not a regular file" in str(caught.value)
    assert backend.requests == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_is_refused_at_once_instead_of_waiting_for_a_writer(
    provider: BackendPresignedStorageProvider, backend: FakeBackend, tmp_path: Path
) -> None:
    fifo = tmp_path / "render.pipe"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def upload() -> None:
        try:
            provider.put_file(fifo, KEY)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=upload, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():
        # Unblock the open() so the thread ends, then fail.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail("put_file blocked opening a FIFO")
    (error,) = outcome
    assert isinstance(error, SourceFileError)
    assert "not a regular file" in str(error)
    assert backend.requests == []


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root reads files whatever their mode",
)
def test_unreadable_file_fails_before_any_request(
    provider: BackendPresignedStorageProvider,
    backend: FakeBackend,
    make_file: MakeFile,
) -> None:
    path = make_file(100)
    path.chmod(0)

    with pytest.raises(SourceFileError) as caught:
        provider.put_file(path, KEY)

    assert "not readable" in str(caught.value)
    assert backend.requests == []


def _grow(path: Path) -> None:
    with open(path, "ab") as handle:
        handle.write(b"more")


def _shrink(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _rewrite_in_place(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.write(b"\x00" * 16)


@pytest.mark.parametrize("change", [_grow, _shrink, _rewrite_in_place])
def test_file_changed_during_upload_fails_and_nothing_is_stored_or_completed(
    make_provider: MakeProvider,
    sink: StorageSink,
    backend: FakeBackend,
    make_file: MakeFile,
    change: Callable[[Path], None],
) -> None:
    provider = make_provider(STORAGE_SEND_BLOCK_BYTES=4096)
    size = 256 * 1024
    path = make_file(size)
    # An old mtime, so an in-place rewrite changes it even on a coarse clock.
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    changed = threading.Event()

    def change_after_first_block(done: int, total: int) -> None:
        if done > 0 and not changed.is_set():
            changed.set()
            change(path)

    with pytest.raises(SourceFileError) as caught:
        provider.put_file(path, KEY, progress=change_after_first_block)

    assert changed.is_set()
    assert "changed during upload" in str(caught.value)
    assert caught.value.phase == "source"
    assert wait_until(lambda: len(sink.put_requests()) == 1)
    (put,) = sink.put_requests()
    assert put.body_size < size, "the body went out whole although the file changed"
    assert sink.stored == {}
    _assert_no_completion(backend)


# --------------------------------------------------------------------------- limits, callbacks


def test_file_over_the_size_limit_fails_before_any_request_with_seed_text(
    make_provider: MakeProvider,
    sink: StorageSink,
    backend: FakeBackend,
    make_file: MakeFile,
) -> None:
    provider = make_provider(VIDEO_MAX_UPLOAD_BYTES=MIB)
    path = make_file(MIB + MIB // 2)

    with pytest.raises(UploadTooLargeError) as caught:
        provider.put_file(path, KEY)

    assert str(caught.value) == (
        f"Storage upload failed for '{KEY}': File size 1.5 MiB exceeds limit 1.0 MiB "
        "(VIDEO_MAX_UPLOAD_BYTES=1048576)"
    )
    assert caught.value.phase == "validate"
    assert backend.requests == []
    assert sink.requests == []


def test_file_exactly_at_the_size_limit_is_accepted(
    make_provider: MakeProvider, sink: StorageSink, make_file: MakeFile
) -> None:
    provider = make_provider(VIDEO_MAX_UPLOAD_BYTES=100_000)

    provider.put_file(make_file(100_000), KEY)

    assert sink.stored[KEY].size_bytes == 100_000


def test_bytes_over_the_size_limit_fail_before_any_request(
    make_provider: MakeProvider, backend: FakeBackend
) -> None:
    provider = make_provider(VIDEO_MAX_UPLOAD_BYTES=10)

    with pytest.raises(UploadTooLargeError):
        provider.put_object(b"x" * 11, KEY)

    assert backend.requests == []


class _CallbackBoom(RuntimeError):
    pass


def test_progress_callback_that_raises_mid_body_surfaces_its_error_and_completes_nothing(
    make_provider: MakeProvider,
    sink: StorageSink,
    backend: FakeBackend,
    make_file: MakeFile,
) -> None:
    provider = make_provider(STORAGE_SEND_BLOCK_BYTES=4096)
    size = 128 * 1024

    def explode(done: int, total: int) -> None:
        if done > 0:
            raise _CallbackBoom("progress bar broke")

    # Documented: the callback's own exception reaches the caller unchanged (it is no
    # transport fault, so urllib3 neither retries nor wraps it): a way to cancel.
    with pytest.raises(_CallbackBoom, match="progress bar broke"):
        provider.put_file(make_file(size), KEY, progress=explode)

    assert wait_until(lambda: len(sink.put_requests()) == 1)
    assert len(sink.put_requests()) == 1, "a failing callback must not be retried"
    assert sink.stored == {}
    _assert_no_completion(backend)


def test_progress_callback_raising_an_os_error_is_not_mistaken_for_a_network_fault(
    make_provider: MakeProvider,
    sink: StorageSink,
    backend: FakeBackend,
    make_file: MakeFile,
) -> None:
    # urllib3 retries any OSError raised while it sends a body; a callback's own
    # ConnectionError (an OSError) must stop the upload and reach the caller as is.
    provider = make_provider(STORAGE_SEND_BLOCK_BYTES=4096)

    def explode(done: int, total: int) -> None:
        if done > 0:
            raise ConnectionAbortedError("the UI went away")

    with pytest.raises(ConnectionAbortedError, match="the UI went away"):
        provider.put_file(make_file(64 * 1024), KEY, progress=explode)
    assert wait_until(lambda: len(sink.put_requests()) == 1)
    assert len(sink.put_requests()) == 1
    _assert_no_completion(backend)


def test_progress_callback_that_raises_on_the_final_report_does_not_fail_a_stored_upload(
    provider: BackendPresignedStorageProvider,
    backend: FakeBackend,
    make_file: MakeFile,
    caplog: pytest.LogCaptureFixture,
) -> None:
    size = 64 * 1024

    def explode_at_the_end(done: int, total: int) -> None:
        if done == total:
            raise _CallbackBoom("bar closed early")

    with caplog.at_level(logging.WARNING, logger="ctrlupload"):
        result = provider.put_file(make_file(size), KEY, progress=explode_at_the_end)

    assert result.size_bytes == size
    assert [c["object_key"] for c in backend.completed] == [KEY]
    assert any("final report" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- delete, lifecycle


def test_delete_posts_the_object_key_to_the_backend(
    provider: BackendPresignedStorageProvider, sink: StorageSink, backend: FakeBackend
) -> None:
    provider.delete(KEY)

    assert backend.deleted == [{"object_key": KEY}]
    (request,) = backend.requests_to(DELETE_PATH)
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert sink.requests == []


def test_persistent_delete_500_fails_with_delete_request_failed(
    provider: BackendPresignedStorageProvider, backend: FakeBackend
) -> None:
    backend.inject(DELETE_PATH, *[Status(500)] * 3)

    with pytest.raises(BackendError) as caught:
        provider.delete(KEY)

    assert caught.value.phase == "delete"
    assert caught.value.status_code == 500
    assert "Delete request failed: HTTP 500" in str(caught.value)
    assert backend.deleted == []


def test_delete_with_a_bad_key_sends_nothing(
    provider: BackendPresignedStorageProvider, backend: FakeBackend
) -> None:
    with pytest.raises(ctrlupload.InvalidKeyError):
        provider.delete("../escape.mp4")

    assert backend.requests == []


def test_context_manager_closes_the_connections_and_later_use_raises_storage_error(
    backend: FakeBackend, sink: StorageSink
) -> None:
    settings = backend_settings(backend.base_url)
    with BackendPresignedStorageProvider(settings) as provider:
        assert isinstance(provider, BackendPresignedStorageProvider)
        provider.put_object(b"x", KEY)

    # The servers see the kept-alive connections hang up once the provider closes.
    assert wait_until(lambda: not sink._live and not backend._live)
    with pytest.raises(StorageError, match="closed"):
        provider.put_object(b"x", KEY)
    with pytest.raises(StorageError, match="closed"):
        provider.delete(KEY)
    assert len(backend.requests) == 2
