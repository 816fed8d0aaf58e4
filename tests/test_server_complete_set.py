"""The reference backend's set-level complete (``POST /internal/storage/complete-set``).

On the wire, over loopback servers: a render's objects (stored single PUTs and multipart
uploads to assemble) recorded in one call and one transaction, nothing recorded when one
object does not check out, a repeated call answering the same, the empty-list probe,
auth and hostile bodies, two sets racing on the same keys, and the s3 store on moto.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import requests

from ctrlupload import _checksum
from ctrlupload.protocol import MIB, multipart_etag
from ctrlupload.protocol._contract import MAX_SET_OBJECTS
from ctrlupload.server import (
    AssetDB,
    LocalObjectStore,
    ReferenceBackend,
    ReferenceServer,
    ServerConfig,
    WSGIServer,
)
from ctrlupload.server._app import ApiPaths
from ctrlupload.server._db import AssetRecord
from ctrlupload.server._store import ObjectStore
from tests.support.local_backend import (
    SMALL_PART,
    TOKEN,
    LocalBackend,
    StoreWrapper,
    local_backend,
    md5_hex,
)
from tests.support.moto_server import MotoS3Server, s3_reference_server

SET_PATH = "/internal/storage/complete-set"
MULTIPART = "/internal/storage/multipart"
TIMEOUT_S = 10
#: How long a held call waits for a call the locks must keep out (as in test_server_integrity).
PATIENCE_S = 0.5
PREFIX = "videos/V-001/S-001/JOB-123"
VIDEO, SUBTITLES, THUMB = f"{PREFIX}/video.mp4", f"{PREFIX}/subtitles.srt", f"{PREFIX}/thumb.jpg"


def crc(data: bytes) -> str:
    """The CRC64NVME the local store keeps for these bytes."""
    return _checksum.encode(_checksum.crc64nvme(data))


def stored_object(
    base_url: str, key: str, body: bytes, content_type: str = "video/mp4", **changes: Any
) -> dict[str, Any]:
    """The set entry of an object stored by a single PUT."""
    entry: dict[str, Any] = {
        "object_key": key,
        "size_bytes": len(body),
        "content_type": content_type,
        "etag": f'"{md5_hex(body)}"',
        "public_url": f"{base_url}/files/{key}",
    }
    entry.update(changes)
    return entry


def multipart_object(
    key: str, upload_id: str, etags: list[tuple[int, str]], size: int, **changes: Any
) -> dict[str, Any]:
    """The set entry of a multipart upload to assemble."""
    entry: dict[str, Any] = {
        "object_key": key,
        "size_bytes": size,
        "content_type": "video/mp4",
        "upload_id": upload_id,
        "parts": [{"part_number": number, "etag": etag} for number, etag in etags],
    }
    entry.update(changes)
    return entry


def parts_etag(data: bytes, part_size: int = SMALL_PART) -> str:
    chunks = [data[at : at + part_size] for at in range(0, len(data), part_size)] or [b""]
    return multipart_etag([md5_hex(chunk) for chunk in chunks])


def post_set(base_url: str, objects: list[dict[str, Any]], token: str = TOKEN) -> requests.Response:
    return requests.post(
        f"{base_url}{SET_PATH}",
        json={"objects": objects},
        headers={"Authorization": f"Bearer {token}"},
        timeout=TIMEOUT_S,
    )


def put_three(backend: LocalBackend) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """Store a render's three objects by single PUTs; their set entries and bodies."""
    bodies = {VIDEO: os.urandom(3000), SUBTITLES: b"1\n00:00:00,000 --> 00:00:01,000\nhi\n"}
    bodies[THUMB] = os.urandom(500)
    types = {VIDEO: "video/mp4", SUBTITLES: "application/x-subrip", THUMB: "image/jpeg"}
    for key, body in bodies.items():
        assert backend.put(key, body, types[key]).status_code == 200
    entries = [stored_object(backend.base_url, key, bodies[key], types[key]) for key in bodies]
    return entries, bodies


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LocalBackend]:
    with local_backend(tmp_path / "data") as running:
        yield running


