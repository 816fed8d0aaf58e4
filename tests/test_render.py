"""upload_render: a render's assets as one unit, against real loopback backends.

The reference backend (multipart and the set-level complete), the seed-only backend
(three endpoints, like the production Spring one), the local provider and moto. Each
failure test checks what is left behind: no row at the backend, no object in storage.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from ctrlupload import (
    BackendPresignedStorageProvider,
    InvalidKeyError,
    LocalStorageProvider,
    RenderUpload,
    RenderUploadError,
    Settings,
    StorageConfigError,
    StorageError,
    StorageUploadError,
    UploadCancelled,
    upload_render,
)
from ctrlupload.server._store import UploadRejected
from tests.conftest import backend_settings
from tests.support.local_backend import (
    TOKEN,
    LocalBackend,
    StoreWrapper,
    local_backend,
)
from tests.support.servers import FakeBackend, RawBody, Status, StorageSink
from tests.test_s3_provider import aws_env  # noqa: F401 - the fixture, used by name

#: The smallest part S3 (and the settings) allow.
PART = 5 * 1024 * 1024
IDS = ("V-001", "S-001", "JOB-123")
PREFIX = "videos/V-001/S-001/JOB-123/"
KEYS = {
    "video": PREFIX + "video.mp4",
    "subtitles": PREFIX + "subtitles.srt",
    "thumbnail": PREFIX + "thumb.jpg",
}


@pytest.fixture
def render_files(tmp_path: Path) -> dict[str, Path]:
    """A small render: a multipart-sized video, an srt and a jpg."""
    import os

    folder = tmp_path / "render"
    folder.mkdir()
    files = {
        "video": folder / "video.mp4",
        "subtitles": folder / "subtitles.srt",
        "thumbnail": folder / "thumb.jpg",
    }
    files["video"].write_bytes(os.urandom(3 * PART + 123))
    files["subtitles"].write_text("1\n00:00:00,000 --> 00:00:01,000\nhi\n", encoding="utf-8")
    files["thumbnail"].write_bytes(b"\xff\xd8" + os.urandom(3000) + b"\xff\xd9")
    return files


class CallLog:
    """The backend calls a provider makes, spied on its own transport."""

    def __init__(self, provider: BackendPresignedStorageProvider) -> None:
        self.paths: list[str] = []
        self._lock = threading.Lock()
        transport = provider._transport
        real = transport.post_json

        def post_json(url: str, payload: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.paths.append(url.split("/internal/storage/", 1)[1])
            return real(url, payload, **kwargs)

        transport.post_json = post_json  # type: ignore[method-assign]

    def count(self, name: str) -> int:
        return self.paths.count(name)


@pytest.fixture
def reference(tmp_path: Path) -> Iterator[LocalBackend]:
    with local_backend(tmp_path / "backend") as running:
        yield running


def reference_provider(backend: LocalBackend, **overrides: Any) -> BackendPresignedStorageProvider:
    values: dict[str, Any] = {
        "BACKEND_SERVICE_TOKEN": TOKEN,
        "STORAGE_MULTIPART_THRESHOLD_BYTES": 2 * PART,
        "STORAGE_MULTIPART_PART_BYTES": PART,
    }
    values.update(overrides)
    settings = backend_settings(backend.base_url, **values)
    return BackendPresignedStorageProvider(settings)


def stored_bytes(backend: LocalBackend, key: str) -> bytes | None:
    answer = requests.get(f"{backend.base_url}/files/{key}", timeout=10)
    return answer.content if answer.status_code == 200 else None


def assert_nothing_left(backend: LocalBackend) -> None:
    assert backend.db.all() == []
    for key in KEYS.values():
        assert backend.store.head(key) is None, key
    assert [row for row in backend.db.uploads() if not row.completed] == []


# -- the happy paths -------------------------------------------------------------------


def test_reference_backend_records_the_render_in_one_call(
    reference: LocalBackend, render_files: dict[str, Path]
) -> None:
    with reference_provider(reference) as storage:
        calls = CallLog(storage)
        result = upload_render(
            storage,
            *IDS,
            video=render_files["video"],
            subtitles=render_files["subtitles"],
            thumbnail=render_files["thumbnail"],
        )
    assert isinstance(result, RenderUpload)
    for asset, key in KEYS.items():
        stored = getattr(result, asset)
        assert stored.key == key
        assert stored.size_bytes == render_files[asset].stat().st_size
        assert stored_bytes(reference, key) == render_files[asset].read_bytes()
    assert [row.object_key for row in reference.db.all()] == sorted(KEYS.values())
    # The video went up in parts; nothing was recorded asset by asset.
    assert calls.count("multipart/initiate") == 1
    assert calls.count("complete-set") == 1
    assert calls.count("complete") == 0
    assert calls.count("multipart/complete") == 0
    assert calls.paths[-1] == "complete-set"
    assert result.video is not None and result.video.etag is not None
    assert result.video.etag.strip('"').endswith("-4")
    assert result.as_dict()["video"]["key"] == KEYS["video"]  # type: ignore[index]


def test_a_seed_only_backend_gets_complete_asset_by_asset_after_every_put(
    sink: StorageSink, backend: FakeBackend, render_files: dict[str, Path]
) -> None:
    """The production backend implements the seed's three endpoints only."""
    settings = backend_settings(backend.base_url)
    with BackendPresignedStorageProvider(settings) as storage:
        calls = CallLog(storage)
        for _ in range(2):  # the missing call is learnt once per provider
            upload_render(
                storage,
                *IDS,
                video=render_files["video"],
                subtitles=render_files["subtitles"],
                thumbnail=render_files["thumbnail"],
            )
    assert calls.count("complete-set") == 1
    assert calls.count("complete") == 6
    assert calls.count("presign-put") == 6
    # Within each render, every complete comes after every presign (so after the PUTs).
    first = calls.paths[: len(calls.paths) // 2 + 1]
    last_presign = max(i for i, p in enumerate(first) if p == "presign-put")
    first_complete = min(i for i, p in enumerate(first) if p == "complete")
    assert last_presign < first_complete
    for asset, key in KEYS.items():
        assert sink.objects[key] == render_files[asset].read_bytes()
    assert sorted(body["object_key"] for body in backend.completed) == sorted(
        list(KEYS.values()) * 2
    )


def test_the_local_provider_writes_the_render(
    tmp_path: Path, render_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="ctrlupload"),
        LocalStorageProvider(Settings(storage_local_root=tmp_path / "store")) as storage,
    ):
        result = upload_render(storage, *IDS, video=render_files["video"])
    lines = [r.getMessage() for r in caplog.records if r.name == "ctrlupload"]
    assert any(
        line.startswith(f"uploaded {KEYS['video']}: 15.0 MiB in ") and line.endswith(", 1 attempt)")
        for line in lines
    )
    assert result.subtitles is None and result.thumbnail is None
    assert result.video is not None
    assert (tmp_path / "store" / KEYS["video"]).read_bytes() == render_files["video"].read_bytes()


