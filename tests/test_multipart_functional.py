"""Multipart uploads end to end over real sockets: client -> reference backend -> store.

Against the local store (which checks signatures and lengths like S3) and against the
s3 store on moto's S3 server: round trips of several parts, parallel uploads on one
client, abort after a part fails for good, and resume after the uploading process was
killed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from ctrlupload import BackendPresignedStorageProvider, Settings, StorageTransferError
from ctrlupload.protocol import MIB
from ctrlupload.server import AssetDB, LocalObjectStore, PresignedPut, ReferenceBackend, WSGIServer
from tests.conftest import RecordingProgress

TOKEN = "multipart-token-123"
PART = 5 * MIB
KEY = "videos/V-001/S-001/JOB-9/video.mp4"


@dataclass
class PartCounter:
    """WSGI middleware that records every part PUT the backend receives."""

    app: Any
    puts: list[tuple[int, int]] = field(default_factory=list)  # (part number, bytes)
    #: (upload id, part number) of the same PUTs: a killed child's last request can be
    #: counted after the test moved on (the server reads its head late).
    uploads: list[tuple[str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ["REQUEST_METHOD"] == "PUT" and path.startswith("/upload-part/"):
            upload_id, _, number_text = path[len("/upload-part/") :].partition("/")
            number = int(number_text)
            with self.lock:
                self.puts.append((number, int(environ.get("CONTENT_LENGTH") or 0)))
                self.uploads.append((upload_id, number))
        result: Iterable[bytes] = self.app(environ, start_response)
        return result


@dataclass
class Running:
    base_url: str
    store: Any
    db: AssetDB
    counter: PartCounter

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "BACKEND_BASE_URL": self.base_url,
            "BACKEND_SERVICE_TOKEN": TOKEN,
            "STORAGE_MULTIPART_THRESHOLD_BYTES": PART,
            "STORAGE_MULTIPART_PART_BYTES": PART,
            "STORAGE_MULTIPART_CONCURRENCY": 3,
            "VIDEO_MAX_UPLOAD_BYTES": 1024 * MIB,
            "STORAGE_RETRY_ATTEMPTS": 2,
            "STORAGE_RETRY_BACKOFF_S": 0.01,
            "STORAGE_CONNECT_TIMEOUT_S": 2,
        }
        values.update(overrides)
        return Settings.from_mapping(values)

    def client(self, **overrides: Any) -> BackendPresignedStorageProvider:
        return BackendPresignedStorageProvider(self.settings(**overrides))


StartBackend = Callable[..., Running]


@pytest.fixture
def start_backend(tmp_path: Path) -> Iterator[StartBackend]:
    """Start the reference backend around a given store (local by default)."""
    servers: list[tuple[WSGIServer, AssetDB]] = []

    def start(make_store: Callable[[str], Any] | None = None) -> Running:
        server = WSGIServer(None, "127.0.0.1", 0).start()
        base_url = f"http://127.0.0.1:{server.port}"
        store = (
            make_store(base_url)
            if make_store
            else LocalObjectStore(tmp_path / f"data{len(servers)}", base_url)
        )
        db = AssetDB(tmp_path / f"assets{len(servers)}.sqlite3")
        counter = PartCounter(ReferenceBackend(token=TOKEN, store=store, db=db))
        server.set_app(counter)
        servers.append((server, db))
        return Running(base_url, store, db, counter)

    yield start
    for server, db in servers:
        server.stop()
        db.close()


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


# -- local store ---------------------------------------------------------------------------


def test_file_of_five_parts_round_trips_byte_identical(
    start_backend: StartBackend, tmp_path: Path
) -> None:
    running = start_backend()
    data = write_random(tmp_path / "video.mp4", 4 * PART + 1234)
    progress = RecordingProgress()
    with running.client() as client:
        result = client.put_file(tmp_path / "video.mp4", KEY, progress=progress)
    assert sorted(n for n, _ in running.counter.puts) == [1, 2, 3, 4, 5]
    assert requests.get(result.url, timeout=10).content == data
    md5s = [hashlib.md5(data[i : i + PART]).digest() for i in range(0, len(data), PART)]
    assert result.etag == f'"{hashlib.md5(b"".join(md5s)).hexdigest()}-5"'
    row = running.db.get(KEY)
    assert row is not None and row.size_bytes == len(data) and row.etag == result.etag
    progress.assert_honest(len(data))
    assert len(progress.threads) > 1  # parts really went in parallel


def test_several_multipart_uploads_at_once_on_one_client(
    start_backend: StartBackend, tmp_path: Path
) -> None:
    running = start_backend()
    files = {
        f"videos/V/S/J{n}/video.mp4": write_random(tmp_path / f"{n}.mp4", 3 * PART + n)
        for n in range(4)
    }
    with running.client(STORAGE_MULTIPART_CONCURRENCY=2) as client, ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda n: client.put_file(tmp_path / f"{n}.mp4", f"videos/V/S/J{n}/video.mp4"),
                range(4),
            )
        )
    for result in results:
        assert requests.get(result.url, timeout=10).content == files[result.key]
        parts = -(-result.size_bytes // PART)
        assert result.etag is not None and result.etag.endswith(f'-{parts}"')


class _PartTwoMisSigned(LocalObjectStore):
    """Signs part 2 for one byte more than it holds: every PUT of it gets 403."""

    def presign_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        content_length: int,
        expires_sec: int,
        **options: Any,
    ) -> PresignedPut:
        extra = 1 if part_number == 2 else 0
        return super().presign_part(
            key, upload_id, part_number, content_length + extra, expires_sec, **options
        )


def test_a_part_that_fails_for_good_aborts_and_leaves_nothing(
    start_backend: StartBackend, tmp_path: Path
) -> None:
    running = start_backend(lambda base: _PartTwoMisSigned(tmp_path / "data", base))
    write_random(tmp_path / "video.mp4", 4 * PART)
    with running.client() as client, pytest.raises(StorageTransferError) as caught:
        client.put_file(tmp_path / "video.mp4", KEY)
    assert "Upload of part 2 to presigned URL failed: HTTP 403 (SignatureDoesNotMatch" in str(
        caught.value
    )
    multipart_staging = tmp_path / "data" / "staging" / "multipart"
    assert not multipart_staging.exists() or not any(multipart_staging.iterdir())
    assert running.db.get(KEY) is None
    assert running.store.head(KEY) is None


# -- resume after a kill ---------------------------------------------------------------------

_CHILD = """
import os, signal, sys
from ctrlupload import BackendPresignedStorageProvider, Settings
settings = Settings.from_mapping(dict(arg.split("=", 1) for arg in sys.argv[3:]))
def progress(done, total):
    if done >= total // 2:
        os.kill(os.getpid(), signal.SIGKILL)  # die mid-upload, like a crashed renderer