# -- recording ------------------------------------------------------------------------------


def test_three_stored_objects_are_recorded_in_one_call(backend: LocalBackend) -> None:
    entries, bodies = put_three(backend)
    assert backend.db.all() == []

    answer = post_set(backend.base_url, entries)

    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "status": "ok",
        "objects": [
            {
                "object_key": entry["object_key"],
                "etag": entry["etag"],
                "public_url": entry["public_url"],
                "checksum": crc(bodies[entry["object_key"]]),
            }
            for entry in entries
        ],
    }
    rows = {row.object_key: row for row in backend.db.all()}
    assert {key: row.checksum for key, row in rows.items()} == {
        key: crc(body) for key, body in bodies.items()
    }
    assert sorted(rows) == sorted(bodies)
    for entry in entries:
        row = rows[entry["object_key"]]
        assert (row.etag, row.size_bytes, row.content_type, row.public_url) == (
            entry["etag"],
            entry["size_bytes"],
            entry["content_type"],
            entry["public_url"],
        )
        # The download serves the recorded content type.
        got = backend.get(entry["object_key"])
        assert got.content == bodies[entry["object_key"]]
        assert got.headers["Content-Type"] == entry["content_type"]


def test_a_multipart_upload_and_a_stored_object_are_assembled_and_recorded(
    backend: LocalBackend,
) -> None:
    data = os.urandom(2 * SMALL_PART + 100)
    upload_id, etags = backend.upload_parts(VIDEO, data)
    thumb = os.urandom(700)
    assert backend.put(THUMB, thumb, "image/jpeg").status_code == 200
    assert backend.store.head(VIDEO) is None  # not assembled yet

    answer = post_set(
        backend.base_url,
        [
            stored_object(backend.base_url, THUMB, thumb, "image/jpeg"),
            multipart_object(VIDEO, upload_id, etags, len(data)),
        ],
    )

    assert answer.status_code == 200, answer.text
    objects = answer.json()["objects"]
    assert [item["object_key"] for item in objects] == [THUMB, VIDEO]  # request order
    assert objects[1] == {
        "object_key": VIDEO,
        "etag": parts_etag(data),
        "public_url": backend.store.public_url(VIDEO),
        "checksum": crc(data),
    }
    assert backend.get(VIDEO).content == data
    row = backend.db.get(VIDEO)
    assert row is not None
    assert (row.etag, row.size_bytes, row.public_url) == (
        parts_etag(data),
        len(data),
        backend.store.public_url(VIDEO),
    )
    assert backend.db.get(THUMB) is not None
    upload = backend.db.get_upload(upload_id)
    assert upload is not None and upload.completed_etag == parts_etag(data)
    # multipart/complete of the same parts still answers the same success.
    again = backend.complete_parts(VIDEO, upload_id, etags, len(data))
    assert again.status_code == 200, again.text
    assert again.json() == {
        "public_url": backend.store.public_url(VIDEO),
        "etag": parts_etag(data),
        "checksum": crc(data),
    }


def test_a_set_records_an_upload_that_multipart_complete_finished(backend: LocalBackend) -> None:
    data = os.urandom(SMALL_PART + 1)
    upload_id, etags = backend.upload_parts(VIDEO, data)
    assert backend.complete_parts(VIDEO, upload_id, etags, len(data)).status_code == 200
    assert backend.db.delete(VIDEO)  # the row only: the object stays

    answer = post_set(backend.base_url, [multipart_object(VIDEO, upload_id, etags, len(data))])

    assert answer.status_code == 200, answer.text
    assert answer.json()["objects"][0]["etag"] == parts_etag(data)
    assert backend.db.get(VIDEO) is not None


