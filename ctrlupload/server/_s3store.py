"""The ``s3`` object store: presigned PUTs to AWS S3 or any S3-compatible endpoint.

Everything that talks to S3 lives in :mod:`ctrlupload._s3`, shared with the client's
``s3``/``minio`` providers: presigning (SigV4, Content-Type and Content-Length signed),
the multipart calls, the S3-compatible quirks (an empty ETag from complete,
``NoSuchKey`` from ListParts, botocore's checksum headers) and what failures mean. This
module adds only what a reference-backend store is: uploads and downloads go to S3,
never through the backend.

Integrity (issue 11) is S3's own: :attr:`~ctrlupload._s3.S3Bucket.signs_checksums` is
True, a CRC64NVME given to ``presign_put``/``presign_part`` is signed into the URL as the
``x-amz-checksum-crc64nvme`` header (and ``If-None-Match: *`` when asked), and S3
refuses a body that does not match (``BadDigest``) or a key that is taken (412) before
it stores anything. The backend never sees the bytes, so it has nothing to verify.

botocore's retries are off here (:data:`~ctrlupload._s3.DEFAULT_MAX_ATTEMPTS`): the
reference backend answers an :class:`ObjectStoreError` with 503, which the client's
urllib3 ``Retry`` already retries.
"""

from __future__ import annotations

from typing import BinaryIO

from .._s3 import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_POOL_CONNECTIONS,
    DEFAULT_READ_TIMEOUT_S,
    MAX_PRESIGN_EXPIRES_S,
    MAX_PUT_BYTES,
    ObjectStoreError,
    S3Bucket,
)
from ._store import NotServedHere, ObjectInfo, PartGrant, UploadGrant

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_POOL_CONNECTIONS",
    "DEFAULT_READ_TIMEOUT_S",
    "MAX_PRESIGN_EXPIRES_S",
    "MAX_PUT_BYTES",
    "ObjectStoreError",
    "S3ObjectStore",
]


class S3ObjectStore(S3Bucket):
    """An :class:`~ctrlupload.server._store.ObjectStore` backed by an S3 bucket.

    Takes :class:`~ctrlupload._s3.S3Bucket`'s arguments; botocore makes one attempt per
    call unless told otherwise.
    """

    # -- uploads go to S3 itself, never through the backend ----------------------------

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
        """Never: this store's upload URLs point at S3."""
        raise NotServedHere("uploads go to S3")

    def receive(self, grant: UploadGrant, body: BinaryIO) -> ObjectInfo:
        """Never: this store's upload URLs point at S3."""
        raise NotServedHere("uploads go to S3")

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
        """Never: this store's part URLs point at S3."""
        raise NotServedHere("part uploads go to S3")

    def receive_part(self, grant: PartGrant, body: BinaryIO) -> ObjectInfo:
        """Never: this store's part URLs point at S3."""
        raise NotServedHere("part uploads go to S3")

    def open(self, key: str) -> tuple[BinaryIO, ObjectInfo] | None:
        """None: downloads are served by S3 or the CDN, not the backend."""
        return None
