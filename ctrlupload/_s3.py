"""S3 itself: presigning and bookkeeping calls with boto3, and what their failures mean.

One module for both sides that hold S3 credentials: the reference backend's ``s3``
store (:mod:`ctrlupload.server._s3store`) and the client's ``s3``/``minio`` providers
(:mod:`ctrlupload.providers._s3`). Every S3-compatible quirk below is handled here once.

Needs the ``ctrlupload[s3]`` extra (boto3), imported only when a bucket is built.
Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws``, instance roles); this module
never reads or stores them itself.

What the presigned URL binds. SigV4 query signing covers the method, bucket, key,
expiry and every header listed in ``X-Amz-SignedHeaders``. We sign ``Content-Type`` and
``Content-Length``: botocore serialises ``ContentLength`` into a ``Content-Length``
header and does not leave it out of the signed headers (its ``SIGNED_HEADERS_BLACKLIST``
holds only hop-by-hop headers), and S3 recomputes the signature from the headers the
request actually carries, so a PUT of any other type or length gets
``403 SignatureDoesNotMatch``. MinIO checks ``Content-Length`` the same way. Both headers
go back to the caller in :attr:`PresignedPut.headers`: they are the signed headers the
PUT must carry (``host`` is signed too and is sent by every HTTP client anyway).

Thread safety: a boto3 client is thread-safe and a bucket never changes after
construction, so one serves every thread. Its connection pool holds
:data:`DEFAULT_MAX_POOL_CONNECTIONS` connections.

Multipart uploads use S3's own calls: CreateMultipartUpload (with the ContentType),
presigned UploadPart URLs bound to each part's exact ``Content-Length``, ListParts,
CompleteMultipartUpload and AbortMultipartUpload.

CompleteMultipartUpload can answer ``200 OK`` with an ``<Error>`` document in the body
(S3 sends the status before it has finished assembling). botocore handles that for
every S3 operation whose output is not a streaming blob: its ``_handle_200_error``
handler (``before-parse.s3.*`` in ``botocore/handlers.py``) turns such a 200, or a 200
whose body is not even well-formed XML, into a 500 before parsing, so the call raises
``ClientError`` like any other error (retried only as our retry config allows, i.e.
not). We do not rely on it alone: a completion counts only when a HEAD of the object
afterwards shows the expected size. Some S3-compatible stores answer a good completion
with an empty ``<ETag></ETag>``; then HEAD must also show the multipart ETag computed
from the parts' ETags (:func:`~ctrlupload.protocol._parts.multipart_etag`), since the
size alone cannot tell the assembled object from an older one at the same key.
Anything else is an :class:`ObjectStoreError` (the reference backend answers it with
503; the upload is still pending in S3 then, so a retry of ``complete`` can succeed).
A retried completion whose first attempt did assemble the object finds no upload;
:meth:`S3Bucket.confirm_assembled` tells that apart from a lost upload.

A finished or aborted upload is ``NoSuchUpload`` on S3, but ``NoSuchKey`` on some
S3-compatible stores; both mean :class:`~ctrlupload.protocol._objects.NoSuchUpload`
here, which lets a caller recover a completion it did not get to record.

botocore's own checksums: botocore 1.36 and later add CRC32 checksum headers to every
request that can carry one (``when_supported``), which several S3-compatible stores
refuse. The client built here asks for them only where an operation requires one
(``when_required``), unless the operator chose otherwise with
``AWS_REQUEST_CHECKSUM_CALCULATION`` / ``AWS_RESPONSE_CHECKSUM_VALIDATION`` or the
profile's ``request_checksum_calculation`` / ``response_checksum_validation``. Either way
botocore computes no checksum for a presigned URL: the PUT is sent by the client, not
by botocore.

Our checksums (issue 11): the caller may give the CRC64NVME of the body it will send
(:mod:`ctrlupload._checksum`, S3's base64 of the eight big-endian bytes). It is passed
to ``generate_presigned_url`` as ``ChecksumCRC64NVME``, which botocore serialises into an
``x-amz-checksum-crc64nvme`` *header* and lists in ``X-Amz-SignedHeaders`` (its value is
never in the query string); S3 then computes the CRC of the body as it arrives and
answers ``400 BadDigest``, storing nothing, when it differs. ``IfNoneMatch="*"`` is
signed the same way (``if-none-match``): S3 answers ``412 PreconditionFailed`` and keeps
the object already at the key. A PUT that leaves out a signed header, or changes it,
gets ``403 SignatureDoesNotMatch``. Both go back in :attr:`PresignedPut.headers`,
spelled ``x-amz-checksum-crc64nvme`` and ``If-None-Match``. Multipart uploads declare
``ChecksumAlgorithm=CRC64NVME, ChecksumType=FULL_OBJECT`` at create, sign each part's
own CRC into its URL, and give the whole object's CRC (and ``IfNoneMatch``) to
CompleteMultipartUpload, where S3 checks that the parts add up to it. HEAD asks for the
stored checksum (``ChecksumMode=ENABLED``); only a full-object value counts (a
composite ``...-N`` one is the CRC of the parts' CRCs, not of the object). moto, which
the tests run against, checks none of these checksums (``docs/contract.md``, "What
moto checks"), so completion also compares HEAD's checksum with the expected one.

Signatures are always SigV4 (``signature_version="s3v4"``): left to itself, botocore
still presigns SigV2 in regions that accept it, such as us-east-1, and SigV2 signs no
``Content-Length``, which S3-compatible stores often do not accept at all.

Retries: one owner per request. Presigned PUTs are sent by ctrlupload's transport,
which retries them; botocore never sees them. For the calls botocore sends itself, the
caller says how many attempts (``max_attempts``): the reference backend passes 1
(:data:`DEFAULT_MAX_ATTEMPTS`), because it answers an :class:`ObjectStoreError` with 503
and the client's urllib3 ``Retry`` already retries the whole call; the client's
``s3``/``minio`` providers, where nothing else retries those calls, pass
``STORAGE_RETRY_ATTEMPTS`` (botocore's ``standard`` mode, with its backoff).

Failures are sorted once, in :func:`failure_kind`: bad or missing credentials, a missing
bucket, access denied, an unreachable endpoint, a wrong region. Both callers word their
errors from that kind.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final, Literal, Protocol
from urllib.parse import quote, urlsplit

from . import _checksum
from ._errors import StorageConfigError, StorageError
from ._redact import redact_text, redact_url
from .protocol._objects import (
    MAX_LIST_PARTS,
    BadDigest,
    InvalidPart,
    NoSuchUpload,
    ObjectExists,
    ObjectInfo,
    PartsPage,
    PresignedPut,
    StoredPart,
)
from .protocol._parts import MAX_PART_BYTES, MAX_PARTS, multipart_etag

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_POOL_CONNECTIONS",
    "DEFAULT_READ_TIMEOUT_S",
    "MAX_PRESIGN_EXPIRES_S",
    "MAX_PUT_BYTES",
    "FailureKind",
    "ObjectStoreError",
    "S3Bucket",
    "failure_kind",
    "region_in",
]

#: What a failed S3 call means, when it means one of these.
FailureKind = Literal["credentials", "no-bucket", "access-denied", "unreachable", "wrong-region"]

#: Attempts per S3 call, the first included (botocore ``standard`` retry mode).
DEFAULT_MAX_ATTEMPTS: Final = 1
DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0
DEFAULT_READ_TIMEOUT_S: Final = 30.0
#: Enough for the reference backend's request threads to HEAD and DELETE in parallel.
DEFAULT_MAX_POOL_CONNECTIONS: Final = 32
#: SigV4 presigned URLs live at most seven days.
MAX_PRESIGN_EXPIRES_S: Final = 7 * 24 * 3600
#: S3's limit for one PUT; larger objects need a multipart upload.
MAX_PUT_BYTES: Final = 5 * 1024**3

_INSTALL_HINT: Final = "pip install 'ctrlupload[s3]'"
#: S3's answers to a completion whose part list is wrong (the client's fault, not S3's).
_INVALID_PART_CODES: Final = frozenset({"InvalidPart", "InvalidPartOrder", "EntityTooSmall"})
#: S3's answer for an upload it no longer has, and what some S3-compatible stores say.
_NO_SUCH_UPLOAD_CODES: Final = frozenset({"NoSuchUpload", "NoSuchKey"})
#: botocore's checksum settings, set to ``when_required`` unless the operator set them.
_CHECKSUM_SETTINGS: Final = ("request_checksum_calculation", "response_checksum_validation")
_MD5_HEX: Final = re.compile(r"[0-9a-fA-F]{32}")
#: S3's answer to a conditional write that found an object at the key.
_PRECONDITION_CODES: Final = frozenset({"PreconditionFailed"})
#: An ``InvalidRequest`` whose message says a checksum did not match (not, say, one that
#: says a checksum is missing, or of the wrong type: that is our request's fault, not
#: the data's).
_CHECKSUM_MISMATCH: Final = re.compile(
    r"checksum.*\b(?:did|does) not match|\bchecksum mismatch\b", re.IGNORECASE
)


class ObjectStoreError(StorageError):
    """A call to the object store failed after botocore's retries.

    The message names the operation, bucket and key, and S3's error code and status when
    there was an answer. It never holds credentials or a presigned URL's query string.

    Attributes:
        operation: The S3 operation, e.g. ``"HeadObject"`` or ``"PresignPutObject"``.
        bucket: The bucket the call was for.
        key: The object key, or None for a bucket-level call.
        status_code: The HTTP status S3 answered with, or None when there was no answer.
        error_code: S3's error code (``"NoSuchBucket"``, ``"AccessDenied"``...), or None.
        kind: What the failure means (see :data:`FailureKind`), or None when it is none
            of those (a 5xx, a timeout, an answer that breaks S3's own rules).
        bucket_region: The region S3 says the bucket is in, when it said one.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        bucket: str,
        key: str | None = None,
        status_code: int | None = None,
        error_code: str | None = None,
        kind: FailureKind | None = None,
        bucket_region: str | None = None,
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.bucket = bucket
        self.key = key
        self.status_code = status_code
        self.error_code = error_code
        self.kind = kind
        self.bucket_region = bucket_region


class _S3Client(Protocol):
    """The part of a boto3 S3 client this store calls."""

    meta: Any

    def generate_presigned_url(
        self,
        ClientMethod: str,
        Params: dict[str, Any],
        ExpiresIn: int,
        HttpMethod: str,
    ) -> str: ...

    def head_object(self, **kwargs: Any) -> dict[str, Any]: ...

    def delete_object(self, *, Bucket: str, Key: str) -> dict[str, Any]: ...

    def head_bucket(self, *, Bucket: str) -> dict[str, Any]: ...

    def create_multipart_upload(self, **kwargs: Any) -> dict[str, Any]: ...

    def list_parts(self, **kwargs: Any) -> dict[str, Any]: ...

    def complete_multipart_upload(self, **kwargs: Any) -> dict[str, Any]: ...

    def abort_multipart_upload(self, *, Bucket: str, Key: str, UploadId: str) -> dict[str, Any]: ...


class S3Bucket:
    """One S3 bucket: presigning, bookkeeping calls and what their failures mean.

    Args:
        bucket: The bucket objects go into.
        endpoint_url: An S3-compatible endpoint such as ``http://127.0.0.1:9000`` for
            MinIO; requests then use path-style addressing. None means AWS, with
            virtual-hosted addressing on the region's endpoint.
        region: The signing region; None lets boto3's chain decide (``AWS_REGION``,
            ``AWS_DEFAULT_REGION``, the profile, else ``us-east-1``).
        public_base_url: Where stored objects are served from (a CDN or a public
            bucket website); None means the object's path-style URL at the endpoint.
        client: A ready boto3 S3 client to use instead of building one; ``endpoint_url``,
            ``region`` and the settings below are then ignored.
        max_attempts: Attempts of each call botocore sends, the first included.
        connect_timeout_s: botocore's connect timeout.
        read_timeout_s: botocore's read timeout.
        max_pool_connections: botocore's connection pool size.
        who: How messages name the user of the bucket, e.g. ``"The s3 object store"``.

    Raises:
        StorageConfigError: boto3 is not installed, or an argument is malformed.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        public_base_url: str | None = None,
        client: Any | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        max_pool_connections: int = DEFAULT_MAX_POOL_CONNECTIONS,
        who: str = "The s3 object store",
    ) -> None:
        try:
            import boto3
            import botocore.session
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError as exc:
            raise StorageConfigError(
                f"{who} needs boto3, which is not installed: {_INSTALL_HINT}",
                variable=None,
            ) from exc

        if not bucket:
            raise StorageConfigError("The S3 bucket name is empty.", variable=None)
        for name, url in (("endpoint_url", endpoint_url), ("public_base_url", public_base_url)):
            if url is not None and not _is_http_url(url):
                raise StorageConfigError(
                    f"The S3 {name} must be an http(s) URL, got {redact_url(url)!r}.",
                    variable=None,
                )

        self._bucket = bucket
        self._boto_errors: tuple[type[Exception], ...] = (ClientError, BotoCoreError)
        if client is None:
            # A Session of our own: boto3's default session is shared, and not thread-safe.
            core = botocore.session.Session()
            try:
                checksums = _checksum_defaults(
                    os.environ, core.get_scoped_config(), Config.OPTION_DEFAULTS
                )
                config = Config(
                    signature_version="s3v4",
                    s3={"addressing_style": _addressing_style(bucket, endpoint_url)},
                    retries={"mode": "standard", "total_max_attempts": max_attempts},
                    connect_timeout=connect_timeout_s,
                    read_timeout=read_timeout_s,
                    max_pool_connections=max_pool_connections,
                    **checksums,
                )
                client = boto3.session.Session(botocore_session=core).client(
                    "s3", endpoint_url=endpoint_url, region_name=region, config=config
                )
            except BotoCoreError as exc:  # e.g. AWS_PROFILE names no profile
                raise StorageConfigError(
                    f"{who} could not set up an S3 client: {redact_text(str(exc)).rstrip('.')}.",
                    variable=None,
                ) from exc
        self._client: _S3Client = client
        if public_base_url is not None:
            self._public_base = public_base_url.rstrip("/")
        else:
            endpoint = str(self._client.meta.endpoint_url).rstrip("/")
            self._public_base = f"{endpoint}/{quote(bucket, safe='')}"

    @property
    def bucket(self) -> str:
        """The bucket objects go into."""
        return self._bucket

    @property
    def endpoint_url(self) -> str:
        """The endpoint botocore sends to, e.g. ``https://s3.eu-west-1.amazonaws.com``."""
        return str(self._client.meta.endpoint_url).rstrip("/")

    @property
    def region(self) -> str | None:
        """The region requests are signed for."""
        region = getattr(self._client.meta, "region_name", None)
        return region if isinstance(region, str) else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bucket={self._bucket!r}, public_base={self._public_base!r})"

    @property
    def signs_checksums(self) -> bool:
        """True: S3 verifies a signed ``x-amz-checksum-crc64nvme`` itself (no awscrt
        needed here; the caller computes the value)."""
        return True

    def presign_put(
        self,
        key: str,
        content_type: str,
        content_length: int,
        expires_sec: int,
        *,
        checksum: str | None = None,
        if_none_match: bool = False,
    ) -> PresignedPut:
        """Presign one PUT of ``key`` bound to its content type and exact length.

        No network call is made; credentials are resolved (and cached by boto3) on the
        first call.

        Args:
            key: The object key, already checked against the key rules.
            content_type: The ``Content-Type`` the PUT must carry.
            content_length: The exact body length in bytes the PUT must carry.
            expires_sec: How long the URL stays valid, 1 to 604800 seconds.
            checksum: The body's CRC64NVME (S3's base64), signed as the
                ``x-amz-checksum-crc64nvme`` header: S3 refuses a body that does not
                match it (400 ``BadDigest``) and stores nothing.
            if_none_match: Sign ``If-None-Match: *``: S3 refuses (412
                ``PreconditionFailed``) to replace an object already at the key.

        Returns:
            The URL and the headers the PUT must send, all covered by the signature:
            ``Content-Type``, ``Content-Length``, and ``x-amz-checksum-crc64nvme`` /
            ``If-None-Match`` when asked for.

        Raises:
            ValueError: ``expires_sec`` or ``content_length`` is out of range, or
                ``checksum`` is not eight base64 bytes.
            ObjectStoreError: boto3 could not sign, e.g. it found no credentials.
        """
        if not 0 <= content_length <= MAX_PUT_BYTES:
            raise ValueError(
                f"content_length must be between 0 and {MAX_PUT_BYTES} bytes (S3's limit "
                f"for one PUT), got {content_length}"
            )
        params: dict[str, Any] = {"ContentType": content_type, "ContentLength": content_length}
        headers = {"Content-Type": content_type, "Content-Length": str(content_length)}
        _sign_checksum(params, headers, checksum)
        if if_none_match:
            params["IfNoneMatch"] = "*"
            headers["If-None-Match"] = "*"
        return self._presign("put_object", "PresignPutObject", key, params, headers, expires_sec)

    def _presign(
        self,
        client_method: str,
        operation: str,
        key: str,
        params: dict[str, Any],
        headers: dict[str, str],
        expires_sec: int,
    ) -> PresignedPut:
        """Sign one PUT of ``client_method``; ``headers`` are the signed ones to send."""
        if not 1 <= expires_sec <= MAX_PRESIGN_EXPIRES_S:
            raise ValueError(
                f"expires_sec must be between 1 and {MAX_PRESIGN_EXPIRES_S}, got {expires_sec}"
            )
        try:
            url = self._client.generate_presigned_url(
                client_method,
                Params={"Bucket": self._bucket, "Key": key, **params},
                ExpiresIn=expires_sec,
                HttpMethod="PUT",
            )
        except self._boto_errors as exc:
            raise self._error(operation, key, exc) from exc
        return PresignedPut(upload_url=url, headers=headers, expires_sec=expires_sec)

    def public_url(self, key: str) -> str:
        """Where the object can be downloaded once stored (no network call).

        Args:
            key: The object key.

        Returns:
            ``public_base_url`` (or the bucket's path-style URL at the endpoint), a
            slash and the key, percent-encoded with its slashes kept.
        """
        return f"{self._public_base}/{quote(key, safe='/')}"

    def head(self, key: str) -> ObjectInfo | None:
        """Size, ETag and full-object CRC64NVME of the stored object, or None.

        A bucket that does not exist looks the same as a missing object here (S3 answers
        a HEAD with a bare 404 either way); :meth:`check` tells them apart.

        Args:
            key: The object key.

        Returns:
            The object's size and its ETag, quotes included, and its CRC64NVME when S3
            holds one for the whole object (asked for with ``ChecksumMode=ENABLED``; a
            composite ``...-N`` value, or a ``ChecksumType`` other than
            ``FULL_OBJECT``, is left out); None on 404.

        Raises:
            ObjectStoreError: S3 answered with another error (403 when the credentials
                may not read the object, or may not list the bucket), or could not be
                reached.
        """
        try:
            response = self._client.head_object(
                Bucket=self._bucket, Key=key, ChecksumMode="ENABLED"
            )
        except self._boto_errors as exc:
            status = _status_of(exc)
            if status == HTTPStatus.NOT_FOUND:
                return None
            if status != HTTPStatus.FORBIDDEN:
                raise self._error("HeadObject", key, exc) from exc
            # Reading an SSE-KMS object's checksum needs kms:Decrypt, which a HEAD
            # without it does not: the size and ETag are still worth having.
            return self._head_without_checksum(key)
        return ObjectInfo(
            size_bytes=int(response["ContentLength"]),
            etag=str(response["ETag"]),
            checksum=_full_object_checksum(response),
        )

    def _head_without_checksum(self, key: str) -> ObjectInfo | None:
        try:
            response = self._client.head_object(Bucket=self._bucket, Key=key)
        except self._boto_errors as exc:
            if _status_of(exc) == HTTPStatus.NOT_FOUND:
                return None
            raise self._error("HeadObject", key, exc) from exc
        return ObjectInfo(size_bytes=int(response["ContentLength"]), etag=str(response["ETag"]))

    def delete(self, key: str) -> None:
        """Remove the object; a missing object is not an error.

        Args:
            key: The object key.

        Raises:
            ObjectStoreError: The bucket does not exist, access was denied, or S3 could
                not be reached.
        """
        try:
            self._client.delete_object(Bucket=self._bucket, Key=key)
        except self._boto_errors as exc:
            raise self._error("DeleteObject", key, exc) from exc

    # -- multipart uploads -----------------------------------------------------------

    def create_multipart(
        self, key: str, content_type: str, part_size: int = 0, *, checksum: bool = False
    ) -> str:
        """Start a multipart upload (CreateMultipartUpload) with this content type.

        Args:
            key: The object key.
            content_type: The ``Content-Type`` the finished object will have.
            part_size: Unused: S3 keeps each part on its own.
            checksum: Declare the upload ``ChecksumAlgorithm=CRC64NVME``,
                ``ChecksumType=FULL_OBJECT``: S3 then checks each part against its
                signed CRC, and the whole object against the one given at complete.

        Returns:
            S3's upload id.

        Raises:
            ObjectStoreError: S3 refused or could not be reached.
        """
        try:
            declared: dict[str, str] = {}
            if checksum:
                declared = {"ChecksumAlgorithm": _checksum.ALGORITHM, "ChecksumType": "FULL_OBJECT"}
            response = self._client.create_multipart_upload(
                Bucket=self._bucket, Key=key, ContentType=content_type, **declared
            )
        except self._boto_errors as exc:
            raise self._error("CreateMultipartUpload", key, exc) from exc
        upload_id = response.get("UploadId")
        if not isinstance(upload_id, str) or not upload_id:
            raise ObjectStoreError(
                f"S3 CreateMultipartUpload for '{key}' in bucket '{self._bucket}' answered "
                "without an upload id.",
                operation="CreateMultipartUpload",
                bucket=self._bucket,
                key=key,
            )
        return upload_id

    def presign_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        content_length: int | None,
        expires_sec: int,
        *,
        checksum: str | None = None,
    ) -> PresignedPut:
        """Presign one UploadPart, bound to its exact length if given (no network call).

        Args:
            key: The object key.
            upload_id: The upload the part belongs to.
            part_number: 1 to 10,000.
            content_length: The exact body length in bytes the PUT must carry, or None
                to leave the length unsigned (a signer that is itself the uploader has
                no one to bind).
            expires_sec: How long the URL stays valid, 1 to 604800 seconds.
            checksum: The part's own CRC64NVME (S3's base64), signed as the
                ``x-amz-checksum-crc64nvme`` header: S3 refuses a part that does not
                match it (400 ``BadDigest``).

        Returns:
            The URL and the signed headers the PUT must send: ``Content-Length`` (none
            when the length is unsigned) and ``x-amz-checksum-crc64nvme`` when given.

        Raises:
            ValueError: An argument is out of S3's range.
            ObjectStoreError: boto3 could not sign, e.g. it found no credentials.
        """
        if not 1 <= part_number <= MAX_PARTS:
            raise ValueError(f"part_number must be between 1 and {MAX_PARTS}, got {part_number}")
        params: dict[str, Any] = {"UploadId": upload_id, "PartNumber": part_number}
        headers: dict[str, str] = {}
        if content_length is not None:
            if not 0 <= content_length <= MAX_PART_BYTES:
                raise ValueError(
                    f"content_length must be between 0 and {MAX_PART_BYTES} bytes (S3's "
                    f"limit for one part), got {content_length}"
                )
            params["ContentLength"] = content_length
            headers["Content-Length"] = str(content_length)
        _sign_checksum(params, headers, checksum)
        return self._presign("upload_part", "PresignUploadPart", key, params, headers, expires_sec)

    def list_parts(
        self,
        key: str,
        upload_id: str,
        *,
        part_number_marker: int = 0,
        max_parts: int = MAX_LIST_PARTS,
    ) -> PartsPage:
        """One page of ListParts: the parts S3 holds above ``part_number_marker``.

        Args:
            key: The object key.
            upload_id: The upload.
            part_number_marker: List only parts with a larger number.
            max_parts: The most parts in the page, 1 to 1,000.

        Returns:
            The parts in ascending order, and the marker of the next page if truncated.
            Each part carries its ``ChecksumCRC64NVME`` when S3 lists one.

        Raises:
            NoSuchUpload: S3 has no such upload for this key (aborted or completed), said
                as ``NoSuchUpload`` or ``NoSuchKey``.
            ObjectStoreError: Another S3 error, or S3 could not be reached.
        """
        params: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": key,
            "UploadId": upload_id,
            "MaxParts": max_parts,
        }
        if part_number_marker:
            params["PartNumberMarker"] = part_number_marker
        try:
            response = self._client.list_parts(**params)
        except self._boto_errors as exc:
            if _error_code_of(exc) in _NO_SUCH_UPLOAD_CODES:
                raise NoSuchUpload(f"S3 has no multipart upload {upload_id!r} for '{key}'") from exc
            raise self._error("ListParts", key, exc) from exc
        parts = tuple(
            StoredPart(
                int(part["PartNumber"]),
                str(part["ETag"]),
                int(part["Size"]),
                _valid_checksum(part.get("ChecksumCRC64NVME")),
            )
            for part in response.get("Parts") or []
        )
        truncated = bool(response.get("IsTruncated"))
        marker = response.get("NextPartNumberMarker")
        if truncated and not marker:
            marker = parts[-1].part_number if parts else None
        return PartsPage(parts, truncated, int(marker) if truncated and marker else None)

    def complete_multipart(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[StoredPart],
        *,
        expected_size: int | None = None,
        checksum: str | None = None,
        if_none_match: bool = False,
    ) -> ObjectInfo:
        """Complete the upload (CompleteMultipartUpload), then check what S3 stored.

        A 200 answer with an error inside raises, thanks to botocore (see the module
        docstring). An object whose HEAD shows another size than the parts add up to
        raises as well; so does an answer without an ETag, unless HEAD also shows the
        multipart ETag the parts' ETags add up to (or the expected checksum).

        Args:
            key: The object key.
            upload_id: The upload.
            parts: The parts in ascending order, with their ETags and sizes (and their
                own checksums, when listed: each goes into the part list).
            expected_size: The object's size, if the parts' sizes are not known.
            checksum: The whole object's CRC64NVME (an upload created with
                ``checksum=True``): passed as ``ChecksumCRC64NVME`` with
                ``ChecksumType=FULL_OBJECT``, so S3 refuses parts that do not add up to
                it. HEAD's checksum, when it shows one, must equal it too.
            if_none_match: Pass ``IfNoneMatch="*"``: S3 refuses to replace an object
                already at the key.

        Returns:
            The object's size, S3's ETag for it (``"<md5 of part md5s>-N"``), and its
            CRC64NVME when S3 showed one.

        Raises:
            NoSuchUpload: S3 has no such upload for this key (``NoSuchUpload`` or
                ``NoSuchKey``).
            InvalidPart: S3 found a part missing, out of order, different or too small.
            ObjectExists: ``if_none_match`` and an object is at the key (412
                ``PreconditionFailed``); the upload stays.
            BadDigest: The parts do not add up to ``checksum`` (S3's ``BadDigest``, or
                ``InvalidRequest`` saying a checksum did not match), or HEAD shows
                another checksum (a store that did not check stored it anyway).
            ObjectStoreError: Any other failure, including a 200 with an error inside
                and 409 ``ConditionalRequestConflict`` (a concurrent write at the key;
                S3 says to retry).
        """
        listing = {"Parts": [_listed(part) for part in parts]}
        options: dict[str, str] = {}
        if checksum is not None:
            options = {"ChecksumCRC64NVME": checksum, "ChecksumType": "FULL_OBJECT"}
        if if_none_match:
            options["IfNoneMatch"] = "*"
        try:
            response = self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload=listing,
                **options,
            )
        except self._boto_errors as exc:
            code = _error_code_of(exc)
            if code in _NO_SUCH_UPLOAD_CODES:
                raise NoSuchUpload(f"S3 has no multipart upload {upload_id!r} for '{key}'") from exc
            if code in _INVALID_PART_CODES:
                reason = _reason(exc, _status_of(exc), code)
                raise InvalidPart(f"S3 refused the part list: {reason}") from exc
            if code in _PRECONDITION_CODES or _status_of(exc) == HTTPStatus.PRECONDITION_FAILED:
                raise ObjectExists(f"S3 already holds an object at '{key}'") from exc
            if _is_bad_digest(exc, code):
                reason = _reason(exc, _status_of(exc), code)
                raise BadDigest(f"S3 refused to assemble '{key}': {reason}") from exc
            raise self._error("CompleteMultipartUpload", key, exc) from exc
        etag = response.get("ETag")
        expected = _total(parts, expected_size)
        if not isinstance(etag, str) or not etag:
            return self._confirm_without_etag(key, parts, expected, checksum)
        stored = self.head(key)
        if stored is None or stored.size_bytes != expected:
            found = "no object" if stored is None else f"{stored.size_bytes} bytes"
            raise ObjectStoreError(
                f"S3 CompleteMultipartUpload for '{key}' in bucket '{self._bucket}' answered "
                f"200, but HEAD then shows {found}, not {expected} bytes.",
                operation="CompleteMultipartUpload",
                bucket=self._bucket,
                key=key,
            )
        _check_stored_checksum(key, stored, checksum)
        answered = _valid_checksum(response.get("ChecksumCRC64NVME"))
        if answered is not None and checksum is not None and answered != checksum:
            raise BadDigest(
                f"S3 assembled '{key}' with CRC64NVME {answered}, not the expected {checksum}"
            )
        return ObjectInfo(size_bytes=expected, etag=etag, checksum=stored.checksum or answered)

    def confirm_assembled(
        self,
        key: str,
        parts: Sequence[StoredPart],
        *,
        expected_size: int | None = None,
        checksum: str | None = None,
    ) -> ObjectInfo | None:
        """The object, if HEAD shows exactly these parts assembled; None otherwise.

        Assembled means the parts' total size, and either the multipart ETag their
        ETags add up to or, when ``checksum`` is given, that whole-object CRC64NVME.
        Never the size alone. Parts whose ETags are not MD5 digests (SSE-KMS, SSE-C)
        can be confirmed only by the checksum.

        Raises:
            ObjectStoreError: HEAD failed with something other than 404.
        """
        assembled = _assembled_etag(parts)
        if assembled is None and checksum is None:
            return None
        return self._head_shows(key, _total(parts, expected_size), assembled, checksum)[0]

    def _head_shows(
        self, key: str, expected: int, assembled: str | None, checksum: str | None
    ) -> tuple[ObjectInfo | None, ObjectInfo | None]:
        """One HEAD: the confirmed object (or None), and what HEAD showed."""
        stored = self.head(key)
        if stored is None or stored.size_bytes != expected:
            return None, stored
        if checksum is not None and stored.checksum is not None:
            # The stronger evidence decides, either way.
            if stored.checksum == checksum:
                return ObjectInfo(expected, stored.etag, stored.checksum), stored
            return None, stored
        if assembled is not None and stored.etag.strip('"').lower() == assembled.strip('"'):
            return ObjectInfo(expected, assembled, stored.checksum), stored
        return None, stored

    def _confirm_without_etag(
        self, key: str, parts: Sequence[StoredPart], expected: int, checksum: str | None
    ) -> ObjectInfo:
        """HEAD must show the assembly: the parts' total size, and their multipart ETag
        or the expected checksum."""
        prefix = (
            f"S3 CompleteMultipartUpload for '{key}' in bucket '{self._bucket}' answered "
            "without an ETag"
        )
        assembled = _assembled_etag(parts)
        if assembled is None and checksum is None:
            # SSE-KMS and SSE-C parts: no ETag to compare HEAD's with.
            raise ObjectStoreError(
                f"{prefix}, and the parts' ETags are not MD5 digests, so HEAD cannot "
                "confirm the object was assembled.",
                operation="CompleteMultipartUpload",
                bucket=self._bucket,
                key=key,
            )
        confirmed, stored = self._head_shows(key, expected, assembled, checksum)
        if confirmed is not None:
            return confirmed
        wanted = " and ".join(
            text
            for text in (
                None if assembled is None else f"ETag {assembled}",
                None if checksum is None else f"CRC64NVME {checksum}",
            )
            if text is not None
        )
        if stored is None:
            found = "no object"
        else:
            found = f"{stored.size_bytes} bytes with ETag {stored.etag}"
            if stored.checksum is not None:
                found += f" and CRC64NVME {stored.checksum}"
        raise ObjectStoreError(
            f"{prefix}, and HEAD then shows {found}, not {expected} bytes with {wanted}; "
            "the object may not be assembled.",
            operation="CompleteMultipartUpload",
            bucket=self._bucket,
            key=key,
        )

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort the upload (AbortMultipartUpload); S3 drops its parts.

        An unknown upload (``NoSuchUpload`` or ``NoSuchKey``: already aborted or
        completed) is fine.

        Raises:
            ObjectStoreError: Another S3 error, or S3 could not be reached.
        """
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=key, UploadId=upload_id)
        except self._boto_errors as exc:
            if _error_code_of(exc) in _NO_SUCH_UPLOAD_CODES:
                return
            raise self._error("AbortMultipartUpload", key, exc) from exc

    def check(self) -> None:
        """Fail fast on a bad configuration: the bucket must exist and be reachable.

        Meant for start-up (``ctrlupload serve --store s3``), so a wrong bucket, region,
        endpoint or credentials show up at once rather than on the first upload.

        Raises:
            ObjectStoreError: The bucket is missing or forbidden, or S3 is unreachable.
        """
        try:
            self._client.head_bucket(Bucket=self._bucket)
        except self._boto_errors as exc:
            raise self._error("HeadBucket", None, exc) from exc

    def close(self) -> None:
        """Close the S3 client's connection pool."""
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    def _error(self, operation: str, key: str | None, exc: Exception) -> ObjectStoreError:
        target = (
            f"bucket '{self._bucket}'" if key is None else f"'{key}' in bucket '{self._bucket}'"
        )
        status = _status_of(exc)
        error_code = _error_code_of(exc)
        reason = _reason(exc, status, error_code)
        response = _response_of(exc)
        error = response.get("Error", {})
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        region = region_in(
            headers.get("x-amz-bucket-region"),
            error.get("Region"),
            str(error.get("Message") or ""),
        )
        return ObjectStoreError(
            f"S3 {operation} for {target} failed: {reason}",
            operation=operation,
            bucket=self._bucket,
            key=key,
            status_code=status,
            error_code=error_code,
            kind=failure_kind(
                status=status,
                code=error_code,
                message=str(error.get("Message") or ""),
                exception_name=type(exc).__name__,
                bucket_level=key is None,
                region=region,
            ),
            bucket_region=region,
        )