with BackendPresignedStorageProvider(settings) as client:
    client.put_file(sys.argv[1], sys.argv[2], progress=progress, resume=True)
"""


def _killed_run(running: Running, source: Path, overrides: dict[str, Any]) -> None:
    """Upload with resume=True in a child process that SIGKILLs itself at 50 %."""
    settings = running.settings(**overrides)
    argv = [f"{name}={value}" for name, value in _settings_env(settings).items()]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(source), KEY, *argv],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()


def test_killed_upload_resumes_sending_only_the_missing_parts(
    start_backend: StartBackend, tmp_path: Path
) -> None:
    running = start_backend()
    source = tmp_path / "video.mp4"
    data = write_random(source, 8 * PART + 777)  # 9 parts
    resume_dir = tmp_path / "resume"
    overrides = {"STORAGE_RESUME_DIR": str(resume_dir), "STORAGE_MULTIPART_CONCURRENCY": 2}
    _killed_run(running, source, overrides)
    assert len(list(resume_dir.glob("*.json"))) == 1  # the checkpoint survived the kill
    first_run = {n for n, _ in running.counter.puts}
    running.counter.puts.clear()

    with running.client(**overrides) as client:
        progress = RecordingProgress()
        result = client.put_file(source, KEY, progress=progress, resume=True)

    resent = {n for n, _ in running.counter.puts}
    stored_before = set(range(1, 10)) - resent
    assert stored_before, "the killed run stored no part: nothing was resumed"
    assert stored_before <= first_run
    assert sum(size for _, size in running.counter.puts) < len(data)
    assert requests.get(result.url, timeout=10).content == data
    # Parts kept from the first run count as done before any byte is sent.
    assert progress.done[1] >= len(stored_before) * PART - PART
    progress.assert_honest(len(data))
    assert list(resume_dir.glob("*.json")) == []  # deleted on success


def test_resume_of_a_changed_file_starts_over(start_backend: StartBackend, tmp_path: Path) -> None:
    running = start_backend()
    source = tmp_path / "video.mp4"
    write_random(source, 4 * PART)
    overrides = {"STORAGE_RESUME_DIR": str(tmp_path / "resume")}
    _killed_run(running, source, overrides)
    (checkpoint,) = (tmp_path / "resume").glob("*.json")
    old_upload = json.loads(checkpoint.read_text())["upload_id"]
    data = write_random(source, 4 * PART + 10)  # the render was redone meanwhile
    with running.client(**overrides) as client:
        result = client.put_file(source, KEY, resume=True)
    fresh = [n for upload, n in running.counter.uploads if upload != old_upload]
    assert sorted(fresh) == [1, 2, 3, 4, 5]  # all sent again, to a new upload
    assert requests.get(result.url, timeout=10).content == data


def _settings_env(settings: Settings) -> dict[str, str]:
    values = settings.model_dump(by_alias=True, exclude_none=True)
    token = settings.backend_service_token
    values["BACKEND_SERVICE_TOKEN"] = token.get_secret_value() if token else ""
    return {
        name: str(value.value if hasattr(value, "value") else value)
        for name, value in values.items()
    }


# -- s3 store on moto ------------------------------------------------------------------------


@pytest.fixture
def s3_store_factory(moto_s3: Any, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    from ctrlupload.server._s3store import S3ObjectStore
    from tests.support.moto_server import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_ACCESS_KEY)

    def make(bucket: str, store_class: type[Any] = S3ObjectStore) -> Any:
        return store_class(bucket, endpoint_url=moto_s3.endpoint_url, region="us-east-1")

    return make


def test_multipart_through_the_s3_store_on_moto_round_trips(
    start_backend: StartBackend, s3_store_factory: Callable[..., Any], moto_s3: Any, tmp_path: Path
) -> None:
    bucket = moto_s3.make_bucket()
    running = start_backend(lambda base: s3_store_factory(bucket))
    data = write_random(tmp_path / "video.mp4", 4 * PART + 99)
    with running.client() as client:
        result = client.put_file(tmp_path / "video.mp4", KEY)
    stored = moto_s3.client().get_object(Bucket=bucket, Key=KEY)["Body"].read()
    assert stored == data
    assert result.etag is not None and result.etag.endswith('-5"')
    assert moto_s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_failing_part_on_moto_aborts_and_leaves_no_pending_upload(
    start_backend: StartBackend, s3_store_factory: Callable[..., Any], moto_s3: Any, tmp_path: Path
) -> None:
    from ctrlupload.server._s3store import S3ObjectStore

    class PartTwoUnreachable(S3ObjectStore):  # type: ignore[misc]
        def presign_part(self, *args: Any, **kwargs: Any) -> PresignedPut:
            signed: PresignedPut = super().presign_part(*args, **kwargs)
            part_number = args[2] if len(args) > 2 else kwargs["part_number"]
            if part_number == 2:  # a closed port: connection refused on every attempt
                return PresignedPut(
                    "http://127.0.0.1:9/unreachable?sig=x", signed.headers, signed.expires_sec
                )
            return signed

    bucket = moto_s3.make_bucket()
    running = start_backend(lambda base: s3_store_factory(bucket, PartTwoUnreachable))
    write_random(tmp_path / "video.mp4", 4 * PART)
    with running.client() as client, pytest.raises(StorageTransferError) as caught:
        client.put_file(tmp_path / "video.mp4", KEY)
    assert "part 2" in str(caught.value)
    assert moto_s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert "Contents" not in moto_s3.client().list_objects_v2(Bucket=bucket)


def test_several_multipart_uploads_at_once_through_moto(
    start_backend: StartBackend, s3_store_factory: Callable[..., Any], moto_s3: Any, tmp_path: Path
) -> None:
    bucket = moto_s3.make_bucket()
    running = start_backend(lambda base: s3_store_factory(bucket))
    files = {
        f"videos/V/S/J{n}/video.mp4": write_random(tmp_path / f"{n}.mp4", 4 * PART + n)
        for n in range(3)
    }
    with running.client(STORAGE_MULTIPART_CONCURRENCY=2) as client, ThreadPoolExecutor(3) as pool:
        list(
            pool.map(
                lambda n: client.put_file(tmp_path / f"{n}.mp4", f"videos/V/S/J{n}/video.mp4"),
                range(3),
            )
        )
    s3 = moto_s3.client()
    for key, data in files.items():
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_killed_upload_through_moto_resumes_sending_only_the_missing_parts(
    start_backend: StartBackend, s3_store_factory: Callable[..., Any], moto_s3: Any, tmp_path: Path
) -> None:
    from urllib.parse import parse_qs, urlsplit

    from ctrlupload.server._s3store import S3ObjectStore
    from tests.support.throttle_proxy import ThrottleProxy

    moto = urlsplit(moto_s3.endpoint_url)
    bucket = moto_s3.make_bucket()
    # Uploads reach moto through a counting proxy (no rate cap): moto keeps no request log.
    with ThrottleProxy(str(moto.hostname), int(moto.port or 80), rate_bytes_per_s=None) as proxy:

        def make_store(base: str) -> Any:
            return S3ObjectStore(bucket, endpoint_url=proxy.url, region="us-east-1")

        running = start_backend(make_store)
        source = tmp_path / "video.mp4"
        data = write_random(source, 6 * PART + 55)  # 7 parts
        overrides = {
            "STORAGE_RESUME_DIR": str(tmp_path / "resume"),
            "STORAGE_MULTIPART_CONCURRENCY": 2,
        }
        _killed_run(running, source, overrides)
        # The killed client's last part may still be on its way to moto: a connection
        # ends at the proxy only once moto has answered (or dropped) what it forwarded.
        assert proxy.wait_idle(30), "the proxy still holds connections of the killed run"
        (upload,) = moto_s3.client().list_multipart_uploads(Bucket=bucket)["Uploads"]
        held = moto_s3.client().list_parts(Bucket=bucket, Key=KEY, UploadId=upload["UploadId"])
        stored_before = {part["PartNumber"] for part in held.get("Parts", [])}
        assert stored_before, "the killed run stored no part: nothing to resume"
        proxy.reset()

        with running.client(**overrides) as client:
            client.put_file(source, KEY, resume=True)

        resent = {
            int(parse_qs(urlsplit(request.target).query)["partNumber"][0])
            for connection in proxy.stats().connections
            for request in connection.requests
            if request.method == "PUT" and "partNumber=" in request.target
        }
    assert resent == set(range(1, 8)) - stored_before
    assert moto_s3.client().get_object(Bucket=bucket, Key=KEY)["Body"].read() == data
    assert moto_s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
