"""Storage providers: ``local``, ``s3``/``minio`` and ``backend_presigned``, one interface.

* ``_base``: the :class:`BaseStorageProvider` interface and what every provider shares
  (argument checks, the context manager);
* ``_local``: :class:`LocalStorageProvider`, files under ``STORAGE_LOCAL_ROOT``;
* ``_backend``: :class:`BackendPresignedStorageProvider`, the upload engine
  (:mod:`ctrlupload.engine`) over :class:`BackendSigner`, which speaks the backend's
  internal API;
* ``_s3``: :class:`S3StorageProvider` (``s3`` and ``minio``), the same engine over
  :class:`S3Signer`, which holds S3 credentials and presigns in-process.
"""

from __future__ import annotations

from .._settings import Settings, StorageProvider
from ..engine._engine import StorageResult
from ._backend import BackendPresignedStorageProvider, BackendSigner
from ._base import BaseStorageProvider, ObjectData
from ._local import LocalStorageProvider
from ._s3 import S3Signer, S3StorageProvider

__all__ = [
    "BackendPresignedStorageProvider",
    "BackendSigner",
    "BaseStorageProvider",
    "LocalStorageProvider",
    "ObjectData",
    "S3Signer",
    "S3StorageProvider",
    "StorageResult",
    "get_storage_provider",
]


def get_storage_provider(settings: Settings | None = None) -> BaseStorageProvider:
    """Build the provider that ``STORAGE_PROVIDER`` names.

    Args:
        settings: Defaults to :meth:`Settings.from_env` (the environment and ``.env``).

    Returns:
        A :class:`LocalStorageProvider`, :class:`S3StorageProvider` (``s3``, ``minio``)
        or :class:`BackendPresignedStorageProvider`.

    Raises:
        StorageConfigError: The settings are invalid or incomplete for the provider,
            or ``s3``/``minio`` is chosen and boto3 (``ctrlupload[s3]``) is missing.
    """
    settings = settings or Settings.from_env()
    provider = settings.storage_provider
    if provider is StorageProvider.LOCAL:
        return LocalStorageProvider(settings)
    if provider is StorageProvider.BACKEND_PRESIGNED:
        return BackendPresignedStorageProvider(settings)
    return S3StorageProvider(settings)
