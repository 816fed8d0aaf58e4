"""The reference backend: an executable specification of the internal storage API.

It implements the seed's presign-put / complete / delete endpoints and the multipart
extension (initiate / presign-parts / list-parts / complete / abort; ``openapi.yaml``
in this package) over two object stores: ``local`` (files on disk, signed upload URLs
served by the backend itself) and ``s3`` (boto3 presigning for AWS or any S3-compatible
endpoint; ``pip install 'ctrlupload[s3]'``). Completions are recorded in SQLite.

Client modules never import this package.

    from ctrlupload.server import ReferenceServer, ServerConfig

    with ReferenceServer(ServerConfig(port=0, data_dir=tmp)) as server:
        print(server.base_url, server.token)
"""

from typing import TYPE_CHECKING

from ._app import ApiPaths, ReferenceBackend, openapi_document
from ._db import AssetDB, AssetRow, UploadRow
from ._limits import ServerLimits
from ._local import LocalObjectStore
from ._runtime import ReferenceServer, ServerConfig
from ._store import ObjectInfo, ObjectStore, PartsPage, PresignedPut, StoredPart

if TYPE_CHECKING:
    from ._http import WSGIServer

__all__ = [
    "ApiPaths",
    "AssetDB",
    "AssetRow",
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "PartsPage",
    "PresignedPut",
    "ReferenceBackend",
    "ReferenceServer",
    "ServerConfig",
    "ServerLimits",
    "StoredPart",
    "UploadRow",
    "WSGIServer",
    "openapi_document",
]


def __getattr__(name: str) -> object:
    # The HTTP server needs cheroot (ctrlupload[server]); the rest of this package not.
    if name == "WSGIServer":
        from ._http import WSGIServer

        return WSGIServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
