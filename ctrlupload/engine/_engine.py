"""The upload engine: moves bytes for any signer.

Single PUT, multipart, resume, progress and integrity checks live here once, whoever
signs. The engine asks its :class:`~ctrlupload.engine.Signer` for URLs and
bookkeeping, sends bodies through the :class:`~ctrlupload._transport.Transport` (the
one retry owner for transport faults) and leaves every decision that needs no socket
to :mod:`ctrlupload.protocol`. The only fault the engine itself retries is one urllib3
cannot: a presigned URL that expired, which gets one fresh signature.

Thread safety: an engine is shared by every thread of a provider. Its configuration
is frozen; its one piece of mutable state, whether the signer has turned out to offer
no multipart uploads, is set once under a lock. Per call it creates its own source
reader, windows, hashers, progress tracker, part URLs and cleanups.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .._errors import (
    BackendError,
    StorageTransferError,
    StorageUploadError,
    TransportFailure,
    UploadTooLargeError,
)
from .._redact import redact_url
from .._settings import MultipartMode, Settings
from .._transport import HttpResult, Transport
from ..protocol import (
    MAX_SINGLE_PUT_BYTES,
    Part,
    bare_etag,
    check_part_size,
    choose_part_size,
    is_expired_answer,
    is_resumable,
    plan_parts,
    process_put_answer,
)
from ._multipart import (
    Checkpoint,
    CheckpointSlot,
    CheckpointStore,
    FailureCleanups,
    PartRunner,
    PartUrls,
    abort_noting,
    fingerprint,
)
from ._signer import MultipartUpload, SignedPut, Signer
from ._streams import (
    DEFAULT_THREADED_HASH_MIN_BYTES,
    FileWindow,
    Md5Hasher,
    ProgressCallback,
    ProgressTracker,
    SourceReader,
)

__all__ = [
    "PutFailureExplainer",
    "StorageResult",
    "UploadEngine",
    "check_size_limit",
    "megabytes",
]

logger = logging.getLogger("ctrlupload")

# Storage never sees these request headers from us, whatever a signer returns.
_HOP_HEADERS: Final = frozenset({"content-length", "transfer-encoding", "host", "connection"})
_READ_BLOCK_BYTES: Final = 1024 * 1024

#: ``(error, answer)`` of a failed PUT to a more precise error, or None to keep it.
PutFailureExplainer = Callable[[StorageTransferError, HttpResult | None], StorageUploadError | None]


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


def megabytes(size: int) -> str:
    """A size the way the seed's messages print it: ``150.5MB``."""
    return f"{size / (1024 * 1024):.1f}MB"


def check_size_limit(key: str, size: int, limit: int) -> None:
    """Refuse a body over ``VIDEO_MAX_UPLOAD_BYTES``, before any network call.

    Raises:
        UploadTooLargeError: With the seed's text, e.g. ``File size 150.5MB exceeds
            limit 100.0MB``.
    """
    if size > limit:
        raise UploadTooLargeError(
            key, f"File size {megabytes(size)} exceeds limit {megabytes(limit)}"
        )


