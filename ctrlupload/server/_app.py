"""The reference backend as a WSGI application: the seed's internal storage API.

Mount it in any WSGI server, or run it with :class:`ctrlupload.server.WSGIServer` (cheroot,
threaded, HTTP/1.1 keep-alive). Routes:

* ``POST {presign path}``, ``POST {complete path}``, ``POST {delete path}``: the
  internal API, bearer-token protected (``openapi.yaml`` beside this file).
* ``POST {multipart initiate | presign-parts | list-parts | complete | abort path}``:
  the multipart extension (issue 4), protected and validated the same way.
* ``POST {complete-set path}``: records a set of objects (a render's video, subtitles
  and thumbnail), stored single PUTs and multipart uploads to assemble, all or none,
  in one SQLite transaction (issue 10).
* ``PUT /upload/{key}``, ``PUT /upload-part/{upload_id}/{n}`` and ``GET /files/{key}``:
  signed uploads and public downloads for a store that serves them itself (the local
  store); a store whose URLs point at S3 says so (``NotServedHere``) and they get 404.

The app uses its store through the :class:`ObjectStore` Protocol only.
* ``GET /openapi.yaml``, ``GET /healthz``.

Multipart uploads are recorded in the :class:`AssetDB` registry when initiated, so a
restarted backend still knows them. ``complete`` checks the part list against what the
store holds before assembling (ascending unique numbers, matching ETags, every part but
the last at least ``min_part_bytes``, sizes adding up to ``size_bytes``), and is safe to
repeat: a completed upload answers the same success to the same part list.

Recording an object (``complete``, a multipart completion, ``complete-set``) and deleting
one take a lock per key (striped), so a delete racing a completion never leaves a row for
an object that is gone. ``complete-set`` holds the locks of all its keys (and uploads) at
once, taken in one fixed order.

Integrity and no silent overwrite (issue 11), when the store signs checksums
(``signs_checksums``): presign-put signs the client's CRC64NVME into the URL, and
``If-None-Match: *`` when asked; multipart uploads are declared with a full-object
CRC64NVME, each part's URL is signed with its own, and complete has storage check the
whole object's. ``complete`` may identify the object by its checksum instead of its
ETag. A conditional complete that finds the key taken answers 412 ``object_exists``, and
parts that do not add up to the checksum 400 ``bad_digest``. The local store's PUT
endpoints answer as S3: 400 ``BadDigest``, 412 ``PreconditionFailed``.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, BinaryIO, Final, TypeVar
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from pydantic import BaseModel, ValidationError

from .. import _checksum
from .._errors import InvalidKeyError, StorageError
from .._keys import guess_content_type, validate_key
from .._settings import Settings
from ..protocol._contract import (
    CompletedPart,
    CompleteRequest,
    CompleteSetObject,
    CompleteSetRequest,
    DeleteRequest,
    MultipartAbortRequest,
    MultipartCompleteRequest,
    MultipartInitiateRequest,
    MultipartListRequest,
    MultipartPresignRequest,
    PresignRequest,
    bare_etag,
    check_content_type,
)
from ..protocol._parts import (
    DEFAULT_PART_BYTES,
    MAX_OBJECT_BYTES,
    MIN_PART_BYTES,
    choose_part_size,
    multipart_etag,
)
from ._db import AssetDB, AssetRecord, AssetRow, UploadRow
from ._locks import StripedLocks
from ._store import (
    MAX_LIST_PARTS,
    BadDigest,
    IncompleteBody,
    InvalidPart,
    NoSuchUpload,
    NotServedHere,
    ObjectExists,
    ObjectInfo,
    ObjectStore,
    PartGrant,
    StoredPart,
    UploadGrant,
    UploadRejected,
)

logger = logging.getLogger("ctrlupload.server")

_Grant = TypeVar("_Grant", UploadGrant, PartGrant)

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

GIB: Final = 1024**3
#: S3's limit for one PUT; the default ceiling for content_length.
DEFAULT_MAX_CONTENT_LENGTH: Final = 5 * GIB
DEFAULT_EXPIRES_SEC: Final = 600
#: S3's largest object: the default ceiling for a multipart upload's content_length.
DEFAULT_MAX_OBJECT_BYTES: Final = MAX_OBJECT_BYTES
#: S3's smallest part (all but the last): the default floor of the part size.
DEFAULT_MIN_PART_BYTES: Final = MIN_PART_BYTES
#: A complete request for 10,000 parts is about 700 KB of JSON.
MAX_JSON_BYTES: Final = 2 * 1024 * 1024
_DEFAULTS: Final = Settings()
_MD5_HEX: Final = re.compile(r"[0-9a-f]{32}")
#: What a multipart upload declared with a checksum is declared with.
_CHECKSUM_TYPE: Final = "FULL_OBJECT"
#: The WSGI names of the headers the local store's PUTs may carry signed.
_CHECKSUM_ENVIRON: Final = "HTTP_" + _checksum.HEADER.upper().replace("-", "_")
_IF_NONE_MATCH_ENVIRON: Final = "HTTP_IF_NONE_MATCH"


@dataclass(frozen=True)
class ApiPaths:
    """Where the internal API lives (the BACKEND_STORAGE_*_PATH settings)."""

    presign: str = _DEFAULTS.backend_storage_presign_path
    complete: str = _DEFAULTS.backend_storage_complete_path
    delete: str = _DEFAULTS.backend_storage_delete_path
    complete_set: str = _DEFAULTS.backend_storage_complete_set_path
    multipart_initiate: str = _DEFAULTS.backend_storage_multipart_initiate_path
    multipart_presign: str = _DEFAULTS.backend_storage_multipart_presign_path
    multipart_list: str = _DEFAULTS.backend_storage_multipart_list_path
    multipart_complete: str = _DEFAULTS.backend_storage_multipart_complete_path
    multipart_abort: str = _DEFAULTS.backend_storage_multipart_abort_path


class _HttpError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or []


def _not_allowed(allowed: str, message: str) -> _HttpError:
    return _HttpError(405, "method_not_allowed", message, [("Allow", allowed)])


_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    412: "Precondition Failed",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def _status(code: int) -> str:
    return f"{code} {_REASONS.get(code, 'Unknown')}"


def openapi_document() -> bytes:
    """The OpenAPI 3.1 document of the internal storage API, as shipped."""
    return resources.files("ctrlupload.server").joinpath("openapi.yaml").read_bytes()


class ReferenceBackend:
    """The seed's backend: presigns uploads, records completions, deletes.

    It also runs the multipart extension: initiate, presign parts, list parts,
    complete and abort; and the set-level complete.

    Args:
        token: The service token clients must present as ``Bearer``.
        store: Where objects live (local files or S3).
        db: Where completed uploads and the multipart registry are recorded.
        max_content_length: Largest ``content_length`` presign accepts.
        expires_sec: Lifetime of each presigned URL.
        paths: Where the internal endpoints are mounted.
        max_object_bytes: Largest ``content_length`` multipart initiate accepts.
        min_part_bytes: Smallest part size initiate answers, and the least every part
            but the last must hold at complete. S3 needs 5 MiB; tests of the local
            store may lower it.
        max_list_parts: Most parts in one list-parts page (1 to 1,000); tests lower it
            to exercise paging.
        default_part_bytes: The part size initiate answers when the client asks for
            none (raised to ``min_part_bytes`` and as far as 10,000 parts need).
    """

    def __init__(
        self,
        *,
        token: str,
        store: ObjectStore,
        db: AssetDB,
        max_content_length: int = DEFAULT_MAX_CONTENT_LENGTH,
        expires_sec: int = DEFAULT_EXPIRES_SEC,
        paths: ApiPaths | None = None,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
        min_part_bytes: int = DEFAULT_MIN_PART_BYTES,
        max_list_parts: int = MAX_LIST_PARTS,
        default_part_bytes: int = DEFAULT_PART_BYTES,
    ) -> None:
        if not token:
            raise ValueError("the reference backend needs a non-empty service token")
        if not 0 <= max_object_bytes <= MAX_OBJECT_BYTES:
            raise ValueError(f"max_object_bytes must be between 0 and {MAX_OBJECT_BYTES}")
        if min_part_bytes < 1:
            raise ValueError("min_part_bytes must be at least 1")
        if expires_sec < 1:
            raise ValueError("expires_sec must be at least 1 (the contract's minimum)")
        if not 1 <= max_list_parts <= MAX_LIST_PARTS:
            raise ValueError(f"max_list_parts must be between 1 and {MAX_LIST_PARTS}")
        self._expected_auth = f"Bearer {token}".encode()
        self.store = store
        self.db = db
        self.max_content_length = max_content_length
        self.expires_sec = expires_sec
        self.paths = paths or ApiPaths()
        self.max_object_bytes = max_object_bytes
        self.min_part_bytes = min_part_bytes
        self.max_list_parts = max_list_parts
        self.default_part_bytes = default_part_bytes
        # Orders complete and abort of one upload: a retried complete waits for the
        # first one and then answers from the registry.
        self._upload_lock = StripedLocks()
        self._initiate_lock = StripedLocks()
        # Orders what records an object (complete, multipart completion) and what
        # removes it (delete) per key, so that no row outlives its object: a complete
        # that found the object records it before a delete can remove both. Taken
        # inside the upload lock, never around it.
        self._key_lock = StripedLocks()
        self._api: dict[str, Callable[[Any, Environ], dict[str, Any]]] = {
            self.paths.presign: lambda request, _: self._presign(request),
            self.paths.complete: lambda request, _: self._complete(request),
            self.paths.delete: lambda request, _: self._delete(request),
            self.paths.complete_set: lambda request, _: self._complete_set(request),
            self.paths.multipart_initiate: self._multipart_initiate,
            self.paths.multipart_presign: lambda request, _: self._multipart_presign(request),
            self.paths.multipart_list: lambda request, _: self._multipart_list(request),
            self.paths.multipart_complete: lambda request, _: self._multipart_complete(request),
            self.paths.multipart_abort: lambda request, _: self._multipart_abort(request),
        }
        self._models: dict[str, type[BaseModel]] = {
            self.paths.presign: PresignRequest,
            self.paths.complete: CompleteRequest,
            self.paths.delete: DeleteRequest,
            self.paths.complete_set: CompleteSetRequest,
            self.paths.multipart_initiate: MultipartInitiateRequest,
            self.paths.multipart_presign: MultipartPresignRequest,
            self.paths.multipart_list: MultipartListRequest,
            self.paths.multipart_complete: MultipartCompleteRequest,
            self.paths.multipart_abort: MultipartAbortRequest,
        }
        if len(self._api) != 9:
            raise ValueError("the internal API paths must be distinct")

    def __repr__(self) -> str:
        return f"ReferenceBackend(store={self.store!r})"

    @property
    def signs_checksums(self) -> bool:
        """Whether the store signs and verifies CRC64NVME (a store from before issue 11
        has no such attribute, and does not)."""
        return bool(getattr(self.store, "signs_checksums", False))

    # -- WSGI entry ------------------------------------------------------------------

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"].upper()
        path = environ.get("PATH_INFO", "") or "/"
        try:
            if path in self._api:
                if method != "POST":
                    raise _not_allowed("POST", f"{path} accepts POST only")
                return self._json_api(environ, start_response, path)
            if path.startswith("/upload-part/"):
                if method != "PUT":
                    raise _not_allowed("PUT", "part uploads use PUT")
                return self._upload_part(environ, start_response, path[len("/upload-part/") :])
            if path.startswith("/upload/"):
                if method != "PUT":
                    raise _not_allowed("PUT", "uploads use PUT")
                return self._upload(environ, start_response, path[len("/upload/") :])
            if path.startswith("/files/"):
                if method not in ("GET", "HEAD"):
                    raise _not_allowed("GET, HEAD", "downloads use GET")
                return self._download(environ, start_response, path[len("/files/") :])
            if path in ("/openapi.yaml", "/healthz") and method not in ("GET", "HEAD"):
                raise _not_allowed("GET, HEAD", f"{path} accepts GET only")
            if path == "/openapi.yaml":
                return _respond(
                    start_response, 200, openapi_document(), "application/yaml; charset=utf-8"
                )
            if path == "/healthz":
                return _json(start_response, 200, {"status": "ok"})
            raise _HttpError(404, "not_found", f"no route for {method} {path}")
        except _HttpError as error:
            body = json.dumps({"error": error.code, "message": error.message}).encode()
            return _respond(start_response, error.status, body, "application/json", error.headers)
        except StorageError as error:
            # The object store failed (S3 unreachable, access denied...). 503 tells the
            # client to retry with backoff; the store itself does not retry.
            logger.warning("object store failed on %s %s: %s", method, path, error)
            return _respond(
                start_response,
                503,
                json.dumps({"error": "storage_unavailable", "message": str(error)}).encode(),
                "application/json",
                [("Retry-After", "1")],
            )
        except Exception:
            logger.exception("reference backend failed on %s %s", method, path)
            return _json(
                start_response, 500, {"error": "internal", "message": "internal server error"}
            )

    # -- internal API ----------------------------------------------------------------

    def _json_api(self, environ: Environ, start_response: StartResponse, path: str) -> list[bytes]:
        supplied = str(environ.get("HTTP_AUTHORIZATION", "")).encode("latin-1", "replace")
        if not hmac.compare_digest(supplied, self._expected_auth):
            raise _HttpError(
                401,
                "unauthorized",
                "missing or wrong bearer token",
                [("WWW-Authenticate", 'Bearer realm="ctrlupload"')],
            )
        payload = _read_json(environ)
        try:
            request = self._models[path].model_validate(payload, strict=True)
        except ValidationError as exc:
            raise _HttpError(400, "bad_request", _describe_validation(exc)) from None
        for field, key in _object_keys(request):
            try:
                validate_key(key)
            except InvalidKeyError as exc:
                raise _HttpError(400, "bad_request", f"{field}: {exc.reason}") from None
        return _json(start_response, 200, self._api[path](request, environ))

    def _presign(self, request: PresignRequest) -> dict[str, Any]:
        if request.content_length > self.max_content_length:
            raise _HttpError(
                400,
                "bad_request",
                f"content_length {request.content_length} exceeds this backend's maximum "
                f"of {self.max_content_length} bytes",
            )
        # Only what was asked goes to the store: a store from before issue 11 takes none.
        extra: dict[str, Any] = {}
        if request.checksum is not None and self.signs_checksums:
            extra["checksum"] = request.checksum
        if request.if_none_match is not None:
            extra["if_none_match"] = True
        signed = self.store.presign_put(
            request.object_key,
            request.content_type,
            request.content_length,
            self.expires_sec,
            **extra,
        )
        return {
            "upload_url": signed.upload_url,
            "public_url": self.store.public_url(request.object_key),
            "headers": signed.headers,
            "expires_sec": signed.expires_sec,
        }

    def _complete(self, request: CompleteRequest) -> dict[str, Any]:
        with self._key_lock(request.object_key):
            stored = self._verify_stored(
                request.object_key, request.size_bytes, request.etag, request.checksum
            )
            self.db.upsert(
                request.object_key,
                stored.etag,
                stored.size_bytes,
                request.content_type,
                request.public_url,
                checksum=stored.checksum,
            )
        return _with_checksum({"status": "ok", "etag": stored.etag}, stored.checksum)

    def _verify_stored(
        self, key: str, size_bytes: int, etag: str | None, checksum: str | None = None
    ) -> ObjectInfo:
        """What the store holds under ``key``; 409 unless it has this size, ETag and checksum.

        The ETag and the checksum are checked when given (at least one is: a stored
        checksum identifies the object as well as its ETag, for a client that never saw
        the ETag). A store that holds no checksum for the object (one that keeps none,
        or an object stored without) cannot confirm one: the ETag must then identify the
        object. Under the key's lock, so that the object is still there when it is
        recorded.
        """
        stored = self.store.head(key)
        if stored is None:
            raise _HttpError(409, "object_mismatch", f"object '{key}' is not in storage")
        if stored.size_bytes != size_bytes:
            raise _HttpError(
                409,
                "object_mismatch",
                f"object '{key}' holds {stored.size_bytes} bytes, not {size_bytes}",
            )
        if etag is not None and bare_etag(stored.etag) != bare_etag(etag):
            raise _HttpError(
                409, "object_mismatch", f"object '{key}' has ETag {stored.etag}, not {etag}"
            )
        if checksum is not None and stored.checksum is None and etag is None:
            raise _HttpError(
                409,
                "object_mismatch",
                f"object '{key}' has no checksum in storage to compare with {checksum}; "
                "give its etag",
            )
        if checksum is not None and stored.checksum not in (None, checksum):
            raise _HttpError(
                409,
                "object_mismatch",
                f"object '{key}' has CRC64NVME {stored.checksum} in storage, not {checksum}",
            )
        return stored

    def _delete(self, request: DeleteRequest) -> dict[str, Any]:
        with self._key_lock(request.object_key):
            self.store.delete(request.object_key)
            self.db.delete(request.object_key)
        return {"status": "ok"}

    # -- set-level complete --------------------------------------------------------------

    def _complete_set(self, request: CompleteSetRequest) -> dict[str, Any]:
        """Check every object (assembling multipart uploads), then record all in one go.

        Holds the upload locks of every multipart object and then the key locks of
        every object, each set taken in one fixed order, as the single-object calls take
        theirs (upload lock, then key lock): two sets sharing keys cannot deadlock.
        Nothing is recorded unless every object checks out; uploads assembled before
        one failed stay assembled, unrecorded, and a repeat recovers them.
        """
        items = request.objects
        if not items:
            return {"status": "ok", "objects": []}
        upload_ids = [item.upload_id for item in items if item.upload_id is not None]
        with (
            self._upload_lock.hold(upload_ids),
            self._key_lock.hold(item.object_key for item in items),
        ):
            records = [self._set_member(item) for item in items]
            self.db.complete_set(records)
        return {
            "status": "ok",
            "objects": [
                _with_checksum(
                    {"object_key": r.object_key, "etag": r.etag, "public_url": r.public_url},
                    r.checksum,
                )
                for r in records
            ],
        }

    def _set_member(self, item: CompleteSetObject) -> AssetRecord:
        """Check one object of a set, assembling it if it is multipart; its row to record.

        Errors name the object's key.
        """
        key = item.object_key
        try:
            if item.upload_id is None:
                assert item.public_url is not None
                stored = self._verify_stored(key, item.size_bytes, item.etag, item.checksum)
                return AssetRecord(
                    key,
                    stored.etag,
                    stored.size_bytes,
                    item.content_type,
                    item.public_url,
                    checksum=stored.checksum,
                )
            return self._set_upload(item, item.upload_id)
        except _HttpError as error:
            raise _naming(key, error) from None

    def _set_upload(self, item: CompleteSetObject, upload_id: str) -> AssetRecord:
        assert item.parts is not None
        key = item.object_key
        request = MultipartCompleteRequest(
            object_key=key,
            upload_id=upload_id,
            parts=item.parts,
            size_bytes=item.size_bytes,
            content_type=item.content_type,
            checksum_algorithm=item.checksum_algorithm,
            checksum_type=_CHECKSUM_TYPE if item.checksum is not None else None,
            checksum=item.checksum,
            if_none_match=item.if_none_match,
        )
        digest = _completion_digest(request)
        public_url = self.store.public_url(key)
        completed_etag = self._completed_etag(request, digest)
        if completed_etag is not None:
            # Completed before, with these parts (a repeated set, or multipart/complete).
            # Recorded again only if the object is still the one it made.
            stored = self._verify_stored(key, item.size_bytes, completed_etag, item.checksum)
            return AssetRecord(
                key,
                completed_etag,
                stored.size_bytes,
                item.content_type,
                public_url,
                checksum=stored.checksum,
            )
        info = self._assemble(request)
        return AssetRecord(
            key,
            info.etag,
            info.size_bytes,
            item.content_type,
            public_url,
            upload_id=upload_id,
            digest=digest,
            checksum=info.checksum,
        )

    # -- multipart extension -----------------------------------------------------------

    def _pending_upload(self, object_key: str, upload_id: str) -> UploadRow:
        """The registry row of an upload still in progress for this key, else 404."""
        row = self.db.get_upload(upload_id)
        if row is None or row.object_key != object_key:
            raise _no_such_upload(object_key, upload_id)
        if row.completed:
            raise _HttpError(
                404, "no_such_upload", f"multipart upload {upload_id!r} is already completed"
            )
        return row

    def _multipart_initiate(
        self, request: MultipartInitiateRequest, environ: Environ
    ) -> dict[str, Any]:
        idempotency_key = _idempotency_key(environ)
        if idempotency_key is None:
            return self._start_upload(request, None, "")
        digest = hashlib.sha256(request.model_dump_json().encode("utf-8")).hexdigest()
        # One call per key at a time: a retry that races the call it repeats waits for it.
        with self._initiate_lock(idempotency_key):
            earlier = self.db.initiated_with(idempotency_key)
            if earlier is not None:
                earlier_digest, upload_id = earlier
                if earlier_digest != digest:
                    raise _HttpError(
                        422,
                        "idempotency_key_reused",
                        "Idempotency-Key was used for another request",
                    )
                row = self.db.get_upload(upload_id)
                if row is not None and not row.completed:
                    logger.info("initiate repeated with its Idempotency-Key: upload %s", upload_id)
                    return self._initiate_answer(row)
            return self._start_upload(request, idempotency_key, digest)

    def _initiate_answer(self, row: UploadRow) -> dict[str, Any]:
        """The initiate's answer; it echoes the checksum and condition taken on."""
        answer: dict[str, Any] = {
            "upload_id": row.upload_id,
            "part_size": row.part_size,
            "expires_sec": self.expires_sec,
        }
        if row.checksum:
            answer["checksum_algorithm"] = _checksum.ALGORITHM
            answer["checksum_type"] = _CHECKSUM_TYPE
        if row.if_none_match:
            answer["if_none_match"] = "*"
        return answer

    def _start_upload(
        self, request: MultipartInitiateRequest, idempotency_key: str | None, digest: str
    ) -> dict[str, Any]:
        if request.content_length > self.max_object_bytes:
            raise _HttpError(
                400,
                "bad_request",
                f"content_length {request.content_length} exceeds this backend's maximum "
                f"of {self.max_object_bytes} bytes",
            )
        part_size = choose_part_size(
            request.content_length,
            request.part_size or self.default_part_bytes,
            min_part_bytes=self.min_part_bytes,
        )
        checksum = request.checksum_algorithm is not None and self.signs_checksums
        # Only what was asked goes to the store: a store from before issue 11 takes none.
        extra: dict[str, Any] = {"checksum": True} if checksum else {}
        upload_id = self.store.create_multipart(
            request.object_key, request.content_type, part_size, **extra
        )
        try:
            row = self.db.add_upload(
                upload_id,
                request.object_key,
                request.content_type,
                request.content_length,
                part_size,
                idempotency_key=idempotency_key,
                request_digest=digest,
                checksum=checksum,
                # Taken on by every store: the backend's complete passes it on.
                if_none_match=request.if_none_match is not None,
            )
        except BaseException:
            self.store.abort_multipart(request.object_key, upload_id)
            raise
        return self._initiate_answer(row)

    def _multipart_presign(self, request: MultipartPresignRequest) -> dict[str, Any]:
        row = self._pending_upload(request.object_key, request.upload_id)
        count = _part_count(row)
        for number in request.part_numbers:
            if not 1 <= number <= count:
                raise _HttpError(
                    400,
                    "bad_request",
                    f"part number {number} is outside 1..{count}, the parts of a "
                    f"{row.content_length}-byte upload in {row.part_size}-byte parts",
                )
        if request.checksums is not None and not row.checksum:
            raise _HttpError(
                400,
                "bad_request",
                f"checksums given for multipart upload {row.upload_id!r}, which was not "
                "initiated with a checksum (or this backend's store does not sign them)",
            )
        checksums: Sequence[str | None] = request.checksums or [None] * len(request.part_numbers)
        parts = []
        for number, checksum in zip(request.part_numbers, checksums, strict=True):
            extra = {} if checksum is None else {"checksum": checksum}
            signed = self.store.presign_part(
                row.object_key,
                row.upload_id,
                number,
                _part_length(row, number),
                self.expires_sec,
                **extra,
            )
            parts.append(
                {"part_number": number, "upload_url": signed.upload_url, "headers": signed.headers}
            )
        return {"parts": parts, "expires_sec": self.expires_sec}

    def _multipart_list(self, request: MultipartListRequest) -> dict[str, Any]:
        row = self._pending_upload(request.object_key, request.upload_id)
        try:
            page = self.store.list_parts(
                row.object_key,
                row.upload_id,
                part_number_marker=request.part_number_marker or 0,
                max_parts=self.max_list_parts,
            )
        except NoSuchUpload:
            raise _no_such_upload(request.object_key, request.upload_id) from None
        return {
            "parts": [
                _with_checksum(
                    {
                        "part_number": part.part_number,
                        "etag": part.etag,
                        "size_bytes": part.size_bytes,
                    },
                    part.checksum,
                )
                for part in page.parts
            ],
            "is_truncated": page.is_truncated,
            "next_part_number_marker": page.next_part_number_marker,
        }

    def _multipart_complete(self, request: MultipartCompleteRequest) -> dict[str, Any]:
        key, upload_id = request.object_key, request.upload_id
        digest = _completion_digest(request)
        public_url = self.store.public_url(key)
        with self._upload_lock(upload_id):
            completed_etag = self._completed_etag(request, digest)
            if completed_etag is not None:
                recorded = self.db.get(key)
                checksum = request.checksum
                if recorded is not None and recorded.etag == completed_etag:
                    checksum = recorded.checksum
                return _with_checksum({"public_url": public_url, "etag": completed_etag}, checksum)
            with self._key_lock(key):
                info = self._assemble(request)
                self.db.complete_upload(
                    upload_id,
                    etag=info.etag,
                    digest=digest,
                    size_bytes=info.size_bytes,
                    content_type=request.content_type,
                    public_url=public_url,
                    checksum=info.checksum,
                )
        return _with_checksum({"public_url": public_url, "etag": info.etag}, info.checksum)

    def _completed_etag(self, request: MultipartCompleteRequest, digest: str) -> str | None:
        """The ETag the upload completed with, when it did with this part list.

        None when it is pending and the request fits it (part order, size). Under the
        upload's lock.

        Raises:
            _HttpError: 404 for an unknown upload, one of another key or one completed
                with other parts; 400 invalid_part for a part list out of order or a
                size other than the initiate's.
        """
        key, upload_id = request.object_key, request.upload_id
        row = self.db.get_upload(upload_id)
        if row is None or row.object_key != key:
            raise _no_such_upload(key, upload_id)
        if row.completed_etag is not None:
            if row.completed_digest == digest:
                return row.completed_etag
            raise _HttpError(
                404,
                "no_such_upload",
                f"multipart upload {upload_id!r} was already completed with other parts",
            )
        _check_part_order(request.parts)
        if request.size_bytes != row.content_length:
            raise _invalid_part(
                f"size_bytes {request.size_bytes} differs from the content_length "
                f"{row.content_length} given at initiate"
            )
        if request.checksum is not None and not row.checksum:
            raise _HttpError(
                400,
                "bad_request",
                f"a checksum was given for multipart upload {upload_id!r}, which was not "
                "initiated with one (or this backend's store does not sign them)",
            )
        return None

    def _assemble(self, request: MultipartCompleteRequest) -> ObjectInfo:
        """Check the parts and assemble them; the object made. Records nothing.

        Under both locks. An upload the store no longer has is taken as assembled by
        an earlier completion when the object it would make is there.
        """
        key, upload_id = request.object_key, request.upload_id
        try:
            held = self._all_parts(key, upload_id)
        except NoSuchUpload:
            held = None
        if held is None:
            # The store no longer has the upload. If that is because an earlier
            # complete assembled it and died before recording, the object is there.
            return self._recover_assembly(request)
        parts = self._verified_parts(request, held)
        row = self.db.get_upload(upload_id)
        conditional = request.if_none_match is not None or (row is not None and row.if_none_match)
        # Only what was asked goes to the store: a store from before issue 11 takes none.
        extra: dict[str, Any] = {}
        if request.checksum is not None:
            extra["checksum"] = request.checksum
        if conditional:
            extra["if_none_match"] = True
        try:
            return self.store.complete_multipart(key, upload_id, parts, **extra)
        except NoSuchUpload:
            # Gone between listing and assembling: assembled by a completion that
            # died before it recorded (or before the store cleaned up after it).
            return self._recover_assembly(request)
        except InvalidPart as exc:
            raise _invalid_part(str(exc)) from None
        except BadDigest as exc:
            raise _HttpError(400, "bad_digest", str(exc)) from None
        except ObjectExists:
            # Our own object, if a completion published it and died before the store
            # dropped the upload: then nothing is replaced, and the upload is done.
            stored = self.store.head(key)
            if stored is not None and self._is_assembly_of(request, stored):
                logger.info("multipart upload %s of %s was assembled before", upload_id, key)
                self.store.abort_multipart(key, upload_id)
                return stored
            raise _HttpError(
                412, "object_exists", f"an object is already stored at '{key}'"
            ) from None
        except UploadRejected as rejected:
            raise _HttpError(400, "bad_request", rejected.message) from None

    def _all_parts(self, key: str, upload_id: str) -> dict[int, StoredPart]:
        held: dict[int, StoredPart] = {}
        marker = 0
        while True:
            page = self.store.list_parts(
                key, upload_id, part_number_marker=marker, max_parts=MAX_LIST_PARTS
            )
            held.update((part.part_number, part) for part in page.parts)
            if not page.is_truncated or page.next_part_number_marker is None:
                return held
            marker = page.next_part_number_marker

    def _verified_parts(
        self, request: MultipartCompleteRequest, held: dict[int, StoredPart]
    ) -> list[StoredPart]:
        """The parts to assemble, as the store holds them; 400 unless they all fit."""
        parts = []
        for position, wanted in enumerate(request.parts, start=1):
            part = held.get(wanted.part_number)
            if part is None:
                raise _invalid_part(f"part {wanted.part_number} was not uploaded")
            if bare_etag(part.etag) != bare_etag(wanted.etag):
                raise _invalid_part(
                    f"part {wanted.part_number} has ETag {part.etag}, not {wanted.etag}"
                )
            if position < len(request.parts) and part.size_bytes < self.min_part_bytes:
                raise _invalid_part(
                    f"part {wanted.part_number} holds {part.size_bytes} bytes; every part "
                    f"but the last must hold at least {self.min_part_bytes}"
                )
            parts.append(part)
        total = sum(part.size_bytes for part in parts)
        if total != request.size_bytes:
            raise _invalid_part(
                f"the parts hold {total} bytes, not the {request.size_bytes} of size_bytes"
            )
        return parts

    def _recover_assembly(self, request: MultipartCompleteRequest) -> ObjectInfo:
        key, upload_id = request.object_key, request.upload_id
        stored = self.store.head(key)
        if stored is None or not self._is_assembly_of(request, stored):
            raise _no_such_upload(key, upload_id)
        logger.info("multipart upload %s of %s was assembled before; recording it", upload_id, key)
        return stored

    @staticmethod
    def _is_assembly_of(request: MultipartCompleteRequest, stored: ObjectInfo) -> bool:
        """Whether ``stored`` is the object this completion makes: its size, and the
        multipart ETag of these parts or the whole-object checksum given (never the size
        alone)."""
        if stored.size_bytes != request.size_bytes:
            return False
        if request.checksum is not None and stored.checksum == request.checksum:
            return True
        bare = [bare_etag(part.etag) for part in request.parts]
        return all(_MD5_HEX.fullmatch(etag) for etag in bare) and bare_etag(
            stored.etag
        ) == bare_etag(multipart_etag(bare))

    def _multipart_abort(self, request: MultipartAbortRequest) -> dict[str, Any]:
        key, upload_id = request.object_key, request.upload_id
        with self._upload_lock(upload_id):
            row = self.db.get_upload(upload_id)
            if row is not None and (row.object_key != key or row.completed):
                return {"status": "ok"}  # another key's upload, or done: nothing to abort
            # Without a row the store may still hold the upload (a lost registry): drop it.
            self.store.abort_multipart(key, upload_id)
            if row is not None:
                self.db.delete_upload(upload_id)
        return {"status": "ok"}

    # -- local store endpoints ---------------------------------------------------------

    def _upload(self, environ: Environ, start_response: StartResponse, raw_key: str) -> list[bytes]:
        store = self.store

        def authorize(request: _SignedRequest) -> UploadGrant:
            key = validate_key(_wsgi_path_to_text(raw_key))
            # The headers go to the store only when sent: one from before issue 11 takes none.
            extra: dict[str, Any] = {}
            if request.checksum is not None:
                extra["checksum"] = request.checksum
            if request.if_none_match is not None:
                extra["if_none_match"] = request.if_none_match
            return store.authorize(
                key,
                content_type=request.content_type,
                content_length=request.length,
                expires=request.expires,
                signature=request.signature,
                **extra,
            )

        return self._signed_put(environ, start_response, authorize, store.receive)

    def _upload_part(
        self, environ: Environ, start_response: StartResponse, raw_path: str
    ) -> list[bytes]:
        store = self.store
        upload_id, _, number_text = raw_path.partition("/")
        # Anything but plain digits is part number 0, which the store refuses with 400.
        valid = number_text.isascii() and number_text.isdigit() and len(number_text) <= 5
        part_number = int(number_text) if valid else 0

        def authorize(request: _SignedRequest) -> PartGrant:
            extra = {} if request.checksum is None else {"checksum": request.checksum}
            return store.authorize_part(
                upload_id,
                part_number,
                content_length=request.length,
                expires=request.expires,
                signature=request.signature,
                **extra,
            )

        return self._signed_put(environ, start_response, authorize, store.receive_part)

    def _signed_put(
        self,
        environ: Environ,
        start_response: StartResponse,
        authorize: Callable[[_SignedRequest], _Grant],
        receive: Callable[[_Grant, BinaryIO], ObjectInfo],
    ) -> list[bytes]:
        """Check a presigned PUT like S3 does, then stream its body into the store."""
        body: BinaryIO = environ["wsgi.input"]
        refused = _framing_refusal(environ, start_response)
        if refused is not None:
            return refused
        length = int(environ["CONTENT_LENGTH"])
        query = parse_qs(environ.get("QUERY_STRING", ""))
        checksum = environ.get(_CHECKSUM_ENVIRON)
        try:
            grant = authorize(
                _SignedRequest(
                    length=length,
                    content_type=environ.get("CONTENT_TYPE", ""),
                    expires=query.get("expires", [None])[0],
                    signature=query.get("signature", [None])[0],
                    checksum=None if checksum is None else str(checksum),
                    if_none_match=_optional_text(environ.get(_IF_NONE_MATCH_ENVIRON)),
                )
            )
        except NotServedHere:
            raise _HttpError(
                404, "not_found", f"no route for PUT {environ.get('PATH_INFO')}"
            ) from None
        except (InvalidKeyError, UnicodeDecodeError, UploadRejected, NoSuchUpload) as refusal:
            # Read what the client is sending, so it sees this answer instead of a reset.
            _drain(body, length, self.max_content_length)
            return _s3_refusal(start_response, refusal)
        try:
            info = receive(grant, body)
        except IncompleteBody as exc:
            logger.info("upload to %s abandoned: %s", environ.get("PATH_INFO"), exc)
            return _s3_error(start_response, 400, "IncompleteBody", str(exc))
        except BadDigest:
            return _s3_error(
                start_response,
                400,
                "BadDigest",
                "The CRC64NVME you specified did not match the calculated checksum.",
            )
        except ObjectExists:
            return _s3_error(
                start_response,
                412,
                "PreconditionFailed",
                "At least one of the pre-conditions you specified did not hold",
                condition="If-None-Match",
            )
        except (UploadRejected, NoSuchUpload) as refusal:
            return _s3_refusal(start_response, refusal)
        headers = [("ETag", info.etag)]
        if checksum is not None and info.checksum is not None:
            headers.append((_checksum.HEADER, info.checksum))  # as S3 answers a checked PUT
        return _respond(start_response, 200, b"", None, headers)

    def _download(
        self, environ: Environ, start_response: StartResponse, raw_key: str
    ) -> Iterable[bytes]:
        store = self.store
        try:
            key = validate_key(_wsgi_path_to_text(raw_key))
        except (InvalidKeyError, UnicodeDecodeError):
            raise _HttpError(404, "not_found", "no such object") from None
        opened = store.open(key)
        if opened is None:
            raise _HttpError(404, "not_found", f"no object '{key}'")
        # The size and ETag come with the handle: a head() now could describe a file
        # that replaced this one meanwhile.
        handle, info = opened
        try:
            row = self.db.get(key)
        except BaseException:
            handle.close()
            raise
        headers = [
            ("Content-Type", _served_content_type(key, row)),
            ("Content-Length", str(info.size_bytes)),
            ("ETag", info.etag),
        ]
        start_response(_status(200), headers)
        if environ["REQUEST_METHOD"].upper() == "HEAD":
            handle.close()
            return []
        return _file_blocks(handle)


