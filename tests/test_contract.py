"""Contract-level tests: the seed's internal API JSON and error texts, with `responses`.

`responses` replaces requests' adapter, so nothing here exercises sockets, streaming
or urllib3 retries; tests/test_functional_backend_presigned.py does that over loopback.
"""

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import responses
from responses import matchers

from ctrlupload import (
    BackendError,
    BackendPresignedStorageProvider,
    IntegrityError,
    StorageConfigError,
    StorageTransferError,
    UploadTooLargeError,
    _checksum,
    get_storage_provider,
)
from ctrlupload.engine._engine import check_size_limit
from tests.conftest import TOKEN, RecordingProgress, backend_settings

BACKEND = "http://backend.test:8080"
STORAGE = "https://bucket.s3.test"
KEY = "videos/V-001/S-001/JOB-123/video.mp4"
BODY = b"fake mp4 bytes " * 1000
ETAG = f'"{hashlib.md5(BODY).hexdigest()}"'
UPLOAD_URL = f"{STORAGE}/{KEY}?X-Amz-Signature=5ec7e7"
PUBLIC_URL = f"https://cdn.example.com/{KEY}"
PRESIGN = f"{BACKEND}/internal/storage/presign-put"
COMPLETE = f"{BACKEND}/internal/storage/complete"
DELETE = f"{BACKEND}/internal/storage/delete"
AUTH = matchers.header_matcher({"Authorization": f"Bearer {TOKEN}"})


def crc_of(data: bytes) -> str:
    return _checksum.encode(_checksum.crc64nvme(data))


def presign_answer(**overrides: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "upload_url": UPLOAD_URL,
        "public_url": PUBLIC_URL,
        "headers": {"Content-Type": "video/mp4"},
        "expires_sec": 600,
    }
    answer.update(overrides)
    return answer


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def client() -> Iterator[BackendPresignedStorageProvider]:
    with BackendPresignedStorageProvider(backend_settings(BACKEND)) as provider:
        yield provider


@pytest.fixture
def video(tmp_path: Path) -> Path:
    path = tmp_path / "video.mp4"
    path.write_bytes(BODY)
    return path


def put_reading_body(
    status: int = 200,
    etag: str | None = ETAG,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Any:
    """A PUT callback that consumes the streamed body, as storage would."""
    received: list[bytes] = []

    def callback(request: Any) -> tuple[int, dict[str, str], bytes]:
        stream = request.body
        received.append(stream if isinstance(stream, bytes) else stream.read())
        return status, {**({"ETag": etag} if etag else {}), **(headers or {})}, body

    callback.received = received  # type: ignore[attr-defined]
    return callback


def happy_path(mocked: responses.RequestsMock) -> Any:
    mocked.post(PRESIGN, json=presign_answer(), match=[AUTH])
    put = put_reading_body()
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put)
    mocked.post(COMPLETE, json={"status": "ok"}, match=[AUTH])
    return put


def test_full_flow_presign_put_complete(mocked, client, video) -> None:  # type: ignore[no-untyped-def]
    # A seed-only backend: it ignores the checksum fields and signs no checksum
    # header, so the client checks the MD5 of the bytes sent against the ETag.
    put = happy_path(mocked)
    progress = RecordingProgress()

    result = client.put_file(video, KEY, progress=progress)

    presign, upload, complete = (call.request for call in mocked.calls)
    asked = {"object_key": KEY, "content_type": "video/mp4", "content_length": len(BODY)}
    if _checksum.available():
        asked |= {"checksum_algorithm": "CRC64NVME", "checksum": crc_of(BODY)}
    assert json.loads(presign.body) == asked
    assert presign.headers["Content-Type"] == "application/json"
    assert upload.method == "PUT"
    assert upload.url == UPLOAD_URL
    assert upload.headers["Content-Type"] == "video/mp4"
    assert upload.headers["Content-Length"] == str(len(BODY))
    assert "Transfer-Encoding" not in upload.headers
    assert "Authorization" not in upload.headers
    assert put.received == [BODY]
    assert json.loads(complete.body) == {
        "object_key": KEY,
        "etag": ETAG,
        "size_bytes": len(BODY),
        "content_type": "video/mp4",
        "public_url": PUBLIC_URL,
    }
    assert (result.key, result.url, result.size_bytes, result.content_type, result.etag) == (
        KEY,
        PUBLIC_URL,
        len(BODY),
        "video/mp4",
        ETAG,
    )
    assert (result.integrity, result.checksum) == ("md5", None)
    assert "x-amz-checksum-crc64nvme" not in {name.lower() for name in upload.headers}
    progress.assert_honest(len(BODY))