def test_progress_is_one_total_that_is_reached_only_once_recorded(
    reference: LocalBackend, render_files: dict[str, Path]
) -> None:
    total = sum(path.stat().st_size for path in render_files.values())
    seen: list[tuple[int, int]] = []
    rows_at_total: list[int] = []
    ends: list[bool] = []

    class Recorder:
        def __call__(self, done: int, of: int) -> None:
            seen.append((done, of))
            if done == of:
                rows_at_total.append(len(reference.db.all()))

        def on_end(self, ok: bool) -> None:
            ends.append(ok)

    with reference_provider(reference) as storage:
        upload_render(
            storage,
            *IDS,
            video=render_files["video"],
            subtitles=render_files["subtitles"],
            thumbnail=render_files["thumbnail"],
            progress=Recorder(),
        )
    assert seen[0] == (0, total)
    assert {of for _, of in seen} == {total}
    values = [done for done, _ in seen]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert values[-1] == total and values.count(total) == 1
    assert rows_at_total == [3]  # the total came after all three rows existed
    assert ends == [True]


def test_each_finished_upload_logs_one_info_line_without_secrets(
    reference: LocalBackend, render_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="ctrlupload"), reference_provider(reference) as s:
        upload_render(s, *IDS, video=render_files["video"], subtitles=render_files["subtitles"])
    lines = [r.getMessage() for r in caplog.records if r.name == "ctrlupload"]
    uploaded = [line for line in lines if line.startswith("uploaded videos/")]
    assert len(uploaded) == 2
    video_line = next(line for line in uploaded if "video.mp4" in line)
    assert "15.0 MiB in " in video_line and "MiB/s, 4 attempts)" in video_line
    assert any(line.startswith("uploaded render V-001/S-001/JOB-123: 2 assets") for line in lines)
    assert any("multipart upload" in line and "started" in line for line in lines)
    for record in caplog.records:
        text = record.getMessage()
        assert TOKEN not in text
        assert "signature=" not in text.lower() and "X-Amz-Signature" not in text


