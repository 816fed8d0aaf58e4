"""Issue 11 on the reference backend and its local store, over real loopback HTTP.

Storage checks what it is sent before it commits it, as S3 does: a body that does not
match its signed ``x-amz-checksum-crc64nvme`` gets 400 ``BadDigest`` and the object
already at the key survives byte for byte; the checksum and ``If-None-Match: *`` are
signed into the URL, so a PUT that adds, drops or changes either gets 403; of two
conditional PUTs racing for a free key exactly one is stored. Multipart uploads are
declared with a full-object CRC64NVME: parts are checked against their own, and
complete against the whole object's. The registry keeps the checksums, and a database
from before them opens and migrates.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from ctrlupload import _checksum
from ctrlupload.protocol import multipart_etag
from ctrlupload.server import AssetDB, LocalObjectStore
from ctrlupload.server._store import UploadGrant
from tests.support.local_backend import (
    MULTIPART,
    SMALL_PART,
    TIMEOUT_S,
    LocalBackend,
    StoreWrapper,
    local_backend,
    md5_hex,
)

pytestmark = pytest.mark.skipif(not _checksum.available(), reason="needs awscrt")

KEY = "videos/V-001/S-001/JOB-123/video.mp4"
HEADER = "x-amz-checksum-crc64nvme"
#: How long a test waits for the other side of a rendezvous before it fails.
PATIENCE_S = 10


def crc(data: bytes) -> str:
    return _checksum.encode(_checksum.crc64nvme(data))


def presign(backend: LocalBackend, key: str, body: bytes, **fields: Any) -> dict[str, Any]:
    answer = backend.post(
        "/internal/storage/presign-put",
        object_key=key,
        content_type="video/mp4",
        content_length=len(body),
        **fields,
    )
    assert answer.status_code == 200, answer.text
    signed: dict[str, Any] = answer.json()
    return signed


def put(signed: dict[str, Any], body: bytes, headers: dict[str, str] | None = None) -> Any:
    return requests.put(
        signed["upload_url"],
        data=body,
        headers=signed["headers"] if headers is None else headers,
        timeout=TIMEOUT_S,
    )


def s3_code(answer: requests.Response) -> str:
    return answer.text.partition("<Code>")[2].partition("</Code>")[0]


def no_staging_files(backend: LocalBackend) -> bool:
    return not list(backend.store.staging_dir.glob("*.part"))


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LocalBackend]:
    with local_backend(tmp_path / "data") as running:
        yield running


# -- single PUTs ------------------------------------------------------------------------------


def test_a_put_with_its_signed_checksum_is_stored_and_the_checksum_kept(
    backend: LocalBackend,
) -> None:
    body = os.urandom(3000)
    signed = presign(backend, KEY, body, checksum_algorithm="CRC64NVME", checksum=crc(body))
    assert signed["headers"] == {"Content-Type": "video/mp4", HEADER: crc(body)}

    answer = put(signed, body)

    assert answer.status_code == 200, answer.text
    assert answer.headers[HEADER] == crc(body)
    stored = backend.store.head(KEY)
    assert stored is not None and stored.checksum == crc(body)
    assert stored.etag == f'"{md5_hex(body)}"'


def test_a_put_with_a_wrong_checksum_gets_bad_digest_and_the_old_object_survives(
    backend: LocalBackend,
) -> None:
    old, new = os.urandom(2000), os.urandom(2500)
    assert put(presign(backend, KEY, old), old).status_code == 200
    meta = backend.store.meta_dir / KEY
    meta_before, info_before = meta.read_bytes(), backend.store.head(KEY)
    # Signed for other bytes than it carries: corrupted on the way, or a bad client.
    signed = presign(backend, KEY, new, checksum_algorithm="CRC64NVME", checksum=crc(old))

    answer = put(signed, new)

    assert answer.status_code == 400, answer.text
    assert s3_code(answer) == "BadDigest"
    assert "did not match the calculated checksum" in answer.text
    assert backend.get(KEY).content == old
    assert (backend.store.objects_dir / KEY).read_bytes() == old
    assert meta.read_bytes() == meta_before
    assert backend.store.head(KEY) == info_before
    assert info_before is not None and info_before.checksum == crc(old)
    assert no_staging_files(backend)


def test_a_checksum_header_the_url_was_not_signed_for_is_refused(backend: LocalBackend) -> None:
    body = os.urandom(1000)
    signed = presign(backend, KEY, body)
    assert HEADER not in signed["headers"]

    answer = put(signed, body, {**signed["headers"], HEADER: crc(body)})

    assert answer.status_code == 403, answer.text
    assert s3_code(answer) == "SignatureDoesNotMatch"
    assert backend.store.head(KEY) is None


@pytest.mark.parametrize("change", ["left out", "changed"])
def test_a_signed_checksum_left_out_or_changed_is_refused(
    backend: LocalBackend, change: str
) -> None:
    body = os.urandom(1000)
    signed = presign(backend, KEY, body, checksum_algorithm="CRC64NVME", checksum=crc(body))
    headers = {"Content-Type": "video/mp4"}
    if change == "changed":
        headers[HEADER] = crc(b"other bytes")

    answer = put(signed, body, headers)

    assert answer.status_code == 403, answer.text
    assert s3_code(answer) == "SignatureDoesNotMatch"
    assert backend.store.head(KEY) is None


@pytest.mark.parametrize("signed_with", [True, False])
def test_if_none_match_is_signed_into_the_url(backend: LocalBackend, signed_with: bool) -> None:
    body = os.urandom(100)
    signed = presign(backend, KEY, body, **({"if_none_match": "*"} if signed_with else {}))
    assert ("If-None-Match" in signed["headers"]) is signed_with
    headers = {"Content-Type": "video/mp4"}
    if not signed_with:
        headers["If-None-Match"] = "*"  # added to a URL signed without it

    answer = put(signed, body, headers)

    assert answer.status_code == 403, answer.text
    assert s3_code(answer) == "SignatureDoesNotMatch"


def test_a_conditional_put_on_a_stored_key_gets_412_and_stores_nothing(
    backend: LocalBackend,
) -> None:
    old, new = os.urandom(700), os.urandom(800)
    assert put(presign(backend, KEY, old), old).status_code == 200
    signed = presign(backend, KEY, new, if_none_match="*")
    assert signed["headers"]["If-None-Match"] == "*"

    answer = put(signed, new)

    assert answer.status_code == 412, answer.text
    assert s3_code(answer) == "PreconditionFailed"
    assert backend.get(KEY).content == old
    assert no_staging_files(backend)


class BothAuthorized(StoreWrapper):
    """Holds each PUT's body until both PUTs have been authorized: neither is stored
    before the other passed every check that comes before its body is in."""

    def __init__(self, real: LocalObjectStore) -> None:
        super().__init__(real)
        self.rendezvous = threading.Barrier(2, timeout=PATIENCE_S)

    def receive(self, grant: UploadGrant, body: Any) -> Any:
        self.rendezvous.wait()
        return self.real.receive(grant, body)


def test_two_conditional_puts_racing_for_a_free_key_store_exactly_one(tmp_path: Path) -> None:
    wrappers: list[BothAuthorized] = []

    def wrap(real: LocalObjectStore) -> BothAuthorized:
        wrappers.append(BothAuthorized(real))
        return wrappers[0]

    with local_backend(tmp_path / "data", wrap=wrap) as backend:
        bodies = [os.urandom(40_000), os.urandom(50_000)]
        signed = [presign(backend, KEY, body, if_none_match="*") for body in bodies]
        answers: list[Any] = [None, None]

        def send(index: int) -> None:
            answers[index] = put(signed[index], bodies[index])

        threads = [threading.Thread(target=send, args=(index,)) for index in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=PATIENCE_S * 2)

        assert not wrappers[0].rendezvous.broken
        statuses = sorted(answer.status_code for answer in answers)
        assert statuses == [200, 412], [answer.text for answer in answers]
        winner = next(index for index in (0, 1) if answers[index].status_code == 200)
        loser = answers[1 - winner]
        assert s3_code(loser) == "PreconditionFailed"
        assert backend.get(KEY).content == bodies[winner]
        stored = backend.store.head(KEY)
        assert stored is not None
        assert (stored.etag, stored.checksum) == (
            f'"{md5_hex(bodies[winner])}"',
            crc(bodies[winner]),
        )
        assert no_staging_files(backend)


# -- complete by checksum -----------------------------------------------------------------------


def complete(backend: LocalBackend, body: bytes, **identity: Any) -> requests.Response:
    return backend.post(
        "/internal/storage/complete",
        object_key=KEY,
        size_bytes=len(body),
        content_type="video/mp4",
        public_url=f"{backend.base_url}/files/{KEY}",
        **identity,
    )


def test_complete_by_checksum_without_etag_records_the_stored_object(
    backend: LocalBackend,
) -> None:
    body = os.urandom(1234)
    signed = presign(backend, KEY, body, checksum_algorithm="CRC64NVME", checksum=crc(body))
    assert put(signed, body).status_code == 200

    answer = complete(backend, body, checksum_algorithm="CRC64NVME", checksum=crc(body))

    assert answer.status_code == 200, answer.text
    assert answer.json() == {"status": "ok", "etag": f'"{md5_hex(body)}"', "checksum": crc(body)}
    row = backend.db.get(KEY)
    assert row is not None and (row.etag, row.checksum) == (f'"{md5_hex(body)}"', crc(body))


def test_complete_by_a_checksum_storage_does_not_hold_is_a_mismatch(
    backend: LocalBackend,
) -> None:
    body = os.urandom(1234)
    assert put(presign(backend, KEY, body), body).status_code == 200

    answer = complete(backend, body, checksum_algorithm="CRC64NVME", checksum=crc(body + b"x"))

    assert answer.status_code == 409, answer.text
    assert answer.json()["error"] == "object_mismatch"
    assert backend.db.get(KEY) is None


# -- multipart ------------------------------------------------------------------------------------


def initiate(backend: LocalBackend, data: bytes, **fields: Any) -> dict[str, Any]:
    answer = backend.post(
        f"{MULTIPART}/initiate",
        object_key=KEY,
        content_type="video/mp4",
        content_length=len(data),
        part_size=SMALL_PART,
        **fields,
    )
    assert answer.status_code == 200, answer.text
    started: dict[str, Any] = answer.json()
    return started


def chunks(data: bytes) -> list[bytes]:
    return [data[at : at + SMALL_PART] for at in range(0, len(data), SMALL_PART)]


def upload_checked_parts(backend: LocalBackend, data: bytes, **fields: Any) -> tuple[str, list]:
    """Initiate with a full-object checksum and PUT every part with its own; the upload
    id and the parts for complete."""
    started = initiate(
        backend, data, checksum_algorithm="CRC64NVME", checksum_type="FULL_OBJECT", **fields
    )
    assert (started["checksum_algorithm"], started["checksum_type"]) == (
        "CRC64NVME",
        "FULL_OBJECT",
    )
    upload_id = started["upload_id"]
    pieces = chunks(data)
    answer = backend.post(
        f"{MULTIPART}/presign-parts",
        object_key=KEY,
        upload_id=upload_id,
        part_numbers=list(range(1, len(pieces) + 1)),
        checksums=[crc(piece) for piece in pieces],
    )
    assert answer.status_code == 200, answer.text
    parts = []
    for signed, piece in zip(answer.json()["parts"], pieces, strict=True):
        assert signed["headers"] == {HEADER: crc(piece)}
        sent = requests.put(
            signed["upload_url"], data=piece, headers=signed["headers"], timeout=TIMEOUT_S
        )
        assert sent.status_code == 200, sent.text
        parts.append({"part_number": signed["part_number"], "etag": sent.headers["ETag"]})
    return upload_id, parts


def complete_parts(
    backend: LocalBackend, upload_id: str, parts: list, data: bytes, **fields: Any
) -> requests.Response:
    return backend.post(
        f"{MULTIPART}/complete",
        object_key=KEY,
        upload_id=upload_id,
        parts=parts,
        size_bytes=len(data),
        content_type="video/mp4",
        **fields,
    )


def whole(checksum: str) -> dict[str, str]:
    return {"checksum_algorithm": "CRC64NVME", "checksum_type": "FULL_OBJECT", "checksum": checksum}


def test_multipart_parts_and_the_whole_object_are_checked_and_kept(
    backend: LocalBackend,
) -> None:
    data = os.urandom(3 * SMALL_PART + 77)
    upload_id, parts = upload_checked_parts(backend, data)
    listed = backend.post(f"{MULTIPART}/list-parts", object_key=KEY, upload_id=upload_id)
    assert [part["checksum"] for part in listed.json()["parts"]] == [
        crc(piece) for piece in chunks(data)
    ]

    answer = complete_parts(backend, upload_id, parts, data, **whole(crc(data)))

    assert answer.status_code == 200, answer.text
    etag = multipart_etag([md5_hex(piece) for piece in chunks(data)])
    assert (answer.json()["etag"], answer.json()["checksum"]) == (etag, crc(data))
    assert backend.get(KEY).content == data
    stored = backend.store.head(KEY)
    assert stored is not None and stored.checksum == crc(data)
    row = backend.db.get(KEY)
    assert row is not None and row.checksum == crc(data)
    # A repeat of the same request (its answer lost) answers the same.
    again = complete_parts(backend, upload_id, parts, data, **whole(crc(data)))
    assert again.status_code == 200, again.text
    assert again.json() == answer.json()


def test_a_wrong_whole_object_checksum_is_bad_digest_and_nothing_is_published(
    backend: LocalBackend,
) -> None:
    data = os.urandom(2 * SMALL_PART + 5)
    upload_id, parts = upload_checked_parts(backend, data)

    answer = complete_parts(backend, upload_id, parts, data, **whole(crc(data[:-1])))

    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "bad_digest"
    assert backend.store.head(KEY) is None
    assert backend.db.get(KEY) is None
    assert no_staging_files(backend)
    # The upload stays, as on S3: the right checksum still completes it.
    fixed = complete_parts(backend, upload_id, parts, data, **whole(crc(data)))
    assert fixed.status_code == 200, fixed.text
    assert backend.get(KEY).content == data


def test_a_part_that_does_not_match_its_checksum_is_refused_and_not_listed(
    backend: LocalBackend,
) -> None:
    data = os.urandom(SMALL_PART + 10)
    upload_id = initiate(
        backend, data, checksum_algorithm="CRC64NVME", checksum_type="FULL_OBJECT"
    )["upload_id"]
    pieces = chunks(data)
    signed = backend.post(
        f"{MULTIPART}/presign-parts",
        object_key=KEY,
        upload_id=upload_id,
        part_numbers=[1],
        checksums=[crc(pieces[1])],
    ).json()["parts"][0]

    answer = requests.put(
        signed["upload_url"], data=pieces[0], headers=signed["headers"], timeout=TIMEOUT_S
    )

    assert answer.status_code == 400, answer.text
    assert s3_code(answer) == "BadDigest"
    listed = backend.post(f"{MULTIPART}/list-parts", object_key=KEY, upload_id=upload_id)
    assert listed.json()["parts"] == []


def test_part_checksums_for_an_upload_declared_without_one_are_refused(
    backend: LocalBackend,
) -> None:
    data = os.urandom(100)
    started = initiate(backend, data)
    assert "checksum_algorithm" not in started

    answer = backend.post(
        f"{MULTIPART}/presign-parts",
        object_key=KEY,
        upload_id=started["upload_id"],
        part_numbers=[1],
        checksums=[crc(data)],
    )

    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "bad_request"


@pytest.mark.parametrize("declared_at", ["initiate", "complete"])
def test_a_conditional_multipart_complete_on_a_stored_key_is_412(
    backend: LocalBackend, declared_at: str
) -> None:
    old = os.urandom(500)
    assert put(presign(backend, KEY, old), old).status_code == 200
    data = os.urandom(2 * SMALL_PART + 3)
    at_initiate = {"if_none_match": "*"} if declared_at == "initiate" else {}
    at_complete = {"if_none_match": "*"} if declared_at == "complete" else {}
    upload_id, parts = upload_checked_parts(backend, data, **at_initiate)

    answer = complete_parts(backend, upload_id, parts, data, **whole(crc(data)), **at_complete)

    assert answer.status_code == 412, answer.text
    assert answer.json()["error"] == "object_exists"
    assert backend.get(KEY).content == old
    assert backend.db.get(KEY) is None
    # Nothing was cut off: the upload still holds every part, whole.
    listed = backend.post(f"{MULTIPART}/list-parts", object_key=KEY, upload_id=upload_id)
    assert [part["etag"] for part in listed.json()["parts"]] == [p["etag"] for p in parts]
    backend.post("/internal/storage/delete", object_key=KEY)
    retried = complete_parts(backend, upload_id, parts, data, **whole(crc(data)), **at_complete)
    assert retried.status_code == 200, retried.text
    assert backend.get(KEY).content == data


def test_initiate_echoes_if_none_match(backend: LocalBackend) -> None:
    assert initiate(backend, b"x", if_none_match="*")["if_none_match"] == "*"
    assert "if_none_match" not in initiate(backend, b"x")


# -- what is kept from before -------------------------------------------------------------------


def test_an_object_whose_meta_predates_checksums_still_heads(backend: LocalBackend) -> None:
    body = os.urandom(900)
    assert put(presign(backend, KEY, body), body).status_code == 200
    meta = backend.store.meta_dir / KEY
    fields = meta.read_text(encoding="ascii").split()
    assert fields[4:] == [crc(body)]
    meta.write_text(" ".join(fields[:4]), encoding="ascii")  # as written before issue 11

    stored = backend.store.head(KEY)

    assert stored is not None
    assert (stored.size_bytes, stored.etag, stored.checksum) == (
        len(body),
        f'"{md5_hex(body)}"',
        None,
    )


def test_parts_recorded_without_a_crc_still_combine_into_the_object_checksum(
    backend: LocalBackend,
) -> None:
    data = os.urandom(2 * SMALL_PART + 9)
    upload_id, parts = upload_checked_parts(backend, data)
    folder = backend.store.multipart_dir / upload_id
    first = folder / "1.md5"
    first.write_text(" ".join(first.read_text(encoding="ascii").split()[:2]), encoding="ascii")

    answer = complete_parts(backend, upload_id, parts, data, **whole(crc(data)))

    assert answer.status_code == 200, answer.text
    assert answer.json()["checksum"] == crc(data)


_OLD_ASSETS = """
CREATE TABLE assets (
    object_key   TEXT PRIMARY KEY,
    etag         TEXT    NOT NULL,
    size_bytes   INTEGER NOT NULL,
    content_type TEXT    NOT NULL,
    public_url   TEXT    NOT NULL,
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL
)
"""
_OLD_UPLOADS = """
CREATE TABLE multipart_uploads (
    upload_id        TEXT PRIMARY KEY,
    object_key       TEXT    NOT NULL,
    content_type     TEXT    NOT NULL,
    content_length   INTEGER NOT NULL,
    part_size        INTEGER NOT NULL,
    created_at       TEXT    NOT NULL,
    completed_at     TEXT,
    completed_etag   TEXT,
    completed_digest TEXT
)
"""


def test_a_database_from_before_checksums_opens_and_migrates(tmp_path: Path) -> None:
    path = tmp_path / "assets.sqlite3"
    with sqlite3.connect(path) as old:
        old.execute(_OLD_ASSETS)
        old.execute(_OLD_UPLOADS)
        old.execute(
            "INSERT INTO assets VALUES ('a.mp4', '\"e\"', 1, 'video/mp4', 'http://x/a.mp4',"
            " '2026-01-01', '2026-01-01')"
        )
        old.execute(
            "INSERT INTO multipart_uploads (upload_id, object_key, content_type,"
            " content_length, part_size, created_at) VALUES ('u1', 'b.mp4', 'video/mp4',"
            " 10, 5, '2026-01-01')"
        )
    old.close()

    db = AssetDB(path)
    try:
        row = db.get("a.mp4")
        assert row is not None and (row.etag, row.checksum) == ('"e"', None)
        upload = db.get_upload("u1")
        assert upload is not None and (upload.checksum, upload.if_none_match) == (False, False)
        db.upsert("a.mp4", '"f"', 2, "video/mp4", "http://x/a.mp4", checksum=crc(b"ab"))
        added = db.add_upload("u2", "c.mp4", "video/mp4", 10, 5, checksum=True)
        assert added.checksum
    finally:
        db.close()

    reopened = AssetDB(path)  # migrated once: opening again changes nothing
    try:
        row = reopened.get("a.mp4")
        assert row is not None and row.checksum == crc(b"ab")
        upload = reopened.get_upload("u2")
        assert upload is not None and upload.checksum and not upload.if_none_match
    finally:
        reopened.close()