#: S3's codes for credentials it does not accept (a wrong secret breaks the signature).
_CREDENTIAL_CODES: Final = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
    }
)
_DENIED_CODES: Final = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem"})
#: Codes that mean the request went to, or was signed for, another region.
_REGION_CODES: Final = frozenset(
    {"PermanentRedirect", "IllegalLocationConstraintException", "IncorrectEndpoint"}
)
#: Codes that mean a wrong region when their message or body names one.
_MAYBE_REGION_CODES: Final = frozenset(
    {"AuthorizationHeaderMalformed", "AuthorizationQueryParametersError"}
)
#: botocore's (and urllib3's) names for "no connection could be made".
_UNREACHABLE_ERRORS: Final = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "NewConnectionError",
        "NameResolutionError",
        "ConnectionRefusedError",
    }
)
#: botocore's names for "no usable credentials were found".
_NO_CREDENTIAL_ERRORS: Final = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "UnauthorizedSSOTokenError",
        "SSOTokenLoadError",
    }
)
_EXPECTING_REGION: Final = re.compile(r"expecting '([a-z0-9-]{2,40})'")


def region_in(*candidates: object) -> str | None:
    """The bucket's region, from the first candidate that names one.

    Candidates are tried in order: an ``x-amz-bucket-region`` header, an error's
    ``<Region>`` element, then a message such as AWS's ``the region 'us-east-1' is
    wrong; expecting 'eu-west-1'``.
    """
    for candidate in candidates:
        if not isinstance(candidate, str) or not candidate:
            continue
        match = _EXPECTING_REGION.search(candidate)
        if match:
            return match.group(1)
        if " " not in candidate and len(candidate) <= 40:
            return candidate
    return None


