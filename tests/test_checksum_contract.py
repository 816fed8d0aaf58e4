"""Issue 11 at the contract level (`responses`): checksums storage verifies before it
commits, the MD5 fallback, and ``overwrite=False``.

`responses` patches requests' adapter: no sockets, no urllib3 retries. The retried
PUT whose first attempt stored the object (a 412 that is our own) needs real retries
and is tested over loopback in tests/test_checksum_functional.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import responses

from ctrlupload import (
    BackendError,
    BackendPresignedStorageProvider,
    IntegrityError,
    ObjectExistsError,
    StorageConfigError,
    StorageUploadError,
    _checksum,
)
from tests.conftest import backend_settings
from tests.test_contract import (
    BACKEND,
    BODY,
    COMPLETE,
    KEY,
    PRESIGN,
    PUBLIC_URL,
    STORAGE,
    crc_of,
    presign_answer,
    put_reading_body,
)

pytestmark = pytest.mark.skipif(not _checksum.available(), reason="needs awscrt")

CRC = crc_of(BODY)
INITIATE = f"{BACKEND}/internal/storage/multipart/initiate"
PRESIGN_PARTS = f"{BACKEND}/internal/storage/multipart/presign-parts"
COMPLETE_MULTIPART = f"{BACKEND}/internal/storage/multipart/complete"
ABORT = f"{BACKEND}/internal/storage/multipart/abort"


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def video(tmp_path: Path) -> Path:
    path = tmp_path / "video.mp4"
    path.write_bytes(BODY)
    return path


def provider(**overrides: Any) -> BackendPresignedStorageProvider:
    return BackendPresignedStorageProvider(backend_settings(BACKEND, **overrides))


def signed_headers(**extra: str) -> dict[str, str]:
    return {"Content-Type": "video/mp4", "x-amz-checksum-crc64nvme": CRC, **extra}


def calls(mocked: responses.RequestsMock, method: str) -> list[Any]:
    return [call.request for call in mocked.calls if call.request.method == method]


def test_a_signed_checksum_is_sent_as_signed_and_recorded(mocked, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer(headers=signed_headers()))
    # An ETag that is no MD5 (SSE-KMS, S3 Express): the CRC vouches for the bytes.
    put = put_reading_body(etag='"opaque-etag"', headers={"x-amz-checksum-crc64nvme": CRC})
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put)
    mocked.post(COMPLETE, json={"status": "ok", "etag": '"opaque-etag"', "checksum": CRC})
    with provider() as client:
        result = client.put_file(video, KEY)
    (presign,) = calls(mocked, "POST")[:1]
    assert json.loads(presign.body)["checksum"] == CRC
    (upload,) = calls(mocked, "PUT")
    assert upload.headers["x-amz-checksum-crc64nvme"] == CRC
    assert upload.headers["Content-Type"] == "video/mp4"
    complete = calls(mocked, "POST")[1]
    assert json.loads(complete.body) == {
        "object_key": KEY,
        "etag": '"opaque-etag"',
        "size_bytes": len(BODY),
        "content_type": "video/mp4",
        "public_url": PUBLIC_URL,
        "checksum_algorithm": "CRC64NVME",
        "checksum": CRC,
    }
    assert (result.integrity, result.checksum, result.etag) == ("crc64nvme", CRC, '"opaque-etag"')


def test_bad_digest_is_an_integrity_error_and_nothing_is_recorded(mocked, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer(headers=signed_headers()))
    body = (
        b"<Error><Code>BadDigest</Code><Message>The CRC64NVME you specified did not match "
        b"the calculated checksum.</Message></Error>"
    )
    mocked.add_callback(
        responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body(400, None, body)
    )
    with provider() as client, pytest.raises(IntegrityError, match="BadDigest") as caught:
        client.put_file(video, KEY)
    assert "nothing was stored" in caught.value.reason
    assert [call.request.url for call in mocked.calls].count(COMPLETE) == 0


def test_a_differing_echoed_checksum_is_an_integrity_error(mocked, video) -> None:  # type: ignore[no-untyped-def]
    # A lenient store that stored other bytes says so in its answer: never recorded.
    mocked.post(PRESIGN, json=presign_answer(headers=signed_headers()))
    other = crc_of(b"other bytes")
    put = put_reading_body(headers={"x-amz-checksum-crc64nvme": other})
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put)
    with provider() as client, pytest.raises(IntegrityError, match="CRC64NVME"):
        client.put_file(video, KEY)
    assert COMPLETE not in [call.request.url for call in mocked.calls]


def test_a_seed_backend_falls_back_to_md5_logged_once(mocked, video, caplog) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer())
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body())
    mocked.post(COMPLETE, json={"status": "ok"})
    with caplog.at_level(logging.INFO, logger="ctrlupload"), provider() as client:
        first = client.put_file(video, KEY)
        second = client.put_file(video, KEY)
    fallbacks = [r for r in caplog.records if "signs no CRC64NVME" in r.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.INFO
    assert (first.integrity, second.integrity) == ("md5", "md5")
    presigns = [json.loads(r.body) for r in calls(mocked, "POST") if r.url == PRESIGN]
    # Learnt: the second upload skips the checksum pass and asks for none.
    assert "checksum" in presigns[0] and "checksum" not in presigns[1]


def test_a_seed_backend_and_an_opaque_etag_is_integrity_none(mocked, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer())
    kms = {"x-amz-server-side-encryption": "aws:kms"}
    put = put_reading_body(etag='"0123456789abcdef0123456789abcdef"', headers=kms)
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put)
    mocked.post(COMPLETE, json={"status": "ok"})
    with provider() as client:
        result = client.put_file(video, KEY)
    assert result.integrity == "none"


def test_strict_crc64nvme_refuses_a_backend_that_signs_none_before_sending(mocked, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer())
    with (
        provider(STORAGE_CHECKSUM="crc64nvme") as client,
        pytest.raises(BackendError, match="did not sign the x-amz-checksum-crc64nvme"),
    ):
        client.put_file(video, KEY)
    assert calls(mocked, "PUT") == []


def test_strict_crc64nvme_without_awscrt_is_a_config_error(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(_checksum, "_combine", None)
    with pytest.raises(StorageConfigError, match="ctrlupload\\[checksum\\]") as caught:
        provider(STORAGE_CHECKSUM="crc64nvme")
    assert caught.value.variable == "STORAGE_CHECKSUM"


def test_without_awscrt_auto_uses_md5_and_asks_for_no_checksum(mocked, video, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(_checksum, "_crc", None)
    mocked.post(PRESIGN, json=presign_answer())
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body())
    mocked.post(COMPLETE, json={"status": "ok"})
    with provider() as client:
        result = client.put_file(video, KEY)
    assert "checksum" not in json.loads(calls(mocked, "POST")[0].body)
    assert result.integrity == "md5"


def test_a_backend_that_signs_another_checksum_is_refused(mocked, video) -> None:  # type: ignore[no-untyped-def]
    wrong = signed_headers(**{"x-amz-checksum-crc64nvme": crc_of(b"x")})
    mocked.post(PRESIGN, json=presign_answer(headers=wrong))
    with provider() as client, pytest.raises(BackendError, match="another CRC64NVME"):
        client.put_file(video, KEY)
    assert calls(mocked, "PUT") == []


# -- overwrite=False ----------------------------------------------------------------------


def test_overwrite_false_asks_for_the_condition_and_sends_it(mocked, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer(headers=signed_headers(**{"If-None-Match": "*"})))
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body())
    mocked.post(COMPLETE, json={"status": "ok"})
    with provider() as client:
        client.put_file(video, KEY, overwrite=False)
    assert json.loads(calls(mocked, "POST")[0].body)["if_none_match"] == "*"
    assert calls(mocked, "PUT")[0].headers["If-None-Match"] == "*"


def test_412_is_object_exists_and_nothing_is_recorded(mocked, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer(headers=signed_headers(**{"If-None-Match": "*"})))
    refused = b"<Error><Code>PreconditionFailed</Code></Error>"
    mocked.add_callback(
        responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body(412, None, refused)
    )
    with provider() as client, pytest.raises(ObjectExistsError) as caught:
        client.put_file(video, KEY, overwrite=False)
    assert isinstance(caught.value, StorageUploadError)
    assert caught.value.status_code == 412
    assert COMPLETE not in [call.request.url for call in mocked.calls]


def test_overwrite_false_and_a_backend_that_signs_no_condition(mocked, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer())
    with provider() as client, pytest.raises(BackendError, match="If-None-Match"):
        client.put_file(video, KEY, overwrite=False)
    assert calls(mocked, "PUT") == []


# -- multipart ----------------------------------------------------------------------------


def multipart_backend(
    mocked: responses.RequestsMock, *, echo: bool = True, complete_status: int = 200
) -> dict[str, Any]:
    seen: dict[str, Any] = {"presign": [], "complete": None}
    initiate = {"upload_id": "u-1", "part_size": 5 * 1024 * 1024, "expires_sec": 600}
    if echo:
        initiate |= {
            "checksum_algorithm": "CRC64NVME",
            "checksum_type": "FULL_OBJECT",
            "if_none_match": "*",
        }
    mocked.post(INITIATE, json=initiate)

    def presign(request: Any) -> tuple[int, dict[str, str], str]:
        asked = json.loads(request.body)
        seen["presign"].append(asked)
        checksums = asked.get("checksums") or [None] * len(asked["part_numbers"])
        parts = [
            {
                "part_number": number,
                "upload_url": f"{STORAGE}/{KEY}?partNumber={number}",
                "headers": {} if value is None else {"x-amz-checksum-crc64nvme": value},
            }
            for number, value in zip(asked["part_numbers"], checksums, strict=True)
        ]
        return 200, {}, json.dumps({"parts": parts, "expires_sec": 600})

    def complete(request: Any) -> tuple[int, dict[str, str], str]:
        seen["complete"] = json.loads(request.body)
        if complete_status == 412:
            return 412, {}, json.dumps({"error": "object_exists", "message": "exists"})
        if complete_status == 400:
            return 400, {}, json.dumps({"error": "bad_digest", "message": "mismatch"})
        return 200, {}, json.dumps({"public_url": PUBLIC_URL, "etag": '"m-2"', "checksum": "x"})

    mocked.add_callback(responses.POST, PRESIGN_PARTS, callback=presign)

    def put_part(request: Any) -> tuple[int, dict[str, str], bytes]:
        stream = request.body
        body = stream if isinstance(stream, bytes) else stream.read()
        return 200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b""

    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put_part)
    mocked.add_callback(responses.POST, COMPLETE_MULTIPART, callback=complete)
    mocked.post(ABORT, json={"status": "ok"})
    return seen


@pytest.fixture
def big(tmp_path: Path) -> Path:
    path = tmp_path / "big.mp4"
    path.write_bytes(bytes(range(256)) * (48 * 1024))  # 12 MiB: three 5 MiB parts
    return path


def multipart_client() -> BackendPresignedStorageProvider:
    return provider(STORAGE_MULTIPART="always", STORAGE_MULTIPART_CONCURRENCY=2)


def test_multipart_signs_each_part_and_passes_the_whole_objects_crc(mocked, big) -> None:  # type: ignore[no-untyped-def]
    seen = multipart_backend(mocked)
    data = big.read_bytes()
    part = 5 * 1024 * 1024
    with multipart_client() as client:
        result = client.put_file(big, KEY)
    initiate = json.loads(calls(mocked, "POST")[0].body)
    assert (initiate["checksum_algorithm"], initiate["checksum_type"]) == (
        "CRC64NVME",
        "FULL_OBJECT",
    )
    signed = {
        n: c
        for asked in seen["presign"]
        for n, c in zip(asked["part_numbers"], asked["checksums"], strict=True)
    }
    assert signed == {n + 1: crc_of(data[n * part : (n + 1) * part]) for n in range(3)}
    sent = {
        r.url.rsplit("=", 1)[1]: r.headers["x-amz-checksum-crc64nvme"] for r in calls(mocked, "PUT")
    }
    assert sent == {str(n): c for n, c in signed.items()}
    assert seen["complete"]["checksum"] == crc_of(data)  # combined, not a second read
    assert seen["complete"]["checksum_type"] == "FULL_OBJECT"
    assert "if_none_match" not in seen["complete"]
    assert (result.integrity, result.checksum) == ("crc64nvme", crc_of(data))


def test_multipart_bad_digest_at_complete_is_an_integrity_error(mocked, big) -> None:  # type: ignore[no-untyped-def]
    multipart_backend(mocked, complete_status=400)
    with multipart_client() as client, pytest.raises(IntegrityError, match="CRC64NVME"):
        client.put_file(big, KEY)
    assert ABORT in [call.request.url for call in mocked.calls]


def test_multipart_overwrite_false_sends_the_condition_at_complete(mocked, big) -> None:  # type: ignore[no-untyped-def]
    seen = multipart_backend(mocked, complete_status=412)
    with multipart_client() as client, pytest.raises(ObjectExistsError):
        client.put_file(big, KEY, overwrite=False)
    assert seen["complete"]["if_none_match"] == "*"
    assert json.loads(calls(mocked, "POST")[0].body)["if_none_match"] == "*"


def test_multipart_falls_back_to_md5_parts_when_the_backend_takes_no_checksum(mocked, big) -> None:  # type: ignore[no-untyped-def]
    seen = multipart_backend(mocked, echo=False)
    with multipart_client() as client:
        result = client.put_file(big, KEY)
    assert all("checksums" not in asked for asked in seen["presign"])
    assert "checksum" not in seen["complete"]
    assert result.integrity == "md5"  # each part's ETag checked as its MD5


def test_multipart_overwrite_false_needs_the_backend_to_take_the_condition(mocked, big) -> None:  # type: ignore[no-untyped-def]
    multipart_backend(mocked, echo=False)
    with multipart_client() as client, pytest.raises(BackendError, match="If-None-Match"):
        client.put_file(big, KEY, overwrite=False)
    urls = [call.request.url for call in mocked.calls]
    assert ABORT in urls and PRESIGN_PARTS not in urls
