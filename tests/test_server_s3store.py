"""The s3 object store against moto's S3 server over loopback sockets.

What moto 5.2 does NOT check on a presigned PUT, measured against ``MotoS3Server`` (real
S3 and MinIO reject each one): the signature (a tampered ``X-Amz-Signature`` is stored),
the key (a URL for one key stores another), expiry (accepted after ``X-Amz-Expires``),
the signed ``Content-Type`` (another type is stored as sent), the signed
``Content-Length`` (a shorter body is stored) and framing (``Transfer-Encoding: chunked``
is decoded and stored where S3 answers 501). So these tests pin what the store asks S3
for (the signed headers in the URL) and the happy path; the rejection tests belong to
the local store. moto does enforce read access: anonymous GETs need a bucket policy.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests

from ctrlupload import StorageConfigError, StorageError
from ctrlupload.server._s3store import MAX_PRESIGN_EXPIRES_S, ObjectStoreError, S3ObjectStore
from ctrlupload.server._store import ObjectInfo
from tests.support.moto_server import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, MotoS3Server

TIMEOUT_S = 10
_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)

StoreFactory = Callable[..., S3ObjectStore]


@pytest.fixture
def bucket(moto_s3: MotoS3Server) -> str:
    return moto_s3.make_bucket()


@pytest.fixture
def make_store(moto_s3: MotoS3Server, bucket: str) -> StoreFactory:
    """A store on this test's bucket, given moto's client (fake credentials, no env)."""

    def make(**kwargs: Any) -> S3ObjectStore:
        kwargs.setdefault("client", moto_s3.client())
        return S3ObjectStore(kwargs.pop("bucket", bucket), **kwargs)

    return make


@pytest.fixture
def isolated_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """boto3's credential chain sees nothing from this machine: no env, files or IMDS."""
    for name in _CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def put(url: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.put(url, data=body, headers=headers, timeout=TIMEOUT_S)


def query_of(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_presigned_put_then_head_public_url_and_delete_round_trip(
    make_store: StoreFactory, moto_s3: MotoS3Server, bucket: str
) -> None:
    store = make_store()
    key = "videos/V-001/S-001/JOB-123/video.mp4"
    body = os.urandom(200_000)

    presigned = store.presign_put(key, "video/mp4", len(body), 600)
    response = put(presigned.upload_url, body, presigned.headers)

    md5 = hashlib.md5(body).hexdigest()
    assert response.status_code == 200
    assert response.headers["ETag"] == f'"{md5}"'
    assert store.head(key) == ObjectInfo(size_bytes=len(body), etag=f'"{md5}"')
    assert store.public_url(key) == f"{moto_s3.endpoint_url}/{bucket}/{key}"
    assert requests.get(store.public_url(key), timeout=TIMEOUT_S).content == body

    store.delete(key)
    assert store.head(key) is None
    store.delete(key)  # a missing object is not an error


def test_presign_binds_content_type_length_and_expiry_into_the_signature(
    make_store: StoreFactory, moto_s3: MotoS3Server, bucket: str
) -> None:
    presigned = make_store().presign_put("renders/a.srt", "application/x-subrip", 1234, 900)

    query = query_of(presigned.upload_url)
    assert presigned.headers == {"Content-Type": "application/x-subrip", "Content-Length": "1234"}
    assert query["X-Amz-SignedHeaders"] == "content-length;content-type;host"
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Expires"] == "900"
    assert query["X-Amz-Credential"].startswith(f"{FAKE_ACCESS_KEY_ID}/")
    assert presigned.expires_sec == 900
    assert presigned.upload_url.startswith(f"{moto_s3.endpoint_url}/{bucket}/renders/a.srt?")


def test_key_with_spaces_and_unicode_round_trips_percent_encoded(
    make_store: StoreFactory, moto_s3: MotoS3Server, bucket: str
) -> None:
    store = make_store()
    key = "renders/my clip/동영상 ü+&=.jpg"
    body = b"\xff\xd8 not really a jpeg"

    presigned = store.presign_put(key, "image/jpeg", len(body), 60)
    assert urlsplit(presigned.upload_url).path == f"/{bucket}/{quote(key, safe='/')}"
    assert put(presigned.upload_url, body, presigned.headers).status_code == 200

    info = store.head(key)
    assert info is not None and info.size_bytes == len(body)
    encoded = "renders/my%20clip/%EB%8F%99%EC%98%81%EC%83%81%20%C3%BC%2B%26%3D.jpg"
    assert store.public_url(key) == f"{moto_s3.endpoint_url}/{bucket}/{encoded}"
    assert requests.get(store.public_url(key), timeout=TIMEOUT_S).content == body


def test_public_url_uses_public_base_url_when_set(make_store: StoreFactory) -> None:
    store = make_store(public_base_url="https://cdn.example.test/assets/")

    assert store.public_url("a b/c.mp4") == "https://cdn.example.test/assets/a%20b/c.mp4"


def test_head_of_a_missing_key_is_none(make_store: StoreFactory) -> None:
    assert make_store().head("never/uploaded.mp4") is None


def test_missing_bucket_fails_check_and_delete_with_a_clear_error(
    make_store: StoreFactory, moto_s3: MotoS3Server
) -> None:
    missing = moto_s3.unique_bucket_name("missing")
    store = make_store(bucket=missing)

    with pytest.raises(ObjectStoreError) as deleted:
        store.delete("a.mp4")
    with pytest.raises(ObjectStoreError) as checked:
        store.check()

    assert str(deleted.value) == (
        f"S3 DeleteObject for 'a.mp4' in bucket '{missing}' failed: "
        "NoSuchBucket (HTTP 404): The specified bucket does not exist."
    )
    assert (deleted.value.error_code, deleted.value.status_code) == ("NoSuchBucket", 404)
    assert (deleted.value.operation, deleted.value.key) == ("DeleteObject", "a.mp4")
    assert str(checked.value) == (
        f"S3 HeadBucket for bucket '{missing}' failed: HTTP 404 Not Found: "
        "the bucket does not exist."
    )
    # S3 answers a HEAD with a bare 404 for a missing bucket too; check() tells them apart.
    assert store.head("a.mp4") is None


def test_existing_bucket_passes_check(make_store: StoreFactory) -> None:
    make_store().check()


def test_unreachable_endpoint_raises_object_store_error_without_credentials(
    make_store: StoreFactory, moto_s3: MotoS3Server
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    client = moto_s3.client(endpoint_url=dead, retries={"total_max_attempts": 1})
    store = make_store(client=client)

    calls: list[Callable[[], object]] = [
        lambda: store.head("k.mp4"),
        lambda: store.delete("k.mp4"),
        store.check,
    ]
    for call in calls:
        with pytest.raises(ObjectStoreError) as caught:
            call()
        message = str(caught.value)
        assert "EndpointConnectionError" in message
        assert dead in message
        assert caught.value.status_code is None
        assert FAKE_SECRET_ACCESS_KEY not in message
        assert FAKE_ACCESS_KEY_ID not in message


def test_constructor_builds_a_client_from_the_credential_chain(
    isolated_aws_env: pytest.MonkeyPatch, moto_s3: MotoS3Server, bucket: str
) -> None:
    isolated_aws_env.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY_ID)
    isolated_aws_env.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_ACCESS_KEY)
    store = S3ObjectStore(bucket, endpoint_url=moto_s3.endpoint_url, region="us-east-1")
    body = b"chain"

    store.check()
    presigned = store.presign_put("k.txt", "text/plain", len(body), 60)
    assert presigned.upload_url.startswith(f"{moto_s3.endpoint_url}/{bucket}/k.txt?")
    assert put(presigned.upload_url, body, presigned.headers).status_code == 200
    assert store.head("k.txt") == ObjectInfo(len(body), f'"{hashlib.md5(body).hexdigest()}"')


def test_aws_urls_are_regional_virtual_hosted_for_presign_and_path_style_for_public(
    isolated_aws_env: pytest.MonkeyPatch,
) -> None:
    isolated_aws_env.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY_ID)
    isolated_aws_env.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_ACCESS_KEY)

    plain = S3ObjectStore("render-assets", region="eu-west-1")
    dotted = S3ObjectStore("render.assets", region="eu-west-1")

    url = plain.presign_put("v/a.mp4", "video/mp4", 10, 60).upload_url
    assert url.startswith("https://render-assets.s3.eu-west-1.amazonaws.com/v/a.mp4?")
    assert "eu-west-1/s3/aws4_request" in query_of(url)["X-Amz-Credential"]
    assert plain.public_url("v/a.mp4") == (
        "https://s3.eu-west-1.amazonaws.com/render-assets/v/a.mp4"
    )
    # A dotted name would not match the *.s3 certificate, so it stays path-style.
    dotted_url = dotted.presign_put("v/a.mp4", "video/mp4", 10, 60).upload_url
    assert dotted_url.startswith("https://s3.eu-west-1.amazonaws.com/render.assets/v/a.mp4?")


