"""End to end: client -> reference backend (s3 store) -> moto's S3 server, all on loopback.

moto checks neither signatures, expiry nor Content-Type (see tests/support/moto_server.py),
so the rejection tests live in test_server_local.py; here the real presign -> PUT ->
HEAD-checked complete path runs against an S3 API.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ctrlupload import BackendError, BackendPresignedStorageProvider, Settings
from ctrlupload.server import ReferenceServer, ServerConfig
from tests.support.moto_server import (
    FAKE_ACCESS_KEY_ID,
    FAKE_REGION,
    FAKE_SECRET_ACCESS_KEY,
    MotoS3Server,
    s3_reference_server,
)

KEY = "videos/V-001/S-001/JOB-123/video.mp4"


@pytest.fixture
def s3_reference(
    moto_s3: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ReferenceServer, BackendPresignedStorageProvider, str]]:
    with s3_reference_server(moto_s3, tmp_path, monkeypatch) as (server, bucket):
        settings = Settings.from_mapping(
            {
                "STORAGE_PROVIDER": "backend_presigned",
                "BACKEND_BASE_URL": server.base_url,
                "BACKEND_SERVICE_TOKEN": server.token,
                "STORAGE_RETRY_BACKOFF_S": "0.01",
            }
        )
        with BackendPresignedStorageProvider(settings) as client:
            yield server, client, bucket


def test_upload_through_s3_store_lands_in_the_bucket_and_is_recorded(
    s3_reference: tuple[ReferenceServer, BackendPresignedStorageProvider, str],
    moto_s3: MotoS3Server,
    tmp_path: Path,
) -> None:
    server, client, bucket = s3_reference
    data = os.urandom(6 * 1024 * 1024 + 3)
    source = tmp_path / "video.mp4"
    source.write_bytes(data)

    result = client.put_file(source, KEY)

    etag = f'"{hashlib.md5(data).hexdigest()}"'
    assert result.etag == etag
    stored = moto_s3.client().get_object(Bucket=bucket, Key=KEY)
    assert stored["Body"].read() == data
    assert stored["ContentType"] == "video/mp4"
    assert requests.get(result.url, timeout=10).content == data
    row = server.db.get(KEY)
    assert row is not None
    assert (row.etag, row.size_bytes) == (etag, len(data))


def test_zero_byte_upload_through_s3_store(
    s3_reference: tuple[ReferenceServer, BackendPresignedStorageProvider, str],
) -> None:
    server, client, _ = s3_reference
    client.put_object(b"", "videos/V/S/J/subtitles.srt")
    assert server.db.get("videos/V/S/J/subtitles.srt") is not None


def test_complete_checks_the_object_with_head(
    s3_reference: tuple[ReferenceServer, BackendPresignedStorageProvider, str],
) -> None:
    server, _, _ = s3_reference
    answer = requests.post(
        f"{server.base_url}/internal/storage/complete",
        json={
            "object_key": "videos/never/uploaded.mp4",
            "etag": '"' + "0" * 32 + '"',
            "size_bytes": 1,
            "content_type": "video/mp4",
            "public_url": "http://cdn/x",
        },
        headers={"Authorization": f"Bearer {server.token}"},
        timeout=10,
    )
    assert answer.status_code == 409
    assert answer.json()["error"] == "object_mismatch"


def test_delete_removes_the_object_and_the_row(
    s3_reference: tuple[ReferenceServer, BackendPresignedStorageProvider, str],
    moto_s3: MotoS3Server,
) -> None:
    server, client, bucket = s3_reference
    client.put_object(b"bytes", KEY)
    client.delete(KEY)
    listing = moto_s3.client().list_objects_v2(Bucket=bucket)
    assert listing.get("KeyCount", 0) == 0
    assert server.db.get(KEY) is None


def test_missing_bucket_surfaces_as_a_retried_backend_error(
    moto_s3: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_ACCESS_KEY)
    config = ServerConfig(
        port=0,
        data_dir=tmp_path,
        store="s3",
        s3_bucket="no-such-bucket-ctrlupload",
        s3_endpoint_url=moto_s3.endpoint_url,
        s3_region=FAKE_REGION,
    )
    with ReferenceServer(config) as server:
        settings = Settings.from_mapping(
            {
                "BACKEND_BASE_URL": server.base_url,
                "BACKEND_SERVICE_TOKEN": server.token,
                "STORAGE_RETRY_ATTEMPTS": "2",
                "STORAGE_RETRY_BACKOFF_MAX_S": "0.05",
            }
        )
        with (
            BackendPresignedStorageProvider(settings) as client,
            pytest.raises(BackendError) as caught,
        ):
            client.delete(KEY)
    assert caught.value.status_code == 503
    assert "Delete request failed: HTTP 503" in str(caught.value)
    assert "NoSuchBucket" in str(caught.value)
    assert FAKE_SECRET_ACCESS_KEY not in str(caught.value)
