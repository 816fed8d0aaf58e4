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
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from .. import _checksum
from .._errors import (
    BackendError,
    IntegrityError,
    ObjectExistsError,
    StorageConfigError,
    StorageError,
    StorageTransferError,
    StorageUploadError,
    TransportFailure,
    UploadCancelled,
    UploadTooLargeError,
)
from .._redact import redact_url
from .._settings import ChecksumMode, MultipartMode, Settings
from .._transport import HttpResult, RequestCancelled, Transport
from .._units import format_rate, format_size
from ..protocol import (
    MAX_SINGLE_PUT_BYTES,
    Part,
    bare_etag,
    check_part_size,
    choose_part_size,
    etag_is_md5,
    is_expired_answer,
    is_resumable,
    plan_parts,
    process_put_answer,
    put_refusal,
)
from ._checksums import PartChecksums, crc_of
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
from ._signer import MultipartUpload, SetObject, SetSigner, SignedPut, Signer, StoredPart
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


#: Which check vouches for the stored bytes (:attr:`StorageResult.integrity`).
Integrity = Literal["crc64nvme", "md5", "none"]


@dataclass(frozen=True)
class StorageResult:
    """What a successful upload stored.

    Attributes:
        key: The object key.
        url: Where the object can be fetched (the backend's ``public_url``).
        size_bytes: Bytes stored.
        content_type: The object's content type.
        etag: The ETag storage answered, quotes included, as passed to ``complete``.
        integrity: The check that vouches for the stored bytes: ``"crc64nvme"`` when
            storage verified the CRC64NVME signed into the URL before it stored them
            (for multipart, each part's and the whole object's); ``"md5"`` when the
            ETag storage answered is the MD5 of the body (of each part) and matched
            the bytes sent; ``"none"`` when neither could be checked (the check was
            off, or storage's ETags are no MD5s: SSE-KMS, SSE-C, S3 Express).
        checksum: The whole object's CRC64NVME as S3 spells it (base64 of its eight
            big-endian bytes) when ``integrity`` is ``"crc64nvme"``, else None.
    """

    key: str
    url: str
    size_bytes: int
    content_type: str
    etag: str | None = None
    integrity: Integrity = "none"
    checksum: str | None = None


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
        etag: A single PUT's checked ETag (None for multipart, and for a PUT whose
            answer was lost: see ``unconfirmed``).
        public_url: A single PUT's public URL (multipart: known once assembled).
        upload_id: The multipart upload (None for a single PUT).
        parts: ``(part_number, etag)`` of every part, ascending (multipart).
        checksum: The whole object's CRC64NVME that storage verifies (a single PUT's
            on arrival, a multipart upload's at complete), or None.
        integrity: What vouches for the bytes (as in :class:`StorageResult`).
        overwrite: False when the object may only be created, never replaced.
        unconfirmed: A retried conditional PUT that storage refused (412) although
            its first attempt may have stored the object: recording it checks that
            the stored object is this one (size and checksum or ETag), else it is
            :class:`~ctrlupload.ObjectExistsError`.
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
    checksum: str | None = None
    integrity: Integrity = "none"
    overwrite: bool = True
    unconfirmed: bool = False


@dataclass(frozen=True)
class _Sent:
    """One window's PUT, answered: its ETag (None when refused with 412), whether the
    ETag was checked as the body's MD5, and the HTTP attempts of the last PUT."""

    etag: str | None
    md5_checked: bool
    attempts: int
    md5_etag: str | None = None


