"""What every provider shares: the interface, argument checks and the context manager.

Thread safety: a provider's configuration is frozen at construction and it may be
shared by any number of threads. Its only mutable state is its closed flag (set once
by :meth:`close`) and, for engine providers, what the engine learned about its signer
(see :mod:`ctrlupload.engine`). Per call it creates its own source reader, file
window, hasher and progress tracker.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import BinaryIO, Protocol, Self, runtime_checkable

from .._errors import StorageError, StorageUploadError
from .._keys import guess_content_type, validate_key
from .._settings import Settings
from .._transport import Transport
from ..engine._engine import StorageResult, UploadEngine
from ..engine._signer import Signer
from ..engine._streams import (
    CallbackFailed,
    ProgressCallback,
    SourceReader,
    object_source,
    open_source,
    report_end,
)
from ..protocol._contract import check_content_type

__all__ = ["BaseStorageProvider", "EngineProvider", "ObjectData", "ProviderBase"]

ObjectData = bytes | bytearray | memoryview | BinaryIO


@runtime_checkable
class BaseStorageProvider(Protocol):
    """The interface every provider implements."""

    def put_file(
        self,
        path: str | os.PathLike[str],
        key: str,
        content_type: str | None = None,
        progress: ProgressCallback | None = None,
        *,
        resume: bool = False,
        cancel: threading.Event | None = None,
        overwrite: bool = True,
    ) -> StorageResult:
        """Upload a file from disk; see the concrete providers."""
        ...

    def put_object(
        self,
        data: ObjectData,
        key: str,
        content_type: str | None = None,
        progress: ProgressCallback | None = None,
        *,
        cancel: threading.Event | None = None,
        overwrite: bool = True,
    ) -> StorageResult:
        """Upload bytes or a seekable binary file object; see the concrete providers."""
        ...

    def get_url(self, key: str) -> str:
        """Return the public URL of ``key``."""
        ...

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""
        ...

    def close(self) -> None:
        """Release connections and other resources."""
        ...

    def __enter__(self) -> Self:
        """Use the provider as a context manager; it is closed on exit."""
        ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the provider."""
        ...


class ProviderBase:
    """What both providers share: argument checks, the size limit, the context manager."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release resources; the provider cannot be used afterwards."""
        self._closed = True

    def put_file(
        self,
        path: str | os.PathLike[str],
        key: str,
        content_type: str | None = None,
        progress: ProgressCallback | None = None,
        *,
        resume: bool = False,
        cancel: threading.Event | None = None,
        overwrite: bool = True,
    ) -> StorageResult:
        """Upload the file at ``path`` as ``key``.

        Args:
            path: The file to upload; it is streamed, never read whole.
            key: The object key; checked against the key rules first.
            content_type: Defaults to a type guessed from the key's extension.
            progress: ``progress(bytes_done, bytes_total)``, possibly from several
                threads (multipart); see the README for its guarantees.
            resume: Upload in parts and keep a checkpoint under ``STORAGE_RESUME_DIR``,
                so that a process that died mid-upload sends only the missing parts when
                it calls again (engine providers; the local provider ignores it). A
                Ctrl-C (KeyboardInterrupt) keeps the upload for a resume too.
            cancel: Set it (from any thread) to stop the upload within one send block;
                the call then raises :class:`~ctrlupload.UploadCancelled`, and a
                multipart upload is aborted, resumable or not.
            overwrite: False to create the object only if the key is free: storage
                refuses to replace an object already there (``If-None-Match: *``
                signed into the PUT; a multipart upload sends it at complete), and the
                call raises :class:`~ctrlupload.ObjectExistsError`. Needs a backend
                that signs the condition (the reference backend does; one that does
                not makes the call fail before any byte is sent).

        Returns:
            The stored object.

        Raises:
            StorageUploadError: Any failure, as the subclass that says what failed.
            IntegrityError: Storage found the bytes differ from those sent (nothing
                is stored then, where storage verified a CRC64NVME).
            ObjectExistsError: ``overwrite=False`` and the key holds an object.
            UploadCancelled: ``cancel`` was set.
        """
        with _ending(progress):
            key, content_type = self._prepare(key, content_type)
            resume_path = os.path.abspath(path) if resume else None
            with open_source(key, path) as source, _callback_errors_unwrapped():
                return self._store(
                    source, key, content_type, progress, resume_path, cancel, overwrite
                )

    def put_object(
        self,
        data: ObjectData,
        key: str,
        content_type: str | None = None,
        progress: ProgressCallback | None = None,
        *,
        cancel: threading.Event | None = None,
        overwrite: bool = True,
    ) -> StorageResult:
        """Upload bytes, or a seekable binary file object from its current position.

        Args:
            data: ``bytes``-like, or a binary file object that can ``seek`` and ``tell``.
            key: The object key; checked against the key rules first.
            content_type: Defaults to a type guessed from the key's extension.
            progress: As for :meth:`put_file`.
            cancel: As for :meth:`put_file`.
            overwrite: As for :meth:`put_file`.

        Returns:
            The stored object.

        Raises:
            StorageUploadError: Any failure, as the subclass that says what failed.
            UploadCancelled: ``cancel`` was set.
        """
        with _ending(progress):
            key, content_type = self._prepare(key, content_type)
            with object_source(key, data) as source, _callback_errors_unwrapped():
                return self._store(source, key, content_type, progress, None, cancel, overwrite)

    def _prepare(self, key: str, content_type: str | None) -> tuple[str, str]:
        self._check_open()
        validate_key(key)
        if content_type is None:
            return key, guess_content_type(key)
        try:
            # The contract's own rule: the backend refuses what fails it with a 400.
            check_content_type(content_type)
        except ValueError as exc:
            shown = content_type if len(content_type) <= 80 else content_type[:80] + "..."
            raise StorageUploadError(
                key, f"Invalid content type {shown!r}: {exc}", phase="validate"
            ) from None
        return key, content_type

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"{type(self).__name__} is closed")

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
        raise NotImplementedError


class EngineProvider(ProviderBase):
    """A provider that is the upload engine over a signer (``backend_presigned``, ``s3``).

    Subclasses build :attr:`signer`, :attr:`engine` and the transport they share.
    """

    signer: Signer
    engine: UploadEngine
    _transport: Transport

    def close(self) -> None:
        """Close pooled connections; the provider cannot be used afterwards."""
        super().close()
        self.signer.close()
        self._transport.close()

    def delete(self, key: str) -> None:
        """Delete ``key`` through the signer; a missing key is not an error.

        Raises:
            InvalidKeyError: The key breaks a key rule.
            StorageUploadError: The call failed (phase ``delete``): a
                :class:`~ctrlupload.BackendError` for ``backend_presigned``, an
                :class:`~ctrlupload.S3Error` subclass for ``s3``/``minio``.
        """
        self._check_open()
        validate_key(key)
        self.signer.delete(key)

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
        return self.engine.upload(
            source, key, content_type, progress, resume_path, cancel, overwrite
        )


@contextlib.contextmanager
def _ending(progress: ProgressCallback | None) -> Iterator[None]:
    """Tell the progress callback how the call ended (its optional ``on_end``)."""
    try:
        yield
    except BaseException:
        report_end(progress, False)
        raise
    report_end(progress, True)


@contextlib.contextmanager
def _callback_errors_unwrapped() -> Iterator[None]:
    """Re-raise the progress callback's own exception, unchanged, to the caller."""
    try:
        yield
    except CallbackFailed as failed:
        raise failed.error from None