def test_a_real_set_and_its_answer_fit_the_served_document(backend: LocalBackend) -> None:
    import jsonschema
    import yaml
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    document = yaml.safe_load(requests.get(f"{backend.base_url}/openapi.yaml", timeout=10).text)
    registry = Registry().with_resource("doc", DRAFT202012.create_resource(document))

    def check(name: str, instance: Any) -> None:
        schema = {"$ref": f"doc#/components/schemas/{name}"}
        jsonschema.Draft202012Validator(schema, registry=registry).validate(instance)

    entries, _ = put_three(backend)
    data = os.urandom(SMALL_PART + 1)
    upload_id, etags = backend.upload_parts(f"{PREFIX}/extra.mp4", data)
    body = {
        "objects": [*entries, multipart_object(f"{PREFIX}/extra.mp4", upload_id, etags, len(data))]
    }
    check("CompleteSetRequest", body)
    answer = post_set(backend.base_url, body["objects"])
    assert answer.status_code == 200, answer.text
    check("CompleteSetResponse", answer.json())
    # A mix of both kinds is not an object of the document either.
    with pytest.raises(jsonschema.ValidationError):
        check("CompleteSetObject", {**entries[0], "upload_id": upload_id, "parts": []})


# -- all or nothing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"etag": '"' + "0" * 32 + '"'},
        {"size_bytes": 501},
    ],
    ids=["wrong-etag", "wrong-size"],
)
def test_one_mismatching_object_records_none(backend: LocalBackend, change: dict[str, Any]) -> None:
    entries, _ = put_three(backend)
    entries[2].update(change)

    answer = post_set(backend.base_url, entries)

    assert answer.status_code == 409, answer.text
    assert answer.json()["error"] == "object_mismatch"
    assert f"'{THUMB}'" in answer.json()["message"]
    assert backend.db.all() == []


def test_an_object_never_stored_records_none_and_is_named(backend: LocalBackend) -> None:
    entries, _ = put_three(backend)
    missing = stored_object(backend.base_url, f"{PREFIX}/never.jpg", b"x", "image/jpeg")

    answer = post_set(backend.base_url, [*entries, missing])

    assert answer.status_code == 409
    assert answer.json() == {
        "error": "object_mismatch",
        "message": f"object '{PREFIX}/never.jpg' is not in storage",
    }
    assert backend.db.all() == []


def test_a_failed_set_leaves_its_assembled_upload_unrecorded_and_a_repeat_recovers_it(
    backend: LocalBackend,
) -> None:
    data = os.urandom(2 * SMALL_PART + 3)
    upload_id, etags = backend.upload_parts(VIDEO, data)
    thumb = os.urandom(100)
    assert backend.put(THUMB, thumb, "image/jpeg").status_code == 200
    video = multipart_object(VIDEO, upload_id, etags, len(data))
    good_thumb = stored_object(backend.base_url, THUMB, thumb, "image/jpeg")

    failed = post_set(backend.base_url, [video, {**good_thumb, "size_bytes": 99}])

    assert failed.status_code == 409, failed.text
    assert backend.db.all() == []
    # Assembled, but neither recorded nor marked completed.
    assert backend.get(VIDEO).content == data
    upload = backend.db.get_upload(upload_id)
    assert upload is not None and not upload.completed

    answer = post_set(backend.base_url, [video, good_thumb])

    assert answer.status_code == 200, answer.text
    assert answer.json()["objects"][0]["etag"] == parts_etag(data)
    assert {row.object_key for row in backend.db.all()} == {VIDEO, THUMB}


def test_a_part_list_that_does_not_fit_is_invalid_part_naming_the_key(
    backend: LocalBackend,
) -> None:
    entries, _ = put_three(backend)
    data = os.urandom(SMALL_PART + 10)
    key = f"{PREFIX}/extra.mp4"
    upload_id, etags = backend.upload_parts(key, data)
    wrong = [(etags[0][0], '"' + "0" * 32 + '"'), etags[1]]

    answer = post_set(
        backend.base_url, [*entries, multipart_object(key, upload_id, wrong, len(data))]
    )

    assert answer.status_code == 400
    assert answer.json()["error"] == "invalid_part"
    assert answer.json()["message"].startswith(f"object '{key}': part 1 has ETag")
    assert backend.db.all() == []
    assert backend.store.head(key) is None  # nothing assembled


