"""The ``s3`` and ``minio`` providers against moto's standalone server.

Uploads go through the upload engine with an in-process :class:`S3Signer`; moto stores
the bytes, and each test reads them back with boto3. moto checks no signature, expiry
or signed header (see ``tests/support/moto_server.py``), so these tests show what the
provider asks S3 for and how it reports S3's answers; rejections of bad PUTs are the
reference backend's local store's job. Answers moto never gives (a wrong region) come
from :class:`S3FaultProxy`, in AWS's own words.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from ctrlupload import (
    S3AccessDeniedError,
    S3BucketNotFoundError,
    S3CredentialsError,
    S3EndpointUnreachableError,
    S3Error,
    S3StorageProvider,
    S3WrongRegionError,
    Settings,
    StorageConfigError,
    StorageTransferError,
    StorageUploadError,
    get_storage_provider,
    render_asset_key,
)
from ctrlupload.protocol import multipart_etag
from tests.support.moto_server import (
    FAKE_ACCESS_KEY_ID,
    FAKE_SECRET_ACCESS_KEY,
    MotoS3Server,
    moto_with_iam,
)
from tests.support.s3_proxy import CannedAnswer, S3FaultProxy

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
PART = 5 * MIB
KEY = "videos/V-001/S-001/JOB-9/video.mp4"

MakeProvider = Callable[..., S3StorageProvider]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """boto3's chain finds the fake keys in the environment, and nothing else."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    values = {
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_ACCESS_KEY,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def bucket(moto_s3: MotoS3Server) -> str:
    return moto_s3.make_bucket()


@pytest.fixture
def make_provider(
    moto_s3: MotoS3Server, bucket: str, aws_env: dict[str, str], tmp_path: Path
) -> Iterator[MakeProvider]:
    made: list[S3StorageProvider] = []

    def make(**overrides: Any) -> S3StorageProvider:
        values: dict[str, Any] = {
            "STORAGE_PROVIDER": "minio",
            "STORAGE_S3_BUCKET": bucket,
            "STORAGE_S3_ENDPOINT_URL": moto_s3.endpoint_url,
            "STORAGE_RESUME_DIR": str(tmp_path / "resume"),
            "STORAGE_RETRY_BACKOFF_S": 0,
            "VIDEO_MAX_UPLOAD_BYTES": 1024 * MIB,
        }
        values.update(overrides)
        provider = get_storage_provider(Settings.from_mapping(values))
        assert isinstance(provider, S3StorageProvider)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


def stored(moto_s3: MotoS3Server, bucket: str, key: str) -> tuple[bytes, dict[str, Any]]:
    answer = moto_s3.client().get_object(Bucket=bucket, Key=key)
    return answer["Body"].read(), answer


# -- uploads ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 300 * 1024])
def test_single_put_stores_the_bytes_with_their_md5_etag(
    make_provider: MakeProvider, moto_s3: MotoS3Server, bucket: str, size: int
) -> None:
    data = os.urandom(size)
    with make_provider() as storage:
        result = storage.put_object(data, "renders/thumb.jpg")

    body, answer = stored(moto_s3, bucket, "renders/thumb.jpg")
    assert body == data
    assert answer["ContentType"] == "image/jpeg"
    assert result.etag == f'"{hashlib.md5(data).hexdigest()}"'
    assert result.size_bytes == size
    assert result.url == f"{moto_s3.endpoint_url}/{bucket}/renders/thumb.jpg"


