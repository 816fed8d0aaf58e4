"""The reference backend's multipart extension, on the wire, for both stores.

Local store: initiate -> presign parts -> PUT them with ``requests`` -> list -> complete,
every S3-like rejection of ``PUT /upload-part/...``, complete's checks (nothing is
assembled when they fail), abort, idempotent completion, and a server restart between
parts. S3 store: the same round trip against moto, list paging, abort, a refused part
list, and CompleteMultipartUpload answering 200 with an error inside (via a proxy).

The client side (the provider's multipart upload) is tested elsewhere; here requests
are made by hand so each answer can be checked exactly.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from ctrlupload import _checksum
from ctrlupload.protocol import DEFAULT_PART_BYTES, MAX_PARTS, MIB, multipart_etag
from ctrlupload.server import (
    AssetDB,
    LocalObjectStore,
    ReferenceBackend,
    ReferenceServer,
    ServerConfig,
    StoredPart,
    WSGIServer,
)
from ctrlupload.server._store import ObjectStore, page_parts
from tests.support.local_backend import md5_hex

TOKEN = "multipart-token-0123456789"
KEY = "videos/V-001/S-001/JOB-123/video.mp4"
TIMEOUT_S = 10
PREFIX = "/internal/storage/multipart"
#: A small minimum part size for local-store tests that need not move megabytes.
SMALL_PART = 64 * 1024


def s3_code(response: requests.Response) -> str:
    return response.text.split("<Code>")[1].split("</Code>")[0]


@dataclass
class Api:
    """The multipart endpoints of one running backend, called with ``requests``."""

    base_url: str
    token: str = TOKEN
    #: The part_size initiate asks for unless told otherwise (None: the backend's default).
    part_size: int | None = None

    def post(self, name: str, **payload: Any) -> requests.Response:
        return requests.post(
            f"{self.base_url}{PREFIX}/{name}",
            json=payload,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=TIMEOUT_S,
        )

    def initiate(self, key: str, length: int, **extra: Any) -> dict[str, Any]:
        if self.part_size is not None:
            extra.setdefault("part_size", self.part_size)
        answer = self.post(
            "initiate",
            object_key=key,
            content_type=extra.pop("content_type", "video/mp4"),
            content_length=length,
            **extra,
        )
        assert answer.status_code == 200, answer.text
        payload: dict[str, Any] = answer.json()
        return payload

    def presign(self, key: str, upload_id: str, numbers: list[int]) -> list[dict[str, Any]]:
        answer = self.post(
            "presign-parts", object_key=key, upload_id=upload_id, part_numbers=numbers
        )
        assert answer.status_code == 200, answer.text
        parts: list[dict[str, Any]] = answer.json()["parts"]
        return parts

    def list_page(self, key: str, upload_id: str, marker: int | None = None) -> dict[str, Any]:
        extra = {} if marker is None else {"part_number_marker": marker}
        answer = self.post("list-parts", object_key=key, upload_id=upload_id, **extra)
        assert answer.status_code == 200, answer.text
        payload: dict[str, Any] = answer.json()
        return payload

    def complete(
        self,
        key: str,
        upload_id: str,
        parts: list[tuple[int, str]],
        size: int,
        content_type: str = "video/mp4",
    ) -> requests.Response:
        return self.post(
            "complete",
            object_key=key,
            upload_id=upload_id,
            parts=[{"part_number": number, "etag": etag} for number, etag in parts],
            size_bytes=size,
            content_type=content_type,
        )

    def abort(self, key: str, upload_id: str) -> requests.Response:
        return self.post("abort", object_key=key, upload_id=upload_id)

    def upload(
        self, key: str, data: bytes, numbers: list[int] | None = None, **initiate: Any
    ) -> tuple[str, int, list[tuple[int, str]]]:
        """Initiate and PUT the given parts (all by default); upload id, part size, ETags."""
        started = self.initiate(key, len(data), **initiate)
        upload_id, part_size = started["upload_id"], started["part_size"]
        count = max(1, -(-len(data) // part_size))
        etags = []
        for signed in self.presign(key, upload_id, numbers or list(range(1, count + 1))):
            number = signed["part_number"]
            body = data[(number - 1) * part_size : number * part_size]
            answer = put_part(signed, body)
            assert answer.status_code == 200, answer.text
            assert answer.headers["ETag"] == f'"{md5_hex(body)}"'
            etags.append((number, answer.headers["ETag"]))
        return upload_id, part_size, etags


def put_part(signed: dict[str, Any], body: bytes, **headers: str) -> requests.Response:
    return requests.put(
        signed["upload_url"], data=body, headers={**signed["headers"], **headers}, timeout=TIMEOUT_S
    )


def expected_etag(data: bytes, part_size: int) -> str:
    chunks = [data[at : at + part_size] for at in range(0, len(data), part_size)] or [b""]
    return multipart_etag([md5_hex(chunk) for chunk in chunks])


# -- the local store -----------------------------------------------------------------------


@dataclass
class Local:
    """A running reference backend on a local store."""

    api: Api
    store: LocalObjectStore
    db: AssetDB
    data_dir: Path

    def upload_dirs(self) -> list[Path]:
        folder = self.store.multipart_dir
        return sorted(folder.iterdir()) if folder.exists() else []

    def loose_staging_files(self) -> list[Path]:
        return sorted(self.store.staging_dir.glob("*.part"))


class Clock:
    """A settable clock for the local store."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


MakeLocal = Callable[..., Local]


@pytest.fixture
def make_local(tmp_path: Path) -> Iterator[MakeLocal]:
    running: list[tuple[WSGIServer, AssetDB]] = []

    def make(*, clock: Callable[[], float] | None = None, **options: Any) -> Local:
        server = WSGIServer(None, "127.0.0.1", 0).start()
        base_url = f"http://127.0.0.1:{server.port}"
        data_dir = tmp_path / f"data{len(running)}"
        store = LocalObjectStore(data_dir, base_url, **({"clock": clock} if clock else {}))
        db = AssetDB(data_dir / "assets.sqlite3")
        server.set_app(ReferenceBackend(token=TOKEN, store=store, db=db, **options))
        running.append((server, db))
        return Local(Api(base_url), store, db, data_dir)

    yield make
    for server, db in running:
        server.stop()
        db.close()


