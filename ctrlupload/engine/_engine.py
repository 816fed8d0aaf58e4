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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from .._errors import (
    BackendError,
    StorageError,
    StorageTransferError,
    StorageUploadError,
    TransportFailure,
    UploadCancelled,
    UploadTooLargeError,
)
from .._redact import redact_url
from .._settings import MultipartMode, Settings
from .._transport import HttpResult, RequestCancelled, Transport
from .._units import format_rate, format_size
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
from ._signer import MultipartUpload, SetObject, SetSigner, SignedPut, Signer
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
    "StagedUpload",
    "StorageResult",
    "UploadEngine",
    "check_size_limit",
    "log_finished",
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


def check_size_limit(key: str, size: int, limit: int) -> None:
    """Refuse a body over ``VIDEO_MAX_UPLOAD_BYTES``, before any network call.

    Raises:
        UploadTooLargeError: The seed's text in 1024-based units, naming the setting:
            ``File size 150.5 MiB exceeds limit 100.0 MiB (VIDEO_MAX_UPLOAD_BYTES=
            104857600)``; in bytes when the rounded sizes would read the same.
    """
    if size > limit:
        shown, cap = format_size(size), format_size(limit)
        if shown == cap:
            shown, cap = f"{size} bytes", f"{limit} bytes"
        raise UploadTooLargeError(
            key, f"File size {shown} exceeds limit {cap} (VIDEO_MAX_UPLOAD_BYTES={limit})"
        )


def log_finished(key: str, size: int, started: float, attempts: int) -> None:
    """The one INFO line of a finished upload: key, size, time, rate and attempts."""
    took = time.monotonic() - started
    logger.info(
        "uploaded %s: %s in %.2f s (%s, %d attempt%s)",
        key,
        format_size(size),
        took,
        format_rate(size, took),
        attempts,
        "" if attempts == 1 else "s",
    )


@dataclass
class StagedUpload:
    """An upload whose bytes are all in storage and which nobody has recorded yet.

    :meth:`UploadEngine.commit` (one) or :meth:`UploadEngine.commit_set` (several)
    records it; :meth:`UploadEngine.discard` removes what it stored.

    Attributes:
        key: The object key.
        size_bytes: Its size.
        content_type: Its content type.
        etag: A single PUT's checked ETag (None for multipart).
        public_url: A single PUT's public URL (multipart: known once assembled).
        upload_id: The multipart upload (None for a single PUT).
        parts: ``(part_number, etag)`` of every part, ascending (multipart).
    """

    key: str
    size_bytes: int
    content_type: str
    tracker: ProgressTracker = field(repr=False)
    started: float = field(repr=False)
    attempts: int = 1
    etag: str | None = None
    public_url: str = ""
    upload_id: str | None = None
    parts: tuple[tuple[int, str], ...] = ()
    slot: CheckpointSlot | None = field(default=None, repr=False)


