"""File windows, MD5 hashing and progress tracking, without a server."""

import hashlib
import io
import os
import socket
import threading
from pathlib import Path

import pytest

from ctrlupload import SourceFileError
from ctrlupload._errors import PartStopped
from ctrlupload.engine._streams import (
    FileWindow,
    Md5Hasher,
    ProgressTracker,
    SourceReader,
    object_source,
    open_source,
)
from tests.conftest import RecordingProgress


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(100_000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    return path, data


def read_all(window: FileWindow, block: int) -> bytes:
    out = bytearray()
    while chunk := window.read(block):
        out += chunk
    return bytes(out)


def test_window_reports_its_length_and_reads_only_its_range(data_file) -> None:  # type: ignore[no-untyped-def]
    path, data = data_file
    with open_source("k", path) as source:
        window = FileWindow(source, 1000, 5000)
        assert len(window) == 5000
        assert read_all(window, 777) == data[1000:6000]
        assert window.read(10) == b""
        assert window.tell() == 5000


def test_window_seek_and_tell_are_honest(data_file) -> None:  # type: ignore[no-untyped-def]
    path, data = data_file
    with open_source("k", path) as source:
        window = FileWindow(source, 0, len(data))
        window.read(300)
        assert window.tell() == 300
        assert window.seek(0) == 0
        assert window.read(10) == data[:10]
        assert window.seek(-5, io.SEEK_END) == len(data) - 5
        assert window.seek(10, io.SEEK_CUR) == len(data)  # clamps at the end
        with pytest.raises(ValueError, match="negative"):
            window.seek(-1)


def test_window_is_not_iterable_so_requests_sends_content_length() -> None:
    window = FileWindow(object_source("k", b"abc"), 0, 3)
    assert not hasattr(window, "__iter__")
    assert bool(FileWindow(object_source("k", b""), 0, 0))  # empty but truthy


def test_rereads_after_rewind_do_not_double_count_progress_or_hash(data_file) -> None:  # type: ignore[no-untyped-def]
    path, data = data_file
    recorder = RecordingProgress()
    tracker = ProgressTracker(len(data), recorder)
    hasher = Md5Hasher(threaded=False)
    with open_source("k", path) as source:
        window = FileWindow(source, 0, len(data), hasher=hasher, progress=tracker)
        window.read(40_000)
        window.seek(0)  # a retry rewinds
        read_all(window, 16_384)
    assert hasher.hexdigest() == hashlib.md5(data).hexdigest()
    assert recorder.done[-1] == len(data) - 1  # held back until finish()
    tracker.finish()
    recorder.assert_honest(len(data))


def test_forward_seek_marks_the_digest_incomplete(data_file) -> None:  # type: ignore[no-untyped-def]
    path, data = data_file
    with open_source("k", path) as source:
        window = FileWindow(source, 0, len(data), hasher=Md5Hasher(threaded=False))
        window.seek(10)
        read_all(window, 4096)
        assert window.hash_complete is False


@pytest.mark.parametrize("threaded", [False, True])
def test_md5_hasher_matches_hashlib(threaded: bool) -> None:
    blocks = [os.urandom(n) for n in (1, 65_536, 1_000_003, 7)] * 5
    hasher = Md5Hasher(threaded=threaded)
    for block in blocks:
        hasher.update(block)
    assert hasher.hexdigest() == hashlib.md5(b"".join(blocks)).hexdigest()
    hasher.close()  # idempotent


def test_progress_is_monotonic_capped_and_reaches_total_only_on_finish() -> None:
    recorder = RecordingProgress()
    tracker = ProgressTracker(100, recorder)
    tracker.start()
    tracker.add(60)
    tracker.add(0)
    tracker.add(60)  # would pass the total: held at total - 1
    assert recorder.done == [0, 60, 99]
    tracker.finish()
    tracker.finish()
    recorder.assert_honest(100)


def test_progress_for_an_empty_body_reports_zero_of_zero_once() -> None:
    recorder = RecordingProgress()
    tracker = ProgressTracker(0, recorder)
    tracker.start()
    tracker.finish()
    assert recorder.calls == [(0, 0)]


def test_file_that_shrinks_during_read_raises_source_error(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10_000)
    with open_source("k", path) as source:
        window = FileWindow(source, 0, 10_000)
        window.read(4096)
        os.truncate(path, 5000)
        with pytest.raises(SourceFileError, match="changed during upload"):
            read_all(window, 4096)


def test_file_that_grows_is_caught_before_the_last_block(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10_000)
    with open_source("k", path) as source:
        window = FileWindow(source, 0, 10_000)
        window.read(4096)
        with open(path, "ab") as handle:
            handle.write(b"more")
        window.read(4096)
        with pytest.raises(SourceFileError, match="size went from 10000 to 10004"):
            window.read(4096)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p / "absent.mp4", "not found"),
        (lambda p: p, "is a directory"),
    ],
)
def test_open_source_errors_are_source_file_errors(tmp_path: Path, make, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SourceFileError, match=fragment) as caught:
        open_source("k", make(tmp_path))
    assert caught.value.phase == "source"


