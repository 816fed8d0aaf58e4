"""Keep credentials out of messages, log records and reprs.

A presigned URL is a credential: its query string carries the signature. The backend
service token is a credential too. Everything ctrlupload writes passes through here.

Servers echo credentials outside URLs too: S3's SignatureDoesNotMatch body quotes the
signature and what it signed, a backend may repeat ``X-Amz-Signature=...`` or an
``Authorization`` header. Those go; words ("missing bearer token") and ETags stay.
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

# What a credential may be made of: anything up to whitespace, a quote, a bracket or a
# separator. "[" also keeps an earlier "[redacted]" from being redacted again.
_VALUE = r"[^\s'\"<>()\[\]{},;&]+"

# The elements of S3's SignatureDoesNotMatch error that carry the signature or what it
# signs (the canonical request holds the presigned query). A message cut short may lack
# the closing tag: then everything after the opening one goes.
_XML_RE = re.compile(
    r"(?is)(<(SignatureProvided|StringToSign|StringToSignBytes|CanonicalRequest"
    r"|CanonicalRequestBytes|AWSAccessKeyId)>)(.*?)(</\2>|\Z)"
)

# An Authorization header's value as servers and clients echo it: "Authorization: Bearer
# x", '"authorization": "Basic x"', "{'Authorization': 'AWS AKID:sig'}".
_AUTHORIZATION_RE = re.compile(
    r"(?i)(?<![\w-])((?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?"
    r"(?:(?:bearer|basic|token|aws4-hmac-sha256|aws)\s+)?)(" + _VALUE + ")"
)
# "Bearer x" anywhere else, e.g. a header line without its name.
_BEARER_RE = re.compile(r"(?i)(?<![\w-])(bearer\s+)(" + _VALUE + ")")

# Presigning parameters and headers: SigV4 (X-Amz-*, and Credential= / Signature= in
# an Authorization header), SigV2 (Signature, AWSAccessKeyId), the reference backend's
# lower-case "signature".
_SIGNING_NAMES = (
    r"x-amz-signature|x-amz-credential|x-amz-security-token|signature|credential"
    r"|awsaccesskeyid"
)
# name=value: a query parameter or an auth-param; whatever the value, it goes.
_SIGNING_PARAM_RE = re.compile(
    r"(?i)(?<![\w-])((?:" + _SIGNING_NAMES + r")=[\"']?)(" + _VALUE + ")"
)
# name: value, "name": "value": a header or a JSON field; the value goes when it looks
# like a credential, so that "Signature: does not match" keeps its words.
_SIGNING_FIELD_RE = re.compile(
    r"(?i)(?<![\w-])([\"']?(?:" + _SIGNING_NAMES + r")[\"']?\s*:\s*[\"']?)(" + _VALUE + ")"
)
# A SigV4 signature (and the reference backend's) is 64 hex digits, an HMAC-SHA256;
# an ETag, 32 hex digits with or without "-N", is not touched.
_HEX_SIGNATURE_RE = re.compile(r"(?<![0-9A-Za-z])[0-9A-Fa-f]{64}(?![0-9A-Za-z])")

# Sentence punctuation after a credential is left where it was.
_TRAILING = ".:!?"
# An auth-param (realm="x", error="invalid_token") follows a scheme, not a credential.
_AUTH_PARAM_NAME = re.compile(r"[A-Za-z][\w-]*")
# An ordinary word is all letters, lower case, Capitalised or in capitals; a credential
# this long made only of letters is not one.
_LONGEST_WORD = 15

_secrets_lock = threading.Lock()
_known_secrets: set[str] = set()


def _looks_like_credential(value: str) -> bool:
    """Whether ``value`` (after "Bearer", say) is a credential rather than a word.

    A token68 credential (RFC 7235) has digits, punctuation, mixed case or is long;
    "token", "Token" and "TOKEN" are words.
    """
    word = value.rstrip("=")
    if not word:
        return False
    if not word.isalpha():
        return True
    if word.islower() or word.isupper() or word.istitle():
        return len(word) > _LONGEST_WORD
    return True


def _is_auth_param(value: str, following: str) -> bool:
    """Whether ``value`` is ``name=value`` or ``name=`` before a quoted string."""
    name, equals, rest = value.partition("=")
    if not equals or not _AUTH_PARAM_NAME.fullmatch(name):
        return False
    if rest:
        return not rest.startswith("=")  # token68 has its "=" only at the end
    return following in ("'", '"')


def _redact_credential(match: re.Match[str]) -> str:
    prefix, value = match.group(1), match.group(2)
    stripped = value.rstrip(_TRAILING)
    tail = value[len(stripped) :]
    following = tail[:1] or match.string[match.end() : match.end() + 1]
    if not _looks_like_credential(stripped) or _is_auth_param(stripped, following):
        return match.group(0)
    return prefix + REDACTED + tail


def _redact_param(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED


def _redact_element(match: re.Match[str]) -> str:
    opening, _, content, closing = match.groups()
    return opening + (REDACTED if content else "") + closing


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
    """Remove credentials from ``text``: registered secrets, query strings, bearer and
    other Authorization credentials, and presigning signatures, credentials and
    security tokens wherever they are echoed (S3's SignatureDoesNotMatch XML, a
    ``Signature=`` parameter, a ``"signature": "..."`` field). ETags stay."""
    with _secrets_lock:
        secrets = tuple(_known_secrets)
    # Registered secrets first: they may hold characters ("?", "=") another rule would
    # cut them at, leaving a part that no longer matches.
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    text = _QUERY_RE.sub("?" + REDACTED, text)
    text = _XML_RE.sub(_redact_element, text)
    text = _AUTHORIZATION_RE.sub(_redact_credential, text)
    text = _BEARER_RE.sub(_redact_credential, text)
    text = _SIGNING_PARAM_RE.sub(_redact_param, text)
    text = _SIGNING_FIELD_RE.sub(_redact_credential, text)
    return _HEX_SIGNATURE_RE.sub(REDACTED, text)


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
