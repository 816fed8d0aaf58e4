"""The fault matrix: every fault, for single and multipart uploads, in every phase.

The reference backend (local store) runs behind :class:`FaultProxy`, which carries
both the API calls and the storage PUTs (the backend signs URLs that point at the
proxy). Each cell faults one phase's exchanges and checks the outcome:

* a transient fault (one faulted exchange, or ``attempts - 1`` in a row) ends in a
  success whose stored bytes equal the file, one record, and no pending upload;
* a permanent fault (every attempt) ends in a :class:`StorageError` subclass that says
  how many attempts it took, with no pending multipart upload and no record, except
  where the backend did the work and every answer was lost (see ``docs/reliability.md``).

``docs/reliability.md`` describes the matrix and its bounds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ctrlupload import BackendPresignedStorageProvider, Settings, StorageError
from ctrlupload.server import ReferenceServer, ServerConfig
from tests.support.fault_proxy import Exchange, Fault, FaultProxy

MIB = 1024 * 1024
KEY = "videos/V-001/S-001/JOB-123/video.mp4"
ATTEMPTS = 3
SINGLE_BYTES = 256 * 1024
MULTIPART_BYTES = 11 * MIB  # three parts of 5 MiB, 5 MiB and 1 MiB

#: Phase -> (path fragment, which flow runs through it).
PHASES = {
    "presign": ("/internal/storage/presign-put", "single"),
    "put": ("/upload/", "single"),
    "complete": ("/internal/storage/complete", "single"),
    "initiate": ("/multipart/initiate", "multipart"),
    "presign-parts": ("/multipart/presign-parts", "multipart"),
    "part-put": ("/upload-part/", "multipart"),
    "complete-multipart": ("/multipart/complete", "multipart"),
}


@dataclass
class Rig:
    server: ReferenceServer
    proxy: FaultProxy
    tmp: Path

    def provider(self, **overrides: Any) -> BackendPresignedStorageProvider:
        values: dict[str, Any] = {
            "STORAGE_PROVIDER": "backend_presigned",
            "BACKEND_BASE_URL": self.proxy.base_url,
            "BACKEND_SERVICE_TOKEN": self.server.token,
            "STORAGE_RETRY_ATTEMPTS": ATTEMPTS,
            "STORAGE_RETRY_BACKOFF_S": 0.01,
            "STORAGE_RETRY_BACKOFF_MAX_S": 0.05,
            "STORAGE_CONNECT_TIMEOUT_S": 2,
            "STORAGE_READ_TIMEOUT_S": 0.5,
            "STORAGE_MULTIPART_PART_BYTES": 5 * MIB,
            "STORAGE_MULTIPART_THRESHOLD_BYTES": 5 * MIB,
            "STORAGE_RESUME_DIR": str(self.tmp / "resume"),
            "VIDEO_MAX_UPLOAD_BYTES": 64 * MIB,
        }
        values.update(overrides)
        return BackendPresignedStorageProvider(Settings.from_mapping(values))

    def pending_uploads(self) -> list[str]:
        """Multipart uploads the backend still holds open (registry or store)."""
        pending = [row.upload_id for row in self.server.db.uploads() if not row.completed]
        folder = self.server.store.multipart_dir  # type: ignore[attr-defined]
        held = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        return sorted(set(pending) | set(held))

    def stored(self, key: str) -> bytes | None:
        path = self.server.store.objects_dir.joinpath(*key.split("/"))  # type: ignore[attr-defined]
        return path.read_bytes() if path.exists() else None


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with FaultProxy() as proxy:
        config = ServerConfig(port=0, data_dir=tmp_path / "backend", public_url=proxy.base_url)
        with ReferenceServer(config) as server:
            proxy.upstream = server.address
            yield Rig(server, proxy, tmp_path)


def _file(tmp: Path, size: int) -> Path:
    path = tmp / f"render-{size}.mp4"
    path.write_bytes(os.urandom(size))
    return path


def faulting(path_part: str, fault: Fault, times: int) -> Callable[[Exchange], Fault | None]:
    left = [times]

    def decide(exchange: Exchange) -> Fault | None:
        if path_part in exchange.path and left[0] > 0:
            left[0] -= 1
            return fault
        return None

    return decide


CELLS = [
    pytest.param(phase, fault, id=f"{phase}-{fault.name.lower()}")
    for phase in PHASES
    for fault in Fault
]


@pytest.mark.parametrize(("phase", "fault"), CELLS)
@pytest.mark.parametrize("times", [1, ATTEMPTS - 1], ids=["once", "all-but-one"])
def test_transient_faults_end_in_an_identical_object_and_no_pending_upload(
    rig: Rig, phase: str, fault: Fault, times: int
) -> None:
    path_part, flow = PHASES[phase]
    size = SINGLE_BYTES if flow == "single" else MULTIPART_BYTES
    source = _file(rig.tmp, size)
    rig.proxy.decide = faulting(path_part, fault, times)
    mode = "never" if flow == "single" else "always"
    with rig.provider(STORAGE_MULTIPART=mode) as provider:
        result = provider.put_file(source, KEY)
    assert len(rig.proxy.faulted()) == times  # the fault really happened
    assert rig.stored(KEY) == source.read_bytes()
    row = rig.server.db.get(KEY)
    assert row is not None and row.etag == result.etag and row.size_bytes == size
    assert rig.pending_uploads() == []
    if phase == "initiate":
        # A lost initiate answer is retried with the same Idempotency-Key: one upload.
        assert len(rig.server.db.uploads()) == 1


PERMANENT = [
    pytest.param(phase, fault, id=f"{phase}-{fault.name.lower()}")
    for phase in PHASES
    for fault in (Fault.RESET_BEFORE, Fault.LOST_ANSWER, Fault.CUT_ANSWER)
]


@pytest.mark.parametrize(("phase", "fault"), PERMANENT)
def test_permanent_faults_fail_with_a_storage_error_and_leave_nothing_pending(
    rig: Rig, phase: str, fault: Fault
) -> None:
    path_part, flow = PHASES[phase]
    size = SINGLE_BYTES if flow == "single" else MULTIPART_BYTES
    source = _file(rig.tmp, size)
    rig.proxy.decide = faulting(path_part, fault, 10_000)
    mode = "never" if flow == "single" else "always"
    with rig.provider(STORAGE_MULTIPART=mode) as provider, pytest.raises(StorageError) as caught:
        provider.put_file(source, KEY)
    assert f"after {ATTEMPTS} attempts" in str(caught.value)
    assert "signature=" not in str(caught.value)
    server_did_the_work = fault is not Fault.RESET_BEFORE
    if phase == "initiate" and server_did_the_work:
        # The backend started one upload (the retries carried its Idempotency-Key) and
        # every answer naming it was lost: the client cannot abort what it never
        # learned. One, never more.
        assert len(rig.pending_uploads()) == 1
    else:
        assert rig.pending_uploads() == []
    if phase in ("complete", "complete-multipart") and server_did_the_work:
        # The backend recorded the object and every answer saying so was lost: the
        # record is right (the bytes match), the caller saw a failure; a retry of
        # put_file is safe (complete is an upsert).
        row = rig.server.db.get(KEY)
        assert row is not None
        assert rig.stored(KEY) == source.read_bytes()
    else:
        assert rig.server.db.get(KEY) is None


def test_a_faulted_abort_is_retried_so_a_failed_upload_leaves_nothing(rig: Rig) -> None:
    source = _file(rig.tmp, MULTIPART_BYTES)
    parts_failing = faulting("/upload-part/", Fault.RESET_BEFORE, 10_000)
    abort_once = faulting("/multipart/abort", Fault.LOST_ANSWER, 1)
    rig.proxy.decide = lambda exchange: parts_failing(exchange) or abort_once(exchange)
    with rig.provider(STORAGE_MULTIPART="always") as provider, pytest.raises(StorageError):
        provider.put_file(source, KEY)
    assert any(e.fault and "/multipart/abort" in e.path for e in rig.proxy.exchanges)
    assert rig.pending_uploads() == []
    assert rig.server.db.get(KEY) is None


@pytest.mark.parametrize("fault", list(Fault), ids=lambda f: f.name.lower())
def test_a_faulted_list_parts_on_resume_still_resumes(rig: Rig, fault: Fault) -> None:
    source = _file(rig.tmp, MULTIPART_BYTES)
    # First run: every part fails for good, the upload is kept for a resume.
    rig.proxy.decide = faulting("/upload-part/", Fault.RESET_BEFORE, 10_000)
    first = rig.provider(STORAGE_MULTIPART="always", STORAGE_MULTIPART_CONCURRENCY=1)
    with first as provider, pytest.raises(StorageError):
        provider.put_file(source, KEY, resume=True)
    assert len(rig.pending_uploads()) == 1
    rig.proxy.decide = faulting("/multipart/list-parts", fault, 1)
    with rig.provider(STORAGE_MULTIPART="always") as provider:
        result = provider.put_file(source, KEY, resume=True)
    assert any(e.fault and "list-parts" in e.path for e in rig.proxy.exchanges)
    assert rig.stored(KEY) == source.read_bytes()
    assert result.etag is not None
    assert rig.pending_uploads() == []
    row = rig.server.db.get(KEY)
    assert row is not None and row.etag == result.etag
