"""The backend's internal storage API (seed §3): request and response JSON models.

No network here: these models build request bodies and check what came back, so the
protocol can be tested without a server. Upload URLs and signed headers are
credentials and are left out of every repr.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "MAX_SET_OBJECTS",
    "Checksum",
    "ChecksumAlgorithm",
    "ChecksumType",
    "CompleteRequest",
    "CompleteResponse",
    "CompleteSetObject",
    "CompleteSetRequest",
    "CompleteSetResponse",
    "CompletedObject",
    "CompletedPart",
    "DeleteRequest",
    "IfNoneMatch",
    "ListedPart",
    "MultipartAbortRequest",
    "MultipartCompleteRequest",
    "MultipartCompleteResponse",
    "MultipartInitiateRequest",
    "MultipartInitiateResponse",
    "MultipartListRequest",
    "MultipartListResponse",
    "MultipartPresignRequest",
    "MultipartPresignResponse",
    "PresignRequest",
    "PresignResponse",
    "PresignedPart",
    "ResponseModel",
    "StatusResponse",
    "bare_etag",
    "check_content_type",
    "parse_response",
]


def _integral_number(value: Any) -> Any:
    # JSON Schema counts 5.0 as an integer; JSON decoders hand it over as a float.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: A JSON integer: 5 or 5.0, but not true, "5" or 5.5 (even under strict validation).
JsonInt = Annotated[int, BeforeValidator(_integral_number)]


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Only the scheme is quoted: the rest of the URL is a credential.
        raise ValueError(
            f"upload_url must be an http(s) URL, got scheme {parts.scheme or 'none'!r}"
        )
    return value


#: A presigned URL: http(s) only, never echoed in validation errors.
UploadUrl = Annotated[str, AfterValidator(_http_url)]

#: The most characters a content type may have.
MAX_CONTENT_TYPE_CHARS: Final = 255
_TCHARS: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED: Final = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
#: RFC 9110 §8.3.1 in ASCII: ``type "/" subtype *( OWS ";" OWS name "=" value )``, the
#: value a token or a quoted string. ``openapi.yaml`` carries the same pattern.
CONTENT_TYPE_PATTERN: Final = (
    rf"^{_TCHARS}/{_TCHARS}(?:[ \t]*;[ \t]*{_TCHARS}=(?:{_TCHARS}|{_QUOTED}))*$"
)
_CONTENT_TYPE: Final = re.compile(CONTENT_TYPE_PATTERN)


def check_content_type(value: str) -> str:
    """Return ``value`` if it is a media type the contract takes, such as ``video/mp4``.

    The content type goes into the PUT's signed headers and the download's
    ``Content-Type`` as given, so only RFC 9110 media types in ASCII pass: no control
    character (a CR or LF would inject headers), nothing outside latin-1 (which no
    header can carry), at most 255 characters.

    Raises:
        ValueError: It is not; the message says why without quoting the value.
    """
    if len(value) > MAX_CONTENT_TYPE_CHARS:
        raise ValueError(
            f"content_type must be a media type of at most {MAX_CONTENT_TYPE_CHARS} "
            f"characters, not {len(value)}"
        )
    if not _CONTENT_TYPE.fullmatch(value):
        raise ValueError(
            "content_type must be a media type such as video/mp4 or "
            "'text/plain; charset=utf-8' (RFC 9110: type/subtype and parameters, ASCII "
            "only, no control characters)"
        )
    return value


#: A content type: an RFC 9110 media type in ASCII (:func:`check_content_type`).
ContentType = Annotated[str, AfterValidator(check_content_type)]

#: The checksum algorithms the contract names (issue 11): S3's full-object CRC64NVME.
ChecksumAlgorithm = Literal["CRC64NVME"]
#: How a multipart upload's checksum covers the object: the whole of it, as one CRC.
ChecksumType = Literal["FULL_OBJECT"]
#: The one condition the contract signs: create the object only if the key is free.
IfNoneMatch = Literal["*"]
_CHECKSUM: Final = re.compile(r"[A-Za-z0-9+/]{11}=")


def check_checksum(value: str) -> str:
    """Return ``value`` if it spells a CRC64NVME as S3 does: base64 of eight bytes.

    Raises:
        ValueError: It does not (the value is not quoted: it is short and harmless, but
            the rule is the same for every field).
    """
    if not _CHECKSUM.fullmatch(value):
        raise ValueError(
            "checksum must be the base64 of the CRC's eight big-endian bytes "
            "(12 characters ending in '='), as S3 spells x-amz-checksum-crc64nvme"
        )
    return value


#: A CRC64NVME value as S3 spells it (:func:`check_checksum`).
Checksum = Annotated[str, AfterValidator(check_checksum)]


def _checksum_pair(algorithm: str | None, checksum: str | None) -> None:
    if (algorithm is None) != (checksum is None):
        raise ValueError("give checksum_algorithm and checksum together, or neither")


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Response(BaseModel):
    # Backends may add fields; the contract only fixes the ones named here.
    model_config = ConfigDict(frozen=True, extra="ignore")


#: Base of every response model.
ResponseModel = _Response


class PresignRequest(_Request):
    """Body of ``POST presign-put`` (seed §3.1).

    The optional fields (issue 11) ask the backend to sign more headers into the URL:
    ``x-amz-checksum-crc64nvme`` with ``checksum``, so that storage refuses a body that
    does not match it (400 ``BadDigest``) before it stores anything; and
    ``If-None-Match: *``, so that storage refuses (412) to replace an object already at
    the key. A backend that signs them returns them in ``headers``; one that ignores
    the fields (the seed's) returns neither, and the client can tell.
    """

    object_key: str
    content_type: ContentType
    content_length: JsonInt = Field(ge=0)
    checksum_algorithm: ChecksumAlgorithm | None = None
    checksum: Checksum | None = None
    if_none_match: IfNoneMatch | None = None

    @model_validator(mode="after")
    def _checksum_given_whole(self) -> PresignRequest:
        _checksum_pair(self.checksum_algorithm, self.checksum)
        return self


class PresignResponse(_Response):
    """Answer of ``POST presign-put`` (seed §3.1)."""

    upload_url: UploadUrl = Field(repr=False)
    public_url: str
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    expires_sec: JsonInt | None = Field(default=None, ge=1)

    @field_validator("headers", mode="before")
    @classmethod
    def _null_headers(cls, value: Any) -> Any:
        return {} if value is None else value


class CompleteRequest(_Request):
    """Body of ``POST complete`` (seed §3.2); an upsert by object_key.

    ``checksum_algorithm`` and ``checksum`` (issue 11) are what storage verified on
    arrival: the backend checks that the stored object has that checksum and records
    it. With them, ``etag`` may be left out (a retried PUT whose first answer was lost:
    the client never saw the ETag, and asks the backend to find the object by its size
    and checksum); the seed's shape always has it.
    """

    object_key: str
    etag: str | None = None
    size_bytes: JsonInt = Field(ge=0)
    content_type: ContentType
    public_url: str
    checksum_algorithm: ChecksumAlgorithm | None = None
    checksum: Checksum | None = None

    @model_validator(mode="after")
    def _identified(self) -> CompleteRequest:
        _checksum_pair(self.checksum_algorithm, self.checksum)
        if self.etag is None and self.checksum is None:
            raise ValueError("give etag, or checksum_algorithm and checksum")
        return self


class DeleteRequest(_Request):
    """Body of ``POST delete`` (seed §3.3)."""

    object_key: str


class StatusResponse(_Response):
    """Answer of ``complete`` and ``delete``: ``{"status": "ok"}``."""

    status: str


class CompleteResponse(StatusResponse):
    """Answer of ``complete``: ``{"status": "ok"}``, and what the backend recorded
    when it says so (issue 11; the seed's backends answer the status alone)."""

    etag: str | None = None
    checksum: str | None = None


ResponseT = TypeVar("ResponseT", bound=_Response)


def bare_etag(etag: str) -> str:
    """An ETag without weak marker, quotes or case, for comparing two of them."""
    return etag.strip().removeprefix("W/").strip('"').lower()


def parse_response(model: type[ResponseT], payload: Any) -> tuple[ResponseT | None, str]:
    """Validate a decoded JSON answer against ``model``.

    Returns:
        ``(instance, "")`` when it fits, else ``(None, reason)`` where reason names the
        first missing or bad field without quoting its value.
    """
    if not isinstance(payload, dict):
        return None, f"response is JSON but not an object ({type(payload).__name__})"
    try:
        # Strict: a number in a string, or a string for a number, breaks the contract.
        return model.model_validate(payload, strict=True), ""
    except ValidationError as exc:
        error = exc.errors(include_input=False, include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or "body"
        if error["type"] == "missing":
            return None, f"response is missing '{field}'"
        return None, f"response field '{field}' is invalid: {error['msg']}"


# -- multipart extension (issue 4) ------------------------------------------------------------


class MultipartInitiateRequest(_Request):
    """Body of ``POST multipart/initiate``.

    ``part_size`` is the client's preference; the backend answers with the part size it
    will sign for, which the client must use.
    """

    object_key: str
    content_type: ContentType
    content_length: JsonInt = Field(ge=0)
    part_size: JsonInt | None = Field(default=None, ge=1)
    #: Declare a full-object CRC64NVME (issue 11): parts are signed with their own
    #: checksums, and complete checks the whole object's.
    checksum_algorithm: ChecksumAlgorithm | None = None
    checksum_type: ChecksumType | None = None
    #: Ask that complete refuse (412) to replace an object already at the key.
    if_none_match: IfNoneMatch | None = None

    @model_validator(mode="after")
    def _checksum_declared_whole(self) -> MultipartInitiateRequest:
        if (self.checksum_algorithm is None) != (self.checksum_type is None):
            raise ValueError("give checksum_algorithm and checksum_type together, or neither")
        return self


class MultipartInitiateResponse(_Response):
    """Answer of ``POST multipart/initiate``.

    The optional fields echo what the backend took on (issue 11): a backend that
    ignores the request's checksum or condition leaves them out, and the client then
    knows not to rely on them.
    """

    upload_id: str = Field(min_length=1)
    part_size: JsonInt = Field(ge=1)
    expires_sec: JsonInt | None = Field(default=None, ge=1)
    checksum_algorithm: str | None = None
    checksum_type: str | None = None
    if_none_match: str | None = None


class MultipartPresignRequest(_Request):
    """Body of ``POST multipart/presign-parts``: sign these parts, just ahead of use."""

    object_key: str
    upload_id: str = Field(min_length=1)
    part_numbers: list[JsonInt] = Field(min_length=1, max_length=1000)
    #: Each part's own CRC64NVME, in the order of ``part_numbers`` (an upload
    #: initiated with a checksum): signed into its URL as ``x-amz-checksum-crc64nvme``.
    checksums: list[Checksum] | None = Field(default=None, min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _one_checksum_a_part(self) -> MultipartPresignRequest:
        if self.checksums is not None and len(self.checksums) != len(self.part_numbers):
            raise ValueError("checksums must give one checksum for each of part_numbers")
        return self


class PresignedPart(_Response):
    """One signed part upload."""

    part_number: JsonInt = Field(ge=1, le=10_000)
    upload_url: UploadUrl = Field(repr=False)
    headers: dict[str, str] = Field(default_factory=dict, repr=False)


class MultipartPresignResponse(_Response):
    """Answer of ``POST multipart/presign-parts``."""

    parts: list[PresignedPart]
    expires_sec: JsonInt | None = Field(default=None, ge=1)


class MultipartListRequest(_Request):
    """Body of ``POST multipart/list-parts``; page with ``part_number_marker``."""

    object_key: str
    upload_id: str = Field(min_length=1)
    part_number_marker: JsonInt | None = Field(default=None, ge=0)


class ListedPart(_Response):
    """A part the store already holds."""

    part_number: JsonInt = Field(ge=1, le=10_000)
    etag: str
    size_bytes: JsonInt = Field(ge=0)
    #: The part's CRC64NVME as storage holds it, when the upload has checksums.
    checksum: str | None = None


class MultipartListResponse(_Response):
    """Answer of ``POST multipart/list-parts``: up to 1,000 parts a page."""

    parts: list[ListedPart]
    is_truncated: bool = False
    next_part_number_marker: JsonInt | None = None


class CompletedPart(_Request):
    """A part as listed in ``multipart/complete``."""

    part_number: JsonInt = Field(ge=1, le=10_000)
    etag: str


class MultipartCompleteRequest(_Request):
    """Body of ``POST multipart/complete``: assemble, check and record the object."""

    object_key: str
    upload_id: str = Field(min_length=1)
    parts: list[CompletedPart] = Field(min_length=1, max_length=10_000)
    size_bytes: JsonInt = Field(ge=0)
    content_type: ContentType
    #: The whole object's CRC64NVME (an upload initiated with one): storage refuses to
    #: assemble parts that do not add up to it.
    checksum_algorithm: ChecksumAlgorithm | None = None
    checksum_type: ChecksumType | None = None
    checksum: Checksum | None = None
    #: Refuse (412) to replace an object already at the key.
    if_none_match: IfNoneMatch | None = None

    @model_validator(mode="after")
    def _checksum_given_whole(self) -> MultipartCompleteRequest:
        _checksum_pair(self.checksum_algorithm, self.checksum)
        if (self.checksum is None) != (self.checksum_type is None):
            raise ValueError("give checksum_type with checksum, or neither")
        return self


class MultipartCompleteResponse(_Response):
    """Answer of ``POST multipart/complete``; ``checksum`` is the whole object's
    CRC64NVME that storage checked, when it did (issue 11)."""

    public_url: str
    etag: str
    checksum: str | None = None


#: Most objects one ``complete-set`` call records.
MAX_SET_OBJECTS: Final = 100


class CompleteSetObject(_Request):
    """One object of ``POST complete-set``.

    Either an object already stored by a single PUT (``etag`` and ``public_url``, as
    for ``complete``) or a multipart upload whose parts are all stored and which the
    backend assembles (``upload_id`` and ``parts``, as for ``multipart/complete``).
    """

    object_key: str
    size_bytes: JsonInt = Field(ge=0)
    content_type: ContentType
    etag: str | None = None
    public_url: str | None = None
    upload_id: str | None = Field(default=None, min_length=1)
    parts: list[CompletedPart] | None = Field(default=None, min_length=1, max_length=10_000)
    #: As for ``complete`` (a stored object) or ``multipart/complete`` (an upload).
    checksum_algorithm: ChecksumAlgorithm | None = None
    checksum_type: ChecksumType | None = None
    checksum: Checksum | None = None
    #: Multipart members: refuse (412) to replace an object already at the key.
    if_none_match: IfNoneMatch | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> CompleteSetObject:
        _checksum_pair(self.checksum_algorithm, self.checksum)
        stored = self.etag is not None or self.public_url is not None
        multipart = self.upload_id is not None or self.parts is not None
        if self.checksum_type is not None and not multipart:
            raise ValueError("checksum_type is for multipart uploads only")
        if stored == multipart:
            raise ValueError(
                "give either etag and public_url (a stored object) or upload_id and "
                "parts (a multipart upload to assemble)"
            )
        if stored and (self.public_url is None or (self.etag is None and self.checksum is None)):
            raise ValueError("a stored object needs public_url, and etag or checksum")
        if multipart and (self.upload_id is None or self.parts is None):
            raise ValueError("a multipart upload needs both upload_id and parts")
        return self


class CompleteSetRequest(_Request):
    """Body of ``POST complete-set``: record every object, or none, in one transaction.

    An upsert by object_key like ``complete``; repeating the call is safe. An empty
    list records nothing (and tells a caller the backend offers the call).
    """

    objects: list[CompleteSetObject] = Field(max_length=MAX_SET_OBJECTS)

    @field_validator("objects")
    @classmethod
    def _unique_keys(cls, value: list[CompleteSetObject]) -> list[CompleteSetObject]:
        keys = [item.object_key for item in value]
        if len(set(keys)) != len(keys):
            raise ValueError("object_key values must be unique")
        return value


class CompletedObject(_Response):
    """One recorded object in the answer of ``complete-set``."""

    object_key: str
    etag: str
    public_url: str
    checksum: str | None = None


class CompleteSetResponse(_Response):
    """Answer of ``POST complete-set``: the objects recorded, in request order."""

    status: str
    objects: list[CompletedObject]


class MultipartAbortRequest(_Request):
    """Body of ``POST multipart/abort``; aborting an unknown upload is not an error."""

    object_key: str
    upload_id: str = Field(min_length=1)