def failure_kind(
    *,
    status: int | None,
    code: str | None,
    message: str = "",
    exception_name: str | None = None,
    bucket_level: bool = False,
    region: str | None = None,
) -> FailureKind | None:
    """What a failed S3 request means, or None when it is none of the five kinds.

    Args:
        status: The HTTP status, or None when there was no answer.
        code: S3's error code, or None (a HEAD answer has no body).
        message: S3's error message.
        exception_name: The exception's class name when there was no answer
            (``EndpointConnectionError``, ``NoCredentialsError``...).
        bucket_level: The request was for the bucket (HeadBucket): a bare 404 then
            means the bucket is missing, not an object.
        region: The bucket's region, when the answer named one.
    """
    if status is None:
        if exception_name in _NO_CREDENTIAL_ERRORS:
            return "credentials"
        if exception_name in _UNREACHABLE_ERRORS:
            return "unreachable"
        return None
    if code == "NoSuchBucket":
        return "no-bucket"
    if code in _CREDENTIAL_CODES:
        return "credentials"
    if code in _DENIED_CODES:
        return "access-denied"
    if code in _REGION_CODES or status == HTTPStatus.MOVED_PERMANENTLY:
        return "wrong-region"
    if code in _MAYBE_REGION_CODES and (region is not None or "region" in message):
        return "wrong-region"
    if code is None:
        if status == HTTPStatus.NOT_FOUND and bucket_level:
            return "no-bucket"
        if status == HTTPStatus.FORBIDDEN:
            return "access-denied"
        if status == HTTPStatus.BAD_REQUEST and region is not None:
            return "wrong-region"
    return None


