"""Multipart machinery: checkpoints, part URLs, the parallel part sender, cleanups.

The signer makes the calls (initiate, presign parts, list parts, complete, abort);
this module holds the engine's own parts of a multipart upload: checkpoints that
survive a crash, part URLs signed in batches just ahead of use, a runner that sends
parts in parallel and stops the others when one fails, and failure cleanups that are
registered the moment the thing to clean up exists.

Thread safety: a :class:`PartRunner` and a :class:`PartUrls` belong to one upload.
The runner's workers share the source reader (positional reads), the progress tracker
(locked) and the part URLs (locked, and no network I/O under the lock); each part has
its own window and hasher.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from .._errors import PartStopped, StorageError, UploadCancelled
from ..protocol._parts import Part
from ._signer import SignedPut, Signer
from ._streams import SourceReader

__all__ = [
    "Checkpoint",
    "CheckpointSlot",
    "CheckpointStore",
    "FailureCleanups",
    "PartRunner",
    "PartUrls",
    "abort_noting",
    "fingerprint",
]

logger = logging.getLogger("ctrlupload")

CHECKPOINT_VERSION: Final = 1
_FINGERPRINT_SPAN: Final = 64 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """What a resumed process needs to continue an upload: small, written atomically."""

    key: str
    upload_id: str
    part_size: int
    content_type: str
    path: str
    size_bytes: int
    mtime_ns: int
    fingerprint: str
    #: The upload was started with a full-object CRC64NVME (its parts are signed with
    #: their checksums, and complete needs the whole object's).
    checksum: bool = False
    #: The signer took on ``If-None-Match: *`` for the upload's complete.
    if_none_match: bool = False
    version: int = CHECKPOINT_VERSION


def fingerprint(source: SourceReader) -> str:
    """MD5 of the size and the first and last 64 KiB: cheap, and catches a rewritten file."""
    digest = hashlib.md5(usedforsecurity=False)
    digest.update(str(source.size).encode())
    digest.update(source.read_at(0, _FINGERPRINT_SPAN))
    digest.update(source.read_at(max(0, source.size - _FINGERPRINT_SPAN), _FINGERPRINT_SPAN))
    return digest.hexdigest()


class CheckpointStore:
    """Checkpoints as JSON files in one folder, one per (key, file path).

    Args:
        folder: Where checkpoints live (``STORAGE_RESUME_DIR``).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _file(self, key: str, path: str) -> Path:
        name = hashlib.sha256(f"{key}\0{path}".encode()).hexdigest()[:40]
        return self.folder / f"{name}.json"

    def load(self, key: str, path: str) -> Checkpoint | None:
        """The checkpoint for this key and file, or None (a corrupt one is ignored)."""
        file = self._file(key, path)
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
            checkpoint = Checkpoint(**raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("ignoring unreadable resume checkpoint %s: %s", file, exc)
            return None
        if checkpoint.version != CHECKPOINT_VERSION or checkpoint.key != key:
            return None
        return checkpoint

    def save(self, checkpoint: Checkpoint) -> None:
        """Write the checkpoint atomically: a crash leaves the old one or the new one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        file = self._file(checkpoint.key, checkpoint.path)
        temp = file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with open(temp, "w", encoding="utf-8") as handle:
            json.dump(asdict(checkpoint), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, file)

    def delete(self, key: str, path: str) -> None:
        """Remove the checkpoint; a missing one is fine."""
        with contextlib.suppress(FileNotFoundError):
            self._file(key, path).unlink()


@dataclass(frozen=True)
class CheckpointSlot:
    """The checkpoint place of one (key, file path): what a resumable upload uses."""

    store: CheckpointStore
    key: str
    path: str

    def load(self) -> Checkpoint | None:
        """The checkpoint, or None."""
        return self.store.load(self.key, self.path)

    def save(self, checkpoint: Checkpoint) -> None:
        """Write it atomically."""
        self.store.save(checkpoint)

    def delete(self) -> None:
        """Remove it; a missing one is fine."""
        self.store.delete(self.key, self.path)


_T = TypeVar("_T")


class PartRunner(Generic[_T]):
    """Sends parts in parallel; the first failure cancels the rest.

    Args:
        send_part: Uploads one part and returns what it answered; it should stop with
            :class:`PartStopped` once ``cancelled`` is set.
        concurrency: Parts in flight at once.
    """

    def __init__(
        self,
        send_part: Callable[[Part, threading.Event], _T],
        concurrency: int,
    ) -> None:
        self._send_part = send_part
        self._concurrency = concurrency
        self.cancelled = threading.Event()

    def run(self, parts: Iterable[Part]) -> dict[int, _T]:
        """Send every part; returns what each answered, by part number.

        Raises:
            StorageUploadError: The first part failure (the others are cancelled).
            KeyboardInterrupt: Re-raised after the workers have stopped.
        """
        etags: dict[int, _T] = {}
        pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="ctrlupload-part")
        futures: dict[Future[_T], Part] = {}
        try:
            for part in parts:
                futures[pool.submit(self._send_part, part, self.cancelled)] = part
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed:
                self.cancelled.set()
                error = _first_real_error(failed)
                raise error
            for future, part in futures.items():
                etags[part.number] = future.result()
        except BaseException:
            self.cancelled.set()
            raise
        finally:
            # Running parts notice ``cancelled`` at their next block; queued ones never start.
            pool.shutdown(wait=True, cancel_futures=True)
        return etags


def _first_real_error(failed: list[Future[Any]]) -> BaseException:
    """The error that caused the stop, not the stops it triggered (a caller's
    :class:`UploadCancelled` comes after any real failure)."""
    errors = [f.exception() for f in failed]
    real = [e for e in errors if e is not None and not isinstance(e, PartStopped)]
    real.sort(key=lambda e: isinstance(e, UploadCancelled))
    chosen = (real or errors)[0]
    assert chosen is not None
    return chosen


class PartUrls:
    """Presigned part URLs, signed in batches just ahead of use; thread-safe.

    The first ``get`` of a part takes its URL from a batch (the thread that finds the
    part unsigned signs the batch starting there; threads that want a part of a batch
    being signed wait for it). A second ``get`` of a part (storage said its URL
    expired) signs that part alone. Signing happens outside the lock. When signing a
    batch fails, that thread raises the failure and every other ``get``, waiting or
    later, raises :class:`PartStopped` at once: the upload fails once, and no
    worker repeats the failing call.

    Args:
        key: The object key, for errors.
        sign: Signs a list of part numbers.
        order: Part numbers in the order they will be wanted.
        batch: Parts per signing call.
    """

    def __init__(
        self,
        key: str,
        sign: Callable[[list[int]], Mapping[int, SignedPut]],
        order: Sequence[int],
        batch: int,
    ) -> None:
        self._key = key
        self._sign = sign
        self._order = list(order)
        self._position = {number: index for index, number in enumerate(self._order)}
        self._batch = batch
        self._cache: dict[int, SignedPut] = {}
        self._signing: dict[int, Future[None]] = {}
        self._handed_out: set[int] = set()
        self._failed = False
        self._lock = threading.Lock()

    def get(self, number: int) -> SignedPut:
        """The URL to PUT part ``number`` to; call again after it expired."""
        while True:
            with self._lock:
                self._raise_if_failed()
                if number in self._handed_out:
                    again = True
                elif number in self._cache:
                    self._handed_out.add(number)
                    return self._cache.pop(number)
                else:
                    again = False
                    pending = self._signing.get(number)
                    if pending is None:
                        wanted = self._claim_batch(number)
            if again:
                return self._sign_alone(number)
            if pending is not None:
                try:
                    pending.result()
                except BaseException:  # noqa: BLE001 - the signing thread raises it itself
                    raise self._cancelled() from None
                continue  # signed meanwhile: take it from the cache
            self._sign_batch(wanted)

    def _claim_batch(self, number: int) -> list[int]:
        start = self._position[number]
        wanted = [
            n
            for n in self._order[start : start + self._batch]
            if n not in self._cache and n not in self._handed_out and n not in self._signing
        ]
        ticket: Future[None] = Future()
        for n in wanted:
            self._signing[n] = ticket
        return wanted

    def _sign_batch(self, wanted: list[int]) -> None:
        ticket = self._signing[wanted[0]]
        try:
            signed = self._sign(wanted)
        except BaseException as exc:
            with self._lock:
                self._failed = True
                for n in wanted:
                    self._signing.pop(n, None)
            ticket.set_exception(exc)
            raise
        with self._lock:
            self._cache.update((n, signed[n]) for n in wanted)
            for n in wanted:
                self._signing.pop(n, None)
        ticket.set_result(None)

    def _sign_alone(self, number: int) -> SignedPut:
        try:
            return self._sign([number])[number]
        except BaseException:
            with self._lock:
                self._failed = True
            raise

    def _raise_if_failed(self) -> None:
        if self._failed:
            raise self._cancelled()

    def _cancelled(self) -> PartStopped:
        return PartStopped(self._key, "Part upload stopped because presigning part URLs failed")


def abort_noting(
    signer: Signer, key: str, upload_id: str, original: BaseException | None = None
) -> None:
    """Abort a multipart upload; a failure is logged, and noted on ``original`` if
    given, never raised: the abort is cleanup, not the error the caller should see."""
    try:
        signer.abort(key, upload_id)
    except StorageError as abort_error:
        logger.warning("could not abort multipart upload %s of %s: %s", upload_id, key, abort_error)
        if original is not None:
            original.add_note(f"Aborting multipart upload {upload_id} also failed: {abort_error}")


class FailureCleanups:
    """Cleanups that run if the upload fails, registered the moment their resource
    exists (s3transfer's ``add_failure_cleanup``).

    Use it as a context manager around everything after the resource is created. On an
    exception, each cleanup (newest first) is called with it; a cleanup that fails is
    logged and noted on the original exception, never raised over it. On success none
    runs.
    """

    def __init__(self) -> None:
        self._cleanups: list[Callable[[BaseException], None]] = []

    def add(self, cleanup: Callable[[BaseException], None]) -> None:
        """Run ``cleanup(error)`` if the block fails."""
        self._cleanups.append(cleanup)

    def __enter__(self) -> FailureCleanups:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            return
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                cleanup(exc)
            except Exception as cleanup_error:  # noqa: BLE001 - never hide the original
                logger.warning("cleanup after a failed upload failed: %s", cleanup_error)
                exc.add_note(f"Cleaning up after the failure also failed: {cleanup_error}")
