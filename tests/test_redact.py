"""Presigned query strings and the service token never reach text we produce."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from ctrlupload import BackendError, BackendPresignedStorageProvider, Settings
from ctrlupload._redact import (
    REDACTED,
    RedactingFilter,
    redact_text,
    redact_url,
    register_secret,
)
from tests.support.servers import PRESIGN_PATH, FakeBackend, RawBody

if TYPE_CHECKING:
    from ctrlupload.server import ReferenceServer

SIGNED = (
    "https://bucket.s3.ap-northeast-2.amazonaws.com/videos/V/video.mp4"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=deadbeefcafe#frag"
)


def test_redact_url_drops_query_fragment_and_userinfo() -> None:
    assert redact_url(SIGNED) == (
        f"https://bucket.s3.ap-northeast-2.amazonaws.com/videos/V/video.mp4?{REDACTED}"
    )
    assert redact_url("http://user:pw@host:8080/p") == "http://host:8080/p"
    assert redact_url("http://[::1]:9000/k?sig=1") == f"http://[::1]:9000/k?{REDACTED}"


def test_redact_text_handles_request_targets_and_bearer_tokens() -> None:
    text = "PUT /videos/a.mp4?X-Amz-Signature=abc HTTP/1.1 Authorization: Bearer tok123"
    out = redact_text(text)
    assert "abc" not in out
    assert "tok123" not in out
    assert "/videos/a.mp4" in out


def test_registered_secrets_are_removed_anywhere() -> None:
    register_secret("s3cr3t-token-xyz")
    assert "s3cr3t-token-xyz" not in redact_text("token was s3cr3t-token-xyz, oops")


def test_filter_rewrites_records_with_arguments(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.redact")
    logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.WARNING, logger="tests.redact"):
        logger.warning("Retrying %s after %r", "/k?X-Amz-Signature=zzz", ValueError("x"))
    assert caplog.records[0].getMessage() == f"Retrying /k?{REDACTED} after ValueError('x')"


def test_urllib3_loggers_are_filtered_once_ctrlupload_is_imported() -> None:
    import ctrlupload  # noqa: F401

    for name in ("urllib3.connectionpool", "urllib3.util.retry", "ctrlupload.server"):
        assert any(isinstance(f, RedactingFilter) for f in logging.getLogger(name).filters)


# -- bearer credentials, not words ---------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Presign request failed: HTTP 401 (missing or wrong bearer token)",
        "Authorization: Bearer token required.",
        "expected 'Authorization: Bearer <token>'",
        'WWW-Authenticate: Bearer realm="ctrlupload", error="invalid_token"',
        "send a Bearer Token, not a BEARER TOKEN",
        "bearer authentication failed: no bearer credentials.",
    ],
)
def test_words_after_bearer_stay(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize(
    ("text", "secret", "expected"),
    [
        (
            "Authorization: Bearer tok123",
            "tok123",
            f"Authorization: Bearer {REDACTED}",
        ),
        (
            "{'Authorization': 'Bearer not-the-token', 'Accept': '*/*'}",
            "not-the-token",
            f"{{'Authorization': 'Bearer {REDACTED}', 'Accept': '*/*'}}",
        ),
        (
            '"authorization": "Basic dXNlcjpwYXNzd29yZA=="',
            "dXNlcjpwYXNzd29yZA==",
            f'"authorization": "Basic {REDACTED}"',
        ),
        (
            "got bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl.",
            "eyJhbGciOiJIUzI1NiJ9",
            f"got bearer {REDACTED}.",
        ),
        ("Bearer AbCdEfGhIjKl rejected", "AbCdEfGhIjKl", f"Bearer {REDACTED} rejected"),
        ("Bearer abcdefghijklmnopqrstuvwx", "abcdefghijklmnop", f"Bearer {REDACTED}"),
        (
            "Authorization: AWS AKIAIOSFODNN7EXAMPLE:frJIUN8DYpKDtOLCwo//yllqDzg=",
            "frJIUN8DYpKDtOLCwo",
            f"Authorization: AWS {REDACTED}",
        ),
        ("Authorization: abc123def was refused", "abc123def", None),
    ],
)
def test_bearer_and_authorization_credentials_go(
    text: str, secret: str, expected: str | None
) -> None:
    out = redact_text(text)
    assert secret not in out
    if expected is not None:
        assert out == expected


def test_a_wrong_token_refusal_keeps_its_words_end_to_end(
    reference_server: ReferenceServer,
) -> None:
    settings = Settings.from_mapping(
        {
            "STORAGE_PROVIDER": "backend_presigned",
            "BACKEND_BASE_URL": reference_server.base_url,
            "BACKEND_SERVICE_TOKEN": "wrong-0123456789",
            "STORAGE_RETRY_ATTEMPTS": 1,
        }
    )
    with (
        BackendPresignedStorageProvider(settings) as provider,
        pytest.raises(BackendError) as caught,
    ):
        provider.put_object(b"x", "videos/V/S/J/video.mp4")
    assert "HTTP 401 (missing or wrong bearer token)" in str(caught.value)
    assert "wrong-0123456789" not in str(caught.value)


# -- presigning signatures echoed outside a URL ----------------------------------------

SIG_HEX = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
SIGNATURE_DOES_NOT_MATCH = (
    "<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>SignatureDoesNotMatch</Code>"
    "<Message>The request signature we calculated does not match the signature you "
    "provided. Check your key and signing method.</Message>"
    "<AWSAccessKeyId>AKIAIOSFODNN7EXAMPLE</AWSAccessKeyId>"
    "<StringToSign>AWS4-HMAC-SHA256\n20240101T000000Z\n"
    "20240101/us-east-1/s3/aws4_request\n"
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855</StringToSign>"
    f"<SignatureProvided>{SIG_HEX}</SignatureProvided>"
    "<StringToSignBytes>41 57 53 34 2d 48 4d 41 43</StringToSignBytes>"
    "<CanonicalRequest>PUT\n/bucket/videos/a.mp4\nX-Amz-Algorithm=AWS4-HMAC-SHA256&amp;"
    "X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
    "\nhost:bucket.s3.amazonaws.com\n\nhost\nUNSIGNED-PAYLOAD</CanonicalRequest>"
    "<CanonicalRequestBytes>50 55 54 0a</CanonicalRequestBytes>"
    "<RequestId>4442587FB7D0A2F9</RequestId></Error>"
)


def test_s3_signature_mismatch_body_keeps_its_code_and_loses_its_signature() -> None:
    out = redact_text(SIGNATURE_DOES_NOT_MATCH)
    for gone in (SIG_HEX, "AKIAIOSFODNN7EXAMPLE", "e3b0c442", "41 57 53", "50 55 54", "UNSIGNED"):
        assert gone not in out
    assert "<Code>SignatureDoesNotMatch</Code>" in out
    assert "does not match the signature you provided" in out
    assert "<RequestId>4442587FB7D0A2F9</RequestId>" in out
    assert f"<SignatureProvided>{REDACTED}</SignatureProvided>" in out


def test_a_signature_mismatch_body_cut_short_is_still_redacted() -> None:
    cut = SIGNATURE_DOES_NOT_MATCH[: SIGNATURE_DOES_NOT_MATCH.index(SIG_HEX) + 20]
    assert redact_text(cut).endswith(f"<SignatureProvided>{REDACTED}")


@pytest.mark.parametrize(
    ("text", "secrets"),
    [
        (
            f"bad parameter X-Amz-Signature={SIG_HEX} in request",
            [SIG_HEX],
        ),
        (
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus"
            "&X-Amz-Security-Token=FwoGZXIvYXdzEJr%2F%2F%2FAbc&X-Amz-Expires=900",
            ["AKIAEXAMPLE", "FwoGZXIvYXdzEJr"],
        ),
        ('{"error": "bad", "signature": "' + SIG_HEX + '"}', [SIG_HEX]),
        ("{'X-Amz-Signature': '" + SIG_HEX + "'}", [SIG_HEX]),
        (
            "SigV2 Signature=frJIUN8DYpKDtOLCwo%2F%2FyllqDzg%3D&Expires=1700000000 refused",
            ["frJIUN8DYpKDtOLCwo"],
        ),
        (
            "AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&Signature=vjbyPxybdZaNmGa%2ByT272YEAiv4%3D",
            ["AKIAIOSFODNN7EXAMPLE", "vjbyPxybdZaNmGa"],
        ),
        ("x-amz-security-token: IQoJb3JpZ2luX2VjEJr//////////wEaCXVz", ["IQoJb3JpZ2luX2Vj"]),
        (
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/20240101/us-east-1/s3/"
            f"aws4_request, SignedHeaders=host;x-amz-date, Signature={SIG_HEX}",
            ["AKIAEXAMPLE", SIG_HEX],
        ),
        (f"expires=1700000000&signature={SIG_HEX}", [SIG_HEX]),
        (f"the signature {SIG_HEX} has expired", [SIG_HEX]),
    ],
)
def test_signatures_credentials_and_session_tokens_go_wherever_they_are(
    text: str, secrets: list[str]
) -> None:
    out = redact_text(text)
    assert REDACTED in out
    for secret in secrets:
        assert secret not in out


def test_what_surrounds_a_signature_stays() -> None:
    out = redact_text(f"X-Amz-Signature={SIG_HEX}&X-Amz-Expires=900, SignedHeaders=host")
    assert out == f"X-Amz-Signature={REDACTED}&X-Amz-Expires=900, SignedHeaders=host"
    prose = "Signature: does not match; SignatureDoesNotMatch: check the signing key."
    assert redact_text(prose) == prose


@pytest.mark.parametrize(
    "text",
    [
        'ETag "9b2cf535f27731c974343645a3985328" differs from the MD5 of the bytes sent',
        'storage answered ETag "9b2cf535f27731c974343645a3985328-12" for 12 parts',
        "etag=9b2cf535f27731c974343645a3985328-3",
        '{"object_key": "videos/a.mp4", "etag": "\\"9b2cf535f27731c974343645a3985328\\""}',
        'ETag: W/"9b2cf535f27731c974343645a3985328"',
    ],
)
def test_etags_stay_visible(text: str) -> None:
    assert redact_text(text) == text


def test_a_backend_echoing_s3s_refusal_shows_no_signature_end_to_end(
    make_provider: Callable[..., BackendPresignedStorageProvider], backend: FakeBackend
) -> None:
    said = (
        "S3 said SignatureDoesNotMatch for X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101"
        f" <SignatureProvided>{SIG_HEX}</SignatureProvided>"
    )
    assert len(said) < 200  # the whole of it reaches the message
    echo = {"error": "storage_refused", "message": said}
    backend.inject(PRESIGN_PATH, RawBody(400, json.dumps(echo).encode()))
    with pytest.raises(BackendError) as caught:
        make_provider().put_object(b"x", "videos/V/S/J/video.mp4")
    message = str(caught.value)
    assert "S3 said SignatureDoesNotMatch for X-Amz-Credential=" in message
    assert "AKIAIOSFODNN7EXAMPLE" not in message
    assert SIG_HEX not in message


def test_log_records_lose_echoed_signatures(caplog: pytest.LogCaptureFixture) -> None:
    import ctrlupload  # noqa: F401  (installs the filters)

    logger = logging.getLogger("ctrlupload")
    with caplog.at_level(logging.WARNING, logger="ctrlupload"):
        logger.warning("storage said %s", SIGNATURE_DOES_NOT_MATCH)
    assert SIG_HEX not in caplog.text
    assert "SignatureDoesNotMatch" in caplog.text
