"""The protocol's pure steps, driven with plain values: no server, no socket."""

from __future__ import annotations

import calendar
import json

import pytest

from ctrlupload import BackendError, IntegrityError, SourceFileError, StorageTransferError
from ctrlupload.protocol import (
    MultipartInitiateResponse,
    PresignResponse,
    check_etag,
    decode_backend_answer,
    etag_is_md5,
    is_expired_answer,
    is_resumable,
    process_put_answer,
    put_refusal,
    s3_error_fields,
    signature_expiry,
)

KEY = "videos/V/S/J/video.mp4"
SIGNED_AT = calendar.timegm((2026, 12, 1, 10, 0, 0, 0, 0, 0))
V4_URL = (
    "https://bucket.s3.example/key?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Date=20261201T100000Z&X-Amz-Expires=600&X-Amz-Signature=abc"
)


def test_signature_expiry_reads_sigv4_date_plus_expires() -> None:
    assert signature_expiry(V4_URL) == SIGNED_AT + 600


def test_signature_expiry_reads_sigv2_expires() -> None:
    assert signature_expiry("https://b.example/k?AWSAccessKeyId=A&Expires=1700000000") == 1.7e9


@pytest.mark.parametrize(
    "url",
    [
        "https://b.example/k",
        "https://b.example/k?X-Amz-Date=garbage&X-Amz-Expires=600",
        "https://b.example/k?X-Amz-Date=20261201T100000Z&X-Amz-Expires=soon",
    ],
)
def test_signature_expiry_is_none_when_the_url_does_not_say(url: str) -> None:
    assert signature_expiry(url) is None


def test_s3_says_expired_in_the_body() -> None:
    body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
    assert is_expired_answer(403, body, "https://b.example/k", now=0)


@pytest.mark.parametrize("body", [b"", b"<Error><Code>AccessDenied</Code></Error>"])
def test_a_bare_403_is_expiry_once_the_url_itself_has_expired(body: bytes) -> None:
    assert is_expired_answer(403, body, V4_URL, now=SIGNED_AT + 601)
    assert not is_expired_answer(403, body, V4_URL, now=SIGNED_AT + 599)


def test_a_bare_403_is_expiry_once_the_backends_expires_sec_has_passed() -> None:
    url = "https://store.example/k?token=opaque"
    assert is_expired_answer(403, b"", url, expires_at=1000.0, now=1000.0)
    assert not is_expired_answer(403, b"", url, expires_at=1000.0, now=999.0)
    assert not is_expired_answer(403, b"", url, now=10**12)  # nothing says when


def test_a_signature_mismatch_is_never_expiry() -> None:
    body = b"<Error><Code>SignatureDoesNotMatch</Code></Error>"
    assert not is_expired_answer(403, body, V4_URL, now=SIGNED_AT + 10_000)


def test_only_a_403_can_be_expiry() -> None:
    assert not is_expired_answer(400, b"Request has expired", V4_URL, now=SIGNED_AT + 10_000)


def test_s3_error_fields() -> None:
    body = b"<Error><Code>NoSuchUpload</Code><Message>gone</Message></Error>"
    assert s3_error_fields(body) == ("NoSuchUpload", "gone")
    assert s3_error_fields(b"not xml") == ("", "")


def test_check_etag_accepts_a_matching_md5_and_refuses_another() -> None:
    check_etag(KEY, '"0123456789abcdef0123456789abcdef"', "0123456789abcdef0123456789abcdef", {})
    with pytest.raises(IntegrityError, match="does not match the MD5"):
        check_etag(KEY, '"0123456789abcdef0123456789abcdef"', "f" * 32, {})


@pytest.mark.parametrize(
    ("etag", "headers"),
    [
        ('"0123456789abcdef0123456789abcdef-3"', {}),
        ('"0123456789abcdef0123456789abcdef"', {"x-amz-server-side-encryption": "aws:kms"}),
        (
            '"0123456789abcdef0123456789abcdef"',
            {"x-amz-server-side-encryption-customer-algorithm": "AES256"},
        ),
    ],
)
def test_check_etag_skips_etags_that_are_not_body_md5s(etag: str, headers: dict[str, str]) -> None:
    assert check_etag(KEY, etag, "f" * 32, headers) is False


@pytest.mark.parametrize(
    "url",
    [
        "https://render--usw2-az1--x-s3.s3express-usw2-az1.us-west-2.amazonaws.com/v/k.mp4",
        "https://s3express-usw2-az1.us-west-2.amazonaws.com/render--usw2-az1--x-s3/v/k.mp4",
    ],
)
def test_an_s3_express_etag_is_never_taken_for_an_md5(url: str) -> None:
    # Directory buckets answer an MD5-looking ETag that is not the body's MD5.
    md5_looking = '"0123456789abcdef0123456789abcdef"'
    assert etag_is_md5(md5_looking, {}, "https://bucket.s3.amazonaws.com/k") is True
    assert etag_is_md5(md5_looking, {}, url) is False
    assert check_etag(KEY, md5_looking, "f" * 32, {}, url) is False


def test_put_refusal_tells_bad_digest_and_existing_objects_from_other_failures() -> None:
    bad = b"<Error><Code>BadDigest</Code><Message>The CRC64NVME you specified did not match"
    assert put_refusal(400, bad + b"</Message></Error>") == "bad-digest"
    assert put_refusal(412, b"<Error><Code>PreconditionFailed</Code></Error>") == "exists"
    assert put_refusal(400, b"<Error><Code>InvalidRequest</Code></Error>") is None
    assert put_refusal(403, b"") is None


