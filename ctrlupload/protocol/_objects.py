"""What an S3-style object store holds and answers, shared by every S3 speaker.

The reference backend's stores (``server``), the shared S3 code (``ctrlupload._s3``)
and the upload engine's signers all describe objects and multipart parts with these
types, and say "no such upload" and "bad part list" with these exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_LIST_PARTS",
    "BadDigest",
    "InvalidPart",
    "NoSuchUpload",
    "ObjectExists",
    "ObjectInfo",
    "PartsPage",
    "PresignedPut",
    "StoredPart",
    "all_parts",
]

#: S3's page size for ListParts, and the most the contract returns at once.
MAX_LIST_PARTS: Final = 1000


@dataclass(frozen=True)
class PresignedPut:
    """Where and how to PUT one object. The URL and headers are credentials: no repr."""

    upload_url: str = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    expires_sec: int


@dataclass(frozen=True)
class ObjectInfo:
    """What the store holds for a key: its size and ETag (quotes included), and its
    whole-object CRC64NVME (S3's base64) when the store keeps one."""

    size_bytes: int
    etag: str
    checksum: str | None = None


@dataclass(frozen=True)
class StoredPart:
    """A part a multipart upload holds: its number, ETag (quotes included) and size,
    and its own CRC64NVME (S3's base64) when the upload was declared with checksums."""

    part_number: int
    etag: str
    size_bytes: int
    checksum: str | None = None


@dataclass(frozen=True)
class PartsPage:
    """One page of ListParts: parts in ascending order, and where the next page starts."""

    parts: tuple[StoredPart, ...]
    is_truncated: bool
    next_part_number_marker: int | None


class NoSuchUpload(Exception):
    """The store holds no such multipart upload: never started, aborted or completed."""


class InvalidPart(Exception):
    """A part named in a completion is missing, differs, or is too small."""


class ObjectExists(Exception):
    """A conditional write (``If-None-Match: *``) found an object at the key: S3's
    ``412 PreconditionFailed``. Nothing was written."""


class BadDigest(Exception):
    """The bytes do not match the checksum they were sent with: S3's ``400 BadDigest``.
    Nothing was written."""


def all_parts(fetch: Callable[[int | None], PartsPage | None]) -> list[StoredPart] | None:
    """Every part of an upload, over all pages of ListParts.

    Args:
        fetch: One page after a part-number marker (None for the first page), or None
            when the upload is gone.

    Returns:
        The parts, ascending; None if the upload is gone.

    Raises:
        ValueError: A truncated page's marker did not advance (it would loop forever).
    """
    listed: list[StoredPart] = []
    marker: int | None = None
    while True:
        page = fetch(marker)
        if page is None:
            return None
        listed.extend(page.parts)
        following = page.next_part_number_marker
        if not page.is_truncated:
            return listed
        if following is None or (marker is not None and following <= marker):
            raise ValueError("the page marker did not advance")
        marker = following