@pytest.fixture
def local(make_local: MakeLocal) -> Local:
    backend = make_local(min_part_bytes=SMALL_PART)
    backend.api.part_size = SMALL_PART
    return backend


def test_four_part_upload_round_trips_with_the_multipart_etag_and_is_recorded(
    make_local: MakeLocal,
) -> None:
    backend = make_local()  # S3's 5 MiB minimum
    data = os.urandom(3 * 5 * MIB + 12_345)
    api = backend.api

    upload_id, part_size, etags = api.upload(KEY, data, part_size=5 * MIB)
    assert part_size == 5 * MIB
    assert [number for number, _ in etags] == [1, 2, 3, 4]

    listing = api.list_page(KEY, upload_id)
    assert listing["is_truncated"] is False
    assert listing["next_part_number_marker"] is None
    assert [(p["part_number"], p["etag"], p["size_bytes"]) for p in listing["parts"]] == [
        (1, etags[0][1], 5 * MIB),
        (2, etags[1][1], 5 * MIB),
        (3, etags[2][1], 5 * MIB),
        (4, etags[3][1], 12_345),
    ]

    answer = api.complete(KEY, upload_id, etags, len(data))

    assert answer.status_code == 200, answer.text
    etag = expected_etag(data, part_size)
    assert re.fullmatch(r'"[0-9a-f]{32}-4"', etag)
    assert answer.json() == {
        "public_url": f"{api.base_url}/files/{KEY}",
        "etag": etag,
        "checksum": _checksum.encode(_checksum.crc64nvme(data)),
    }
    download = requests.get(answer.json()["public_url"], timeout=TIMEOUT_S)
    assert download.content == data
    assert download.headers["ETag"] == etag
    assert download.headers["Content-Type"] == "video/mp4"
    row = backend.db.get(KEY)
    assert row is not None
    assert (row.etag, row.size_bytes, row.content_type, row.public_url) == (
        etag,
        len(data),
        "video/mp4",
        answer.json()["public_url"],
    )
    upload = backend.db.get_upload(upload_id)
    assert upload is not None and upload.completed_etag == etag
    assert backend.upload_dirs() == []  # the parts are gone
    assert backend.loose_staging_files() == []