def test_an_upload_completed_with_other_parts_is_no_such_upload(backend: LocalBackend) -> None:
    data = os.urandom(SMALL_PART + 10)
    upload_id, etags = backend.upload_parts(VIDEO, data)
    assert backend.complete_parts(VIDEO, upload_id, etags, len(data)).status_code == 200
    backend.db.delete(VIDEO)

    answer = post_set(backend.base_url, [multipart_object(VIDEO, upload_id, etags[:1], SMALL_PART)])

    assert answer.status_code == 404
    assert answer.json()["error"] == "no_such_upload"
    assert VIDEO in answer.json()["message"]
    assert backend.db.all() == []


def test_a_deleted_object_of_a_completed_upload_gets_no_row_again(backend: LocalBackend) -> None:
    data = os.urandom(SMALL_PART + 10)
    upload_id, etags = backend.upload_parts(VIDEO, data)
    video = multipart_object(VIDEO, upload_id, etags, len(data))
    assert post_set(backend.base_url, [video]).status_code == 200
    assert backend.post("/internal/storage/delete", object_key=VIDEO).status_code == 200

    answer = post_set(backend.base_url, [video])

    assert answer.status_code == 409
    assert answer.json() == {
        "error": "object_mismatch",
        "message": f"object '{VIDEO}' is not in storage",
    }
    assert backend.db.all() == []


def test_the_transaction_rolls_back_every_row_when_one_fails(tmp_path: Path) -> None:
    db = AssetDB(tmp_path / "assets.sqlite3")
    try:
        good = AssetRecord("a/one", '"e1"', 1, "video/mp4", "https://cdn/a/one")
        unknown = AssetRecord(
            "a/two", '"e2-1"', 2, "video/mp4", "https://cdn/a/two", upload_id="gone", digest="d"
        )
        with pytest.raises(KeyError):
            db.complete_set([good, unknown])
        assert db.all() == []
        assert [row.object_key for row in db.complete_set([good])] == ["a/one"]
    finally:
        db.close()


# -- repeats and the probe ----------------------------------------------------------------


def test_repeating_a_set_answers_the_same_and_keeps_the_rows(backend: LocalBackend) -> None:
    entries, _ = put_three(backend)
    data = os.urandom(SMALL_PART + 5)
    key = f"{PREFIX}/extra.mp4"
    upload_id, etags = backend.upload_parts(key, data)
    entries.append(multipart_object(key, upload_id, etags, len(data)))

    first = post_set(backend.base_url, entries)
    rows = {row.object_key: row for row in backend.db.all()}
    second = post_set(backend.base_url, entries)

    assert first.status_code == second.status_code == 200, second.text
    assert second.json() == first.json()
    again = {row.object_key: row for row in backend.db.all()}
    assert sorted(again) == sorted(rows)
    for key_, row in rows.items():
        assert (again[key_].etag, again[key_].size_bytes, again[key_].created_at) == (
            row.etag,
            row.size_bytes,
            row.created_at,
        )


def test_an_empty_set_is_a_probe_that_records_nothing(backend: LocalBackend) -> None:
    answer = post_set(backend.base_url, [])
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json() == {"status": "ok", "objects": []}
    assert backend.db.all() == []


def test_serve_routes_complete_set_by_default(reference_server: ReferenceServer) -> None:
    answer = post_set(reference_server.base_url, [], token=reference_server.token)
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "objects": []}


def test_the_path_follows_the_api_paths(tmp_path: Path) -> None:
    config = ServerConfig(port=0, data_dir=tmp_path, paths=ApiPaths(complete_set="/v2/set"))
    with ReferenceServer(config) as server:
        moved = requests.post(
            f"{server.base_url}/v2/set",
            json={"objects": []},
            headers={"Authorization": f"Bearer {server.token}"},
            timeout=TIMEOUT_S,
        )
        assert moved.status_code == 200
        assert post_set(server.base_url, [], token=server.token).status_code == 404


# -- auth and hostile bodies -----------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", TOKEN])
def test_complete_set_needs_the_bearer_token(
    backend: LocalBackend, authorization: str | None
) -> None:
    entries, _ = put_three(backend)
    headers = {} if authorization is None else {"Authorization": authorization}

    answer = requests.post(
        f"{backend.base_url}{SET_PATH}", json={"objects": entries}, headers=headers, timeout=10
    )

    assert answer.status_code == 401
    assert answer.json()["error"] == "unauthorized"
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert backend.db.all() == []


