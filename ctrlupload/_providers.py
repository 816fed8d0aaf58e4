"""Storage providers: ``local`` and ``backend_presigned``, behind one interface.

Thread safety: a provider is immutable after construction and may be shared by any
number of threads. Per call it creates its own source reader, file window, hasher and
progress tracker; the only shared state is the transport's connection pools.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, Protocol, Self, TypeVar, runtime_checkable
from urllib.parse import quote

from ._contract import (
    CompletedPart,
    CompleteRequest,
    DeleteRequest,
    ListedPart,
    MultipartAbortRequest,
    MultipartCompleteRequest,
    MultipartCompleteResponse,
    MultipartInitiateRequest,
    MultipartInitiateResponse,
    MultipartListRequest,
    MultipartListResponse,
    MultipartPresignRequest,
    MultipartPresignResponse,
    PresignRequest,
    PresignResponse,
    ResponseModel,
    StatusResponse,
    bare_etag,
    parse_response,
)
from ._errors import (
    BackendError,
    IntegrityError,
    SourceFileError,
    StorageConfigError,
    StorageError,
    StorageTransferError,
    StorageUploadError,
    TransportFailure,
    UploadTooLargeError,
)
from ._keys import guess_content_type, validate_key
from ._multipart import Checkpoint, CheckpointSlot, CheckpointStore, PartRunner, fingerprint
from ._parts import MAX_SINGLE_PUT_BYTES, Part, check_part_size, choose_part_size, plan_parts
from ._redact import redact_text, redact_url, register_secret
from ._settings import MultipartMode, Settings, StorageProvider
from ._streams import (
    DEFAULT_THREADED_HASH_MIN_BYTES,
    CallbackFailed,
    FileWindow,
    Md5Hasher,
    ProgressCallback,
    ProgressTracker,
    SourceReader,
    object_source,
    open_source,
)
from ._transport import HttpResult, RetryPolicy, Transport, TransportConfig
from ._version import __version__

__all__ = [
    "BackendPresignedStorageProvider",
    "BaseStorageProvider",
    "LocalStorageProvider",
    "StorageResult",
    "get_storage_provider",
]

logger = logging.getLogger("ctrlupload")

ObjectData = bytes | bytearray | memoryview | BinaryIO

_EXPIRED_MARKER: Final = b"Request has expired"
_PLAIN_MD5_ETAG: Final = re.compile(r'^(?:W/)?"?([0-9a-fA-F]{32})"?$')
_S3_ERROR_FIELD: Final = re.compile(rb"<(Code|Message)>([^<]{0,300})</\1>")
# Storage never sees these request headers from us, whatever a backend returns.
_HOP_HEADERS: Final = frozenset({"content-length", "transfer-encoding", "host", "connection"})


@dataclass(frozen=True)
class StorageResult:
    """What a successful upload stored.

    Attributes:
        key: The object key.
        url: Where the object can be fetched (the backend's ``public_url``).
        size_bytes: Bytes stored.
        content_type: The object's content type.
        etag: The ETag storage answered, quotes included, as passed to ``complete``.
    """

    key: str
    url: str
    size_bytes: int
    content_type: str
    etag: str | None = None


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
    ) -> StorageResult:
        """Upload a file from disk; see the concrete providers."""
        ...

    def put_object(
        self,
        data: ObjectData,
        key: str,
        content_type: str | None = None,
        progress: ProgressCallback | None = None,
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


_ResponseT = TypeVar("_ResponseT", bound=ResponseModel)


class _ProviderBase:
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
                it calls again (backend provider; the local provider ignores it).

        Returns:
            The stored object.

        Raises:
            StorageUploadError: Any failure, as the subclass that says what failed.
        """
        key, content_type = self._prepare(key, content_type)
        resume_path = os.path.abspath(path) if resume else None
        with open_source(key, path) as source, _callback_errors_unwrapped():
            return self._store(source, key, content_type, progress, resume_path)

    def put_object(
        self,
        data: ObjectData,
        key: str,
        content_type: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> StorageResult:
        """Upload bytes, or a seekable binary file object from its current position.

        Args:
            data: ``bytes``-like, or a binary file object that can ``seek`` and ``tell``.
            key: The object key; checked against the key rules first.
            content_type: Defaults to a type guessed from the key's extension.
            progress: As for :meth:`put_file`.

        Returns:
            The stored object.

        Raises:
            StorageUploadError: Any failure, as the subclass that says what failed.
        """
        key, content_type = self._prepare(key, content_type)
        with object_source(key, data) as source, _callback_errors_unwrapped():
            return self._store(source, key, content_type, progress)

    def _prepare(self, key: str, content_type: str | None) -> tuple[str, str]:
        self._check_open()
        validate_key(key)
        if content_type is None:
            content_type = guess_content_type(key)
        elif not content_type or any(ord(c) < 0x20 or ord(c) == 0x7F for c in content_type):
            raise StorageUploadError(
                key, f"Invalid content type {content_type!r}", phase="validate"
            )
        return key, content_type

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"{type(self).__name__} is closed")

    def _check_size(self, key: str, size: int) -> None:
        limit = self.settings.video_max_upload_bytes
        if size > limit:
            raise UploadTooLargeError(
                key, f"File size {_megabytes(size)} exceeds limit {_megabytes(limit)}"
            )

    def _store(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
        resume_path: str | None = None,
    ) -> StorageResult:
        raise NotImplementedError


@contextlib.contextmanager
def _callback_errors_unwrapped() -> Iterator[None]:
    """Re-raise the progress callback's own exception, unchanged, to the caller."""
    try:
        yield
    except CallbackFailed as failed:
        raise failed.error from None


def _create_temp_beside(target: Path) -> tuple[Path, int]:
    """Create a unique temp file next to ``target``, with the umask's usual permissions."""
    while True:
        temp_path = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
        try:
            return temp_path, os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f}MB"