def _sign_checksum(params: dict[str, Any], headers: dict[str, str], checksum: str | None) -> None:
    """Add a CRC64NVME to sign as the ``x-amz-checksum-crc64nvme`` header."""
    if checksum is None:
        return
    if _checksum.decode(checksum) is None:
        raise ValueError(
            "checksum must be a CRC64NVME as S3 spells it: the base64 of its eight big-endian bytes"
        )
    params["ChecksumCRC64NVME"] = checksum
    headers[_checksum.HEADER] = checksum


def _valid_checksum(value: object) -> str | None:
    """A CRC64NVME as S3 spells it (eight base64 bytes), or None for anything else."""
    if isinstance(value, str) and _checksum.decode(value) is not None:
        return value
    return None


def _full_object_checksum(response: Mapping[str, Any]) -> str | None:
    """HEAD's CRC64NVME when it is the whole object's (not a composite ``...-N``)."""
    kind = response.get("ChecksumType")
    if kind is not None and kind != "FULL_OBJECT":
        return None
    return _valid_checksum(response.get("ChecksumCRC64NVME"))


def _listed(part: StoredPart) -> dict[str, Any]:
    """A part as CompleteMultipartUpload lists it: its checksum too, when known."""
    listed: dict[str, Any] = {"PartNumber": part.part_number, "ETag": part.etag}
    if part.checksum is not None:
        listed["ChecksumCRC64NVME"] = part.checksum
    return listed


