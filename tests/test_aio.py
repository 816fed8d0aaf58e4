"""ctrlupload.aio: the asyncio facade over the local and backend_presigned providers.

Each test runs its own loop (``asyncio.run``). Uploads that must be caught mid-way are
held by their own progress callback (a :class:`Gate`), which is called on the worker
thread, or are slowed by a :class:`ThrottleProxy` in front of the reference backend's
upload URLs. Nothing here passes or fails on time: a gate that is never opened makes
its callback give up after ``WAIT_S``, which fails the test's assertions.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from ctrlupload import (
    BackendError,
    BackendPresignedStorageProvider,
    InvalidKeyError,
    LocalStorageProvider,
    RenderUpload,
    Settings,
    SourceFileError,
    StorageError,
    StorageResult,
    StorageUploadError,
    UploadCancelled,
    UploadTooLargeError,
    render_asset_key,
)
from ctrlupload.aio import AsyncStorageProvider, get_storage_provider
from ctrlupload.protocol import MIB
from ctrlupload.server import (
    AssetDB,
    LocalObjectStore,
    ReferenceBackend,
    ReferenceServer,
    WSGIServer,
)
from tests.conftest import TOKEN, RecordingProgress, backend_settings
from tests.support.throttle_proxy import ThrottleProxy

KEY = "videos/V-001/S-001/JOB-1/video.mp4"
#: How long a held worker thread waits for the test before giving up (a failure).
WAIT_S = 10.0
PART = 5 * MIB


# -- helpers -----------------------------------------------------------------------------


class Gate:
    """A progress callback that holds the upload at a chosen call until it is opened.

    Create it inside the running loop. ``reached`` is set (on the loop) when the
    upload is held; the worker thread then waits for ``open_when`` (a
    ``threading.Event``, or a callable returning one) for at most ``WAIT_S``.
    ``opened`` says whether it was opened in time. ``on_end`` records the provider's
    end-of-call hook.
    """

    def __init__(
        self,
        open_when: threading.Event | Callable[[], threading.Event],
        *,
        hold_at: Callable[[int, int], bool] = lambda done, total: True,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._open_when = open_when
        self._hold_at = hold_at
        self._held = False
        self.reached = asyncio.Event()
        self.opened: bool | None = None
        self.calls: list[tuple[int, int]] = []
        self.threads: set[str] = set()
        self.ended: list[bool] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))
        self.threads.add(threading.current_thread().name)
        if self._held or not self._hold_at(done, total):
            return
        self._held = True
        self._loop.call_soon_threadsafe(self.reached.set)
        event = self._open_when if isinstance(self._open_when, threading.Event) else None
        if event is None:
            assert callable(self._open_when)
            event = self._open_when()
        self.opened = event.wait(WAIT_S)

    def on_end(self, ok: bool) -> None:
        self.ended.append(ok)


class CancelSpy:
    """A provider that forwards to another one and keeps the ``cancel`` event of each call.

    Lets a progress callback hold an upload until the facade has set its event, so a
    cancel test cannot race the upload to its end.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.events: list[threading.Event] = []

    def put_file(self, *args: Any, cancel: threading.Event, **kwargs: Any) -> StorageResult:
        self.events.append(cancel)
        result: StorageResult = self.inner.put_file(*args, cancel=cancel, **kwargs)
        return result

    def put_object(self, *args: Any, cancel: threading.Event, **kwargs: Any) -> StorageResult:
        self.events.append(cancel)
        result: StorageResult = self.inner.put_object(*args, cancel=cancel, **kwargs)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def cancel_event(self) -> threading.Event:
        """The event of the last call (called on its worker thread, after it began)."""
        return self.events[-1]


async def ticks(count: int) -> None:
    """Let the loop run ``count`` rounds."""
    for _ in range(count):
        await asyncio.sleep(0)


def write(path: Path, size: int) -> bytes:
    data = hashlib.shake_256(path.name.encode()).digest(size) if size else b""
    path.write_bytes(data)
    return data


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalStorageProvider]:
    provider = LocalStorageProvider(Settings(storage_local_root=tmp_path / "root"))
    yield provider
    provider.close()


