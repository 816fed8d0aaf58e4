"""Multipart part planning: pure functions, shared by the client and the reference backend.

S3's rules: every part but the last is 5 MiB to 5 GiB, at most 10,000 parts, and the
whole object at most 5 TiB. :func:`choose_part_size` grows a preferred part size until
the object fits those rules, the way s3transfer's ``ChunksizeAdjuster`` does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

MIB: Final = 1024 * 1024
GIB: Final = 1024 * MIB
#: S3's smallest part (all but the last).
MIN_PART_BYTES: Final = 5 * MIB
#: S3's largest part.
MAX_PART_BYTES: Final = 5 * GIB
#: S3's most parts in one upload.
MAX_PARTS: Final = 10_000
#: S3's largest object.
MAX_OBJECT_BYTES: Final = 5 * 1024 * GIB
#: S3's largest single PUT; bigger bodies must go multipart.
MAX_SINGLE_PUT_BYTES: Final = 5 * GIB

#: Default part size: 8 MiB, as boto3. Per-part overhead (a presign batch entry, a
#: request, an ETag) stays small, and what a crash or a failed part costs to resend
#: stays small too: with 4 parts in flight, at most 32 MiB. Up to 78 GiB fits in 10,000
#: parts at this size; larger files get larger parts automatically.
DEFAULT_PART_BYTES: Final = 8 * MIB
#: Default threshold: below 64 MiB, one PUT is as fast and needs three calls, not five.
DEFAULT_MULTIPART_THRESHOLD_BYTES: Final = 64 * MIB


@dataclass(frozen=True)
class Part:
    """One part of a plan: its number (1-based), offset and length in the file."""

    number: int
    offset: int
    length: int


def choose_part_size(
    size_bytes: int,
    preferred_bytes: int = DEFAULT_PART_BYTES,
    *,
    min_part_bytes: int = MIN_PART_BYTES,
) -> int:
    """Return a part size that fits S3's limits for an object of ``size_bytes``.

    The preferred size is raised to ``min_part_bytes``, then doubled until the object
    needs at most 10,000 parts, and capped at 5 GiB.

    Raises:
        ValueError: The object is larger than S3's 5 TiB maximum, or negative.
    """
    if size_bytes < 0:
        raise ValueError("size must not be negative")
    if size_bytes > MAX_OBJECT_BYTES:
        raise ValueError(f"{size_bytes} bytes is over S3's {MAX_OBJECT_BYTES}-byte object limit")
    part = max(preferred_bytes, min_part_bytes)
    while -(-size_bytes // part) > MAX_PARTS:
        part *= 2
    return min(part, MAX_PART_BYTES)


def plan_parts(size_bytes: int, part_bytes: int) -> list[Part]:
    """Split ``size_bytes`` into parts of ``part_bytes`` (the last may be shorter).

    A 0-byte object is one empty part: S3 needs at least one.
    """
    if part_bytes <= 0:
        raise ValueError("part size must be positive")
    if size_bytes == 0:
        return [Part(1, 0, 0)]
    return [
        Part(index + 1, offset, min(part_bytes, size_bytes - offset))
        for index, offset in enumerate(range(0, size_bytes, part_bytes))
    ]


def check_part_size(
    size_bytes: int, part_bytes: int, *, min_part_bytes: int = MIN_PART_BYTES
) -> str | None:
    """Return why ``part_bytes`` cannot carry ``size_bytes`` under S3's rules, or None."""
    if part_bytes < min_part_bytes and size_bytes > part_bytes:
        return f"part size {part_bytes} is below the {min_part_bytes}-byte minimum"
    if part_bytes > MAX_PART_BYTES:
        return f"part size {part_bytes} is over the {MAX_PART_BYTES}-byte maximum"
    if -(-size_bytes // part_bytes) > MAX_PARTS:
        return f"{size_bytes} bytes in {part_bytes}-byte parts needs more than {MAX_PARTS} parts"
    return None


def multipart_etag(part_md5_hex: list[str]) -> str:
    """S3's ETag of a multipart object: ``"md5(concatenated part md5s)-N"``."""
    digest = hashlib.md5(usedforsecurity=False)
    for hex_digest in part_md5_hex:
        digest.update(bytes.fromhex(hex_digest))
    return f'"{digest.hexdigest()}-{len(part_md5_hex)}"'
