"""Object key rules, the render-asset key layout and content types.

Every key is checked here before any byte leaves the machine, by every provider.
"""

from __future__ import annotations

import posixpath
from typing import Final, Literal

from ._errors import InvalidKeyError

__all__ = [
    "ASSET_FILENAMES",
    "MAX_KEY_BYTES",
    "RenderAsset",
    "guess_content_type",
    "render_asset_key",
    "validate_key",
]

MAX_KEY_BYTES: Final = 1024

RenderAsset = Literal["video", "subtitles", "thumbnail"]

#: The seed's file name for each render asset (Phase 34 layout).
ASSET_FILENAMES: Final[dict[str, str]] = {
    "video": "video.mp4",
    "subtitles": "subtitles.srt",
    "thumbnail": "thumb.jpg",
}

_CONTENT_TYPES: Final[dict[str, str]] = {
    ".mp4": "video/mp4",
    ".srt": "application/x-subrip",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
}
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"


def validate_key(key: str) -> str:
    """Check an object key against the key rules and return it unchanged.

    The rules: not empty, at most 1024 bytes in UTF-8, no leading ``/``, no ``.`` or
    ``..`` segment, no empty segment, no backslash and no control character.

    Args:
        key: The object key, for example ``videos/V-1/S-1/J-1/video.mp4``.

    Returns:
        The same key.

    Raises:
        InvalidKeyError: The key breaks a rule; the message says which.
    """
    if not isinstance(key, str):
        raise InvalidKeyError(repr(key), f"key must be a str, not {type(key).__name__}")
    problem = _key_problem(key)
    if problem is not None:
        shown = key if len(key) <= 200 else key[:200] + "..."
        raise InvalidKeyError(shown.encode("unicode_escape").decode("ascii"), problem)
    return key


def _key_problem(key: str) -> str | None:
    if not key:
        return "key must not be empty"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "key must be valid UTF-8 (it holds a lone surrogate)"
    if size > MAX_KEY_BYTES:
        return f"key is {size} bytes in UTF-8, over the limit of {MAX_KEY_BYTES}"
    if key.startswith("/"):
        return "key must not start with '/'"
    if "\\" in key:
        return "key must not contain a backslash"
    if any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in key):
        return "key must not contain control characters"
    for segment in key.split("/"):
        if segment in (".", ".."):
            return f"key must not contain a '{segment}' segment"
        if segment == "":
            return "key must not contain an empty segment ('//' or a trailing '/')"
    return None


def _id_segment(name: str, value: str) -> str:
    if not isinstance(value, str):
        raise InvalidKeyError(
            f"videos/.../{name}", f"{name} must be a str, not {type(value).__name__}"
        )
    if not value or "/" in value:
        raise InvalidKeyError(
            f"videos/.../{name}", f"{name} must be non-empty and must not contain '/'"
        )
    if value in (".", ".."):
        raise InvalidKeyError(f"videos/.../{name}", f"{name} must not be {value!r}")
    return value


def render_asset_key(video_id: str, script_id: str, job_id: str, asset: RenderAsset) -> str:
    """Build the seed's key for a render asset.

    The layout is ``videos/{video_id}/{script_id}/{job_id}/{file}`` where file is
    ``video.mp4``, ``subtitles.srt`` or ``thumb.jpg``.

    Args:
        video_id: The video's id.
        script_id: The script's id.
        job_id: The render job's id.
        asset: ``"video"``, ``"subtitles"`` or ``"thumbnail"``.

    Returns:
        The validated object key.

    Raises:
        InvalidKeyError: An id is not a str, is empty, ``.`` or ``..``, or holds ``/``,
            or the key breaks a key rule.
    """
    try:
        filename = ASSET_FILENAMES[asset]
    except KeyError:
        raise InvalidKeyError(
            f"videos/{video_id}/{script_id}/{job_id}/?",
            f"unknown asset {asset!r}; expected one of {sorted(ASSET_FILENAMES)}",
        ) from None
    segments = [
        _id_segment("video_id", video_id),
        _id_segment("script_id", script_id),
        _id_segment("job_id", job_id),
    ]
    return validate_key(posixpath.join("videos", *segments, filename))


def guess_content_type(key: str) -> str:
    """Return the content type for a key from its extension.

    Args:
        key: An object key or file name.

    Returns:
        ``video/mp4`` for .mp4, ``application/x-subrip`` for .srt, ``image/jpeg`` for
        .jpg and .jpeg, and ``application/octet-stream`` for anything else.
    """
    _, ext = posixpath.splitext(key.lower())
    return _CONTENT_TYPES.get(ext, DEFAULT_CONTENT_TYPE)
