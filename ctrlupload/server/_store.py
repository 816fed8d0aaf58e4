"""Object stores behind the reference backend: one interface, two implementations.

``LocalObjectStore`` (the embedded default) keeps objects on disk and signs upload URLs
for the server's own PUT endpoint. ``S3ObjectStore`` (``ctrlupload[s3]``) presigns real
S3 PUTs with boto3 for AWS or any S3-compatible endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PresignedPut:
    """Where and how to PUT one object."""

    upload_url: str
    headers: dict[str, str]
    expires_sec: int


@dataclass(frozen=True)
class ObjectInfo:
    """What the store holds for a key: its size and ETag (quotes included)."""

    size_bytes: int
    etag: str


class ObjectStore(Protocol):
    """What the reference backend needs from a store. Implementations are thread-safe."""

    def presign_put(
        self, key: str, content_type: str, content_length: int, expires_sec: int
    ) -> PresignedPut:
        """Return a URL that accepts exactly one PUT of this key, type and length."""
        ...

    def public_url(self, key: str) -> str:
        """Where the object can be downloaded once stored."""
        ...

    def head(self, key: str) -> ObjectInfo | None:
        """Size and ETag of the stored object, or None when there is none."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error."""
        ...
