"""The ``s3`` and ``minio`` providers: the upload engine with a signer that holds credentials.

:class:`S3Signer` is a :class:`~ctrlupload.engine.Signer` that presigns in-process with
boto3 (SigV4) and keeps the books with S3's own multipart calls, through
:class:`ctrlupload._s3.S3Bucket`, the S3 code the reference backend's ``s3`` store uses
too. The bytes go through the same engine and transport as ``backend_presigned``:
retries, deadlines, progress, the MD5 check, multipart and resume are the same code.

Retries have one owner per request: the transport retries the presigned PUTs; botocore
(``standard`` mode, ``STORAGE_RETRY_ATTEMPTS`` attempts) retries the calls it sends
itself, which nothing else retries. Credentials come from boto3's chain and are never
read, logged or shown here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Final

from .._errors import (
    IntegrityError,
    ObjectExistsError,
    S3AccessDeniedError,
    S3BucketNotFoundError,
    S3CredentialsError,
    S3EndpointUnreachableError,
    S3Error,
    S3WrongRegionError,
    StorageConfigError,
    StorageTransferError,
    StorageUploadError,
    TransportFailure,
)
from .._keys import validate_key
from .._s3 import FailureKind, ObjectStoreError, S3Bucket, failure_kind, region_in
from .._settings import Settings, StorageProvider
from .._transport import HttpResult
from ..engine._engine import UploadEngine
from ..engine._signer import CompletedUpload, MultipartUpload, SetObject, SignedPut
from ..protocol import bare_etag, s3_error_fields, s3_error_region
from ..protocol._objects import (
    BadDigest,
    InvalidPart,
    NoSuchUpload,
    ObjectExists,
    ObjectInfo,
    PartsPage,
    StoredPart,
    all_parts,
)
from ._backend import transport_for
from ._base import EngineProvider

__all__ = ["S3Signer", "S3StorageProvider"]

#: How long presigned URLs live. The engine signs afresh when one expires mid-upload.
URL_EXPIRY_S: Final = 3600
#: MinIO's region unless configured otherwise (and what it expects by default).
MINIO_DEFAULT_REGION: Final = "us-east-1"

_ERROR_CLASSES: Final[Mapping[FailureKind, type[S3Error]]] = {
    "credentials": S3CredentialsError,
    "no-bucket": S3BucketNotFoundError,
    "access-denied": S3AccessDeniedError,
    "unreachable": S3EndpointUnreachableError,
    "wrong-region": S3WrongRegionError,
}
_LABELS: Final = {
    "presign": "Presign failed",
    "delete": "Delete failed",
    "initiate": "Multipart initiate failed",
    "presign-parts": "Part presign failed",
    "list-parts": "List parts failed",
    "complete": "Complete check failed",
    "complete-multipart": "Multipart complete failed",
    "abort": "Multipart abort failed",
}


class S3Signer:
    """A :class:`~ctrlupload.engine.Signer` that signs with S3 credentials in-process.

    Args:
        bucket: The bucket, with its boto3 client.
        endpoint: What to call the endpoint in messages (its scheme and host).
    """

    def __init__(self, bucket: S3Bucket, endpoint: str) -> None:
        self._bucket = bucket
        self._endpoint = endpoint

    def __repr__(self) -> str:
        return f"S3Signer(bucket={self._bucket.bucket!r}, endpoint={self._endpoint!r})"

    def close(self) -> None:
        """Close the boto3 client's connection pool."""
        self._bucket.close()

    def public_url(self, key: str) -> str:
        """Where the object is served: ``STORAGE_PUBLIC_BASE_URL`` or its S3 URL."""
        return self._bucket.public_url(key)

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
        """Presign the PUT, with the checksum and the condition signed as headers."""
        expires_at = time.time() + URL_EXPIRY_S
        try:
            signed = self._bucket.presign_put(
                key,
                content_type,
                size_bytes,
                URL_EXPIRY_S,
                checksum=checksum,
                if_none_match=if_none_match,
            )
        except ObjectStoreError as error:
            raise self.error(key, "presign", error) from None
        except ValueError as exc:
            raise S3Error(key, f"{_LABELS['presign']}: {exc}", phase="presign") from None
        return SignedPut(signed.upload_url, signed.headers, expires_at, self.public_url(key))

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
        """Nothing to record: S3's answer to the PUT (checked by the engine) is the record.

        With ``confirm`` (the PUT's answer was lost), HEAD must show this object: its
        size, and its checksum (else its ETag). Otherwise the object at the key is
        someone else's: :class:`S3Error` with ``status_code`` 409.
        """
        if not confirm:
            return etag
        try:
            stored = self._bucket.head(key)
        except ObjectStoreError as error:
            raise self.error(key, "complete", error) from None
        if stored is None or not _is_this_object(stored, size_bytes, etag, checksum):
            raise S3Error(
                key,
                f"{_LABELS['complete']}: the object at '{key}' is not the one this upload sent",
                phase="complete",
                status_code=409,
            )
        return stored.etag

    def complete_set(self, objects: Sequence[SetObject]) -> list[CompletedUpload]:
        """Assemble the multipart uploads in order; S3 itself has nothing else to record.

        Not atomic: S3 has no transaction. A failure leaves the earlier objects
        assembled, which ``upload_render`` deletes again.
        """
        done: list[CompletedUpload] = []
        for item in objects:
            if item.upload_id is None:
                assert item.public_url is not None
                etag = item.etag
                if etag is None:  # an unconfirmed PUT: find it by its size and checksum
                    etag = self.complete(
                        item.key,
                        None,
                        item.size_bytes,
                        item.content_type,
                        item.public_url,
                        checksum=item.checksum,
                        confirm=True,
                    )
                done.append(CompletedUpload(item.public_url, etag or "", item.checksum))
            else:
                done.append(
                    self.complete_multipart(
                        item.key,
                        item.upload_id,
                        item.parts,
                        item.size_bytes,
                        item.content_type,
                        checksum=item.checksum,
                        if_none_match=item.if_none_match,
                    )
                )
        return done

    def delete(self, key: str) -> None:
        try:
            self._bucket.delete(key)
        except ObjectStoreError as error:
            raise self.error(key, "delete", error) from None

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
    ) -> MultipartUpload:
        """CreateMultipartUpload; S3 takes any part size the engine prefers.

        With ``checksum`` the upload is declared CRC64NVME, ``FULL_OBJECT``. S3 takes
        ``If-None-Match`` at CompleteMultipartUpload, so the condition is always on offer.
        botocore retries the call; an attempt whose answer was lost leaves an upload
        that is never completed (a bucket lifecycle rule for incomplete multipart
        uploads removes it).
        """
        try:
            upload_id = self._bucket.create_multipart(key, content_type, checksum=checksum)
        except ObjectStoreError as error:
            raise self.error(key, "initiate", error) from None
        return MultipartUpload(upload_id, part_size, checksum=checksum, if_none_match=True)

    def presign_parts(
        self,
        key: str,
        upload_id: str,
        part_numbers: Sequence[int],
        *,
        checksums: Sequence[str] | None = None,
    ) -> Mapping[int, SignedPut]:
        """Part URLs, with their lengths unsigned: this signer is the uploader itself.
        Each part's checksum, when given, is signed as a header."""
        expires_at = time.time() + URL_EXPIRY_S
        signed: dict[int, SignedPut] = {}
        for index, number in enumerate(part_numbers):
            try:
                part = self._bucket.presign_part(
                    key,
                    upload_id,
                    number,
                    None,
                    URL_EXPIRY_S,
                    checksum=None if checksums is None else checksums[index],
                )
            except ObjectStoreError as error:
                raise self.error(key, "presign-parts", error) from None
            except ValueError as exc:
                raise S3Error(
                    key, f"{_LABELS['presign-parts']}: {exc}", phase="presign-parts"
                ) from None
            signed[number] = SignedPut(part.upload_url, part.headers, expires_at)
        return signed

    def list_parts(self, key: str, upload_id: str) -> list[StoredPart] | None:
        def page(marker: int | None) -> PartsPage | None:
            try:
                return self._bucket.list_parts(key, upload_id, part_number_marker=marker or 0)
            except NoSuchUpload:  # or NoSuchKey, on some S3-compatible stores
                return None
            except ObjectStoreError as error:
                raise self.error(key, "list-parts", error) from None

        try:
            return all_parts(page)
        except ValueError as exc:
            raise S3Error(key, f"{_LABELS['list-parts']}: S3's {exc}", phase="list-parts") from None

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
        """CompleteMultipartUpload, checked by HEAD (see :meth:`S3Bucket.complete_multipart`).

        If S3 no longer knows the upload, or refuses a conditional complete because the
        object exists, a retry of this call may have followed an attempt that did
        complete it: a HEAD showing exactly these parts assembled (and this checksum)
        counts as done.
        """
        stored = [StoredPart(number, etag, 0) for number, etag in parts]
        phase = "complete-multipart"
        try:
            info = self._bucket.complete_multipart(
                key,
                upload_id,
                stored,
                expected_size=size_bytes,
                checksum=checksum,
                if_none_match=if_none_match,
            )
        except (NoSuchUpload, ObjectExists) as refusal:
            try:
                confirmed = self._bucket.confirm_assembled(
                    key, stored, expected_size=size_bytes, checksum=checksum
                )
            except ObjectStoreError as error:
                raise self.error(key, phase, error) from None
            if confirmed is None and isinstance(refusal, ObjectExists):
                raise ObjectExistsError.refused(key, _LABELS[phase], phase=phase) from None
            if confirmed is None:
                raise S3Error(
                    key,
                    f"{_LABELS[phase]}: S3 has no upload {upload_id} any more, and the object "
                    "is not these parts assembled",
                    phase=phase,
                    status_code=404,
                    error_code="NoSuchUpload",
                ) from None
            info = confirmed
        except InvalidPart as exc:
            raise S3Error(key, f"{_LABELS[phase]}: {exc}", phase=phase, status_code=400) from None
        except BadDigest as exc:
            raise IntegrityError(
                key,
                f"{_LABELS[phase]}: S3 found that the parts do not add up to the whole "
                f"object's CRC64NVME, and assembled nothing ({exc})",
                phase=phase,
                status_code=400,
            ) from None
        except ObjectStoreError as error:
            raise self.error(key, phase, error) from None
        return CompletedUpload(self.public_url(key), info.etag, info.checksum or checksum)

    def abort(self, key: str, upload_id: str) -> None:
        try:
            self._bucket.abort_multipart(key, upload_id)
        except ObjectStoreError as error:
            raise self.error(key, "abort", error) from None

    # -- errors --------------------------------------------------------------------------

    def error(self, key: str, phase: str, error: ObjectStoreError) -> S3Error:
        """The :class:`S3Error` subclass for a failed boto3 call, with what to check."""
        text = f"{_LABELS[phase]}: {str(error).rstrip('.')}"
        return self._typed(
            key, phase, text, error.kind, error.status_code, error.error_code, error.bucket_region
        )

    def explain_put_failure(
        self, error: StorageTransferError, answer: HttpResult | None
    ) -> StorageUploadError | None:
        """A typed error for a presigned PUT that S3 refused, or that found no endpoint.

        None (keep the :class:`StorageTransferError`) for every other failure.
        """
        if answer is None:
            cause = error.__cause__
            root = cause.root_type if isinstance(cause, TransportFailure) else None
            kind = failure_kind(status=None, code=None, exception_name=root)
            if kind is None:
                return None  # a reset, a timeout: the transport's error says it
            return self._typed(error.key, error.phase, error.reason, kind, None, None, None)
        code, message = s3_error_fields(answer.body)
        region = region_in(
            answer.headers.get("x-amz-bucket-region"), s3_error_region(answer.body), message
        )
        kind = failure_kind(
            status=answer.status_code, code=code or None, message=message, region=region
        )
        if kind is None:
            return None  # a 5xx, a mismatched ETag...: StorageTransferError says it
        return self._typed(
            error.key, error.phase, error.reason, kind, answer.status_code, code or None, region
        )

    def _typed(
        self,
        key: str,
        phase: str,
        text: str,
        kind: FailureKind | None,
        status: int | None,
        code: str | None,
        region: str | None,
    ) -> S3Error:
        if kind is None:
            return S3Error(key, text, phase=phase, status_code=status, error_code=code)
        cls = _ERROR_CLASSES[kind]
        return cls(
            key,
            f"{text.rstrip('.')}. {self._hint(kind, region)}",
            phase=phase,
            status_code=status,
            error_code=code,
            bucket_region=region,
        )

    def _hint(self, kind: FailureKind, region: str | None) -> str:
        bucket = self._bucket.bucket
        if kind == "credentials":
            return (
                "Check the AWS credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE"
            )
        if kind == "no-bucket":
            return f"Bucket '{bucket}' does not exist: check STORAGE_S3_BUCKET"
        if kind == "access-denied":
            return (
                f"The credentials may not do this in bucket '{bucket}': check their IAM "
                "policy and the bucket policy"
            )
        if kind == "unreachable":
            return (
                f"No connection to {self._endpoint}: check STORAGE_S3_ENDPOINT_URL and the network"
            )
        ours = self._bucket.region or "the default region"
        if region is not None and region != ours:
            return (
                f"Bucket '{bucket}' is in {region}, but requests are signed for {ours}: set "
                f"STORAGE_S3_REGION={region}"
            )
        return f"Bucket '{bucket}' is in another region than {ours}: set STORAGE_S3_REGION"


