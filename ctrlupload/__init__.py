"""ctrlupload: stream render output to S3 through backend-issued presigned URLs.

The renderer holds no cloud credentials. A backend presigns each upload, the renderer
streams the bytes straight to storage, then tells the backend it is done::

    from ctrlupload import get_storage_provider, render_asset_key

    with get_storage_provider() as storage:
        key = render_asset_key("V-001", "S-001", "JOB-123", "video")
        result = storage.put_file("out/video.mp4", key)
        print(result.url)

A render's files go up together, all or nothing, with :func:`upload_render`; async
code uses :mod:`ctrlupload.aio`, and :mod:`ctrlupload.progress` draws progress bars.

Everything is synchronous and thread-safe: share one provider across a thread pool.
"""

from ._errors import (
    BackendError,
    IntegrityError,
    InvalidKeyError,
    ObjectExistsError,
    RenderUploadError,
    S3AccessDeniedError,
    S3BucketNotFoundError,
    S3CredentialsError,
    S3EndpointUnreachableError,
    S3Error,
    S3WrongRegionError,
    SourceFileError,
    StorageConfigError,
    StorageError,
    StorageTransferError,
    StorageUploadError,
    TransportFailure,
    UploadCancelled,
    UploadTooLargeError,
)
from ._keys import guess_content_type, render_asset_key, validate_key
from ._render import RenderUpload, upload_render
from ._settings import Settings, StorageProvider
from ._version import __version__
from .engine import StorageResult
from .engine._streams import ProgressCallback
from .providers import (
    BackendPresignedStorageProvider,
    BaseStorageProvider,
    LocalStorageProvider,
    S3StorageProvider,
    get_storage_provider,
)

__all__ = [
    "BackendError",
    "BackendPresignedStorageProvider",
    "BaseStorageProvider",
    "IntegrityError",
    "InvalidKeyError",
    "LocalStorageProvider",
    "ObjectExistsError",
    "ProgressCallback",
    "RenderUpload",
    "RenderUploadError",
    "S3AccessDeniedError",
    "S3BucketNotFoundError",
    "S3CredentialsError",
    "S3EndpointUnreachableError",
    "S3Error",
    "S3StorageProvider",
    "S3WrongRegionError",
    "Settings",
    "SourceFileError",
    "StorageConfigError",
    "StorageError",
    "StorageProvider",
    "StorageResult",
    "StorageTransferError",
    "StorageUploadError",
    "TransportFailure",
    "UploadCancelled",
    "UploadTooLargeError",
    "__version__",
    "get_storage_provider",
    "guess_content_type",
    "render_asset_key",
    "upload_render",
    "validate_key",
]
