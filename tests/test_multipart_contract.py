"""Multipart upload at contract level, with `responses`: every call's JSON, the
fallback for backends without the extension, and abort on failure.

Real-socket behaviour (parallel parts, resume after a kill, moto) is in
test_multipart_functional.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import responses

from ctrlupload import (
    BackendError,
    BackendPresignedStorageProvider,
    IntegrityError,
    StorageTransferError,
    UploadTooLargeError,
    _checksum,
)
from ctrlupload.protocol import MIB
from tests.conftest import backend_settings

BACKEND = "http://backend.test"
STORAGE = "https://bucket.s3.test"
KEY = "videos/V/S/J/video.mp4"
MP = f"{BACKEND}/internal/storage/multipart"
PART = 5 * MIB
SIZE = 2 * PART + 123


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def video(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "video.mp4"
    path.write_bytes(data)
    return path, data


def make_client(**overrides: Any) -> BackendPresignedStorageProvider:
    values = {
        "STORAGE_MULTIPART_THRESHOLD_BYTES": PART,
        "STORAGE_MULTIPART_PART_BYTES": PART,
        "STORAGE_MULTIPART_CONCURRENCY": 2,
        "VIDEO_MAX_UPLOAD_BYTES": 10 * 1024 * MIB,
        **overrides,
    }
    return BackendPresignedStorageProvider(backend_settings(BACKEND, **values))


class FakeMultipartBackend:
    """Answers the multipart calls and stores parts; records what it was asked."""

    def __init__(
        self, mocked: responses.RequestsMock, *, part_status: dict[int, int] | None = None
    ) -> None:
        self.parts: dict[int, bytes] = {}
        self.presigned_batches: list[list[int]] = []
        self.completed: list[dict[str, Any]] = []
        self.aborted: list[dict[str, Any]] = []
        self.part_status = part_status or {}
        mocked.add_callback(responses.POST, f"{MP}/initiate", callback=self.initiate)
        mocked.add_callback(responses.POST, f"{MP}/presign-parts", callback=self.presign)
        mocked.add_callback(responses.POST, f"{MP}/complete", callback=self.complete)
        mocked.add_callback(responses.POST, f"{MP}/abort", callback=self.abort)
        for number in range(1, 10):
            mocked.add_callback(
                responses.PUT, f"{STORAGE}/{KEY}.part{number}", callback=self.put_part
            )

    def initiate(self, request: Any) -> tuple[int, dict[str, str], str]:
        self.initiated = json.loads(request.body)
        return 200, {}, json.dumps({"upload_id": "up-1", "part_size": PART, "expires_sec": 600})

    def presign(self, request: Any) -> tuple[int, dict[str, str], str]:
        body = json.loads(request.body)
        assert body["upload_id"] == "up-1"
        self.presigned_batches.append(body["part_numbers"])
        parts = [
            {
                "part_number": n,
                "upload_url": f"{STORAGE}/{KEY}.part{n}?X-Amz-Signature=s{n}",
                "headers": {},
            }
            for n in body["part_numbers"]
        ]
        return 200, {}, json.dumps({"parts": parts, "expires_sec": 600})

    def put_part(self, request: Any) -> tuple[int, dict[str, str], bytes]:
        number = int(request.url.split(".part")[1].split("?")[0])
        body = request.body if isinstance(request.body, bytes) else request.body.read()
        status = self.part_status.get(number, 200)
        if status != 200:
            return status, {}, b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"
        self.parts[number] = body
        return 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b""

    def complete(self, request: Any) -> tuple[int, dict[str, str], str]:
        body = json.loads(request.body)
        self.completed.append(body)
        return 200, {}, json.dumps({"public_url": f"https://cdn.test/{KEY}", "etag": '"abc-3"'})

    def abort(self, request: Any) -> tuple[int, dict[str, str], str]:
        self.aborted.append(json.loads(request.body))
        return 200, {}, json.dumps({"status": "ok"})


def test_multipart_flow_sends_every_part_and_completes_in_order(mocked, video) -> None:  # type: ignore[no-untyped-def]
    path, data = video
    backend = FakeMultipartBackend(mocked)
    with make_client() as client:
        result = client.put_file(path, KEY)
    asked = {"object_key": KEY, "content_type": "video/mp4", "content_length": SIZE}
    asked["part_size"] = PART
    if _checksum.available():  # declared; this backend echoes nothing, so MD5 parts
        asked |= {"checksum_algorithm": "CRC64NVME", "checksum_type": "FULL_OBJECT"}
    assert backend.initiated == asked
    assert result.integrity == "md5"
    assert b"".join(backend.parts[n] for n in sorted(backend.parts)) == data
    (completion,) = backend.completed
    assert completion["upload_id"] == "up-1"
    assert completion["size_bytes"] == SIZE
    assert completion["content_type"] == "video/mp4"
    assert [p["part_number"] for p in completion["parts"]] == [1, 2, 3]
    assert completion["parts"][0]["etag"] == f'"{hashlib.md5(data[:PART]).hexdigest()}"'
    assert (result.url, result.etag, result.size_bytes) == (
        f"https://cdn.test/{KEY}",
        '"abc-3"',
        SIZE,
    )
    assert backend.aborted == []


def test_parts_are_presigned_in_batches_not_all_up_front(mocked, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "big.mp4"
    path.write_bytes(os.urandom(8 * PART + 1))  # 9 parts
    backend = FakeMultipartBackend(mocked)
    with make_client(STORAGE_MULTIPART_CONCURRENCY=1) as client:
        client.put_file(path, KEY)
    assert len(backend.presigned_batches) >= 2
    assert max(len(batch) for batch in backend.presigned_batches) == 4  # 2 x concurrency, min 4
    assert sorted(n for batch in backend.presigned_batches for n in batch) == list(range(1, 10))


@pytest.mark.parametrize("status", [404, 405, 501])
def test_backend_without_multipart_gets_single_puts_and_one_info_log(
    mocked,
    video,
    status,
    caplog,  # type: ignore[no-untyped-def]
) -> None:
    path, data = video
    mocked.post(f"{MP}/initiate", status=status)
    mocked.post(
        f"{BACKEND}/internal/storage/presign-put",
        json={
            "upload_url": f"{STORAGE}/{KEY}?X-Amz-Signature=1",
            "public_url": "https://cdn/x",
            "headers": {},
        },
    )
    mocked.put(f"{STORAGE}/{KEY}", headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
    mocked.post(f"{BACKEND}/internal/storage/complete", json={"status": "ok"})
    with caplog.at_level(logging.INFO, logger="ctrlupload"), make_client() as client:
        client.put_file(path, KEY)
        client.put_file(path, KEY)
    initiates = [c for c in mocked.calls if c.request.url.endswith("/initiate")]
    assert len(initiates) == 1  # remembered for the life of the provider
    assert sum("single PUT" in r.getMessage() for r in caplog.records) == 1
    puts = [c for c in mocked.calls if c.request.method == "PUT"]
    assert len(puts) == 2


def test_always_mode_with_a_backend_without_multipart_is_an_error(mocked, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(f"{MP}/initiate", status=404)
    with make_client(STORAGE_MULTIPART="always") as client, pytest.raises(BackendError) as caught:
        client.put_file(video[0], KEY)
    assert "does not offer multipart uploads and STORAGE_MULTIPART=always" in str(caught.value)


def test_never_mode_refuses_a_body_over_the_single_put_limit_before_any_call(mocked) -> None:  # type: ignore[no-untyped-def]
    class Huge:
        """A seekable stream that claims 6 GiB without holding it."""

        def read(self, size: int = -1) -> bytes:
            return b""

        def seekable(self) -> bool:
            return True

        def tell(self) -> int:
            return 0

        def seek(self, offset: int, whence: int = 0) -> int:
            return 6 * 1024 * MIB if whence == 2 else offset

    with (
        make_client(STORAGE_MULTIPART="never") as client,
        pytest.raises(UploadTooLargeError) as caught,
    ):
        client.put_object(Huge(), KEY)  # type: ignore[arg-type]
    assert "single-PUT limit" in str(caught.value)
    assert len(mocked.calls) == 0


def test_a_part_that_fails_for_good_aborts_the_upload(mocked, video) -> None:  # type: ignore[no-untyped-def]
    backend = FakeMultipartBackend(mocked, part_status={2: 403})
    with make_client() as client, pytest.raises(StorageTransferError) as caught:
        client.put_file(video[0], KEY)
    assert "Upload of part 2 to presigned URL failed: HTTP 403" in str(caught.value)
    assert backend.aborted == [{"object_key": KEY, "upload_id": "up-1"}]
    assert backend.completed == []


def test_a_failing_abort_never_hides_the_original_error(mocked, video) -> None:  # type: ignore[no-untyped-def]
    backend = FakeMultipartBackend(mocked, part_status={1: 403})
    mocked.replace(responses.POST, f"{MP}/abort", status=500)
    with make_client() as client, pytest.raises(StorageTransferError) as caught:
        client.put_file(video[0], KEY)
    assert "part 1" in str(caught.value)
    assert any(
        "Aborting multipart upload up-1 also failed" in note for note in caught.value.__notes__
    )
    assert backend.completed == []


def test_a_part_etag_mismatch_is_an_integrity_error_and_aborts(mocked, video) -> None:  # type: ignore[no-untyped-def]
    backend = FakeMultipartBackend(mocked)

    def wrong_etag(request: Any) -> tuple[int, dict[str, str], bytes]:
        if not isinstance(request.body, bytes):
            request.body.read()
        return 200, {"ETag": '"' + "0" * 32 + '"'}, b""

    mocked.remove(responses.PUT, f"{STORAGE}/{KEY}.part3")
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}.part3", callback=wrong_etag)
    with make_client() as client, pytest.raises(IntegrityError):
        client.put_file(video[0], KEY)
    assert backend.aborted and backend.completed == []


def test_keyboard_interrupt_aborts_then_propagates(mocked, video) -> None:  # type: ignore[no-untyped-def]
    backend = FakeMultipartBackend(mocked)

    def interrupt(done: int, total: int) -> None:
        if done > PART:
            raise KeyboardInterrupt

    with make_client(STORAGE_MULTIPART_CONCURRENCY=1) as client, pytest.raises(KeyboardInterrupt):
        client.put_file(video[0], KEY, progress=interrupt)
    assert backend.aborted == [{"object_key": KEY, "upload_id": "up-1"}]
    assert backend.completed == []


def test_complete_failure_aborts_without_resume(mocked, video) -> None:  # type: ignore[no-untyped-def]
    backend = FakeMultipartBackend(mocked)
    mocked.replace(
        responses.POST,
        f"{MP}/complete",
        status=400,
        json={"error": "invalid_part", "message": "bad"},
    )
    with make_client() as client, pytest.raises(BackendError) as caught:
        client.put_file(video[0], KEY)
    assert "Multipart complete failed: HTTP 400 (bad)" in str(caught.value)
    assert backend.aborted


def test_an_expired_part_url_is_presigned_again(mocked, video) -> None:  # type: ignore[no-untyped-def]
    path, data = video
    backend = FakeMultipartBackend(mocked)
    expired = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
    answers = iter([(403, {}, expired)])

    def first_expired(request: Any) -> tuple[int, dict[str, str], bytes]:
        answer = next(answers, None)
        if answer is not None:
            if not isinstance(request.body, bytes):
                request.body.read()
            return answer
        return backend.put_part(request)

    mocked.remove(responses.PUT, f"{STORAGE}/{KEY}.part2")
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}.part2", callback=first_expired)
    with make_client() as client:
        client.put_file(path, KEY)
    assert [2] in backend.presigned_batches  # part 2 alone, signed a second time
    assert b"".join(backend.parts[n] for n in sorted(backend.parts)) == data


@pytest.mark.parametrize(
    "answer",
    [
        {"upload_id": "u-77", "part_size": "5MiB"},
        {"upload_id": "u-77", "part_size": 0},
        {"upload_id": "u-77", "part_size": PART, "expires_sec": 0},
    ],
)
def test_an_initiate_answer_breaking_the_contract_aborts_the_upload_it_names(
    mocked,
    video,
    answer,  # type: ignore[no-untyped-def]
) -> None:
    mocked.post(f"{MP}/initiate", json=answer)
    aborted = mocked.post(f"{MP}/abort", json={"status": "ok"})
    with make_client() as client, pytest.raises(BackendError) as caught:
        client.put_file(video[0], KEY)
    assert caught.value.phase == "initiate"
    assert "Multipart initiate failed: response field" in caught.value.reason
    assert aborted.call_count == 1
    assert json.loads(mocked.calls[-1].request.body) == {"object_key": KEY, "upload_id": "u-77"}


def test_initiate_sends_an_idempotency_key(mocked, video) -> None:  # type: ignore[no-untyped-def]
    FakeMultipartBackend(mocked)
    with make_client() as client:
        client.put_file(video[0], KEY)
        client.put_file(video[0], KEY)
    keys = [
        call.request.headers.get("Idempotency-Key")
        for call in mocked.calls
        if call.request.url.endswith("/initiate")
    ]
    assert len(keys) == 2 and all(keys) and keys[0] != keys[1]