# -- checks before any network call ----------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "problem"),
    [
        (("", "S", "J"), "video_id must be non-empty"),
        (("V", "a/b", "J"), "script_id must be non-empty and must not contain '/'"),
        (("V", "S", "."), "job_id must not be '.'"),
        (("V", "..", "J"), "script_id must not be '..'"),
        (("V", "S", "J\n"), "control characters"),
        (("V", 7, "J"), "script_id must be a str"),
    ],
)
def test_bad_ids_fail_before_any_network_call(
    sink: StorageSink, backend: FakeBackend, render_files: dict[str, Path], ids: Any, problem: str
) -> None:
    with (
        BackendPresignedStorageProvider(backend_settings(backend.base_url)) as storage,
        pytest.raises(InvalidKeyError, match=problem),
    ):
        upload_render(storage, *ids, video=render_files["video"])
    assert backend.requests == [] and sink.requests == []


def test_a_missing_file_or_an_oversized_asset_fails_before_any_network_call(
    sink: StorageSink, backend: FakeBackend, render_files: dict[str, Path], tmp_path: Path
) -> None:
    settings = backend_settings(backend.base_url, VIDEO_MAX_UPLOAD_BYTES=2000)
    with BackendPresignedStorageProvider(settings) as storage:
        with pytest.raises(RenderUploadError) as missing:
            upload_render(
                storage,
                *IDS,
                video=render_files["subtitles"],
                subtitles=tmp_path / "nope.srt",
            )
        with pytest.raises(RenderUploadError) as large:
            upload_render(
                storage,
                *IDS,
                video=render_files["subtitles"],
                thumbnail=render_files["thumbnail"],
            )
        with pytest.raises(StorageConfigError, match="max_workers"):
            upload_render(storage, *IDS, video=render_files["video"], max_workers=0)
    assert missing.value.asset == "subtitles" and missing.value.phase == "source"
    assert large.value.asset == "thumbnail"
    assert "VIDEO_MAX_UPLOAD_BYTES=2000" in str(large.value)
    assert large.value.code == "STORAGE_UPLOAD_FAILED"
    assert backend.requests == [] and sink.requests == []


# -- all or nothing --------------------------------------------------------------------


class RefusingThumbnails(StoreWrapper):
    """The store refuses every PUT of a thumbnail, as S3 refuses a bad signature."""

    def authorize(self, key: str, **kwargs: Any) -> Any:
        if key.endswith("thumb.jpg"):
            raise UploadRejected(403, "AccessDenied", "Access Denied")
        return self.real.authorize(key, **kwargs)


def test_a_failed_asset_removes_the_others_and_the_backend_keeps_no_row(
    tmp_path: Path, render_files: dict[str, Path]
) -> None:
    with local_backend(tmp_path / "backend", wrap=RefusingThumbnails) as running:
        with reference_provider(running) as storage:
            calls = CallLog(storage)
            with pytest.raises(RenderUploadError) as caught:
                upload_render(
                    storage,
                    *IDS,
                    video=render_files["video"],
                    subtitles=render_files["subtitles"],
                    thumbnail=render_files["thumbnail"],
                )
        assert_nothing_left(running)
    error = caught.value
    assert error.asset == "thumbnail"
    assert isinstance(error, StorageUploadError) and error.code == "STORAGE_UPLOAD_FAILED"
    assert str(error).startswith(f"Storage upload failed for '{KEYS['thumbnail']}': ")
    assert error.status_code == 403
    assert isinstance(error.__cause__, StorageUploadError)
    assert calls.count("complete-set") == 0 and calls.count("complete") == 0
    notes = " ".join(getattr(error, "__notes__", []))
    assert "Aborting" not in notes  # the abort worked, so it is not a note


class MismatchedAtRecord(StoreWrapper):
    """HEAD shows the subtitles with a wrong size, so recording them must fail."""

    def head(self, key: str) -> Any:
        info = self.real.head(key)
        if info is not None and key.endswith(".srt"):
            return type(info)(size_bytes=info.size_bytes + 1, etag=info.etag)
        return info


def test_a_refused_set_complete_removes_every_asset(
    tmp_path: Path, render_files: dict[str, Path]
) -> None:
    with local_backend(tmp_path / "backend", wrap=MismatchedAtRecord) as running:
        with reference_provider(running) as storage, pytest.raises(RenderUploadError) as caught:
            upload_render(
                storage,
                *IDS,
                video=render_files["video"],
                subtitles=render_files["subtitles"],
                thumbnail=render_files["thumbnail"],
            )
        assert_nothing_left(running)
    assert caught.value.asset == "subtitles"
    assert caught.value.phase == "complete-set"
    assert caught.value.status_code == 409
    notes = "\n".join(caught.value.__notes__)
    for key in KEYS.values():
        assert f"{key} was stored and has been deleted again." in notes


