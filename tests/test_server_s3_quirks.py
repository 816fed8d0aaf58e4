"""The s3 store against answers that S3-compatible stores (and AWS itself) give.

Each quirk is played by moto's S3 server with one answer altered on the client side,
through botocore's event hooks: ``before-parse`` rewrites a real answer's body, and
``before-send`` answers a request itself without sending it. The client-side half of
the bare ``403 AccessDenied`` expiry is pinned in tests/test_protocol.py
(``is_expired_answer``).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from ctrlupload.protocol._parts import multipart_etag
from ctrlupload.server._s3store import ObjectStoreError, S3ObjectStore
from ctrlupload.server._store import NoSuchUpload, ObjectInfo, StoredPart
from tests.support.moto_server import (
    FAKE_ACCESS_KEY_ID,
    FAKE_REGION,
    FAKE_SECRET_ACCESS_KEY,
    MotoS3Server,
)

TIMEOUT_S = 10
KEY = "videos/V-001/S-001/JOB-123/video.mp4"
MIB = 1024 * 1024
#: A header carrying a checksum botocore computed, or naming its algorithm. Not
#: ``x-amz-checksum-mode``: HEAD sends that to read the checksum S3 stored (issue 11).
_CHECKSUM_HEADER = re.compile(r"^x-amz-(checksum-(?!mode$)|sdk-checksum-algorithm)", re.IGNORECASE)
_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


class _Body:
    """The ``raw`` of a canned botocore answer: botocore reads it with ``stream()``."""

    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **kwargs: Any) -> Iterator[bytes]:
        yield self._body


def canned(status: int, body: bytes) -> Callable[..., Any]:
    """A ``before-send`` handler that answers every request it sees itself."""
    from botocore.awsrequest import AWSResponse

    def answer(request: Any, **kwargs: Any) -> Any:
        return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Body(body))

    return answer


def s3_error(code: str, message: str = "", extra: str = "") -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message>{extra}<RequestId>R1</RequestId></Error>"
    ).encode()


@pytest.fixture
def bucket(moto_s3: MotoS3Server) -> str:
    return moto_s3.make_bucket()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Fake credentials in the environment, and no profile, config file or IMDS."""
    for name in _AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def built_store(moto_s3: MotoS3Server, bucket: str) -> tuple[S3ObjectStore, Any]:
    """A store that builds its own client (the one under test), and that client."""
    store = S3ObjectStore(bucket, endpoint_url=moto_s3.endpoint_url, region=FAKE_REGION)
    return store, store._client


def hooked_store(moto_s3: MotoS3Server, bucket: str) -> tuple[S3ObjectStore, Any]:
    """A store on a client of its own, so hooks registered on it touch no other test."""
    client = moto_s3.client(retries={"mode": "standard", "total_max_attempts": 1})
    return S3ObjectStore(bucket, client=client), client


def upload_parts(store: S3ObjectStore, sizes: list[int]) -> tuple[str, list[StoredPart], bytes]:
    """Start an upload and PUT its parts through presigned URLs; nothing is completed."""
    upload_id = store.create_multipart(KEY, "video/mp4")
    parts, data = [], b""
    for number, size in enumerate(sizes, start=1):
        body = os.urandom(size)
        signed = store.presign_part(KEY, upload_id, number, size, 600)
        answer = requests.put(
            signed.upload_url, data=body, headers=signed.headers, timeout=TIMEOUT_S
        )
        assert answer.status_code == 200, answer.text
        parts.append(StoredPart(number, answer.headers["ETag"], size))
        data += body
    return upload_id, parts, data


def etag_of(parts: list[StoredPart]) -> str:
    return multipart_etag([part.etag.strip('"') for part in parts])


# -- 1. CompleteMultipartUpload: 200 without an ETag, or with an error inside ------------


@pytest.mark.parametrize(
    "replacement", [b"<ETag></ETag>", b"<ETag/>", b""], ids=["empty", "self-closing", "missing"]
)
def test_completion_without_an_etag_counts_when_head_shows_the_assembled_object(
    moto_s3: MotoS3Server, bucket: str, replacement: bytes
) -> None:
    store, client = hooked_store(moto_s3, bucket)
    upload_id, parts, data = upload_parts(store, [5 * MIB, 1000])

    def drop_etag(response_dict: dict[str, Any], **kwargs: Any) -> None:
        response_dict["body"] = re.sub(rb"<ETag>[^<]*</ETag>", replacement, response_dict["body"])

    client.meta.events.register("before-parse.s3.CompleteMultipartUpload", drop_etag)

    info = store.complete_multipart(KEY, upload_id, parts)

    assert info == ObjectInfo(size_bytes=len(data), etag=etag_of(parts))
    assert moto_s3.client().get_object(Bucket=bucket, Key=KEY)["Body"].read() == data


