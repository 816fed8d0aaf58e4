"""The ``local`` provider: objects as files under ``STORAGE_LOCAL_ROOT``."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import quote

from .._errors import ObjectExistsError, StorageUploadError
from .._keys import validate_key
from .._settings import Settings
from ..engine._engine import StorageResult, check_size_limit, log_finished
from ..engine._streams import (
    FileWindow,
    Md5Hasher,
    ProgressCallback,
    ProgressTracker,
    SourceReader,
)
from ._base import ProviderBase

__all__ = ["LocalStorageProvider"]


def _create_temp_beside(target: Path) -> tuple[Path, int]:
    """Create a unique temp file next to ``target``, with the umask's usual permissions."""
    while True:
        temp_path = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
        try:
            return temp_path, os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


class LocalStorageProvider(ProviderBase):
    """Stores objects as files under ``STORAGE_LOCAL_ROOT``.

    Each file is written to a temporary name in the target directory, flushed to disk
    and renamed over the target, so a reader sees the old object or the new one,
    never a partial one.

    Args:
        settings: Uses ``storage_local_root``, ``video_max_upload_bytes``,
            ``storage_public_base_url`` and ``storage_send_block_bytes``.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings or Settings())
        self.root = Path(self.settings.storage_local_root)

    def __repr__(self) -> str:
        return f"LocalStorageProvider(root={str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def get_url(self, key: str) -> str:
        """Return ``STORAGE_PUBLIC_BASE_URL/key`` when set, else the file's URI.

        Raises:
            InvalidKeyError: The key breaks a key rule.
        """
        validate_key(key)
        base = self.settings.storage_public_base_url
        if base:
            return f"{base}/{quote(key, safe='/')}"
        return self._path(key).absolute().as_uri()

    def delete(self, key: str) -> None:
        """Remove the file for ``key``; a missing file is not an error.

        Raises:
            StorageUploadError: The file exists but could not be removed (phase delete).
        """
        self._check_open()
        validate_key(key)
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageUploadError(
                key, f"Delete failed: {exc.strerror or exc}", phase="delete"
            ) from exc

    def _store(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
        resume_path: str | None = None,
        cancel: threading.Event | None = None,
        overwrite: bool = True,
    ) -> StorageResult:
        check_size_limit(key, source.size, self.settings.video_max_upload_bytes)
        started = time.monotonic()
        tracker = ProgressTracker(source.size, progress)
        tracker.start()
        target = self._path(key)
        hasher = Md5Hasher(threaded=False)
        window = FileWindow(source, 0, source.size, hasher=hasher, progress=tracker, cancel=cancel)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            temp_path, fd = _create_temp_beside(target)
        except OSError as exc:
            raise StorageUploadError(
                key, f"Could not write under {self.root}: {exc.strerror or exc}"
            ) from exc
        try:
            with open(fd, "wb", buffering=0) as handle:
                block = self.settings.storage_send_block_bytes
                while chunk := window.read(block):
                    handle.write(chunk)
                os.fsync(handle.fileno())
            if overwrite:
                os.replace(temp_path, target)
            else:
                # link() refuses an existing target atomically: no check-then-write race.
                os.link(temp_path, target)
                temp_path.unlink()
        except BaseException as exc:
            with contextlib.suppress(OSError):
                temp_path.unlink()
            if isinstance(exc, FileExistsError):
                raise ObjectExistsError.refused(key) from None
            if isinstance(exc, OSError):
                raise StorageUploadError(
                    key, f"Could not write {target}: {exc.strerror or exc}"
                ) from exc
            raise
        tracker.finish()
        log_finished(key, source.size, started, 1)
        return StorageResult(
            key=key,
            url=self.get_url(key),
            size_bytes=source.size,
            content_type=content_type,
            etag=f'"{hasher.hexdigest()}"',
        )
