"""File windows, MD5 while sending, and monotonic progress.

A :class:`FileWindow` is what requests and urllib3 get as a request body. It reports
its length honestly (so requests sends ``Content-Length``, never chunked framing) and
supports ``tell``/``seek`` (so urllib3 can rewind it when it retries), and it can send
itself to a socket (:meth:`FileWindow.send_over`). Memory does not grow with the file:
a window holds one block at a time, or, sending without a hash, a 16 MiB read-only map
of the file (page cache, counted in RSS while mapped) or four 512 KiB read-ahead
buffers.

Shared between threads: nothing here but a :class:`ProgressTracker` (locked). Windows
and hashers belong to one upload attempt on one thread (with its helper threads: the
hashing thread, the read-ahead thread).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import mmap
import os
import queue
import socket
import stat as stat_module
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Final, Protocol

from .._errors import PartStopped, SourceFileError, UploadCancelled

logger = logging.getLogger("ctrlupload")

__all__ = [
    "CallbackFailed",
    "FileWindow",
    "Md5Hasher",
    "ProgressCallback",
    "ProgressTracker",
    "SourceReader",
    "open_source",
    "report_end",
]

#: Bodies at least this large are hashed on a helper thread, overlapping with sending.
DEFAULT_THREADED_HASH_MIN_BYTES: Final = 8 * 1024 * 1024
#: Blocks are handed to the hashing thread in pieces of at least this size (fewer
#: queue hand-offs when the send block is small) ...
_HASH_PIECE_BYTES: Final = 1024 * 1024
#: ... and at most this many bytes wait in its queue, whatever the block size.
_HASH_QUEUE_BYTES: Final = 8 * 1024 * 1024
#: Unhashed bodies are read ahead by a helper thread into this many buffers ...
_READ_AHEAD_BUFFERS: Final = 4
#: ... of this size (4 x 512 KiB measured fastest on loopback, see docs/benchmarks.md) ...
_READ_AHEAD_PIECE_BYTES: Final = 512 * 1024
#: ... when more than this is left to send; smaller bodies are read on the caller's thread.
_READ_AHEAD_MIN_BYTES: Final = 2 * 1024 * 1024
#: Files on disk are sent from read-only maps of this many bytes at a time.
_MAP_BYTES: Final = 16 * 1024 * 1024


class ProgressCallback(Protocol):
    """Called as ``progress(bytes_done, bytes_total)``, possibly from another thread.

    The first call reports 0 with the total; ``bytes_done`` never goes back and reaches
    ``bytes_total`` only once the upload is recorded. A callback object that also has
    an ``on_end(ok)`` method gets exactly one call of it when the upload call ends:
    ``on_end(True)`` after success, ``on_end(False)`` after a failure or a cancel
    (see :func:`report_end`).
    """

    def __call__(self, bytes_done: int, bytes_total: int, /) -> None: ...


def report_end(progress: object, ok: bool) -> None:
    """Call ``progress.on_end(ok)`` if it has one; its own failure is logged, not raised
    (the upload's outcome is already decided)."""
    hook = getattr(progress, "on_end", None)
    if not callable(hook):
        return
    try:
        hook(ok)
    except Exception:
        logger.warning("progress callback's on_end(%s) failed", ok, exc_info=True)


class CallbackFailed(Exception):
    """Carries an exception from the caller's progress callback out through urllib3.

    urllib3 takes any OSError raised while sending a body for a network fault and
    retries; wrapped in this (not an OSError), the callback's error stops the upload,
    and the provider re-raises the original.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error


class ProgressTracker:
    """Reports progress that never goes back, never passes the total, and reaches it
    only when :meth:`finish` confirms the upload.

    Retries re-read bytes that were already counted; windows report only bytes past
    their own high-water mark, so a retry never double-counts.
    """

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self._callback = callback
        self._done = 0
        self._reported = -1
        self._lock = threading.Lock()

    def add(self, delta: int) -> None:
        """Count ``delta`` more bytes as sent (held below the total until finish)."""
        if delta <= 0:
            return
        with self._lock:
            self._done += delta
            self._report(min(self._done, self.total - 1))

    def start(self) -> None:
        """Report ``0`` once, so a caller sees the total before the first byte."""
        with self._lock:
            if self.total > 0:
                self._report(0)

    def finish(self) -> None:
        """Report the total: the upload is confirmed.

        The object is stored by now, so a callback that raises here cannot undo it; the
        error is logged rather than turning a stored upload into a reported failure.
        """
        with self._lock:
            try:
                self._report(self.total)
            except CallbackFailed as failed:
                logger.warning(
                    "progress callback failed on the final report", exc_info=failed.error
                )

    def _report(self, value: int) -> None:
        # Called with the lock held, so callbacks arrive in order.
        if value <= self._reported:
            return
        self._reported = value
        if self._callback is not None:
            try:
                self._callback(value, self.total)
            except Exception as exc:
                raise CallbackFailed(exc) from exc


class Md5Hasher:
    """MD5 of a byte stream, optionally computed on a helper thread.

    ``hashlib`` releases the GIL while hashing large buffers, so a helper thread runs
    in parallel with the socket send instead of adding to it.
    """

    def __init__(self, *, threaded: bool, block_bytes: int = _HASH_PIECE_BYTES) -> None:
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        if threaded:
            piece = max(block_bytes, _HASH_PIECE_BYTES)
            self._queue = queue.Queue(maxsize=max(2, _HASH_QUEUE_BYTES // piece))
            self._thread = threading.Thread(target=self._run, name="ctrlupload-md5", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self._queue is not None
        while (block := self._queue.get()) is not None:
            self._md5.update(block)

    def update(self, block: bytes) -> None:
        """Add ``block`` to the digest."""
        if self._queue is None:
            self._md5.update(block)
            return
        self._pending.append(block)
        self._pending_bytes += len(block)
        if self._pending_bytes >= _HASH_PIECE_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._pending and self._queue is not None:
            piece = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            self._queue.put(piece)

    def close(self) -> None:
        """Hash what is pending and stop the helper thread; safe to call again."""
        if self._thread is not None and self._queue is not None:
            self._flush()
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def hexdigest(self) -> str:
        """Wait for pending blocks and return the hex digest."""
        self.close()
        return self._md5.hexdigest()


@dataclass(frozen=True)
class _Identity:
    size: int
    mtime_ns: int


class SourceReader:
    """Positional reads from a file or binary file object, safe across threads.

    Args:
        read_at: ``(offset, size) -> bytes``.
        size: Bytes the source held when the upload started.
        check_unchanged: Raises if the source changed since it was opened.
        close: Releases what this reader opened.
    """

    def __init__(
        self,
        key: str,
        read_at: Callable[[int, int], bytes],
        size: int,
        check_unchanged: Callable[[], str | None] = lambda: None,
        close: Callable[[], None] = lambda: None,
        mtime_ns: int | None = None,
        fileno: int | None = None,
    ) -> None:
        self.key = key
        self.size = size
        self.mtime_ns = mtime_ns
        #: The file descriptor, for a source that is a file on disk (sendfile, preadv).
        self.fileno = fileno
        self._read_at = read_at
        self._check_unchanged = check_unchanged
        self._close = close

    def read_at(self, offset: int, size: int) -> bytes:
        """Read up to ``size`` bytes at ``offset``; wraps OS errors in SourceFileError."""
        try:
            return self._read_at(offset, size)
        except OSError as exc:
            raise SourceFileError(
                self.key, f"Could not read source: {exc.strerror or exc}"
            ) from exc

    def read_into(self, offset: int, buffer: memoryview) -> int:
        """Read up to ``len(buffer)`` bytes at ``offset`` into ``buffer``; bytes read.

        A file on disk is read straight into the buffer (``preadv``), so a reused
        buffer costs no allocation and no page faults.
        """
        try:
            if self.fileno is not None and hasattr(os, "preadv"):
                return os.preadv(self.fileno, [buffer], offset)
            block = self._read_at(offset, len(buffer))
        except OSError as exc:
            raise SourceFileError(
                self.key, f"Could not read source: {exc.strerror or exc}"
            ) from exc
        buffer[: len(block)] = block
        return len(block)

    def verify_unchanged(self) -> None:
        """Raise SourceFileError if the file's size or mtime moved since it was opened."""
        try:
            problem = self._check_unchanged()
        except OSError as exc:
            raise SourceFileError(
                self.key, f"Could not stat source: {exc.strerror or exc}"
            ) from exc
        if problem is not None:
            raise SourceFileError(self.key, f"Source file changed during upload: {problem}")

    def close(self) -> None:
        """Release the file handle this reader opened, if any."""
        self._close()

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_source(key: str, path: str | os.PathLike[str]) -> SourceReader:
    """Open a file for upload and remember its identity to detect changes.

    Raises:
        SourceFileError: The path is missing, a directory, not a regular file or not
            readable.
    """
    shown = os.fspath(path)
    try:
        # O_NONBLOCK keeps open() from waiting forever for a writer on a FIFO; the
        # fstat below then refuses anything that is not a regular file.
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(shown, flags)
    except FileNotFoundError as exc:
        raise SourceFileError(key, f"Source file not found: {shown}") from exc
    except IsADirectoryError as exc:
        raise SourceFileError(key, f"Source path is a directory: {shown}") from exc
    except PermissionError as exc:
        raise SourceFileError(key, f"Source file is not readable: {shown}") from exc
    except OSError as exc:
        raise SourceFileError(key, f"Could not open source {shown}: {exc.strerror}") from exc
    try:
        stat = os.fstat(fd)
        if stat_module.S_ISDIR(stat.st_mode):
            raise SourceFileError(key, f"Source path is a directory: {shown}")
        if not stat_module.S_ISREG(stat.st_mode):
            raise SourceFileError(key, f"Source is not a regular file: {shown}")
    except BaseException:
        os.close(fd)
        raise
    identity = _Identity(stat.st_size, stat.st_mtime_ns)

    def check_unchanged() -> str | None:
        now = os.fstat(fd)
        if now.st_size != identity.size:
            return f"size went from {identity.size} to {now.st_size} bytes"
        if now.st_mtime_ns != identity.mtime_ns:
            return "it was modified (mtime changed)"
        return None

    return SourceReader(
        key,
        _fd_reader(fd),
        identity.size,
        check_unchanged=check_unchanged,
        close=lambda: os.close(fd),
        mtime_ns=identity.mtime_ns,
        fileno=fd,
    )


def _fd_reader(fd: int) -> Callable[[int, int], bytes]:
    if hasattr(os, "pread"):
        return lambda offset, size: os.pread(fd, size, offset)
    lock = threading.Lock()

    def read_at(offset: int, size: int) -> bytes:  # pragma: no cover - Windows
        with lock:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, size)

    return read_at


