"""Every exception ctrlupload raises, on one page.

::

    StorageError                  base of everything ctrlupload raises
    ├── StorageConfigError        a setting is missing or has a bad value
    ├── UploadCancelled           the caller's ``cancel`` event was set; nothing is kept
    └── StorageUploadError        an upload-time failure; code STORAGE_UPLOAD_FAILED
        ├── InvalidKeyError       the object key breaks a key rule      (phase "validate")
        ├── UploadTooLargeError   the body exceeds VIDEO_MAX_UPLOAD_BYTES (phase "validate")
        ├── SourceFileError       the file is missing, unreadable or changed (phase "source")
        ├── BackendError          a backend call failed (phase "presign", "complete",
        │                         "delete", "complete-set", "initiate", "presign-parts",
        │                         "list-parts", "complete-multipart" or "abort")
        ├── StorageTransferError  the PUT to the presigned URL failed    (phase "upload")
        ├── RenderUploadError     upload_render: one asset failed; ``.asset`` names it
        ├── IntegrityError        storage's ETag disagrees with what was sent (phase "integrity")
        └── S3Error               s3/minio: one of botocore's calls failed (any phase), or
            │                     a PUT failed in one of the ways below (phase "upload")
            ├── S3CredentialsError          no credentials, or S3 does not accept them
            ├── S3BucketNotFoundError       the bucket does not exist
            ├── S3AccessDeniedError         the credentials may not do this
            ├── S3EndpointUnreachableError  no connection to the endpoint
            └── S3WrongRegionError          the bucket is in another region

``str(StorageUploadError)`` is ``Storage upload failed for '<key>': <reason>``, the text
existing deployments match on. Messages never hold the service token or a presigned
URL's query string; the cause of a transport failure is chained as a
:class:`TransportFailure` whose text has been redacted the same way.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "IntegrityError",
    "InvalidKeyError",
    "PartStopped",
    "RenderUploadError",
    "S3AccessDeniedError",
    "S3BucketNotFoundError",
    "S3CredentialsError",
    "S3EndpointUnreachableError",
    "S3Error",
    "S3WrongRegionError",
    "SourceFileError",
    "StorageConfigError",
    "StorageError",
    "StorageTransferError",
    "StorageUploadError",
    "TransportFailure",
    "UploadCancelled",
    "UploadTooLargeError",
]

STORAGE_UPLOAD_FAILED = "STORAGE_UPLOAD_FAILED"


class StorageError(Exception):
    """Base of every exception raised by ctrlupload."""


class StorageConfigError(StorageError, ValueError):
    """A setting is missing or invalid.

    Attributes:
        variable: The environment variable name at fault, when there is one.
    """

    def __init__(self, message: str, *, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


class StorageUploadError(StorageError):
    """An upload, delete or related storage operation failed.

    Attributes:
        key: The object key the operation was for.
        reason: The human-readable reason, without the key prefix.
        phase: Which step failed: ``validate``, ``source``, ``presign``, ``upload``,
            ``integrity``, ``complete``, ``delete``, ``complete-set``, or for multipart uploads
            ``initiate``, ``presign-parts``, ``list-parts``, ``complete-multipart``
            or ``abort``.
        status_code: The HTTP status that caused the failure, when there was one.
        code: Always ``"STORAGE_UPLOAD_FAILED"``, the render pipeline's error code.
    """

    code = STORAGE_UPLOAD_FAILED
    default_phase = "upload"

    def __init__(
        self,
        key: str,
        reason: str,
        *,
        phase: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(f"Storage upload failed for '{key}': {reason}")
        self.key = key
        self.reason = reason
        self.phase = phase or self.default_phase
        self.status_code = status_code

    def __reduce__(self) -> tuple[object, ...]:
        # Keeps the error picklable, so it survives a ProcessPoolExecutor.
        return (
            _rebuild_upload_error,
            (type(self), self.key, self.reason, self.phase, self.status_code),
        )


def _rebuild_upload_error(
    cls: type[StorageUploadError],
    key: str,
    reason: str,
    phase: str,
    status_code: int | None,
) -> StorageUploadError:
    return cls(key, reason, phase=phase, status_code=status_code)


class InvalidKeyError(StorageUploadError):
    """The object key breaks one of the key rules."""

    default_phase = "validate"


class UploadTooLargeError(StorageUploadError):
    """The body is larger than ``VIDEO_MAX_UPLOAD_BYTES``."""

    default_phase = "validate"


class SourceFileError(StorageUploadError):
    """The source could not be read, or changed while it was being uploaded."""

    default_phase = "source"


class BackendError(StorageUploadError):
    """A call to the backend's internal storage API failed."""

    default_phase = "presign"


class StorageTransferError(StorageUploadError):
    """Sending the body to the presigned URL failed."""

    default_phase = "upload"


class IntegrityError(StorageUploadError):
    """The bytes storage got are not the bytes sent.

    Either storage refused them before storing anything (``400 BadDigest``: they did
    not match the CRC64NVME signed into the URL, or a multipart upload's parts did not
    add up to the whole object's), or, where no checksum was signed, the ETag storage
    answered differs from the MD5 of the bytes sent.
    """

    default_phase = "integrity"