def test_get_is_method_not_allowed(backend: LocalBackend) -> None:
    answer = requests.get(f"{backend.base_url}{SET_PATH}", timeout=TIMEOUT_S)
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "POST"


def _entry(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "object_key": VIDEO,
        "size_bytes": 1,
        "content_type": "video/mp4",
        "etag": '"e"',
        "public_url": "https://cdn.example.test/x",
    }
    entry.update(changes)
    return {name: value for name, value in entry.items() if value is not None}


_PART = {"part_number": 1, "etag": '"e"'}
_DEEP = b'{"objects": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HOSTILE_BODIES: dict[str, Any] = {
    "not-json": b'{"objects": [',
    "deep-json": _DEEP,
    "not-an-object": [],
    "no-objects": {},
    "objects-null": {"objects": None},
    "objects-not-a-list": {"objects": {"object_key": VIDEO}},
    "unknown-field": {"objects": [], "bucket": "other"},
    "object-not-an-object": {"objects": ["videos/x"]},
    "too-many": {
        "objects": [_entry(object_key=f"{PREFIX}/{n}.jpg") for n in range(MAX_SET_OBJECTS + 1)]
    },
    "duplicate-keys": {"objects": [_entry(), _entry()]},
    "both-kinds": {"objects": [_entry(upload_id="u", parts=[_PART])]},
    "neither-kind": {"objects": [_entry(etag=None, public_url=None)]},
    "etag-without-public-url": {"objects": [_entry(public_url=None)]},
    "upload-without-parts": {"objects": [_entry(etag=None, public_url=None, upload_id="u")]},
    "empty-parts": {"objects": [_entry(etag=None, public_url=None, upload_id="u", parts=[])]},
    "empty-upload-id": {
        "objects": [_entry(etag=None, public_url=None, upload_id="", parts=[_PART])]
    },
    "part-number-zero": {
        "objects": [
            _entry(
                etag=None, public_url=None, upload_id="u", parts=[{"part_number": 0, "etag": "e"}]
            )
        ]
    },
    "unknown-object-field": {"objects": [_entry(bucket="other")]},
    "negative-size": {"objects": [_entry(size_bytes=-1)]},
    "size-as-string": {"objects": [_entry(size_bytes="1")]},
    "size-as-bool": {"objects": [_entry(size_bytes=True)]},
    "bad-content-type": {"objects": [_entry(content_type="text/plain\r\nX-Injected: 1")]},
    "missing-key": {"objects": [{k: v for k, v in _entry().items() if k != "object_key"}]},
}


@pytest.mark.parametrize("body", HOSTILE_BODIES.values(), ids=HOSTILE_BODIES.keys())
def test_a_hostile_body_is_a_bad_request(backend: LocalBackend, body: Any) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()

    answer = requests.post(
        f"{backend.base_url}{SET_PATH}",
        data=raw,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=TIMEOUT_S,
    )

    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "bad_request"
    assert "\r" not in answer.json()["message"]
    assert backend.db.all() == []


@pytest.mark.parametrize(
    ("bad_key", "reason"),
    [("../x", "'..'"), (f"{PREFIX}//x", "empty segment"), ("/abs/key", "'/'"), ("", "empty")],
)
def test_each_objects_key_is_checked_and_named(
    backend: LocalBackend, bad_key: str, reason: str
) -> None:
    entries, _ = put_three(backend)

    answer = post_set(backend.base_url, [*entries, _entry(object_key=bad_key)])

    assert answer.status_code == 400, answer.text
    message = answer.json()["message"]
    assert answer.json()["error"] == "bad_request"
    assert message.startswith(f"objects.3.object_key {bad_key!r}: ")
    assert reason in message
    assert backend.db.all() == []


# -- concurrency ----------------------------------------------------------------------------