def test_md5_mode_sends_exactly_the_seeds_request_bodies(mocked, video) -> None:  # type: ignore[no-untyped-def]
    happy_path(mocked)
    settings = backend_settings(BACKEND, STORAGE_CHECKSUM="md5")
    with BackendPresignedStorageProvider(settings) as provider:
        result = provider.put_file(video, KEY)
    presign, _, _ = (call.request for call in mocked.calls)
    assert json.loads(presign.body) == {
        "object_key": KEY,
        "content_type": "video/mp4",
        "content_length": len(BODY),
    }
    assert result.integrity == "md5"


def test_put_object_bytes_uses_the_same_flow(mocked, client) -> None:  # type: ignore[no-untyped-def]
    put = happy_path(mocked)
    result = client.put_object(BODY, KEY, content_type="video/mp4")
    assert put.received == [BODY]
    assert result.size_bytes == len(BODY)


def test_explicit_content_type_is_presigned_and_sent(mocked, client, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer(headers={"Content-Type": "video/quicktime"}))
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body())
    mocked.post(COMPLETE, json={"status": "ok"})
    client.put_file(video, KEY, content_type="video/quicktime")
    presign, upload, complete = (call.request for call in mocked.calls)
    assert json.loads(presign.body)["content_type"] == "video/quicktime"
    assert upload.headers["Content-Type"] == "video/quicktime"
    assert json.loads(complete.body)["content_type"] == "video/quicktime"


def test_returned_headers_are_sent_exactly(mocked, client, video) -> None:  # type: ignore[no-untyped-def]
    signed = {"Content-Type": "video/mp4", "x-amz-server-side-encryption": "AES256"}
    mocked.post(PRESIGN, json=presign_answer(headers=signed))
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body())
    mocked.post(COMPLETE, json={"status": "ok"})
    client.put_file(video, KEY)
    upload = mocked.calls[1].request
    for name, value in signed.items():
        assert upload.headers[name] == value


def test_oversize_fails_before_any_request(mocked, video) -> None:  # type: ignore[no-untyped-def]
    settings = backend_settings(BACKEND, VIDEO_MAX_UPLOAD_BYTES=1000)
    with (
        BackendPresignedStorageProvider(settings) as client,
        pytest.raises(UploadTooLargeError) as caught,
    ):
        client.put_file(video, KEY)
    assert str(caught.value) == (
        f"Storage upload failed for '{KEY}': File size 14.6 KiB exceeds limit 1000 bytes "
        "(VIDEO_MAX_UPLOAD_BYTES=1000)"
    )
    assert len(mocked.calls) == 0


def test_oversize_message_keeps_the_seeds_shape_in_mib_and_names_the_setting() -> None:
    with pytest.raises(UploadTooLargeError) as caught:
        check_size_limit(KEY, int(150.5 * 1024 * 1024), 104857600)
    assert caught.value.reason == (
        "File size 150.5 MiB exceeds limit 100.0 MiB (VIDEO_MAX_UPLOAD_BYTES=104857600)"
    )