def test_initiate_answers_the_part_size_it_will_sign_for(make_local: MakeLocal) -> None:
    api = make_local(max_object_bytes=2 * 1024**4).api

    assert api.initiate(KEY, 100 * MIB)["part_size"] == DEFAULT_PART_BYTES
    assert api.initiate(KEY, 100 * MIB, part_size=1)["part_size"] == 5 * MIB  # S3's minimum
    assert api.initiate(KEY, 100 * MIB, part_size=32 * MIB)["part_size"] == 32 * MIB
    huge = 1024**4  # 1 TiB needs bigger parts to fit in 10,000
    grown = api.initiate(KEY, huge)["part_size"]
    assert -(-huge // grown) <= MAX_PARTS
    too_big = api.post(
        "initiate", object_key=KEY, content_type="video/mp4", content_length=2 * 1024**4 + 1
    )
    assert too_big.status_code == 400
    assert "exceeds this backend's maximum" in too_big.json()["message"]


def test_initiate_records_the_upload_in_the_registry(local: Local) -> None:
    started = local.api.initiate(KEY, 3 * SMALL_PART + 1, content_type="video/quicktime")
    row = local.db.get_upload(started["upload_id"])
    assert row is not None
    assert (row.object_key, row.content_type, row.content_length, row.part_size) == (
        KEY,
        "video/quicktime",
        3 * SMALL_PART + 1,
        SMALL_PART,
    )
    assert row.completed_etag is None
    assert started["expires_sec"] == 600


def test_zero_byte_object_is_one_empty_part(local: Local) -> None:
    upload_id, _, etags = local.api.upload("a/empty.srt", b"")
    assert etags == [(1, f'"{md5_hex(b"")}"')]

    answer = local.api.complete("a/empty.srt", upload_id, etags, 0, "application/x-subrip")

    assert answer.status_code == 200, answer.text
    assert answer.json()["etag"] == multipart_etag([md5_hex(b"")])
    assert requests.get(answer.json()["public_url"], timeout=TIMEOUT_S).content == b""


def test_each_part_url_is_bound_to_its_exact_length(local: Local) -> None:
    data = os.urandom(2 * SMALL_PART + 10)
    upload_id = local.api.initiate(KEY, len(data))["upload_id"]
    first, last = local.api.presign(KEY, upload_id, [1, 3])

    assert put_part(first, data[: SMALL_PART - 1]).status_code == 403
    too_long = put_part(last, data[-11:])
    assert too_long.status_code == 403
    assert s3_code(too_long) == "SignatureDoesNotMatch"
    assert put_part(last, data[-10:]).status_code == 200
    assert [p["part_number"] for p in local.api.list_page(KEY, upload_id)["parts"]] == [3]


def test_presign_refuses_part_numbers_outside_the_upload(local: Local) -> None:
    upload_id = local.api.initiate(KEY, 2 * SMALL_PART)["upload_id"]
    for numbers in ([0], [3], [1, 2, 3]):
        answer = local.api.post(
            "presign-parts", object_key=KEY, upload_id=upload_id, part_numbers=numbers
        )
        assert answer.status_code == 400
        assert answer.json()["error"] == "bad_request"
        assert "outside 1..2" in answer.json()["message"]


def test_unknown_upload_or_another_keys_upload_is_404_no_such_upload(local: Local) -> None:
    upload_id = local.api.initiate(KEY, 10)["upload_id"]
    for key, uid in ((KEY, "0" * 32), ("videos/other.mp4", upload_id), (KEY, "../../etc")):
        for name, extra in (
            ("presign-parts", {"part_numbers": [1]}),
            ("list-parts", {}),
            (
                "complete",
                {
                    "parts": [{"part_number": 1, "etag": '"x"'}],
                    "size_bytes": 10,
                    "content_type": "video/mp4",
                },
            ),
        ):
            answer = local.api.post(name, object_key=key, upload_id=uid, **extra)
            assert answer.status_code == 404, (name, answer.text)
            assert answer.json()["error"] == "no_such_upload"


def test_reuploading_a_part_replaces_it(local: Local) -> None:
    upload_id = local.api.initiate(KEY, SMALL_PART)["upload_id"]
    (signed,) = local.api.presign(KEY, upload_id, [1])
    put_part(signed, b"a" * SMALL_PART)
    second = os.urandom(SMALL_PART)
    assert put_part(signed, second).headers["ETag"] == f'"{md5_hex(second)}"'
    (listed,) = local.api.list_page(KEY, upload_id)["parts"]
    assert listed["etag"] == f'"{md5_hex(second)}"'


def test_part_content_type_is_not_signed(local: Local) -> None:
    upload_id = local.api.initiate(KEY, 4)["upload_id"]
    (signed,) = local.api.presign(KEY, upload_id, [1])
    assert put_part(signed, b"data", **{"Content-Type": "application/x-anything"}).ok


# -- S3-like rejections of PUT /upload-part/ -----------------------------------------------


@pytest.fixture
def one_part(local: Local) -> tuple[Local, str, dict[str, Any]]:
    upload_id = local.api.initiate(KEY, 4)["upload_id"]
    (signed,) = local.api.presign(KEY, upload_id, [1])
    return local, upload_id, signed


def assert_no_parts(backend: Local, upload_id: str) -> None:
    assert backend.api.list_page(KEY, upload_id)["parts"] == []
    assert backend.loose_staging_files() == []


def test_expired_part_url_is_refused_with_request_has_expired(make_local: MakeLocal) -> None:
    clock = Clock()
    backend = make_local(clock=clock, min_part_bytes=SMALL_PART)
    backend.api.part_size = SMALL_PART
    upload_id = backend.api.initiate(KEY, 4)["upload_id"]
    (signed,) = backend.api.presign(KEY, upload_id, [1])
    clock.now += 601
    answer = put_part(signed, b"data")
    assert answer.status_code == 403
    assert s3_code(answer) == "AccessDenied"
    assert "Request has expired" in answer.text
    assert_no_parts(backend, upload_id)


def test_tampered_part_signature_is_refused(one_part: tuple[Local, str, dict[str, Any]]) -> None:
    backend, upload_id, signed = one_part
    tampered = {**signed, "upload_url": signed["upload_url"][:-4] + "0000"}
    answer = put_part(tampered, b"data")
    assert answer.status_code == 403
    assert s3_code(answer) == "SignatureDoesNotMatch"
    assert_no_parts(backend, upload_id)


def test_url_for_one_part_used_for_another_is_refused(local: Local) -> None:
    upload_id = local.api.initiate(KEY, 2 * SMALL_PART)["upload_id"]
    (signed,) = local.api.presign(KEY, upload_id, [1])
    moved = {
        **signed,
        "upload_url": signed["upload_url"].replace(f"/{upload_id}/1?", f"/{upload_id}/2?"),
    }
    answer = put_part(moved, os.urandom(SMALL_PART))
    assert answer.status_code == 403
    assert s3_code(answer) == "SignatureDoesNotMatch"
    assert_no_parts(local, upload_id)


def test_url_for_one_upload_used_for_another_is_refused(local: Local) -> None:
    first = local.api.initiate(KEY, 4)["upload_id"]
    second = local.api.initiate(KEY, 4)["upload_id"]
    (signed,) = local.api.presign(KEY, first, [1])
    moved = {**signed, "upload_url": signed["upload_url"].replace(first, second)}
    answer = put_part(moved, b"data")
    assert answer.status_code == 403
    assert s3_code(answer) == "SignatureDoesNotMatch"
    assert_no_parts(local, second)


def test_unsigned_part_put_is_refused(one_part: tuple[Local, str, dict[str, Any]]) -> None:
    _, _, signed = one_part
    bare = {**signed, "upload_url": signed["upload_url"].split("?")[0]}
    answer = put_part(bare, b"data")
    assert answer.status_code == 403
    assert s3_code(answer) == "AccessDenied"


def test_chunked_part_is_refused_with_501(one_part: tuple[Local, str, dict[str, Any]]) -> None:
    backend, upload_id, signed = one_part
    answer = requests.put(
        signed["upload_url"], data=iter([b"da", b"ta"]), headers=signed["headers"], timeout=5
    )
    assert answer.status_code == 501
    assert s3_code(answer) == "NotImplemented"
    assert_no_parts(backend, upload_id)


def raw_put(url: str, head_lines: list[str], body: bytes = b"") -> bytes:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as conn:
        head = [f"PUT {parts.path}?{parts.query} HTTP/1.1", "Host: x", *head_lines, "", ""]
        conn.sendall("\r\n".join(head).encode() + body)
        conn.shutdown(socket.SHUT_WR)  # whatever the head announced, nothing more comes
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    return reply


def test_part_without_content_length_is_refused_with_411(
    one_part: tuple[Local, str, dict[str, Any]],
) -> None:
    _, _, signed = one_part
    reply = raw_put(signed["upload_url"], ["Connection: close"])
    assert reply.startswith(b"HTTP/1.1 411")
    assert b"MissingContentLength" in reply


def test_short_part_body_stores_nothing(one_part: tuple[Local, str, dict[str, Any]]) -> None:
    backend, upload_id, signed = one_part
    reply = raw_put(signed["upload_url"], ["Content-Length: 4", "Connection: close"], b"da")
    assert b" 200 " not in reply.split(b"\r\n")[0]
    for _ in range(50):  # the server notices the hang-up after it answered
        if not backend.loose_staging_files():
            break
        requests.get(f"{backend.api.base_url}/healthz", timeout=5)
    assert_no_parts(backend, upload_id)


@pytest.mark.parametrize("suffix", ["/0", "/10001", "/abc", "/1/2", ""])
def test_part_put_to_a_malformed_path_is_refused(
    one_part: tuple[Local, str, dict[str, Any]], suffix: str
) -> None:
    backend, upload_id, signed = one_part
    query = urlsplit(signed["upload_url"]).query
    url = f"{backend.api.base_url}/upload-part/{upload_id}{suffix}?{query}"
    answer = requests.put(url, data=b"data", timeout=5)
    assert answer.status_code == 400
    assert s3_code(answer) == "InvalidArgument"


def test_part_put_to_an_unknown_or_aborted_upload_is_404_no_such_upload(
    one_part: tuple[Local, str, dict[str, Any]],
) -> None:
    backend, upload_id, signed = one_part
    assert backend.api.abort(KEY, upload_id).status_code == 200
    answer = put_part(signed, b"data")
    assert answer.status_code == 404
    assert s3_code(answer) == "NoSuchUpload"
    other = signed["upload_url"].replace(upload_id, "f" * 32)
    assert requests.put(other, data=b"data", timeout=5).status_code == 404


def test_part_endpoint_takes_put_only(one_part: tuple[Local, str, dict[str, Any]]) -> None:
    _, _, signed = one_part
    answer = requests.get(signed["upload_url"], timeout=5)
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "PUT"


# -- complete's checks ---------------------------------------------------------------------


@pytest.fixture
def three_parts(local: Local) -> tuple[Local, bytes, str, list[tuple[int, str]]]:
    data = os.urandom(2 * SMALL_PART + 100)
    upload_id, _, etags = local.api.upload(KEY, data)
    return local, data, upload_id, etags


def assert_nothing_assembled(backend: Local, upload_id: str, parts: int = 3) -> None:
    assert backend.store.head(KEY) is None
    assert backend.db.get(KEY) is None
    assert len(backend.api.list_page(KEY, upload_id)["parts"]) == parts  # still resumable


def complete_refused(answer: requests.Response, fragment: str) -> None:
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_part"
    assert fragment in answer.json()["message"]


def test_complete_with_a_wrong_etag_is_refused_and_assembles_nothing(
    three_parts: tuple[Local, bytes, str, list[tuple[int, str]]],
) -> None:
    backend, data, upload_id, etags = three_parts
    wrong = [etags[0], (2, '"' + "0" * 32 + '"'), etags[2]]
    complete_refused(backend.api.complete(KEY, upload_id, wrong, len(data)), "part 2 has ETag")
    assert_nothing_assembled(backend, upload_id)
    # Quotes and case do not matter; the right list still completes afterwards.
    loose = [(number, etag.strip('"').upper()) for number, etag in etags]
    assert backend.api.complete(KEY, upload_id, loose, len(data)).status_code == 200


@pytest.mark.parametrize("order", [[2, 1, 3], [1, 1, 2, 3], [1, 3, 2]])
def test_complete_with_parts_out_of_order_is_refused(
    three_parts: tuple[Local, bytes, str, list[tuple[int, str]]], order: list[int]
) -> None:
    backend, data, upload_id, etags = three_parts
    listed = [etags[number - 1] for number in order]
    complete_refused(backend.api.complete(KEY, upload_id, listed, len(data)), "ascending order")
    assert_nothing_assembled(backend, upload_id)


def test_complete_with_a_missing_part_or_wrong_size_is_refused(
    three_parts: tuple[Local, bytes, str, list[tuple[int, str]]],
) -> None:
    backend, data, upload_id, etags = three_parts
    complete_refused(backend.api.complete(KEY, upload_id, etags[:2], len(data)), "the parts hold")
    complete_refused(
        backend.api.complete(KEY, upload_id, etags, len(data) - 1), "given at initiate"
    )
    skipped = [etags[0], etags[1], (4, etags[2][1])]
    complete_refused(backend.api.complete(KEY, upload_id, skipped, len(data)), "part 4 was not")
    assert_nothing_assembled(backend, upload_id)


def test_complete_with_a_too_small_middle_part_is_refused(local: Local) -> None:
    data = os.urandom(2 * SMALL_PART + 10)
    upload_id, _, etags = local.api.upload(KEY, data, numbers=[1, 3])
    # A part of the wrong size, as a misbehaving signer could have let through.
    signed = local.store.presign_part(KEY, upload_id, 2, 100, 600)
    small = os.urandom(100)
    assert requests.put(signed.upload_url, data=small, timeout=5).ok
    listed = [etags[0], (2, f'"{md5_hex(small)}"'), etags[1]]
    answer = local.api.complete(KEY, upload_id, listed, len(data))
    complete_refused(answer, "part 2 holds 100 bytes; every part but the last must hold at least")
    assert_nothing_assembled(local, upload_id)


def test_repeated_complete_answers_the_same_success(
    three_parts: tuple[Local, bytes, str, list[tuple[int, str]]],
) -> None:
    backend, data, upload_id, etags = three_parts
    first = backend.api.complete(KEY, upload_id, etags, len(data))
    again = backend.api.complete(KEY, upload_id, etags, len(data))
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    other = backend.api.complete(KEY, upload_id, [etags[0]], len(data))
    assert other.status_code == 404
    assert "already completed with other parts" in other.json()["message"]
    # A completed upload takes no more parts and lists none.
    assert backend.api.post("list-parts", object_key=KEY, upload_id=upload_id).status_code == 404


def test_concurrent_completes_of_one_upload_both_succeed_once_assembled(
    three_parts: tuple[Local, bytes, str, list[tuple[int, str]]],
) -> None:
    backend, data, upload_id, etags = three_parts
    answers: list[requests.Response] = []

    def complete() -> None:
        answers.append(backend.api.complete(KEY, upload_id, etags, len(data)))

    threads = [threading.Thread(target=complete) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answer.status_code for answer in answers] == [200] * 4
    assert len({answer.json()["etag"] for answer in answers}) == 1
    assert requests.get(answers[0].json()["public_url"], timeout=5).content == data


def test_complete_after_an_assembly_that_was_not_recorded_records_it(
    three_parts: tuple[Local, bytes, str, list[tuple[int, str]]],
) -> None:
    backend, data, upload_id, etags = three_parts
    # A backend that died between assembling and recording: the parts are gone, the
    # object is there, the registry still says the upload is pending.
    held = [
        StoredPart(number, etag, len(chunk))
        for (number, etag), chunk in zip(
            etags,
            [data[:SMALL_PART], data[SMALL_PART : 2 * SMALL_PART], data[2 * SMALL_PART :]],
            strict=True,
        )
    ]
    backend.store.complete_multipart(KEY, upload_id, held)
    assert backend.db.get(KEY) is None

    answer = backend.api.complete(KEY, upload_id, etags, len(data))

    assert answer.status_code == 200, answer.text
    assert answer.json()["etag"] == expected_etag(data, SMALL_PART)
    row = backend.db.get(KEY)
    assert row is not None and row.etag == answer.json()["etag"]


# -- abort ---------------------------------------------------------------------------------


def test_abort_removes_staged_parts_and_the_registry_row(
    three_parts: tuple[Local, bytes, str, list[tuple[int, str]]],
) -> None:
    backend, data, upload_id, etags = three_parts
    assert len(backend.upload_dirs()) == 1

    answer = backend.api.abort(KEY, upload_id)

    assert answer.status_code == 200
    assert answer.json() == {"status": "ok"}
    assert backend.upload_dirs() == []
    assert backend.db.get_upload(upload_id) is None
    assert backend.api.post("list-parts", object_key=KEY, upload_id=upload_id).status_code == 404
    assert backend.api.complete(KEY, upload_id, etags, len(data)).status_code == 404
    assert backend.api.abort(KEY, upload_id).status_code == 200  # idempotent
    assert backend.api.abort(KEY, "0" * 32).status_code == 200  # unknown
    assert backend.api.abort(KEY, "../../objects").status_code == 200


def test_abort_for_another_key_or_after_complete_touches_nothing(
    three_parts: tuple[Local, bytes, str, list[tuple[int, str]]],
) -> None:
    backend, data, upload_id, etags = three_parts
    assert backend.api.abort("videos/other.mp4", upload_id).status_code == 200
    assert len(backend.api.list_page(KEY, upload_id)["parts"]) == 3
    assert backend.api.complete(KEY, upload_id, etags, len(data)).status_code == 200
    assert backend.api.abort(KEY, upload_id).status_code == 200
    assert requests.get(f"{backend.api.base_url}/files/{KEY}", timeout=5).content == data
    assert backend.api.complete(KEY, upload_id, etags, len(data)).status_code == 200


# -- listing -------------------------------------------------------------------------------


def test_list_parts_pages_with_the_marker(make_local: MakeLocal) -> None:
    backend = make_local(min_part_bytes=1024, max_list_parts=2)
    data = os.urandom(5 * 1024)
    upload_id, _, etags = backend.api.upload(KEY, data, part_size=1024)

    pages = []
    marker: int | None = None
    while True:
        page = backend.api.list_page(KEY, upload_id, marker)
        pages.append(page)
        if not page["is_truncated"]:
            break
        marker = page["next_part_number_marker"]

    assert [[p["part_number"] for p in page["parts"]] for page in pages] == [[1, 2], [3, 4], [5]]
    assert [page["next_part_number_marker"] for page in pages] == [2, 4, None]
    listed = [(p["part_number"], p["etag"]) for page in pages for p in page["parts"]]
    assert listed == etags
    after_three = backend.api.list_page(KEY, upload_id, 3)
    assert [p["part_number"] for p in after_three["parts"]] == [4, 5]
    assert backend.api.list_page(KEY, upload_id, 5)["parts"] == []


def parts(*numbers: int) -> list[StoredPart]:
    return [StoredPart(number, f'"{number}"', number) for number in numbers]


@pytest.mark.parametrize(
    ("held", "marker", "max_parts", "page", "truncated", "next_marker"),
    [
        ([], 0, 1000, [], False, None),
        ([3, 1, 2], 0, 1000, [1, 2, 3], False, None),
        ([1, 2, 3], 0, 2, [1, 2], True, 2),
        ([1, 2, 3], 2, 2, [3], False, None),
        ([1, 2, 3, 4], 1, 2, [2, 3], True, 3),
        ([1, 2], 2, 2, [], False, None),
        ([5, 9, 10_000], 5, 1, [9], True, 9),
        (list(range(1, 2502)), 2000, 1000, list(range(2001, 2502)), False, None),
        (list(range(1, 2502)), 0, 1000, list(range(1, 1001)), True, 1000),
    ],
)
def test_page_parts_follows_s3s_list_parts(
    held: list[int],
    marker: int,
    max_parts: int,
    page: list[int],
    truncated: bool,
    next_marker: int | None,
) -> None:
    result = page_parts(parts(*held), marker, max_parts)
    assert [part.part_number for part in result.parts] == page
    assert (result.is_truncated, result.next_part_number_marker) == (truncated, next_marker)


def test_page_parts_needs_a_positive_page_size() -> None:
    with pytest.raises(ValueError, match="max_parts"):
        page_parts(parts(1), 0, 0)


# -- the API's own checks ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["initiate", "presign-parts", "list-parts", "complete", "abort"])
def test_multipart_endpoints_need_the_bearer_token(local: Local, name: str) -> None:
    answer = Api(local.api.base_url, token="wrong").post(name, object_key=KEY, upload_id="x")
    assert answer.status_code == 401
    assert answer.json()["error"] == "unauthorized"
    assert requests.get(f"{local.api.base_url}{PREFIX}/{name}", timeout=5).status_code == 405


@pytest.mark.parametrize(
    ("name", "payload", "fragment"),
    [
        (
            "initiate",
            {"object_key": "../x", "content_type": "video/mp4", "content_length": 1},
            "'..'",
        ),
        (
            "initiate",
            {"object_key": KEY, "content_type": "v", "content_length": "1"},
            "content_length",
        ),
        (
            "initiate",
            {"object_key": KEY, "content_type": "v", "content_length": 1, "part_size": 0},
            "part_size",
        ),
        (
            "presign-parts",
            {"object_key": KEY, "upload_id": "u", "part_numbers": []},
            "part_numbers",
        ),
        (
            "presign-parts",
            {"object_key": KEY, "upload_id": "u", "part_numbers": ["1"]},
            "part_numbers",
        ),
        ("list-parts", {"object_key": KEY, "upload_id": "u", "part_number_marker": -1}, "marker"),
        (
            "complete",
            {
                "object_key": KEY,
                "upload_id": "u",
                "parts": [],
                "size_bytes": 0,
                "content_type": "v",
            },
            "parts",
        ),
        ("abort", {"object_key": KEY, "upload_id": "u", "extra": 1}, "extra"),
        ("abort", {"object_key": "/abs", "upload_id": "u"}, "object_key"),
    ],
)
def test_malformed_multipart_requests_get_400(
    local: Local, name: str, payload: dict[str, Any], fragment: str
) -> None:
    answer = local.api.post(name, **payload)
    assert answer.status_code == 400
    assert answer.json()["error"] == "bad_request"
    assert fragment in answer.json()["message"]


# -- a restart between parts ---------------------------------------------------------------


def test_upload_resumes_across_a_server_restart_on_the_same_data_dir(tmp_path: Path) -> None:
    config = ServerConfig(
        port=0,
        data_dir=tmp_path / "backend",
        token=TOKEN,
        signing_secret=b"s" * 32,
        min_part_bytes=SMALL_PART,
    )
    data = os.urandom(3 * SMALL_PART + 7)
    with ReferenceServer(config) as first:
        api = Api(first.base_url, part_size=SMALL_PART)
        upload_id, part_size, etags = api.upload(KEY, data, numbers=[1, 2])
        (third,) = api.presign(KEY, upload_id, [3])
        # A body the first server was receiving when it stopped: nothing of it survives.
        (config.data_dir / "staging" / "0123456789abcdef.part").write_bytes(b"half")

    with ReferenceServer(config) as second:
        api = Api(second.base_url)
        listed = api.list_page(KEY, upload_id)["parts"]
        assert [(p["part_number"], p["etag"]) for p in listed] == etags
        assert not list((config.data_dir / "staging").glob("*.part"))
        # A part URL signed before the restart still works (same secret) at the new address.
        moved = third["upload_url"].replace(first.base_url, second.base_url)
        answer = put_part({**third, "upload_url": moved}, data[2 * part_size : 3 * part_size])
        assert answer.status_code == 200
        (fourth,) = api.presign(KEY, upload_id, [4])
        assert put_part(fourth, data[3 * part_size :]).status_code == 200
        listed = api.list_page(KEY, upload_id)["parts"]
        every = [(p["part_number"], p["etag"]) for p in listed]

        answer = api.complete(KEY, upload_id, every, len(data))

        assert answer.status_code == 200, answer.text
        assert answer.json()["etag"] == expected_etag(data, part_size)
        assert requests.get(answer.json()["public_url"], timeout=5).content == data


# -- the S3 store, against moto ------------------------------------------------------------


@dataclass
class OnS3:
    """A running reference backend on an S3 store at moto (possibly through a proxy)."""

    api: Api
    store: ObjectStore
    db: AssetDB
    s3: Any  # a boto3 client straight at moto
    bucket: str


MakeOnS3 = Callable[..., OnS3]


@pytest.fixture
def make_on_s3(moto_s3: Any, tmp_path: Path) -> Iterator[MakeOnS3]:
    from ctrlupload.server._s3store import S3ObjectStore

    running: list[tuple[WSGIServer, AssetDB]] = []
    bucket = moto_s3.make_bucket()

    def make(*, endpoint_url: str | None = None, **options: Any) -> OnS3:
        # As the store configures its own client: one attempt per call, no botocore retries.
        retries = {"mode": "standard", "total_max_attempts": 1}
        client = moto_s3.client(endpoint_url or moto_s3.endpoint_url, retries=retries)
        store = S3ObjectStore(bucket, client=client)
        server = WSGIServer(None, "127.0.0.1", 0).start()
        db = AssetDB(tmp_path / f"assets{len(running)}.sqlite3")
        server.set_app(ReferenceBackend(token=TOKEN, store=store, db=db, **options))
        running.append((server, db))
        return OnS3(Api(f"http://127.0.0.1:{server.port}"), store, db, moto_s3.client(), bucket)

    yield make
    for server, db in running:
        server.stop()
        db.close()


def pending_uploads(on_s3: OnS3) -> list[Any]:
    uploads: list[Any] = on_s3.s3.list_multipart_uploads(Bucket=on_s3.bucket).get("Uploads", [])
    return uploads


def object_exists(on_s3: OnS3, key: str) -> bool:
    try:
        on_s3.s3.head_object(Bucket=on_s3.bucket, Key=key)
    except Exception as exc:
        if getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return False
        raise
    return True


def test_s3_store_round_trips_five_parts_with_s3s_etag(make_on_s3: MakeOnS3) -> None:
    on_s3 = make_on_s3()
    data = os.urandom(4 * 5 * MIB + 17)

    upload_id, part_size, etags = on_s3.api.upload(KEY, data, part_size=5 * MIB)
    assert part_size == 5 * MIB and len(etags) == 5
    listing = on_s3.api.list_page(KEY, upload_id)
    assert [(p["part_number"], p["etag"], p["size_bytes"]) for p in listing["parts"]] == [
        (number, etag, min(part_size, len(data) - (number - 1) * part_size))
        for number, etag in etags
    ]

    answer = on_s3.api.complete(KEY, upload_id, etags, len(data))

    assert answer.status_code == 200, answer.text
    etag = expected_etag(data, part_size)
    assert answer.json()["etag"] == etag
    stored = on_s3.s3.get_object(Bucket=on_s3.bucket, Key=KEY)
    assert stored["Body"].read() == data
    assert stored["ContentType"] == "video/mp4"
    assert stored["ETag"] == etag
    assert requests.get(answer.json()["public_url"], timeout=TIMEOUT_S).content == data
    row = on_s3.db.get(KEY)
    assert row is not None and (row.etag, row.size_bytes) == (etag, len(data))
    assert pending_uploads(on_s3) == []
    assert on_s3.api.complete(KEY, upload_id, etags, len(data)).json() == answer.json()


def test_s3_part_urls_sign_content_length(make_on_s3: MakeOnS3) -> None:
    on_s3 = make_on_s3()
    upload_id = on_s3.api.initiate(KEY, 6 * MIB, part_size=5 * MIB)["upload_id"]
    first, last = on_s3.api.presign(KEY, upload_id, [1, 2])
    assert first["headers"] == {"Content-Length": str(5 * MIB)}
    assert last["headers"] == {"Content-Length": str(MIB)}
    for signed in (first, last):
        query = parse_qs(urlsplit(signed["upload_url"]).query)
        assert query["X-Amz-SignedHeaders"] == ["content-length;host"]
        assert query["partNumber"] == [str(signed["part_number"])]
        assert query["uploadId"] == [upload_id]
    assert on_s3.api.abort(KEY, upload_id).status_code == 200


def test_s3_store_lists_parts_page_by_page(make_on_s3: MakeOnS3) -> None:
    on_s3 = make_on_s3(min_part_bytes=1024, max_list_parts=2)
    data = os.urandom(5 * 1024)
    upload_id, _, etags = on_s3.api.upload(KEY, data, part_size=1024)

    first = on_s3.api.list_page(KEY, upload_id)
    second = on_s3.api.list_page(KEY, upload_id, first["next_part_number_marker"])
    third = on_s3.api.list_page(KEY, upload_id, second["next_part_number_marker"])

    assert [[p["part_number"] for p in page["parts"]] for page in (first, second, third)] == [
        [1, 2],
        [3, 4],
        [5],
    ]
    assert [page["is_truncated"] for page in (first, second, third)] == [True, True, False]
    assert third["next_part_number_marker"] is None
    listed = [
        (p["part_number"], p["etag"]) for page in (first, second, third) for p in page["parts"]
    ]
    assert listed == etags
    on_s3.api.abort(KEY, upload_id)


def test_s3_abort_leaves_no_pending_multipart_upload(make_on_s3: MakeOnS3) -> None:
    on_s3 = make_on_s3()
    upload_id, _, _ = on_s3.api.upload(KEY, os.urandom(6 * MIB), numbers=[1])
    assert [upload["UploadId"] for upload in pending_uploads(on_s3)] == [upload_id]

    assert on_s3.api.abort(KEY, upload_id).status_code == 200

    assert pending_uploads(on_s3) == []
    assert on_s3.db.get_upload(upload_id) is None
    assert on_s3.api.abort(KEY, upload_id).status_code == 200
    assert on_s3.api.abort(KEY, "no-such-upload-id").status_code == 200
    assert not object_exists(on_s3, KEY)


def test_s3_complete_with_a_wrong_etag_is_refused_and_stores_nothing(
    make_on_s3: MakeOnS3,
) -> None:
    on_s3 = make_on_s3()
    data = os.urandom(5 * MIB + 10)
    upload_id, _, etags = on_s3.api.upload(KEY, data)
    wrong = [etags[0], (2, '"' + "0" * 32 + '"')]

    answer = on_s3.api.complete(KEY, upload_id, wrong, len(data))

    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_part"
    assert not object_exists(on_s3, KEY)
    assert on_s3.db.get(KEY) is None
    assert len(pending_uploads(on_s3)) == 1  # the client may still fix it, or abort
    on_s3.api.abort(KEY, upload_id)


def test_s3_stores_own_refusal_of_a_part_list_is_invalid_part(make_on_s3: MakeOnS3) -> None:
    from ctrlupload.server._store import InvalidPart

    on_s3 = make_on_s3()
    data = os.urandom(5 * MIB + 10)
    upload_id, _, etags = on_s3.api.upload(KEY, data)
    held = [StoredPart(1, etags[0][1], 5 * MIB), StoredPart(2, '"' + "0" * 32 + '"', 10)]
    with pytest.raises(InvalidPart, match="InvalidPart"):
        on_s3.store.complete_multipart(KEY, upload_id, held)
    assert not object_exists(on_s3, KEY)
    on_s3.api.abort(KEY, upload_id)


def test_s3_upload_that_s3_no_longer_has_is_404(make_on_s3: MakeOnS3) -> None:
    on_s3 = make_on_s3()
    upload_id, _, etags = on_s3.api.upload(KEY, os.urandom(100))
    on_s3.s3.abort_multipart_upload(Bucket=on_s3.bucket, Key=KEY, UploadId=upload_id)

    listing = on_s3.api.post("list-parts", object_key=KEY, upload_id=upload_id)
    complete = on_s3.api.complete(KEY, upload_id, etags, 100)

    assert (listing.status_code, listing.json()["error"]) == (404, "no_such_upload")
    assert (complete.status_code, complete.json()["error"]) == (404, "no_such_upload")


_ERROR_IN_200 = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)
_TRUNCATED_200 = b'<?xml version="1.0" encoding="UTF-8"?>\n<CompleteMultipartUploadResult><Loc'
_NO_ETAG_200 = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<CompleteMultipartUploadResult '
    b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>b</Bucket><Key>k</Key>'
    b"</CompleteMultipartUploadResult>"
)


