"""The local store and the reference app keep objects and records whole and consistent.

A crash between publishing an object and cleaning up after it, concurrent PUTs, GETs
and deletes of one key, and a second server on the same data directory: each ends
with every object whole, its ETag its own, and a record only for an object that exists.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from ctrlupload import StorageError, _checksum
from ctrlupload.protocol import bare_etag, multipart_etag
from ctrlupload.server import AssetDB, LocalObjectStore, ObjectInfo, StoredPart
from ctrlupload.server._store import ObjectStore, PartGrant, UploadGrant, UploadRejected
from tests.support.local_backend import (
    SMALL_PART,
    LocalBackend,
    StoreWrapper,
    local_backend,
    md5_hex,
)
from tests.support.serve_process import REPO_ROOT, ServeProcess, child_env

KEY = "videos/V-001/S-001/JOB-123/video.mp4"


def crc(data: bytes) -> str | None:
    """The CRC64NVME the local store keeps for an object of these bytes (with awscrt)."""
    return _checksum.encode(_checksum.crc64nvme(data)) if _checksum.available() else None


def parts_etag(data: bytes) -> str:
    chunks = [data[at : at + SMALL_PART] for at in range(0, len(data), SMALL_PART)] or [b""]
    return multipart_etag([md5_hex(chunk) for chunk in chunks])


def held_parts(data: bytes, etags: list[tuple[int, str]]) -> list[StoredPart]:
    return [
        StoredPart(number, etag, len(data[(number - 1) * SMALL_PART : number * SMALL_PART]))
        for number, etag in etags
    ]


# -- a crash between publishing an assembled upload and cleaning up after it --------------


def test_retried_complete_after_a_crash_between_publish_and_cleanup_keeps_the_object(
    tmp_path: Path,
) -> None:
    data = os.urandom(3 * SMALL_PART + 11)
    with local_backend(tmp_path / "data") as backend:
        upload_id, etags = backend.upload_parts(KEY, data)
        folder = backend.store.multipart_dir / upload_id
        saved = tmp_path / "saved-upload"
        shutil.copytree(folder, saved)
        # Assembled and published, but the process died before it removed the upload's
        # folder and before the app recorded the completion.
        backend.store.complete_multipart(KEY, upload_id, held_parts(data, etags))
        shutil.copytree(saved, folder)
        (folder / "data").unlink()

        answer = backend.complete_parts(KEY, upload_id, etags, len(data))

        assert answer.status_code == 200, answer.text
        assert answer.json()["etag"] == parts_etag(data)
        assert backend.get(KEY).content == data
        row = backend.db.get(KEY)
        assert row is not None and row.etag == parts_etag(data)
        assert not folder.exists()


def test_an_upload_found_assembled_lists_and_takes_parts_no_more(tmp_path: Path) -> None:
    data = os.urandom(SMALL_PART + 3)
    with local_backend(tmp_path / "data") as backend:
        upload_id, etags = backend.upload_parts(KEY, data)
        folder = backend.store.multipart_dir / upload_id
        saved = tmp_path / "saved-upload"
        shutil.copytree(folder, saved)
        backend.store.complete_multipart(KEY, upload_id, held_parts(data, etags))
        shutil.copytree(saved, folder)
        (folder / "data").unlink()
        signed = backend.post(
            "/internal/storage/multipart/presign-parts",
            object_key=KEY,
            upload_id=upload_id,
            part_numbers=[1],
        ).json()["parts"][0]

        answer = requests.put(signed["upload_url"], data=data[:SMALL_PART], timeout=10)

        assert answer.status_code == 404, answer.text
        assert "NoSuchUpload" in answer.text
        assert backend.get(KEY).content == data


def test_an_upload_an_older_version_started_takes_its_first_part(tmp_path: Path) -> None:
    data = os.urandom(SMALL_PART + 3)
    with local_backend(tmp_path / "data") as backend:
        answer = backend.post(
            "/internal/storage/multipart/initiate",
            object_key=KEY,
            content_type="video/mp4",
            content_length=len(data),
            part_size=SMALL_PART,
        )
        upload_id = answer.json()["upload_id"]
        # Older versions made the data file with the first part, not at initiate.
        (backend.store.multipart_dir / upload_id / "data").unlink()
        signed = backend.post(
            "/internal/storage/multipart/presign-parts",
            object_key=KEY,
            upload_id=upload_id,
            part_numbers=[1, 2],
        ).json()["parts"]
        etags = []
        for number, part in enumerate(signed, start=1):
            body = data[(number - 1) * SMALL_PART : number * SMALL_PART]
            put = requests.put(part["upload_url"], data=body, timeout=10)
            assert put.status_code == 200, put.text
            etags.append((number, put.headers["ETag"]))

        answer = backend.complete_parts(KEY, upload_id, etags, len(data))

        assert answer.status_code == 200, answer.text
        assert backend.get(KEY).content == data


def run_until_frozen(data_dir: Path, upload_id: str, parts: list[StoredPart], point: str) -> None:
    """Complete the upload in a child process, SIGKILLed at its publish rename."""
    listing = json.dumps([[part.part_number, part.etag, part.size_bytes] for part in parts])
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.crash_child",
            str(data_dir),
            KEY,
            upload_id,
            listing,
            point,
        ],
        cwd=REPO_ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line == "frozen", child.stderr.read() if child.stderr else line
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.communicate(timeout=10)


@pytest.mark.parametrize("point", ["before", "after"])
def test_a_server_killed_while_publishing_leaves_the_old_or_the_new_object_whole(
    tmp_path: Path, point: str
) -> None:
    old = os.urandom(SMALL_PART // 2)
    data = os.urandom(2 * SMALL_PART + 5)
    with local_backend(tmp_path / "data") as backend:
        assert backend.put(KEY, old).status_code == 200
        upload_id, etags = backend.upload_parts(KEY, data)

    run_until_frozen(tmp_path / "data", upload_id, held_parts(data, etags), point)

    with local_backend(tmp_path / "data") as backend:
        stored = backend.store.head(KEY)
        body, etag = (old, f'"{md5_hex(old)}"') if point == "before" else (data, parts_etag(data))
        assert stored is not None and (stored.size_bytes, stored.etag) == (len(body), etag)
        got = backend.get(KEY)
        assert got.content == body and got.headers["ETag"] == etag

        answer = backend.complete_parts(KEY, upload_id, etags, len(data))

        assert answer.status_code == 200, answer.text
        assert answer.json()["etag"] == parts_etag(data)
        assert backend.get(KEY).content == data
        assert backend.store.head(KEY) == type(stored)(len(data), parts_etag(data), crc(data))


# -- concurrent writers of one key ----------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalObjectStore]:
    local = LocalObjectStore(tmp_path / "store", "http://127.0.0.1:1")
    yield local
    local.close()


def grant_for(body: bytes) -> UploadGrant:
    return UploadGrant(KEY, "video/mp4", len(body), 2**40)


class PublishGate:
    """Holds one thread at its rename into ``objects/`` until another thread's rename.

    ``holder`` waits there (before or after its own rename) until ``releaser`` has
    renamed, or ``patience_s`` passes: a store that orders publishing per key keeps
    ``releaser`` out meanwhile, so the wait runs out and the two publish one by one.
    """

    def __init__(self, objects: Path, holder: str, releaser: str, *, hold_before: bool) -> None:
        self.objects = objects.resolve()
        self.holder, self.releaser, self.hold_before = holder, releaser, hold_before
        self.holding = threading.Event()
        self.released = threading.Event()
        self._real = os.replace

    def replace(self, source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
        name = threading.current_thread().name
        publishing = Path(target).resolve().is_relative_to(self.objects)
        if publishing and name == self.holder and self.hold_before:
            self.holding.set()
            self.released.wait(timeout=PATIENCE_S)
        self._real(source, target)
        if publishing and name == self.holder and not self.hold_before:
            self.holding.set()
            self.released.wait(timeout=PATIENCE_S)
        if publishing and name == self.releaser:
            self.released.set()


#: How long a held publisher waits for another one that a correct store keeps out.
PATIENCE_S = 0.5


def run_named(name: str, target: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def test_concurrent_puts_of_one_key_leave_the_etag_of_the_body_stored(
    store: LocalObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = os.urandom(4096), os.urandom(4096)
    gate = PublishGate(store.objects_dir, "first", "second", hold_before=False)
    monkeypatch.setattr(os, "replace", gate.replace)

    one = run_named("first", lambda: store.receive(grant_for(first), io.BytesIO(first)))
    assert gate.holding.wait(timeout=10)
    two = run_named("second", lambda: store.receive(grant_for(second), io.BytesIO(second)))
    one.join(timeout=10)
    two.join(timeout=10)

    stored = (store.objects_dir / KEY).read_bytes()
    assert stored in (first, second)
    assert store.head(KEY) == ObjectInfo(len(stored), f'"{md5_hex(stored)}"', crc(stored))


def test_a_put_racing_a_multipart_complete_keeps_the_meta_of_the_file_at_the_key(
    store: LocalObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, single = os.urandom(2 * SMALL_PART), os.urandom(100)
    upload_id = store.create_multipart(KEY, "video/mp4", SMALL_PART)
    parts = []
    for number in (1, 2):
        body = data[(number - 1) * SMALL_PART : number * SMALL_PART]
        grant = PartGrant(KEY, upload_id, number, len(body), 2**40)
        parts.append(
            StoredPart(number, store.receive_part(grant, io.BytesIO(body)).etag, len(body))
        )
    gate = PublishGate(store.objects_dir, "complete", "put", hold_before=True)
    monkeypatch.setattr(os, "replace", gate.replace)

    one = run_named("complete", lambda: store.complete_multipart(KEY, upload_id, parts))
    assert gate.holding.wait(timeout=10)
    two = run_named("put", lambda: store.receive(grant_for(single), io.BytesIO(single)))
    one.join(timeout=10)
    two.join(timeout=10)

    stored = (store.objects_dir / KEY).read_bytes()
    # The multipart ETag cannot be computed from the file: it lives in the meta only.
    expected = parts_etag(data) if stored == data else f'"{md5_hex(single)}"'
    assert stored in (data, single)
    assert store.head(KEY) == ObjectInfo(len(stored), expected, crc(stored))


# -- downloads while the object is replaced ------------------------------------------------


class ReplacedOnceOpened(StoreWrapper):
    """A store whose object is replaced by another body just after a GET opens it."""

    def __init__(self, real: LocalObjectStore, replacement: bytes) -> None:
        super().__init__(real)
        self.replacement = replacement

    def open(self, key: str) -> Any:
        opened = self.real.open(key)
        body = self.replacement
        self.real.receive(UploadGrant(key, "video/mp4", len(body), 2**40), io.BytesIO(body))
        return opened


def test_a_get_serves_the_size_and_etag_of_the_very_file_it_sends(tmp_path: Path) -> None:
    first, second = os.urandom(96 * 1024), os.urandom(32 * 1024)
    with local_backend(
        tmp_path / "data", wrap=lambda real: cast(ObjectStore, ReplacedOnceOpened(real, second))
    ) as backend:
        assert backend.put(KEY, first).status_code == 200

        got = backend.get(KEY)

        assert got.status_code == 200
        assert got.headers["Content-Length"] == str(len(first))
        assert got.headers["ETag"] == f'"{md5_hex(first)}"'
        assert got.content == first
        assert backend.get(KEY).content == second


def test_every_get_during_replacements_serves_a_body_that_fits_its_headers(
    tmp_path: Path,
) -> None:
    bodies = [os.urandom(64 * 1024), os.urandom(192 * 1024)]
    rounds = 100
    with local_backend(tmp_path / "data") as backend:
        signed = []
        for body in bodies:
            presigned = backend.post(
                "/internal/storage/presign-put",
                object_key=KEY,
                content_type="video/mp4",
                content_length=len(body),
            ).json()
            signed.append((presigned["upload_url"], presigned["headers"], body))
            assert requests.put(
                presigned["upload_url"], data=body, headers=presigned["headers"], timeout=10
            ).ok
        problems: list[str] = []
        writing = threading.Event()

        def write() -> None:
            with requests.Session() as session:
                for turn in range(rounds):
                    url, headers, body = signed[turn % 2]
                    if not session.put(url, data=body, headers=headers, timeout=10).ok:
                        problems.append("a PUT failed")
                    writing.set()

        def read() -> None:
            writing.wait(timeout=10)
            with requests.Session() as session:
                for _ in range(rounds):
                    try:
                        got = session.get(f"{backend.base_url}/files/{KEY}", timeout=10)
                    except requests.RequestException as exc:
                        problems.append(f"GET broke: {type(exc).__name__}")
                        continue
                    if len(got.content) != int(got.headers["Content-Length"]):
                        problems.append("body length differs from Content-Length")
                    elif got.headers["ETag"] != f'"{md5_hex(got.content)}"':
                        problems.append("body differs from its ETag")

        threads = [
            run_named(name, job)
            for name, job in [("w1", write), ("w2", write), ("r1", read), ("r2", read)]
        ]
        for thread in threads:
            thread.join(timeout=60)

    assert problems == []


# -- completions racing deletes and aborts --------------------------------------------------


class SignallingDB(AssetDB):
    """An asset database that says when a row has been deleted."""

    deleted: threading.Event

    def delete(self, object_key: str) -> bool:
        try:
            return super().delete(object_key)
        finally:
            self.deleted.set()


class HeldAfter(StoreWrapper):
    """Holds the first call of ``method``, once it has run, until ``until`` is set.

    A backend that orders the two operations keeps the other one out meanwhile, so
    the wait runs out after PATIENCE_S and they happen one after the other.
    """

    def __init__(self, real: LocalObjectStore, method: str, until: threading.Event) -> None:
        super().__init__(real)
        self.method, self.until = method, until
        self.holding = threading.Event()

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.real, name)
        if name != self.method or self.holding.is_set():
            return real

        def held(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            self.holding.set()
            self.until.wait(timeout=PATIENCE_S)
            return result

        return held


@pytest.fixture
def deleted() -> threading.Event:
    event = threading.Event()
    SignallingDB.deleted = event
    return event


def assert_rows_only_for_stored_objects(backend: LocalBackend) -> None:
    for row in backend.db.all():
        stored = backend.store.head(row.object_key)
        assert stored is not None, f"a row for '{row.object_key}', which is not stored"
        assert bare_etag(stored.etag) == bare_etag(row.etag)


def test_a_complete_racing_a_delete_leaves_no_row_for_a_missing_object(
    tmp_path: Path, deleted: threading.Event
) -> None:
    body = os.urandom(1000)
    wrapper: list[HeldAfter] = []

    def wrap(real: LocalObjectStore) -> ObjectStore:
        wrapper.append(HeldAfter(real, "head", deleted))
        return cast(ObjectStore, wrapper[0])

    with local_backend(tmp_path / "data", wrap=wrap, db_class=SignallingDB) as backend:
        assert backend.put(KEY, body).status_code == 200
        answers: list[requests.Response] = []
        completing = run_named("complete", lambda: answers.append(backend.complete(KEY, body)))
        assert wrapper[0].holding.wait(timeout=10)
        deleting = run_named(
            "delete",
            lambda: answers.append(backend.post("/internal/storage/delete", object_key=KEY)),
        )
        completing.join(timeout=10)
        deleting.join(timeout=10)

        assert [answer.status_code for answer in answers] == [200, 200]
        assert backend.store.head(KEY) is None
        assert_rows_only_for_stored_objects(backend)


def test_a_multipart_complete_racing_a_delete_leaves_no_row_for_a_missing_object(
    tmp_path: Path, deleted: threading.Event
) -> None:
    data = os.urandom(2 * SMALL_PART + 1)
    wrapper: list[HeldAfter] = []

    def wrap(real: LocalObjectStore) -> ObjectStore:
        wrapper.append(HeldAfter(real, "complete_multipart", deleted))
        return cast(ObjectStore, wrapper[0])

    with local_backend(tmp_path / "data", wrap=wrap, db_class=SignallingDB) as backend:
        upload_id, etags = backend.upload_parts(KEY, data)
        answers: list[requests.Response] = []
        completing = run_named(
            "complete",
            lambda: answers.append(backend.complete_parts(KEY, upload_id, etags, len(data))),
        )
        assert wrapper[0].holding.wait(timeout=10)
        deleting = run_named(
            "delete",
            lambda: answers.append(backend.post("/internal/storage/delete", object_key=KEY)),
        )
        completing.join(timeout=10)
        deleting.join(timeout=10)

        assert [answer.status_code for answer in answers] == [200, 200]
        assert backend.store.head(KEY) is None
        assert_rows_only_for_stored_objects(backend)


class SignallingAbort(StoreWrapper):
    """A store that says when an abort has run."""

    aborted = threading.Event()

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self.real.abort_multipart(key, upload_id)
        finally:
            self.aborted.set()


def test_a_multipart_complete_racing_its_abort_completes_first_and_whole(
    tmp_path: Path,
) -> None:
    data = os.urandom(2 * SMALL_PART + 1)
    aborted = threading.Event()
    wrapper: list[HeldAfter] = []

    def wrap(real: LocalObjectStore) -> ObjectStore:
        signalling = SignallingAbort(real)
        signalling.aborted = aborted
        wrapper.append(HeldAfter(cast(LocalObjectStore, signalling), "complete_multipart", aborted))
        return cast(ObjectStore, wrapper[0])

    with local_backend(tmp_path / "data", wrap=wrap) as backend:
        upload_id, etags = backend.upload_parts(KEY, data)
        answers: list[requests.Response] = []
        completing = run_named(
            "complete",
            lambda: answers.append(backend.complete_parts(KEY, upload_id, etags, len(data))),
        )
        assert wrapper[0].holding.wait(timeout=10)
        aborting = run_named(
            "abort",
            lambda: answers.append(
                backend.post(
                    "/internal/storage/multipart/abort", object_key=KEY, upload_id=upload_id
                )
            ),
        )
        completing.join(timeout=10)
        aborting.join(timeout=10)

        assert [answer.status_code for answer in answers] == [200, 200]
        assert backend.get(KEY).content == data
        upload = backend.db.get_upload(upload_id)
        assert upload is not None and upload.completed
        assert_rows_only_for_stored_objects(backend)


# -- folders under objects/ ----------------------------------------------------------------


def test_a_key_that_was_a_folder_can_be_an_object_once_its_objects_are_deleted(
    tmp_path: Path,
) -> None:
    with local_backend(tmp_path / "data") as backend:
        assert backend.put("a/b/c", b"deep").status_code == 200
        assert backend.put("a", b"flat").status_code == 400  # "a" is a folder on disk
        assert backend.post("/internal/storage/delete", object_key="a/b/c").status_code == 200

        assert backend.put("a", b"flat").status_code == 200
        assert backend.put("a/b/c", b"deep").status_code == 400  # now "a" is a file

        assert backend.get("a").content == b"flat"
        assert sorted(path.name for path in backend.store.objects_dir.iterdir()) == ["a"]
        assert sorted(path.name for path in backend.store.meta_dir.iterdir()) == ["a"]


def test_deleting_the_last_object_of_a_folder_leaves_no_empty_folder(
    store: LocalObjectStore,
) -> None:
    for key in ("x/y/one", "x/y/two", "x/z"):
        store.receive(UploadGrant(key, "video/mp4", 1, 2**40), io.BytesIO(b"1"))
    store.delete("x/y/one")
    assert (store.objects_dir / "x" / "y").is_dir()

    store.delete("x/y/two")
    assert not (store.objects_dir / "x" / "y").exists()
    assert not (store.meta_dir / "x" / "y").exists()
    store.delete("x/z")

    assert list(store.objects_dir.iterdir()) == []
    assert list(store.meta_dir.iterdir()) == []


def test_pruning_a_folder_never_races_a_publish_into_it(
    store: LocalObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.receive(UploadGrant("a/old", "video/mp4", 1, 2**40), io.BytesIO(b"1"))
    gate = PublishGate(store.objects_dir, "publish", "", hold_before=True)
    deleted = threading.Event()
    gate.released = deleted  # the publish waits at its rename for the delete to be done
    monkeypatch.setattr(os, "replace", gate.replace)
    failures: list[BaseException] = []

    def publish() -> None:
        try:
            store.receive(UploadGrant("a/new", "video/mp4", 3, 2**40), io.BytesIO(b"new"))
        except BaseException as exc:
            failures.append(exc)

    def delete() -> None:
        store.delete("a/old")
        deleted.set()

    one = run_named("publish", publish)
    assert gate.holding.wait(timeout=10)
    two = run_named("delete", delete)
    one.join(timeout=10)
    two.join(timeout=10)

    assert failures == []
    assert store.head("a/new") == ObjectInfo(3, f'"{md5_hex(b"new")}"', crc(b"new"))
    assert store.head("a/old") is None


# -- one server per data directory ---------------------------------------------------------


def test_a_second_store_on_a_data_dir_in_use_is_refused_and_sweeps_nothing(
    tmp_path: Path,
) -> None:
    first = LocalObjectStore(tmp_path / "data", "http://127.0.0.1:1")
    receiving = first.staging_dir / "0123456789abcdef.part"  # a body the first is receiving
    receiving.write_bytes(b"half")

    with pytest.raises(StorageError) as caught:
        LocalObjectStore(tmp_path / "data", "http://127.0.0.1:2")

    assert str(caught.value) == (
        f"data dir {tmp_path / 'data'} is in use by another ctrlupload server (pid {os.getpid()})"
    )
    assert receiving.read_bytes() == b"half"
    first.close()
    first.close()  # closing twice is fine
    with LocalObjectStore(tmp_path / "data", "http://127.0.0.1:2") as second:
        assert not receiving.exists()  # swept by the one store that owns the dir now
        assert second.head("nothing") is None


def test_a_store_on_the_data_dir_of_a_running_server_is_refused(tmp_path: Path) -> None:
    with ServeProcess(tmp_path / "data", cwd=tmp_path) as serve:
        receiving = tmp_path / "data" / "staging" / "0123456789abcdef.part"
        receiving.write_bytes(b"half")

        with pytest.raises(
            StorageError, match=rf"in use by another ctrlupload server \(pid {serve.pid}\)"
        ):
            LocalObjectStore(tmp_path / "data", "http://127.0.0.1:1")
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "ctrlupload",
                "serve",
                "--port",
                "0",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            cwd=tmp_path,
            env=child_env(drop=["BACKEND_SERVICE_TOKEN"]),
            capture_output=True,
            text=True,
            timeout=30,
        )

        assert second.returncode != 0
        assert f"is in use by another ctrlupload server (pid {serve.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        assert receiving.read_bytes() == b"half"


# -- the signing key survives restarts -------------------------------------------------------


def test_a_url_signed_before_a_restart_still_works_after_it(tmp_path: Path) -> None:
    body = b"signed before the restart"
    with LocalObjectStore(tmp_path / "data", "http://127.0.0.1:1") as first:
        signed = first.presign_put(KEY, "video/mp4", len(body), 600)
    query = {
        name: values[0] for name, values in parse_qs(urlsplit(signed.upload_url).query).items()
    }

    with LocalObjectStore(tmp_path / "data", "http://127.0.0.1:2") as second:
        grant = second.authorize(KEY, content_type="video/mp4", content_length=len(body), **query)
        assert second.receive(grant, io.BytesIO(body)).etag == f'"{md5_hex(body)}"'

    key_file = tmp_path / "data" / "signing.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 32


def test_a_given_signing_secret_overrides_the_kept_key(tmp_path: Path) -> None:
    with LocalObjectStore(tmp_path / "data", "http://127.0.0.1:1") as kept:
        signed = kept.presign_put(KEY, "video/mp4", 4, 600)
    query = {
        name: values[0] for name, values in parse_qs(urlsplit(signed.upload_url).query).items()
    }

    with LocalObjectStore(
        tmp_path / "data", "http://127.0.0.1:1", signing_secret=b"s" * 32
    ) as given:
        with pytest.raises(UploadRejected):
            given.authorize(KEY, content_type="video/mp4", content_length=4, **query)
        resigned = given.presign_put(KEY, "video/mp4", 4, 600)
    assert resigned.upload_url != signed.upload_url


def test_a_damaged_signing_key_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "signing.key").write_bytes(b"short")

    with pytest.raises(StorageError, match=r"signing\.key holds 5 bytes"):
        LocalObjectStore(tmp_path / "data", "http://127.0.0.1:1")
    # The lock was given up with the failed start.
    LocalObjectStore(tmp_path / "data", "http://127.0.0.1:1", signing_secret=b"s" * 32).close()