class ObjectExistsError(StorageUploadError):
    """``overwrite=False`` and the key already holds an object: storage refused the
    write (``412 PreconditionFailed``), and the object there is untouched.

    Not raised for an upload whose own first attempt stored the object and whose answer
    was lost: that is told apart through ``complete``, by the stored size and checksum.
    """

    default_phase = "upload"

    @classmethod
    def refused(cls, key: str, what: str = "", *, phase: str = "upload") -> ObjectExistsError:
        """The error for a write to ``key`` that storage refused with 412; ``what``
        (e.g. ``"Multipart complete failed"``) starts the reason when given."""
        reason = f"an object already exists at '{key}' and overwrite=False; it was left as it is"
        return cls(key, f"{what}: {reason}" if what else reason, phase=phase, status_code=412)


class PartStopped(StorageUploadError):
    """A part stopped because another part of the same upload, or presigning the part
    URLs, failed; the upload reports that first failure, never this (internal)."""

    default_phase = "upload"


class UploadCancelled(StorageError):
    """The ``cancel`` event passed to the call was set, and the upload stopped.

    Not a :class:`StorageUploadError`: nothing failed, and code that maps upload
    failures to ``STORAGE_UPLOAD_FAILED`` should not count it. Nothing the call stored
    is kept: a multipart upload is aborted, and ``upload_render`` deletes the assets it
    had stored.

    Attributes:
        key: The object key (for ``upload_render``, the asset that noticed first).
    """

    def __init__(self, key: str, reason: str = "the upload was cancelled") -> None:
        super().__init__(f"Upload of '{key}' cancelled: {reason}")
        self.key = key
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.key, self.reason))


class RenderUploadError(StorageUploadError):
    """One asset of ``upload_render`` failed; the render's other assets were removed.

    The message and attributes are those of the asset's own failure (the seed's text,
    code ``STORAGE_UPLOAD_FAILED``); the original error is chained as the cause, and
    what the cleanup did is in the notes.

    Attributes:
        asset: ``"video"``, ``"subtitles"`` or ``"thumbnail"``.
    """

    def __init__(
        self,
        key: str,
        reason: str,
        *,
        asset: str = "",
        phase: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(key, reason, phase=phase, status_code=status_code)
        self.asset = asset

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_render_error,
            (self.key, self.reason, self.asset, self.phase, self.status_code),
        )


def _rebuild_render_error(
    key: str, reason: str, asset: str, phase: str, status_code: int | None
) -> RenderUploadError:
    return RenderUploadError(key, reason, asset=asset, phase=phase, status_code=status_code)


class S3Error(StorageUploadError):
    """A call to S3 by the ``s3``/``minio`` providers failed.

    Raised for botocore's calls (multipart bookkeeping, delete) and for a presigned PUT
    that S3 refused in one of the ways the subclasses name. The message names the
    operation and bucket and ends with what to check; it never holds credentials or a
    presigned URL's query string.

    Attributes:
        error_code: S3's error code (``"NoSuchBucket"``...), or None.
        bucket_region: The region S3 says the bucket is in, when it said one.
    """

    default_phase = "upload"

    def __init__(
        self,
        key: str,
        reason: str,
        *,
        phase: str | None = None,
        status_code: int | None = None,
        error_code: str | None = None,
        bucket_region: str | None = None,
    ) -> None:
        super().__init__(key, reason, phase=phase, status_code=status_code)
        self.error_code = error_code
        self.bucket_region = bucket_region

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_s3_error,
            (
                type(self),
                self.key,
                self.reason,
                self.phase,
                self.status_code,
                self.error_code,
                self.bucket_region,
            ),
        )


def _rebuild_s3_error(
    cls: type[S3Error],
    key: str,
    reason: str,
    phase: str,
    status_code: int | None,
    error_code: str | None,
    bucket_region: str | None,
) -> S3Error:
    return cls(
        key,
        reason,
        phase=phase,
        status_code=status_code,
        error_code=error_code,
        bucket_region=bucket_region,
    )


class S3CredentialsError(S3Error):
    """No AWS credentials were found, or S3 does not accept them."""


class S3BucketNotFoundError(S3Error):
    """The bucket (``STORAGE_S3_BUCKET``) does not exist."""


class S3AccessDeniedError(S3Error):
    """The credentials are valid but may not do this (IAM or bucket policy)."""


class S3EndpointUnreachableError(S3Error):
    """No connection could be made to the S3 endpoint."""


class S3WrongRegionError(S3Error):
    """The bucket is in another region than requests are signed for."""


class TransportFailure(Exception):
    """A redacted stand-in for a requests or urllib3 exception, chained as the cause.

    The original exception's text can hold a presigned URL with its signature, so it
    is never chained itself; this keeps its type name and its redacted text.

    Attributes:
        original_type: Qualified name of the exception this stands in for.
        root_type: Class name of the innermost cause, e.g. ``NewConnectionError``.
    """

    def __init__(self, message: str, original_type: str, root_type: str = "") -> None:
        super().__init__(message)
        self.original_type = original_type
        self.root_type = root_type

    def __str__(self) -> str:
        return f"{self.original_type}: {self.args[0]}"