def _is_bad_digest(exc: Exception, code: str | None) -> bool:
    """S3 saying the bytes do not match a checksum (``BadDigest``, or an
    ``InvalidRequest`` whose message says so)."""
    if code == "BadDigest":
        return True
    message = str(_response_of(exc).get("Error", {}).get("Message") or "")
    return code == "InvalidRequest" and bool(_CHECKSUM_MISMATCH.search(message))


def _check_stored_checksum(key: str, stored: ObjectInfo, checksum: str | None) -> None:
    """HEAD's checksum must be the expected one when both are known.

    S3 never stores a FULL_OBJECT upload whose parts do not add up to the checksum
    given; a store that does not check (moto) stores it anyway, and HEAD tells.
    """
    if checksum is not None and stored.checksum is not None and stored.checksum != checksum:
        raise BadDigest(
            f"the object stored at '{key}' has CRC64NVME {stored.checksum}, not the "
            f"expected {checksum}: the store assembled it without checking"
        )


def _assembled_etag(parts: Sequence[StoredPart]) -> str | None:
    """The multipart ETag these parts make, or None when their ETags are not MD5s."""
    digests = [part.etag.strip('"').lower() for part in parts]
    if not all(_MD5_HEX.fullmatch(digest) for digest in digests):
        return None
    return multipart_etag(digests)


