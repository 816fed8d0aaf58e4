"""The public API is what ctrlupload exports; this pins it."""

import ctrlupload


def test_public_api_is_pinned() -> None:
    assert sorted(ctrlupload.__all__) == [
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
    for name in ctrlupload.__all__:
        assert hasattr(ctrlupload, name), name


def test_storage_provider_values_are_the_seeds() -> None:
    assert [p.value for p in ctrlupload.StorageProvider] == [
        "local",
        "s3",
        "minio",
        "backend_presigned",
    ]


def test_both_providers_implement_the_protocol(tmp_path) -> None:  # type: ignore[no-untyped-def]
    local = ctrlupload.LocalStorageProvider(ctrlupload.Settings(storage_local_root=tmp_path))
    remote = ctrlupload.BackendPresignedStorageProvider(
        ctrlupload.Settings(
            BACKEND_BASE_URL="http://127.0.0.1:9", BACKEND_SERVICE_TOKEN="t0ken-value"
        )
    )
    assert isinstance(local, ctrlupload.BaseStorageProvider)
    assert isinstance(remote, ctrlupload.BaseStorageProvider)
    remote.close()