def _is_this_object(
    stored: ObjectInfo, size_bytes: int, etag: str | None, checksum: str | None
) -> bool:
    """Whether HEAD's answer is the object sent: its size, and its checksum when one
    was sent (else its ETag)."""
    if stored.size_bytes != size_bytes:
        return False
    if checksum is not None:
        return stored.checksum == checksum
    return etag is not None and bare_etag(stored.etag) == bare_etag(etag)


def bucket_for(settings: Settings, *, max_attempts: int) -> S3Bucket:
    """The bucket ``STORAGE_PROVIDER=s3|minio`` names, with botocore's client for it.

    Used by the provider and by ``ctrlupload doctor``'s HeadBucket; ``max_attempts``
    is botocore's own retry budget for the calls it makes.

    Raises:
        StorageConfigError: ``STORAGE_S3_BUCKET`` (or, for minio,
            ``STORAGE_S3_ENDPOINT_URL``) is not set, or boto3 is not installed.
    """
    s = settings
    provider = s.storage_provider
    name = provider.value if provider in (StorageProvider.S3, StorageProvider.MINIO) else "s3"
    if not s.storage_s3_bucket:
        raise StorageConfigError(
            f"STORAGE_S3_BUCKET must be set for STORAGE_PROVIDER={name}",
            variable="STORAGE_S3_BUCKET",
        )
    region = s.storage_s3_region
    if provider is StorageProvider.MINIO:
        if not s.storage_s3_endpoint_url:
            raise StorageConfigError(
                "STORAGE_S3_ENDPOINT_URL must be set for STORAGE_PROVIDER=minio "
                "(e.g. http://127.0.0.1:9000)",
                variable="STORAGE_S3_ENDPOINT_URL",
            )
        region = region or MINIO_DEFAULT_REGION
    return S3Bucket(
        s.storage_s3_bucket,
        endpoint_url=s.storage_s3_endpoint_url,
        region=region,
        public_base_url=s.storage_public_base_url,
        max_attempts=max_attempts,
        connect_timeout_s=s.storage_connect_timeout_s,
        read_timeout_s=s.storage_read_timeout_s,
        max_pool_connections=s.storage_max_connections,
        who=f"STORAGE_PROVIDER={name}",
    )