@dataclass(frozen=True)
class _Checks:
    """How one upload is checked: the CRC64NVME to sign (and whether it must be), and
    whether the MD5 of the bytes sent is held against storage's ETag."""

    crc: bool
    strict: bool
    md5: bool


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
        self._no_checksum = False
        self._flags_lock = threading.Lock()
        # Read once: which of the issue-11 keyword options each signer method takes.
        self._signer_keywords = {
            method: _keywords_taken(getattr(signer, method)) for method in _OPTIONED_METHODS
        }
        if settings.storage_checksum is ChecksumMode.CRC64NVME and not _checksum.available():
            raise StorageConfigError(
                "STORAGE_CHECKSUM=crc64nvme needs awscrt 0.28 or later, which is not "
                f"installed: {_checksum.INSTALL_HINT}",
                variable="STORAGE_CHECKSUM",
            )

    def upload(
        self,
        source: SourceReader,
        key: str,
        content_type: str,
        progress: ProgressCallback | None,
        resume_path: str | None = None,
        cancel: threading.Event | None = None,
        overwrite: bool = True,
    ) -> StorageResult:
        """Upload ``source`` as ``key``: multipart when it pays, else one PUT.

        Raises:
            StorageUploadError: The subclass that says what failed.
            ObjectExistsError: ``overwrite=False`` and the key holds an object.
            UploadCancelled: ``cancel`` was set; nothing is kept.
        """
        staged = self.stage(source, key, content_type, progress, resume_path, cancel, overwrite)
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
        overwrite: bool = True,
    ) -> StagedUpload:
        """Put every byte of ``source`` in storage, and record nothing.

        With ``overwrite=False`` the signer is asked to sign ``If-None-Match: *`` (a
        multipart upload sends the condition at complete), and storage refuses to
        replace an object already at the key.

        Raises:
            ObjectExistsError: ``overwrite=False`` and the key holds an object.
            StorageUploadError: The subclass that says what failed; nothing is left
                behind but what a ``resume=True`` upload keeps on purpose.
            UploadCancelled: ``cancel`` was set.
        """
        size = source.size
        check_size_limit(key, size, self.settings.video_max_upload_bytes)
        _check_cancel(key, cancel)
        started = time.monotonic()
        staged: StagedUpload | None = None
        checks = self._checks()
        if self._wants_multipart(size, resume_path):
            staged = self._stage_multipart(
                source, key, content_type, progress, resume_path, cancel, started, checks, overwrite
            )
        if staged is None:
            if size > MAX_SINGLE_PUT_BYTES:
                raise UploadTooLargeError(
                    key,
                    f"File size {format_size(size)} exceeds S3's single-PUT limit of 5 GiB "
                    "and the backend does not offer multipart uploads",
                )
            staged = self._stage_single(
                source, key, content_type, progress, cancel, started, checks, overwrite
            )
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
            try:
                recorded = self._signer_call(
                    "complete",
                    staged.key,
                    staged.etag,
                    staged.size_bytes,
                    staged.content_type,
                    staged.public_url,
                    checksum=staged.checksum,
                    confirm=staged.unconfirmed,
                )
            except StorageUploadError as error:
                instead = _exists_instead(staged, error)
                if instead is error:
                    raise
                raise instead from error
            return self._finished(staged, staged.public_url, recorded or staged.etag)
        completed = self._signer_call(
            "complete_multipart",
            staged.key,
            staged.upload_id,
            staged.parts,
            staged.size_bytes,
            staged.content_type,
            checksum=staged.checksum,
            if_none_match=not staged.overwrite,
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
            try:
                answers = self.signer.complete_set(items)
            except StorageUploadError as error:
                unsure = [item for item in staged if item.unconfirmed]
                if unsure and error.status_code == 409:
                    raise _exists_instead(unsure[0], error) from error
                raise
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
        if staged.unconfirmed or _refused_as_existing(staged.key, error):
            # The object at the key may be another writer's: never delete it.
            logger.info("left %s alone: the object there is not this upload's", staged.key)
            return
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

    def _finished(self, staged: StagedUpload, public_url: str, etag: str | None) -> StorageResult:
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
            integrity=staged.integrity,
            checksum=staged.checksum if staged.integrity == "crc64nvme" else None,
        )

    def _signer_call(self, method: str, *args: Any, **options: Any) -> Any:
        """Call the signer's ``method`` with the keyword options it takes.

        Signers written before the checksum and ``overwrite`` options (issue 11) get
        none of them: it is as if they ignored them, which the engine sees from their
        answers and handles (MD5 instead of the CRC, a clear error for
        ``overwrite=False``). Options left at their defaults are never passed.
        """
        function = getattr(self.signer, method)
        taken = self._signer_keywords[method]
        given = {
            name: value
            for name, value in options.items()
            if value not in (None, False) and (taken is None or name in taken)
        }
        return function(*args, **given)

    def _checks(self) -> _Checks:
        """How the next upload is checked, from ``STORAGE_CHECKSUM`` and what the
        signer has shown so far."""
        mode = self.settings.storage_checksum
        md5 = self.settings.storage_verify_md5 and mode in (ChecksumMode.AUTO, ChecksumMode.MD5)
        if mode is ChecksumMode.CRC64NVME:
            return _Checks(crc=True, strict=True, md5=False)
        crc = mode is ChecksumMode.AUTO and _checksum.available() and not self._no_checksum
        return _Checks(crc=crc, strict=False, md5=md5)

    def _checksum_refused(self, key: str, checks: _Checks, phase: str) -> None:
        """The signer signed no CRC64NVME: fail (``STORAGE_CHECKSUM=crc64nvme``), or
        fall back to the MD5 check, said once at INFO for the life of the engine."""
        if checks.strict:
            raise BackendError(
                key,
                f"{_PHASE_LABELS[phase]}: STORAGE_CHECKSUM=crc64nvme, but the backend did not "
                "sign the x-amz-checksum-crc64nvme header; nothing was sent",
                phase=phase,
            )
        if self._learn("_no_checksum"):
            logger.info(
                "%r signs no CRC64NVME checksums: checking %s for the life of this provider",
                self.signer,
                "the MD5 of the bytes sent against storage's ETag"
                if checks.md5
                else "nothing (STORAGE_VERIFY_MD5 is off)",
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
        checks: _Checks,
        overwrite: bool,
    ) -> StagedUpload:
        size = source.size
        # The checksum is signed into the URL, so it is computed first: one pass.
        checksum = _checksum.encode(crc_of(source, 0, size, cancel)) if checks.crc else None
        tracker = ProgressTracker(size, progress)
        tracker.start()
        attempts = _Attempts()

        def sign() -> SignedPut:
            _check_cancel(key, cancel)
            signed: SignedPut = self._signer_call(
                "presign_put",
                key,
                content_type,
                size,
                checksum=checksum,
                if_none_match=not overwrite,
            )
            logger.debug("presigned a PUT of %s", key)
            return signed

        first = sign()
        signed_headers = _lower(first.headers)
        crc_signed = checksum is not None and _signs_checksum(
            key, signed_headers, checksum, "presign"
        )
        if checksum is not None and not crc_signed:
            self._checksum_refused(key, checks, "presign")
        if not overwrite and signed_headers.get("if-none-match") != "*":
            raise BackendError(
                key,
                "Presign request failed: overwrite=False, but the backend did not sign "
                "If-None-Match: *, so storage could replace an existing object; nothing "
                "was sent",
                phase="presign",
            )
        pending = [first]
        latest: list[SignedPut] = []

        def next_signed() -> SignedPut:
            latest.append(pending.pop() if pending else sign())
            return latest[-1]

        sent = self._send_window(
            key,
            "Upload to presigned URL",
            next_signed,
            lambda hasher: FileWindow(
                source, 0, size, hasher=hasher, progress=tracker, cancel=cancel
            ),
            attempts,
            cancel,
            md5=checks.md5 and not crc_signed,
            checksum=checksum if crc_signed else None,
            threaded_hash=size >= DEFAULT_THREADED_HASH_MIN_BYTES,
        )
        logger.debug("sent %s in one PUT (%d attempts)", key, attempts.count)
        unconfirmed = sent.etag is None
        if unconfirmed:
            # 412: an object is at the key. After one attempt it is someone else's;
            # after a retry it may be what our own first attempt stored.
            if sent.attempts <= 1 or (not crc_signed and sent.md5_etag is None):
                raise ObjectExistsError.refused(key, _REFUSED_PUT)
            logger.info(
                "a retried PUT of %s was refused with 412: checking whether its first "
                "attempt stored it",
                key,
            )
        return StagedUpload(
            key=key,
            size_bytes=size,
            content_type=content_type,
            tracker=tracker,
            started=started,
            attempts=attempts.count,
            etag=sent.etag if not unconfirmed else sent.md5_etag,
            public_url=latest[-1].public_url,
            checksum=checksum if crc_signed else None,
            integrity=(
                "crc64nvme"
                if crc_signed
                else "md5"
                if sent.md5_checked or (unconfirmed and sent.md5_etag is not None)
                else "none"
            ),
            overwrite=overwrite,
            unconfirmed=unconfirmed,
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
        md5: bool,
        checksum: str | None = None,
        threaded_hash: bool = False,
    ) -> _Sent:
        """PUT one window to a presigned URL and read storage's answer.

        An expired URL is signed once more (``sign``) and the same window is sent again:
        its high-water mark keeps progress and the digest from counting a byte twice.

        Returns:
            The ETag (None when storage answered 412: an object is at the key).

        Raises:
            IntegrityError: Storage refused the bytes (``400 BadDigest``: they do not
                match the CRC64NVME signed into the URL), or its ETag or echoed
                checksum differs from what was sent.
            StorageTransferError: Any other failure.
        """
        hasher = (
            Md5Hasher(threaded=threaded_hash, block_bytes=self.settings.storage_send_block_bytes)
            if md5
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
            refusal = put_refusal(result.status_code, result.body)
            if refusal == "exists":
                return _Sent(None, False, result.attempts, _quoted(digest))
            if refusal == "bad-digest":
                raise IntegrityError(
                    key,
                    f"{what} refused by storage: the bytes it received do not match the "
                    "CRC64NVME checksum signed into the URL (400 BadDigest); nothing was "
                    "stored",
                    status_code=400,
                )
            etag, checked = process_put_answer(
                key,
                what,
                result.status_code,
                result.headers,
                result.body,
                result.attempts,
                digest,
                signed.url,
            )
            echoed = result.headers.get(_checksum.HEADER)
            if checksum is not None and echoed is not None and echoed.strip() != checksum:
                raise IntegrityError(
                    key,
                    f"{what}: storage answered with CRC64NVME {echoed.strip()[:16]!r}, not the "
                    f"{checksum!r} of the bytes sent",
                )
            return _Sent(etag, checked, result.attempts)
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
        checks: _Checks,
        overwrite: bool,
    ) -> StagedUpload | None:
        """Send every part; None when the signer offers no multipart (use one PUT)."""
        size = source.size
        slot = (
            CheckpointSlot(CheckpointStore(self._resume_dir()), key, resume_path)
            if resume_path is not None
            else None
        )
        resumed = (
            self._resume(source, content_type, slot, checks, overwrite)
            if slot is not None
            else None
        )
        with FailureCleanups() as cleanups:
            if resumed is not None:
                upload, done = resumed
            else:
                begun = self._initiate(key, content_type, size, checks, overwrite)
                if begun is None:
                    return None
                upload, done = begun, {}
            # Registered the moment the upload exists: whatever fails from here on
            # (the checkpoint, a progress callback, a part, a cancel) aborts it, or
            # keeps it for a later resume when the failure is the network's.
            cleanups.add(lambda error: self._after_failure(key, upload.upload_id, slot, error))
            logger.debug("multipart upload %s of %s started", upload.upload_id, key)
            if resumed is None:
                self._check_initiated(key, size, upload, checks, overwrite)
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
                            checksum=upload.checksum,
                            if_none_match=upload.if_none_match,
                        )
                    )
            tracker = ProgressTracker(size, progress)
            attempts = _Attempts()
            parts, checksum, md5_checked = self._send_parts(
                source, key, tracker, attempts, upload, done, cancel, checks
            )
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
            checksum=checksum,
            integrity="crc64nvme" if checksum else "md5" if md5_checked else "none",
            overwrite=overwrite,
        )

    def _check_initiated(
        self, key: str, size: int, upload: MultipartUpload, checks: _Checks, overwrite: bool
    ) -> None:
        """Refuse an upload the signer started without what this one needs."""
        problem = check_part_size(size, upload.part_size)
        if problem is not None:
            raise BackendError(key, f"Multipart initiate failed: {problem}", phase="initiate")
        if not overwrite and not upload.if_none_match:
            raise BackendError(
                key,
                "Multipart initiate failed: overwrite=False, but the backend did not take on "
                "If-None-Match: * for the upload's complete, so it could replace an existing "
                "object; the upload is aborted",
                phase="initiate",
            )
        if checks.crc and not upload.checksum:
            self._checksum_refused(key, checks, "initiate")

    def _send_parts(
        self,
        source: SourceReader,
        key: str,
        tracker: ProgressTracker,
        attempts: _Attempts,
        upload: MultipartUpload,
        done: Mapping[int, _Kept],
        cancel: threading.Event | None,
        checks: _Checks,
    ) -> tuple[tuple[tuple[int, str], ...], str | None, bool]:
        """Send the parts not in ``done``.

        Returns:
            Every part's ETag, ascending; the whole object's CRC64NVME when the upload
            checks one; whether every part's ETag was checked as its MD5.
        """
        tracker.start()
        parts = plan_parts(source.size, upload.part_size)
        tracker.add(sum(part.length for part in parts if part.number in done))
        todo = [part for part in parts if part.number not in done]
        concurrency = self.settings.storage_multipart_concurrency
        batch = min(1000, max(4, 2 * concurrency))
        crcs = PartChecksums(
            source, todo if upload.checksum else [], ahead=batch + concurrency, cancel=cancel
        )

        def sign_parts(numbers: list[int]) -> Mapping[int, SignedPut]:
            _check_cancel(key, cancel)
            checksums = [crcs.encoded(n) for n in numbers] if upload.checksum else None
            signed: Mapping[int, SignedPut] = self._signer_call(
                "presign_parts", key, upload.upload_id, numbers, checksums=checksums
            )
            if checksums is not None:
                for number, value in zip(numbers, checksums, strict=True):
                    if number in signed and not _signs_checksum(
                        key, _lower(signed[number].headers), value, "presign-parts"
                    ):
                        raise BackendError(
                            key,
                            f"Part presign request failed: part {number}'s URL carries no "
                            "x-amz-checksum-crc64nvme header, though the upload was started "
                            "with a full-object CRC64NVME",
                            phase="presign-parts",
                        )
            return signed

        urls = PartUrls(key, sign_parts, [part.number for part in todo], batch=batch)
        md5 = checks.md5 and not upload.checksum

        def send_part(part: Part, cancelled: threading.Event) -> _Sent:
            what = f"Upload of part {part.number} to presigned URL"
            sent = self._send_window(
                key,
                what,
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
                md5=md5,
                checksum=crcs.encoded(part.number) if upload.checksum else None,
            )
            if sent.etag is None:  # 412 to a part: no store sends it, the contract has none
                raise StorageTransferError(key, f"{what} failed: HTTP 412", status_code=412)
            return sent

        with crcs:
            answers = PartRunner(send_part, concurrency).run(todo)
            fresh = {number: (sent.etag or "") for number, sent in answers.items()}
            checksum = None
            if upload.checksum:
                values = {n: kept.crc for n, kept in done.items() if kept.crc is not None}
                values.update((part.number, crcs.get(part.number)) for part in todo)
                whole = _checksum.combine_all((values[part.number], part.length) for part in parts)
                checksum = _checksum.encode(whole)
        etags = {**{n: kept.etag for n, kept in done.items()}, **fresh}
        md5_checked = all(sent.md5_checked for sent in answers.values()) and all(
            kept.md5_checked for kept in done.values()
        )
        ordered = tuple((number, etags[number]) for number in sorted(etags))
        return ordered, checksum, md5_checked and bool(ordered)

    def _initiate(
        self, key: str, content_type: str, size: int, checks: _Checks, overwrite: bool
    ) -> MultipartUpload | None:
        preferred = choose_part_size(size, self.settings.storage_multipart_part_bytes)
        upload: MultipartUpload | None = self._signer_call(
            "initiate",
            key,
            content_type,
            size,
            preferred,
            checksum=checks.crc,
            if_none_match=not overwrite,
        )
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
        self,
        source: SourceReader,
        content_type: str,
        slot: CheckpointSlot,
        checks: _Checks,
        overwrite: bool,
    ) -> tuple[MultipartUpload, dict[int, _Kept]] | None:
        """Continue the checkpointed upload: it, and the parts to keep.

        A part is kept only if storage holds it with the length planned and it matches
        the file: its ETag is the part's MD5 (where the ETag is an MD5), and its
        CRC64NVME, where storage recorded one, is the part's.
        """
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
            why = f"{slot.path} changed since its upload started"
        elif not overwrite and not checkpoint.if_none_match:
            why = f"upload {key} was started without overwrite=False"
        elif checkpoint.checksum and not _checksum.available():
            why = f"upload {key} was started with a CRC64NVME, and awscrt is gone"
        else:
            why = None
        if why is not None:
            logger.info("%s; starting over", why)
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
            (plan[item.part_number], item)
            for item in listed
            if item.part_number in plan and item.size_bytes == plan[item.part_number].length
        ]

        def check(candidate: tuple[Part, StoredPart]) -> _Kept | None:
            part, held = candidate
            return _kept_if_same(source, part, held, want_crc=checkpoint.checksum)

        with ThreadPoolExecutor(self.settings.storage_multipart_concurrency) as pool:
            verdicts = list(pool.map(check, candidates))
        done = {
            part.number: kept
            for (part, _), kept in zip(candidates, verdicts, strict=True)
            if kept is not None
        }
        logger.info(
            "resuming upload %s of %s: %d of %d parts already stored",
            checkpoint.upload_id,
            key,
            len(done),
            len(plan),
        )
        upload = MultipartUpload(
            checkpoint.upload_id,
            checkpoint.part_size,
            checksum=checkpoint.checksum,
            if_none_match=checkpoint.if_none_match,
        )
        return upload, done