def _total(parts: Sequence[StoredPart], expected_size: int | None) -> int:
    return sum(part.size_bytes for part in parts) if expected_size is None else expected_size


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _checksum_defaults(
    environ: Mapping[str, str], profile: Mapping[str, Any], options: Mapping[str, Any]
) -> dict[str, str]:
    """``when_required`` for each checksum setting the operator left unset.

    botocore reads the environment and the profile itself only for settings the
    ``Config`` leaves at None, so a setting found in either is left to it. A botocore
    too old to know a setting (before 1.36) adds no such checksums anyway.
    """
    return {
        name: "when_required"
        for name in _CHECKSUM_SETTINGS
        if name in options and not environ.get(f"AWS_{name.upper()}") and name not in profile
    }


def _addressing_style(bucket: str, endpoint_url: str | None) -> str:
    """Path style for custom endpoints; virtual-hosted on AWS unless TLS forbids it."""
    if endpoint_url is not None:
        return "path"
    # A dotted bucket name does not match the *.s3.amazonaws.com certificate. Naming
    # "virtual" (not "auto") also puts presigned URLs on the regional endpoint rather
    # than the global one, which redirects PUTs for buckets outside us-east-1.
    return "path" if "." in bucket else "virtual"


def _response_of(exc: Exception) -> dict[str, Any]:
    response = getattr(exc, "response", None)
    return response if isinstance(response, dict) else {}


