"""Storage providers: ``local`` and ``backend_presigned``, behind one interface.

Thread safety: a provider is immutable after construction and may be shared by any
number of threads. Per call it creates its own source reader, file window, hasher and
progress tracker; the only shared state is the transport's connection pools.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Final, Protocol, Self, TypeVar, runtime_checkable
from urllib.parse import quote

from ._contract import (
    CompleteRequest,
    DeleteRequest,
    PresignRequest,
    PresignResponse,
    StatusResponse,
    parse_response,
)
from ._errors import (
    BackendError,
    IntegrityError,
    StorageConfigError,
    StorageError,
    StorageTransferError,
    StorageUploadError,
    TransportFailure,
    UploadTooLargeError,
)
from ._keys import guess_content_type, validate_key
from ._redact import redact_text, redact_url
from ._settings import Settings, StorageProvider
from ._streams import (
    DEFAULT_THREADED_HASH_MIN_BYTES,
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


_ResponseT = TypeVar("_ResponseT", PresignResponse, StatusResponse)


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
    ) -> StorageResult:
        """Upload the file at ``path`` as ``key``.

        Args:
            path: The file to upload; it is streamed, never read whole.
            key: The object key; checked against the key rules first.
            content_type: Defaults to a type guessed from the key's extension.
            progress: ``progress(bytes_done, bytes_total)``, called from the uploading
                thread; see the README for its guarantees.

        Returns:
            The stored object.

        Raises:
            StorageUploadError: Any failure, as the subclass that says what failed.
        """
        key, content_type = self._prepare(key, content_type)
        with open_source(key, path) as source:
            return self._store(source, key, content_type, progress)

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
        with object_source(key, data) as source:
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
    ) -> StorageResult:
        raise NotImplementedError


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
        self._transport = Transport(
            TransportConfig(
                connect_timeout_s=s.storage_connect_timeout_s,
                read_timeout_s=s.storage_read_timeout_s,
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
    ) -> StorageResult:
        size = source.size
        self._check_size(key, size)
        started = time.monotonic()
        tracker = ProgressTracker(size, progress)
        tracker.start()
        verify = self.settings.storage_verify_md5
        hasher = (
            Md5Hasher(
                threaded=size >= DEFAULT_THREADED_HASH_MIN_BYTES,
                block_bytes=self.settings.storage_send_block_bytes,
            )
            if verify
            else None
        )
        # One window for every attempt: its high-water mark keeps progress and the
        # digest from counting a resent byte twice.
        window = FileWindow(source, 0, size, hasher=hasher, progress=tracker)
        try:
            presign, result = self._put_with_fresh_url(window, key, content_type, size)
            etag = result.headers.get("etag")
            if not etag:
                raise StorageTransferError(
                    key,
                    "Upload to presigned URL failed: storage answered without an ETag",
                    status_code=result.status_code,
                )
            if hasher is not None and window.hash_complete:
                _check_etag(key, etag, hasher.hexdigest(), result.headers)
        finally:
            if hasher is not None:
                hasher.close()
        completion = CompleteRequest(
            object_key=key,
            etag=etag,
            size_bytes=size,
            content_type=content_type,
            public_url=presign.public_url,
        )
        self._call_backend(
            key,
            "complete",
            self.settings.backend_storage_complete_path,
            completion.model_dump(),
            StatusResponse,
        )
        tracker.finish()
        logger.debug("stored %s (%d bytes) in %.3fs", key, size, time.monotonic() - started)
        return StorageResult(
            key=key,
            url=presign.public_url,
            size_bytes=size,
            content_type=content_type,
            etag=etag,
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
        for name, value in presign.headers.items():
            if self._token in value or self._token in name:
                raise BackendError(
                    key,
                    "Presign request failed: the returned headers carry the service "
                    "token, which is never sent to storage",
                    phase="presign",
                )
        return presign

    def _put_with_fresh_url(
        self, window: FileWindow, key: str, content_type: str, size: int
    ) -> tuple[PresignResponse, HttpResult]:
        """PUT the body; an expired URL gets one fresh presign and one more PUT."""
        presign = self._presign(key, content_type, size)
        result = self._put(window, key, presign)
        if result.status_code == 403 and _EXPIRED_MARKER in result.body:
            logger.info("presigned URL for %s expired; asking for a fresh one", key)
            presign = self._presign(key, content_type, size)
            result = self._put(window, key, presign)
        if not result.ok:
            raise StorageTransferError(
                key,
                f"Upload to presigned URL failed: HTTP {result.status_code}"
                + _s3_error_detail(result.body),
                status_code=result.status_code,
            )
        return presign, result

    def _put(self, window: FileWindow, key: str, presign: PresignResponse) -> HttpResult:
        headers = {
            name: value
            for name, value in presign.headers.items()
            if name.lower() not in _HOP_HEADERS
        }
        window.seek(0)
        body: object = window if len(window) else b""
        try:
            return self._transport.put(presign.upload_url, body, headers)
        except TransportFailure as failure:
            raise StorageTransferError(
                key,
                f"Upload to presigned URL failed: {failure.args[0]} "
                f"(url {redact_url(presign.upload_url)})",
            ) from failure

    _LABELS: Final = {
        "presign": "Presign request failed",
        "complete": "Complete notification failed",
        "delete": "Delete request failed",
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