@pytest.fixture
def reference_provider(
    reference_server: ReferenceServer,
) -> Iterator[BackendPresignedStorageProvider]:
    provider = BackendPresignedStorageProvider(
        backend_settings(
            reference_server.base_url,
            BACKEND_SERVICE_TOKEN=reference_server.token,
            STORAGE_MULTIPART_THRESHOLD_BYTES=PART,
            STORAGE_MULTIPART_PART_BYTES=PART,
            STORAGE_PUBLIC_BASE_URL=f"{reference_server.base_url}/files",
        )
    )
    yield provider
    provider.close()


@dataclass
class SlowBackend:
    """The reference backend (local store) whose upload URLs go through a throttle.

    Backend calls reach it directly; the PUTs of bodies and parts go through ``proxy``,
    which caps each connection at ``RATE``.
    """

    api_url: str
    proxy: ThrottleProxy
    store: LocalObjectStore
    db: AssetDB

    RATE = 2 * MIB

    def provider(self, **overrides: Any) -> BackendPresignedStorageProvider:
        values: dict[str, Any] = {
            "STORAGE_MULTIPART_THRESHOLD_BYTES": PART,
            "STORAGE_MULTIPART_PART_BYTES": PART,
            "STORAGE_MULTIPART_CONCURRENCY": 2,
            "STORAGE_READ_TIMEOUT_S": 30,
        }
        values.update(overrides)
        return BackendPresignedStorageProvider(backend_settings(self.api_url, **values))

    def nothing_stored(self, *keys: str) -> None:
        """No asset row, no multipart upload left open, no object, no staged part."""
        assert self.db.all() == []
        assert self.db.uploads() == []
        for key in keys:
            assert self.store.head(key) is None
        staging = self.store.staging_dir / "multipart"
        assert not staging.exists() or not any(staging.iterdir())

    def put_requests(self) -> list[Any]:
        return [
            request
            for connection in self.proxy.stats().connections
            for request in connection.requests
            if request.method == "PUT"
        ]


@pytest.fixture
def slow_backend(tmp_path: Path) -> Iterator[SlowBackend]:
    server = WSGIServer(None, "127.0.0.1", 0).start()
    try:
        with ThrottleProxy("127.0.0.1", server.port, rate_bytes_per_s=SlowBackend.RATE) as proxy:
            store = LocalObjectStore(tmp_path / "backend", proxy.url)
            db = AssetDB(tmp_path / "assets.sqlite3")
            server.set_app(ReferenceBackend(token=TOKEN, store=store, db=db))
            try:
                yield SlowBackend(f"http://127.0.0.1:{server.port}", proxy, store, db)
            finally:
                server.stop()
                db.close()
                store.close()
    finally:
        server.stop()


def started_sending(done: int, total: int) -> bool:
    """Hold at the first call that reports bytes on their way (not the opening 0)."""
    return done > 0


# -- round trips -------------------------------------------------------------------------


def test_put_file_put_object_delete_through_the_local_provider(
    local: LocalStorageProvider, tmp_path: Path
) -> None:
    source = tmp_path / "video.mp4"
    data = write(source, 3 * MIB + 5)
    progress = RecordingProgress()

    async def main() -> tuple[StorageResult, StorageResult, str]:
        storage = AsyncStorageProvider(local)
        video = await storage.put_file(source, KEY, progress=progress)  # the seed's call
        subtitles = await storage.put_object(b"1\n00:00:00,000 --> 00:00:01,000\nhi\n", "a/b.srt")
        await storage.delete("a/b.srt")
        await storage.aclose()
        return video, subtitles, threading.current_thread().name

    video, subtitles, loop_thread = asyncio.run(main())
    root = tmp_path / "root"
    assert (root / KEY).read_bytes() == data
    assert video == StorageResult(
        key=KEY,
        url=(root / KEY).absolute().as_uri(),
        size_bytes=len(data),
        content_type="video/mp4",
        etag=f'"{hashlib.md5(data).hexdigest()}"',
    )
    assert subtitles.content_type == "application/x-subrip"
    assert not (root / "a" / "b.srt").exists()
    progress.assert_honest(len(data))
    assert loop_thread not in progress.threads
    assert all(name.startswith("ctrlupload-aio") for name in progress.threads)