def test_presign_without_credentials_raises_a_clear_error(
    isolated_aws_env: pytest.MonkeyPatch,
) -> None:
    store = S3ObjectStore("render-assets", endpoint_url="http://127.0.0.1:9", region="us-east-1")

    with pytest.raises(ObjectStoreError, match="no AWS credentials were found") as caught:
        store.presign_put("a.mp4", "video/mp4", 1, 60)

    assert caught.value.operation == "PresignPutObject"
    assert isinstance(caught.value, StorageError)


def test_missing_boto3_raises_storage_config_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_import = builtins.__import__

    def no_boto(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in ("boto3", "botocore"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_boto)

    with pytest.raises(StorageConfigError, match=r"pip install 'ctrlupload\[s3\]'") as caught:
        S3ObjectStore("render-assets")
    assert caught.value.variable is None


def test_missing_boto3_module_entry_raises_storage_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)

    with pytest.raises(StorageConfigError, match="needs boto3"):
        S3ObjectStore("render-assets", client=object())


@pytest.mark.parametrize(
    ("content_length", "expires_sec", "message"),
    [
        (10, 0, "expires_sec must be between 1 and 604800"),
        (10, MAX_PRESIGN_EXPIRES_S + 1, "expires_sec must be between 1 and 604800"),
        (-1, 60, "content_length must be between 0 and"),
        (5 * 1024**3 + 1, 60, "S3's limit for one PUT"),
    ],
)
def test_presign_rejects_out_of_range_arguments(
    make_store: StoreFactory, content_length: int, expires_sec: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_store().presign_put("a.mp4", "video/mp4", content_length, expires_sec)


@pytest.mark.parametrize(
    ("bucket", "kwargs", "message"),
    [
        ("", {}, "bucket name is empty"),
        ("b-1", {"endpoint_url": "ftp://files.example.test"}, "endpoint_url must be an http"),
        ("b-1", {"public_base_url": "cdn.example.test"}, "public_base_url must be an http"),
    ],
)
def test_constructor_rejects_malformed_configuration(
    bucket: str, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(StorageConfigError, match=message):
        S3ObjectStore(bucket, client=object(), **kwargs)


def test_a_backend_on_the_s3_store_serves_no_uploads_or_downloads_itself(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    from ctrlupload.server import AssetDB, ReferenceBackend, WSGIServer

    server = WSGIServer(None, "127.0.0.1", 0).start()
    try:
        server.set_app(
            ReferenceBackend(
                token="t0ken-for-s3", store=make_store(), db=AssetDB(tmp_path / "a.sqlite3")
            )
        )
        base = f"http://127.0.0.1:{server.port}"
        upload = requests.put(f"{base}/upload/a/b.mp4?expires=1&signature=x", data=b"x", timeout=5)
        part = requests.put(f"{base}/upload-part/u/1?expires=1&signature=x", data=b"x", timeout=5)
        download = requests.get(f"{base}/files/a/b.mp4", timeout=5)
    finally:
        server.stop()
    assert upload.status_code == part.status_code == download.status_code == 404
    assert upload.json()["error"] == "not_found"


def test_a_profile_that_does_not_exist_is_a_storage_config_error(
    isolated_aws_env: pytest.MonkeyPatch,
) -> None:
    isolated_aws_env.setenv("AWS_PROFILE", "no-such-profile")

    with pytest.raises(StorageConfigError, match="could not set up an S3 client") as caught:
        S3ObjectStore("render-assets", region="us-east-1")

    assert "no-such-profile" in str(caught.value)
