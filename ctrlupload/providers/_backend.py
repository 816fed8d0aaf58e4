"""The ``backend_presigned`` provider: the upload engine over a backend that signs.

:class:`BackendSigner` speaks the backend's internal API (seed §3 and the multipart
extension, ``docs/contract.md``): it sends each call through the transport, reads the
answer with :mod:`ctrlupload.protocol` and maps failures to :class:`BackendError`.
:class:`BackendPresignedStorageProvider` is the engine with that signer.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Final, TypeVar
from urllib.parse import quote

from .. import _checksum
from .._errors import (
    BackendError,
    IntegrityError,
    ObjectExistsError,
    StorageConfigError,
    StorageUploadError,
    TransportFailure,
)
from .._keys import validate_key
from .._redact import register_secret
from .._settings import Settings
from .._transport import HttpResult, RetryPolicy, Transport, TransportConfig
from .._version import __version__
from ..engine._engine import UploadEngine
from ..engine._multipart import abort_noting
from ..engine._signer import CompletedUpload, MultipartUpload, SetObject, SignedPut
from ..protocol import (
    CompletedPart,
    CompleteRequest,
    CompleteResponse,
    CompleteSetObject,
    CompleteSetRequest,
    CompleteSetResponse,
    DeleteRequest,
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
    decode_backend_answer,
    endpoint_missing,
    json_string_field,
)
from ..protocol._objects import PartsPage, StoredPart, all_parts
from ._base import EngineProvider

__all__ = ["BackendPresignedStorageProvider", "BackendSigner", "transport_for"]

logger = logging.getLogger("ctrlupload")

_ResponseT = TypeVar("_ResponseT", bound=ResponseModel)

#: How each call is named in error messages (the seed's texts for the first three).
_LABELS: Final = {
    "presign": "Presign request failed",
    "complete": "Complete notification failed",
    "delete": "Delete request failed",
    "complete-set": "Set complete failed",
    "initiate": "Multipart initiate failed",
    "presign-parts": "Part presign request failed",
    "list-parts": "List parts failed",
    "complete-multipart": "Multipart complete failed",
    "abort": "Multipart abort failed",
}
#: What a backend without the multipart extension answers to initiate.
_NO_MULTIPART_STATUSES: Final = frozenset({404, 405, 501})
#: What list-parts answers for an upload the backend no longer has.
_GONE_STATUSES: Final = frozenset({404, 410})
#: The header that makes a retried initiate answer the upload the first one started.
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"


def transport_for(settings: Settings) -> Transport:
    """The transport a provider built from ``settings`` sends through."""
    return Transport(
        TransportConfig(
            connect_timeout_s=settings.storage_connect_timeout_s,
            read_timeout_s=settings.storage_read_timeout_s,
            min_send_rate_bytes_s=settings.storage_min_send_rate_bytes_s,
            retry=RetryPolicy(
                attempts=settings.storage_retry_attempts,
                backoff_s=settings.storage_retry_backoff_s,
                backoff_max_s=settings.storage_retry_backoff_max_s,
            ),
            send_block_bytes=settings.storage_send_block_bytes,
            max_connections=settings.storage_max_connections,
        ),
        user_agent=f"ctrlupload/{__version__}",
    )


class BackendSigner:
    """A :class:`~ctrlupload.engine.Signer` that asks the backend over HTTP.

    The service token goes to ``base_url`` only, as a bearer token; presigned headers
    that carry it are refused, so it never reaches storage.

    Args:
        settings: The backend's paths.
        transport: Sends the calls (and retries their transport faults).
        base_url: The backend, e.g. ``http://backend:8080``.
        token: The service token.
    """

    def __init__(self, settings: Settings, transport: Transport, base_url: str, token: str) -> None:
        self._settings = settings
        self._transport = transport
        self._base_url = base_url
        self._token = token
        register_secret(token)  # redacted wherever it might surface in text

    def __repr__(self) -> str:
        return f"BackendSigner(backend={self._base_url!r})"

    def close(self) -> None:
        """Nothing of its own: the transport belongs to the provider."""

    # -- whole objects -------------------------------------------------------------------

    def presign_put(
        self,
        key: str,
        content_type: str,
        size_bytes: int,
        *,
        checksum: str | None = None,
        if_none_match: bool = False,
    ) -> SignedPut:
        request = PresignRequest(
            object_key=key,
            content_type=content_type,
            content_length=size_bytes,
            checksum_algorithm=None if checksum is None else _checksum.ALGORITHM,
            checksum=checksum,
            if_none_match="*" if if_none_match else None,
        )
        answer = self._call(
            key,
            "presign",
            self._settings.backend_storage_presign_path,
            request.model_dump(exclude_none=True),
            PresignResponse,
        )
        self._refuse_token_in(key, answer.headers, "presign")
        return SignedPut(
            answer.upload_url,
            answer.headers,
            _expires_at(answer.expires_sec),
            answer.public_url,
        )

    def complete(
        self,
        key: str,
        etag: str | None,
        size_bytes: int,
        content_type: str,
        public_url: str,
        *,
        checksum: str | None = None,
        confirm: bool = False,
    ) -> str | None:
        """``complete``; the backend checks the stored object's size and ETag (or
        checksum) itself, so ``confirm`` needs nothing more."""
        request = CompleteRequest(
            object_key=key,
            etag=etag,
            size_bytes=size_bytes,
            content_type=content_type,
            public_url=public_url,
            checksum_algorithm=None if checksum is None else _checksum.ALGORITHM,
            checksum=checksum,
        )
        answer = self._call(
            key,
            "complete",
            self._settings.backend_storage_complete_path,
            request.model_dump(exclude_none=True),
            CompleteResponse,
        )
        return answer.etag

    def complete_set(self, objects: Sequence[SetObject]) -> list[CompletedUpload] | None:
        """Record a render's objects in one ``complete-set`` call, all or none.

        Returns None when the backend lacks the call (405, 501, or a 404 that is not
        the call's own ``no_such_upload``), as the seed's backends do.
        """
        key = objects[0].key if objects else ""
        request = CompleteSetRequest(
            objects=[
                CompleteSetObject(
                    object_key=item.key,
                    size_bytes=item.size_bytes,
                    content_type=item.content_type,
                    etag=item.etag,
                    public_url=item.public_url,
                    upload_id=item.upload_id,
                    parts=(
                        None
                        if item.upload_id is None
                        else [CompletedPart(part_number=n, etag=e) for n, e in item.parts]
                    ),
                    checksum_algorithm=None if item.checksum is None else _checksum.ALGORITHM,
                    checksum_type=(
                        "FULL_OBJECT"
                        if item.checksum is not None and item.upload_id is not None
                        else None
                    ),
                    checksum=item.checksum,
                    if_none_match="*" if item.if_none_match and item.upload_id else None,
                )
                for item in objects
            ]
        )
        result = self._post(
            key,
            "complete-set",
            self._settings.backend_storage_complete_set_path,
            request.model_dump(exclude_none=True),
        )
        if endpoint_missing(result.status_code, result.body):
            return None
        self._raise_refusal(key, "complete-set", result)
        answer = decode_backend_answer(
            key,
            "complete-set",
            _LABELS["complete-set"],
            result.status_code,
            result.body,
            result.attempts,
            CompleteSetResponse,
        )
        recorded = [(item.object_key, item) for item in answer.objects]
        if [name for name, _ in recorded] != [item.key for item in objects]:
            raise BackendError(
                key,
                f"{_LABELS['complete-set']}: the answer does not list the objects sent, in order",
                phase="complete-set",
            )
        return [CompletedUpload(item.public_url, item.etag, item.checksum) for _, item in recorded]

    def delete(self, key: str) -> None:
        self._call(
            key,
            "delete",
            self._settings.backend_storage_delete_path,
            DeleteRequest(object_key=key).model_dump(),
            StatusResponse,
        )

    # -- multipart -----------------------------------------------------------------------

    def initiate(
        self,
        key: str,
        content_type: str,
        size_bytes: int,
        part_size: int,
        *,
        checksum: bool = False,
        if_none_match: bool = False,
    ) -> MultipartUpload | None:
        """Start a multipart upload; None if the backend lacks the extension.

        Every attempt of the call carries the same ``Idempotency-Key``, so a backend
        that honours it answers a retry (after a lost answer) with the upload the first
        attempt started, and no second upload is left behind. The answer's echo of the
        checksum and the condition says which of them the backend took on.
        """
        request = MultipartInitiateRequest(
            object_key=key,
            content_type=content_type,
            content_length=size_bytes,
            part_size=part_size,
            checksum_algorithm=_checksum.ALGORITHM if checksum else None,
            checksum_type="FULL_OBJECT" if checksum else None,
            if_none_match="*" if if_none_match else None,
        )
        label = _LABELS["initiate"]
        result = self._post(
            key,
            "initiate",
            self._settings.backend_storage_multipart_initiate_path,
            request.model_dump(exclude_none=True),
            headers={IDEMPOTENCY_HEADER: uuid.uuid4().hex},
        )
        if result.status_code in _NO_MULTIPART_STATUSES:
            return None
        try:
            answer = decode_backend_answer(
                key,
                "initiate",
                label,
                result.status_code,
                result.body,
                result.attempts,
                MultipartInitiateResponse,
            )
        except BackendError as error:
            # An answer that broke the contract may still name the upload it started.
            upload_id = json_string_field(result.body, "upload_id")
            if upload_id is not None:
                abort_noting(self, key, upload_id, error)
            raise
        return MultipartUpload(
            answer.upload_id,
            answer.part_size,
            checksum=checksum
            and answer.checksum_algorithm == _checksum.ALGORITHM
            and answer.checksum_type == "FULL_OBJECT",
            if_none_match=if_none_match and answer.if_none_match == "*",
        )

    def presign_parts(
        self,
        key: str,
        upload_id: str,
        part_numbers: Sequence[int],
        *,
        checksums: Sequence[str] | None = None,
    ) -> Mapping[int, SignedPut]:
        request = MultipartPresignRequest(
            object_key=key,
            upload_id=upload_id,
            part_numbers=list(part_numbers),
            checksums=None if checksums is None else list(checksums),
        )
        answer = self._call(
            key,
            "presign-parts",
            self._settings.backend_storage_multipart_presign_path,
            request.model_dump(exclude_none=True),
            MultipartPresignResponse,
        )
        expires_at = _expires_at(answer.expires_sec)
        signed = {
            part.part_number: SignedPut(part.upload_url, part.headers, expires_at)
            for part in answer.parts
        }
        missing = sorted(set(part_numbers) - set(signed))
        if missing:
            raise BackendError(
                key,
                f"{_LABELS['presign-parts']}: no URL for part(s) {missing[:5]}",
                phase="presign-parts",
            )
        for part in signed.values():
            self._refuse_token_in(key, part.headers, "presign-parts")
        return signed

    def list_parts(self, key: str, upload_id: str) -> list[StoredPart] | None:
        def page(marker: int | None) -> PartsPage | None:
            request = MultipartListRequest(
                object_key=key, upload_id=upload_id, part_number_marker=marker
            )
            try:
                answer = self._call(
                    key,
                    "list-parts",
                    self._settings.backend_storage_multipart_list_path,
                    request.model_dump(),
                    MultipartListResponse,
                )
            except BackendError as error:
                if error.status_code in _GONE_STATUSES:
                    return None
                raise
            return PartsPage(
                tuple(
                    StoredPart(p.part_number, p.etag, p.size_bytes, p.checksum)
                    for p in answer.parts
                ),
                answer.is_truncated,
                answer.next_part_number_marker,
            )

        try:
            return all_parts(page)
        except ValueError as exc:
            raise BackendError(key, f"{_LABELS['list-parts']}: {exc}", phase="list-parts") from None

    def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[tuple[int, str]],
        size_bytes: int,
        content_type: str,
        *,
        checksum: str | None = None,
        if_none_match: bool = False,
    ) -> CompletedUpload:
        request = MultipartCompleteRequest(
            object_key=key,
            upload_id=upload_id,
            parts=[CompletedPart(part_number=number, etag=etag) for number, etag in parts],
            size_bytes=size_bytes,
            content_type=content_type,
            checksum_algorithm=None if checksum is None else _checksum.ALGORITHM,
            checksum_type=None if checksum is None else "FULL_OBJECT",
            checksum=checksum,
            if_none_match="*" if if_none_match else None,
        )
        answer = self._call(
            key,
            "complete-multipart",
            self._settings.backend_storage_multipart_complete_path,
            request.model_dump(exclude_none=True),
            MultipartCompleteResponse,
        )
        return CompletedUpload(answer.public_url, answer.etag, answer.checksum)

    def abort(self, key: str, upload_id: str) -> None:
        self._call(
            key,
            "abort",
            self._settings.backend_storage_multipart_abort_path,
            MultipartAbortRequest(object_key=key, upload_id=upload_id).model_dump(),
            StatusResponse,
        )

    # -- sending and reading -------------------------------------------------------------

    def _post(
        self,
        key: str,
        phase: str,
        path: str,
        payload: dict[str, object],
        headers: Mapping[str, str] | None = None,
    ) -> HttpResult:
        try:
            result = self._transport.post_json(
                self._base_url + path, payload, token=self._token, headers=headers
            )
        except TransportFailure as failure:
            raise BackendError(
                key, f"{_LABELS[phase]}: {failure.args[0]}", phase=phase
            ) from failure
        return result

    def _call(
        self,
        key: str,
        phase: str,
        path: str,
        payload: dict[str, object],
        model: type[_ResponseT],
    ) -> _ResponseT:
        answer = self._post(key, phase, path, payload)
        self._raise_refusal(key, phase, answer)
        return decode_backend_answer(
            key, phase, _LABELS[phase], answer.status_code, answer.body, answer.attempts, model
        )

    def _raise_refusal(self, key: str, phase: str, result: HttpResult) -> None:
        """The contract's two refusals that are no backend failure: 412 ``object_exists``
        (a conditional write found an object at the key) and 400 ``bad_digest`` (the
        parts do not add up to the whole object's checksum). Nothing was written."""
        error_code = json_string_field(result.body, "error")
        error: StorageUploadError
        if result.status_code == 412 and error_code == "object_exists":
            error = ObjectExistsError.refused(key, _LABELS[phase], phase=phase)
        elif result.status_code == 400 and error_code == "bad_digest":
            error = IntegrityError(
                key,
                f"{_LABELS[phase]}: storage found that the bytes do not match their CRC64NVME "
                "checksum, and stored nothing",
                phase=phase,
                status_code=400,
            )
        else:
            return
        raise error

    def _refuse_token_in(self, key: str, headers: Mapping[str, str], phase: str) -> None:
        for name, value in headers.items():
            if self._token in value or self._token in name:
                raise BackendError(
                    key,
                    f"{_LABELS[phase]}: the returned headers carry the service token, which "
                    "is never sent to storage",
                    phase=phase,
                )


def _expires_at(expires_sec: int | None) -> float | None:
    """The backend's ``expires_sec``, counted from now (when it answered)."""
    return None if expires_sec is None else time.time() + expires_sec


class BackendPresignedStorageProvider(EngineProvider):
    """Uploads through presigned URLs that the backend issues (seed Phase 35).

    For each upload: check the size, ask the backend to presign (bearer token), PUT the
    body to the presigned URL with exactly the returned headers, check the ETag, then
    tell the backend it is complete. Large files go up in parts when the backend offers
    the multipart extension. The token goes only to ``BACKEND_BASE_URL``.

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
        self._transport = transport_for(s)
        self.signer = BackendSigner(
            s, self._transport, s.backend_base_url, s.backend_service_token.get_secret_value()
        )
        self.engine = UploadEngine(self.signer, self._transport, s)

    def __repr__(self) -> str:
        return f"BackendPresignedStorageProvider(backend={self._base_url!r})"

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