@pytest.mark.parametrize(
    ("before", "found"),
    [
        (None, "no object"),
        (5 * MIB + 1000, "5243880 bytes with ETag"),  # same size, but not the assembly
        (10, "10 bytes with ETag"),
    ],
    ids=["no-object", "other-object-same-size", "other-size"],
)
def test_completion_without_an_etag_fails_clearly_when_head_disagrees(
    moto_s3: MotoS3Server, bucket: str, before: int | None, found: str
) -> None:
    store, client = hooked_store(moto_s3, bucket)
    upload_id, parts, _ = upload_parts(store, [5 * MIB, 1000])
    if before is not None:
        moto_s3.client().put_object(Bucket=bucket, Key=KEY, Body=os.urandom(before))
    empty_etag = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n<CompleteMultipartUploadResult>'
        b"<Bucket>b</Bucket><Key>k</Key><ETag></ETag></CompleteMultipartUploadResult>"
    )
    answer = canned(200, empty_etag)
    client.meta.events.register("before-send.s3.CompleteMultipartUpload", answer)

    with pytest.raises(ObjectStoreError) as caught:
        store.complete_multipart(KEY, upload_id, parts)

    expected = etag_of(parts)
    assert str(caught.value).startswith(
        f"S3 CompleteMultipartUpload for '{KEY}' in bucket '{bucket}' answered without an "
        f"ETag, and HEAD then shows {found}"
    )
    assert str(caught.value).endswith(
        f"not {5 * MIB + 1000} bytes with ETag {expected}; the object may not be assembled."
    )
    assert (caught.value.operation, caught.value.key) == ("CompleteMultipartUpload", KEY)
    # The upload is still pending, so the client's retry of complete can succeed.
    client.meta.events.unregister("before-send.s3.CompleteMultipartUpload", answer)
    assert store.complete_multipart(KEY, upload_id, parts).etag == expected


def test_completion_without_an_etag_is_not_trusted_when_part_etags_are_not_md5s(
    moto_s3: MotoS3Server, bucket: str
) -> None:
    store, client = hooked_store(moto_s3, bucket)
    upload_id, _, _ = upload_parts(store, [1000])
    moto_s3.client().put_object(Bucket=bucket, Key=KEY, Body=os.urandom(1000))
    client.meta.events.register(
        "before-send.s3.CompleteMultipartUpload",
        canned(200, b"<CompleteMultipartUploadResult><ETag/></CompleteMultipartUploadResult>"),
    )
    kms_like = [StoredPart(1, '"not-an-md5"', 1000)]

    with pytest.raises(ObjectStoreError, match="answered without an ETag") as caught:
        store.complete_multipart(KEY, upload_id, kms_like)

    assert "the parts' ETags are not MD5 digests" in str(caught.value)


def test_error_inside_a_200_completion_is_one_attempt_and_a_clear_error(
    aws_env: pytest.MonkeyPatch, moto_s3: MotoS3Server, bucket: str
) -> None:
    store, client = built_store(moto_s3, bucket)
    upload_id, parts, _ = upload_parts(store, [1000])
    sent: list[str] = []
    client.meta.events.register(
        "before-send.s3.CompleteMultipartUpload", lambda request, **_: sent.append(request.url)
    )
    client.meta.events.register(
        "before-send.s3.CompleteMultipartUpload",
        canned(200, s3_error("InternalError", "We encountered an internal error.")),
    )

    with pytest.raises(ObjectStoreError) as caught:
        store.complete_multipart(KEY, upload_id, parts)

    assert str(caught.value) == (
        f"S3 CompleteMultipartUpload for '{KEY}' in bucket '{bucket}' failed: "
        "InternalError (HTTP 500): We encountered an internal error."
    )
    assert caught.value.error_code == "InternalError"
    assert len(sent) == 1  # no botocore retry: the backend's 503 is retried by the client