class UploadEngine:
    """Uploads sources through presigned URLs that ``signer`` hands out.

    Args:
        signer: Who presigns and keeps the books.
        transport: Sends the bodies.
        settings: Size limit, multipart, resume and checksum settings.
        explain_put_failure: Given a failed PUT's error and storage's answer (None when
            there was none), a more precise error to raise instead, or None. A provider
            that knows its store (``s3``/``minio``) names a missing bucket or bad
            credentials this way.
    """

    def __init__(
        self,
        signer: Signer,
        transport: Transport,
        settings: Settings,
        *,
        explain_put_failure: PutFailureExplainer | None = None,
    ) -> None:
        self.signer = signer
        self.settings = settings
        self._transport = transport
        self._explain = explain_put_failure
        self._no_multipart = False
        self._no_multipart_lock = threading.Lock()

    def upload(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
        resume_path: str | None = None,
    ) -> StorageResult:
        """Upload ``source`` as ``key``: multipart when it pays, else one PUT.

        Raises:
            StorageUploadError: The subclass that says what failed.
        """
        size = source.size
        check_size_limit(key, size, self.settings.video_max_upload_bytes)
        started = time.monotonic()
        result: StorageResult | None = None
        if self._wants_multipart(size, resume_path):
            result = self._upload_multipart(source, key, content_type, progress, resume_path)
        if result is None:
            if size > MAX_SINGLE_PUT_BYTES:
                raise UploadTooLargeError(
                    key,
                    f"File size {megabytes(size)} exceeds S3's single-PUT limit of 5 GiB "
                    "and the backend does not offer multipart uploads",
                )
            result = self._upload_single(source, key, content_type, progress)
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

    # -- single PUT ----------------------------------------------------------------------

    def _upload_single(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
    ) -> StorageResult:
        size = source.size
        tracker = ProgressTracker(size, progress)
        tracker.start()
        signed: list[SignedPut] = []

        def sign() -> SignedPut:
            signed.append(self.signer.presign_put(key, content_type, size))
            return signed[-1]

        etag = self._send_window(
            key,
            "Upload to presigned URL",
            sign,
            lambda hasher: FileWindow(source, 0, size, hasher=hasher, progress=tracker),
            threaded_hash=size >= DEFAULT_THREADED_HASH_MIN_BYTES,
        )
        public_url = signed[-1].public_url
        self.signer.complete(key, etag, size, content_type, public_url)
        tracker.finish()
        return StorageResult(
            key=key, url=public_url, size_bytes=size, content_type=content_type, etag=etag
        )

    def _send_window(
        self,
        key: str,
        what: str,
        sign: Callable[[], SignedPut],
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
        result: HttpResult | None = None
        try:
            signed = sign()
            result = self._put(window, key, signed, what)
            if is_expired_answer(
                result.status_code, result.body, signed.url, expires_at=signed.expires_at
            ):
                logger.info("presigned URL for %s expired; asking for a fresh one", key)
                signed = sign()
                result = None  # the first answer does not explain a failure of the second
                result = self._put(window, key, signed, what)
            digest = hasher.hexdigest() if hasher is not None and window.hash_complete else None
            return process_put_answer(
                key, what, result.status_code, result.headers, result.body, result.attempts, digest
            )
        except StorageTransferError as error:
            better = None if self._explain is None else self._explain(error, result)
            if better is None:
                raise
            raise better from error
        finally:
            if hasher is not None:
                hasher.close()

    def _put(self, window: FileWindow, key: str, signed: SignedPut, what: str) -> HttpResult:
        headers = {
            name: value
            for name, value in signed.headers.items()
            if name.lower() not in _HOP_HEADERS
        }
        window.seek(0)
        body: object = window if len(window) else b""
        try:
            return self._transport.put(signed.url, body, headers)
        except TransportFailure as failure:
            raise StorageTransferError(
                key, f"{what} failed: {failure.args[0]} (url {redact_url(signed.url)})"
            ) from failure

    # -- multipart -----------------------------------------------------------------------

    def _upload_multipart(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
        resume_path: str | None,
    ) -> StorageResult | None:
        """Upload in parts; None when the signer offers no multipart (use one PUT)."""
        size = source.size
        slot = (
            CheckpointSlot(CheckpointStore(self._resume_dir()), key, resume_path)
            if resume_path is not None
            else None
        )
        resumed = self._resume(source, content_type, slot) if slot is not None else None
        with FailureCleanups() as cleanups:
            if resumed is not None:
                upload, done = resumed
            else:
                started = self._initiate(key, content_type, size)
                if started is None:
                    return None
                upload, done = started, {}
            # Registered the moment the upload exists: whatever fails from here on
            # (the checkpoint, a progress callback, a part, complete) aborts it, or
            # keeps it for a later resume when the failure is the network's.
            cleanups.add(lambda error: self._after_failure(key, upload.upload_id, slot, error))
            if resumed is None:
                problem = check_part_size(size, upload.part_size)
                if problem is not None:
                    raise BackendError(
                        key, f"Multipart initiate failed: {problem}", phase="initiate"
                    )
                if slot is not None:
                    slot.save(
                        Checkpoint(
                            key=key,
                            upload_id=upload.upload_id,
                            part_size=upload.part_size,
                            content_type=content_type,
                            path=slot.path,
                            size_bytes=size,
                            mtime_ns=source.mtime_ns or 0,
                            fingerprint=fingerprint(source),
                        )
                    )
            completed = self._send_parts(source, key, content_type, progress, upload, done)
        if slot is not None:
            slot.delete()
        return completed

    def _send_parts(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
        upload: MultipartUpload,
        done: Mapping[int, str],
    ) -> StorageResult:
        size = source.size
        tracker = ProgressTracker(size, progress)
        tracker.start()
        parts = plan_parts(size, upload.part_size)
        tracker.add(sum(part.length for part in parts if part.number in done))
        todo = [part for part in parts if part.number not in done]
        concurrency = self.settings.storage_multipart_concurrency
        urls = PartUrls(
            key,
            lambda numbers: self.signer.presign_parts(key, upload.upload_id, numbers),
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

        etags = {**done, **PartRunner(send_part, concurrency).run(todo)}
        completed = self.signer.complete_multipart(
            key,
            upload.upload_id,
            [(number, etags[number]) for number in sorted(etags)],
            size,
            content_type,
        )
        tracker.finish()
        return StorageResult(
            key=key,
            url=completed.public_url,
            size_bytes=size,
            content_type=content_type,
            etag=completed.etag,
        )

    def _initiate(self, key: str, content_type: str, size: int) -> MultipartUpload | None:
        preferred = choose_part_size(size, self.settings.storage_multipart_part_bytes)
        upload = self.signer.initiate(key, content_type, size, preferred)
        if upload is not None:
            return upload
        if self.settings.storage_multipart is MultipartMode.ALWAYS:
            raise BackendError(
                key,
                "Multipart initiate failed: the backend does not offer multipart uploads "
                "and STORAGE_MULTIPART=always",
                phase="initiate",
            )
        with self._no_multipart_lock:
            first = not self._no_multipart
            self._no_multipart = True
        if first:
            logger.info(
                "%r offers no multipart uploads: using single PUTs (up to 5 GiB) for the "
                "life of this provider",
                self.signer,
            )
        return None

    def _after_failure(
        self, key: str, upload_id: str, slot: CheckpointSlot | None, error: BaseException
    ) -> None:
        """Keep the upload for a resume if the failure allows it, else abort it."""
        if slot is not None and is_resumable(error):
            error.add_note(
                f"Multipart upload {upload_id} was kept: call put_file(..., resume=True) "
                "again to send only the missing parts."
            )
            return
        abort_noting(self.signer, key, upload_id, error)
        if slot is not None:
            slot.delete()

    def _resume_dir(self) -> Path:
        configured = self.settings.storage_resume_dir
        if configured is not None:
            return Path(configured)
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(cache) / "ctrlupload" / "resume"

    def _resume(
        self, source: SourceReader, content_type: str, slot: CheckpointSlot
    ) -> tuple[MultipartUpload, dict[int, str]] | None:
        """Continue the checkpointed upload: it, and the parts to keep."""
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
            abort_noting(self.signer, key, checkpoint.upload_id)  # an old upload
            slot.delete()
            return None
        listed = self.signer.list_parts(key, checkpoint.upload_id)
        if listed is None:
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
            return bare_etag(etag) == _md5_of(source, part)

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
        return MultipartUpload(checkpoint.upload_id, checkpoint.part_size), done


def _md5_of(source: SourceReader, part: Part) -> str | None:
    """The MD5 hex of one part of the source; None if the source ends early."""
    digest = hashlib.md5(usedforsecurity=False)
    offset, end = part.offset, part.offset + part.length
    while offset < end:
        block = source.read_at(offset, min(_READ_BLOCK_BYTES, end - offset))
        if not block:
            return None
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()