@dataclass(frozen=True)
class _SignedRequest:
    """What a presigned PUT presents to be checked against its signature."""

    length: int
    content_type: str
    expires: str | None
    signature: str | None
    #: The ``x-amz-checksum-crc64nvme`` and ``If-None-Match`` headers, None when absent.
    checksum: str | None
    if_none_match: str | None


def _with_checksum(answer: dict[str, Any], checksum: str | None) -> dict[str, Any]:
    """``answer`` with the CRC64NVME storage holds, when it holds one (the field is
    optional: an answer without it has the shape it had before issue 11)."""
    if checksum is not None:
        answer["checksum"] = checksum
    return answer


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _served_content_type(key: str, row: AssetRow | None) -> str:
    """The recorded content type, or the guessed one when there is none or it is unsafe.

    Rows written by older versions may hold any text, and a CR, LF or non-latin-1
    character in a header would inject headers or break every download of the object.
    """
    if row is not None:
        try:
            return check_content_type(row.content_type)
        except ValueError:
            logger.warning("the recorded content type of %r is not a media type; guessing", key)
    return guess_content_type(key)


def _idempotency_key(environ: Environ) -> str | None:
    """The request's Idempotency-Key: 1 to 255 visible ASCII characters, or None."""
    value = environ.get("HTTP_IDEMPOTENCY_KEY")
    if value is None:
        return None
    text = str(value)
    if not 1 <= len(text) <= 255 or not all("!" <= char <= "~" for char in text):
        raise _HttpError(
            400, "bad_request", "Idempotency-Key must be 1 to 255 visible ASCII characters"
        )
    return text


