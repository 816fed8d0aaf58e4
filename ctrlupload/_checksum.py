"""CRC64NVME, the checksum storage verifies before it commits a body.

S3 checks an ``x-amz-checksum-crc64nvme`` header on arrival and answers ``400
BadDigest`` with nothing stored when the body does not match; a multipart upload
declared with ``ChecksumType=FULL_OBJECT`` checks the whole object's value at complete.
The value is the base64 of the CRC's eight bytes, big-endian, as S3 spells it.

The CRC comes from ``awscrt`` (what botocore itself uses, about 9 GiB/s on one core
against 0.7 for MD5), installed by the ``ctrlupload[checksum]`` extra. Without it,
:func:`available` is False and uploads fall back to the MD5-vs-ETag check. Nothing
here is hand-written CRC code: per-part values are joined into the whole object's with
awscrt's ``combine_crc64nvme``, so the file is read once.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Iterable
from typing import Final

__all__ = [
    "ALGORITHM",
    "HEADER",
    "INSTALL_HINT",
    "available",
    "combine",
    "crc64nvme",
    "decode",
    "encode",
]

#: The algorithm's name in the contract and in S3's API.
ALGORITHM: Final = "CRC64NVME"
#: The header S3 verifies (lower case; HTTP header names are case-insensitive).
HEADER: Final = "x-amz-checksum-crc64nvme"
#: What to install for it.
INSTALL_HINT: Final = "pip install 'ctrlupload[checksum]'"
#: Bytes read at a time by :func:`crc_of_range`.
READ_BLOCK_BYTES: Final = 8 * 1024 * 1024

_crc: Callable[[bytes, int], int] | None
_combine: Callable[[int, int, int], int] | None
try:
    from awscrt import checksums as _awscrt_checksums

    _crc = _awscrt_checksums.crc64nvme
    _combine = getattr(_awscrt_checksums, "combine_crc64nvme", None)
except ImportError:  # the extra is not installed
    _crc = None
    _combine = None


def available() -> bool:
    """Whether CRC64NVME can be computed here (awscrt with ``combine_crc64nvme``)."""
    return _crc is not None and _combine is not None


def crc64nvme(data: bytes | bytearray | memoryview, previous: int = 0) -> int:
    """The CRC64NVME of ``data``, continuing ``previous`` (0 to start).

    Raises:
        RuntimeError: awscrt is not installed (check :func:`available` first).
    """
    if _crc is None:
        raise RuntimeError(f"CRC64NVME needs awscrt: {INSTALL_HINT}")
    return _crc(data, previous)  # type: ignore[arg-type]  # awscrt takes any buffer


def combine(first: int, second: int, second_length: int) -> int:
    """The CRC of two pieces end to end, from each one's CRC and the second's length.

    Raises:
        RuntimeError: awscrt (with ``combine_crc64nvme``) is not installed.
    """
    if _combine is None:
        raise RuntimeError(f"CRC64NVME needs awscrt 0.28 or later: {INSTALL_HINT}")
    return _combine(first, second, second_length)


def combine_all(pieces: Iterable[tuple[int, int]]) -> int:
    """The CRC of pieces end to end, from ``(crc, length)`` of each, in order."""
    total = 0
    for crc, length in pieces:
        total = combine(total, crc, length)
    return total


def crc_of_range(
    read_into: Callable[[int, memoryview], int],
    offset: int,
    length: int,
    *,
    buffer: bytearray | None = None,
    before_block: Callable[[], None] | None = None,
) -> int | None:
    """The CRC64NVME of ``length`` bytes at ``offset``; None if the source ends early.

    Args:
        read_into: ``(offset, view) -> bytes read`` (``os.preadv`` style), into one
            reused buffer: no allocation per block.
        buffer: The buffer to read into; one of :data:`READ_BLOCK_BYTES` is made if
            None.
        before_block: Called before each block (a cancel check may raise there).
    """
    view = memoryview(buffer if buffer is not None else bytearray(min(READ_BLOCK_BYTES, length)))
    value = 0
    end = offset + length
    while offset < end:
        if before_block is not None:
            before_block()
        got = read_into(offset, view[: min(len(view), end - offset)])
        if got <= 0:
            return None
        value = crc64nvme(view[:got], value)
        offset += got
    return value


def encode(value: int) -> str:
    """S3's spelling: base64 of the eight big-endian bytes, e.g. ``AAAAAAAAAAA=``."""
    return base64.b64encode(value.to_bytes(8, "big")).decode("ascii")


def decode(text: str) -> int | None:
    """The CRC a header value spells, or None when it is not eight base64 bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return int.from_bytes(raw, "big") if len(raw) == 8 else None