def test_a_seed_only_backend_that_fails_one_complete_gets_the_recorded_ones_deleted(
    sink: StorageSink, backend: FakeBackend, render_files: dict[str, Path]
) -> None:
    backend.inject("/internal/storage/complete", RawBody(200, b'{"status": "ok"}'), Status(400))
    with (
        BackendPresignedStorageProvider(backend_settings(backend.base_url)) as storage,
        pytest.raises(RenderUploadError) as caught,
    ):
        upload_render(
            storage, *IDS, video=render_files["video"], subtitles=render_files["subtitles"]
        )
    assert caught.value.asset == "subtitles"
    assert caught.value.phase == "complete"
    assert sorted(body["object_key"] for body in backend.deleted) == sorted(
        [KEYS["video"], KEYS["subtitles"]]
    )


# -- cancellation ----------------------------------------------------------------------


def test_cancel_stops_the_render_and_removes_what_it_stored(
    reference: LocalBackend, render_files: dict[str, Path]
) -> None:
    cancel = threading.Event()
    ends: list[bool] = []

    class CancelHalfway:
        def __call__(self, done: int, total: int) -> None:
            if done >= 2 * PART:
                cancel.set()

        def on_end(self, ok: bool) -> None:
            ends.append(ok)

    with (
        reference_provider(reference, STORAGE_MULTIPART_CONCURRENCY=1) as storage,
        pytest.raises(UploadCancelled) as caught,
    ):
        upload_render(
            storage,
            *IDS,
            video=render_files["video"],
            subtitles=render_files["subtitles"],
            thumbnail=render_files["thumbnail"],
            progress=CancelHalfway(),
            cancel=cancel,
            max_workers=1,
        )
    assert not isinstance(caught.value, StorageUploadError)
    assert isinstance(caught.value, StorageError)
    assert ends == [False]
    assert_nothing_left(reference)


def test_cancel_set_before_the_call_sends_nothing(
    sink: StorageSink, backend: FakeBackend, render_files: dict[str, Path]
) -> None:
    cancel = threading.Event()
    cancel.set()
    with BackendPresignedStorageProvider(backend_settings(backend.base_url)) as storage:
        with pytest.raises(UploadCancelled):
            upload_render(storage, *IDS, video=render_files["video"], cancel=cancel)
        with pytest.raises(UploadCancelled):
            storage.put_file(render_files["video"], KEYS["video"], cancel=cancel)
    assert backend.requests == [] and sink.requests == []


def test_put_file_cancel_aborts_a_multipart_upload(
    reference: LocalBackend, render_files: dict[str, Path]
) -> None:
    cancel = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= PART:
            cancel.set()

    with reference_provider(reference, STORAGE_MULTIPART_CONCURRENCY=1) as storage:
        calls = CallLog(storage)
        with pytest.raises(UploadCancelled) as caught:
            storage.put_file(
                render_files["video"], KEYS["video"], progress=progress, cancel=cancel, resume=True
            )
    assert caught.value.key == KEYS["video"]
    assert calls.count("multipart/abort") == 1
    assert_nothing_left(reference)


def test_ctrl_c_keeps_a_resumable_upload_and_the_same_call_resumes_it(
    reference: LocalBackend, render_files: dict[str, Path], tmp_path: Path
) -> None:
    """Unlike cancel=, a KeyboardInterrupt during put_file(resume=True) keeps the upload."""
    data = render_files["video"].read_bytes()

    def interrupt(done: int, total: int) -> None:
        if done >= PART:
            raise KeyboardInterrupt

    resume = {"STORAGE_RESUME_DIR": str(tmp_path / "resume"), "STORAGE_MULTIPART_CONCURRENCY": 1}
    with reference_provider(reference, **resume) as storage:
        calls = CallLog(storage)
        with pytest.raises(KeyboardInterrupt):
            storage.put_file(render_files["video"], KEYS["video"], progress=interrupt, resume=True)
        assert calls.count("multipart/abort") == 0
        pending = [row for row in reference.db.uploads() if not row.completed]
        assert len(pending) == 1
        assert list((tmp_path / "resume").iterdir())
    with reference_provider(reference, **resume) as storage:
        calls = CallLog(storage)
        result = storage.put_file(render_files["video"], KEYS["video"], resume=True)
    assert calls.count("multipart/initiate") == 0 and calls.count("multipart/list-parts") == 1
    assert stored_bytes(reference, KEYS["video"]) == data
    assert result.size_bytes == len(data)
    assert list((tmp_path / "resume").iterdir()) == []