@pytest.mark.parametrize(
    "body", [_ERROR_IN_200, _TRUNCATED_200, _NO_ETAG_200], ids=["error", "truncated", "no-etag"]
)
def test_s3_complete_answering_200_without_success_is_503_and_retry_completes(
    make_on_s3: MakeOnS3, moto_s3: Any, body: bytes
) -> None:
    from tests.support.s3_proxy import S3FaultProxy, complete_multipart_calls

    with S3FaultProxy(moto_s3.endpoint_url, complete_multipart_calls((200, body))) as proxy:
        on_s3 = make_on_s3(endpoint_url=proxy.endpoint_url)
        data = os.urandom(5 * MIB + 10)
        upload_id, part_size, etags = on_s3.api.upload(KEY, data)

        failed = on_s3.api.complete(KEY, upload_id, etags, len(data))

        assert proxy.faults_served == 1
        assert failed.status_code == 503
        assert failed.json()["error"] == "storage_unavailable"
        assert "CompleteMultipartUpload" in failed.json()["message"]
        assert on_s3.db.get(KEY) is None
        assert not object_exists(on_s3, KEY)
        assert len(pending_uploads(on_s3)) == 1

        proxy.fault = None  # S3 recovers; the client's retry completes the same upload
        retried = on_s3.api.complete(KEY, upload_id, etags, len(data))

    assert retried.status_code == 200, retried.text
    assert retried.json()["etag"] == expected_etag(data, part_size)
    assert on_s3.s3.get_object(Bucket=on_s3.bucket, Key=KEY)["Body"].read() == data


