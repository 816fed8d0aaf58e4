"""Shared fixtures: loopback servers, provider factories and a recording progress callback."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ctrlupload import BackendPresignedStorageProvider, Settings
from tests.support.servers import FakeBackend, RawHandler, RawSocketServer, StorageSink

if TYPE_CHECKING:
    from ctrlupload.server import ReferenceServer
    from tests.support.moto_server import MotoS3Server

TOKEN = "test-token-0123456789abcdef"


class RecordingProgress:
    """A progress callback that records every call and the thread it came from."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, bytes_done: int, bytes_total: int) -> None:
        with self._lock:
            self.calls.append((bytes_done, bytes_total))
            self.threads.add(threading.current_thread().name)

    @property
    def done(self) -> list[int]:
        return [done for done, _ in self.calls]

    def assert_honest(self, total: int) -> None:
        """Never decreasing, never past the total, ends exactly at the total."""
        assert self.calls, "progress was never called"
        assert all(t == total for _, t in self.calls)
        assert self.done == sorted(self.done)
        assert all(0 <= d <= total for d in self.done)
        assert self.done[-1] == total
        assert self.done.count(total) == 1


@pytest.fixture
def progress() -> RecordingProgress:
    return RecordingProgress()


@pytest.fixture
def sink() -> Iterator[StorageSink]:
    with StorageSink() as server:
        yield server
        assert not server.errors


@pytest.fixture
def backend(sink: StorageSink) -> Iterator[FakeBackend]:
    with FakeBackend(sink, token=TOKEN, public_base_url="https://cdn.example.test") as server:
        yield server
        assert not server.errors


def backend_settings(base_url: str, **overrides: Any) -> Settings:
    """Settings for a loopback backend, with fast retries so tests stay quick."""
    values: dict[str, Any] = {
        "STORAGE_PROVIDER": "backend_presigned",
        "BACKEND_BASE_URL": base_url,
        "BACKEND_SERVICE_TOKEN": TOKEN,
        "STORAGE_RETRY_ATTEMPTS": 3,
        "STORAGE_RETRY_BACKOFF_S": 0.01,
        "STORAGE_RETRY_BACKOFF_MAX_S": 2,
        "STORAGE_CONNECT_TIMEOUT_S": 2,
        "STORAGE_READ_TIMEOUT_S": 5,
    }
    values.update(overrides)
    return Settings.from_mapping(values)


@pytest.fixture
def make_provider(
    backend: FakeBackend,
) -> Iterator[Callable[..., BackendPresignedStorageProvider]]:
    """Build providers against the loopback backend; closes them at teardown."""
    made: list[BackendPresignedStorageProvider] = []

    def make(**overrides: Any) -> BackendPresignedStorageProvider:
        provider = BackendPresignedStorageProvider(backend_settings(backend.base_url, **overrides))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


@pytest.fixture
def provider(
    make_provider: Callable[..., BackendPresignedStorageProvider],
) -> BackendPresignedStorageProvider:
    return make_provider()


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[[int, str], Path]:
    """Write a file of ``size`` random bytes and return its path."""

    def make(size: int, name: str = "video.mp4") -> Path:
        path = tmp_path / name
        with open(path, "wb") as handle:
            remaining = size
            while remaining:
                block = os.urandom(min(remaining, 1024 * 1024))
                handle.write(block)
                remaining -= len(block)
        return path

    return make


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout_s`` passes; return its last value.

    For server-side records that land after the client has its answer, e.g. a body the
    client abandoned mid-way, which the server records only once it sees the hang-up.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(0.01)
    return True


RawStorageSetup = tuple[BackendPresignedStorageProvider, RawSocketServer, FakeBackend]


@pytest.fixture
def make_raw_storage_provider() -> Iterator[Callable[..., RawStorageSetup]]:
    """Build a provider whose presigned URLs point at a :class:`RawSocketServer`.

    ``make(handler, **overrides)`` starts a raw-socket server running ``handler`` as the
    storage host and a :class:`FakeBackend` that presigns into it (it only reads the
    storage's ``base_url``), and returns ``(provider, raw_server, backend)``. Settings
    overrides are by environment name, as for ``make_provider``. Everything is closed
    and stopped at teardown.
    """
    with contextlib.ExitStack() as stack:

        def make(handler: RawHandler, **overrides: Any) -> RawStorageSetup:
            raw = stack.enter_context(RawSocketServer(handler))
            backend = stack.enter_context(FakeBackend(raw, token=TOKEN))  # type: ignore[arg-type]
            provider = BackendPresignedStorageProvider(
                backend_settings(backend.base_url, **overrides)
            )
            stack.callback(provider.close)
            return provider, raw, backend

        yield make


@pytest.fixture
def reference_server(tmp_path: Path) -> Iterator[ReferenceServer]:
    """The reference backend (local store) in-process on a free loopback port."""
    from ctrlupload.server import ReferenceServer, ServerConfig

    with ReferenceServer(ServerConfig(port=0, data_dir=tmp_path / "backend")) as server:
        yield server


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3Server]:
    """moto's S3 server on loopback, shared by the session: stopping one costs ~0.5 s.

    State is shared too, so each test makes its own bucket (``make_bucket()`` picks a
    unique name). moto and boto3 are imported only by tests that use this fixture.
    """
    from tests.support.moto_server import MotoS3Server

    with MotoS3Server() as server:
        yield server
