"""What an S3-style object store holds and answers, shared by every S3 speaker.

The reference backend's stores (``server``), the shared S3 code (``ctrlupload._s3``)
and the upload engine's signers all describe objects and multipart parts with these
types, and say "no such upload" and "bad part list" with these exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_LIST_PARTS",
    "InvalidPart",
    "NoSuchUpload",
    "ObjectInfo",
    "PartsPage",
    "PresignedPut",
    "StoredPart",
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
    """What the store holds for a key: its size and ETag (quotes included)."""

    size_bytes: int
    etag: str


@dataclass(frozen=True)
class StoredPart:
    """A part a multipart upload holds: its number, ETag (quotes included) and size."""

    part_number: int
    etag: str
    size_bytes: int


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
