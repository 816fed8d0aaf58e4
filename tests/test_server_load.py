"""Functional load tests of the reference backend (local store) on loopback sockets.

A small version of ``benchmarks/bench_reference_backend.py``: concurrent streamed
uploads through one shared provider all land intact, and a client that hangs up
mid-PUT leaves no object, no row and nothing in the staging directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from ctrlupload import BackendPresignedStorageProvider, StorageResult
from ctrlupload.server import ReferenceServer
from tests.conftest import backend_settings, wait_until
from tests.support.raw_client import hang_up, presign_put, start_partial_put

MIB = 1024 * 1024
WORKERS = 8
UPLOAD_BYTES = 4 * MIB


def _data_dir(server: ReferenceServer) -> Path:
    return Path(server.config.data_dir)


def _provider(server: ReferenceServer) -> BackendPresignedStorageProvider:
    return BackendPresignedStorageProvider(
        backend_settings(
            server.base_url,
            BACKEND_SERVICE_TOKEN=server.token,
            STORAGE_MAX_CONNECTIONS=WORKERS,
            STORAGE_VERIFY_MD5=True,
        )
    )


def test_eight_concurrent_streamed_uploads_through_one_provider_all_round_trip(
    reference_server: ReferenceServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sources = []
    for index in range(WORKERS):
        path = tmp_path / f"render-{index}.mp4"
        path.write_bytes(os.urandom(UPLOAD_BYTES))
        sources.append(path)
    keys = [f"videos/V-LOAD/S-1/JOB-{index}/video.mp4" for index in range(WORKERS)]
    # Every worker waits for the others, so all eight bodies are in flight together.
    all_started = threading.Barrier(WORKERS, timeout=10)

    with _provider(reference_server) as storage:

        def upload(index: int) -> StorageResult:
            all_started.wait()
            return storage.put_file(sources[index], keys[index])

        with caplog.at_level(logging.WARNING), ThreadPoolExecutor(WORKERS) as pool:
            results = list(pool.map(upload, range(WORKERS)))

    # The pool holds one connection per worker: urllib3 never discarded one.
    assert [r.getMessage() for r in caplog.records if r.name.startswith("urllib3")] == []
    data_dir = _data_dir(reference_server)
    with requests.Session() as downloads:
        for source, key, result in zip(sources, keys, results, strict=True):
            body = source.read_bytes()
            digest = hashlib.md5(body).hexdigest()
            assert result.key == key
            assert result.size_bytes == UPLOAD_BYTES
            assert result.etag == f'"{digest}"'
            downloaded = downloads.get(result.url, timeout=10)
            assert downloaded.status_code == 200
            assert downloaded.content == body
            row = reference_server.db.get(key)
            assert row is not None
            assert (row.size_bytes, row.etag) == (UPLOAD_BYTES, f'"{digest}"')
            assert (data_dir / "objects" / key).stat().st_size == UPLOAD_BYTES
    assert list((data_dir / "staging").iterdir()) == []


def _abandon_put_mid_body(
    server: ReferenceServer, key: str, *, reset: bool, announced: int = 64 * MIB
) -> None:
    """Start a signed PUT of ``announced`` bytes, send 1 MiB, then hang up."""
    staging = _data_dir(server) / "staging"
    presign = presign_put(server.base_url, server.token, key, "video/mp4", announced)
    conn = start_partial_put(presign["upload_url"], presign["headers"], announced, MIB)
    try:
        # Proof the server was streaming this body to disk before the client left.
        assert wait_until(
            lambda: any(part.stat().st_size == MIB for part in staging.glob("*.part"))
        ), "the server never staged the first MiB"
    finally:
        hang_up(conn, reset=reset)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_client_that_hangs_up_mid_put_leaves_no_object_row_or_staging_file(
    reference_server: ReferenceServer, tmp_path: Path, reset: bool
) -> None:
    key = "videos/V-LOAD/S-1/JOB-GONE/video.mp4"
    data_dir = _data_dir(reference_server)

    _abandon_put_mid_body(reference_server, key, reset=reset)

    assert wait_until(lambda: not any((data_dir / "staging").iterdir()))
    assert not (data_dir / "objects" / key).exists()
    assert reference_server.db.get(key) is None
    # Completing the abandoned upload is refused: there is no object to record.
    refused = requests.post(
        f"{reference_server.base_url}/internal/storage/complete",
        json={
            "object_key": key,
            "etag": '"00000000000000000000000000000000"',
            "size_bytes": 64 * MIB,
            "content_type": "video/mp4",
            "public_url": f"{reference_server.base_url}/files/{key}",
        },
        headers={"Authorization": f"Bearer {reference_server.token}"},
        timeout=5,
    )
    assert refused.status_code == 409
    assert reference_server.db.get(key) is None
    # The server is unharmed and the key is not poisoned: a full upload of it works.
    source = tmp_path / "retry.mp4"
    source.write_bytes(os.urandom(MIB))
    with _provider(reference_server) as storage:
        result = storage.put_file(source, key)
    assert (data_dir / "objects" / key).read_bytes() == source.read_bytes()
    row = reference_server.db.get(key)
    assert row is not None
    assert row.etag == result.etag


def test_client_reset_mid_put_is_not_logged_as_a_server_failure(
    reference_server: ReferenceServer, caplog: pytest.LogCaptureFixture
) -> None:
    def server_errors() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name.startswith("ctrlupload") and r.levelno >= logging.ERROR
        ]

    with caplog.at_level(logging.INFO, logger="ctrlupload.server"):
        _abandon_put_mid_body(reference_server, "videos/V-LOAD/S-1/JOB-RST/video.mp4", reset=True)
        wait_until(lambda: bool(server_errors()), timeout_s=2)

    assert [r.getMessage() for r in server_errors()] == []
