"""CRC64NVME and If-None-Match on the S3 side (issue 11): what S3Bucket asks S3 for, and
what moto's server, which the other S3 tests run against, does with it.

Three groups:

* URL tests (no network): the checksum and the condition are signed *as headers*
  (``X-Amz-SignedHeaders``), their values never in the query string.
* Stubber tests (no network): the exact parameters of each call, and how S3's
  answers (412, BadDigest, InvalidRequest, 409) map to our exceptions.
* moto tests: first pins of what moto 5.2 does and does not check (docs/contract.md,
  "What moto checks", says the same; if a moto upgrade starts checking, a pin fails
  and the doc must change), then S3Bucket end to end for what moto does support.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests

from ctrlupload import _checksum
from ctrlupload._s3 import ObjectStoreError, S3Bucket
from ctrlupload.protocol._objects import BadDigest, ObjectExists, StoredPart
from ctrlupload.protocol._parts import multipart_etag
from tests.support.moto_server import (
    FAKE_ACCESS_KEY_ID,
    FAKE_REGION,
    FAKE_SECRET_ACCESS_KEY,
    MotoS3Server,
)

TIMEOUT_S = 10
KEY = "videos/V-001/S-001/JOB-123/video.mp4"
MIB = 1024 * 1024
BODY = b"frame " * 1000
#: S3's answer to a 412, as moto words it too.
PRECONDITION = "At least one of the pre-conditions you specified did not hold"
_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
)


def crc(data: bytes) -> str:
    return _checksum.encode(_checksum.crc64nvme(data))


GOOD = crc(BODY)
WRONG = crc(b"some other bytes")


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


def signed_headers(url: str) -> list[str]:
    return parse_qs(urlsplit(url).query)["X-Amz-SignedHeaders"][0].split(";")


def query_of(url: str) -> str:
    return unquote(urlsplit(url).query).lower()


# -- the URL: signed as headers, never in the query string (no network) ------------------


@pytest.fixture
def offline_bucket(aws_env: pytest.MonkeyPatch) -> S3Bucket:
    """A bucket on a client it builds itself (``when_required``); presigning sends nothing."""
    return S3Bucket("renders", endpoint_url="http://127.0.0.1:9", region=FAKE_REGION)


def test_presign_put_signs_the_checksum_and_the_condition_as_headers(
    offline_bucket: S3Bucket,
) -> None:
    signed = offline_bucket.presign_put(KEY, "video/mp4", len(BODY), 60, checksum=GOOD)
    conditional = offline_bucket.presign_put(
        KEY, "video/mp4", len(BODY), 60, checksum=GOOD, if_none_match=True
    )

    assert signed_headers(signed.upload_url) == [
        "content-length",
        "content-type",
        "host",
        "x-amz-checksum-crc64nvme",
    ]
    assert signed_headers(conditional.upload_url) == [
        "content-length",
        "content-type",
        "host",
        "if-none-match",
        "x-amz-checksum-crc64nvme",
    ]
    assert signed.headers == {
        "Content-Type": "video/mp4",
        "Content-Length": str(len(BODY)),
        "x-amz-checksum-crc64nvme": GOOD,
    }
    assert conditional.headers == {**signed.headers, "If-None-Match": "*"}
    for url in (signed.upload_url, conditional.upload_url):
        query = query_of(url)
        assert GOOD.lower() not in query
        assert "x-amz-checksum-crc64nvme=" not in query
        assert "if-none-match=" not in query
        assert "x-amz-sdk-checksum-algorithm" not in query  # botocore added none of its own


def test_presign_put_without_the_new_arguments_signs_what_it_always_did(
    offline_bucket: S3Bucket,
) -> None:
    signed = offline_bucket.presign_put(KEY, "video/mp4", 10, 60)

    assert signed_headers(signed.upload_url) == ["content-length", "content-type", "host"]
    assert signed.headers == {"Content-Type": "video/mp4", "Content-Length": "10"}
    assert offline_bucket.signs_checksums is True


def test_presign_part_signs_the_parts_own_checksum_as_a_header(offline_bucket: S3Bucket) -> None:
    signed = offline_bucket.presign_part(KEY, "upload-1", 3, len(BODY), 60, checksum=GOOD)
    unsigned_length = offline_bucket.presign_part(KEY, "upload-1", 4, None, 60, checksum=GOOD)

    assert signed_headers(signed.upload_url) == [
        "content-length",
        "host",
        "x-amz-checksum-crc64nvme",
    ]
    assert signed.headers == {"Content-Length": str(len(BODY)), "x-amz-checksum-crc64nvme": GOOD}
    assert signed_headers(unsigned_length.upload_url) == ["host", "x-amz-checksum-crc64nvme"]
    assert unsigned_length.headers == {"x-amz-checksum-crc64nvme": GOOD}
    for url in (signed.upload_url, unsigned_length.upload_url):
        assert GOOD.lower() not in query_of(url)
        assert "x-amz-checksum-crc64nvme=" not in query_of(url)


@pytest.mark.parametrize("bad", ["", "abc", "AAAAAAAAAAAAAAAA", "not base64!!"])
def test_a_malformed_checksum_is_refused_before_signing(offline_bucket: S3Bucket, bad: str) -> None:
    with pytest.raises(ValueError, match="base64 of its eight"):
        offline_bucket.presign_put(KEY, "video/mp4", 10, 60, checksum=bad)
    with pytest.raises(ValueError, match="base64 of its eight"):
        offline_bucket.presign_part(KEY, "upload-1", 1, 10, 60, checksum=bad)


# -- the calls' parameters and S3's answers (botocore's Stubber, no network) ---------------


@pytest.fixture
def stubbed() -> Iterator[tuple[S3Bucket, Any]]:
    import boto3
    from botocore.config import Config
    from botocore.stub import Stubber

    client = boto3.session.Session(
        aws_access_key_id=FAKE_ACCESS_KEY_ID,
        aws_secret_access_key=FAKE_SECRET_ACCESS_KEY,
        region_name=FAKE_REGION,
    ).client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        config=Config(
            signature_version="s3v4",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    with Stubber(client) as stubber:
        yield S3Bucket("renders", client=client), stubber
        stubber.assert_no_pending_responses()


PARTS = [StoredPart(1, '"' + "a" * 32 + '"', 5 * MIB, crc(b"1")), StoredPart(2, '"b"', 7)]
PARTS_MD5 = [StoredPart(1, '"' + "a" * 32 + '"', 5 * MIB), StoredPart(2, '"' + "b" * 32 + '"', 7)]
SIZE = 5 * MIB + 7


def head_answer(**extra: Any) -> dict[str, Any]:
    return {"ContentLength": SIZE, "ETag": '"e-2"', **extra}


def expect_head(stubber: Any, answer: dict[str, Any]) -> None:
    stubber.add_response(
        "head_object", answer, {"Bucket": "renders", "Key": KEY, "ChecksumMode": "ENABLED"}
    )


def test_create_multipart_declares_a_full_object_crc64nvme(stubbed: tuple[S3Bucket, Any]) -> None:
    bucket, stubber = stubbed
    base = {"Bucket": "renders", "Key": KEY, "ContentType": "video/mp4"}
    stubber.add_response(
        "create_multipart_upload",
        {"UploadId": "u1"},
        {**base, "ChecksumAlgorithm": "CRC64NVME", "ChecksumType": "FULL_OBJECT"},
    )
    stubber.add_response("create_multipart_upload", {"UploadId": "u2"}, base)

    assert bucket.create_multipart(KEY, "video/mp4", 5 * MIB, checksum=True) == "u1"
    assert bucket.create_multipart(KEY, "video/mp4", 5 * MIB) == "u2"


def test_list_parts_reads_each_parts_checksum(stubbed: tuple[S3Bucket, Any]) -> None:
    bucket, stubber = stubbed
    stubber.add_response(
        "list_parts",
        {
            "Parts": [
                {"PartNumber": 1, "ETag": '"a"', "Size": 5, "ChecksumCRC64NVME": GOOD},
                {"PartNumber": 2, "ETag": '"b"', "Size": 3},
                {"PartNumber": 3, "ETag": '"c"', "Size": 3, "ChecksumCRC64NVME": "junk"},
            ],
            "IsTruncated": False,
        },
        {"Bucket": "renders", "Key": KEY, "UploadId": "u1", "MaxParts": 1000},
    )

    page = bucket.list_parts(KEY, "u1")

    assert [part.checksum for part in page.parts] == [GOOD, None, None]


@pytest.mark.parametrize(
    ("answer", "checksum"),
    [
        ({"ChecksumCRC64NVME": GOOD, "ChecksumType": "FULL_OBJECT"}, GOOD),
        ({"ChecksumCRC64NVME": GOOD}, GOOD),
        ({"ChecksumCRC64NVME": f"{GOOD}-2"}, None),  # composite: the parts' CRC of CRCs
        ({"ChecksumCRC64NVME": GOOD, "ChecksumType": "COMPOSITE"}, None),
        ({"ChecksumCRC32": "AAAAAA=="}, None),
        ({}, None),
    ],
)
def test_head_asks_for_the_checksum_and_keeps_only_a_full_object_one(
    stubbed: tuple[S3Bucket, Any], answer: dict[str, Any], checksum: str | None
) -> None:
    bucket, stubber = stubbed
    expect_head(stubber, head_answer(**answer))

    stored = bucket.head(KEY)

    assert stored is not None and stored.checksum == checksum


def test_complete_passes_the_checksum_the_condition_and_the_parts_checksums(
    stubbed: tuple[S3Bucket, Any],
) -> None:
    bucket, stubber = stubbed
    stubber.add_response(
        "complete_multipart_upload",
        {"ETag": '"e-2"', "ChecksumCRC64NVME": GOOD, "ChecksumType": "FULL_OBJECT"},
        {
            "Bucket": "renders",
            "Key": KEY,
            "UploadId": "u1",
            "MultipartUpload": {
                "Parts": [
                    {"PartNumber": 1, "ETag": PARTS[0].etag, "ChecksumCRC64NVME": crc(b"1")},
                    {"PartNumber": 2, "ETag": '"b"'},
                ]
            },
            "ChecksumCRC64NVME": GOOD,
            "ChecksumType": "FULL_OBJECT",
            "IfNoneMatch": "*",
        },
    )
    expect_head(stubber, head_answer(ChecksumCRC64NVME=GOOD, ChecksumType="FULL_OBJECT"))

    info = bucket.complete_multipart(KEY, "u1", PARTS, checksum=GOOD, if_none_match=True)

    assert (info.size_bytes, info.etag, info.checksum) == (SIZE, '"e-2"', GOOD)


def test_complete_without_the_new_arguments_sends_what_it_always_did(
    stubbed: tuple[S3Bucket, Any],
) -> None:
    bucket, stubber = stubbed
    listing = [{"PartNumber": p.part_number, "ETag": p.etag} for p in PARTS_MD5]
    stubber.add_response(
        "complete_multipart_upload",
        {"ETag": '"e-2"'},
        {"Bucket": "renders", "Key": KEY, "UploadId": "u1", "MultipartUpload": {"Parts": listing}},
    )
    expect_head(stubber, head_answer())

    info = bucket.complete_multipart(KEY, "u1", PARTS_MD5)

    assert (info.etag, info.checksum) == ('"e-2"', None)


@pytest.mark.parametrize(
    ("status", "code", "message", "raised"),
    [
        (412, "PreconditionFailed", PRECONDITION, ObjectExists),
        (
            400,
            "BadDigest",
            "The CRC64NVME you specified did not match the calculated checksum.",
            BadDigest,
        ),
        (
            400,
            "InvalidRequest",
            "The full object checksum you specified did not match the calculated checksum",
            BadDigest,
        ),
        (
            400,
            "InvalidRequest",
            "Calculated crc64nvme checksum for the object does not match the supplied checksum",
            BadDigest,
        ),
        (400, "InvalidRequest", "Checksum mismatch for part 2", BadDigest),
        # Our request's fault, not the data's: 503 and a log line, not bad_digest.
        (
            400,
            "InvalidRequest",
            "Checksum Type mismatch occurred, expected checksum Type: FULL_OBJECT",
            ObjectStoreError,
        ),
        (
            400,
            "InvalidRequest",
            "The upload was created using a crc64nvme checksum. The complete request must "
            "include the checksum for each part.",
            ObjectStoreError,
        ),
        (
            409,
            "ConditionalRequestConflict",
            "A conflicting conditional action is currently in progress against this resource.",
            ObjectStoreError,
        ),
    ],
)
def test_completes_refusals_map_to_what_they_mean(
    stubbed: tuple[S3Bucket, Any], status: int, code: str, message: str, raised: type[Exception]
) -> None:
    bucket, stubber = stubbed
    stubber.add_client_error(
        "complete_multipart_upload",
        service_error_code=code,
        service_message=message,
        http_status_code=status,
    )

    with pytest.raises(raised) as caught:
        bucket.complete_multipart(KEY, "u1", PARTS, checksum=GOOD, if_none_match=True)

    if isinstance(caught.value, ObjectStoreError):
        # Retryable: the backend answers 503, and the upload is still there.
        assert (caught.value.status_code, caught.value.error_code) == (status, code)
        assert caught.value.kind is None


def test_complete_refuses_an_object_whose_head_shows_another_checksum(
    stubbed: tuple[S3Bucket, Any],
) -> None:
    """A store that does not check (moto) assembles anyway; HEAD tells."""
    bucket, stubber = stubbed
    stubber.add_response("complete_multipart_upload", {"ETag": '"e-2"'})
    expect_head(stubber, head_answer(ChecksumCRC64NVME=WRONG, ChecksumType="FULL_OBJECT"))

    with pytest.raises(
        BadDigest, match=re.escape(f"has CRC64NVME {WRONG}, not the expected {GOOD}")
    ):
        bucket.complete_multipart(KEY, "u1", PARTS, checksum=GOOD)


def test_complete_without_an_etag_is_confirmed_by_heads_checksum(
    stubbed: tuple[S3Bucket, Any],
) -> None:
    bucket, stubber = stubbed
    # PARTS' second ETag is not an MD5: only the checksum can confirm the assembly.
    stubber.add_response("complete_multipart_upload", {"ETag": ""})
    expect_head(stubber, head_answer(ChecksumCRC64NVME=GOOD))
    stubber.add_response("complete_multipart_upload", {"ETag": ""})
    expect_head(stubber, head_answer(ChecksumCRC64NVME=WRONG))
    stubber.add_response("complete_multipart_upload", {"ETag": ""})
    expect_head(stubber, head_answer())  # no checksum: the size alone is not enough

    info = bucket.complete_multipart(KEY, "u1", PARTS, checksum=GOOD)
    assert (info.etag, info.checksum) == ('"e-2"', GOOD)
    with pytest.raises(ObjectStoreError, match=re.escape(f"CRC64NVME {WRONG}, not 5242887 bytes")):
        bucket.complete_multipart(KEY, "u1", PARTS, checksum=GOOD)
    with pytest.raises(ObjectStoreError, match="may not be assembled"):
        bucket.complete_multipart(KEY, "u1", PARTS, checksum=GOOD)


def test_confirm_assembled_accepts_a_matching_checksum_and_never_the_size_alone(
    stubbed: tuple[S3Bucket, Any],
) -> None:
    bucket, stubber = stubbed
    assembled = multipart_etag([p.etag.strip('"') for p in PARTS_MD5])
    expect_head(stubber, head_answer(ChecksumCRC64NVME=GOOD))
    expect_head(stubber, head_answer())
    expect_head(stubber, head_answer(ETag=assembled, ChecksumCRC64NVME=WRONG))
    expect_head(stubber, head_answer(ETag=assembled))

    by_checksum = bucket.confirm_assembled(KEY, PARTS, checksum=GOOD)
    assert by_checksum is not None and by_checksum.checksum == GOOD
    # Same size, no checksum, ETags that are not MD5s: nothing to confirm with.
    assert bucket.confirm_assembled(KEY, PARTS, checksum=GOOD) is None
    # The ETag fits but the checksum says these are other bytes.
    assert bucket.confirm_assembled(KEY, PARTS_MD5, checksum=GOOD) is None
    # No checksum held: the multipart ETag decides, as before.
    by_etag = bucket.confirm_assembled(KEY, PARTS_MD5, checksum=GOOD)
    assert by_etag is not None and by_etag.size_bytes == SIZE
    # Without a checksum and without MD5 ETags there is no HEAD at all.
    assert bucket.confirm_assembled(KEY, PARTS) is None


# -- what moto 5.2 does (pins: docs/contract.md "What moto checks" says the same) ----------


@pytest.fixture
def bucket_name(moto_s3: MotoS3Server) -> str:
    return moto_s3.make_bucket()


def raw_put(client: Any, bucket: str, key: str, body: bytes, **params: Any) -> str:
    """A URL presigned by plain boto3, bound to ``params`` as headers."""
    url: str = client.generate_presigned_url(
        "put_object",
        Params={"Bucket": bucket, "Key": key, "ContentLength": len(body), **params},
        ExpiresIn=60,
        HttpMethod="PUT",
    )
    return url


def head_checksums(client: Any, bucket: str, key: str) -> dict[str, Any]:
    answer = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    return {name: value for name, value in answer.items() if name.startswith("Checksum")}


def test_moto_stores_a_presigned_put_whose_signed_checksum_is_wrong(
    moto_s3: MotoS3Server, bucket_name: str
) -> None:
    """S3 answers 400 BadDigest and stores nothing; moto stores the body."""
    client = moto_s3.client()
    url = raw_put(client, bucket_name, KEY, BODY, ChecksumCRC64NVME=WRONG)
    assert "x-amz-checksum-crc64nvme" in signed_headers(url)

    answer = requests.put(url, data=BODY, headers={_checksum.HEADER: WRONG}, timeout=TIMEOUT_S)

    assert answer.status_code == 200, answer.text
    assert client.get_object(Bucket=bucket_name, Key=KEY)["Body"].read() == BODY


def test_moto_neither_echoes_nor_keeps_a_presigned_puts_checksum(
    moto_s3: MotoS3Server, bucket_name: str
) -> None:
    """S3 echoes x-amz-checksum-crc64nvme and HEAD (ChecksumMode) shows it; moto keeps a
    checksum only when the request also names x-amz-sdk-checksum-algorithm."""
    client = moto_s3.client()
    url = raw_put(client, bucket_name, KEY, BODY, ChecksumCRC64NVME=GOOD)

    answer = requests.put(url, data=BODY, headers={_checksum.HEADER: GOOD}, timeout=TIMEOUT_S)
    left_out = requests.put(
        raw_put(client, bucket_name, "left-out", BODY, ChecksumCRC64NVME=GOOD),
        data=BODY,
        timeout=TIMEOUT_S,
    )

    assert answer.status_code == 200, answer.text
    assert _checksum.HEADER not in answer.headers
    assert head_checksums(client, bucket_name, KEY) == {}
    # A signed header left out: S3 says 403 SignatureDoesNotMatch; moto checks no signature.
    assert left_out.status_code == 200, left_out.text


def test_moto_refuses_if_none_match_on_a_key_that_is_taken(
    moto_s3: MotoS3Server, bucket_name: str
) -> None:
    client = moto_s3.client()
    fresh = requests.put(
        raw_put(client, bucket_name, KEY, BODY, IfNoneMatch="*"),
        data=BODY,
        headers={"If-None-Match": "*"},
        timeout=TIMEOUT_S,
    )
    again = requests.put(
        raw_put(client, bucket_name, KEY, b"x" * len(BODY), IfNoneMatch="*"),
        data=b"x" * len(BODY),
        headers={"If-None-Match": "*"},
        timeout=TIMEOUT_S,
    )

    assert fresh.status_code == 200, fresh.text
    assert again.status_code == 412
    assert "<Code>PreconditionFailed</Code>" in again.text
    assert PRECONDITION in again.text
    assert client.get_object(Bucket=bucket_name, Key=KEY)["Body"].read() == BODY


def moto_part(client: Any, bucket: str, upload_id: str, number: int, body: bytes, sent: str) -> Any:
    url = client.generate_presigned_url(
        "upload_part",
        Params={
            "Bucket": bucket,
            "Key": KEY,
            "UploadId": upload_id,
            "PartNumber": number,
            "ContentLength": len(body),
            "ChecksumCRC64NVME": sent,
        },
        ExpiresIn=60,
        HttpMethod="PUT",
    )
    return requests.put(url, data=body, headers={_checksum.HEADER: sent}, timeout=TIMEOUT_S)


def test_moto_checks_no_part_checksum_and_lists_none(
    moto_s3: MotoS3Server, bucket_name: str
) -> None:
    client = moto_s3.client()
    created = client.create_multipart_upload(
        Bucket=bucket_name,
        Key=KEY,
        ContentType="video/mp4",
        ChecksumAlgorithm="CRC64NVME",
        ChecksumType="FULL_OBJECT",
    )
    upload_id = created["UploadId"]

    answer = moto_part(client, bucket_name, upload_id, 1, BODY, WRONG)
    listed = client.list_parts(Bucket=bucket_name, Key=KEY, UploadId=upload_id)["Parts"]

    # It does echo the declaration at create.
    assert (created["ChecksumAlgorithm"], created["ChecksumType"]) == ("CRC64NVME", "FULL_OBJECT")
    assert answer.status_code == 200, answer.text  # S3: 400 BadDigest
    assert _checksum.HEADER not in answer.headers
    assert [(p["PartNumber"], p.get("ChecksumCRC64NVME")) for p in listed] == [(1, None)]
    client.abort_multipart_upload(Bucket=bucket_name, Key=KEY, UploadId=upload_id)


def moto_upload(client: Any, bucket: str) -> tuple[str, list[dict[str, Any]], bytes]:
    upload_id = client.create_multipart_upload(
        Bucket=bucket,
        Key=KEY,
        ContentType="video/mp4",
        ChecksumAlgorithm="CRC64NVME",
        ChecksumType="FULL_OBJECT",
    )["UploadId"]
    first, second = os.urandom(5 * MIB), os.urandom(100)
    parts = []
    for number, body in enumerate((first, second), start=1):
        answer = moto_part(client, bucket, upload_id, number, body, crc(body))
        assert answer.status_code == 200, answer.text
        parts.append({"PartNumber": number, "ETag": answer.headers["ETag"]})
    return upload_id, parts, first + second


def test_moto_assembles_parts_that_do_not_add_up_and_heads_its_own_checksum(
    moto_s3: MotoS3Server, bucket_name: str
) -> None:
    """S3 refuses the completion (BadDigest); moto assembles and computes the CRC itself."""
    client = moto_s3.client()
    upload_id, parts, data = moto_upload(client, bucket_name)

    client.complete_multipart_upload(
        Bucket=bucket_name,
        Key=KEY,
        UploadId=upload_id,
        MultipartUpload={"Parts": parts},
        ChecksumCRC64NVME=WRONG,
        ChecksumType="FULL_OBJECT",
    )

    assert head_checksums(client, bucket_name, KEY) == {
        "ChecksumCRC64NVME": crc(data),
        "ChecksumType": "FULL_OBJECT",
    }


def test_moto_refuses_if_none_match_at_complete_when_the_key_is_taken(
    moto_s3: MotoS3Server, bucket_name: str
) -> None:
    from botocore.exceptions import ClientError

    client = moto_s3.client()
    client.put_object(Bucket=bucket_name, Key=KEY, Body=b"older")
    upload_id, parts, data = moto_upload(client, bucket_name)

    with pytest.raises(ClientError) as caught:
        client.complete_multipart_upload(
            Bucket=bucket_name,
            Key=KEY,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
            ChecksumCRC64NVME=crc(data),
            ChecksumType="FULL_OBJECT",
            IfNoneMatch="*",
        )

    error = caught.value.response
    assert (error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Code"]) == (
        412,
        "PreconditionFailed",
    )
    assert client.get_object(Bucket=bucket_name, Key=KEY)["Body"].read() == b"older"
    # The upload stays, as on S3.
    assert len(client.list_parts(Bucket=bucket_name, Key=KEY, UploadId=upload_id)["Parts"]) == 2
    client.abort_multipart_upload(Bucket=bucket_name, Key=KEY, UploadId=upload_id)


# -- S3Bucket against moto, for what moto supports -------------------------------------------


@pytest.fixture
def moto_bucket(aws_env: pytest.MonkeyPatch, moto_s3: MotoS3Server) -> Iterator[S3Bucket]:
    bucket = S3Bucket(moto_s3.make_bucket(), endpoint_url=moto_s3.endpoint_url, region=FAKE_REGION)
    yield bucket
    bucket.close()


def put(signed: Any, body: bytes) -> requests.Response:
    return requests.put(signed.upload_url, data=body, headers=signed.headers, timeout=TIMEOUT_S)


def test_a_signed_put_with_if_none_match_stores_once_and_then_is_refused(
    moto_bucket: S3Bucket,
) -> None:
    first = put(
        moto_bucket.presign_put(KEY, "video/mp4", len(BODY), 60, checksum=GOOD, if_none_match=True),
        BODY,
    )
    other = b"y" * len(BODY)
    second = put(
        moto_bucket.presign_put(
            KEY, "video/mp4", len(other), 60, checksum=crc(other), if_none_match=True
        ),
        other,
    )

    assert first.status_code == 200, first.text
    assert second.status_code == 412 and "PreconditionFailed" in second.text
    stored = moto_bucket.head(KEY)
    assert stored is not None and stored.etag == first.headers["ETag"]
    assert stored.checksum is None  # moto keeps no checksum of a presigned PUT


def bucket_upload(bucket: S3Bucket) -> tuple[str, list[StoredPart], bytes]:
    upload_id = bucket.create_multipart(KEY, "video/mp4", 5 * MIB, checksum=True)
    parts, data = [], b""
    for number, size in enumerate((5 * MIB, 1234), start=1):
        body = os.urandom(size)
        answer = put(
            bucket.presign_part(KEY, upload_id, number, size, 60, checksum=crc(body)), body
        )
        assert answer.status_code == 200, answer.text
        data += body
    parts = list(bucket.list_parts(KEY, upload_id).parts)
    return upload_id, parts, data


def test_a_full_object_upload_completes_with_its_checksum(moto_bucket: S3Bucket) -> None:
    upload_id, parts, data = bucket_upload(moto_bucket)
    assert [part.checksum for part in parts] == [None, None]  # moto lists none

    info = moto_bucket.complete_multipart(KEY, upload_id, parts, checksum=crc(data))

    assert (info.size_bytes, info.checksum) == (len(data), crc(data))
    stored = moto_bucket.head(KEY)
    assert stored is not None and stored.checksum == crc(data)
    confirmed = moto_bucket.confirm_assembled(KEY, parts, checksum=crc(data))
    assert confirmed is not None and confirmed.checksum == crc(data)
    assert moto_bucket.confirm_assembled(KEY, parts, checksum=WRONG) is None


def test_parts_that_do_not_add_up_are_bad_digest_even_on_moto(moto_bucket: S3Bucket) -> None:
    """moto assembles them (see the pin above); HEAD's checksum gives it away."""
    upload_id, parts, data = bucket_upload(moto_bucket)

    with pytest.raises(
        BadDigest, match=re.escape(f"has CRC64NVME {crc(data)}, not the expected {WRONG}")
    ):
        moto_bucket.complete_multipart(KEY, upload_id, parts, checksum=WRONG)


