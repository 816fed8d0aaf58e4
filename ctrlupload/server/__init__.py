"""The reference backend: an executable specification of the internal storage API.

It implements the seed's presign-put / complete / delete endpoints (``openapi.yaml``
in this package) over two object stores: ``local`` (files on disk, signed upload URLs
served by the backend itself) and ``s3`` (boto3 presigning for AWS or any S3-compatible
endpoint; ``pip install 'ctrlupload[s3]'``). Completions are recorded in SQLite.

Client modules never import this package.

    from ctrlupload.server import ReferenceServer, ServerConfig

    with ReferenceServer(ServerConfig(port=0, data_dir=tmp)) as server:
        print(server.base_url, server.token)
"""

from ._app import ApiPaths, ReferenceBackend, openapi_document
from ._db import AssetDB, AssetRow
from ._local import LocalObjectStore
from ._runtime import ReferenceServer, ServerConfig
from ._store import ObjectInfo, ObjectStore, PresignedPut
from ._wsgi import WSGIServer

__all__ = [
    "ApiPaths",
    "AssetDB",
    "AssetRow",
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "PresignedPut",
    "ReferenceBackend",
    "ReferenceServer",
    "ServerConfig",
    "WSGIServer",
    "openapi_document",
]