def test_process_put_answer_names_the_status_the_s3_code_and_the_attempts() -> None:
    body = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
    with pytest.raises(StorageTransferError) as caught:
        process_put_answer(KEY, "Upload to presigned URL", 503, {}, body, 5, None)
    assert caught.value.reason == (
        "Upload to presigned URL failed: HTTP 503 after 5 attempts (SlowDown: Reduce your rate)"
    )
    assert caught.value.status_code == 503


def test_process_put_answer_needs_an_etag() -> None:
    with pytest.raises(StorageTransferError, match="without an ETag"):
        process_put_answer(KEY, "Upload", 200, {}, b"", 1, None)


def test_process_put_answer_returns_the_checked_etag() -> None:
    etag = '"0123456789abcdef0123456789abcdef"'
    answer = process_put_answer(KEY, "Upload", 200, {"etag": etag}, b"", 1, etag[1:-1])
    assert answer == (etag, True)
    # Unchecked: no digest, or an ETag that is no MD5 (SSE-KMS).
    assert process_put_answer(KEY, "Upload", 200, {"etag": etag}, b"", 1, None) == (etag, False)
    kms = {"etag": etag, "x-amz-server-side-encryption": "aws:kms"}
    assert process_put_answer(KEY, "Upload", 200, kms, b"", 1, "f" * 32) == (etag, False)


def _decode(body: object, status: int = 200, model: type = PresignResponse) -> object:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return decode_backend_answer(KEY, "presign", "Presign request failed", status, raw, 1, model)


GOOD = {"upload_url": "https://s3.example/k?X-Amz-Signature=x", "public_url": "https://cdn/k"}


def test_decode_accepts_the_seeds_answer() -> None:
    answer = _decode({**GOOD, "headers": {"Content-Type": "video/mp4"}, "expires_sec": 600})
    assert isinstance(answer, PresignResponse) and answer.expires_sec == 600


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"expires_sec": 0}, "expires_sec"),
        ({"expires_sec": "600"}, "expires_sec"),
        ({"upload_url": "ftp://x/y"}, "upload_url"),
        ({"headers": {"Content-Type": 5}}, "headers.Content-Type"),
    ],
)
def test_decode_names_the_field_that_breaks_the_contract(
    change: dict[str, object], field: str
) -> None:
    with pytest.raises(BackendError) as caught:
        _decode({**GOOD, **change})
    assert f"'{field}'" in caught.value.reason
    assert "X-Amz-Signature" not in str(caught.value)


def test_decode_a_part_size_of_the_wrong_type_names_it() -> None:
    with pytest.raises(BackendError) as caught:
        _decode({"upload_id": "u1", "part_size": "8MiB"}, model=MultipartInitiateResponse)
    assert "'part_size'" in caught.value.reason


def test_decode_keeps_no_part_of_a_non_json_answer_in_the_error() -> None:
    secret_page = b"<html>" + b"s3cr3t " * 100_000
    with pytest.raises(BackendError) as caught:
        _decode(secret_page)
    error = caught.value
    assert error.reason == "Presign request failed: response is not JSON"
    assert error.__cause__ is None and error.__context__ is None


def test_decode_reports_a_status_with_the_backends_message_and_attempts() -> None:
    raw = json.dumps({"error": "x", "message": "storage down"}).encode()
    with pytest.raises(BackendError) as caught:
        decode_backend_answer(
            KEY, "presign", "Presign request failed", 503, raw, 4, PresignResponse
        )
    assert caught.value.reason == "Presign request failed: HTTP 503 after 4 attempts (storage down)"


@pytest.mark.parametrize(
    ("error", "resumable"),
    [
        (StorageTransferError(KEY, "x"), True),
        (StorageTransferError(KEY, "x", status_code=503), True),
        (StorageTransferError(KEY, "x", status_code=429), True),
        (StorageTransferError(KEY, "x", status_code=403), False),
        (BackendError(KEY, "x", status_code=500), True),
        (BackendError(KEY, "x", status_code=400), False),
        (IntegrityError(KEY, "x"), False),
        (SourceFileError(KEY, "x"), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_is_resumable(error: BaseException, resumable: bool) -> None:
    assert is_resumable(error) is resumable


def test_s3_error_region_reads_where_the_bucket_is() -> None:
    from ctrlupload.protocol import s3_error_region

    body = b"<Error><Code>PermanentRedirect</Code><Region>eu-west-1</Region></Error>"
    assert s3_error_region(body) == "eu-west-1"
    assert s3_error_region(b"<Error><Code>AccessDenied</Code></Error>") == ""


@pytest.mark.parametrize(
    ("status", "body", "missing"),
    [
        (405, b"", True),
        (501, b"", True),
        (404, b'{"error": "not_found"}', True),
        (404, b'{"timestamp": "...", "status": 404, "error": "Not Found"}', True),
        (404, b"<html>no</html>", True),
        (404, b'{"error": "no_such_upload", "message": "gone"}', False),
        (200, b'{"status": "ok"}', False),
        (409, b'{"error": "object_mismatch"}', False),
    ],
)
def test_endpoint_missing_tells_a_missing_route_from_the_contracts_own_404(
    status: int, body: bytes, missing: bool
) -> None:
    from ctrlupload.protocol import endpoint_missing

    assert endpoint_missing(status, body) is missing


def test_json_string_field_reads_only_a_non_empty_string_of_an_object() -> None:
    from ctrlupload.protocol import json_string_field

    assert json_string_field(b'{"upload_id": "u-1"}', "upload_id") == "u-1"
    for body in (b'{"upload_id": ""}', b'{"upload_id": 7}', b"[1]", b"not json", b"{}"):
        assert json_string_field(body, "upload_id") is None
