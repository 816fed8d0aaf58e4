"""Issue 11 over loopback: the reference backend (local store, which verifies
CRC64NVME and If-None-Match like S3) behind the fault proxy, and real retries.

What `responses` cannot show: a retried PUT whose first attempt did store the object
(its answer lost) is told apart from someone else's object through ``complete``; two
writers with ``overwrite=False`` race, and exactly one wins; a resumed upload keeps
only the parts whose MD5 and CRC64NVME match the file.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ctrlupload import (
    LocalStorageProvider,
    ObjectExistsError,
    Settings,
    StorageTransferError,
    _checksum,
    upload_render,
)
from ctrlupload._errors import RenderUploadError
from ctrlupload.engine._engine import _kept_if_same
from ctrlupload.engine._streams import open_source
from ctrlupload.protocol import Part
from ctrlupload.protocol._objects import StoredPart
from tests.faults.test_matrix import KEY, MIB, Rig, faulting
from tests.faults.test_matrix import rig as rig
from tests.support.fault_proxy import Exchange, Fault

pytestmark = pytest.mark.skipif(not _checksum.available(), reason="needs awscrt")


def crc(data: bytes) -> str:
    return _checksum.encode(_checksum.crc64nvme(data))


def write(tmp: Path, name: str, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp / name
    path.write_bytes(data)
    return path, data


def test_single_put_is_checked_by_storage_and_recorded_with_its_checksum(rig: Rig) -> None:
    path, data = write(rig.tmp, "a.mp4", 300 * 1024)
    with rig.provider() as client:
        result = client.put_file(path, KEY)
    assert (result.integrity, result.checksum) == ("crc64nvme", crc(data))
    assert rig.stored(KEY) == data
    assert rig.server.db.get(KEY).checksum == crc(data)  # type: ignore[union-attr]


def test_multipart_is_checked_as_a_whole_object(rig: Rig) -> None:
    path, data = write(rig.tmp, "big.mp4", 11 * MIB)
    with rig.provider(STORAGE_MULTIPART_CONCURRENCY=3) as client:
        result = client.put_file(path, KEY)
    assert (result.integrity, result.checksum) == ("crc64nvme", crc(data))
    assert result.etag is not None and result.etag.endswith('-3"')
    assert rig.stored(KEY) == data


def lost_first_put(path_part: str) -> Callable[[Exchange], Fault | None]:
    return faulting(path_part, Fault.LOST_ANSWER, 1)


@pytest.mark.parametrize("mode", ["crc64nvme", "md5"])
def test_a_retried_put_whose_first_attempt_stored_it_is_no_false_object_exists(
    rig: Rig, mode: str
) -> None:
    # The first PUT is stored, its answer lost; the retry meets its own object: 412.
    path, data = write(rig.tmp, "a.mp4", 300 * 1024)
    rig.proxy.decide = lost_first_put("/upload/")
    with rig.provider(STORAGE_CHECKSUM=mode) as client:
        result = client.put_file(path, KEY, overwrite=False)
    puts = [e for e in rig.proxy.exchanges if e.path.startswith("/upload/")]
    assert len(puts) == 2  # the lost one and the refused retry
    assert rig.stored(KEY) == data
    assert result.integrity == mode
    assert result.etag == f'"{hashlib.md5(data).hexdigest()}"'
    assert rig.server.db.get(KEY) is not None


def test_a_retried_put_that_meets_another_writers_object_is_object_exists(rig: Rig) -> None:
    theirs, their_data = write(rig.tmp, "theirs.mp4", 200 * 1024)
    ours, _ = write(rig.tmp, "ours.mp4", 200 * 1024)
    with rig.provider() as client:
        client.put_file(theirs, KEY)
    # Our first attempt never reaches storage; the retry finds their object.
    rig.proxy.decide = faulting("/upload/", Fault.RESET_BEFORE, 1)
    with rig.provider() as client, pytest.raises(ObjectExistsError):
        client.put_file(ours, KEY, overwrite=False)
    assert rig.stored(KEY) == their_data  # untouched, not deleted by a cleanup


class _Meet:
    """Holds each writer's body mid-send until every writer is mid-send."""

    def __init__(self, writers: int) -> None:
        self._barrier = threading.Barrier(writers, timeout=30)
        self._held: set[int] = set()
        self._lock = threading.Lock()

    def progress(self, writer: int) -> Any:
        def callback(done: int, total: int) -> None:
            with self._lock:
                first = 0 < done < total and writer not in self._held
                if first:
                    self._held.add(writer)
            if first:
                self._barrier.wait()

        return callback


@pytest.mark.parametrize("multipart", [False, True], ids=["single", "multipart"])
def test_two_writers_with_overwrite_false_one_wins_the_other_gets_object_exists(
    rig: Rig, multipart: bool
) -> None:
    size = 11 * MIB if multipart else 3 * MIB
    files = [write(rig.tmp, f"w{n}.mp4", size) for n in range(2)]
    meet = _Meet(2)
    outcomes: list[Any] = [None, None]
    overrides = {"STORAGE_MULTIPART": "always" if multipart else "never"}

    def writer(n: int) -> None:
        with rig.provider(**overrides) as client:
            try:
                outcomes[n] = client.put_file(
                    files[n][0], KEY, progress=meet.progress(n), overwrite=False
                )
            except Exception as error:
                outcomes[n] = error

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    errors = [o for o in outcomes if isinstance(o, Exception)]
    wins = [n for n, o in enumerate(outcomes) if not isinstance(o, Exception)]
    assert len(wins) == 1 and len(errors) == 1, outcomes
    assert isinstance(errors[0], ObjectExistsError), errors[0]
    assert rig.stored(KEY) == files[wins[0]][1]
    assert rig.pending_uploads() == []