def test_if_none_match_at_complete_is_object_exists_and_the_upload_stays(
    moto_bucket: S3Bucket,
) -> None:
    assert put(moto_bucket.presign_put(KEY, "video/mp4", 5, 60), b"older").status_code == 200
    upload_id, parts, data = bucket_upload(moto_bucket)

    with pytest.raises(ObjectExists):
        moto_bucket.complete_multipart(
            KEY, upload_id, parts, checksum=crc(data), if_none_match=True
        )

    stored = moto_bucket.head(KEY)
    assert stored is not None and stored.size_bytes == 5
    assert len(moto_bucket.list_parts(KEY, upload_id).parts) == 2
    moto_bucket.abort_multipart(KEY, upload_id)


def test_head_without_kms_decrypt_still_answers_size_and_etag(
    stubbed: tuple[S3Bucket, Any],
) -> None:
    # An SSE-KMS object's checksum needs kms:Decrypt; HEAD without ChecksumMode does not.
    bucket, stubber = stubbed
    stubber.add_client_error(
        "head_object",
        service_error_code="403",
        http_status_code=403,
        expected_params={"Bucket": "renders", "Key": KEY, "ChecksumMode": "ENABLED"},
    )
    stubber.add_response("head_object", head_answer(), {"Bucket": "renders", "Key": KEY})

    stored = bucket.head(KEY)

    assert stored is not None and (stored.size_bytes, stored.checksum) == (SIZE, None)


def test_head_forbidden_both_ways_is_an_error(stubbed: tuple[S3Bucket, Any]) -> None:
    bucket, stubber = stubbed
    for params in ({"ChecksumMode": "ENABLED"}, {}):
        stubber.add_client_error(
            "head_object",
            service_error_code="403",
            http_status_code=403,
            expected_params={"Bucket": "renders", "Key": KEY, **params},
        )
    with pytest.raises(ObjectStoreError):
        bucket.head(KEY)