def _object_keys(request: BaseModel) -> Iterator[tuple[str, str]]:
    """Each object key of a request, with the field (and position) that holds it."""
    if isinstance(request, CompleteSetRequest):
        for position, item in enumerate(request.objects):
            yield f"objects.{position}.object_key {_shown(item.object_key)}", item.object_key
    else:
        yield "object_key", request.object_key  # type: ignore[attr-defined]


def _shown(key: str) -> str:
    """A key quoted for a message, cut short when long."""
    return repr(key) if len(key) <= 80 else repr(key[:80]) + "..."


def _naming(key: str, error: _HttpError) -> _HttpError:
    """The error of one object of a set, with a message that names the object's key."""
    if f"'{key}'" in error.message:
        return error
    return _HttpError(error.status, error.code, f"object '{key}': {error.message}", error.headers)


def _no_such_upload(object_key: str, upload_id: str) -> _HttpError:
    return _HttpError(
        404,
        "no_such_upload",
        f"no multipart upload {upload_id!r} for '{object_key}' (never started, or aborted)",
    )


def _invalid_part(message: str) -> _HttpError:
    return _HttpError(400, "invalid_part", message)


def _part_count(row: UploadRow) -> int:
    return max(1, -(-row.content_length // row.part_size))


def _part_length(row: UploadRow, number: int) -> int:
    """The exact length of part ``number`` (the last is shorter; 0 bytes is one part)."""
    return max(0, min(row.part_size, row.content_length - (number - 1) * row.part_size))


def _check_part_order(parts: Sequence[CompletedPart]) -> None:
    for before, after in itertools.pairwise(parts):
        if after.part_number <= before.part_number:
            raise _invalid_part(
                "parts must be listed in ascending order of part_number, each once: "
                f"{after.part_number} follows {before.part_number}"
            )


def _completion_digest(request: MultipartCompleteRequest) -> str:
    """What identifies a completion: the size, each part's number and bare ETag, and the
    whole-object checksum when one is given (a completion without one digests as before
    issue 11, so that the rows of older completions still answer their repeats)."""
    fields = [str(request.size_bytes)]
    fields += [f"{part.part_number}={bare_etag(part.etag)}" for part in request.parts]
    if request.checksum is not None:
        fields.append(f"{_checksum.ALGORITHM}={request.checksum}")
    return hashlib.sha256(";".join(fields).encode("utf-8")).hexdigest()


def _framing_refusal(environ: Environ, start_response: StartResponse) -> list[bytes] | None:
    """S3's answer to a PUT it will not read (chunked, or no length), else None."""
    if "chunked" in str(environ.get("HTTP_TRANSFER_ENCODING", "")).lower():
        # S3 does not take chunked presigned PUTs; the gateway closes the connection.
        return _s3_error(
            start_response,
            501,
            "NotImplemented",
            "A header you provided implies functionality that is not implemented",
            "Transfer-Encoding",
        )
    length_text = environ.get("CONTENT_LENGTH") or ""
    if not (length_text.isascii() and length_text.isdigit()):
        return _s3_error(
            start_response, 411, "MissingContentLength", "You must provide Content-Length"
        )
    return None


def _s3_no_such_upload(start_response: StartResponse) -> list[bytes]:
    return _s3_error(
        start_response,
        404,
        "NoSuchUpload",
        "The specified upload does not exist. The upload ID may be invalid, or the upload "
        "may have been aborted or completed.",
    )


def _file_blocks(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while block := handle.read(1024 * 1024):
            yield block


def _wsgi_path_to_text(raw: str) -> str:
    # PEP 3333: PATH_INFO carries the URL-decoded bytes as latin-1 characters.
    return raw.encode("latin-1").decode("utf-8")


def _read_json(environ: Environ) -> Any:
    length_text = environ.get("CONTENT_LENGTH") or ""
    if not length_text.isdigit():
        raise _HttpError(400, "bad_request", "a JSON body with Content-Length is required")
    length = int(length_text)
    if length > MAX_JSON_BYTES:
        raise _HttpError(400, "bad_request", f"JSON body over {MAX_JSON_BYTES} bytes")
    raw = environ["wsgi.input"].read(length)
    try:
        return json.loads(raw)
    except ValueError:
        raise _HttpError(400, "bad_request", "body is not valid JSON") from None
    except RecursionError:
        # A small body can nest deeper than the decoder recurses ([[[[...]]]]).
        raise _HttpError(400, "bad_request", "body is JSON nested too deeply") from None


def _describe_validation(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_input=False, include_url=False)[:5]:
        field = ".".join(str(part) for part in error["loc"]) or "body"
        problems.append(f"{field}: {error['msg']}")
    return "; ".join(problems)


def _drain(body: BinaryIO, length: int, limit: int) -> None:
    if length > limit:
        return  # too much to read; the gateway closes the connection instead
    remaining = length
    while remaining > 0:
        block = body.read(min(remaining, 1024 * 1024))
        if not block:
            return
        remaining -= len(block)


def _respond(
    start_response: StartResponse,
    status: int,
    body: bytes,
    content_type: str | None,
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    headers = [("Content-Length", str(len(body)))]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    headers.extend(extra or [])
    start_response(_status(status), headers)
    return [body]


def _json(start_response: StartResponse, status: int, payload: Any) -> list[bytes]:
    return _respond(start_response, status, json.dumps(payload).encode("utf-8"), "application/json")


def _s3_refusal(start_response: StartResponse, refusal: Exception) -> list[bytes]:
    if isinstance(refusal, UploadRejected):
        return _s3_error(start_response, refusal.status, refusal.code, refusal.message)
    if isinstance(refusal, NoSuchUpload):
        return _s3_no_such_upload(start_response)
    return _s3_error(start_response, 400, "InvalidArgument", f"bad key: {refusal}")


def _s3_error(
    start_response: StartResponse,
    status: int,
    code: str,
    message: str,
    header_name: str | None = None,
    *,
    condition: str | None = None,
) -> list[bytes]:
    extra = f"<HeaderName>{escape(header_name)}</HeaderName>" if header_name else ""
    if condition:
        extra += f"<Condition>{escape(condition)}</Condition>"
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>{extra}</Error>"
    ).encode()
    return _respond(start_response, status, xml, "application/xml")