def set_status(base_url: str, objects: list[dict[str, Any]]) -> int | str:
    """The status a set gets, or how its request failed (a deadlocked server times out)."""
    try:
        return post_set(base_url, objects).status_code
    except requests.RequestException as exc:
        return f"{type(exc).__name__} (deadlocked?)"


@contextlib.contextmanager
def racing_backend(
    data_dir: Path, wrap: Callable[[LocalObjectStore], ObjectStore] | None = None
) -> Iterator[LocalBackend]:
    """A backend for racing sets.

    When the test fails (the sets may have deadlocked), the server is left running, its
    workers being daemon threads: stopping it would wait for stuck requests for ever,
    and the test is to fail, not hang.
    """
    server = WSGIServer(None, "127.0.0.1", 0).start()
    base_url = f"http://127.0.0.1:{server.port}"
    store = LocalObjectStore(data_dir, base_url)
    db = AssetDB(data_dir / "assets.sqlite3")
    app = ReferenceBackend(token=TOKEN, store=wrap(store) if wrap else store, db=db)
    server.set_app(app)
    yield LocalBackend(base_url, store, db, app, data_dir)
    server.stop()
    store.close()
    db.close()


class HeldFirstHead(StoreWrapper):
    """Holds the first ``head`` (of the first set) until another ``head`` comes.

    A backend whose set holds all its keys' locks keeps the other set out meanwhile, so
    the wait runs out after PATIENCE_S and the sets run one after the other. One that
    locks key by key, in request order, lets the other set take the next key meanwhile.
    """

    def __init__(self, real: LocalObjectStore) -> None:
        super().__init__(real)
        self.holding = threading.Event()
        self.other = threading.Event()
        self._lock = threading.Lock()
        self._first = True

    def head(self, key: str) -> Any:
        with self._lock:
            first, self._first = self._first, False
        if first:
            self.holding.set()
            self.other.wait(timeout=PATIENCE_S)
        else:
            self.other.set()
        return self.real.head(key)


def test_two_sets_racing_on_the_same_keys_do_not_deadlock_and_leave_one_sets_rows(
    tmp_path: Path,
) -> None:
    wrapper: list[HeldFirstHead] = []

    def wrap(real: LocalObjectStore) -> ObjectStore:
        wrapper.append(HeldFirstHead(real))
        return cast(ObjectStore, wrapper[0])

    with racing_backend(tmp_path / "data", wrap) as backend:
        video, thumb = os.urandom(1000), os.urandom(200)
        assert backend.put(VIDEO, video).status_code == 200
        assert backend.put(THUMB, thumb, "image/jpeg").status_code == 200

        def entries(tag: str) -> list[dict[str, Any]]:
            # Same objects, recorded with this set's public URLs.
            return [
                stored_object(backend.base_url, key, body, public_url=f"https://{tag}.test/{key}")
                for key, body in ((VIDEO, video), (THUMB, thumb))
            ]

        answers: dict[str, int | str] = {}
        one = threading.Thread(
            target=lambda: answers.update(a=set_status(backend.base_url, entries("a"))),
            daemon=True,
        )
        one.start()
        assert wrapper[0].holding.wait(timeout=TIMEOUT_S)
        # The other set names the keys in the other order.
        two = threading.Thread(
            target=lambda: answers.update(b=set_status(backend.base_url, entries("b")[::-1])),
            daemon=True,
        )
        two.start()
        one.join(timeout=30)
        two.join(timeout=30)

        assert not one.is_alive() and not two.is_alive(), "the two sets deadlocked"
        assert answers == {"a": 200, "b": 200}
        rows = backend.db.all()
        assert {row.object_key for row in rows} == {VIDEO, THUMB}
        # Each set records all its rows at once: both rows come from the same set.
        hosts = {row.public_url.split("/")[2] for row in rows}
        assert len(hosts) == 1, hosts
        for row in rows:
            stored = backend.store.head(row.object_key)
            assert stored is not None and stored.etag == row.etag