@pytest.mark.parametrize(
    ("size", "limit", "reason"),
    [
        (300, 0, "File size 300 bytes exceeds limit 0 bytes (VIDEO_MAX_UPLOAD_BYTES=0)"),
        (
            100 * 1024 * 1024 + 1,
            100 * 1024 * 1024,
            "File size 104857601 bytes exceeds limit 104857600 bytes "
            "(VIDEO_MAX_UPLOAD_BYTES=104857600)",
        ),
        (
            6 * 1024**3,
            5 * 1024**3,
            "File size 6.0 GiB exceeds limit 5.0 GiB (VIDEO_MAX_UPLOAD_BYTES=5368709120)",
        ),
    ],
)
def test_oversize_message_never_shows_two_sizes_that_read_the_same(
    size: int, limit: int, reason: str
) -> None:
    with pytest.raises(UploadTooLargeError) as caught:
        check_size_limit(KEY, size, limit)
    assert caught.value.reason == reason
    assert "0.0" not in reason


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"status": 500}, "Presign request failed: HTTP 500"),
        (
            {"status": 403, "json": {"message": "forbidden key"}},
            "Presign request failed: HTTP 403 (forbidden key)",
        ),
        (
            {"status": 200, "body": "<html>oops</html>"},
            "Presign request failed: response is not JSON",
        ),
        (
            {"status": 200, "json": ["not", "an", "object"]},
            "Presign request failed: response is JSON but not an object (list)",
        ),
        (
            {"status": 200, "json": {"public_url": PUBLIC_URL}},
            "Presign request failed: response is missing 'upload_url'",
        ),
        (
            {"status": 200, "json": {"upload_url": UPLOAD_URL}},
            "Presign request failed: response is missing 'public_url'",
        ),
        (
            {"status": 200, "json": presign_answer(upload_url="file:///etc/passwd")},
            "upload_url must be an http(s) URL, got scheme 'file'",
        ),
        (
            {"status": 200, "json": presign_answer(upload_url="ftp://h/k?sig=1")},
            "upload_url must be an http(s) URL, got scheme 'ftp'",
        ),
    ],
)
def test_presign_failures(mocked, client, video, answer, reason) -> None:  # type: ignore[no-untyped-def]
    mocked.add(responses.POST, PRESIGN, **answer)
    with pytest.raises(BackendError) as caught:
        client.put_file(video, KEY)
    assert reason in str(caught.value)
    assert str(caught.value).startswith(
        f"Storage upload failed for '{KEY}': Presign request failed"
    )
    assert caught.value.phase == "presign"
    assert caught.value.status_code == answer["status"]
    # Nothing but presign was called (5xx answers were retried by the adapter's Retry).
    assert {call.request.url for call in mocked.calls} == {PRESIGN}


def test_presign_headers_carrying_the_token_are_refused(mocked, client, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer(headers={"Authorization": f"Bearer {TOKEN}"}))
    with pytest.raises(BackendError, match="carry the service token") as caught:
        client.put_file(video, KEY)
    assert TOKEN not in str(caught.value)
    assert len(mocked.calls) == 1


def test_put_failure_uses_the_seed_text(mocked, client, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer())
    xml = (
        b"<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature "
        b"we calculated does not match</Message></Error>"
    )
    mocked.add_callback(
        responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body(403, None, xml)
    )
    with pytest.raises(StorageTransferError) as caught:
        client.put_file(video, KEY)
    assert str(caught.value).startswith(
        f"Storage upload failed for '{KEY}': Upload to presigned URL failed: HTTP 403"
    )
    assert "SignatureDoesNotMatch" in str(caught.value)
    assert caught.value.status_code == 403
    assert caught.value.phase == "upload"
    assert "5ec7e7" not in str(caught.value)
    assert [call.request.method for call in mocked.calls] == ["POST", "PUT"]


def test_expired_url_is_presigned_again_once(mocked, client, video) -> None:  # type: ignore[no-untyped-def]
    expired = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
    fresh_url = f"{STORAGE}/{KEY}?X-Amz-Signature=fresh"
    mocked.post(PRESIGN, json=presign_answer())
    mocked.post(PRESIGN, json=presign_answer(upload_url=fresh_url))
    put = put_reading_body()
    mocked.add_callback(
        responses.PUT,
        f"{STORAGE}/{KEY}",
        callback=put_reading_body(403, None, expired),
        match=[matchers.query_param_matcher({"X-Amz-Signature": "5ec7e7"})],
    )
    mocked.add_callback(
        responses.PUT,
        f"{STORAGE}/{KEY}",
        callback=put,
        match=[matchers.query_param_matcher({"X-Amz-Signature": "fresh"})],
    )
    mocked.post(COMPLETE, json={"status": "ok"})
    progress = RecordingProgress()
    result = client.put_file(video, KEY, progress=progress)
    assert [c.request.method for c in mocked.calls] == ["POST", "PUT", "POST", "PUT", "POST"]
    assert put.received == [BODY]
    assert result.etag == ETAG
    progress.assert_honest(len(BODY))