def test_put_file_put_object_delete_through_the_reference_backend(
    reference_provider: BackendPresignedStorageProvider,
    reference_server: ReferenceServer,
    tmp_path: Path,
) -> None:
    source = tmp_path / "video.mp4"
    data = write(source, PART + 321)  # two parts
    progress = RecordingProgress()

    async def main() -> tuple[StorageResult, StorageResult]:
        async with AsyncStorageProvider(reference_provider) as storage:
            video = await storage.put_file(source, KEY, progress=progress)
            thumbnail = await storage.put_object(b"\xff\xd8jpeg", "a/thumb.jpg")
            assert storage.get_url(KEY) == video.url
            await storage.delete("a/thumb.jpg")
            return video, thumbnail

    video, thumbnail = asyncio.run(main())
    assert requests.get(video.url, timeout=10).content == data
    assert video.etag is not None and video.etag.endswith('-2"')
    row = reference_server.db.get(KEY)
    assert row is not None and row.size_bytes == len(data) and row.etag == video.etag
    assert thumbnail.size_bytes == 6
    assert reference_server.db.get("a/thumb.jpg") is None
    progress.assert_honest(len(data))


@pytest.mark.parametrize("where", ["local", "reference"])
def test_upload_render_stores_every_asset(
    where: str,
    local: LocalStorageProvider,
    reference_server: ReferenceServer,
    tmp_path: Path,
) -> None:
    if where == "local":
        provider: Any = local
    else:
        provider = BackendPresignedStorageProvider(
            backend_settings(
                reference_server.base_url, BACKEND_SERVICE_TOKEN=reference_server.token
            )
        )
    files = {
        "video": write(tmp_path / "out.mp4", 2 * MIB + 1),
        "subtitles": write(tmp_path / "out.srt", 300),
        "thumbnail": write(tmp_path / "out.jpg", 4000),
    }
    recorded = RecordingProgress()

    async def main() -> RenderUpload:
        async with AsyncStorageProvider(provider) as storage:
            return await storage.upload_render(
                "V-001",
                "S-001",
                "JOB-7",
                video=tmp_path / "out.mp4",
                subtitles=tmp_path / "out.srt",
                thumbnail=tmp_path / "out.jpg",
                progress=recorded,
            )

    render = asyncio.run(main())
    for asset, data in files.items():
        result = getattr(render, asset)
        assert result is not None
        assert result.key == render_asset_key("V-001", "S-001", "JOB-7", asset)
        assert result.size_bytes == len(data)
        if where == "local":
            assert (tmp_path / "root" / result.key).read_bytes() == data
        else:
            assert requests.get(result.url, timeout=10).content == data
            assert reference_server.db.get(result.key) is not None
    recorded.assert_honest(sum(len(data) for data in files.values()))