def test_many_sets_racing_on_shared_keys_all_finish_consistently(tmp_path: Path) -> None:
    keys = [f"{PREFIX}/{n}.jpg" for n in range(6)]
    with racing_backend(tmp_path / "data") as backend:
        bodies = {key: os.urandom(64) for key in keys}
        for key, body in bodies.items():
            assert backend.put(key, body, "image/jpeg").status_code == 200
        statuses: list[int | str] = []
        start = threading.Barrier(8)

        def race(turn: int) -> None:
            # Each set names the keys in its own order.
            chosen = keys[turn % 3 :] + keys[: turn % 3]
            if turn % 2:
                chosen.reverse()
            objects = [
                stored_object(
                    backend.base_url, key, bodies[key], "image/jpeg", public_url=f"https://t{turn}/"
                )
                for key in chosen
            ]
            start.wait(timeout=TIMEOUT_S)
            for _ in range(5):
                statuses.append(set_status(backend.base_url, objects))

        threads = [threading.Thread(target=race, args=(turn,), daemon=True) for turn in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert not any(thread.is_alive() for thread in threads), "sets deadlocked"
        assert statuses == [200] * 40
        rows = backend.db.all()
        assert [row.object_key for row in rows] == sorted(keys)
        assert len({row.public_url for row in rows}) == 1  # the last set's, for every key


# -- the s3 store, on moto --------------------------------------------------------------------


def test_a_set_on_the_s3_store_assembles_and_records_all_or_nothing(
    moto_s3: MotoS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with s3_reference_server(moto_s3, tmp_path, monkeypatch) as (server, bucket):
        s3 = moto_s3.client()
        auth = {"Authorization": f"Bearer {server.token}"}

        def post(path: str, **payload: Any) -> dict[str, Any]:
            answer = requests.post(
                f"{server.base_url}{path}", json=payload, headers=auth, timeout=TIMEOUT_S
            )
            assert answer.status_code == 200, answer.text
            result: dict[str, Any] = answer.json()
            return result

        thumb = os.urandom(2048)
        signed = post(
            "/internal/storage/presign-put",
            object_key=THUMB,
            content_type="image/jpeg",
            content_length=len(thumb),
        )
        put = requests.put(
            signed["upload_url"], data=thumb, headers=signed["headers"], timeout=TIMEOUT_S
        )
        assert put.status_code == 200, put.text
        data = os.urandom(5 * MIB + 1000)
        upload_id = post(
            f"{MULTIPART}/initiate",
            object_key=VIDEO,
            content_type="video/mp4",
            content_length=len(data),
            part_size=5 * MIB,
        )["upload_id"]
        urls = post(
            f"{MULTIPART}/presign-parts", object_key=VIDEO, upload_id=upload_id, part_numbers=[1, 2]
        )["parts"]
        etags = []
        for signed_part in urls:
            number = signed_part["part_number"]
            body = data[(number - 1) * 5 * MIB : number * 5 * MIB]
            answer = requests.put(
                signed_part["upload_url"], data=body, headers=signed_part["headers"], timeout=30
            )
            assert answer.status_code == 200, answer.text
            etags.append((number, answer.headers["ETag"]))
        video = multipart_object(VIDEO, upload_id, etags, len(data))
        good_thumb = stored_object(
            server.base_url, THUMB, thumb, "image/jpeg", public_url=signed["public_url"]
        )

        failed = post_set(
            server.base_url, [video, {**good_thumb, "etag": '"' + "0" * 32 + '"'}], server.token
        )
        assert failed.status_code == 409, failed.text
        assert THUMB in failed.json()["message"]
        assert server.db.all() == []

        answer = post_set(server.base_url, [video, good_thumb], server.token)

        assert answer.status_code == 200, answer.text
        expected = parts_etag(data, 5 * MIB)
        assert answer.json()["objects"] == [
            {
                "object_key": VIDEO,
                "etag": expected,
                "public_url": server.app.store.public_url(VIDEO),
            },
            {"object_key": THUMB, "etag": good_thumb["etag"], "public_url": signed["public_url"]},
        ]
        assert s3.get_object(Bucket=bucket, Key=VIDEO)["Body"].read() == data
        assert {row.object_key for row in server.db.all()} == {VIDEO, THUMB}
        assert post_set(server.base_url, [video, good_thumb], server.token).json() == answer.json()