@dataclass(frozen=True)
class _Kept:
    """A part a resumed upload keeps: its ETag, whether that ETag was checked as the
    part's MD5, and the part's CRC64NVME when the upload checks one."""

    etag: str
    md5_checked: bool
    crc: int | None = None


def _kept_if_same(
    source: SourceReader, part: Part, held: StoredPart, *, want_crc: bool
) -> _Kept | None:
    """``held`` as a part to keep, if it is this part of the file (one read of it).

    ``want_crc``: the upload checks a whole-object CRC64NVME, so the part's CRC is
    needed either way (``_resume`` starts over when awscrt is missing).
    """
    md5_checked = etag_is_md5(held.etag, {})
    crc_on = (want_crc or held.checksum is not None) and _checksum.available()
    if not md5_checked and not (crc_on and held.checksum is not None):
        return None  # nothing we can compute ties the stored part to these bytes
    md5 = hashlib.md5(usedforsecurity=False) if md5_checked else None
    crc = 0
    offset, end = part.offset, part.offset + part.length
    while offset < end:
        block = source.read_at(offset, min(_READ_BLOCK_BYTES, end - offset))
        if not block:
            return None
        if md5 is not None:
            md5.update(block)
        if crc_on:
            crc = _checksum.crc64nvme(block, crc)
        offset += len(block)
    if md5 is not None and bare_etag(held.etag) != md5.hexdigest():
        return None
    if held.checksum is not None and crc_on and held.checksum.strip() != _checksum.encode(crc):
        return None
    return _Kept(held.etag, md5_checked, crc if crc_on else None)


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value.strip() for name, value in headers.items()}


