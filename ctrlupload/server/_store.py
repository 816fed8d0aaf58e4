"""Object stores behind the reference backend: one interface, two implementations.

``LocalObjectStore`` (the embedded default) keeps objects on disk and signs upload URLs
for the server's own PUT endpoint. ``S3ObjectStore`` (``ctrlupload[s3]``) presigns real
S3 PUTs with boto3 for AWS or any S3-compatible endpoint.

Both also run S3-style multipart uploads: create, presign each part, list the parts
held, complete (assemble) and abort. The local store mimics S3's semantics, including
``NoSuchUpload`` for an upload that was never started, was aborted or was completed.

Both sign what storage must verify before it commits (issue 11): a CRC64NVME in
``x-amz-checksum-crc64nvme`` (a body that does not match is refused with
:class:`BadDigest`, nothing stored), and ``If-None-Match: *`` (an object already at the
key is not replaced: :class:`ObjectExists`). Every parameter for them is keyword-only
with a default, so a call written before them keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from ..protocol._objects import (
    MAX_LIST_PARTS,
    BadDigest,
    InvalidPart,
    NoSuchUpload,
    ObjectExists,
    ObjectInfo,
    PartsPage,
    PresignedPut,
    StoredPart,
)

__all__ = [
    "MAX_LIST_PARTS",
    "BadDigest",
    "IncompleteBody",
    "InvalidPart",
    "NoSuchUpload",
    "NotServedHere",
    "ObjectExists",
    "ObjectInfo",
    "ObjectStore",
    "PartGrant",
    "PartsPage",
    "PresignedPut",
    "StoredPart",
    "UploadGrant",
    "UploadRejected",
    "page_parts",
]


@dataclass(frozen=True)
class UploadGrant:
    """What a signed upload URL allows, recovered from the request.

    ``checksum`` is the signed ``x-amz-checksum-crc64nvme`` (S3's base64), which the
    body must match; ``if_none_match`` says the URL was signed with ``If-None-Match: *``
    (store only if no object is at the key).
    """

    key: str
    content_type: str
    content_length: int
    expires_at: int
    checksum: str | None = None
    if_none_match: bool = False


@dataclass(frozen=True)
class PartGrant:
    """What a signed part URL allows, recovered from the request."""

    key: str
    upload_id: str
    part_number: int
    content_length: int
    expires_at: int
    #: The signed ``x-amz-checksum-crc64nvme`` the part's bytes must match.
    checksum: str | None = None


class UploadRejected(Exception):
    """The PUT does not match its signature, or came too late.

    Attributes:
        status: HTTP status to answer.
        code: S3-style error code (``AccessDenied``, ``SignatureDoesNotMatch``...).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class IncompleteBody(Exception):
    """The client sent fewer bytes than it announced (it went away mid-upload)."""


class NotServedHere(Exception):
    """This store does not serve uploads or downloads itself (they go to S3)."""


def page_parts(parts: Iterable[StoredPart], part_number_marker: int, max_parts: int) -> PartsPage:
    """Page parts the way S3's ListParts does.

    Args:
        parts: Every part held, in any order.
        part_number_marker: List only parts with a larger number (0 for the first page).
        max_parts: The most parts in one page (at least 1).

    Returns:
        Up to ``max_parts`` parts above the marker, ascending; ``is_truncated`` when more
        follow, and then ``next_part_number_marker`` is the last number in this page.
    """
    if max_parts < 1:
        raise ValueError("max_parts must be at least 1")
    after = sorted(
        (part for part in parts if part.part_number > part_number_marker),
        key=lambda part: part.part_number,
    )
    page = tuple(after[:max_parts])
    truncated = len(after) > max_parts
    return PartsPage(page, truncated, page[-1].part_number if truncated else None)


class ObjectStore(Protocol):
    """What the reference backend needs from a store. Implementations are thread-safe."""

    @property
    def signs_checksums(self) -> bool:
        """Whether the store signs and verifies CRC64NVME checksums."""
        ...

    def presign_put(
        self,
        key: str,
        content_type: str,
        content_length: int,
        expires_sec: int,
        *,
        checksum: str | None = None,
        if_none_match: bool = False,
    ) -> PresignedPut:
        """Return a URL that accepts exactly one PUT of this key, type and length.

        With ``checksum`` (S3's base64 of a CRC64NVME) the body must match it, and with
        ``if_none_match`` storage refuses to replace an object already at the key. The
        answer's ``headers`` are every header the PUT must send, exactly: with these,
        ``x-amz-checksum-crc64nvme`` and ``If-None-Match: *``.
        """
        ...

    def public_url(self, key: str) -> str:
        """Where the object can be downloaded once stored."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """Size, ETag and (when known) CRC64NVME of the stored object, or None."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""
        ...

    # -- multipart uploads -----------------------------------------------------------

    def create_multipart(
        self, key: str, content_type: str, part_size: int, *, checksum: bool = False
    ) -> str:
        """Start a multipart upload of ``key`` and return its upload id.

        ``part_size`` is the size of every part but the last, as the backend signs them.
        With ``checksum`` the upload is declared CRC64NVME, ``FULL_OBJECT``.
        """
        ...

    def presign_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        content_length: int,
        expires_sec: int,
        *,
        checksum: str | None = None,
    ) -> PresignedPut:
        """Return a URL that accepts one PUT of this part with exactly this length.

        With ``checksum`` the part's bytes must match it (``x-amz-checksum-crc64nvme``
        in the answer's headers).
        """
        ...

    def list_parts(
        self, key: str, upload_id: str, *, part_number_marker: int = 0, max_parts: int = 1000
    ) -> PartsPage:
        """The parts the upload holds above ``part_number_marker``, ascending.

        Raises:
            NoSuchUpload: The store has no such upload for this key.
        """
        ...

    def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[StoredPart],
        *,
        checksum: str | None = None,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        """Assemble ``parts`` (ascending, as listed) into the object and end the upload.

        Returns:
            The stored object's size and ETag (S3's ``"<md5 of part md5s>-N"`` form),
            and its CRC64NVME when the store knows it.

        Raises:
            NoSuchUpload: The store has no such upload for this key.
            InvalidPart: A part is missing or differs from the one given.
            BadDigest: The parts do not add up to ``checksum``; nothing is stored.
            ObjectExists: ``if_none_match`` and an object is at the key; nothing is
                stored, and the upload stays.
        """
        ...

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop the upload and its parts; an unknown upload is not an error."""
        ...

    # -- start-up --------------------------------------------------------------------

    def check(self) -> None:
        """Fail fast on a bad configuration, at start-up rather than on the first upload.

        Raises:
            StorageError: The store cannot be used (a missing bucket, an unwritable
                folder...), with a message that says why.
        """
        ...

    def close(self) -> None:
        """Release what the store holds (the local store's lock on its data_dir).

        Idempotent; the store is not used afterwards.
        """
        ...

    # -- uploads and downloads the store serves itself ---------------------------------
    #
    # A store whose presigned URLs point at the reference backend (the local store)
    # receives those PUTs and serves downloads through these. A store whose URLs point
    # elsewhere (S3) raises NotServedHere, and the backend answers 404.

    def authorize(
        self,
        key: str,
        *,
        content_type: str,
        content_length: int,
        expires: str | None,
        signature: str | None,
        checksum: str | None = None,
        if_none_match: str | None = None,
    ) -> UploadGrant:
        """Check a presigned object PUT against its signature, the way S3 does.

        ``checksum`` and ``if_none_match`` are the request's ``x-amz-checksum-crc64nvme``
        and ``If-None-Match`` headers (None when absent): both are covered by the
        signature, so one the URL was not signed with, or a signed one left out or
        changed, is refused.

        Raises:
            UploadRejected: The signature does not fit, or the URL expired.
            NotServedHere: This store's URLs point elsewhere.
        """
        ...

    def receive(self, grant: UploadGrant, body: BinaryIO) -> ObjectInfo:
        """Store exactly ``grant.content_length`` bytes of ``body``, atomically.

        Raises:
            IncompleteBody: The body ended early; nothing is stored.
            BadDigest: The body does not match ``grant.checksum``; nothing is stored.
            ObjectExists: ``grant.if_none_match`` and an object is at the key when the
                body is in; nothing is stored.
        """
        ...

    def authorize_part(
        self,
        upload_id: str,
        part_number: int,
        *,
        content_length: int,
        expires: str | None,
        signature: str | None,
        checksum: str | None = None,
    ) -> PartGrant:
        """Check a presigned part PUT against its signature (``checksum`` as above).

        Raises:
            UploadRejected: The signature does not fit, the URL expired, or the part
                number is out of range.
            NoSuchUpload: No such upload.
            NotServedHere: This store's URLs point elsewhere.
        """
        ...

    def receive_part(self, grant: PartGrant, body: BinaryIO) -> ObjectInfo:
        """Store one part of a multipart upload.

        Raises:
            IncompleteBody: The body ended early; the part is not listed.
            BadDigest: The bytes do not match ``grant.checksum``; the part is not listed.
            NoSuchUpload: The upload ended meanwhile.
        """
        ...

    def open(self, key: str) -> tuple[BinaryIO, ObjectInfo] | None:
        """The stored object open for reading, with the size and ETag of what it reads.

        Returns:
            The open file and its :class:`ObjectInfo`, both of the same stored version
            even while the key is being replaced; None when absent (or not served here).
            The caller closes the file.
        """
        ...
