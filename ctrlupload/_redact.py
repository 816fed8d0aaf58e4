"""Keep credentials out of messages, log records and reprs.

A presigned URL is a credential: its query string carries the signature. The backend
service token is a credential too. Everything ctrlupload writes passes through here.
"""

from __future__ import annotations

import logging
import re
import threading
from urllib.parse import urlsplit, urlunsplit

REDACTED = "[redacted]"

# A "?" followed by anything up to whitespace or a quote: the query part of a URL or of
# a request target such as urllib3 logs ("PUT /bucket/key?X-Amz-Signature=...").
_QUERY_RE = re.compile(r"\?[^\s'\"<>]+")
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s'\"]+")

_secrets_lock = threading.Lock()
_known_secrets: set[str] = set()


def redact_url(url: str) -> str:
    """Return ``url`` without its query string, userinfo or fragment."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    query = REDACTED if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def register_secret(secret: str) -> None:
    """Remember a secret so that :func:`redact_text` removes it wherever it appears."""
    if len(secret) >= 4:
        with _secrets_lock:
            _known_secrets.add(secret)


def redact_text(text: str) -> str:
    """Remove query strings, bearer tokens and registered secrets from ``text``."""
    text = _QUERY_RE.sub("?" + REDACTED, text)
    text = _BEARER_RE.sub(r"\1" + REDACTED, text)
    with _secrets_lock:
        secrets = tuple(_known_secrets)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that rewrites each record's message through :func:`redact_text`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record must still be redacted
            message = str(record.msg)
        redacted = redact_text(message)
        if redacted != message or record.args:
            record.msg = redacted
            record.args = None
        return True


_FILTERED_LOGGERS = (
    "ctrlupload",
    "ctrlupload.server",
    "ctrlupload.server.access",
    "urllib3",
    "urllib3.connectionpool",
    "urllib3.connection",
    "urllib3.poolmanager",
    "urllib3.response",
    "urllib3.util.retry",
    "requests",
)
_install_lock = threading.Lock()
_installed = False


def install_log_redaction() -> None:
    """Attach :class:`RedactingFilter` to ctrlupload's and urllib3's loggers, once.

    urllib3 logs request targets with their query strings (at WARNING when it retries),
    which for a presigned URL is the signature. Logger filters only see records logged
    on that very logger, hence the list of urllib3's module loggers.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        redacting = RedactingFilter()
        for name in _FILTERED_LOGGERS:
            logging.getLogger(name).addFilter(redacting)
        _installed = True
