"""Part planning and checkpoints (no network)."""

import hashlib
import threading
import time
from pathlib import Path

import pytest

from ctrlupload._errors import PartStopped, StorageTransferError
from ctrlupload.engine._multipart import Checkpoint, CheckpointStore, PartRunner, fingerprint
from ctrlupload.engine._streams import object_source
from ctrlupload.protocol import (
    GIB,
    MAX_PARTS,
    MIB,
    MIN_PART_BYTES,
    Part,
    check_part_size,
    choose_part_size,
    multipart_etag,
    plan_parts,
)


@pytest.mark.parametrize(
    ("size", "preferred", "expected"),
    [
        (100 * MIB, 16 * MIB, 16 * MIB),
        (100 * MIB, 1 * MIB, MIN_PART_BYTES),  # raised to S3's minimum
        (16 * MIB * MAX_PARTS, 16 * MIB, 16 * MIB),  # exactly 10,000 parts
        (16 * MIB * MAX_PARTS + 1, 16 * MIB, 32 * MIB),  # one byte more: doubled
        (1024 * GIB, 16 * MIB, 128 * MIB),
        (0, 16 * MIB, 16 * MIB),
    ],
)
def test_part_size_grows_to_fit_s3_limits(size: int, preferred: int, expected: int) -> None:
    chosen = choose_part_size(size, preferred)
    assert chosen == expected
    assert check_part_size(size, chosen) is None
    assert -(-size // chosen) <= MAX_PARTS


def test_part_size_refuses_objects_over_five_tib() -> None:
    with pytest.raises(ValueError, match="object limit"):
        choose_part_size(5 * 1024 * GIB + 1)


def test_check_part_size_names_the_rule_broken() -> None:
    assert "below" in (check_part_size(100 * MIB, MIB) or "")
    assert "more than 10000 parts" in (check_part_size(10_001 * 5 * MIB, 5 * MIB) or "")
    assert check_part_size(3 * MIB, 5 * MIB) is None  # a single short part is fine


def test_plan_covers_the_file_exactly_with_a_short_last_part() -> None:
    parts = plan_parts(10 * MIB + 3, 4 * MIB)
    assert [p.number for p in parts] == [1, 2, 3]
    assert [p.length for p in parts] == [4 * MIB, 4 * MIB, 2 * MIB + 3]
    assert [p.offset for p in parts] == [0, 4 * MIB, 8 * MIB]
    assert plan_parts(0, 4 * MIB) == [Part(1, 0, 0)]


def test_multipart_etag_is_md5_of_part_md5s_with_count() -> None:
    parts = [b"a" * 10, b"b" * 20]
    md5s = [hashlib.md5(p).hexdigest() for p in parts]
    expected = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    assert multipart_etag(md5s) == f'"{expected}-2"'


def test_checkpoints_round_trip_atomically(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "resume")
    checkpoint = Checkpoint("k", "up-1", 5 * MIB, "video/mp4", "/r/v.mp4", 10, 123, "ab")
    assert store.load("k", "/r/v.mp4") is None
    store.save(checkpoint)
    assert store.load("k", "/r/v.mp4") == checkpoint
    assert store.load("k", "/r/other.mp4") is None
    assert [p.suffix for p in (tmp_path / "resume").iterdir()] == [".json"]  # no temp left
    store.delete("k", "/r/v.mp4")
    store.delete("k", "/r/v.mp4")
    assert store.load("k", "/r/v.mp4") is None


def test_corrupt_checkpoint_is_ignored(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint("k", "up", 1, "t", "/p", 1, 1, "f"))
    next(tmp_path.iterdir()).write_text("{not json")
    assert store.load("k", "/p") is None


def test_fingerprint_sees_a_rewritten_tail() -> None:
    data = bytearray(b"x" * 300_000)
    before = fingerprint(object_source("k", bytes(data)))
    data[-1:] = b"y"
    assert fingerprint(object_source("k", bytes(data))) != before


def test_part_runner_returns_etags_by_number() -> None:
    parts = [Part(n, 0, 0) for n in range(1, 9)]
    etags = PartRunner(lambda part, cancelled: f"e{part.number}", 3).run(parts)
    assert etags == {n: f"e{n}" for n in range(1, 9)}


def test_part_runner_cancels_the_rest_after_the_first_failure() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def send(part: Part, cancelled: threading.Event) -> str:
        with lock:
            started.append(part.number)
        if part.number == 2:
            raise StorageTransferError("k", "part 2 broke")
        for _ in range(200):  # a slow part that notices the cancellation
            if cancelled.is_set():
                raise PartStopped("k", "cancelled")
            time.sleep(0.005)
        return "etag"

    with pytest.raises(StorageTransferError, match="part 2 broke"):
        PartRunner(send, 2).run([Part(n, 0, 0) for n in range(1, 50)])
    assert len(started) < 10  # queued parts never started


def test_all_parts_follows_pages_and_refuses_a_marker_that_stands_still() -> None:
    from ctrlupload.protocol._objects import PartsPage, StoredPart, all_parts

    parts = [StoredPart(n, f'"{n}"', 5) for n in range(1, 6)]
    asked: list[int | None] = []

    def pages(marker: int | None) -> PartsPage:
        asked.append(marker)
        after = [part for part in parts if part.part_number > (marker or 0)][:2]
        more = after[-1].part_number < 5
        return PartsPage(tuple(after), more, after[-1].part_number if more else None)

    assert all_parts(pages) == parts
    assert asked == [None, 2, 4]
    assert all_parts(lambda marker: None) is None
    stuck = PartsPage(tuple(parts[:1]), True, 1)
    with pytest.raises(ValueError, match="did not advance"):
        all_parts(lambda marker: stuck)
    with pytest.raises(ValueError, match="did not advance"):
        all_parts(lambda marker: PartsPage((), True, None))