def test_store_errors_hold_no_signature_or_credentials(moto_s3: MotoS3Server, bucket: str) -> None:
    store, client = hooked_store(moto_s3, bucket)
    signature = "f" * 64
    details = (
        f"<AWSAccessKeyId>{FAKE_ACCESS_KEY_ID}</AWSAccessKeyId>"
        f"<StringToSign>AWS4-HMAC-SHA256 20260101T000000Z</StringToSign>"
        f"<SignatureProvided>{signature}</SignatureProvided>"
    )
    message = (
        "The request signature we calculated does not match the signature you provided: "
        f"http://s3.example.test/k?X-Amz-Credential={FAKE_ACCESS_KEY_ID}&amp;X-Amz-Signature="
        f"{signature}"
    )
    client.meta.events.register(
        "before-send.s3.CreateMultipartUpload",
        canned(403, s3_error("SignatureDoesNotMatch", message, details)),
    )

    with pytest.raises(ObjectStoreError) as caught:
        store.create_multipart(KEY, "video/mp4")

    text = f"{caught.value} {caught.value!r}"
    assert "SignatureDoesNotMatch (HTTP 403)" in text
    assert signature not in text
    assert FAKE_ACCESS_KEY_ID not in text
    assert FAKE_SECRET_ACCESS_KEY not in text


# -- 2. ListParts (and friends) answering NoSuchKey for a finished upload ----------------


def test_list_parts_answering_no_such_key_is_no_such_upload(
    moto_s3: MotoS3Server, bucket: str
) -> None:
    store, client = hooked_store(moto_s3, bucket)
    upload_id, _, _ = upload_parts(store, [1000])
    no_such_key = canned(404, s3_error("NoSuchKey", "The specified key does not exist."))
    client.meta.events.register("before-send.s3.ListParts", no_such_key)

    with pytest.raises(NoSuchUpload, match=upload_id):
        store.list_parts(KEY, upload_id)


def test_complete_and_abort_answering_no_such_key_mean_the_upload_is_gone(
    moto_s3: MotoS3Server, bucket: str
) -> None:
    store, client = hooked_store(moto_s3, bucket)
    upload_id, parts, _ = upload_parts(store, [1000])
    no_such_key = canned(404, s3_error("NoSuchKey", "The specified key does not exist."))
    client.meta.events.register("before-send.s3.CompleteMultipartUpload", no_such_key)
    client.meta.events.register("before-send.s3.AbortMultipartUpload", no_such_key)

    with pytest.raises(NoSuchUpload, match=upload_id):
        store.complete_multipart(KEY, upload_id, parts)
    store.abort_multipart(KEY, upload_id)  # nothing left to abort is not an error


def test_backend_recovers_a_completed_upload_when_list_parts_says_no_such_key(
    moto_s3: MotoS3Server, bucket: str, tmp_path: Path
) -> None:
    """An earlier complete assembled the object and died before recording it."""
    from ctrlupload.server import AssetDB, ReferenceBackend, WSGIServer
    from tests.test_server_multipart import TOKEN, Api

    store, client = hooked_store(moto_s3, bucket)
    db = AssetDB(tmp_path / "assets.sqlite3")
    server = WSGIServer(None, "127.0.0.1", 0).start()
    try:
        server.set_app(ReferenceBackend(token=TOKEN, store=store, db=db))
        api = Api(f"http://127.0.0.1:{server.port}")
        data = os.urandom(5 * MIB + 1000)
        upload_id, part_size, etags = api.upload(KEY, data, part_size=5 * MIB)
        moto_s3.client().complete_multipart_upload(
            Bucket=bucket,
            Key=KEY,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in etags]},
        )
        client.meta.events.register(
            "before-send.s3.ListParts",
            canned(404, s3_error("NoSuchKey", "The specified key does not exist.")),
        )

        complete = api.complete(KEY, upload_id, etags, len(data))
    finally:
        server.stop()
        db.close()

    assert complete.status_code == 200, complete.text
    assert complete.json()["etag"] == multipart_etag(
        [hashlib.md5(data[i : i + part_size]).hexdigest() for i in range(0, len(data), part_size)]
    )


# -- 4. botocore's default checksums, which several S3-compatible stores refuse ----------


def _checksum_headers(headers: Any) -> list[str]:
    return [name for name in headers if _CHECKSUM_HEADER.match(name)]