def test_upload_render_with_overwrite_false_leaves_the_existing_render_alone(rig: Rig) -> None:
    video, video_data = write(rig.tmp, "video.mp4", 200 * 1024)
    thumb, _ = write(rig.tmp, "thumb.jpg", 10 * 1024)
    with rig.provider() as client:
        upload_render(client, "V", "S", "J", video=video)
        with pytest.raises(RenderUploadError) as caught:
            upload_render(client, "V", "S", "J", video=video, thumbnail=thumb, overwrite=False)
    assert isinstance(caught.value.__cause__, ObjectExistsError)
    assert caught.value.asset == "video"
    assert rig.stored("videos/V/S/J/video.mp4") == video_data
    assert rig.stored("videos/V/S/J/thumb.jpg") is None  # stored, then deleted again


def test_a_resumed_upload_keeps_checked_parts_and_ends_checked_as_a_whole(rig: Rig) -> None:
    path, data = write(rig.tmp, "big.mp4", 11 * MIB)
    # Part 3 fails every attempt: the upload is kept for a resume.
    seen: list[str] = []

    def part_three_only(exchange: Exchange) -> Fault | None:
        seen.append(exchange.path)
        return Fault.RESET_BEFORE if exchange.path.endswith("/3") else None

    rig.proxy.decide = part_three_only
    with (
        rig.provider(STORAGE_MULTIPART_CONCURRENCY=1) as client,
        pytest.raises(StorageTransferError),
    ):
        client.put_file(path, KEY, resume=True)
    rig.proxy.decide = lambda exchange: None
    sent_before = len([p for p in seen if p.startswith("/upload-part/")])
    with rig.provider(STORAGE_MULTIPART_CONCURRENCY=1) as client:
        result = client.put_file(path, KEY, resume=True)
    resent = [e.path for e in rig.proxy.exchanges if e.path.startswith("/upload-part/")]
    assert resent[sent_before:] == [resent[sent_before]]  # only part 3 again
    assert resent[sent_before].endswith("/3")
    assert (result.integrity, result.checksum) == ("crc64nvme", crc(data))
    assert rig.stored(KEY) == data


def test_resume_drops_a_part_whose_recorded_checksum_differs(tmp_path: Path) -> None:
    data = os.urandom(64 * 1024)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    part = Part(1, 0, len(data))
    md5 = f'"{hashlib.md5(data).hexdigest()}"'
    with open_source(KEY, path) as source:
        kept = _kept_if_same(source, part, StoredPart(1, md5, len(data), crc(data)), want_crc=True)
        assert kept is not None and kept.crc == _checksum.crc64nvme(data)
        # Same MD5 (as the ETag says), another CRC: storage holds other bytes.
        other = crc(b"other")
        assert (
            _kept_if_same(source, part, StoredPart(1, md5, len(data), other), want_crc=True) is None
        )
        # An ETag that is no MD5 and a matching CRC: kept on the CRC alone.
        opaque = StoredPart(1, '"opaque"', len(data), crc(data))
        assert _kept_if_same(source, part, opaque, want_crc=True) is not None
        # Nothing that ties the part to the file: not kept.
        assert (
            _kept_if_same(source, part, StoredPart(1, '"opaque"', len(data)), want_crc=False)
            is None
        )


def test_resume_without_awscrt_never_keeps_a_part_only_a_crc_could_vouch_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(4096)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    opaque = StoredPart(1, '"opaque"', len(data), crc(data))
    monkeypatch.setattr(_checksum, "_crc", None)
    with open_source(KEY, path) as source:
        assert _kept_if_same(source, Part(1, 0, len(data)), opaque, want_crc=False) is None


def test_the_local_provider_refuses_to_overwrite_when_asked(tmp_path: Path) -> None:
    settings = Settings(STORAGE_PROVIDER="local", STORAGE_LOCAL_ROOT=str(tmp_path / "root"))
    first, first_data = write(tmp_path, "a.mp4", 1024)
    second, second_data = write(tmp_path, "b.mp4", 1024)
    stored = tmp_path / "root" / KEY
    with LocalStorageProvider(settings) as provider:
        provider.put_file(first, KEY, overwrite=False)
        with pytest.raises(ObjectExistsError):
            provider.put_file(second, KEY, overwrite=False)
        assert stored.read_bytes() == first_data  # untouched by the refused write
        provider.put_file(second, KEY)  # the default replaces it
        assert stored.read_bytes() == second_data
    # No temporary file left beside it.
    assert sorted(p.name for p in (tmp_path / "root").rglob("*") if p.is_file()) == ["video.mp4"]