def test_get_storage_provider_builds_the_provider_the_environment_names(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STORAGE_PROVIDER", "local")
    monkeypatch.setenv("STORAGE_LOCAL_ROOT", str(tmp_path / "from-env"))
    monkeypatch.chdir(tmp_path)  # no .env of the developer's

    async def main() -> None:
        async with get_storage_provider() as storage:
            assert isinstance(storage.provider, LocalStorageProvider)
            await storage.put_object(b"x", "a/b.jpg")
        async with get_storage_provider(Settings(storage_local_root=tmp_path / "given")) as given:
            await given.put_object(b"y", "a/b.jpg")

    asyncio.run(main())
    assert (tmp_path / "from-env" / "a" / "b.jpg").read_bytes() == b"x"
    assert (tmp_path / "given" / "a" / "b.jpg").read_bytes() == b"y"


def test_the_call_runs_in_the_callers_context(local: LocalStorageProvider) -> None:
    """A single-threaded upload calls back on the call's own thread, in its context."""
    job: contextvars.ContextVar[str] = contextvars.ContextVar("job")
    seen: list[str] = []

    async def main() -> None:
        job.set("JOB-42")
        async with AsyncStorageProvider(local) as storage:
            await storage.put_object(
                b"abc", "a/b.jpg", progress=lambda d, t: seen.append(job.get())
            )

    asyncio.run(main())
    assert seen and set(seen) == {"JOB-42"}


# -- the loop keeps running ----------------------------------------------------------------


def test_the_loop_keeps_running_while_an_upload_is_under_way(
    local: LocalStorageProvider, tmp_path: Path
) -> None:
    """The upload is held on its worker thread until a task on the loop has run.

    Were the upload run on the loop's thread, the ticking task could not run while it
    is held: the gate would give up and ``opened`` be False.
    """
    source = tmp_path / "video.mp4"
    write(source, 2 * MIB)
    ticked = threading.Event()

    async def tick() -> int:
        count = 0
        while not ticked.is_set():
            await asyncio.sleep(0)
            count += 1
            if count == 100:
                ticked.set()
        return count

    async def main() -> tuple[Gate, StorageResult, int]:
        gate = Gate(ticked, hold_at=started_sending)
        async with AsyncStorageProvider(local) as storage:
            upload = asyncio.create_task(storage.put_file(source, KEY, progress=gate))
            count = await tick()
            return gate, await upload, count

    gate, result, count = asyncio.run(main())
    assert gate.opened is True
    assert count >= 100
    assert result.size_bytes == 2 * MIB
    assert gate.ended == [True]


def test_a_throttled_upload_leaves_the_loop_free(slow_backend: SlowBackend, tmp_path: Path) -> None:
    """While a multipart upload crawls through the throttle, other tasks keep running."""
    source = tmp_path / "video.mp4"
    data = write(source, PART + MIB)
    ticked = threading.Event()

    async def main() -> tuple[Gate, StorageResult]:
        gate = Gate(ticked, hold_at=started_sending)
        async with AsyncStorageProvider(slow_backend.provider()) as storage:
            upload = asyncio.create_task(storage.put_file(source, KEY, progress=gate))
            await gate.reached.wait()  # bytes are on their way through the throttle
            await ticks(50)
            ticked.set()
            return gate, await upload

    gate, result = asyncio.run(main())
    assert gate.opened is True
    assert result.size_bytes == len(data)
    assert slow_backend.store.head(KEY) is not None


# -- cancellation ----------------------------------------------------------------------------


def test_cancelling_a_local_upload_stops_it_and_leaves_nothing(
    local: LocalStorageProvider, tmp_path: Path
) -> None:
    source = tmp_path / "video.mp4"
    write(source, 4 * MIB)
    spy = CancelSpy(local)

    async def main() -> Gate:
        gate = Gate(spy.cancel_event, hold_at=started_sending)
        async with AsyncStorageProvider(spy) as storage:  # type: ignore[arg-type]
            upload = asyncio.create_task(storage.put_file(source, KEY, progress=gate))
            await gate.reached.wait()
            upload.cancel()
            with pytest.raises(asyncio.CancelledError):
                await upload
            # Control is back only once the worker thread is done with the call.
            assert gate.ended == [False]
        return gate

    gate = asyncio.run(main())
    assert gate.opened is True  # held until the facade set the call's cancel event
    assert gate.calls[-1][0] < 4 * MIB
    folder = tmp_path / "root" / "videos" / "V-001" / "S-001" / "JOB-1"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_cancelling_a_throttled_multipart_upload_aborts_it(
    slow_backend: SlowBackend, tmp_path: Path
) -> None:
    source = tmp_path / "video.mp4"
    write(source, 3 * PART + 17)  # four parts, two at a time
    provider = slow_backend.provider()

    async def main() -> Gate:
        gate = Gate(threading.Event(), hold_at=lambda done, total: False)
        async with AsyncStorageProvider(provider) as storage:
            upload = asyncio.create_task(storage.put_file(source, KEY, progress=gate))
            while not any(done for done, _ in gate.calls):
                await asyncio.sleep(0.01)  # polling for the first bytes, not a timing
            upload.cancel()
            with pytest.raises(asyncio.CancelledError):
                await upload
            # Back in control: the call has ended, and the upload is already aborted.
            assert gate.ended == [False]
            slow_backend.nothing_stored(KEY)
        return gate

    asyncio.run(main())
    # The first parts were on their way (their bytes may have been in socket buffers
    # already); the last ones never started.
    assert 0 < len(slow_backend.put_requests()) < 4


def test_cancelling_a_throttled_render_upload_deletes_what_was_stored(
    slow_backend: SlowBackend, tmp_path: Path
) -> None:
    write(tmp_path / "out.mp4", 2 * PART)
    write(tmp_path / "out.srt", 200)
    write(tmp_path / "out.jpg", 3000)
    keys = [render_asset_key("V-1", "S-1", "J-1", a) for a in ("video", "subtitles", "thumbnail")]

    async def main() -> Gate:
        gate = Gate(threading.Event(), hold_at=lambda done, total: False)
        async with AsyncStorageProvider(slow_backend.provider()) as storage:
            upload = asyncio.create_task(
                storage.upload_render(
                    "V-1",
                    "S-1",
                    "J-1",
                    video=tmp_path / "out.mp4",
                    subtitles=tmp_path / "out.srt",
                    thumbnail=tmp_path / "out.jpg",
                    progress=gate,
                )
            )
            # Cancel once the small assets are in storage (not yet recorded: that waits
            # for the video) and the video is under way.
            while not all(slow_backend.store.head(key) for key in keys[1:]) or not any(
                done > 3200 for done, _ in gate.calls
            ):
                await asyncio.sleep(0.01)  # polling for a state, not a timing
            upload.cancel()
            with pytest.raises(asyncio.CancelledError):
                await upload
            assert gate.ended == [False]
            slow_backend.nothing_stored(*keys)
        return gate

    gate = asyncio.run(main())
    assert gate.calls[-1][0] < gate.calls[-1][1]


def test_a_timeout_stops_the_upload_and_raises_timeout_error(
    local: LocalStorageProvider, tmp_path: Path
) -> None:
    write(tmp_path / "video.mp4", MIB)
    spy = CancelSpy(local)

    async def main() -> Gate:
        gate = Gate(spy.cancel_event)
        async with AsyncStorageProvider(spy) as storage:  # type: ignore[arg-type]
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0):
                    await storage.put_file(tmp_path / "video.mp4", KEY, progress=gate)
            assert gate.ended == [False]
        return gate

    gate = asyncio.run(main())
    assert gate.opened in (True, None)  # held until cancelled, or stopped before sending
    assert not (tmp_path / "root" / KEY).exists()