class FakeS3Client:
    """Answers CompleteMultipartUpload and HeadObject as told (no network)."""

    meta = SimpleNamespace(endpoint_url="http://s3.invalid")

    def __init__(self, complete: dict[str, Any], head_length: int | None) -> None:
        self.complete = complete
        self.head_length = head_length

    def complete_multipart_upload(self, **kwargs: Any) -> dict[str, Any]:
        return self.complete

    def head_object(self, **kwargs: Any) -> dict[str, Any]:
        if self.head_length is None:
            from botocore.exceptions import ClientError

            raise ClientError(
                {"Error": {"Code": "404"}, "ResponseMetadata": {"HTTPStatusCode": 404}},
                "HeadObject",
            )
        return {"ContentLength": self.head_length, "ETag": '"x-1"'}


@pytest.mark.parametrize(
    ("complete", "head_length", "fragment"),
    [
        ({"Bucket": "b", "Key": KEY}, 10, "answered without an ETag"),
        ({"ETag": ""}, 10, "answered without an ETag"),
        ({"ETag": '"x-1"'}, 9, "HEAD then shows 9 bytes, not 10 bytes"),
        ({"ETag": '"x-1"'}, None, "HEAD then shows no object, not 10 bytes"),
    ],
)
def test_s3_completion_counts_only_with_an_etag_and_the_expected_size(
    complete: dict[str, Any], head_length: int | None, fragment: str
) -> None:
    from ctrlupload.server._s3store import ObjectStoreError, S3ObjectStore

    store = S3ObjectStore("bucket", client=FakeS3Client(complete, head_length))
    with pytest.raises(ObjectStoreError, match=fragment) as caught:
        store.complete_multipart(KEY, "upload", [StoredPart(1, '"a"', 10)])
    assert caught.value.operation == "CompleteMultipartUpload"