class LocalStorageProvider(_ProviderBase):
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
    ) -> StorageResult:
        self._check_size(key, source.size)
        tracker = ProgressTracker(source.size, progress)
        tracker.start()
        target = self._path(key)
        hasher = Md5Hasher(threaded=False)
        window = FileWindow(source, 0, source.size, hasher=hasher, progress=tracker)
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
            os.replace(temp_path, target)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                temp_path.unlink()
            if isinstance(exc, OSError):
                raise StorageUploadError(
                    key, f"Could not write {target}: {exc.strerror or exc}"
                ) from exc
            raise
        tracker.finish()
        return StorageResult(
            key=key,
            url=self.get_url(key),
            size_bytes=source.size,
            content_type=content_type,
            etag=f'"{hasher.hexdigest()}"',
        )


class BackendPresignedStorageProvider(_ProviderBase):
    """Uploads through presigned URLs that the backend issues (seed Phase 35).

    For each upload: check the size, ask the backend to presign (bearer token), PUT the
    body to the presigned URL with exactly the returned headers, check the ETag, then
    tell the backend it is complete. The token goes only to ``BACKEND_BASE_URL``.

    Args:
        settings: Needs ``backend_base_url`` and ``backend_service_token``.

    Raises:
        StorageConfigError: A required setting is missing.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings or Settings.from_env())
        s = self.settings
        if not s.backend_base_url:
            raise StorageConfigError(
                "BACKEND_BASE_URL must be set for STORAGE_PROVIDER=backend_presigned",
                variable="BACKEND_BASE_URL",
            )
        if s.backend_service_token is None:
            raise StorageConfigError(
                "BACKEND_SERVICE_TOKEN must be set for STORAGE_PROVIDER=backend_presigned",
                variable="BACKEND_SERVICE_TOKEN",
            )
        self._base_url = s.backend_base_url
        self._token = s.backend_service_token.get_secret_value()
        register_secret(self._token)  # redacted wherever it might surface in text
        # Learned once: the backend answered 404/405/501 to multipart initiate.
        self._no_multipart = False
        self._no_multipart_lock = threading.Lock()
        self._transport = Transport(
            TransportConfig(
                connect_timeout_s=s.storage_connect_timeout_s,
                read_timeout_s=s.storage_read_timeout_s,
                min_send_rate_bytes_s=s.storage_min_send_rate_bytes_s,
                retry=RetryPolicy(
                    attempts=s.storage_retry_attempts,
                    backoff_s=s.storage_retry_backoff_s,
                    backoff_max_s=s.storage_retry_backoff_max_s,
                ),
                send_block_bytes=s.storage_send_block_bytes,
                max_connections=s.storage_max_connections,
            ),
            user_agent=f"ctrlupload/{__version__}",
        )

    def __repr__(self) -> str:
        return f"BackendPresignedStorageProvider(backend={self._base_url!r})"

    def close(self) -> None:
        """Close pooled connections; the provider cannot be used afterwards."""
        super().close()
        self._transport.close()

    def get_url(self, key: str) -> str:
        """Return ``STORAGE_PUBLIC_BASE_URL/key``.

        Raises:
            InvalidKeyError: The key breaks a key rule.
            StorageConfigError: ``STORAGE_PUBLIC_BASE_URL`` is not set.
        """
        validate_key(key)
        base = self.settings.storage_public_base_url
        if not base:
            raise StorageConfigError(
                "STORAGE_PUBLIC_BASE_URL must be set to build URLs without uploading",
                variable="STORAGE_PUBLIC_BASE_URL",
            )
        return f"{base}/{quote(key, safe='/')}"

    def delete(self, key: str) -> None:
        """Ask the backend to delete ``key`` (seed §3.3; delete-if-exists).

        Raises:
            BackendError: The call failed (phase ``delete``).
        """
        self._check_open()
        validate_key(key)
        self._call_backend(
            key,
            "delete",
            self.settings.backend_storage_delete_path,
            DeleteRequest(object_key=key).model_dump(),
            StatusResponse,
        )

    def _store(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
        resume_path: str | None = None,
    ) -> StorageResult:
        size = source.size
        self._check_size(key, size)
        started = time.monotonic()
        result: StorageResult | None = None
        if self._wants_multipart(size, resume_path):
            result = self._store_multipart(source, key, content_type, progress, resume_path)
        if result is None:
            if size > MAX_SINGLE_PUT_BYTES:
                raise UploadTooLargeError(
                    key,
                    f"File size {_megabytes(size)} exceeds S3's single-PUT limit of 5 GiB "
                    "and the backend does not offer multipart uploads",
                )
            result = self._store_single(source, key, content_type, progress)
        logger.debug("stored %s (%d bytes) in %.3fs", key, size, time.monotonic() - started)
        return result

    def _wants_multipart(self, size: int, resume_path: str | None) -> bool:
        mode = self.settings.storage_multipart
        if mode is MultipartMode.NEVER:
            return False
        if mode is MultipartMode.ALWAYS:
            return True
        if self._no_multipart:
            return False
        return resume_path is not None or size >= self.settings.storage_multipart_threshold_bytes

    def _store_single(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
    ) -> StorageResult:
        size = source.size
        tracker = ProgressTracker(size, progress)
        tracker.start()
        presigned: list[PresignResponse] = []

        def sign() -> tuple[str, dict[str, str]]:
            presigned.append(self._presign(key, content_type, size))
            return presigned[-1].upload_url, presigned[-1].headers

        etag = self._send_window(
            key,
            "Upload to presigned URL",
            sign,
            lambda hasher: FileWindow(source, 0, size, hasher=hasher, progress=tracker),
            threaded_hash=size >= DEFAULT_THREADED_HASH_MIN_BYTES,
        )
        public_url = presigned[-1].public_url
        completion = CompleteRequest(
            object_key=key,
            etag=etag,
            size_bytes=size,
            content_type=content_type,
            public_url=public_url,
        )
        self._call_backend(
            key,
            "complete",
            self.settings.backend_storage_complete_path,
            completion.model_dump(),
            StatusResponse,
        )
        tracker.finish()
        return StorageResult(
            key=key, url=public_url, size_bytes=size, content_type=content_type, etag=etag
        )

    def _send_window(
        self,
        key: str,
        what: str,
        sign: Callable[[], tuple[str, dict[str, str]]],
        make_window: Callable[[Md5Hasher | None], FileWindow],
        *,
        threaded_hash: bool = False,
    ) -> str:
        """PUT one window to a presigned URL and return the checked ETag.

        An expired URL is signed once more (``sign``) and the same window is sent again:
        its high-water mark keeps progress and the digest from counting a byte twice.
        """
        hasher = (
            Md5Hasher(threaded=threaded_hash, block_bytes=self.settings.storage_send_block_bytes)
            if self.settings.storage_verify_md5
            else None
        )
        window = make_window(hasher)
        try:
            url, headers = sign()
            result = self._put(window, key, url, headers, what)
            if result.status_code == 403 and _EXPIRED_MARKER in result.body:
                logger.info("presigned URL for %s expired; asking for a fresh one", key)
                url, headers = sign()
                result = self._put(window, key, url, headers, what)
            if not result.ok:
                raise StorageTransferError(
                    key,
                    f"{what} failed: HTTP {result.status_code}" + _s3_error_detail(result.body),
                    status_code=result.status_code,
                )
            etag = result.headers.get("etag")
            if not etag:
                raise StorageTransferError(
                    key,
                    f"{what} failed: storage answered without an ETag",
                    status_code=result.status_code,
                )
            if hasher is not None and window.hash_complete:
                _check_etag(key, etag, hasher.hexdigest(), result.headers)
        finally:
            if hasher is not None:
                hasher.close()
        return etag

    # -- multipart ---------------------------------------------------------------------

    def _store_multipart(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
        resume_path: str | None,
    ) -> StorageResult | None:
        """Upload in parts; None when the backend has no multipart API (use one PUT)."""
        size = source.size
        slot = (
            CheckpointSlot(CheckpointStore(self._resume_dir()), key, resume_path)
            if resume_path is not None
            else None
        )
        resumed = self._resume(source, content_type, slot) if slot is not None else None
        if resumed is not None:
            upload_id, part_size, done = resumed
        else:
            started = self._initiate(key, content_type, size)
            if started is None:
                return None
            upload_id, part_size, done = started.upload_id, started.part_size, {}
            problem = check_part_size(size, part_size)
            if problem is not None:
                error = BackendError(key, f"Multipart initiate failed: {problem}", phase="initiate")
                self._abort(key, upload_id, error)
                raise error
            if slot is not None:
                slot.save(
                    Checkpoint(
                        key=key,
                        upload_id=upload_id,
                        part_size=part_size,
                        content_type=content_type,
                        path=slot.path,
                        size_bytes=size,
                        mtime_ns=source.mtime_ns or 0,
                        fingerprint=fingerprint(source),
                    )
                )
        tracker = ProgressTracker(size, progress)
        tracker.start()
        parts = plan_parts(size, part_size)
        tracker.add(sum(part.length for part in parts if part.number in done))
        todo = [part for part in parts if part.number not in done]
        concurrency = self.settings.storage_multipart_concurrency
        urls = _PartUrls(
            lambda numbers: self._presign_parts(key, upload_id, numbers),
            [part.number for part in todo],
            batch=min(1000, max(4, 2 * concurrency)),
        )

        def send_part(part: Part, cancelled: threading.Event) -> str:
            return self._send_window(
                key,
                f"Upload of part {part.number} to presigned URL",
                lambda: urls.get(part.number),
                lambda hasher: FileWindow(
                    source,
                    part.offset,
                    part.length,
                    hasher=hasher,
                    progress=tracker,
                    cancelled=cancelled,
                ),
            )

        try:
            etags = {**done, **PartRunner(send_part, concurrency).run(todo)}
            completion = MultipartCompleteRequest(
                object_key=key,
                upload_id=upload_id,
                parts=[CompletedPart(part_number=n, etag=etags[n]) for n in sorted(etags)],
                size_bytes=size,
                content_type=content_type,
            )
            completed = self._call_backend(
                key,
                "complete-multipart",
                self.settings.backend_storage_multipart_complete_path,
                completion.model_dump(),
                MultipartCompleteResponse,
            )
        except BaseException as exc:
            if slot is not None and _resumable(exc):
                exc.add_note(
                    f"Multipart upload {upload_id} was kept: call put_file(..., resume=True) "
                    "again to send only the missing parts."
                )
            else:
                self._abort(key, upload_id, exc)
                if slot is not None:
                    slot.delete()
            raise
        if slot is not None:
            slot.delete()
        tracker.finish()
        return StorageResult(
            key=key,
            url=completed.public_url,
            size_bytes=size,
            content_type=content_type,
            etag=completed.etag,
        )

    def _resume_dir(self) -> Path:
        configured = self.settings.storage_resume_dir
        if configured is not None:
            return Path(configured)
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(cache) / "ctrlupload" / "resume"

    def _initiate(self, key: str, content_type: str, size: int) -> MultipartInitiateResponse | None:
        request = MultipartInitiateRequest(
            object_key=key,
            content_type=content_type,
            content_length=size,
            part_size=choose_part_size(size, self.settings.storage_multipart_part_bytes),
        )
        try:
            return self._call_backend(
                key,
                "initiate",
                self.settings.backend_storage_multipart_initiate_path,
                request.model_dump(),
                MultipartInitiateResponse,
            )
        except BackendError as error:
            if error.status_code not in _NO_MULTIPART_STATUSES:
                raise
            if self.settings.storage_multipart is MultipartMode.ALWAYS:
                raise BackendError(
                    key,
                    f"Multipart initiate failed: HTTP {error.status_code}: the backend does "
                    "not offer multipart uploads and STORAGE_MULTIPART=always",
                    phase="initiate",
                    status_code=error.status_code,
                ) from error
            with self._no_multipart_lock:
                first = not self._no_multipart
                self._no_multipart = True
            if first:
                logger.info(
                    "backend %s answered HTTP %s to multipart initiate: using single PUTs "
                    "(up to 5 GiB) for the life of this provider",
                    self._base_url,
                    error.status_code,
                )
            return None

    def _presign_parts(
        self, key: str, upload_id: str, numbers: list[int]
    ) -> dict[int, tuple[str, dict[str, str]]]:
        request = MultipartPresignRequest(object_key=key, upload_id=upload_id, part_numbers=numbers)
        answer = self._call_backend(
            key,
            "presign-parts",
            self.settings.backend_storage_multipart_presign_path,
            request.model_dump(),
            MultipartPresignResponse,
        )
        signed = {part.part_number: (part.upload_url, part.headers) for part in answer.parts}
        missing = sorted(set(numbers) - set(signed))
        if missing:
            raise BackendError(
                key,
                f"Part presign request failed: no URL for part(s) {missing[:5]}",
                phase="presign-parts",
            )
        for _, headers in signed.values():
            self._refuse_token_in(key, headers, "Part presign request failed")
        return signed

    def _list_parts(self, key: str, upload_id: str) -> list[ListedPart]:
        listed: list[ListedPart] = []
        marker: int | None = None
        while True:
            request = MultipartListRequest(
                object_key=key, upload_id=upload_id, part_number_marker=marker
            )
            page = self._call_backend(
                key,
                "list-parts",
                self.settings.backend_storage_multipart_list_path,
                request.model_dump(),
                MultipartListResponse,
            )
            listed.extend(page.parts)
            following = page.next_part_number_marker
            if not page.is_truncated:
                return listed
            if following is None or (marker is not None and following <= marker):
                raise BackendError(
                    key, "List parts failed: the page marker did not advance", phase="list-parts"
                )
            marker = following

    def _resume(
        self, source: SourceReader, content_type: str, slot: CheckpointSlot
    ) -> tuple[str, int, dict[int, str]] | None:
        """Continue the checkpointed upload: its id, part size and the parts to keep."""
        key = slot.key
        checkpoint = slot.load()
        if checkpoint is None:
            return None
        same_file = (
            checkpoint.size_bytes == source.size
            and checkpoint.mtime_ns == (source.mtime_ns or 0)
            and checkpoint.content_type == content_type
            and checkpoint.fingerprint == fingerprint(source)
        )
        if not same_file:
            logger.info("%s changed since its upload started; starting over", slot.path)
            self._abort(key, checkpoint.upload_id, None)
            slot.delete()
            return None
        try:
            listed = self._list_parts(key, checkpoint.upload_id)
        except BackendError as error:
            if error.status_code not in (404, 410):
                raise
            logger.info("upload %s is gone at the backend; starting over", checkpoint.upload_id)
            slot.delete()
            return None
        plan = {part.number: part for part in plan_parts(source.size, checkpoint.part_size)}
        candidates = [
            (plan[item.part_number], item.etag)
            for item in listed
            if item.part_number in plan and item.size_bytes == plan[item.part_number].length
        ]

        def matches(candidate: tuple[Part, str]) -> bool:
            part, etag = candidate
            digest = hashlib.md5(usedforsecurity=False)
            offset, end = part.offset, part.offset + part.length
            while offset < end:
                block = source.read_at(offset, min(1024 * 1024, end - offset))
                if not block:
                    return False
                digest.update(block)
                offset += len(block)
            return bare_etag(etag) == digest.hexdigest()

        with ThreadPoolExecutor(self.settings.storage_multipart_concurrency) as pool:
            verdicts = list(pool.map(matches, candidates))
        done = {
            part.number: etag for (part, etag), ok in zip(candidates, verdicts, strict=True) if ok
        }
        logger.info(
            "resuming upload %s of %s: %d of %d parts already stored",
            checkpoint.upload_id,
            key,
            len(done),
            len(plan),
        )
        return checkpoint.upload_id, checkpoint.part_size, done

    def _abort(self, key: str, upload_id: str, original: BaseException | None) -> None:
        """Abort at the backend; a failure is logged and noted, never raised over ``original``."""
        try:
            self._call_backend(
                key,
                "abort",
                self.settings.backend_storage_multipart_abort_path,
                MultipartAbortRequest(object_key=key, upload_id=upload_id).model_dump(),
                StatusResponse,
            )
        except StorageError as abort_error:
            logger.warning(
                "could not abort multipart upload %s of %s: %s", upload_id, key, abort_error
            )
            if original is not None:
                original.add_note(
                    f"Aborting multipart upload {upload_id} also failed: {abort_error}"
                )

    def _presign(self, key: str, content_type: str, size: int) -> PresignResponse:
        request = PresignRequest(object_key=key, content_type=content_type, content_length=size)
        presign = self._call_backend(
            key,
            "presign",
            self.settings.backend_storage_presign_path,
            request.model_dump(),
            PresignResponse,
        )
        self._refuse_token_in(key, presign.headers, "Presign request failed")
        return presign

    def _refuse_token_in(self, key: str, headers: Mapping[str, str], label: str) -> None:
        for name, value in headers.items():
            if self._token in value or self._token in name:
                raise BackendError(
                    key,
                    f"{label}: the returned headers carry the service token, which is "
                    "never sent to storage",
                    phase="presign",
                )

    def _put(
        self, window: FileWindow, key: str, url: str, headers: Mapping[str, str], what: str
    ) -> HttpResult:
        sent_headers = {
            name: value for name, value in headers.items() if name.lower() not in _HOP_HEADERS
        }
        window.seek(0)
        body: object = window if len(window) else b""
        try:
            return self._transport.put(url, body, sent_headers)
        except TransportFailure as failure:
            raise StorageTransferError(
                key, f"{what} failed: {failure.args[0]} (url {redact_url(url)})"
            ) from failure

    _LABELS: Final = {
        "presign": "Presign request failed",
        "complete": "Complete notification failed",
        "delete": "Delete request failed",
        "initiate": "Multipart initiate failed",
        "presign-parts": "Part presign request failed",
        "list-parts": "List parts failed",
        "complete-multipart": "Multipart complete failed",
        "abort": "Multipart abort failed",
    }

    def _call_backend(
        self,
        key: str,
        phase: str,
        path: str,
        payload: dict[str, object],
        model: type[_ResponseT],
    ) -> _ResponseT:
        label = self._LABELS[phase]
        try:
            result = self._transport.post_json(self._base_url + path, payload, token=self._token)
        except TransportFailure as failure:
            raise BackendError(key, f"{label}: {failure.args[0]}", phase=phase) from failure
        if not result.ok:
            raise BackendError(
                key,
                f"{label}: HTTP {result.status_code}" + _json_error_detail(result.body),
                phase=phase,
                status_code=result.status_code,
            )
        try:
            payload_in = json.loads(result.body)
        except ValueError:
            raise BackendError(
                key,
                f"{label}: response is not JSON",
                phase=phase,
                status_code=result.status_code,
            ) from None
        parsed, problem = parse_response(model, payload_in)
        if parsed is None:
            raise BackendError(
                key, f"{label}: {problem}", phase=phase, status_code=result.status_code
            )
        return parsed


class _PartUrls:
    """Presigned part URLs, signed in batches just ahead of use; thread-safe.

    The first ``get`` of a part takes its URL from the current batch (signing the next
    batch when needed); a second ``get`` (after storage said the URL expired) signs
    that part alone again.
    """

    def __init__(
        self,
        sign: Callable[[list[int]], dict[int, tuple[str, dict[str, str]]]],
        order: list[int],
        batch: int,
    ) -> None:
        self._sign = sign
        self._order = order
        self._position = {number: index for index, number in enumerate(order)}
        self._batch = batch
        self._cache: dict[int, tuple[str, dict[str, str]]] = {}
        self._handed_out: set[int] = set()
        self._lock = threading.Lock()

    def get(self, number: int) -> tuple[str, dict[str, str]]:
        with self._lock:
            if number in self._handed_out:
                return self._sign([number])[number]
            if number not in self._cache:
                start = self._position[number]
                wanted = [
                    n
                    for n in self._order[start : start + self._batch]
                    if n not in self._cache and n not in self._handed_out
                ]
                self._cache.update(self._sign(wanted))
            self._handed_out.add(number)
            signed: tuple[str, dict[str, str]] = self._cache.pop(number)
            return signed


_NO_MULTIPART_STATUSES: Final = frozenset({404, 405, 501})


def _resumable(exc: BaseException) -> bool:
    """A failure a later resume can get past: the network or the service, not the data."""
    if isinstance(exc, (IntegrityError, SourceFileError, UploadTooLargeError)):
        return False
    if isinstance(exc, (StorageTransferError, BackendError)):
        return exc.status_code is None or exc.status_code >= 500 or exc.status_code == 429
    return False


def _check_etag(key: str, etag: str, digest: str, headers: Mapping[str, str]) -> None:
    match = _PLAIN_MD5_ETAG.match(etag.strip())
    if match is None:
        return
    encryption = headers.get("x-amz-server-side-encryption", "")
    customer_key = "x-amz-server-side-encryption-customer-algorithm" in headers
    if encryption.startswith("aws:kms") or customer_key:
        # With SSE-KMS or SSE-C, S3's ETag is not the MD5 of the body.
        return
    if match.group(1).lower() != digest:
        raise IntegrityError(
            key,
            f"ETag {etag} from storage does not match the MD5 of the bytes sent ({digest})",
        )


def _s3_error_detail(body: bytes) -> str:
    fields = dict(_S3_ERROR_FIELD.findall(body))
    code = fields.get(b"Code", b"").decode("utf-8", "replace").strip()
    message = fields.get(b"Message", b"").decode("utf-8", "replace").strip()
    if not code and not message:
        return ""
    detail = ": ".join(part for part in (code, message) if part)
    return f" ({redact_text(detail)})"


def _json_error_detail(body: bytes) -> str:
    try:
        payload = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(payload, dict):
        return ""
    for name in ("message", "error", "detail"):
        value = payload.get(name)
        if isinstance(value, str) and value:
            return f" ({redact_text(value[:200])})"
    return ""


def get_storage_provider(settings: Settings | None = None) -> BaseStorageProvider:
    """Build the provider that ``STORAGE_PROVIDER`` names.

    Args:
        settings: Defaults to :meth:`Settings.from_env` (the environment and ``.env``).

    Returns:
        A :class:`LocalStorageProvider` or :class:`BackendPresignedStorageProvider`.

    Raises:
        StorageConfigError: The settings are invalid, or the provider (``s3``,
            ``minio``) is not available in this version.
    """
    settings = settings or Settings.from_env()
    provider = settings.storage_provider
    if provider is StorageProvider.LOCAL:
        return LocalStorageProvider(settings)
    if provider is StorageProvider.BACKEND_PRESIGNED:
        return BackendPresignedStorageProvider(settings)
    raise StorageConfigError(
        f"STORAGE_PROVIDER={provider.value} is not implemented in ctrlupload "
        f"{__version__}; use 'backend_presigned' (the backend holds the S3 credentials) "
        "or 'local'",
        variable="STORAGE_PROVIDER",
    )
