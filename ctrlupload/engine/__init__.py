"""The upload engine and the signer seam it runs on.

The engine (:class:`UploadEngine`) moves bytes for any signer: single PUT, multipart,
resume, progress and integrity checks. A :class:`Signer` is everything the engine needs
from whoever holds the credentials: presign a PUT, complete, delete, and the multipart
calls (initiate, presign parts, list parts, complete, abort).

* ``_signer``: the :class:`Signer` Protocol and the values it answers with;
* ``_engine``: :class:`UploadEngine` and :class:`StorageResult`;
* ``_streams``: file windows, MD5 while sending, monotonic progress;
* ``_multipart``: checkpoints, part URLs, the parallel part runner, failure cleanups.

Decisions that need no socket live in :mod:`ctrlupload.protocol`; the one module that
sends is :mod:`ctrlupload._transport`.
"""

from ._engine import StagedUpload, StorageResult, UploadEngine
from ._signer import (
    CompletedUpload,
    MultipartUpload,
    SetObject,
    SetSigner,
    SignedPut,
    Signer,
    StoredPart,
)

__all__ = [
    "CompletedUpload",
    "MultipartUpload",
    "SetObject",
    "SetSigner",
    "SignedPut",
    "Signer",
    "StagedUpload",
    "StorageResult",
    "StoredPart",
    "UploadEngine",
]