def test_s3_completion_answers_s3s_etag_and_the_size() -> None:
    from ctrlupload.server._s3store import S3ObjectStore

    store = S3ObjectStore("bucket", client=FakeS3Client({"ETag": '"abc-2"'}, 15))
    info = store.complete_multipart(
        KEY, "upload", [StoredPart(1, '"a"', 10), StoredPart(2, '"b"', 5)]
    )
    assert (info.etag, info.size_bytes) == ('"abc-2"', 15)


# -- the registry --------------------------------------------------------------------------


def test_registry_completion_records_the_asset_and_marks_the_upload(tmp_path: Path) -> None:
    db = AssetDB(tmp_path / "assets.sqlite3")
    db.add_upload("u1", KEY, "video/mp4", 10, 5)
    with pytest.raises(KeyError):
        db.complete_upload(
            "nope", etag='"e-2"', digest="d", size_bytes=10, content_type="v", public_url="p"
        )
    assert db.get(KEY) is None  # the failed transaction left nothing

    row = db.complete_upload(
        "u1", etag='"e-2"', digest="d", size_bytes=10, content_type="video/mp4", public_url="p"
    )

    assert (row.object_key, row.etag, row.size_bytes) == (KEY, '"e-2"', 10)
    upload = db.get_upload("u1")
    assert upload is not None and upload.completed
    assert (upload.completed_etag, upload.completed_digest) == ('"e-2"', "d")
    assert db.delete_upload("u1") and not db.delete_upload("u1")
    db.close()