class S3StorageProvider(EngineProvider):
    """Uploads straight to an S3 bucket with credentials this process holds.

    ``STORAGE_PROVIDER=s3`` is AWS (or any endpoint ``STORAGE_S3_ENDPOINT_URL`` names);
    ``minio`` is the same with a required endpoint and path-style addressing. Needs the
    ``ctrlupload[s3]`` extra (boto3). The upload path is the engine's, as for
    ``backend_presigned``; only the signer differs.

    Args:
        settings: Needs ``STORAGE_S3_BUCKET``; ``STORAGE_S3_REGION``,
            ``STORAGE_S3_ENDPOINT_URL`` and ``STORAGE_PUBLIC_BASE_URL`` are optional
            (the endpoint is required for minio).

    Raises:
        StorageConfigError: A required setting is missing, or boto3 is not installed.
    """

    signer: S3Signer

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings or Settings.from_env())
        s = self.settings
        bucket = bucket_for(s, max_attempts=s.storage_retry_attempts)
        endpoint = bucket.endpoint_url
        self._transport = transport_for(s)
        self.signer = S3Signer(bucket, endpoint)
        self.engine = UploadEngine(
            self.signer,
            self._transport,
            s,
            explain_put_failure=self.signer.explain_put_failure,
        )
        self._description = (
            f"bucket={bucket.bucket!r}, endpoint={endpoint!r}, region={bucket.region!r}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._description})"

    def get_url(self, key: str) -> str:
        """``STORAGE_PUBLIC_BASE_URL/key`` when set, else the object's S3 URL (no call).

        Raises:
            InvalidKeyError: The key breaks a key rule.
        """
        validate_key(key)
        return self.signer.public_url(key)