def test_expired_twice_fails_with_the_storage_answer(mocked, client, video) -> None:  # type: ignore[no-untyped-def]
    expired = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
    mocked.post(PRESIGN, json=presign_answer())
    mocked.add_callback(
        responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body(403, None, expired)
    )
    with pytest.raises(StorageTransferError) as caught:
        client.put_file(video, KEY)
    assert "HTTP 403 (AccessDenied: Request has expired)" in str(caught.value)
    assert [c.request.method for c in mocked.calls] == ["POST", "PUT", "POST", "PUT"]


@pytest.mark.parametrize("bare_body", [b"", b"<Error><Code>AccessDenied</Code></Error>"])
def test_a_bare_403_after_the_urls_own_expiry_is_presigned_again(  # type: ignore[no-untyped-def]
    mocked, client, video, bare_body
) -> None:
    # Signed long ago for 600 s: an S3-compatible store that answers expiry with a
    # bare 403 AccessDenied still gets a fresh URL.
    stale = f"{STORAGE}/{KEY}?X-Amz-Date=20200101T000000Z&X-Amz-Expires=600&X-Amz-Signature=old"
    fresh = f"{STORAGE}/{KEY}?X-Amz-Signature=fresh"
    mocked.post(PRESIGN, json=presign_answer(upload_url=stale))
    mocked.post(PRESIGN, json=presign_answer(upload_url=fresh))
    mocked.add_callback(
        responses.PUT,
        f"{STORAGE}/{KEY}",
        callback=put_reading_body(403, None, bare_body),
        match=[matchers.query_param_matcher({"X-Amz-Signature": "old"}, strict_match=False)],
    )
    put = put_reading_body()
    mocked.add_callback(
        responses.PUT,
        f"{STORAGE}/{KEY}",
        callback=put,
        match=[matchers.query_param_matcher({"X-Amz-Signature": "fresh"})],
    )
    mocked.post(COMPLETE, json={"status": "ok"})
    result = client.put_file(video, KEY)
    assert [c.request.method for c in mocked.calls] == ["POST", "PUT", "POST", "PUT", "POST"]
    assert result.etag == ETAG


def test_a_bare_403_while_the_url_is_still_valid_is_not_expiry(mocked, client, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer())
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body(403, None))
    with pytest.raises(StorageTransferError) as caught:
        client.put_file(video, KEY)
    assert caught.value.status_code == 403
    assert [c.request.method for c in mocked.calls] == ["POST", "PUT"]


def test_other_4xx_fails_at_once(mocked, client, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer())
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body(400, None))
    with pytest.raises(StorageTransferError, match="HTTP 400"):
        client.put_file(video, KEY)
    assert [c.request.method for c in mocked.calls] == ["POST", "PUT"]


def test_etag_mismatch_is_an_integrity_error_and_nothing_is_completed(
    mocked, client, video
) -> None:  # type: ignore[no-untyped-def]
    wrong = '"' + "0" * 32 + '"'
    mocked.post(PRESIGN, json=presign_answer())
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body(etag=wrong))
    with pytest.raises(IntegrityError) as caught:
        client.put_file(video, KEY)
    assert caught.value.phase == "integrity"
    assert hashlib.md5(BODY).hexdigest() in str(caught.value)
    assert [c.request.method for c in mocked.calls] == ["POST", "PUT"]


@pytest.mark.parametrize(
    ("etag", "headers"),
    [
        ('"' + "1" * 32 + '-3"', {}),  # multipart-style: not an MD5 of the body
        ('"' + "2" * 32 + '"', {"x-amz-server-side-encryption": "aws:kms"}),
        ('"' + "3" * 32 + '"', {"x-amz-server-side-encryption-customer-algorithm": "AES256"}),
    ],
)
def test_etags_that_are_not_body_md5s_are_not_checked(mocked, client, video, etag, headers) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer())
    mocked.add_callback(
        responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body(etag=etag, headers=headers)
    )
    mocked.post(COMPLETE, json={"status": "ok"})
    assert client.put_file(video, KEY).etag == etag