def test_registry_forgets_completions_after_a_week(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime, timedelta

    from ctrlupload.server import _db

    db = AssetDB(tmp_path / "assets.sqlite3")
    start = datetime(2026, 1, 1, tzinfo=UTC)
    monkeypatch.setattr(_db, "_now", lambda: start)
    for upload_id in ("old", "pending", "new"):
        db.add_upload(upload_id, f"k/{upload_id}", "v", 1, 1)
    db.complete_upload("old", etag="e", digest="d", size_bytes=1, content_type="v", public_url="p")

    monkeypatch.setattr(_db, "_now", lambda: start + timedelta(days=7, seconds=1))
    db.complete_upload("new", etag="e", digest="d", size_bytes=1, content_type="v", public_url="p")

    assert sorted(row.upload_id for row in db.uploads()) == ["new", "pending"]
    db.close()


# -- initiate's Idempotency-Key ------------------------------------------------------------


def _initiate_with_key(
    local: Local, idempotency_key: str, length: int = 11 * MIB
) -> requests.Response:
    return requests.post(
        f"{local.api.base_url}{PREFIX}/initiate",
        json={"object_key": KEY, "content_type": "video/mp4", "content_length": length},
        headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": idempotency_key},
        timeout=TIMEOUT_S,
    )


def test_initiate_repeated_with_its_idempotency_key_answers_the_same_upload(
    make_local: MakeLocal,
) -> None:
    local = make_local()
    first = _initiate_with_key(local, "key-1")
    again = _initiate_with_key(local, "key-1")
    other = _initiate_with_key(local, "key-2")
    assert first.status_code == again.status_code == other.status_code == 200
    assert again.json() == first.json()
    assert other.json()["upload_id"] != first.json()["upload_id"]
    assert len(local.db.uploads()) == 2
    assert len(local.upload_dirs()) == 2


def test_initiate_without_a_key_starts_a_new_upload_every_time(make_local: MakeLocal) -> None:
    local = make_local()
    ids = {local.api.initiate(KEY, 11 * MIB)["upload_id"] for _ in range(2)}
    assert len(ids) == 2


def test_an_idempotency_key_reused_with_another_body_is_refused(make_local: MakeLocal) -> None:
    local = make_local()
    assert _initiate_with_key(local, "key-1").status_code == 200
    reused = _initiate_with_key(local, "key-1", length=12 * MIB)
    assert reused.status_code == 422
    assert reused.json()["error"] == "idempotency_key_reused"
    assert len(local.db.uploads()) == 1


def test_an_idempotency_key_of_an_aborted_upload_starts_a_new_one(make_local: MakeLocal) -> None:
    local = make_local()
    first = _initiate_with_key(local, "key-1").json()
    local.api.post("abort", object_key=KEY, upload_id=first["upload_id"])
    again = _initiate_with_key(local, "key-1")
    assert again.status_code == 200
    assert again.json()["upload_id"] != first["upload_id"]


@pytest.mark.parametrize("bad", ["", "x" * 256, "has space", "ümlaut"])
def test_a_malformed_idempotency_key_is_a_bad_request(make_local: MakeLocal, bad: str) -> None:
    local = make_local()
    answer = requests.post(
        f"{local.api.base_url}{PREFIX}/initiate",
        json={"object_key": KEY, "content_type": "video/mp4", "content_length": 1},
        headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": bad.encode("utf-8")},  # type: ignore[dict-item]
        timeout=TIMEOUT_S,
    )
    assert answer.status_code == 400
    assert "Idempotency-Key" in answer.json()["message"]
    assert local.db.uploads() == []