def test_a_second_cancel_does_not_cut_the_wait_for_the_worker(
    local: LocalStorageProvider, tmp_path: Path
) -> None:
    source = tmp_path / "video.mp4"
    write(source, 2 * MIB)
    spy = CancelSpy(local)
    hold = threading.Event()

    async def main() -> Gate:
        loop = asyncio.get_running_loop()
        cancel_seen = asyncio.Event()

        def after_cancel() -> threading.Event:
            spy.cancel_event().wait(WAIT_S)
            loop.call_soon_threadsafe(cancel_seen.set)
            return hold

        gate = Gate(after_cancel, hold_at=started_sending)
        async with AsyncStorageProvider(spy) as storage:  # type: ignore[arg-type]
            upload = asyncio.create_task(storage.put_file(source, KEY, progress=gate))
            await gate.reached.wait()
            upload.cancel()
            await cancel_seen.wait()
            upload.cancel()  # and again, while the facade waits for the worker
            await ticks(50)
            assert not upload.done()  # still waiting: the worker is held
            hold.set()
            with pytest.raises(asyncio.CancelledError):
                await upload
            assert gate.ended == [False]
        return gate

    gate = asyncio.run(main())
    assert gate.opened is True
    assert not (tmp_path / "root" / KEY).exists()


def test_a_cancelled_call_still_queued_never_starts(
    local: LocalStorageProvider, tmp_path: Path
) -> None:
    write(tmp_path / "first.mp4", MIB)
    write(tmp_path / "second.mp4", MIB)
    release = threading.Event()
    second = RecordingProgress()

    async def main() -> Gate:
        gate = Gate(release)
        async with AsyncStorageProvider(local, max_workers=1) as storage:
            first = asyncio.create_task(
                storage.put_file(tmp_path / "first.mp4", "a/1.mp4", progress=gate)
            )
            await gate.reached.wait()  # the only worker is busy
            queued = asyncio.create_task(
                storage.put_file(tmp_path / "second.mp4", "a/2.mp4", progress=second)
            )
            await ticks(5)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued  # at once: there was no thread to wait for
            assert not first.done()
            release.set()
            await first
        return gate

    gate = asyncio.run(main())
    assert gate.ended == [True]
    assert second.calls == []
    assert (tmp_path / "root" / "a" / "1.mp4").exists()
    assert not (tmp_path / "root" / "a" / "2.mp4").exists()


# -- closing -----------------------------------------------------------------------------


def test_async_with_closes_the_provider(local: LocalStorageProvider) -> None:
    async def main() -> AsyncStorageProvider:
        async with AsyncStorageProvider(local) as storage:
            await storage.put_object(b"x", "a/b.jpg")
        with pytest.raises(StorageError, match="AsyncStorageProvider is closed"):
            await storage.put_object(b"x", "a/c.jpg")
        await storage.aclose()  # again: nothing happens
        return storage

    asyncio.run(main())
    with pytest.raises(StorageError, match="LocalStorageProvider is closed"):
        local.put_object(b"x", "a/d.jpg")