def _status_of(exc: Exception) -> int | None:
    status = _response_of(exc).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def _error_code_of(exc: Exception) -> str | None:
    code = _response_of(exc).get("Error", {}).get("Code")
    # A HEAD answer has no body, so botocore reports the bare status as the code.
    if not isinstance(code, str) or not code or code.isdigit():
        return None
    return code


def _reason(exc: Exception, status: int | None, error_code: str | None) -> str:
    """One clause saying what went wrong, without credentials or query strings."""
    if status is not None:
        message = str(_response_of(exc).get("Error", {}).get("Message") or "").rstrip(".")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        head = f"{error_code} (HTTP {status})" if error_code else f"HTTP {status} {phrase}"
        if status == HTTPStatus.NOT_FOUND and error_code is None:
            message = "the bucket does not exist"
        elif status == HTTPStatus.FORBIDDEN and error_code is None:
            message = "access denied; check the credentials and the bucket policy"
        elif status == HTTPStatus.MOVED_PERMANENTLY and error_code is None:
            headers = _response_of(exc).get("ResponseMetadata", {}).get("HTTPHeaders", {})
            region = headers.get("x-amz-bucket-region", "another region")
            message = f"the bucket is in {region}; set the store's region to match"
        if message and message != phrase:
            return redact_text(f"{head}: {message}.")
        return f"{head}."
    name = type(exc).__name__
    if name == "NoCredentialsError":
        return (
            "no AWS credentials were found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE."
        )
    text = redact_text(str(exc)).rstrip(".")
    return f"{name}: {text}."