class _Attempts:
    """HTTP attempts of one upload's PUTs, counted from several part threads."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self, attempts: int) -> None:
        with self._lock:
            self.count += attempts


def _check_cancel(key: str, cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise UploadCancelled(key)


class UploadEngine:
    """Uploads sources through presigned URLs that ``signer`` hands out.

    An upload has two steps: :meth:`stage` puts every byte in storage, and
    :meth:`commit` records the object (``complete`` or ``multipart/complete``).
    :meth:`upload` does both; ``upload_render`` stages a render's assets, then records
    them together with :meth:`commit_set`.

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
        self._no_complete_set = False
        self._flags_lock = threading.Lock()

    def upload(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
        resume_path: str | None = None,
        cancel: threading.Event | None = None,
    ) -> StorageResult:
        """Upload ``source`` as ``key``: multipart when it pays, else one PUT.

        Raises:
            StorageUploadError: The subclass that says what failed.
            UploadCancelled: ``cancel`` was set; nothing is kept.
        """
        staged = self.stage(source, key, content_type, progress, resume_path, cancel)
        try:
            _check_cancel(key, cancel)
            return self.commit(staged)
        except BaseException as error:
            self._after_commit_failure(staged, error)
            raise

    def stage(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
        resume_path: str | None = None,
        cancel: threading.Event | None = None,
    ) -> StagedUpload:
        """Put every byte of ``source`` in storage, and record nothing.

        Raises:
            StorageUploadError: The subclass that says what failed; nothing is left
                behind but what a ``resume=True`` upload keeps on purpose.
            UploadCancelled: ``cancel`` was set.
        """
        size = source.size
        check_size_limit(key, size, self.settings.video_max_upload_bytes)
        _check_cancel(key, cancel)
        started = time.monotonic()
        staged: StagedUpload | None = None
        if self._wants_multipart(size, resume_path):
            staged = self._stage_multipart(
                source, key, content_type, progress, resume_path, cancel, started
            )
        if staged is None:
            if size > MAX_SINGLE_PUT_BYTES:
                raise UploadTooLargeError(
                    key,
                    f"File size {format_size(size)} exceeds S3's single-PUT limit of 5 GiB "
                    "and the backend does not offer multipart uploads",
                )
            staged = self._stage_single(source, key, content_type, progress, cancel, started)
        logger.debug(
            "stored the bytes of %s (%d bytes) in %.3fs", key, size, time.monotonic() - started
        )
        return staged

    def commit(self, staged: StagedUpload) -> StorageResult:
        """Record one staged upload (the seed's ``complete``, or ``multipart/complete``).

        Raises:
            StorageUploadError: The call failed; the staged bytes are still there.
        """
        if staged.upload_id is None:
            assert staged.etag is not None
            self.signer.complete(
                staged.key, staged.etag, staged.size_bytes, staged.content_type, staged.public_url
            )
            return self._finished(staged, staged.public_url, staged.etag)
        completed = self.signer.complete_multipart(
            staged.key, staged.upload_id, staged.parts, staged.size_bytes, staged.content_type
        )
        return self._finished(staged, completed.public_url, completed.etag)

    def commit_set(self, staged: Sequence[StagedUpload]) -> list[StorageResult]:
        """Record several staged uploads together, in one call where the signer can.

        With a signer that offers the set-level complete, nothing is recorded unless
        everything is. Otherwise (a backend that answers 404/405/501, like the seed's)
        they are recorded one by one, in order, and the answer is remembered for the
        life of the engine.

        Raises:
            StorageUploadError: A call failed; some objects may be recorded (one by one)
                or assembled (multipart): :meth:`discard` each to undo it.
        """
        if not self._no_complete_set and isinstance(self.signer, SetSigner):
            items = [_set_object(item) for item in staged]
            answers = self.signer.complete_set(items)
            if answers is not None:
                return [
                    self._finished(item, answer.public_url, answer.etag)
                    for item, answer in zip(staged, answers, strict=True)
                ]
            if self._learn("_no_complete_set"):
                logger.info(
                    "%r offers no set-level complete: recording a render's objects one by "
                    "one for the life of this provider",
                    self.signer,
                )
        return [self.commit(item) for item in staged]

    def discard(self, staged: StagedUpload, error: BaseException | None = None) -> None:
        """Remove what a staged (or partly recorded) upload stored; best effort.

        A multipart upload is aborted, and its object deleted in case it was
        assembled; a single PUT's object is deleted (with its record, if any). A
        failure is logged and noted on ``error``, never raised.
        """
        if staged.upload_id is not None:
            abort_noting(self.signer, staged.key, staged.upload_id, error)
            if staged.slot is not None:
                staged.slot.delete()
        try:
            self.signer.delete(staged.key)
        except StorageError as delete_error:
            logger.warning("could not delete %s after a failure: %s", staged.key, delete_error)
            if error is not None:
                error.add_note(f"Deleting {staged.key} also failed: {delete_error}")
            return
        logger.info("deleted %s: its render did not finish", staged.key)
        if error is not None:
            error.add_note(f"{staged.key} was stored and has been deleted again.")

    def _finished(self, staged: StagedUpload, public_url: str, etag: str) -> StorageResult:
        """The upload is recorded: report the total, log it, drop its checkpoint."""
        if staged.slot is not None:
            staged.slot.delete()
        staged.tracker.finish()
        log_finished(staged.key, staged.size_bytes, staged.started, staged.attempts)
        return StorageResult(
            key=staged.key,
            url=public_url,
            size_bytes=staged.size_bytes,
            content_type=staged.content_type,
            etag=etag,
        )

    def _learn(self, flag: str) -> bool:
        """Set a learnt-once flag (``_no_multipart``...); True for the first to set it."""
        with self._flags_lock:
            first = not getattr(self, flag)
            setattr(self, flag, True)
        return first

    def _after_commit_failure(self, staged: StagedUpload, error: BaseException) -> None:
        """After a failed or cancelled record: keep a resumable upload, else clean up."""
        if staged.upload_id is None:
            if isinstance(error, UploadCancelled):
                self.discard(staged, error)
            return  # a failed complete leaves the object for a retry to record
        self._after_failure(staged.key, staged.upload_id, staged.slot, error)

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

    def _stage_single(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
        started: float,
    ) -> StagedUpload:
        size = source.size
        tracker = ProgressTracker(size, progress)
        tracker.start()
        signed: list[SignedPut] = []
        attempts = _Attempts()

        def sign() -> SignedPut:
            _check_cancel(key, cancel)
            signed.append(self.signer.presign_put(key, content_type, size))
            logger.debug("presigned a PUT of %s", key)
            return signed[-1]

        etag = self._send_window(
            key,
            "Upload to presigned URL",
            sign,
            lambda hasher: FileWindow(
                source, 0, size, hasher=hasher, progress=tracker, cancel=cancel
            ),
            attempts,
            cancel,
            threaded_hash=size >= DEFAULT_THREADED_HASH_MIN_BYTES,
        )
        logger.debug("sent %s in one PUT (%d attempts)", key, attempts.count)
        return StagedUpload(
            key=key,
            size_bytes=size,
            content_type=content_type,
            tracker=tracker,
            started=started,
            attempts=attempts.count,
            etag=etag,
            public_url=signed[-1].public_url,
        )

    def _send_window(
        self,
        key: str,
        what: str,
        sign: Callable[[], SignedPut],
        make_window: Callable[[Md5Hasher | None], FileWindow],
        attempts: _Attempts,
        cancel: threading.Event | None,
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
            result = self._put(window, key, signed, what, cancel)
            attempts.add(result.attempts)
            if is_expired_answer(
                result.status_code, result.body, signed.url, expires_at=signed.expires_at
            ):
                logger.info("presigned URL for %s expired; asking for a fresh one", key)
                signed = sign()
                result = None  # the first answer does not explain a failure of the second
                result = self._put(window, key, signed, what, cancel)
                attempts.add(result.attempts)
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

    def _put(
        self,
        window: FileWindow,
        key: str,
        signed: SignedPut,
        what: str,
        cancel: threading.Event | None,
    ) -> HttpResult:
        headers = {
            name: value
            for name, value in signed.headers.items()
            if name.lower() not in _HOP_HEADERS
        }
        window.seek(0)
        body: object = window if len(window) else b""
        try:
            return self._transport.put(signed.url, body, headers, cancel=cancel)
        except RequestCancelled:
            raise UploadCancelled(key) from None
        except TransportFailure as failure:
            raise StorageTransferError(
                key, f"{what} failed: {failure.args[0]} (url {redact_url(signed.url)})"
            ) from failure

    # -- multipart -----------------------------------------------------------------------

    def _stage_multipart(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
        resume_path: str | None,
        cancel: threading.Event | None,
        started: float,
    ) -> StagedUpload | None:
        """Send every part; None when the signer offers no multipart (use one PUT)."""
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
                begun = self._initiate(key, content_type, size)
                if begun is None:
                    return None
                upload, done = begun, {}
            # Registered the moment the upload exists: whatever fails from here on
            # (the checkpoint, a progress callback, a part, a cancel) aborts it, or
            # keeps it for a later resume when the failure is the network's.
            cleanups.add(lambda error: self._after_failure(key, upload.upload_id, slot, error))
            logger.debug("multipart upload %s of %s started", upload.upload_id, key)
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
            tracker = ProgressTracker(size, progress)
            attempts = _Attempts()
            parts = self._send_parts(source, key, tracker, attempts, upload, done, cancel)
        logger.debug("sent the %d parts of %s (%d attempts)", len(parts), key, attempts.count)
        return StagedUpload(
            key=key,
            size_bytes=size,
            content_type=content_type,
            tracker=tracker,
            started=started,
            attempts=max(1, attempts.count),
            upload_id=upload.upload_id,
            parts=parts,
            slot=slot,
        )

    def _send_parts(
        self,
        source: SourceReader,
        key: str,
        tracker: ProgressTracker,
        attempts: _Attempts,
        upload: MultipartUpload,
        done: Mapping[int, str],
        cancel: threading.Event | None,
    ) -> tuple[tuple[int, str], ...]:
        """Send the parts not in ``done``; every part's ETag, ascending."""
        tracker.start()
        parts = plan_parts(source.size, upload.part_size)
        tracker.add(sum(part.length for part in parts if part.number in done))
        todo = [part for part in parts if part.number not in done]
        concurrency = self.settings.storage_multipart_concurrency

        def sign_parts(numbers: list[int]) -> Mapping[int, SignedPut]:
            _check_cancel(key, cancel)
            return self.signer.presign_parts(key, upload.upload_id, numbers)

        urls = PartUrls(
            key,
            sign_parts,
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
                    cancel=cancel,
                ),
                attempts,
                cancel,
            )

        etags = {**done, **PartRunner(send_part, concurrency).run(todo)}
        return tuple((number, etags[number]) for number in sorted(etags))

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
        if self._learn("_no_multipart"):
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
        if slot is not None and (is_resumable(error) or isinstance(error, KeyboardInterrupt)):
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


def _set_object(staged: StagedUpload) -> SetObject:
    return SetObject(
        key=staged.key,
        size_bytes=staged.size_bytes,
        content_type=staged.content_type,
        etag=staged.etag,
        public_url=staged.public_url if staged.upload_id is None else None,
        upload_id=staged.upload_id,
        parts=staged.parts,
    )