def test_aclose_waits_for_running_calls(local: LocalStorageProvider, tmp_path: Path) -> None:
    write(tmp_path / "video.mp4", MIB)
    release = threading.Event()

    async def main() -> tuple[Gate, StorageResult]:
        gate = Gate(release, hold_at=started_sending)
        storage = AsyncStorageProvider(local)
        upload = asyncio.create_task(storage.put_file(tmp_path / "video.mp4", KEY, progress=gate))
        await gate.reached.wait()
        closing = asyncio.create_task(storage.aclose())
        await ticks(50)
        assert not closing.done()  # the upload is still running
        with pytest.raises(StorageError, match="closed"):
            await storage.put_object(b"x", "a/b.jpg")  # no new calls meanwhile
        release.set()
        result = await upload
        await closing
        return gate, result

    gate, result = asyncio.run(main())
    assert result.size_bytes == MIB and gate.ended == [True]
    with pytest.raises(StorageError, match="closed"):
        local.put_object(b"x", "a/c.jpg")


def test_cancelling_aclose_cancels_the_running_calls(
    local: LocalStorageProvider, tmp_path: Path
) -> None:
    write(tmp_path / "video.mp4", 2 * MIB)
    spy = CancelSpy(local)

    async def main() -> Gate:
        gate = Gate(spy.cancel_event, hold_at=started_sending)
        storage = AsyncStorageProvider(spy)  # type: ignore[arg-type]
        upload = asyncio.create_task(storage.put_file(tmp_path / "video.mp4", KEY, progress=gate))
        await gate.reached.wait()
        closing = asyncio.create_task(storage.aclose())
        await ticks(5)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert upload.done()  # aclose gave control back only once the call was over
        with pytest.raises(UploadCancelled):
            await upload
        return gate

    gate = asyncio.run(main())
    assert gate.opened is True and gate.ended == [False]
    assert not (tmp_path / "root" / KEY).exists()
    with pytest.raises(StorageError, match="closed"):
        local.put_object(b"x", "a/c.jpg")


# -- errors ------------------------------------------------------------------------------


def _sync_and_async_errors(
    provider: Any, call: Callable[[Any], Any]
) -> tuple[BaseException, BaseException]:
    """The exception ``call`` raises on the provider, and on the facade over it."""
    with pytest.raises(StorageError) as sync_error:
        call(provider)

    async def main() -> None:
        async with AsyncStorageProvider(provider) as storage:
            await call(storage)

    with pytest.raises(StorageError) as async_error:
        asyncio.run(main())
    return sync_error.value, async_error.value


@pytest.mark.parametrize(
    ("call", "error_type"),
    [
        (lambda s: s.put_file("no/such/file.mp4", KEY), SourceFileError),
        (lambda s: s.put_object(b"x", "../escape.mp4"), InvalidKeyError),
        (lambda s: s.put_object(b"x" * 2000, KEY), UploadTooLargeError),
        (lambda s: s.delete("bad//key.mp4"), InvalidKeyError),
    ],
)
def test_local_errors_come_through_as_the_same_typed_errors(
    tmp_path: Path, call: Callable[[Any], Any], error_type: type[StorageUploadError]
) -> None:
    settings = Settings(storage_local_root=tmp_path / "root", video_max_upload_bytes=1000)
    sync_error, async_error = _sync_and_async_errors(LocalStorageProvider(settings), call)
    assert type(sync_error) is type(async_error) is error_type
    assert str(async_error) == str(sync_error)


def test_backend_errors_come_through_as_the_same_typed_errors(
    reference_server: ReferenceServer,
) -> None:
    provider = BackendPresignedStorageProvider(
        backend_settings(reference_server.base_url, BACKEND_SERVICE_TOKEN="wrong-token-0123456789")
    )
    sync_error, async_error = _sync_and_async_errors(
        provider, lambda s: s.put_object(b"x", "a/b.jpg")
    )
    assert type(async_error) is type(sync_error) is BackendError
    assert str(async_error) == str(sync_error)
    assert "401" in str(async_error) and "wrong-token" not in str(async_error)
    assert isinstance(async_error, StorageUploadError) and async_error.phase == "presign"