def object_source(key: str, data: bytes | bytearray | memoryview | BinaryIO) -> SourceReader:
    """Wrap bytes or a seekable binary file object, from its current position.

    Raises:
        SourceFileError: The object is text, not readable or not seekable.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data).cast("B")
        return SourceReader(
            key, lambda offset, size: bytes(view[offset : offset + size]), len(view)
        )
    if isinstance(data, io.TextIOBase):
        raise SourceFileError(key, "put_object needs bytes or a binary file object, not text")
    if not callable(getattr(data, "read", None)):
        raise SourceFileError(
            key, f"put_object needs bytes or a binary file object, not {type(data).__name__}"
        )
    try:
        if not data.seekable():
            raise SourceFileError(
                key,
                "put_object needs a seekable file object (its length must be known "
                "and a retry must rewind it)",
            )
        start = data.tell()
        end = data.seek(0, io.SEEK_END)
        data.seek(start)
    except (OSError, ValueError) as exc:
        raise SourceFileError(key, f"Could not size the file object: {exc}") from exc
    lock = threading.Lock()

    def read_at(offset: int, size: int) -> bytes:
        with lock:
            data.seek(start + offset)
            block = data.read(size)
        if not isinstance(block, bytes):
            raise SourceFileError(key, "the file object's read() did not return bytes")
        return block

    return SourceReader(key, read_at, max(0, end - start))


class FileWindow:
    """A read-only window of ``length`` bytes at ``offset`` in a source.

    ``len()`` is the window's length, ``tell``/``seek`` move within it, and ``read``
    never returns bytes past its end. Bytes read for the first time are counted
    towards progress and fed to the hasher; re-reads after a rewind are neither.
    When the window is read to its end it checks that the source has not changed, and
    raises before the last byte goes out if it has, so storage never completes a body
    that no longer matches the file.

    Before each block it checks two events: ``cancel`` (the caller's: raises
    :class:`~ctrlupload.UploadCancelled`) and ``cancelled`` (another part of the same
    upload failed: raises the internal :class:`~ctrlupload._errors.PartStopped`).

    It is deliberately not an ``io`` object: requests treats anything iterable as a
    stream of unknown framing, while an object with ``read`` and ``__len__`` gets a
    ``Content-Length``.
    """

    def __init__(
        self,
        source: SourceReader,
        offset: int,
        length: int,
        *,
        hasher: Md5Hasher | None = None,
        progress: ProgressTracker | None = None,
        cancelled: threading.Event | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self._source = source
        self._cancelled = cancelled
        self._cancel = cancel
        self._offset = offset
        self._length = length
        self._pos = 0
        self._high_water = 0
        self._hasher = hasher
        self._progress = progress
        self.hash_complete = hasher is not None

    def __len__(self) -> int:
        return self._length

    def __bool__(self) -> bool:
        return True

    def tell(self) -> int:
        """Position within the window."""
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move within the window; positions past the end clamp to the end."""
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = self._length + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if target < 0:
            raise ValueError("negative seek position")
        self._pos = min(target, self._length)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes (all that is left when ``size`` is negative)."""
        want = self._next_block(-1 if size is None else size)
        if not want:
            return b""
        block = self._source.read_at(self._offset + self._pos, want)
        self._check_block(len(block), want)
        end = self._pos + len(block)
        if end == self._length:
            self._source.verify_unchanged()
        if end > self._high_water:
            self._count_fresh(block, end)
        self._pos = end
        return block

    def send_over(self, sock: socket.socket, block_bytes: int) -> None:
        """Send the rest of the window to ``sock``, as ``read`` blocks would be sent.

        The transport calls this instead of reading the window itself. With a hasher,
        blocks are read as by :meth:`read` (the hashing thread keeps each block until
        it has hashed it). With no hasher, a file on disk is sent from read-only maps
        of it (the kernel copies from the page cache straight into the socket), and
        other sources are read ahead by a helper thread into a ring of reused buffers
        while this thread sends. Progress, cancellation and the change check before
        the last byte behave exactly as with :meth:`read`.
        """
        if self._hasher is not None:
            while block := self.read(block_bytes):
                sock.sendall(block)
            return
        if self._source.fileno is not None and hasattr(mmap, "MAP_POPULATE"):
            self._send_mapped(sock, self._source.fileno, block_bytes)
            return
        if self._length - self._pos <= _READ_AHEAD_MIN_BYTES:
            buffer = memoryview(bytearray(min(block_bytes, self._length - self._pos) or 1))
            while want := self._next_block(len(buffer)):
                got = self._source.read_into(self._offset + self._pos, buffer[:want])
                self._send_block(sock, buffer[:got], want)
            return
        with _ReadAhead(self._source, self._offset + self._pos, self._length - self._pos) as ahead:
            while want := self._next_block(_READ_AHEAD_PIECE_BYTES):
                self._send_block(sock, ahead.next_piece(), want)
                ahead.release()

    def _send_mapped(self, sock: socket.socket, fd: int, block_bytes: int) -> None:
        """Send from the page cache through read-only maps of the file, no copy of ours.

        Only the kernel reads the mapped pages (inside ``sendall``), so a file that
        shrinks meanwhile makes the send fail with EFAULT, reported as a changed
        source, never a SIGBUS in this process.
        """
        while self._pos < self._length:
            start = self._offset + self._pos
            aligned = start - start % mmap.ALLOCATIONGRANULARITY
            span = min(_MAP_BYTES, self._offset + self._length - aligned)
            if os.fstat(fd).st_size < aligned + span:
                self._check_block(0, 1)  # it ended early: SourceFileError
            mapped = mmap.mmap(
                fd,
                span,
                flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                prot=mmap.PROT_READ,
                offset=aligned,
            )
            view = memoryview(mapped)
            try:
                at = start - aligned
                while at < span and (want := self._next_block(min(block_bytes, span - at))):
                    if self._pos + want == self._length:
                        self._source.verify_unchanged()
                    try:
                        sock.sendall(view[at : at + want])
                    except OSError as exc:
                        if exc.errno == errno.EFAULT:
                            raise SourceFileError(
                                self._source.key,
                                "Source file changed during upload: it shrank while being sent",
                            ) from None
                        raise
                    self._advance(want)
                    at += want
            finally:
                view.release()
                with contextlib.suppress(BufferError):  # a slice still alive: GC unmaps
                    mapped.close()

    def _send_block(self, sock: socket.socket, block: memoryview, want: int) -> None:
        """Send one block read without a hasher: checked, then counted."""
        self._check_block(len(block), want)
        if self._pos + len(block) == self._length:
            self._source.verify_unchanged()
        sock.sendall(block)
        self._advance(len(block))

    def _next_block(self, size: int) -> int:
        """How much the next block takes (0 at the end); raises if cancelled."""
        remaining = self._length - self._pos
        if remaining <= 0:
            return 0
        if self._cancel is not None and self._cancel.is_set():
            raise UploadCancelled(self._source.key)
        if self._cancelled is not None and self._cancelled.is_set():
            raise PartStopped(self._source.key, "Part upload cancelled because another part failed")
        return remaining if size < 0 else min(size, remaining)

    def _check_block(self, got: int, want: int) -> None:
        if got < want:
            remaining = self._length - self._pos
            raise SourceFileError(
                self._source.key,
                f"Source file changed during upload: it ended {remaining - got} bytes early",
            )

    def _advance(self, sent: int) -> None:
        """Count ``sent`` bytes sent without a hasher."""
        end = self._pos + sent
        if end > self._high_water:
            if self._progress is not None:
                self._progress.add(end - self._high_water)
            self._high_water = end
        self._pos = end

    def _count_fresh(self, block: bytes, end: int) -> None:
        if self._hasher is not None:
            if self._pos > self._high_water:
                # A forward seek skipped bytes: the digest can no longer be trusted.
                self.hash_complete = False
            elif self.hash_complete:
                skip = self._high_water - self._pos
                self._hasher.update(block[skip:] if skip else block)
        if self._progress is not None:
            self._progress.add(end - self._high_water)
        self._high_water = end


class _ReadAhead:
    """A helper thread that reads ``length`` bytes at ``offset`` into a ring of buffers.

    :meth:`next_piece` hands out the next piece read (in order); :meth:`release` gives
    its buffer back for the thread to fill again. A read error reaches the caller from
    :meth:`next_piece`. Leaving the ``with`` block stops and joins the thread.
    """

    def __init__(self, source: SourceReader, offset: int, length: int) -> None:
        self._source = source
        self._offset = offset
        self._length = length
        self._buffers = [
            memoryview(bytearray(_READ_AHEAD_PIECE_BYTES)) for _ in range(_READ_AHEAD_BUFFERS)
        ]
        self._free: queue.Queue[int] = queue.Queue()
        for index in range(_READ_AHEAD_BUFFERS):
            self._free.put(index)
        self._filled: queue.Queue[tuple[int, int] | BaseException] = queue.Queue()
        self._held: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctrlupload-read", daemon=True)

    def __enter__(self) -> _ReadAhead:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._free.put(-1)  # wakes the thread if it waits for a buffer
        self._thread.join()

    def _run(self) -> None:
        position, end = self._offset, self._offset + self._length
        try:
            while position < end:
                index = self._free.get()
                if self._stop.is_set():
                    return
                want = min(_READ_AHEAD_PIECE_BYTES, end - position)
                got = self._source.read_into(position, self._buffers[index][:want])
                self._filled.put((index, got))
                if got < want:
                    return  # the file ended early; the sender reports it
                position += got
        except BaseException as exc:  # noqa: BLE001 - handed to the sending thread
            self._filled.put(exc)

    def next_piece(self) -> memoryview:
        """The next piece, in order (shorter than asked if the file ended early)."""
        item = self._filled.get()
        if isinstance(item, BaseException):
            raise item
        index, got = item
        self._held = index
        return self._buffers[index][:got]

    def release(self) -> None:
        """Give the piece last handed out back to the reading thread."""
        if self._held is not None:
            self._free.put(self._held)
            self._held = None
