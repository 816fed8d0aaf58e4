"""The upload engine over the signer seam, with an in-process signer.

``InProcessSigner`` holds "credentials" itself, the way a later S3 signer will: it
signs URLs into a loopback :class:`StorageSink` and keeps the books in memory. The
engine runs unchanged on it. Also here: cleanups registered the moment a multipart
upload exists, and part URLs that are signed outside the lock and fail once.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from ctrlupload import BackendError, Settings
from ctrlupload._errors import PartStopped
from ctrlupload.engine import (
    CompletedUpload,
    MultipartUpload,
    SignedPut,
    Signer,
    StoredPart,
    UploadEngine,
)
from ctrlupload.engine._multipart import FailureCleanups, PartUrls
from ctrlupload.engine._streams import CallbackFailed, open_source
from ctrlupload.protocol import multipart_etag
from ctrlupload.providers._backend import transport_for
from tests.support.servers import StorageSink

MIB = 1024 * 1024
KEY = "videos/V/S/J/video.mp4"


class InProcessSigner:
    """Signs into a StorageSink and records every call; multipart in memory."""

    def __init__(self, sink: StorageSink) -> None:
        self.sink = sink
        self.calls: list[str] = []
        self.uploads: dict[str, str] = {}  # upload id -> key, while pending
        self.completed: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def _note(self, name: str) -> None:
        with self._lock:
            self.calls.append(name)

    def presign_put(self, key: str, content_type: str, size_bytes: int) -> SignedPut:
        self._note("presign_put")
        return SignedPut(
            f"{self.sink.base_url}/{key}",
            {"Content-Type": content_type},
            None,
            f"https://cdn.test/{key}",
        )

    def complete(
        self, key: str, etag: str, size_bytes: int, content_type: str, public_url: str
    ) -> None:
        self._note("complete")
        self.completed[key] = (etag, size_bytes)

    def delete(self, key: str) -> None:
        self._note("delete")

    def initiate(
        self, key: str, content_type: str, size_bytes: int, part_size: int
    ) -> MultipartUpload | None:
        self._note("initiate")
        upload_id = f"up{len(self.uploads) + len(self.completed)}"
        self.uploads[upload_id] = key
        return MultipartUpload(upload_id, part_size)

    def presign_parts(
        self, key: str, upload_id: str, part_numbers: Sequence[int]
    ) -> Mapping[int, SignedPut]:
        self._note("presign_parts")
        return {n: SignedPut(f"{self.sink.base_url}/{upload_id}.part{n}") for n in part_numbers}

    def list_parts(self, key: str, upload_id: str) -> list[StoredPart] | None:
        self._note("list_parts")
        return []

    def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[tuple[int, str]],
        size_bytes: int,
        content_type: str,
    ) -> CompletedUpload:
        self._note("complete_multipart")
        body = b"".join(self.sink.objects[f"{upload_id}.part{n}"] for n, _ in parts)
        assert len(body) == size_bytes
        self.sink.objects[key] = body
        del self.uploads[upload_id]
        etag = multipart_etag([etag.strip('"') for _, etag in parts])
        self.completed[key] = (etag, size_bytes)
        return CompletedUpload(f"https://cdn.test/{key}", etag)

    def abort(self, key: str, upload_id: str) -> None:
        self._note("abort")
        self.uploads.pop(upload_id, None)

    def close(self) -> None:
        pass


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "STORAGE_RETRY_ATTEMPTS": 2,
        "STORAGE_RETRY_BACKOFF_S": 0.01,
        "STORAGE_READ_TIMEOUT_S": 5,
        "STORAGE_MULTIPART_PART_BYTES": 5 * MIB,
        "STORAGE_MULTIPART_THRESHOLD_BYTES": 5 * MIB,
        "VIDEO_MAX_UPLOAD_BYTES": 64 * MIB,
    }
    values.update(overrides)
    return Settings.from_mapping(values)


@pytest.fixture
def signer(sink: StorageSink) -> InProcessSigner:
    return InProcessSigner(sink)


@pytest.fixture
def make_engine(signer: InProcessSigner) -> Iterator[Callable[..., UploadEngine]]:
    transports = []

    def make(**overrides: Any) -> UploadEngine:
        s = settings(**overrides)
        transport = transport_for(s)
        transports.append(transport)
        return UploadEngine(signer, transport, s)

    yield make
    for transport in transports:
        transport.close()


def upload(engine: UploadEngine, path: Path, **kwargs: Any) -> Any:
    with open_source(KEY, path) as source:
        return engine.upload(source, KEY, "video/mp4", kwargs.pop("progress", None), **kwargs)


def test_an_in_process_signer_is_a_signer() -> None:
    assert isinstance(InProcessSigner(StorageSink()), Signer)


def test_the_engine_runs_a_single_put_on_any_signer(
    make_engine: Callable[..., UploadEngine],
    signer: InProcessSigner,
    sink: StorageSink,
    make_file: Callable[[int, str], Path],
) -> None:
    path = make_file(300 * 1024, "video.mp4")
    result = upload(make_engine(), path)
    assert sink.objects[KEY] == path.read_bytes()
    assert signer.calls == ["presign_put", "complete"]
    assert result.etag == f'"{hashlib.md5(path.read_bytes()).hexdigest()}"'
    assert result.url == f"https://cdn.test/{KEY}"


def test_the_engine_runs_multipart_on_any_signer(
    make_engine: Callable[..., UploadEngine],
    signer: InProcessSigner,
    sink: StorageSink,
    make_file: Callable[[int, str], Path],
) -> None:
    path = make_file(11 * MIB, "video.mp4")
    result = upload(make_engine(STORAGE_MULTIPART="always"), path)
    assert sink.objects[KEY] == path.read_bytes()
    assert result.etag.endswith('-3"')
    assert signer.calls[0] == "initiate" and signer.calls[-1] == "complete_multipart"
    assert signer.uploads == {}


def test_a_progress_callback_failing_at_once_aborts_the_upload_it_started(
    make_engine: Callable[..., UploadEngine],
    signer: InProcessSigner,
    make_file: Callable[[int, str], Path],
) -> None:
    class Stop(Exception):
        pass

    def progress(done: int, total: int) -> None:
        raise Stop

    path = make_file(11 * MIB, "video.mp4")
    with pytest.raises(CallbackFailed):
        upload(make_engine(STORAGE_MULTIPART="always"), path, progress=progress)
    assert signer.calls == ["initiate", "abort"]
    assert signer.uploads == {}


def test_a_checkpoint_that_cannot_be_saved_aborts_the_upload_it_started(
    make_engine: Callable[..., UploadEngine],
    signer: InProcessSigner,
    make_file: Callable[[int, str], Path],
    tmp_path: Path,
) -> None:
    not_a_folder = tmp_path / "resume"
    not_a_folder.write_text("a file where the checkpoint folder should be")
    path = make_file(11 * MIB, "video.mp4")
    engine = make_engine(STORAGE_MULTIPART="always", STORAGE_RESUME_DIR=str(not_a_folder))
    with pytest.raises(OSError):
        upload(engine, path, resume_path=str(path))
    assert signer.calls == ["initiate", "abort"]
    assert signer.uploads == {}


def test_a_part_size_the_engine_cannot_use_aborts_the_upload(
    make_engine: Callable[..., UploadEngine],
    signer: InProcessSigner,
    make_file: Callable[[int, str], Path],
) -> None:
    signer.initiate = lambda *args: MultipartUpload("bad", 1024)  # type: ignore[method-assign]
    signer.uploads["bad"] = KEY
    path = make_file(11 * MIB, "video.mp4")
    with pytest.raises(BackendError, match=r"below the .*minimum"):
        upload(make_engine(STORAGE_MULTIPART="always"), path)
    assert signer.calls == ["abort"]
    assert signer.uploads == {}


# -- part URLs ------------------------------------------------------------------------


def _signed(numbers: Sequence[int]) -> dict[int, SignedPut]:
    return {n: SignedPut(f"https://s.test/part{n}") for n in numbers}


def test_part_urls_are_signed_in_batches_ahead_of_use() -> None:
    batches: list[list[int]] = []

    def sign(numbers: list[int]) -> dict[int, SignedPut]:
        batches.append(numbers)
        return _signed(numbers)

    urls = PartUrls(KEY, sign, [1, 2, 3, 4, 5], batch=2)
    assert [urls.get(n).url for n in (1, 2, 3, 4, 5)] == [
        f"https://s.test/part{n}" for n in (1, 2, 3, 4, 5)
    ]
    assert batches == [[1, 2], [3, 4], [5]]
    urls.get(3)  # asked again: its URL expired, so it is signed alone
    assert batches[-1] == [3]


def test_part_urls_sign_outside_the_lock() -> None:
    """While one batch is being signed, another thread can sign another batch."""
    first_inside = threading.Event()
    release_first = threading.Event()
    signed_second = threading.Event()

    def sign(numbers: list[int]) -> dict[int, SignedPut]:
        if numbers[0] == 1:
            first_inside.set()
            assert release_first.wait(10)
        else:
            signed_second.set()
        return _signed(numbers)

    urls = PartUrls(KEY, sign, [1, 2, 3, 4], batch=2)
    worker = threading.Thread(target=urls.get, args=(1,))
    worker.start()
    assert first_inside.wait(10)
    assert urls.get(3).url == "https://s.test/part3"  # did not wait for batch 1
    assert signed_second.is_set()
    release_first.set()
    worker.join(10)


def test_a_failing_batch_is_signed_once_whatever_the_number_of_waiting_parts() -> None:
    inside = threading.Event()
    release = threading.Event()
    calls: list[list[int]] = []

    def sign(numbers: list[int]) -> dict[int, SignedPut]:
        calls.append(numbers)
        inside.set()
        assert release.wait(10)
        raise BackendError(KEY, "Part presign request failed: HTTP 500", phase="presign-parts")

    urls = PartUrls(KEY, sign, list(range(1, 9)), batch=8)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def want(number: int) -> None:
        try:
            urls.get(number)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    first = threading.Thread(target=want, args=(1,))
    first.start()
    assert inside.wait(10)
    others = [threading.Thread(target=want, args=(n,)) for n in range(2, 9)]
    for thread in others:
        thread.start()
    release.set()
    for thread in [first, *others]:
        thread.join(10)
    assert calls == [list(range(1, 9))]  # one call, not one per waiting part
    real = [e for e in errors if not isinstance(e, PartStopped)]
    assert len(real) == 1 and isinstance(real[0], BackendError)
    assert len(errors) == 8
    with pytest.raises(PartStopped):
        urls.get(1)  # and nobody calls again later
    assert len(calls) == 1


# -- failure cleanups -----------------------------------------------------------------


def test_failure_cleanups_run_newest_first_with_the_error_and_never_hide_it() -> None:
    ran: list[str] = []

    def failing(error: BaseException) -> None:
        ran.append("failing")
        raise RuntimeError("abort failed")

    with pytest.raises(ValueError) as caught, FailureCleanups() as cleanups:
        cleanups.add(lambda error: ran.append(f"first:{error}"))
        cleanups.add(failing)
        raise ValueError("boom")
    assert ran == ["failing", "first:boom"]
    assert any("abort failed" in note for note in caught.value.__notes__)


def test_failure_cleanups_do_not_run_on_success() -> None:
    ran: list[str] = []
    with FailureCleanups() as cleanups:
        cleanups.add(lambda error: ran.append("x"))
    assert ran == []
