"""The signer seam: everything the upload engine needs from whoever holds the credentials.

The engine moves bytes; a signer decides where they may go. ``BackendSigner`` asks a
backend over HTTP (the seed's contract and its multipart extension); a signer that
holds S3 credentials itself can presign in-process. Either plugs into the same engine.

A signer is thread-safe: the engine calls it from part threads at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..protocol._objects import StoredPart

__all__ = [
    "CompletedUpload",
    "MultipartUpload",
    "SetObject",
    "SetSigner",
    "SignedPut",
    "Signer",
    "StoredPart",
]


@dataclass(frozen=True)
class SignedPut:
    """One presigned PUT. The URL and headers are credentials: neither is in the repr.

    Attributes:
        url: Where to PUT.
        headers: Headers to send exactly as given (they may be signed).
        expires_at: Epoch seconds until which the URL works, when the signer knows it.
        public_url: Where the object will be served (whole-object PUTs).
    """

    url: str = field(repr=False)
    headers: Mapping[str, str] = field(repr=False, default_factory=dict)
    expires_at: float | None = None
    public_url: str = ""


@dataclass(frozen=True)
class MultipartUpload:
    """A started multipart upload: its id and the part size its parts are signed for.

    Attributes:
        checksum: The signer took on a full-object CRC64NVME: it signs each part's
            checksum and has storage check the whole object's at complete.
        if_none_match: The signer will have complete refuse to replace an object
            already at the key.
    """

    upload_id: str
    part_size: int
    checksum: bool = False
    if_none_match: bool = False


@dataclass(frozen=True)
class CompletedUpload:
    """What recording an upload answered: the public URL and final ETag, and the
    whole object's CRC64NVME when storage checked it."""

    public_url: str
    etag: str
    checksum: str | None = None


@dataclass(frozen=True)
class SetObject:
    """One object of a set-level complete: a stored single PUT (``etag`` and
    ``public_url``) or a multipart upload to assemble (``upload_id`` and ``parts``)."""

    key: str
    size_bytes: int
    content_type: str
    etag: str | None = None
    public_url: str | None = None
    upload_id: str | None = None
    parts: Sequence[tuple[int, str]] = ()
    checksum: str | None = None
    if_none_match: bool = False


@runtime_checkable
class Signer(Protocol):
    """Presigns uploads and keeps the books; the engine does everything else.

    Every method raises a :class:`~ctrlupload.StorageUploadError` subclass (usually
    :class:`~ctrlupload.BackendError`) with the seed's message shape, and retries
    nothing that its transport already retries. A conditional write that found an
    object raises :class:`~ctrlupload.ObjectExistsError`; parts that do not add up to
    the whole object's checksum, :class:`~ctrlupload.IntegrityError`.

    ``checksum`` values are CRC64NVMEs as S3 spells them (base64 of the eight
    big-endian bytes). A signer that cannot sign one, or the ``If-None-Match: *``
    condition, ignores the argument: the engine sees it from what comes back (no
    such header in :attr:`SignedPut.headers`, no flag in :class:`MultipartUpload`).
    """

    def presign_put(
        self,
        key: str,
        content_type: str,
        size_bytes: int,
        *,
        checksum: str | None = None,
        if_none_match: bool = False,
    ) -> SignedPut:
        """Sign one PUT of the whole object, with its checksum and condition if given."""
        ...

    def complete(
        self,
        key: str,
        etag: str | None,
        size_bytes: int,
        content_type: str,
        public_url: str,
        *,
        checksum: str | None = None,
        confirm: bool = False,
    ) -> str | None:
        """Record the stored object (an idempotent upsert).

        ``etag`` is None only with a ``checksum``: the object is then recognised by
        its size and checksum. ``confirm`` says the PUT's answer was lost (a retried
        conditional PUT was refused): a signer that records nothing itself must then
        check that storage holds this object before it says yes.

        Returns:
            The ETag recorded when the signer says, else None.

        Raises:
            BackendError: With ``status_code`` 409 when storage holds another object.
        """
        ...

    def delete(self, key: str) -> None:
        """Delete the object and its record; a missing one is not an error."""
        ...

    def initiate(
        self,
        key: str,
        content_type: str,
        size_bytes: int,
        part_size: int,
        *,
        checksum: bool = False,
        if_none_match: bool = False,
    ) -> MultipartUpload | None:
        """Start a multipart upload; None when this signer offers none (use one PUT).

        ``part_size`` is a preference; the answer's part size is the one to use. A
        lost answer must not leave a second upload behind when the call is retried.
        """
        ...

    def presign_parts(
        self,
        key: str,
        upload_id: str,
        part_numbers: Sequence[int],
        *,
        checksums: Sequence[str] | None = None,
    ) -> Mapping[int, SignedPut]:
        """Sign a PUT for each of these parts (every number gets one, or it raises),
        each with its checksum (``checksums`` in the order of ``part_numbers``)."""
        ...

    def list_parts(self, key: str, upload_id: str) -> list[StoredPart] | None:
        """Every part storage holds for the upload, all pages; None if it is gone."""
        ...

    def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[tuple[int, str]],
        size_bytes: int,
        content_type: str,
        *,
        checksum: str | None = None,
        if_none_match: bool = False,
    ) -> CompletedUpload:
        """Assemble ``(part_number, etag)`` pairs, ascending, and record the object;
        storage checks the whole object's ``checksum`` and the condition if given."""
        ...

    def abort(self, key: str, upload_id: str) -> None:
        """Drop the upload and its parts; an unknown upload is not an error."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class SetSigner(Protocol):
    """What a :class:`Signer` may add: recording several objects in one call.

    Optional, so that signers written before it keep working; the engine records a
    set one object at a time through a signer without it.
    """

    def complete_set(self, objects: Sequence[SetObject]) -> list[CompletedUpload] | None:
        """Record every object, or none of them (assembling the multipart ones first).

        Returns:
            What each object was recorded as, in order; None when this signer offers no
            set-level complete (the engine then records them one by one).
        """
        ...