def test_open_source_refuses_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    # No writer: a blocking open() would hang here forever.
    with pytest.raises(SourceFileError, match="not a regular file"):
        open_source("k", fifo)


def test_object_source_starts_at_the_current_position() -> None:
    stream = io.BytesIO(b"headerPAYLOAD")
    stream.seek(6)
    source = object_source("k", stream)
    assert source.size == 7
    assert read_all(FileWindow(source, 0, source.size), 3) == b"PAYLOAD"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (io.StringIO("text"), "not text"),
        (12345, "not int"),
    ],
)
def test_object_source_rejects_what_it_cannot_stream(data, fragment) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SourceFileError, match=fragment):
        object_source("k", data)


def test_object_source_rejects_unseekable_streams() -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    with (
        open(read_end, "rb", buffering=0) as pipe,
        pytest.raises(SourceFileError, match="seekable"),
    ):
        object_source("k", pipe)


class _FailingReader(io.RawIOBase):
    """A seekable binary stream whose reads fail like a dying disk."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return 100 if whence == io.SEEK_END else offset

    def tell(self) -> int:
        return 0

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        raise OSError(5, "Input/output error")


def test_read_errors_become_source_file_errors_not_os_errors() -> None:
    # An OSError would look like a socket fault to urllib3 and be retried as one.
    source = object_source("k", _FailingReader())
    window = FileWindow(source, 0, source.size)
    with pytest.raises(SourceFileError, match="Input/output error") as caught:
        window.read(10)
    assert not isinstance(caught.value, OSError)


# -- send_over: the window sends itself (sendfile, a reused buffer, or hashed blocks) -----


class Receiver:
    """A loopback TCP connection whose far end collects everything sent to it."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.sender = socket.create_connection(self._server.getsockname()[:2])
        self.sender.settimeout(5)
        self._peer, _ = self._server.accept()
        self.received = bytearray()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while block := self._peer.recv(1 << 20):
            self.received += block

    def finish(self) -> bytes:
        self.sender.shutdown(socket.SHUT_WR)
        self._thread.join(10)
        for sock in (self.sender, self._peer, self._server):
            sock.close()
        return bytes(self.received)


@pytest.mark.parametrize("source_kind", ["file", "bytes"])
@pytest.mark.parametrize("hashed", [False, True], ids=["no-hash", "md5"])
def test_send_over_sends_the_window_with_honest_progress(
    data_file,
    source_kind: str,
    hashed: bool,  # type: ignore[no-untyped-def]
) -> None:
    path, data = data_file
    progress = RecordingProgress()
    tracker = ProgressTracker(5000, progress)
    hasher = Md5Hasher(threaded=False) if hashed else None
    receiver = Receiver()
    source = open_source("k", path) if source_kind == "file" else object_source("k", data)
    with source:
        window = FileWindow(source, 1000, 5000, hasher=hasher, progress=tracker)
        window.send_over(receiver.sender, 1024)
        window.seek(0)  # a retry resends the window: progress must not count it twice
        window.send_over(receiver.sender, 1024)
    tracker.finish()
    assert receiver.finish() == data[1000:6000] * 2
    progress.assert_honest(5000)
    if hasher is not None:
        assert hasher.hexdigest() == hashlib.md5(data[1000:6000]).hexdigest()