def test_a_multipart_size_file_goes_up_in_parts(
    make_provider: MakeProvider, moto_s3: MotoS3Server, bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(2 * PART + 123)
    source = tmp_path / "video.mp4"
    source.write_bytes(data)
    seen: list[tuple[int, int]] = []
    with make_provider(
        STORAGE_MULTIPART_THRESHOLD_BYTES=PART, STORAGE_MULTIPART_PART_BYTES=PART
    ) as storage:
        result = storage.put_file(source, KEY, progress=lambda d, t: seen.append((d, t)))

    body, answer = stored(moto_s3, bucket, KEY)
    assert body == data
    assert answer["ContentType"] == "video/mp4"
    digests = [hashlib.md5(data[i : i + PART]).hexdigest() for i in range(0, len(data), PART)]
    assert result.etag == multipart_etag(digests)
    assert result.etag.endswith('-3"')
    assert seen[-1] == (len(data), len(data))
    assert moto_s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_completion_retried_after_it_succeeded_counts_as_done(
    make_provider: MakeProvider, moto_s3: MotoS3Server, bucket: str
) -> None:
    """A lost 200 makes botocore try again, and S3 may then know no such upload.

    moto answers a repeated completion with 200 again, so the proxy answers it the way
    S3 may: 404 NoSuchUpload. HEAD (forwarded to moto) then decides.
    """
    gone = False

    def no_such_upload(method: str, path: str, query: str) -> CannedAnswer | None:
        if gone and method == "POST" and "uploadId=" in query:
            return 404, b"<Error><Code>NoSuchUpload</Code><Message>gone</Message></Error>"
        return None

    data = os.urandom(PART + 10)
    with S3FaultProxy(moto_s3.endpoint_url, no_such_upload) as proxy:
        storage = make_provider(STORAGE_S3_ENDPOINT_URL=proxy.endpoint_url)
        signer = storage.signer
        upload = signer.initiate(KEY, "video/mp4", len(data), PART)
        urls = signer.presign_parts(KEY, upload.upload_id, [1, 2])
        etags = []
        for number, chunk in ((1, data[:PART]), (2, data[PART:])):
            answer = storage._transport.put(urls[number].url, chunk, dict(urls[number].headers))
            etags.append((number, answer.headers["etag"]))

        first = signer.complete_multipart(KEY, upload.upload_id, etags, len(data), "video/mp4")
        gone = True
        again = signer.complete_multipart(KEY, upload.upload_id, etags, len(data), "video/mp4")
        # The object at the key is not what these parts would make: not done.
        with pytest.raises(S3Error, match="not these parts assembled") as caught:
            signer.complete_multipart(KEY, upload.upload_id, etags[:1], PART, "video/mp4")

    assert proxy.faults_served == 2
    assert again.etag.strip('"') == first.etag.strip('"')
    assert stored(moto_s3, bucket, KEY)[0] == data
    assert caught.value.phase == "complete-multipart"
    assert caught.value.error_code == "NoSuchUpload"


_KILLED_CHILD = """
import os, signal, sys
from ctrlupload import get_storage_provider
def progress(done, total):
    if done >= total // 2:
        os.kill(os.getpid(), signal.SIGKILL)  # die mid-upload, like a crashed renderer
with get_storage_provider() as storage:
    storage.put_file(sys.argv[1], sys.argv[2], progress=progress, resume=True)
"""


def test_an_upload_killed_midway_resumes_sending_only_the_missing_parts(
    moto_s3: MotoS3Server, bucket: str, aws_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.support.throttle_proxy import ThrottleProxy

    moto = urlsplit(moto_s3.endpoint_url)
    source = tmp_path / "video.mp4"
    data = os.urandom(6 * PART + 55)  # 7 parts
    source.write_bytes(data)
    # Through a counting proxy (no rate cap): moto keeps no request log.
    with ThrottleProxy(str(moto.hostname), int(moto.port or 80), rate_bytes_per_s=None) as proxy:
        env = {
            **aws_env,
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
            "STORAGE_PROVIDER": "minio",
            "STORAGE_S3_BUCKET": bucket,
            "STORAGE_S3_ENDPOINT_URL": proxy.url,
            "STORAGE_RESUME_DIR": str(tmp_path / "resume"),
            "STORAGE_MULTIPART_CONCURRENCY": "2",
            "STORAGE_MULTIPART_PART_BYTES": str(PART),
            "STORAGE_MULTIPART_THRESHOLD_BYTES": str(PART),
        }
        child = subprocess.run(
            [sys.executable, "-c", _KILLED_CHILD, str(source), KEY],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr.decode()
        assert len(list((tmp_path / "resume").glob("*.json"))) == 1
        # A part the killed child was sending ends at the proxy once moto has answered.
        assert proxy.wait_idle(30), "the proxy still holds connections of the killed run"
        (upload,) = moto_s3.client().list_multipart_uploads(Bucket=bucket)["Uploads"]
        held = moto_s3.client().list_parts(Bucket=bucket, Key=KEY, UploadId=upload["UploadId"])
        stored_before = {part["PartNumber"] for part in held.get("Parts", [])}
        assert stored_before, "the killed run stored no part: nothing to resume"
        proxy.reset()

        settings = Settings.from_env(env, dotenv_path=None)
        with get_storage_provider(settings) as storage:
            result = storage.put_file(source, KEY, resume=True)

        resent = {
            int(parse_qs(urlsplit(request.target).query)["partNumber"][0])
            for connection in proxy.stats().connections
            for request in connection.requests
            if request.method == "PUT" and "partNumber=" in request.target
        }
    assert resent == set(range(1, 8)) - stored_before
    assert stored(moto_s3, bucket, KEY)[0] == data
    assert result.etag is not None and result.etag.endswith('-7"')
    assert moto_s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert list((tmp_path / "resume").glob("*.json")) == []


# -- delete and get_url -------------------------------------------------------------------


def test_delete_removes_the_object_and_a_missing_one_is_fine(
    make_provider: MakeProvider, moto_s3: MotoS3Server, bucket: str
) -> None:
    with make_provider() as storage:
        storage.put_object(b"subtitles", "renders/subtitles.srt")
        storage.delete("renders/subtitles.srt")
        storage.delete("renders/subtitles.srt")
    listing = moto_s3.client().list_objects_v2(Bucket=bucket)
    assert listing.get("Contents", []) == []


def test_get_url_is_the_public_base_or_the_object_url(
    make_provider: MakeProvider, moto_s3: MotoS3Server, bucket: str
) -> None:
    with make_provider() as storage:
        assert storage.get_url("a b/c.mp4") == f"{moto_s3.endpoint_url}/{bucket}/a%20b/c.mp4"
    with make_provider(STORAGE_PUBLIC_BASE_URL="https://cdn.example.com/r/") as storage:
        assert storage.get_url("a/c.mp4") == "https://cdn.example.com/r/a/c.mp4"
        assert storage.put_object(b"x", "a/c.mp4").url == "https://cdn.example.com/r/a/c.mp4"
        with pytest.raises(StorageUploadError, match="must not"):
            storage.get_url("../c.mp4")


# -- settings -----------------------------------------------------------------------------


def test_s3_presigns_sigv4_on_the_regional_endpoint_and_asks_for_no_checksum(
    aws_env: dict[str, str],
) -> None:
    settings = Settings(
        STORAGE_PROVIDER="s3", STORAGE_S3_BUCKET="render-assets", STORAGE_S3_REGION="eu-west-1"
    )
    with get_storage_provider(settings) as storage:
        assert isinstance(storage, S3StorageProvider)
        signed = storage.signer.presign_put("a/video.mp4", "video/mp4", 10)
    url = urlsplit(signed.url)
    query = parse_qs(url.query)
    assert url.netloc == "render-assets.s3.eu-west-1.amazonaws.com"
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert "eu-west-1/s3/aws4_request" in query["X-Amz-Credential"][0]
    assert set(query["X-Amz-SignedHeaders"][0].split(";")) == {
        "content-length",
        "content-type",
        "host",
    }
    assert not [name for name in query if "checksum" in name.lower()]
    assert dict(signed.headers) == {"Content-Type": "video/mp4", "Content-Length": "10"}
    assert signed.public_url == "https://s3.eu-west-1.amazonaws.com/render-assets/a/video.mp4"


def test_s3_in_us_east_1_signs_sigv4_too(aws_env: dict[str, str]) -> None:
    """Left alone, botocore would presign SigV2 there, which signs no Content-Length."""
    settings = Settings(
        STORAGE_PROVIDER="s3", STORAGE_S3_BUCKET="render-assets", STORAGE_S3_REGION="us-east-1"
    )
    with get_storage_provider(settings) as storage:
        assert isinstance(storage, S3StorageProvider)
        query = parse_qs(urlsplit(storage.signer.presign_put("a.mp4", "video/mp4", 1).url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert "Signature" not in query


def test_the_provider_repr_and_logs_hold_no_credential_or_signature(
    make_provider: MakeProvider, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    source = tmp_path / "video.mp4"
    source.write_bytes(os.urandom(PART + 1))
    with make_provider(STORAGE_MULTIPART_THRESHOLD_BYTES=PART) as storage:
        storage.put_file(source, KEY)
        ours = [
            record.getMessage()
            for record in caplog.records
            if record.name.split(".")[0] in ("ctrlupload", "urllib3")
        ]
        text = repr(storage) + repr(storage.signer) + "\n".join(ours)
    assert ours, "nothing was logged: the check below would prove nothing"
    assert FAKE_ACCESS_KEY_ID not in text
    assert "X-Amz-Signature" not in text
    # botocore's own DEBUG lines show request signatures (its business), never the secret.
    assert FAKE_SECRET_ACCESS_KEY not in text + caplog.text


# -- errors -------------------------------------------------------------------------------


def assert_plain(error: BaseException) -> None:
    """The seed's message shape, no botocore exception in the chain shown, no secret."""
    assert str(error).startswith("Storage upload failed for '")
    assert error.__suppress_context__ or error.__cause__ is not None
    shown = error.__cause__ if error.__suppress_context__ else error.__context__
    while shown is not None:
        assert not type(shown).__module__.startswith("botocore"), type(shown)
        shown = shown.__cause__
    assert FAKE_SECRET_ACCESS_KEY not in str(error)
    assert "X-Amz-Signature=" not in str(error)


def refused(
    storage: S3StorageProvider, error_type: type[S3Error], source: Path, *, small: bool = True
) -> list[S3Error]:
    """A small PUT (unless ``small`` is False), a multipart upload and a delete, each
    refused with ``error_type`` in the seed's message shape, with nothing shown from
    botocore."""
    attempts: list[Callable[[], object]] = [
        lambda: storage.put_file(source, KEY),
        lambda: storage.delete(KEY),
    ]
    if small:
        attempts.insert(0, lambda: storage.put_object(b"x", "a/x.txt"))
    caught: list[S3Error] = []
    for attempt in attempts:
        with pytest.raises(error_type) as info:
            attempt()
        assert_plain(info.value)
        caught.append(info.value)
    return caught


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A file that goes up in parts (with STORAGE_MULTIPART_THRESHOLD_BYTES=PART)."""
    path = tmp_path / "video.mp4"
    path.write_bytes(os.urandom(PART))
    return path


def test_missing_credentials(
    make_provider: MakeProvider, monkeypatch: pytest.MonkeyPatch, source: Path
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with make_provider(STORAGE_MULTIPART_THRESHOLD_BYTES=PART) as storage:
        errors = refused(storage, S3CredentialsError, source)
    assert [error.phase for error in errors] == ["presign", "initiate", "delete"]
    for error in errors:
        assert "no AWS credentials were found" in str(error)
        assert "AWS_ACCESS_KEY_ID" in str(error)


@pytest.fixture(scope="module")
def iam_moto() -> Iterator[Any]:
    with moto_with_iam() as server:
        yield server


def iam_settings(iam_moto: Any, tmp_path: Path) -> Settings:
    return Settings(
        STORAGE_PROVIDER="minio",
        STORAGE_S3_BUCKET=iam_moto.bucket,
        STORAGE_S3_ENDPOINT_URL=iam_moto.endpoint_url,
        STORAGE_MULTIPART_THRESHOLD_BYTES=PART,
        STORAGE_RESUME_DIR=str(tmp_path / "resume"),
    )


def test_credentials_s3_does_not_know(
    iam_moto: Any, aws_env: dict[str, str], source: Path, tmp_path: Path
) -> None:
    # No small PUT: moto cannot check a presigned URL's credentials (see moto_with_iam).
    with S3StorageProvider(iam_settings(iam_moto, tmp_path)) as storage:
        errors = refused(storage, S3CredentialsError, source, small=False)
    for error in errors:
        assert (error.status_code, error.error_code) == (403, "InvalidAccessKeyId")
        assert "Check the AWS credentials" in str(error)


def test_access_denied(
    iam_moto: Any,
    aws_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    source: Path,
    tmp_path: Path,
) -> None:
    key_id, secret = iam_moto.denied_key
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with S3StorageProvider(iam_settings(iam_moto, tmp_path)) as storage:
        errors = refused(storage, S3AccessDeniedError, source, small=False)
        with pytest.raises(S3AccessDeniedError):
            storage.put_file(source, KEY, resume=True)
    for error in errors:
        assert error.error_code == "AccessDenied"
        assert "IAM policy" in str(error)
        assert secret not in str(error)
    assert list((tmp_path / "resume").glob("*.json")) == []  # nothing kept to resume


def test_missing_bucket(make_provider: MakeProvider, source: Path) -> None:
    with make_provider(
        STORAGE_S3_BUCKET="no-such-bucket-here", STORAGE_MULTIPART_THRESHOLD_BYTES=PART
    ) as storage:
        errors = refused(storage, S3BucketNotFoundError, source)
    assert [error.phase for error in errors] == ["upload", "initiate", "delete"]
    for error in errors:
        assert error.error_code == "NoSuchBucket"
        assert "check STORAGE_S3_BUCKET" in str(error)


def test_unreachable_endpoint(make_provider: MakeProvider, source: Path) -> None:
    import socket

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with make_provider(
        STORAGE_S3_ENDPOINT_URL=endpoint,
        STORAGE_MULTIPART_THRESHOLD_BYTES=PART,
        STORAGE_RETRY_ATTEMPTS=2,
    ) as storage:
        errors = refused(storage, S3EndpointUnreachableError, source)
    assert [error.phase for error in errors] == ["upload", "initiate", "delete"]
    for error in errors:
        assert f"No connection to {endpoint}: check STORAGE_S3_ENDPOINT_URL" in str(error)
        assert error.status_code is None


def _wrong_region(method: str, path: str, query: str) -> CannedAnswer:
    """What AWS answers a request signed for us-east-1 to a bucket in eu-west-1."""
    del path
    if "X-Amz-Credential=" in query:  # presigned
        code, place = "AuthorizationQueryParametersError", "the X-Amz-Credential parameter"
    else:
        code, place = "AuthorizationHeaderMalformed", "the authorization header"
    if method == "HEAD":
        return 400, b""
    body = (
        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>"
        f"Error parsing {place}; the region 'us-east-1' is wrong; expecting 'eu-west-1'"
        "</Message><Region>eu-west-1</Region><RequestId>R</RequestId></Error>"
    ).encode()
    return 400, body


def test_wrong_region(make_provider: MakeProvider, moto_s3: MotoS3Server, source: Path) -> None:
    with S3FaultProxy(moto_s3.endpoint_url, _wrong_region) as proxy:
        storage = make_provider(
            STORAGE_S3_ENDPOINT_URL=proxy.endpoint_url, STORAGE_MULTIPART_THRESHOLD_BYTES=PART
        )
        errors = refused(storage, S3WrongRegionError, source)
    assert [error.error_code for error in errors] == [
        "AuthorizationQueryParametersError",
        "AuthorizationHeaderMalformed",
        "AuthorizationHeaderMalformed",
    ]
    for error in errors:
        assert error.bucket_region == "eu-west-1"
        assert "signed for us-east-1: set STORAGE_S3_REGION=eu-west-1" in str(error)


def test_other_s3_failures_stay_plain_s3_errors(
    make_provider: MakeProvider, moto_s3: MotoS3Server, tmp_path: Path
) -> None:
    def broken(method: str, path: str, query: str) -> CannedAnswer | None:
        return 500, b"<Error><Code>InternalError</Code><Message>We hit a snag</Message></Error>"

    source = tmp_path / "video.mp4"
    source.write_bytes(os.urandom(PART))
    with (
        S3FaultProxy(moto_s3.endpoint_url, broken) as proxy,
        make_provider(
            STORAGE_S3_ENDPOINT_URL=proxy.endpoint_url,
            STORAGE_MULTIPART_THRESHOLD_BYTES=PART,
            STORAGE_RETRY_ATTEMPTS=2,
        ) as storage,
        pytest.raises(S3Error, match="InternalError") as big,
    ):
        storage.put_file(source, KEY)
    assert type(big.value) is S3Error
    assert big.value.status_code == 500
    assert proxy.faults_served == 2  # botocore's attempts, STORAGE_RETRY_ATTEMPTS of them


def test_a_put_storage_fails_otherwise_stays_a_transfer_error(
    make_provider: MakeProvider, moto_s3: MotoS3Server
) -> None:
    def broken_puts(method: str, path: str, query: str) -> CannedAnswer | None:
        if method == "PUT":
            return 500, b"<Error><Code>InternalError</Code><Message>snag</Message></Error>"
        return None

    with S3FaultProxy(moto_s3.endpoint_url, broken_puts) as proxy:
        storage = make_provider(
            STORAGE_S3_ENDPOINT_URL=proxy.endpoint_url, STORAGE_RETRY_ATTEMPTS=2
        )
        with pytest.raises(StorageTransferError, match="HTTP 500 after 2 attempts") as caught:
            storage.put_object(b"x", "a/x.txt")
    assert not isinstance(caught.value, S3Error)
    assert proxy.faults_served == 2


# -- one retry owner ----------------------------------------------------------------------


def test_botocore_retries_its_calls_and_the_transport_retries_the_puts(
    make_provider: MakeProvider, moto_s3: MotoS3Server, bucket: str, tmp_path: Path
) -> None:
    """Each request has one retry owner, with STORAGE_RETRY_ATTEMPTS attempts."""
    calls: list[tuple[str, str]] = []
    failing = {"initiate": 2, "part": 2}

    def flaky(method: str, path: str, query: str) -> CannedAnswer | None:
        kind = "initiate" if method == "POST" and "uploads" in query else None
        kind = "part" if method == "PUT" and "partNumber=1&" in query + "&" else kind
        if kind is None:
            return None
        calls.append((kind, method))
        if failing[kind]:
            failing[kind] -= 1
            return 503, b"<Error><Code>SlowDown</Code><Message>Reduce</Message></Error>"
        return None

    source = tmp_path / "video.mp4"
    data = os.urandom(PART + 7)
    source.write_bytes(data)
    with (
        S3FaultProxy(moto_s3.endpoint_url, flaky) as proxy,
        make_provider(
            STORAGE_S3_ENDPOINT_URL=proxy.endpoint_url,
            STORAGE_MULTIPART_THRESHOLD_BYTES=PART,
            STORAGE_RETRY_ATTEMPTS=3,
        ) as storage,
    ):
        storage.put_file(source, KEY)
    assert [kind for kind, _ in calls].count("initiate") == 3
    assert [kind for kind, _ in calls].count("part") == 3
    assert stored(moto_s3, bucket, KEY)[0] == data


def test_nosuchkey_from_list_parts_means_the_upload_is_gone(
    make_provider: MakeProvider, moto_s3: MotoS3Server, bucket: str
) -> None:
    def no_such_key(method: str, path: str, query: str) -> CannedAnswer | None:
        if method == "GET" and "uploadId=" in query:
            return 404, b"<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>"
        return None

    with S3FaultProxy(moto_s3.endpoint_url, no_such_key) as proxy:
        storage = make_provider(STORAGE_S3_ENDPOINT_URL=proxy.endpoint_url)
        upload = storage.signer.initiate(KEY, "video/mp4", PART, PART)
        assert storage.signer.list_parts(KEY, upload.upload_id) is None
        storage.signer.abort(KEY, upload.upload_id)
    assert proxy.faults_served == 1


# -- one render, three providers, switched by the environment alone -----------------------


RENDER = """
import json, sys
from ctrlupload import get_storage_provider, render_asset_key
results = {}
with get_storage_provider() as storage:
    for asset, path in zip(("video", "subtitles", "thumbnail"), sys.argv[1:]):
        key = render_asset_key("V-7", "S-7", "JOB-7", asset)
        results[key] = storage.put_file(path, key).url
print(json.dumps({"provider": type(storage).__name__, "results": results}))
"""


def test_one_render_switches_provider_by_environment_alone(
    moto_s3: MotoS3Server,
    aws_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    from tests.support.moto_server import s3_reference_server

    assets = {
        "video": (tmp_path / "video.mp4", os.urandom(PART + 3)),
        "subtitles": (tmp_path / "subtitles.srt", b"1\n00:00:00,000 --> 00:00:01,000\nhi\n"),
        "thumbnail": (tmp_path / "thumb.jpg", os.urandom(3000)),
    }
    for path, data in assets.values():
        path.write_bytes(data)
    expected = {
        render_asset_key("V-7", "S-7", "JOB-7", asset): data for asset, (_, data) in assets.items()
    }
    base_env = {
        **aws_env,
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "STORAGE_MULTIPART_THRESHOLD_BYTES": str(PART),
    }

    def render(env: dict[str, str]) -> dict[str, Any]:
        child = subprocess.run(
            [sys.executable, "-c", RENDER, *(str(path) for path, _ in assets.values())],
            env={**base_env, **env},
            cwd=tmp_path,
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert child.returncode == 0, child.stderr.decode()
        answer: dict[str, Any] = json.loads(child.stdout)
        return answer

    local = render({"STORAGE_PROVIDER": "local", "STORAGE_LOCAL_ROOT": str(tmp_path / "out")})
    assert local["provider"] == "LocalStorageProvider"
    for key, data in expected.items():
        assert (tmp_path / "out" / key).read_bytes() == data

    minio_bucket = moto_s3.make_bucket()
    minio = render(
        {
            "STORAGE_PROVIDER": "minio",
            "STORAGE_S3_BUCKET": minio_bucket,
            "STORAGE_S3_ENDPOINT_URL": moto_s3.endpoint_url,
        }
    )
    assert minio["provider"] == "S3StorageProvider"
    for key, data in expected.items():
        assert stored(moto_s3, minio_bucket, key)[0] == data

    with s3_reference_server(moto_s3, tmp_path / "backend", monkeypatch) as (server, bucket):
        presigned = render(
            {
                "STORAGE_PROVIDER": "backend_presigned",
                "BACKEND_BASE_URL": server.base_url,
                "BACKEND_SERVICE_TOKEN": server.token,
            }
        )
        rows = {row.object_key for row in server.db.all()}
    assert presigned["provider"] == "BackendPresignedStorageProvider"
    for key, data in expected.items():
        assert stored(moto_s3, bucket, key)[0] == data
    assert rows == set(expected)
    # The same keys, and for both S3 providers the same object URLs.
    assert set(local["results"]) == set(minio["results"]) == set(presigned["results"])
    assert minio["results"] == {
        key: url.replace(f"/{bucket}/", f"/{minio_bucket}/")
        for key, url in presigned["results"].items()
    }


def test_without_boto3_the_provider_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    settings = Settings(
        STORAGE_PROVIDER="minio",
        STORAGE_S3_BUCKET="renders",
        STORAGE_S3_ENDPOINT_URL="http://127.0.0.1:9000",
    )
    with pytest.raises(StorageConfigError) as caught:
        get_storage_provider(settings)
    assert str(caught.value) == (
        "STORAGE_PROVIDER=minio needs boto3, which is not installed: pip install 'ctrlupload[s3]'"
    )
    assert caught.value.__suppress_context__ or caught.value.__cause__ is not None