def _signs_checksum(key: str, headers: Mapping[str, str], checksum: str, phase: str) -> bool:
    """Whether the signed headers (lower-case names) carry this checksum; raises if
    they carry another (the URL would then be refused, or store other bytes)."""
    signed = headers.get(_checksum.HEADER)
    if signed is None:
        return False
    if signed != checksum:
        raise BackendError(
            key,
            f"{_PHASE_LABELS[phase]}: the backend signed another CRC64NVME than the one asked "
            "for; nothing was sent",
            phase=phase,
        )
    return True


def _quoted(digest: str | None) -> str | None:
    return None if digest is None else f'"{digest}"'


def _exists_instead(staged: StagedUpload, error: StorageUploadError) -> StorageUploadError:
    """For an unconfirmed PUT (see :attr:`StagedUpload.unconfirmed`), a 409 from
    ``complete`` means the object at the key is not this upload's."""
    if staged.unconfirmed and error.status_code == 409:
        return ObjectExistsError.refused(staged.key, _REFUSED_PUT)
    return error


def _keywords_taken(function: Callable[..., object]) -> frozenset[str] | None:
    """The keyword-only parameters ``function`` takes; None when it takes ``**kwargs``."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )


def _refused_as_existing(key: str, error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is storage refusing ``key`` because
    another object is there: that object must survive the cleanup."""
    while error is not None:
        if isinstance(error, ObjectExistsError) and error.key == key:
            return True
        error = error.__cause__
    return False


def _set_object(staged: StagedUpload) -> SetObject:
    return SetObject(
        key=staged.key,
        size_bytes=staged.size_bytes,
        content_type=staged.content_type,
        etag=staged.etag,
        public_url=staged.public_url if staged.upload_id is None else None,
        upload_id=staged.upload_id,
        parts=staged.parts,
        checksum=staged.checksum,
        if_none_match=not staged.overwrite and staged.upload_id is not None,
    )


#: How a PUT refused with 412 is named in an ObjectExistsError.
_REFUSED_PUT: Final = "Upload to presigned URL refused by storage (412)"

#: The signer methods that take issue 11's keyword options (checksums, the condition).
_OPTIONED_METHODS: Final = (
    "presign_put",
    "complete",
    "initiate",
    "presign_parts",
    "complete_multipart",
)

#: How the engine names the signer calls it refuses the answer of.
_PHASE_LABELS: Final = {
    "presign": "Presign request failed",
    "initiate": "Multipart initiate failed",
    "presign-parts": "Part presign request failed",
}