def test_md5_check_can_be_switched_off(mocked, video) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer())
    wrong = '"' + "0" * 32 + '"'
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body(etag=wrong))
    mocked.post(COMPLETE, json={"status": "ok"})
    settings = backend_settings(BACKEND, STORAGE_VERIFY_MD5="false")
    with BackendPresignedStorageProvider(settings) as client:
        assert client.put_file(video, KEY).etag == wrong


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"status": 500}, "Complete notification failed: HTTP 500"),
        ({"status": 200, "body": "ok"}, "Complete notification failed: response is not JSON"),
        ({"status": 200, "json": {}}, "Complete notification failed: response is missing 'status'"),
    ],
)
def test_complete_failures(mocked, client, video, answer, reason) -> None:  # type: ignore[no-untyped-def]
    mocked.post(PRESIGN, json=presign_answer())
    mocked.add_callback(responses.PUT, f"{STORAGE}/{KEY}", callback=put_reading_body())
    mocked.add(responses.POST, COMPLETE, **answer)
    progress = RecordingProgress()
    with pytest.raises(BackendError) as caught:
        client.put_file(video, KEY, progress=progress)
    assert str(caught.value) == f"Storage upload failed for '{KEY}': {reason}"
    assert caught.value.phase == "complete"
    assert progress.done[-1] < len(BODY)  # never reported as done


def test_delete_posts_the_key(mocked, client) -> None:  # type: ignore[no-untyped-def]
    mocked.post(
        DELETE,
        json={"status": "ok"},
        match=[AUTH, matchers.json_params_matcher({"object_key": KEY})],
    )
    client.delete(KEY)
    assert len(mocked.calls) == 1


def test_delete_failure(mocked, client) -> None:  # type: ignore[no-untyped-def]
    mocked.post(DELETE, status=500)
    with pytest.raises(BackendError) as caught:
        client.delete(KEY)
    assert (
        str(caught.value) == f"Storage upload failed for '{KEY}': Delete request failed: HTTP 500"
    )
    assert caught.value.phase == "delete"


def test_get_url_uses_the_public_base_url() -> None:
    settings = backend_settings(BACKEND, STORAGE_PUBLIC_BASE_URL="https://cdn.example.com/")
    with BackendPresignedStorageProvider(settings) as client:
        assert client.get_url(KEY) == f"https://cdn.example.com/{KEY}"
        assert client.get_url("a/b c.jpg") == "https://cdn.example.com/a/b%20c.jpg"


def test_get_url_without_a_public_base_url_is_a_config_error(client) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StorageConfigError, match="STORAGE_PUBLIC_BASE_URL"):
        client.get_url(KEY)


@pytest.mark.parametrize("missing", ["BACKEND_BASE_URL", "BACKEND_SERVICE_TOKEN"])
def test_backend_provider_needs_url_and_token(missing: str) -> None:
    values = {"BACKEND_BASE_URL": BACKEND, "BACKEND_SERVICE_TOKEN": TOKEN}
    del values[missing]
    from ctrlupload import Settings

    with pytest.raises(StorageConfigError) as caught:
        BackendPresignedStorageProvider(Settings.from_mapping(values))
    assert caught.value.variable == missing


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"STORAGE_PROVIDER": "s3"}, "STORAGE_S3_BUCKET"),
        ({"STORAGE_PROVIDER": "minio"}, "STORAGE_S3_BUCKET"),
        ({"STORAGE_PROVIDER": "minio", "STORAGE_S3_BUCKET": "renders"}, "STORAGE_S3_ENDPOINT_URL"),
    ],
)
def test_s3_and_minio_name_the_setting_they_lack(values: dict[str, str], variable: str) -> None:
    from ctrlupload import Settings

    with pytest.raises(StorageConfigError, match=variable) as caught:
        get_storage_provider(Settings.from_mapping(values))
    assert caught.value.variable == variable


def test_get_storage_provider_reads_the_environment(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STORAGE_PROVIDER", "backend_presigned")
    monkeypatch.setenv("BACKEND_BASE_URL", BACKEND)
    monkeypatch.setenv("BACKEND_SERVICE_TOKEN", TOKEN)
    with get_storage_provider() as provider:  # type: ignore[attr-defined]
        assert isinstance(provider, BackendPresignedStorageProvider)
        assert TOKEN not in repr(provider)
