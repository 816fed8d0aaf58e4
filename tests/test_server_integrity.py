"""The local store and the reference app keep objects and records whole and consistent.

A crash between publishing an object and cleaning up after it, concurrent PUTs, GETs
and deletes of one key, and a second server on the same data directory: each ends
with every object whole, its ETag its own, and a record only for an object that exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from ctrlupload.protocol import multipart_etag
from ctrlupload.server import StoredPart
from tests.support.local_backend import SMALL_PART, local_backend, md5_hex
from tests.support.serve_process import REPO_ROOT, child_env

KEY = "videos/V-001/S-001/JOB-123/video.mp4"


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
        assert backend.store.head(KEY) == type(stored)(len(data), parts_etag(data))
