"""Hostile input to the reference backend is refused cleanly, never a 500 or an injection.

Content types that would inject headers or break downloads, signed text forged through
a newline, a non-ASCII signature and deeply nested JSON.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import yaml
from pydantic import BaseModel, ValidationError

from ctrlupload import BackendPresignedStorageProvider, StorageUploadError
from ctrlupload.protocol._contract import (
    CONTENT_TYPE_PATTERN,
    CompletedPart,
    CompleteRequest,
    MultipartCompleteRequest,
    MultipartInitiateRequest,
    PresignRequest,
    check_content_type,
)
from ctrlupload.server import LocalObjectStore, openapi_document
from ctrlupload.server._store import UploadRejected
from tests.conftest import backend_settings
from tests.support.local_backend import TOKEN, LocalBackend, local_backend

KEY = "videos/V-001/S-001/JOB-123/video.mp4"

GOOD_TYPES = [
    "video/mp4",
    "application/vnd.api+json",
    "text/plain; charset=utf-8",
    "text/plain;charset=UTF-8",
    "text/plain ;\tq=1 ; a=b",
    'multipart/form-data; boundary="a b;c=d\\"e"',
    "a/" + "b" * 253,
]
BAD_TYPES = [
    "",
    "text/plain\r\nSet-Cookie: session=stolen",
    "text/plain\nX-Injected: 1",
    "video/mp4\x00",
    "видео/mp4",
    "vidéo/mp4",
    "video",
    "video/",
    "/mp4",
    "video/mp4/x",
    "text /plain",
    "text/plain ",
    " text/plain",
    "text/plain;",
    "text/plain; charset",
    "text/plain; charset=",
    'text/plain; a="unterminated',
    'text/plain; a="é"',
    "text/plain; a=b c",
    "video/mp(4)",
    "a/" + "b" * 254,
]


@pytest.fixture
def backend(tmp_path: Path) -> Any:
    with local_backend(tmp_path / "data") as running:
        yield running


# -- content types --------------------------------------------------------------------------


@pytest.mark.parametrize("value", GOOD_TYPES)
def test_media_types_are_accepted(value: str) -> None:
    assert check_content_type(value) == value


@pytest.mark.parametrize("value", BAD_TYPES)
def test_anything_but_an_ascii_media_type_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="media type") as caught:
        check_content_type(value)
    assert not {"\r", "\n", "\x00"} & set(str(caught.value))


def contract_requests(content_type: str) -> list[tuple[type[BaseModel], dict[str, Any]]]:
    return [
        (
            PresignRequest,
            {"object_key": KEY, "content_type": content_type, "content_length": 1},
        ),
        (
            CompleteRequest,
            {
                "object_key": KEY,
                "etag": '"e"',
                "size_bytes": 1,
                "content_type": content_type,
                "public_url": "https://cdn.example.test/x",
            },
        ),
        (
            MultipartInitiateRequest,
            {"object_key": KEY, "content_type": content_type, "content_length": 1},
        ),
        (
            MultipartCompleteRequest,
            {
                "object_key": KEY,
                "upload_id": "u",
                "parts": [CompletedPart(part_number=1, etag='"e"')],
                "size_bytes": 1,
                "content_type": content_type,
            },
        ),
    ]


@pytest.mark.parametrize("value", ["text/plain\r\nSet-Cookie: a=b", "видео/mp4", "video"])
def test_every_contract_model_with_a_content_type_checks_it(value: str) -> None:
    for model, fields in contract_requests(value):
        with pytest.raises(ValidationError) as caught:
            model(**fields)
        assert [error["loc"] for error in caught.value.errors()] == [("content_type",)], model
        assert model(**{**fields, "content_type": "video/mp4"}).content_type == "video/mp4"  # type: ignore[attr-defined]


def test_the_openapi_pattern_accepts_what_the_contract_accepts() -> None:
    schemas = yaml.safe_load(openapi_document())["components"]["schemas"]
    found = [
        schema["properties"]["content_type"]
        for schema in schemas.values()
        if "content_type" in schema.get("properties", {})
    ]
    # presign, complete, initiate, multipart complete, complete-set's two kinds of object
    assert len(found) == 6
    for schema in found:
        assert schema["pattern"] == CONTENT_TYPE_PATTERN
        pattern = re.compile(schema["pattern"])
        assert schema["maxLength"] == 255
        for value in GOOD_TYPES:
            assert pattern.search(value), value
        for value in BAD_TYPES:
            if len(value) <= 255:
                assert not pattern.search(value), value


def api_calls(backend: LocalBackend, content_type: str) -> dict[str, requests.Response]:
    multipart = "/internal/storage/multipart"
    return {
        "presign": backend.post(
            "/internal/storage/presign-put",
            object_key=KEY,
            content_type=content_type,
            content_length=4,
        ),
        "complete": backend.post(
            "/internal/storage/complete",
            object_key=KEY,
            etag='"e"',
            size_bytes=4,
            content_type=content_type,
            public_url=f"{backend.base_url}/files/{KEY}",
        ),
        "initiate": backend.post(
            f"{multipart}/initiate",
            object_key=KEY,
            content_type=content_type,
            content_length=4,
        ),
        "multipart complete": backend.post(
            f"{multipart}/complete",
            object_key=KEY,
            upload_id="0" * 32,
            parts=[{"part_number": 1, "etag": '"e"'}],
            size_bytes=4,
            content_type=content_type,
        ),
    }


@pytest.mark.parametrize(
    "value", ["text/plain\r\nSet-Cookie: session=stolen", "видео/mp4", "video", "a/" + "b" * 254]
)
def test_the_backend_refuses_a_bad_content_type_wherever_it_enters(
    backend: LocalBackend, value: str
) -> None:
    for call, answer in api_calls(backend, value).items():
        assert answer.status_code == 400, (call, answer.text)
        assert answer.json()["error"] == "bad_request", call
        assert answer.json()["message"].startswith("content_type:"), call
        assert "Set-Cookie" not in answer.text
    assert backend.db.all() == []


def test_a_row_with_an_unsafe_content_type_is_served_with_the_guessed_type(
    backend: LocalBackend,
) -> None:
    assert backend.put(KEY, b"body").status_code == 200
    for unsafe in ["text/plain\r\nSet-Cookie: session=stolen", "видео/mp4"]:
        # Rows written by an older version, which took any content type.
        backend.db.upsert(KEY, '"e"', 4, unsafe, f"{backend.base_url}/files/{KEY}")

        got = backend.get(KEY)

        assert got.status_code == 200
        assert got.headers["Content-Type"] == "video/mp4"
        assert "Set-Cookie" not in got.headers
        assert got.content == b"body"


@pytest.mark.parametrize("value", ["text/plain; charset", "видео/mp4", "video"])
def test_the_client_refuses_a_bad_content_type_before_any_call(value: str) -> None:
    # Nothing listens on port 9: a call would fail as a BackendError, not at validation.
    client = BackendPresignedStorageProvider(backend_settings("http://127.0.0.1:9"))
    with client, pytest.raises(StorageUploadError) as caught:
        client.put_object(b"body", KEY, content_type=value)
    assert caught.value.phase == "validate"
    assert "media type" in caught.value.reason


# -- signatures ------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Any:
    local = LocalObjectStore(tmp_path / "store", "http://127.0.0.1:1")
    yield local
    local.close()


def query_of(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


def test_an_object_url_crafted_with_newlines_is_no_part_url(store: LocalObjectStore) -> None:
    upload_id = store.create_multipart(KEY, "video/mp4", 1024)
    # Object fields (PUT, key, type, length, expiry) that, joined by newlines, spell a
    # part's (PUT, UploadPart, key, upload id, number, length, expiry).
    forged = store.presign_put("UploadPart", f"{KEY}\n{upload_id}\n1", 1024, 600)
    query = query_of(forged.upload_url)

    with pytest.raises(UploadRejected) as caught:
        store.authorize_part(
            upload_id,
            1,
            content_length=1024,
            expires=query["expires"],
            signature=query["signature"],
        )

    assert caught.value.code == "SignatureDoesNotMatch"


def test_signed_fields_cannot_trade_a_newline_between_them(store: LocalObjectStore) -> None:
    signed = store.presign_put("a", "b\nc/d", 4, 600)
    query = query_of(signed.upload_url)
    assert store.authorize("a", content_type="b\nc/d", content_length=4, **query).key == "a"
    with pytest.raises(UploadRejected):
        store.authorize("a\nb", content_type="c/d", content_length=4, **query)


def s3_code(answer: requests.Response) -> str:
    return answer.text.split("<Code>")[1].split("</Code>")[0]


@pytest.mark.parametrize("signature", ["%C3%A9" * 32, "%F0%9F%94%91", "%FF%FE"])
def test_a_non_ascii_signature_is_a_signature_mismatch(
    backend: LocalBackend, signature: str
) -> None:
    signed = backend.post(
        "/internal/storage/presign-put",
        object_key=KEY,
        content_type="video/mp4",
        content_length=4,
    ).json()
    expires = query_of(signed["upload_url"])["expires"]
    url = f"{backend.base_url}/upload/{KEY}?expires={expires}&signature={signature}"

    answer = requests.put(url, data=b"body", headers=signed["headers"], timeout=10)

    assert answer.status_code == 403, answer.text
    assert s3_code(answer) == "SignatureDoesNotMatch"


def test_a_non_ascii_part_signature_is_a_signature_mismatch(backend: LocalBackend) -> None:
    upload_id, _ = backend.upload_parts(KEY, b"part")
    signed = backend.post(
        "/internal/storage/multipart/presign-parts",
        object_key=KEY,
        upload_id=upload_id,
        part_numbers=[1],
    ).json()["parts"][0]
    expires = query_of(signed["upload_url"])["expires"]
    url = f"{backend.base_url}/upload-part/{upload_id}/1?expires={expires}&signature=%C3%A9"

    answer = requests.put(url, data=b"part", timeout=10)

    assert answer.status_code == 403, answer.text
    assert s3_code(answer) == "SignatureDoesNotMatch"


# -- JSON bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"object_key": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    ],
    ids=["arrays", "objects", "inside a field"],
)
def test_deeply_nested_json_is_a_bad_request(backend: LocalBackend, body: bytes) -> None:
    answer = requests.post(
        f"{backend.base_url}/internal/storage/presign-put",
        data=body,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=10,
    )

    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "bad_request"
    assert "nested" in answer.json()["message"]
