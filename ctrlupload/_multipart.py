"""Multipart uploads: resume checkpoints and the parallel part sender.

The protocol steps (initiate, presign parts, list parts, complete, abort) are backend
calls made by the provider; this module holds what needs no network: checkpoints that
survive a crash, and a runner that sends parts in parallel and stops the others when
one fails.

Thread safety: a :class:`PartRunner` belongs to one upload. Its workers share the
source reader (positional reads), the progress tracker (locked) and the presigned-URL
cache (locked); each part has its own window and hasher.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from ._errors import UploadCancelled
from ._parts import Part
from ._streams import SourceReader

__all__ = ["Checkpoint", "CheckpointSlot", "CheckpointStore", "PartRunner", "fingerprint"]

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


class PartRunner:
    """Sends parts in parallel; the first failure cancels the rest.

    Args:
        send_part: Uploads one part and returns its ETag; it should stop with
            :class:`UploadCancelled` once ``cancelled`` is set.
        concurrency: Parts in flight at once.
    """

    def __init__(
        self,
        send_part: Callable[[Part, threading.Event], str],
        concurrency: int,
    ) -> None:
        self._send_part = send_part
        self._concurrency = concurrency
        self.cancelled = threading.Event()

    def run(self, parts: Iterable[Part]) -> dict[int, str]:
        """Send every part; returns ETags by part number.

        Raises:
            StorageUploadError: The first part failure (the others are cancelled).
            KeyboardInterrupt: Re-raised after the workers have stopped.
        """
        etags: dict[int, str] = {}
        pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="ctrlupload-part")
        futures: dict[Future[str], Part] = {}
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


def _first_real_error(failed: list[Future[str]]) -> BaseException:
    """The error that caused the stop, not the cancellations it triggered."""
    errors = [f.exception() for f in failed]
    real = [e for e in errors if e is not None and not isinstance(e, UploadCancelled)]
    chosen = (real or errors)[0]
    assert chosen is not None
    return chosen