def test_cancel_ends_a_retry_wait_at_once(
    make_file: Callable[[int, str], Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Storage refuses connections and the backoff is a minute: cancel still stops it."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]

    class DeadStorage:
        base_url = f"http://127.0.0.1:{dead}"

    with FakeBackend(DeadStorage(), token=TOKEN) as backend:  # type: ignore[arg-type]
        settings = backend_settings(
            backend.base_url,
            BACKEND_SERVICE_TOKEN=TOKEN,
            STORAGE_RETRY_ATTEMPTS=5,
            STORAGE_RETRY_BACKOFF_S=60,
            STORAGE_RETRY_BACKOFF_MAX_S=60,
        )
        path = make_file(1000, "video.mp4")
        cancel = threading.Event()
        outcome: list[BaseException] = []
        waiting = threading.Event()

        class Spotter(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "retrying in" in record.getMessage():
                    waiting.set()

        spotter = Spotter()
        logging.getLogger("ctrlupload.retry").addHandler(spotter)
        try:
            with (
                caplog.at_level(logging.INFO, logger="ctrlupload.retry"),
                BackendPresignedStorageProvider(settings) as storage,
            ):

                def run() -> None:
                    try:
                        storage.put_file(path, KEYS["video"], cancel=cancel)
                    except BaseException as exc:
                        outcome.append(exc)

                worker = threading.Thread(target=run)
                worker.start()
                assert waiting.wait(30)
                cancel.set()
                worker.join(30)  # a wait that ignored cancel would take 60 s
                assert not worker.is_alive()
        finally:
            logging.getLogger("ctrlupload.retry").removeHandler(spotter)
    assert len(outcome) == 1 and isinstance(outcome[0], UploadCancelled)
    lines = [r.getMessage() for r in caplog.records if r.name == "ctrlupload.retry"]
    assert lines[0].startswith("PUT http://127.0.0.1:")
    assert lines[0].endswith(": retrying in 60.0 s (attempt 2/5): connection refused")
    assert "?[redacted]" in lines[0] or "?" not in lines[0]


# -- the s3 provider ---------------------------------------------------------------------


@pytest.mark.usefixtures("aws_env")
def test_the_s3_provider_uploads_a_render(moto_s3: Any, render_files: dict[str, Path]) -> None:
    from ctrlupload import S3StorageProvider

    bucket = moto_s3.make_bucket()
    settings = Settings.from_mapping(
        {
            "STORAGE_PROVIDER": "minio",
            "STORAGE_S3_BUCKET": bucket,
            "STORAGE_S3_ENDPOINT_URL": moto_s3.endpoint_url,
            "STORAGE_MULTIPART_THRESHOLD_BYTES": PART,
            "STORAGE_MULTIPART_PART_BYTES": PART,
        }
    )
    with S3StorageProvider(settings) as storage:
        result = upload_render(
            storage,
            *IDS,
            video=render_files["video"],
            subtitles=render_files["subtitles"],
        )
        client = moto_s3.client()
        for asset in ("video", "subtitles"):
            body = client.get_object(Bucket=bucket, Key=KEYS[asset])["Body"].read()
            assert body == render_files[asset].read_bytes()
    assert result.video is not None and result.subtitles is not None
    assert result.video.etag is not None and result.video.etag.endswith('-4"')
    subtitles = render_files["subtitles"].read_bytes()
    assert result.subtitles.etag == f'"{hashlib.md5(subtitles).hexdigest()}"'


def test_a_progress_callback_that_raises_stops_the_render_with_its_own_error(
    reference: LocalBackend, render_files: dict[str, Path]
) -> None:
    class Broken(Exception):
        pass

    def at_start(done: int, total: int) -> None:
        raise Broken("at the first call")

    def midway(done: int, total: int) -> None:
        if done > PART:
            raise Broken("midway")

    with reference_provider(reference) as storage:
        for callback in (at_start, midway):
            with pytest.raises(Broken):
                upload_render(
                    storage,
                    *IDS,
                    video=render_files["video"],
                    subtitles=render_files["subtitles"],
                    progress=callback,
                )
            assert_nothing_left(reference)
    with pytest.raises(StorageError, match="is closed"):
        upload_render(storage, *IDS, video=render_files["video"])
