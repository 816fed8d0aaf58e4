"""Storage providers: ``local`` and ``backend_presigned``, behind one interface.

* ``_base``: the :class:`BaseStorageProvider` interface and what every provider shares
  (argument checks, the context manager);
* ``_local``: :class:`LocalStorageProvider`, files under ``STORAGE_LOCAL_ROOT``;
* ``_backend``: :class:`BackendPresignedStorageProvider`, the upload engine
  (:mod:`ctrlupload.engine`) over :class:`BackendSigner`, which speaks the backend's
  internal API.

A provider that holds credentials itself plugs another signer into the same engine.
"""

from __future__ import annotations

from .._errors import StorageConfigError
from .._settings import Settings, StorageProvider
from .._version import __version__
from ..engine._engine import StorageResult
from ._backend import BackendPresignedStorageProvider, BackendSigner
from ._base import BaseStorageProvider, ObjectData
from ._local import LocalStorageProvider

__all__ = [
    "BackendPresignedStorageProvider",
    "BackendSigner",
    "BaseStorageProvider",
    "LocalStorageProvider",
    "ObjectData",
    "StorageResult",
    "get_storage_provider",
]


def get_storage_provider(settings: Settings | None = None) -> BaseStorageProvider:
    """Build the provider that ``STORAGE_PROVIDER`` names.

    Args:
        settings: Defaults to :meth:`Settings.from_env` (the environment and ``.env``).

    Returns:
        A :class:`LocalStorageProvider` or :class:`BackendPresignedStorageProvider`.

    Raises:
        StorageConfigError: The settings are invalid, or the provider (``s3``,
            ``minio``) is not available in this version.
    """
    settings = settings or Settings.from_env()
    provider = settings.storage_provider
    if provider is StorageProvider.LOCAL:
        return LocalStorageProvider(settings)
    if provider is StorageProvider.BACKEND_PRESIGNED:
        return BackendPresignedStorageProvider(settings)
    raise StorageConfigError(
        f"STORAGE_PROVIDER={provider.value} is not implemented in ctrlupload "
        f"{__version__}; use 'backend_presigned' (the backend holds the S3 credentials) "
        "or 'local'",
        variable="STORAGE_PROVIDER",
    )
