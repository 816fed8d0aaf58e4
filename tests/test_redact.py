"""Presigned query strings and the service token never reach text we produce."""

import logging

import pytest

from ctrlupload._redact import (
    REDACTED,
    RedactingFilter,
    redact_text,
    redact_url,
    register_secret,
)

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