def test_presigned_urls_and_multipart_calls_carry_no_checksums(
    aws_env: pytest.MonkeyPatch, moto_s3: MotoS3Server, bucket: str
) -> None:
    store, client = built_store(moto_s3, bucket)
    sent: list[tuple[str, list[str]]] = []
    client.meta.events.register(
        "before-send.s3",
        lambda request, **_: sent.append((request.method, _checksum_headers(request.headers))),
    )
    modes: list[bytes | None] = []
    client.meta.events.register(
        "before-send.s3",
        lambda request, **_: modes.append(request.headers.get("x-amz-checksum-mode")),
    )

    put_url = store.presign_put("a.mp4", "video/mp4", 10, 60).upload_url
    upload_id, parts, _ = upload_parts(store, [1000])
    part_url = store.presign_part(KEY, upload_id, 1, 1000, 60).upload_url
    store.list_parts(KEY, upload_id)
    store.complete_multipart(KEY, upload_id, parts)
    store.abort_multipart(KEY, store.create_multipart("b.mp4", "video/mp4"))

    for url in (put_url, part_url):
        query = parse_qs(urlsplit(url).query)
        assert not [name for name in query if _CHECKSUM_HEADER.match(name)], url
        assert "checksum" not in query["X-Amz-SignedHeaders"][0]
    assert [method for method, _ in sent] == ["POST", "GET", "POST", "HEAD", "POST", "DELETE"]
    assert all(found == [] for _, found in sent), sent
    assert modes == [None, None, None, b"ENABLED", None, None]


def test_the_store_client_adds_no_checksum_to_a_body_it_sends(
    aws_env: pytest.MonkeyPatch, moto_s3: MotoS3Server, bucket: str
) -> None:
    """botocore >= 1.36 would add CRC32 headers to an UploadPart ("when_supported")."""
    store, client = built_store(moto_s3, bucket)
    upload_id = store.create_multipart(KEY, "video/mp4")
    sent: list[list[str]] = []
    client.meta.events.register(
        "before-send.s3.UploadPart",
        lambda request, **_: sent.append(_checksum_headers(request.headers)),
    )

    client.upload_part(Bucket=bucket, Key=KEY, UploadId=upload_id, PartNumber=1, Body=b"abc")

    assert sent == [[]]
    assert client.meta.config.response_checksum_validation == "when_required"
    store.abort_multipart(KEY, upload_id)


@pytest.mark.parametrize("where", ["env", "profile"])
def test_an_operators_checksum_setting_is_respected(
    aws_env: pytest.MonkeyPatch,
    moto_s3: MotoS3Server,
    bucket: str,
    tmp_path: Path,
    where: str,
) -> None:
    if where == "env":
        aws_env.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
        aws_env.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_supported")
    else:
        config = tmp_path / "aws-config"
        config.write_text(
            "[default]\nrequest_checksum_calculation = when_supported\n"
            "response_checksum_validation = when_supported\n"
        )
        aws_env.setenv("AWS_CONFIG_FILE", str(config))
    store, client = built_store(moto_s3, bucket)
    upload_id = store.create_multipart(KEY, "video/mp4")
    sent: list[list[str]] = []
    client.meta.events.register(
        "before-send.s3.UploadPart",
        lambda request, **_: sent.append(_checksum_headers(request.headers)),
    )

    client.upload_part(Bucket=bucket, Key=KEY, UploadId=upload_id, PartNumber=1, Body=b"abc")

    assert [sorted(name.lower() for name in found) for found in sent] == [
        ["x-amz-checksum-crc32", "x-amz-sdk-checksum-algorithm"]
    ]
    assert client.meta.config.response_checksum_validation == "when_supported"
    store.abort_multipart(KEY, upload_id)


# -- 5. SigV4, always --------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["moto", None], ids=["custom-endpoint", "aws"])
def test_presigned_urls_are_sigv4_where_botocore_would_pick_sigv2(
    aws_env: pytest.MonkeyPatch, moto_s3: MotoS3Server, endpoint: str | None
) -> None:
    # Left to itself, botocore presigns SigV2 in regions that still accept it (us-east-1).
    endpoint_url = moto_s3.endpoint_url if endpoint else None
    store = S3ObjectStore("render-assets", endpoint_url=endpoint_url, region="us-east-1")

    urls = [
        store.presign_put("a.mp4", "video/mp4", 10, 60).upload_url,
        store.presign_part("a.mp4", "upload-1", 1, 10, 60).upload_url,
    ]

    for url in urls:
        query = parse_qs(urlsplit(url).query)
        assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"], url
        assert "Signature" not in query and "AWSAccessKeyId" not in query