def test_send_over_refuses_a_file_that_changed_before_its_last_byte(data_file) -> None:  # type: ignore[no-untyped-def]
    path, data = data_file
    receiver = Receiver()
    with open_source("k", path) as source:
        window = FileWindow(source, 0, len(data))
        with open(path, "r+b") as handle:  # rewritten in place: same size, new mtime
            os.utime(handle.fileno(), ns=(1, 1))
        with pytest.raises(SourceFileError, match="modified"):
            window.send_over(receiver.sender, 16 * 1024)
    assert len(receiver.finish()) < len(data)  # the last block never went out


def test_send_over_stops_when_cancelled(data_file) -> None:  # type: ignore[no-untyped-def]
    path, _ = data_file
    cancelled = threading.Event()
    cancelled.set()
    receiver = Receiver()
    with open_source("k", path) as source:
        window = FileWindow(source, 0, 5000, cancelled=cancelled)
        with pytest.raises(PartStopped):
            window.send_over(receiver.sender, 1024)
    assert receiver.finish() == b""


def test_read_into_reads_a_file_or_bytes_into_a_buffer(data_file) -> None:  # type: ignore[no-untyped-def]
    path, data = data_file
    for source in (open_source("k", path), object_source("k", data)):
        with source:
            buffer = memoryview(bytearray(100))
            assert source.read_into(500, buffer) == 100
            assert bytes(buffer) == data[500:600]
            assert source.read_into(len(data) - 10, buffer) == 10


@pytest.fixture
def big_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(5 * 1024 * 1024 + 12345)  # past the read-ahead threshold
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    return path, data


def _big_source(kind: str, path: Path, data: bytes) -> SourceReader:
    """A file on disk (sent from maps of it) or a file object (read ahead by a thread)."""
    return open_source("k", path) if kind == "file" else object_source("k", io.BytesIO(data))


@pytest.mark.parametrize("kind", ["file", "file-object"])
def test_send_over_sends_a_large_window_in_order(big_file, kind: str) -> None:  # type: ignore[no-untyped-def]
    path, data = big_file
    progress = RecordingProgress()
    tracker = ProgressTracker(len(data) - 7, progress)
    receiver = Receiver()
    with _big_source(kind, path, data) as source:
        window = FileWindow(source, 7, len(data) - 7, progress=tracker)
        window.send_over(receiver.sender, 1024 * 1024)
        window.seek(0)
        window.send_over(receiver.sender, 1024 * 1024)
    tracker.finish()
    assert receiver.finish() == data[7:] * 2
    progress.assert_honest(len(data) - 7)
    assert not [t for t in threading.enumerate() if t.name == "ctrlupload-read"]


def test_send_over_reports_a_file_cut_short(big_file) -> None:  # type: ignore[no-untyped-def]
    path, data = big_file
    receiver = Receiver()
    with open_source("k", path) as source:
        window = FileWindow(source, 0, len(data))
        os.truncate(path, 3 * 1024 * 1024)
        with pytest.raises(SourceFileError, match=r"ended .* bytes early"):
            window.send_over(receiver.sender, 1024 * 1024)
    assert len(receiver.finish()) <= 3 * 1024 * 1024
    assert not [t for t in threading.enumerate() if t.name == "ctrlupload-read"]


@pytest.mark.parametrize("kind", ["file", "file-object"])
def test_send_over_stops_a_large_window_when_cancelled(big_file, kind: str) -> None:  # type: ignore[no-untyped-def]
    path, data = big_file
    cancelled = threading.Event()

    class CancelAfterFirstBlock(ProgressTracker):
        def add(self, delta: int) -> None:
            super().add(delta)
            cancelled.set()

    receiver = Receiver()
    with open_source("k", path) as source:
        window = FileWindow(
            source,
            0,
            len(data),
            progress=CancelAfterFirstBlock(len(data), None),
            cancelled=cancelled,
        )
        with pytest.raises(PartStopped):
            window.send_over(receiver.sender, 1024 * 1024)
    assert len(receiver.finish()) < len(data)
    assert not [t for t in threading.enumerate() if t.name == "ctrlupload-read"]
