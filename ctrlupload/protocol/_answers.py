"""Reading answers: storage's and the backend's, with no network.

Each function takes what came back (a status, headers, a body, the URL that was used,
the time) and decides: did the presigned URL expire, what does an S3 error say, does
the ETag match the bytes sent, is a JSON answer the contract's, and can a failure be
resumed later. Tests drive them with plain values.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from collections.abc import Mapping
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlsplit

from .._errors import (
    BackendError,
    IntegrityError,
    S3AccessDeniedError,
    S3BucketNotFoundError,
    S3CredentialsError,
    S3Error,
    SourceFileError,
    StorageTransferError,
    UploadTooLargeError,
)
from .._redact import redact_text
from ._contract import ResponseModel, parse_response

__all__ = [
    "EXPIRED_MARKER",
    "attempts_suffix",
    "check_etag",
    "decode_backend_answer",
    "endpoint_missing",
    "etag_is_md5",
    "is_expired_answer",
    "is_resumable",
    "json_error_detail",
    "json_string_field",
    "process_put_answer",
    "put_refusal",
    "s3_error_detail",
    "s3_error_fields",
    "s3_error_region",
    "signature_expiry",
]

#: What S3 says in the body of a 403 for an expired presigned URL.
EXPIRED_MARKER: Final = b"Request has expired"
_PLAIN_MD5_ETAG: Final = re.compile(r'^(?:W/)?"?([0-9a-fA-F]{32})"?$')
_S3_ERROR_FIELD: Final = re.compile(rb"<(Code|Message|Region)>([^<]{0,300})</\1>")
_AMZ_DATE: Final = re.compile(r"^(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z$")

_ModelT = TypeVar("_ModelT", bound=ResponseModel)


def attempts_suffix(attempts: int) -> str:
    """``" after N attempts"`` when a request was tried more than once, else ``""``."""
    return f" after {attempts} attempts" if attempts > 1 else ""


# -- storage answers ------------------------------------------------------------------


def s3_error_fields(body: bytes) -> tuple[str, str]:
    """The ``Code`` and ``Message`` of an S3 XML error body (empty strings if absent)."""
    fields = dict(_S3_ERROR_FIELD.findall(body))
    code = fields.get(b"Code", b"").decode("utf-8", "replace").strip()
    message = fields.get(b"Message", b"").decode("utf-8", "replace").strip()
    return code, message


def s3_error_region(body: bytes) -> str:
    """The ``Region`` of an S3 XML error body (empty if absent): where the bucket is."""
    fields: dict[bytes, bytes] = dict(_S3_ERROR_FIELD.findall(body))
    return fields.get(b"Region", b"").decode("ascii", "replace").strip()


def s3_error_detail(body: bytes) -> str:
    """``" (Code: Message)"`` from an S3 error body, redacted; ``""`` if it has none."""
    code, message = s3_error_fields(body)
    if not code and not message:
        return ""
    detail = ": ".join(part for part in (code, message) if part)
    return f" ({redact_text(detail)})"


def signature_expiry(url: str) -> float | None:
    """When a presigned URL stops working, in epoch seconds, as its query says.

    SigV4 (``X-Amz-Date`` + ``X-Amz-Expires``) and SigV2 (``Expires``) are understood;
    None when the URL says neither.
    """
    try:
        query = dict(parse_qsl(urlsplit(url).query))
    except ValueError:
        return None
    date, expires = query.get("X-Amz-Date"), query.get("X-Amz-Expires")
    if date and expires and expires.isdigit():
        match = _AMZ_DATE.match(date)
        if match:
            fields = tuple(int(part) for part in match.groups())
            try:
                signed_at = calendar.timegm((*fields, 0, 0, 0))
            except (OverflowError, ValueError):
                return None
            return float(signed_at + int(expires))
    legacy = query.get("Expires")
    if legacy and legacy.isdigit():
        return float(legacy)
    return None


def is_expired_answer(
    status: int,
    body: bytes,
    url: str,
    *,
    expires_at: float | None = None,
    now: float | None = None,
) -> bool:
    """Whether storage refused a PUT because its presigned URL had expired.

    S3 says so in the body (403 ``Request has expired``). Some S3-compatible stores
    answer a bare 403 (``AccessDenied`` or no body at all); that counts as expiry when
    the URL's own expiry (:func:`signature_expiry`) or ``expires_at`` (the backend's
    ``expires_sec`` counted from when it answered) has passed.

    Args:
        status: The HTTP status storage answered.
        body: Its body.
        url: The presigned URL that was used.
        expires_at: Epoch seconds the signer said the URL stays valid until, if known.
        now: The current epoch time; defaults to ``time.time()``.
    """
    if status != 403:
        return False
    if EXPIRED_MARKER in body:
        return True
    code, _ = s3_error_fields(body)
    if code not in ("", "AccessDenied"):
        return False  # SignatureDoesNotMatch and the like are not expiry
    known = [moment for moment in (signature_expiry(url), expires_at) if moment is not None]
    if not known:
        return False
    return (time.time() if now is None else now) >= min(known)


def etag_is_md5(etag: str, headers: Mapping[str, str], url: str = "") -> bool:
    """Whether storage's ETag for a PUT is the MD5 of the body it stored.

    Not for multipart-style ETags (``…-N``), for SSE-KMS and SSE-C objects (the ETag is
    then no digest of the body), nor for S3 Express One Zone directory buckets (bucket
    names end in ``--x-s3``; their ETags are opaque), whichever the answer looks like.

    Args:
        etag: The ETag answered.
        headers: The answer's headers, lower-case names.
        url: The URL the PUT went to (it names the bucket).
    """
    if _PLAIN_MD5_ETAG.match(etag.strip()) is None:
        return False
    encryption = headers.get("x-amz-server-side-encryption", "")
    if encryption.startswith("aws:kms") or encryption == "aws:fsx":
        return False
    if "x-amz-server-side-encryption-customer-algorithm" in headers:
        return False
    return not _is_s3_express(url)


def _is_s3_express(url: str) -> bool:
    """Whether the URL addresses an S3 Express directory bucket (``name--zone--x-s3``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    first_segment = parts.path.lstrip("/").split("/", 1)[0].lower()
    return "--x-s3." in host or host.endswith("--x-s3") or first_segment.endswith("--x-s3")


def check_etag(key: str, etag: str, digest: str, headers: Mapping[str, str], url: str = "") -> bool:
    """Compare storage's ETag with the MD5 of the bytes sent, where the ETag is one.

    Returns:
        True when the ETag is the body's MD5 (:func:`etag_is_md5`) and matches; False
        when it is no MD5, so nothing could be checked.

    Raises:
        IntegrityError: The ETag is a plain MD5 and differs from ``digest``.
    """
    if not etag_is_md5(etag, headers, url):
        return False
    match = _PLAIN_MD5_ETAG.match(etag.strip())
    assert match is not None
    if match.group(1).lower() != digest:
        raise IntegrityError(
            key,
            f"ETag {etag} from storage does not match the MD5 of the bytes sent ({digest})",
        )
    return True


def put_refusal(status: int, body: bytes) -> str | None:
    """What a refused PUT means for integrity and overwrites, if that is what it means.

    Returns:
        ``"bad-digest"`` for S3's ``400 BadDigest`` (the body did not match the
        checksum signed into the URL; nothing was stored), ``"exists"`` for ``412``
        (``If-None-Match: *`` found an object at the key; nothing was written), else
        None.
    """
    if status == 412:
        return "exists"
    if status == 400:
        code, _ = s3_error_fields(body)
        if code == "BadDigest":
            return "bad-digest"
    return None


def process_put_answer(
    key: str,
    what: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    attempts: int,
    digest: str | None,
    url: str = "",
) -> tuple[str, bool]:
    """Check storage's answer to a presigned PUT: its ETag, and whether it was checked.

    Args:
        key: The object key, for errors.
        what: What was sent, e.g. ``Upload to presigned URL``.
        status: The HTTP status.
        headers: Its headers, lower-case names.
        body: Its body.
        attempts: How many attempts the PUT took.
        digest: The MD5 hex of the bytes sent, or None when it is not checked.
        url: The URL the PUT went to (an S3 Express bucket's ETag is no MD5).

    Returns:
        The ETag, and True when it was the body's MD5 and matched ``digest``.

    Raises:
        StorageTransferError: Storage refused the PUT or answered without an ETag.
        IntegrityError: The ETag disagrees with ``digest``.
    """
    if not 200 <= status < 300:
        raise StorageTransferError(
            key,
            f"{what} failed: HTTP {status}{attempts_suffix(attempts)}" + s3_error_detail(body),
            status_code=status,
        )
    etag = headers.get("etag")
    if not etag:
        raise StorageTransferError(
            key, f"{what} failed: storage answered without an ETag", status_code=status
        )
    verified = digest is not None and check_etag(key, etag, digest, headers, url)
    return etag, verified


# -- backend answers ------------------------------------------------------------------


def json_error_detail(body: bytes) -> str:
    """``" (message)"`` from a JSON error body (``message``, ``error`` or ``detail``)."""
    payload, _ = _loads(body)
    if not isinstance(payload, dict):
        return ""
    for name in ("message", "error", "detail"):
        value = payload.get(name)
        if isinstance(value, str) and value:
            return f" ({redact_text(value[:200])})"
    return ""


def endpoint_missing(status: int, body: bytes) -> bool:
    """Whether a backend answered that it lacks an optional endpoint (multipart,
    complete-set): 405 or 501, or a 404 that is not the contract's own
    ``no_such_upload`` (the Spring backend's error JSON included)."""
    if status in (405, 501):
        return True
    return status == 404 and json_string_field(body, "error") != "no_such_upload"


def json_string_field(body: bytes, name: str) -> str | None:
    """A non-empty string field of a JSON object body (``error``, ``upload_id``...), or
    None when the body is not a JSON object or the field is missing or not a string."""
    payload, _ = _loads(body)
    value = payload.get(name) if isinstance(payload, dict) else None
    return value if isinstance(value, str) and value else None


def _loads(body: bytes) -> tuple[Any, bool]:
    """Decode JSON; ``(value, True)``, or ``(None, False)`` with nothing kept of the
    failure: a decode error holds the whole document in ``.doc``."""
    try:
        return json.loads(body), True
    except ValueError:
        pass
    return None, False


def decode_backend_answer(
    key: str,
    phase: str,
    label: str,
    status: int,
    body: bytes,
    attempts: int,
    model: type[_ModelT],
) -> _ModelT:
    """Turn the backend's answer into ``model``, or raise the error that names why.

    Args:
        key: The object key, for errors.
        phase: The error's phase (``presign``, ``complete`` ...).
        label: How the call is named in messages, e.g. ``Presign request failed``.
        status: The HTTP status.
        body: The body.
        attempts: How many attempts the call took.
        model: The contract's response model.

    Raises:
        BackendError: A non-2xx status, a body that is not JSON, or a JSON answer that
            breaks the contract (the message names the field, never its value). No
            part of the answer is kept in the error's cause or context.
    """
    if not 200 <= status < 300:
        raise BackendError(
            key,
            f"{label}: HTTP {status}{attempts_suffix(attempts)}" + json_error_detail(body),
            phase=phase,
            status_code=status,
        )
    payload, decoded = _loads(body)
    if not decoded:
        raise BackendError(key, f"{label}: response is not JSON", phase=phase, status_code=status)
    parsed, problem = parse_response(model, payload)
    if parsed is None:
        raise BackendError(key, f"{label}: {problem}", phase=phase, status_code=status)
    return parsed


# -- what a later resume can get past -------------------------------------------------


def is_resumable(exc: BaseException) -> bool:
    """Whether a failure is the network's or the service's, not the data's.

    Those are worth keeping a multipart upload for: a later ``resume=True`` call can
    send what is missing. A changed file, an integrity failure or a 4xx refusal is not.
    """
    if isinstance(exc, (IntegrityError, SourceFileError, UploadTooLargeError)):
        return False
    if isinstance(exc, (S3CredentialsError, S3BucketNotFoundError, S3AccessDeniedError)):
        return False  # configuration, whatever the status said
    if isinstance(exc, (StorageTransferError, BackendError, S3Error)):
        status = exc.status_code
        return status is None or status >= 500 or status == 429
    return False
